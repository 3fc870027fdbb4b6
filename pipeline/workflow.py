"""Workflows: a preprocessing run described as data (`workflows/<dataset>.yaml`).

A workflow names the dataset, the raw folder, the store, the stages to run in order, each
stage's config and the executor. `run_workflow` runs the stages one after the other through
`pipeline.executor`; every stage skips scenes already complete with the same config, so a
killed or partly failed workflow is simply run again.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pipeline.config import ConfigError, from_dict, load_config, to_dict
from pipeline.executor import ExecutorConfig, RunReport, run_scenes, select_shard

StageName = Literal["synth", "ingest", "overseg", "render", "teacher", "embed"]

_STAGE_MODULES = {
    "overseg": ("pipeline.overseg", "OversegConfig"),
    "render": ("pipeline.render", "RenderConfig"),
    "embed": ("pipeline.embed", "EmbedConfig"),
}


@dataclass(frozen=True)
class WorkflowConfig:
    """A preprocessing run."""

    dataset: str = "synthetic"
    """scannet | synthetic | s3dis | semantickitti."""
    raw: str = "data/synthetic_raw"
    """Raw release folder (for synthetic: where `synth` writes the rooms)."""
    store: str = "data/synthetic.zarr"
    """The store to fill."""
    stages: tuple[StageName, ...] = ("ingest", "overseg", "render", "embed")
    """Stages to run, in order."""
    scenes: str = ""
    """Optional scene list file (default: every scene found)."""
    shard: str = ""
    """Optional shard i/n of the scene list."""
    synth: dict[str, Any] = field(default_factory=lambda: {"scenes": 8, "seed": 0})
    """synthetic only: `scenes`, `seed`, `start` and SynthConfig fields under `room`."""
    ingest: dict[str, Any] = field(default_factory=dict)
    """IngestConfig fields (the dataset is taken from `dataset`)."""
    overseg: dict[str, Any] = field(default_factory=dict)
    """OversegConfig fields."""
    render: dict[str, Any] = field(default_factory=dict)
    """RenderConfig fields."""
    teacher: dict[str, Any] = field(default_factory=lambda: {"out": "data/teacher"})
    """`out` (folder of the fitted teacher), `corpus` (the teacher's own store of rooms, never
    `store`; with `corpus_rooms: N` a folder where N synthetic corpus rooms are built) and
    TeacherConfig fields; embed uses `out` as its model when `embed.model` is empty."""
    embed: dict[str, Any] = field(default_factory=dict)
    """EmbedConfig fields (`model`: a CLIP folder or hub id)."""
    executor: ExecutorConfig = ExecutorConfig()
    """Where the stages run."""


def load_workflow(path: str | Path | None, overrides: list[str]) -> WorkflowConfig:
    return load_config(WorkflowConfig, path, overrides)


def _stage_config(cfg: WorkflowConfig, stage: str) -> Any:
    module_name, class_name = _STAGE_MODULES[stage]
    module = importlib.import_module(module_name)
    values = dict(getattr(cfg, stage))
    if stage == "embed" and not values.get("model"):
        values["model"] = str(cfg.teacher.get("out", "data/teacher"))
    return module, from_dict(getattr(module, class_name), values, where=f"workflow.{stage}")


def run_workflow(cfg: WorkflowConfig, *, echo: Callable[[str], None] = print, force: bool = False) -> list[RunReport]:
    """Run every stage of the workflow; return one report per stage (stops after a stage whose
    every scene failed, since later stages would have nothing to work on)."""
    from pipeline import ingest as ingest_mod
    from pipeline.executor import read_scene_list
    from pipeline.store import Store, log_dir

    reports: list[RunReport] = []
    store_path = str(cfg.store)
    if "embed" in cfg.stages and dict(cfg.embed).get("model"):
        # fail before hours of ingest and rendering when the model cannot be there
        note = check_model(str(cfg.embed["model"]), allow_download=bool(dict(cfg.embed).get("allow_download", True)))
        if note:
            echo(note)
    if "synth" in cfg.stages:
        if cfg.dataset != "synthetic":
            raise ConfigError(f"workflow: the synth stage only makes sense for dataset=synthetic, not {cfg.dataset!r}")
        from pipeline.synth import SynthConfig, synthesise

        opts = dict(cfg.synth)
        room = from_dict(SynthConfig, opts.pop("room", {}) or {}, where="workflow.synth.room")
        unknown = set(opts) - {"scenes", "seed", "start"}
        if unknown:
            raise ConfigError(f"workflow.synth: unknown key(s) {sorted(unknown)}")
        ids = synthesise(cfg.raw, int(opts.get("scenes", 8)), seed=int(opts.get("seed", 0)),
                         start=int(opts.get("start", 0)), cfg=room)
        echo(f"synth: {len(ids)} rooms in {cfg.raw}")

    def scene_ids(all_ids: list[str]) -> list[str]:
        ids = read_scene_list(cfg.scenes) if cfg.scenes else all_ids
        return select_shard(ids, cfg.shard or None)

    for stage in cfg.stages:
        if stage == "synth":
            continue
        if stage == "ingest":
            icfg = from_dict(ingest_mod.IngestConfig, {**cfg.ingest, "dataset": cfg.dataset}, where="workflow.ingest")
            Store.create(store_path, dataset=cfg.dataset, class_names=ingest_mod.class_names(cfg.dataset))
            ids = scene_ids(ingest_mod.list_raw_scenes(cfg.raw, icfg))
            fn = functools.partial(ingest_mod.run_scene, store_path, str(cfg.raw), cfg=icfg, force=force)
            report = run_scenes("ingest", fn, ids, cfg.executor)
        elif stage == "teacher":
            from pipeline.teacher import TeacherConfig, run_fit

            opts = dict(cfg.teacher)
            out = opts.pop("out", "data/teacher")
            corpus_store = _teacher_corpus(cfg, opts, echo)  # never this workflow's store
            tcfg = from_dict(TeacherConfig, opts, where="workflow.teacher")
            if (Path(out) / "config.json").exists() and not force:
                echo(f"teacher: {out} exists, kept (use --force to refit)")
            else:
                result = run_fit(corpus_store, None, out, tcfg)
                echo(f"teacher: fitted into {out}: " + ", ".join(
                    f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in result.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)))
            continue
        else:
            module, scfg = _stage_config(cfg, stage)
            store = Store.open(store_path)
            ids = scene_ids(store.scene_ids())
            if stage == "embed":
                check_model(scfg.model, allow_download=scfg.allow_download, load=True)  # once, not once per scene
                report = _run_embed(module, store_path, ids, scfg, cfg.executor, force)
                module.run_vocabulary(store_path, scfg.model, store.class_names, vocab_name="classes")
            else:
                fn = functools.partial(module.run_scene, store_path, cfg=scfg, force=force)
                report = run_scenes(stage, fn, ids, cfg.executor)
        echo(report.summary())
        report.append_log(log_dir(store_path) / f"{stage}.jsonl")  # beside the store, where Zarr does not look
        reports.append(report)
        if report.results and not report.of("done") and not report.of("skipped"):
            echo(f"{stage}: every scene failed; stopping")
            break
    return reports


def _teacher_corpus(cfg: WorkflowConfig, opts: dict[str, Any], echo: Callable[[str], None]) -> str:
    """The teacher's corpus store from `teacher.corpus` (a store, or with `corpus_rooms` a folder
    in which synthetic corpus rooms are built); pops both keys from `opts`."""
    corpus = opts.pop("corpus", None)
    rooms = opts.pop("corpus_rooms", None)
    if not corpus:
        raise ConfigError(
            "workflow.teacher: set `corpus`, the teacher's own store of rooms (never the 3D store: the teacher "
            "would hand its labels, novel classes included, to the 3D network); for synthetic rooms add "
            "`corpus_rooms: N` to build one, or build it with `ws3d teacher corpus`"
        )
    if rooms:
        from pipeline.corpus import CorpusConfig, build_corpus

        seed = int(dict(cfg.synth).get("seed", 0))
        corpus = build_corpus(corpus, CorpusConfig(rooms=int(rooms), seed=seed), executor=cfg.executor, echo=echo)["store"]
    if Path(corpus).resolve() == Path(cfg.store).resolve():
        raise ConfigError(f"workflow.teacher.corpus is the workflow's own store {cfg.store}; give the teacher its own rooms")
    return str(corpus)


def check_model(model: str, *, allow_download: bool = True, load: bool = False) -> str | None:
    """Check that embed's CLIP model can be had before the stage runs on every scene.

    A folder must hold a model (config.json). A hub id must be in the local Hugging Face cache,
    unless downloads are allowed (then a note is returned; with ``load`` the model is loaded once,
    which downloads it or fails once instead of once per scene).

    Raises:
        ModelLoadError (a UserError) naming the model and what to do.
    """
    import os

    from pipeline.clip_model import ModelLoadError, is_local_model, load_encoder, model_identity

    if is_local_model(model):
        model_identity(model)  # raises ModelLoadError naming the folder
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(model, "config.json"), str)
    except (ImportError, ValueError):
        cached = False
    if cached:
        return None
    offline = not allow_download or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    if offline:
        raise ModelLoadError(
            f"embed.model={model!r} is a hub id that is not in the local Hugging Face cache and downloads are off; "
            "pass embed.model=<a CLIP folder>, or stages=[ingest,overseg,render] to stop before embed"
        )
    if load:
        load_encoder(model, device="cpu", allow_download=True)  # downloads into the cache, or raises once
        return None
    return f"embed: {model} is not in the local Hugging Face cache; the embed stage will download it (needs network)"


def _run_embed(module: Any, store_path: str, ids: list[str], scfg: Any, executor: ExecutorConfig, force: bool) -> RunReport:
    """Embedding batches across scenes in one process when a GPU is there (the fast path);
    otherwise per scene through the executor like the other stages."""
    import time

    import torch

    if torch.cuda.is_available() and executor.kind in ("local", "sync"):
        start = time.perf_counter()
        results = module.embed_scenes(store_path, ids, scfg, force=force)
        ordered = [results[s] for s in ids] if isinstance(results, dict) else list(results)
        return RunReport("embed", ordered, time.perf_counter() - start)
    fn = functools.partial(module.run_scene, store_path, cfg=scfg, force=force)
    return run_scenes("embed", fn, ids, executor)


def describe(cfg: WorkflowConfig) -> dict[str, Any]:
    return to_dict(cfg)
