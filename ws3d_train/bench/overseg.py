"""Benchmark of the over-segmentation stage against Open3D's FPFH, on a ScanNet-sized synthetic room.

Reads and writes nothing: builds a room with `pipeline.datasets.synthetic.make_room` (a vertex-coloured mesh
with 2-3 cm edges, ground-truth instances and the ScanNet-style shipped segments), then measures
in this process:
- the whole stage (`overseg_points`: neighbours, normals, PFH, growing, merging, boundaries);
- Open3D's `compute_fpfh_feature` alone on the same points (`KDTreeSearchParamHybrid(radius=0.05,
  max_nn=100)`; normals estimated beforehand and not timed);
- point-weighted purity against the ground-truth instances, and the segment count against the
  shipped over-segmentation (the `segs.json` of the ScanNet layout) and against a graph-based
  segmentation in the manner of ScanNet's Segmentator (`scan_stats.felzenszwalb_mesh_segments`);
- a density sweep: the same surface as the mesh (1x) and as clouds sampled 4x and 12x as densely
  (`scan_stats.sample_mesh_surface`): segment counts, purity and seconds at each density;
- the same on the real ScanNet sample (`../shared/data/scannet/scans/scene0470_00`) when present:
  it has semantics only (the labels PLY), so purity there is against the semantic labels;
- edge-length, normal-noise and curvature statistics of the synthetic room against the real scan
  (`scan_stats.mesh_statistics`): how scan-like the generated rooms are.

`python -m ws3d_train.bench.overseg [N]` prints the result.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any

import numba
import numpy as np

from pipeline.overseg.config import OversegConfig
from pipeline.overseg.core import overseg_points
from pipeline.overseg.regions import purity
from pipeline.overseg.scan_stats import felzenszwalb_mesh_segments, mesh_statistics, sample_mesh_surface
from pipeline.datasets.synthetic import SynthConfig, SynthRoom, make_room
from ws3d_train.bench import SHARED_DATA

SCANNET_RAW = SHARED_DATA / "scannet"
SCANNET_SCENE = "scene0470_00"

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
    out = {
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
    fh = int(felzenszwalb_mesh_segments(room.xyz, room.faces).max()) + 1
    out.update(segmentator_segments=fh, segment_ratio_vs_segmentator=round(segments / max(1, fh), 3))
    tiny = n_points < 20_000
    sweep = (1, 4) if tiny else (1, 4, 12)
    out["density_sweep"] = density_sweep(room.xyz, room.rgb, room.faces, room.instance, sweep, cfg=cfg,
                                         truth="instances")
    real = SCANNET_RAW / "scans" / SCANNET_SCENE
    if real.is_dir() and not tiny:
        from pipeline.datasets import scannet

        scene = scannet.read_scene(SCANNET_RAW, SCANNET_SCENE)
        sem = np.where(scene.semantic >= 0, scene.semantic, -1)
        result = overseg_points(scene.xyz, scene.rgb, faces=scene.faces, cfg=cfg)
        fh = int(felzenszwalb_mesh_segments(scene.xyz, scene.faces).max()) + 1
        out["real_scan"] = {
            "scene": SCANNET_SCENE, "points": int(len(scene.xyz)), "segments": result.n_segments,
            "purity_vs_semantics": round(purity(result.segment, sem), 5),
            "segmentator_segments": fh, "segment_ratio_vs_segmentator": round(result.n_segments / max(1, fh), 3),
            "density_sweep": density_sweep(scene.xyz, scene.rgb, scene.faces, sem, sweep, cfg=cfg, truth="semantics"),
        }
        out["synth_vs_real_mesh"] = {"synthetic": mesh_statistics(room.xyz, room.faces),
                                     "real": mesh_statistics(scene.xyz, scene.faces)}
        syn, rl = out["synth_vs_real_mesh"]["synthetic"], out["synth_vs_real_mesh"]["real"]
        out["synth_vs_real_mesh"]["ratios_synthetic_over_real"] = {
            k: round(syn[k] / rl[k], 3) for k in ("edge_m_p50", "edge_cv", "dihedral_deg_p50", "dihedral_deg_p90",
                                                   "curvature_p50", "curvature_p90") if rl[k]}
    else:
        out["real_scan"] = {"skipped": f"{real} absent" if not tiny else "tiny"}
    return out


def density_sweep(xyz: np.ndarray, rgb: np.ndarray, faces: np.ndarray, truth_labels: np.ndarray,
                  multiples: tuple[int, ...], *, cfg: OversegConfig, truth: str) -> dict[str, Any]:
    """Over-segment the mesh (1x) and clouds sampled `m` times as densely from its surface.

    Returns per density: points, segments, purity (against `truth_labels`, per vertex: instances
    or semantics, said in `truth`), seconds and, for clouds up to 300k points, the time of Open3D's
    FPFH alone on the same cloud; plus the ratio of the largest to the smallest count.
    """
    rows: dict[str, Any] = {}
    counts = []
    for m in multiples:
        if m == 1:
            pts, col, lab, f = xyz, rgb, truth_labels, faces
        else:
            pts, col, (lab,) = sample_mesh_surface(xyz, rgb, faces, m * len(xyz), labels=(truth_labels,), seed=m)
            f = None
        start = time.perf_counter()
        result = overseg_points(pts, col, faces=f, cfg=cfg)
        seconds = time.perf_counter() - start
        row = {"points": int(len(pts)), "segments": result.n_segments,
               f"purity_vs_{truth}": round(purity(result.segment, lab), 5), "seconds": round(seconds, 3)}
        if m > 1 and len(pts) <= 300_000:  # FPFH on denser clouds takes minutes (r = 5 cm, 100 nn)
            fpfh = _time_fpfh(pts, 1)
            row.update(fpfh_s=round(fpfh, 3), stage_over_fpfh=round(seconds / fpfh, 3))
        rows[f"x{m}"] = row
        counts.append(result.n_segments)
    rows["count_max_over_min"] = round(max(counts) / max(1, min(counts)), 3)
    return rows


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
