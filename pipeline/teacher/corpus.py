"""The teacher's own corpus: rooms that the 3D network never sees, rendered into a separate store.

Real CLIP learnt from web images, never from the benchmark's scans. The offline teacher stands in
for it the same way: it is fitted on a **corpus store** of its own, here rooms synthesised from a
separate seed namespace (`corpus_seed`) with scene ids in a separate range (from `CORPUS_START`),
ingested, over-segmented and rendered exactly like the 3D store but into another folder. Its
labels (every class, novel ones included) become captions; the 3D store's labels never do.

Reads:  nothing (it synthesises its rooms).
Writes: <out>/raw/ (ScanNet layout) and <out>/store.zarr (ingest, overseg, render), with the
        record `teacher_corpus` (seed namespace, rooms, scene ids) in the store's attrs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.config import from_dict, to_dict
from pipeline.datasets.ingest import INGEST, IngestConfig
from pipeline.datasets.synthetic import SynthConfig, synthesise
from pipeline.executor import ExecutorConfig
from pipeline.overseg.config import OversegConfig
from pipeline.overseg.stage import OVERSEG
from pipeline.render.config import RenderConfig
from pipeline.render.stage import RENDER
from pipeline.stage import StageRun, run_stage
from pipeline.store import Store

CORPUS_SEED_OFFSET = 1_000_000
"""Corpus rooms are drawn with seed `CORPUS_SEED_OFFSET + seed`: a namespace no 3D room set uses."""
CORPUS_START = 5000
"""First room index of the corpus: its scene ids (scene5000_00, ...) never equal a 3D room's."""


def corpus_seed(seed: int) -> int:
    """The synthesis seed of the corpus that goes with 3D rooms of `seed`."""
    return CORPUS_SEED_OFFSET + int(seed)


@dataclass(frozen=True)
class CorpusConfig:
    """A synthetic teacher corpus."""

    rooms: int = 32
    """Rooms in the corpus (a fraction is held out to measure the teacher)."""
    seed: int = 0
    """Seed of the 3D rooms this corpus goes with; the corpus uses `corpus_seed(seed)`."""
    start: int = CORPUS_START
    """First room index (scene ids scene<start>_00 ...)."""
    room: SynthConfig = SynthConfig()
    """How rooms are generated (the same generator as the 3D rooms: same classes and looks)."""


def build_corpus(out: str | Path, cfg: CorpusConfig = CorpusConfig(), *, executor: ExecutorConfig = ExecutorConfig(kind="local"),
                 render: dict[str, Any] | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Synthesise, ingest, over-segment and render the corpus rooms into `out/store.zarr`.

    Resumable like every stage (complete scenes are skipped).

    Returns:
        {"store", "raw", "scenes", "seconds": per stage}.
    Raises:
        RuntimeError when a stage fails on some scene.
    """
    out = Path(out)
    raw, store = out / "raw", out / "store.zarr"
    ids = synthesise(raw, cfg.rooms, seed=corpus_seed(cfg.seed), start=cfg.start, cfg=cfg.room)
    echo(f"synth: {len(ids)} rooms in {raw}")
    steps = ((INGEST, IngestConfig(dataset="synthetic"), str(raw)), (OVERSEG, OversegConfig(), None),
             (RENDER, from_dict(RenderConfig, dict(render or {}), where="corpus.render"), None))
    seconds: dict[str, float] = {}
    for stage, stage_cfg, raw_dir in steps:
        report = run_stage(stage, StageRun(str(store), stage_cfg, raw=raw_dir), executor=executor)
        echo(report.summary())
        seconds[report.stage] = report.seconds
        if not report.ok:
            raise RuntimeError(f"teacher corpus preprocessing failed:\n{report.summary()}")
    opened = Store.open(store)
    ids = opened.scene_ids()
    opened.set_attrs(teacher_corpus={"kind": "synthetic", "seed": corpus_seed(cfg.seed), "start": cfg.start,
                                     "rooms": cfg.rooms, "config": to_dict(dataclasses.replace(cfg))})
    return {"store": str(store), "raw": str(raw), "scenes": ids, "seconds": seconds}
