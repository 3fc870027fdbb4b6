"""Workflows: a preprocessing run described as data (`workflows/<dataset>.yaml`).

A workflow names the dataset, the raw folder, the store, the stages to run in order, each stage's
config and the executor. Every section is typed by its stage's config class, so the whole file is
checked when it is loaded (an unknown key or a wrong type anywhere is a `ConfigError` naming it)
and `validate_workflow` checks what needs more than types (reader options, the teacher's corpus,
the embed model) before the first stage starts: a typo never surfaces hours into a cluster run.

`run_workflow` runs the per-scene stages through the same `pipeline.stage.run_stage` as the CLI's
stage commands; `synth` (generate the synthetic rooms) and `teacher` (build the teacher's corpus
and fit it) are the two workflow-only steps. Every stage skips scenes already complete with the
same config, so a killed or partly failed workflow is simply run again.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pipeline.config import ConfigError, load_config, to_dict
from pipeline.datasets.ingest import IngestConfig
from pipeline.datasets.synthetic import SynthConfig, synthesise
from pipeline.embed.config import EmbedConfig
from pipeline.embed.stage import check_model
from pipeline.executor import ExecutorConfig, RunReport
from pipeline.overseg.config import OversegConfig
from pipeline.render.config import RenderConfig
from pipeline.stage import StageRun, run_stage
from pipeline.stages import BY_NAME
from pipeline.store import same_store
from pipeline.teacher.config import TeacherConfig
from pipeline.teacher.corpus import CorpusConfig, build_corpus
from pipeline.teacher.fit import run_fit

StageName = Literal["synth", "ingest", "overseg", "render", "teacher", "embed"]


@dataclass(frozen=True)
class SynthStep:
    """The `synth` step (synthetic rooms only): which rooms to generate into `raw`."""

    scenes: int = 8
    """Number of rooms."""
    seed: int = 0
    """Random seed (rooms are deterministic per seed and index)."""
    start: int = 0
    """Index of the first room (scene ids follow it)."""
    room: SynthConfig = SynthConfig()
    """How rooms are generated."""


@dataclass(frozen=True)
class TeacherStep(TeacherConfig):
    """The `teacher` step: the teacher's own corpus and its fit (TeacherConfig fields, plus where)."""

    out: str = "data/teacher"
    """Folder of the fitted teacher; the embed stage uses it when `embed.model` is empty."""
    corpus: str = ""
    """The teacher's own store of rooms, never the workflow's `store`; with `corpus_rooms` a folder
    in which that many synthetic corpus rooms are built (its store is `<corpus>/store.zarr`)."""
    corpus_rooms: int = 0
    """Synthetic corpus rooms to build under `corpus` (0: `corpus` is a ready store)."""

    def fit_config(self) -> TeacherConfig:
        """The TeacherConfig part (what the teacher folder records)."""
        return TeacherConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TeacherConfig)})


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
    synth: SynthStep = SynthStep()
    """synthetic only: the rooms to generate."""
    ingest: IngestConfig = IngestConfig()
    """IngestConfig (its `dataset` is taken from the workflow's `dataset`)."""
    overseg: OversegConfig = OversegConfig()
    """OversegConfig."""
    render: RenderConfig = RenderConfig()
    """RenderConfig."""
    teacher: TeacherStep = TeacherStep()
    """The teacher step: `out`, `corpus`, `corpus_rooms` and TeacherConfig fields."""
    embed: EmbedConfig = EmbedConfig()
    """EmbedConfig (`model`: a CLIP folder or hub id; empty: the teacher's `out`)."""
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    """Where the stages run."""

    def stage_config(self, stage: str) -> Any:
        """The resolved config of a per-scene stage."""
        if stage == "ingest":
            return dataclasses.replace(self.ingest, dataset=self.dataset)
        if stage == "embed" and not self.embed.model:
            return dataclasses.replace(self.embed, model=str(self.teacher.out))
        return getattr(self, stage)


def load_workflow(path: str | Path | None, overrides: list[str]) -> WorkflowConfig:
    """A workflow from its YAML file and `key=value` overrides, checked whole (`validate_workflow`)."""
    cfg = load_config(WorkflowConfig, path, overrides)
    validate_workflow(cfg)
    return cfg


def validate_workflow(cfg: WorkflowConfig) -> list[str]:
    """What can be checked before the first stage starts, beyond types; returns notes to print.

    Raises:
        ConfigError (or ModelLoadError): a synth step for another dataset, reader options the
        dataset's reader does not know, a teacher step without its own corpus or with the
        workflow's store as corpus, an embed model that cannot be had.
    """
    notes: list[str] = []
    if "synth" in cfg.stages and cfg.dataset != "synthetic":
        raise ConfigError(f"workflow: the synth stage only makes sense for dataset=synthetic, not {cfg.dataset!r}")
    if "ingest" in cfg.stages:
        cfg.stage_config("ingest").reader_config()
    if "teacher" in cfg.stages:
        if not cfg.teacher.corpus:
            raise ConfigError(
                "workflow.teacher: set `corpus`, the teacher's own store of rooms (never the 3D store: the teacher "
                "would hand its labels, novel classes included, to the 3D network); for synthetic rooms add "
                "`corpus_rooms: N` to build one, or build it with `ws3d teacher corpus`"
            )
        if same_store(_corpus_store(cfg), cfg.store):
            raise ConfigError(f"workflow.teacher.corpus is the workflow's own store {cfg.store}; give the teacher its own rooms")
    if "embed" in cfg.stages and cfg.embed.model:
        # fail before hours of ingest and rendering when the model cannot be there
        note = check_model(cfg.embed.model, allow_download=cfg.embed.allow_download)
        if note:
            notes.append(note)
    return notes


def _corpus_store(cfg: WorkflowConfig) -> str:
    corpus = cfg.teacher.corpus
    return str(Path(corpus) / "store.zarr") if cfg.teacher.corpus_rooms else corpus


def run_workflow(cfg: WorkflowConfig, *, echo: Callable[[str], None] = print, force: bool = False) -> list[RunReport]:
    """Run every stage of the workflow; return one report per per-scene stage (stops after a stage
    whose every scene failed, since later stages would have nothing to work on)."""
    for note in validate_workflow(cfg):
        echo(note)
    reports: list[RunReport] = []
    if "synth" in cfg.stages:
        ids = synthesise(cfg.raw, cfg.synth.scenes, seed=cfg.synth.seed, start=cfg.synth.start, cfg=cfg.synth.room)
        echo(f"synth: {len(ids)} rooms in {cfg.raw}")
    for name in cfg.stages:
        if name == "synth":
            continue
        if name == "teacher":
            _run_teacher(cfg, echo, force)
            continue
        run = StageRun(store=str(cfg.store), cfg=cfg.stage_config(name), raw=str(cfg.raw), force=force,
                       scenes=cfg.scenes or None, shard=cfg.shard or None)
        report = run_stage(BY_NAME[name], run, executor=cfg.executor, echo=echo)
        echo(report.summary())
        reports.append(report)
        if report.results and not report.of("done") and not report.of("skipped"):
            echo(f"{name}: every scene failed; stopping")
            break
    return reports


def _run_teacher(cfg: WorkflowConfig, echo: Callable[[str], None], force: bool) -> None:
    """Build the teacher's corpus when asked (`corpus_rooms`) and fit the teacher on it (kept
    when its folder exists, unless `force`)."""
    step = cfg.teacher
    corpus = step.corpus
    if step.corpus_rooms:
        corpus = build_corpus(corpus, CorpusConfig(rooms=step.corpus_rooms, seed=cfg.synth.seed),
                              executor=cfg.executor, echo=echo)["store"]
    out = step.out
    if (Path(out) / "config.json").exists() and not force:
        echo(f"teacher: {out} exists, kept (use --force to refit)")
        return
    result = run_fit(str(corpus), None, out, step.fit_config())
    echo(f"teacher: fitted into {out}: " + ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
        for k, v in result.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)))


def describe(cfg: WorkflowConfig) -> dict[str, Any]:
    """The resolved workflow as plain data."""
    return to_dict(cfg)
