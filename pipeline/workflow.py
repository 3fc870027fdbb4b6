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

from pipeline.config import from_dict, load_config, to_dict
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
    """`out` (folder of the fitted teacher) and TeacherConfig fields; embed uses it as its model
    when `embed.model` is empty."""
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
    from pipeline.store import Store

    reports: list[RunReport] = []
    store_path = str(cfg.store)
    if "synth" in cfg.stages:
        if cfg.dataset != "synthetic":
            raise ValueError("the synth stage only makes sense for dataset=synthetic")
        from pipeline.synth import SynthConfig, synthesise

        opts = dict(cfg.synth)
        room = from_dict(SynthConfig, opts.pop("room", {}) or {}, where="workflow.synth.room")
        unknown = set(opts) - {"scenes", "seed", "start"}
        if unknown:
            raise ValueError(f"workflow.synth: unknown key(s) {sorted(unknown)}")
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
            tcfg = from_dict(TeacherConfig, opts, where="workflow.teacher")
            if (Path(out) / "config.json").exists() and not force:
                echo(f"teacher: {out} exists, kept (use --force to refit)")
            else:
                result = run_fit(store_path, Store.open(store_path).scene_ids(), out, tcfg)
                echo(f"teacher: fitted into {out}: " + ", ".join(
                    f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in result.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)))
            continue
        else:
            module, scfg = _stage_config(cfg, stage)
            store = Store.open(store_path)
            ids = scene_ids(store.scene_ids())
            if stage == "embed":
                report = _run_embed(module, store_path, ids, scfg, cfg.executor, force)
                module.run_vocabulary(store_path, scfg.model, store.class_names, vocab_name="classes")
            else:
                fn = functools.partial(module.run_scene, store_path, cfg=scfg, force=force)
                report = run_scenes(stage, fn, ids, cfg.executor)
        echo(report.summary())
        reports.append(report)
        if report.results and not report.of("done") and not report.of("skipped"):
            echo(f"{stage}: every scene failed; stopping")
            break
    return reports


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
