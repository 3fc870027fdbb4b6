"""Benchmark of the over-segmentation stage against Open3D's FPFH, on a ScanNet-sized synthetic room.

Reads and writes nothing: builds a room with `pipeline.synth.make_room` (a vertex-coloured mesh
with 2-3 cm edges, ground-truth instances and the ScanNet-style shipped segments), then measures
in this process:
- the whole stage (`overseg_points`: neighbours, normals, PFH, growing, merging, boundaries);
- Open3D's `compute_fpfh_feature` alone on the same points (`KDTreeSearchParamHybrid(radius=0.05,
  max_nn=100)`; normals estimated beforehand and not timed);
- point-weighted purity against the ground-truth instances, and the segment count against the
  shipped over-segmentation (the `segs.json` of the ScanNet layout).

`python -m pipeline.bench_overseg [N]` prints the result.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any

import numba
import numpy as np

from pipeline.overseg import OversegConfig, overseg_points, purity
from pipeline.synth import SynthConfig, SynthRoom, make_room

_TYPICAL_POINTS = 65_000
"""Rough vertex count of a room of `bench_room`'s size at the synthetic default edge lengths."""


def bench_room(n_points: int = 80_000, *, seed: int = 0, tries: int = 12) -> SynthRoom:
    """A synthetic room with about `n_points` vertices (deterministic for given arguments).

    Edge lengths are scaled from the generator's defaults (3 cm walls, 2.5 cm objects, i.e. a
    ScanNet-like 2-3 cm at 80k points) by sqrt(typical / n_points); of the first `tries` rooms of
    `seed`, the one whose vertex count is closest to `n_points` is returned.
    """
    base = SynthConfig()
    scale = float(np.sqrt(_TYPICAL_POINTS / max(1, n_points)))
    cfg = SynthConfig(
        room_edge_m=base.room_edge_m * scale, object_edge_m=base.object_edge_m * scale,
        room_size_m=(3.0, 3.8),
    )
    best: SynthRoom | None = None
    for index in range(tries):
        room = make_room(seed, index, cfg)
        if best is None or abs(len(room.xyz) - n_points) < abs(len(best.xyz) - n_points):
            best = room
        if abs(len(best.xyz) - n_points) <= 0.05 * n_points:
            break
    assert best is not None
    return best


def _time_fpfh(xyz: np.ndarray, repeats: int) -> float:
    import open3d as o3d

    pcd = o3d.geometry.PointCloud()
    pcd.points = o3d.utility.Vector3dVector(np.asarray(xyz, np.float64))
    pcd.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(knn=16))  # not timed: FPFH needs normals
    param = o3d.geometry.KDTreeSearchParamHybrid(radius=0.05, max_nn=100)
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        o3d.pipelines.registration.compute_fpfh_feature(pcd, param)
        best = min(best, time.perf_counter() - start)
    return float(best)


def bench_overseg(n_points: int = 80_000, *, repeats: int = 3, cfg: OversegConfig = OversegConfig()) -> dict[str, Any]:
    """Time the stage and Open3D FPFH on the same ~`n_points` room; measure purity and count.

    Timings are the best of `repeats` runs of each (the machine may be shared). numba kernels
    are compiled (or loaded from the cache) by a small warm-up run first, which is not timed.

    Returns:
        A dict: points, stage_s, fpfh_s, stage_over_fpfh (< 1: the stage is faster), speedup,
        steps_s (per step, best run), purity, segments, reference_segments, segment_ratio
        (segments / reference), points_per_segment, threads.
    """
    room = bench_room(n_points)
    warm = make_room(1, 0, SynthConfig(room_size_m=(2.0, 2.0), min_objects=5, max_objects=5,
                                       room_edge_m=0.1, object_edge_m=0.08))
    overseg_points(warm.xyz, warm.rgb, faces=warm.faces, semantic=warm.semantic, cfg=cfg)
    overseg_points(warm.xyz, warm.rgb, semantic=warm.semantic, cfg=cfg)  # the PCA path too

    stage_best, steps, result = np.inf, {}, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = overseg_points(room.xyz, room.rgb, faces=room.faces, semantic=room.semantic, cfg=cfg)
        seconds = time.perf_counter() - start
        if seconds < stage_best:
            stage_best, steps = seconds, dict(result.timings)
    assert result is not None
    fpfh = _time_fpfh(room.xyz, repeats)
    reference = int(len(np.unique(room.seg)))
    segments = result.n_segments
    return {
        "points": int(len(room.xyz)),
        "stage_s": round(float(stage_best), 4),
        "fpfh_s": round(fpfh, 4),
        "stage_over_fpfh": round(float(stage_best / fpfh), 4),
        "speedup": round(float(fpfh / stage_best), 3),
        "steps_s": {k: round(v, 4) for k, v in steps.items()},
        "purity": round(purity(result.segment, room.instance), 5),
        "segments": segments,
        "reference_segments": reference,
        "segment_ratio": round(segments / max(1, reference), 3),
        "points_per_segment": round(len(room.xyz) / max(1, segments), 1),
        "threads": int(numba.get_num_threads()),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    n = int(argv[0]) if argv else 80_000
    result = bench_overseg(n)
    print(json.dumps(result, indent=2))
    print(f"overseg: {result['points']} points in {result['stage_s']:.3f} s vs Open3D FPFH alone "
          f"{result['fpfh_s']:.3f} s (ratio {result['stage_over_fpfh']:.3f}, {result['speedup']:.1f}x faster); "
          f"purity {result['purity']:.4f}; {result['segments']} segments vs {result['reference_segments']} "
          f"shipped ({result['segment_ratio']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
