"""Small synthetic rooms for tests (coarse meshes so that tests stay fast)."""
from __future__ import annotations

from pathlib import Path

from pipeline.datasets.synthetic import SynthConfig, synthesise
from tests.paths import SHARED_DATA  # noqa: F401  (the tests' one spelling of it)

SMALL = SynthConfig(room_edge_m=0.08, object_edge_m=0.05, min_objects=6, max_objects=9)
"""A coarse room: ~10-20k vertices instead of ~150k."""


def small_raw(out: Path, n: int = 2, seed: int = 0, start: int = 0) -> Path:
    """Write `n` small rooms in the ScanNet layout under `out`; return `out`."""
    synthesise(out, n, seed=seed, start=start, cfg=SMALL)
    return out
