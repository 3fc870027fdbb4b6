"""A stage is a declaration; one resumable runner runs any of them over a store's scenes.

A :class:`Stage` names what a per-scene stage is: its name (also its record's name in the store),
its config class, the store groups it reads and writes, the stages whose outputs it builds on
(their config hashes chain into its own), the function that reads a scene's inputs and calls the
stage's pure core (``compute``), and the hooks a few stages need (ingest lists its scenes in a raw
folder and creates the store; embed checks its model first, writes the vocabulary last and has a
cross-scene GPU path). ``pipeline.stages.STAGES`` lists them; the CLI's stage commands and the
workflow runner are both built from that list, and both call :func:`run_stage`.

:func:`run_scene` is the one per-scene runner: the config hash (the stage's config, the hashes of
its upstream outputs and anything else that changes its result), skip when the scene is complete
with that hash (and whole: see :meth:`pipeline.store.Store.stage_state`), compute, and one commit
of the stage's group with its record (``--force`` replaces an output of the same config too). A scene that
fails raises; the executor (:mod:`pipeline.executor`) turns that into a failed row and goes on.

Reads and writes the store through :class:`pipeline.store.Store` only.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.config import ConfigError, config_hash, to_dict
from pipeline.errors import SceneError, UserError, is_suspect, warning_kind
from pipeline.executor import ExecutorConfig, RunReport, SceneResult, read_scene_list, run_scenes, select_shard
from pipeline.schema import ArraySpec
from pipeline.storage import is_url
from pipeline.store import Store, append_log, log_dir

__all__ = ["Stage", "StageOption", "StageOutput", "StageRun", "format_warnings", "run_scene", "run_stage", "scene_ids_of",
           "write_output"]


@dataclass
class StageOutput:
    """What a stage computed for one scene: the arrays of its groups and its record's stats."""

    arrays: dict[ArraySpec, np.ndarray]
    """Every array the stage writes (the schema's required ones at least)."""
    stats: dict[str, Any]
    """JSON-safe statistics, kept in the stage record and returned in the scene's result."""
    record: dict[str, Any] = field(default_factory=dict)
    """Extra keys of the stage record (beside config, config_hash and stats)."""
    result_stats: dict[str, Any] | None = None
    """What the run report keeps of the scene (default: ``stats``)."""


@dataclass(frozen=True)
class StageRun:
    """One run of a stage: where, with which config, over what."""

    store: str
    """Path of the store."""
    cfg: Any
    """The stage's resolved config."""
    raw: str | None = None
    """The raw dataset folder (stages that read raw files: ingest)."""
    force: bool = False
    """Recompute scenes that are complete with the same config."""
    scenes: str | tuple[str, ...] | None = None
    """The scenes: a file of ids, or the ids; None: every scene the stage can run on."""
    shard: str | None = None
    """Shard ``i/n`` of those scenes (an array job's slice)."""


@dataclass(frozen=True)
class StageOption:
    """A command-line option of one stage's command beyond the common ones (``--store``,
    ``--scenes``, ``--shard``, ``--executor``, ``--config``, ``--force``, overrides)."""

    name: str
    """Python name; a config field unless `raw` (then the run's raw folder)."""
    flags: tuple[str, ...]
    """e.g. ("--dataset", "-d")."""
    help: str
    raw: bool = False
    """The option is the raw folder of the run, not a config field."""
    required: bool = False
    """The command needs it."""


@dataclass(frozen=True)
class Stage:
    """A per-scene stage, declared once (see the module docstring)."""

    name: str
    """Stage name: the CLI command, the workflow's section and the store record."""
    config: type
    """Its frozen config dataclass."""
    help: str
    """One line for `ws3d --help`."""
    reads: tuple[str, ...]
    """Store groups it reads (documentation and checks)."""
    writes: tuple[str, ...]
    """Store groups it writes (those of `schema.STAGE_GROUPS[name]`)."""
    compute: Callable[[Store, str, Any, StageRun], StageOutput]
    """Reads one scene's inputs from the store and calls the stage's pure core."""
    upstream: tuple[str, ...] = ()
    """Stages whose outputs it consumes: their config hashes chain into its own, and a scene
    without them fails with a message naming the stage to run first."""
    hashed: Callable[[Any], Any] | None = None
    """The part of the config that changes its result (default: all of it)."""
    hash_inputs: Callable[[StageRun], tuple[str, ...]] | None = None
    """More inputs of the hash beyond the upstream hashes (ingest: the raw folder; embed: the
    model's identity)."""
    list_scenes: Callable[[StageRun], list[str]] | None = None
    """The scenes it can run on (default: the store's ingested scenes)."""
    prepare: Callable[[StageRun], None] | None = None
    """Run once before any scene (create the store, check a model)."""
    finish: Callable[[StageRun, RunReport], str | None] | None = None
    """Run once after the scenes (write a vocabulary); returns a line to print, or None."""
    run_batched: Callable[[StageRun, list[str], ExecutorConfig], RunReport | None] | None = None
    """A faster path over many scenes in one process (embed on a GPU); returns None when it does
    not apply, and the per-scene path runs instead."""
    options: tuple[StageOption, ...] = ()
    """Its command's extra options."""
    summarise: Callable[[Store], dict[str, Any]] | None = None
    """Figures over a store's scenes for `ws3d info --json` (segments, coverage, models ...)."""

    def run_scene(self, store: str, scene_id: str, cfg: Any, *, raw: str | None = None, force: bool = False) -> SceneResult:
        """This stage on one scene of a store (see :func:`run_scene`); e.g.
        ``OVERSEG.run_scene("rooms.zarr", "scene0000_00", OversegConfig())``."""
        return run_scene(self, StageRun(store=str(store), cfg=cfg, raw=None if raw is None else str(raw), force=force),
                         scene_id)

    def scene_hash(self, store: Store, scene_id: str, run: StageRun) -> str:
        """The config hash of this stage's output for one scene (raises SceneError when an
        upstream stage has no output for it)."""
        upstream = []
        records = store.stage_records(scene_id, self.upstream)  # fetched together (object storage)
        for stage in self.upstream:
            record = records[stage]
            if record is None:
                what = "not ingested" if stage == "ingest" else f"no {stage} output"
                raise SceneError(scene_id, None, f"{what} in {store.path}; run `ws3d {stage}` first")
            upstream.append(str(record.get("config_hash", "")))
        hashed = run.cfg if self.hashed is None else self.hashed(run.cfg)
        extra = () if self.hash_inputs is None else self.hash_inputs(run)
        return config_hash(hashed, *upstream, *extra)


def run_scene(stage: Stage, run: StageRun, scene_id: str) -> SceneResult:
    """Run one stage on one scene of the store: skipped when its output is complete with the
    same config hash (its marker there and every key of its manifest present with its size),
    else computed and written as one commit with its record. With ``run.force`` the new output
    replaces the old one even when the config is the same (a repair)."""
    store = Store.open(run.store)
    h = stage.scene_hash(store, scene_id, run)
    if not run.force and store.stage_state(scene_id, stage.name, h) == "complete":
        return SceneResult(scene_id, "skipped")
    start = time.perf_counter()
    output = stage.compute(store, scene_id, run.cfg, run)
    if run.raw is not None and any(o.raw for o in stage.options):  # what a repair recomputes from
        output.record.setdefault("raw", str(Path(run.raw).resolve()))
    return write_output(store, stage, scene_id, run.cfg, h, output, seconds=time.perf_counter() - start,
                        replace=run.force)


def write_output(store: Store, stage: Stage, scene_id: str, cfg: Any, config_hash_: str, output: StageOutput, *,
                 seconds: float = 0.0, replace: bool = False) -> SceneResult:
    """Write one scene's stage output as one commit with its record (config, config hash, stats);
    the scene's result, with the seconds it took including the write. `replace`: replace an
    output with the same config hash too (``--force``); else such an output, written meanwhile
    by another run, is kept."""
    t_write = time.perf_counter()
    store.write_stage(scene_id, stage.name, output.arrays,
                      {"config": to_dict(cfg), "config_hash": config_hash_, "stats": output.stats, **output.record},
                      replace=replace)
    stats = dict(output.stats if output.result_stats is None else output.result_stats)
    stats["seconds_write"] = round(time.perf_counter() - t_write, 4)
    return SceneResult(scene_id, "done", seconds=seconds + time.perf_counter() - t_write, stats=stats)


def scene_ids_of(stage: Stage, run: StageRun) -> list[str]:
    """The scenes a run covers: its list (or file of ids), else every scene the stage can run on;
    then its shard ``i/n`` of them.

    Raises:
        ConfigError for an unreadable list, a malformed scene id or shard.
    """
    try:
        if run.scenes is None:
            ids = stage.list_scenes(run) if stage.list_scenes is not None else Store.open(run.store).scene_ids()
        elif isinstance(run.scenes, (str, Path)):
            ids = read_scene_list(run.scenes)
        else:
            ids = list(run.scenes)
        return select_shard(ids, run.shard)
    except (OSError, ValueError) as exc:
        if isinstance(exc, UserError):
            raise
        raise ConfigError(str(exc)) from None


def run_stage(stage: Stage, run: StageRun, *, executor: ExecutorConfig = ExecutorConfig(),
              echo: Callable[[str], None] | None = None, log: bool = True) -> RunReport:
    """Run a stage over a store: prepare, every scene (skipping complete ones) through the
    executor or the stage's batched path, finish; the report's lines are appended to
    ``<store>.logs/<stage>.jsonl``.

    Raises:
        UserError (and its kinds) for what stops the whole run before any scene: a missing store,
        model or raw folder, a bad scene list or shard.
    """
    if stage.prepare is not None:
        stage.prepare(run)
    _clean_leftovers(run.store, echo)
    ids = scene_ids_of(stage, run)
    report = stage.run_batched(run, ids, executor) if stage.run_batched is not None else None
    if report is None:
        report = run_scenes(stage.name, functools.partial(run_scene, stage, run), ids, executor)
    if log:
        _append_log(run.store, stage.name, report)
    warned = format_warnings(report)
    if warned and echo is not None:
        echo(warned)
    if stage.finish is not None:
        line = stage.finish(run, report)
        if line and echo is not None:
            echo(line)
    return report


def format_warnings(report: RunReport, *, limit: int = 40) -> str | None:
    """The warnings of a run's scenes (their result stats' ``warnings``) for the terminal: a line
    per scene and kind (count and first message), headed by the count of scenes per kind; suspect
    kinds (flagged by `ws3d validate`, :data:`pipeline.errors.SUSPECT_KINDS`) marked ``!``. None
    when no scene warned."""
    by_kind: dict[str, int] = {}
    lines: list[str] = []
    for result in report.results:
        grouped: dict[str, list[str]] = {}
        for text in (result.stats or {}).get("warnings") or ():
            kind, message = warning_kind(str(text))
            grouped.setdefault(kind, []).append(message)
        for kind, messages in grouped.items():
            by_kind[kind] = by_kind.get(kind, 0) + 1
            mark = "!" if is_suspect(f"[{kind}] ") else " "
            more = f" (+{len(messages) - 1} more)" if len(messages) > 1 else ""
            lines.append(f" {mark} {result.scene_id} [{kind}] x{len(messages)}: {messages[0]}{more}")
    if not lines:
        return None
    if len(lines) > limit:
        lines = lines[:limit] + [f"   ... {len(lines) - limit} more line(s): `ws3d info --store S --json`"]
    counts = ", ".join(f"{kind} {n}" for kind, n in sorted(by_kind.items(), key=lambda kv: (-kv[1], kv[0])))
    suspect = sum(n for kind, n in by_kind.items() if is_suspect(f"[{kind}] "))
    head = (f"{report.stage} warnings (scenes per kind): {counts}"
            + (f"; {suspect} suspect (!), flagged by `ws3d validate`" if suspect else ""))
    return "\n".join([head, *lines])


def _clean_leftovers(store_path: str, echo: Callable[[str], None] | None) -> None:
    """Remove what killed runs left in the store (their processes gone), saying so."""
    try:
        store = Store.open(store_path)
    except UserError:
        return  # no store yet (stages other than ingest report that themselves)
    removed = store.clean_leftovers()
    if removed and echo is not None:
        echo(f"removed {len(removed)} leftover(s) of killed runs from {store.url} ({', '.join(removed[:3])}"
             f"{' ...' if len(removed) > 3 else ''})")


def _append_log(store_path: str, stage: str, report: RunReport) -> None:
    """One JSON line per scene in ``<store>.logs/<stage>.jsonl`` (beside the store, also on
    object storage)."""
    import tempfile

    if not is_url(store_path):
        report.append_log(log_dir(str(store_path).removeprefix("file://")) / f"{stage}.jsonl")
        return
    with tempfile.TemporaryDirectory() as tmp:
        lines = report.append_log(Path(tmp) / "log.jsonl").read_text()
    append_log(store_path, f"{stage}.jsonl", lines)
