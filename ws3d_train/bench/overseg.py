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
  (`scan_stats.mesh_statistics`): how scan-like the generated rooms are;
- `mesh_paths`: on the same mesh (the bench room, and the real sample when present), the
  mesh-edge path (neighbours from the triangles' edges) against the kNN path (`mesh_edges=False`,
  a k-nearest-neighbour search as for clouds): wall and CPU seconds, counts and purity; and, when
  the user names a build of ScanNet's Segmentator (`segmentator=` or the environment variable
  `WS3D_SEGMENTATOR=/path/to/segmentator`; ws3d never builds or fetches it), that binary on the
  same mesh written as a PLY: its whole-process seconds (reading the PLY and writing the JSON
  included), its compute seconds where the binary prints `compute_s` on stderr, its count and
  purity;
- `lidar_sweep`: a ray-cast street sweep (`scan_stats.synthetic_lidar_sweep`) and the real
  SemanticKITTI sample when present, at all / half / quarter of their points, with the
  range-adaptive cells (`range_scale`) and without: counts, purity, seconds.

`python -m ws3d_train.bench.overseg [N]` prints the result.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numba
import numpy as np

from pipeline.overseg.config import OversegConfig
from pipeline.overseg.core import overseg_points
from pipeline.overseg.regions import purity
from pipeline.overseg.scan_stats import (
    felzenszwalb_mesh_segments,
    mesh_statistics,
    sample_mesh_surface,
    synthetic_lidar_sweep,
)
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


def bench_overseg(n_points: int = 80_000, *, repeats: int = 3, cfg: OversegConfig = OversegConfig(),
                  segmentator: str | None = None) -> dict[str, Any]:
    """Time the stage and Open3D FPFH on the same ~`n_points` room; measure purity and count.

    Timings are the best of `repeats` runs of each (the machine may be shared). numba kernels
    are compiled (or loaded from the cache) by a small warm-up run first, which is not timed.

    Returns:
        A dict: points, stage_s, fpfh_s, stage_over_fpfh (< 1: the stage is faster), speedup,
        steps_s (per step, best run), purity, segments, reference_segments, segment_ratio
        (segments / reference), points_per_segment, threads, mesh_paths, lidar_sweep.

    `segmentator`: path of a ScanNet Segmentator binary (default: `WS3D_SEGMENTATOR`, else none).
    """
    segmentator = segmentator or os.environ.get("WS3D_SEGMENTATOR") or None
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
    out["mesh_paths"] = {"synthetic": mesh_paths(room.xyz, room.rgb, room.faces, room.instance, cfg=cfg,
                                                 repeats=repeats, segmentator=segmentator, truth="instances")}
    out["lidar_sweep"] = lidar_sweep(tiny=tiny, cfg=cfg)
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
        out["mesh_paths"]["real"] = mesh_paths(scene.xyz, scene.rgb, scene.faces, sem, cfg=cfg, repeats=repeats,
                                               segmentator=segmentator, truth="semantics")
        out["synth_vs_real_mesh"] = {"synthetic": mesh_statistics(room.xyz, room.faces),
                                     "real": mesh_statistics(scene.xyz, scene.faces)}
        syn, rl = out["synth_vs_real_mesh"]["synthetic"], out["synth_vs_real_mesh"]["real"]
        out["synth_vs_real_mesh"]["ratios_synthetic_over_real"] = {
            k: round(syn[k] / rl[k], 3) for k in ("edge_m_p50", "edge_cv", "dihedral_deg_p50", "dihedral_deg_p90",
                                                   "curvature_p50", "curvature_p90") if rl[k]}
    else:
        out["real_scan"] = {"skipped": f"{real} absent" if not tiny else "tiny"}
    return out


def _best_of(fn, repeats: int) -> tuple[Any, float, float]:
    """(result, best wall seconds, CPU seconds of that run) of `repeats` calls."""
    best, cpu, result = np.inf, np.inf, None
    for _ in range(max(1, repeats)):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        out = fn()
        wall = time.perf_counter() - wall0
        if wall < best:
            best, cpu, result = wall, time.process_time() - cpu0, out
    return result, float(best), float(cpu)


def run_segmentator(binary: str, xyz: np.ndarray, faces: np.ndarray, *, k_thresh: float = 0.01,
                    min_verts: int = 20, repeats: int = 3) -> dict[str, Any]:
    """Run a user's build of ScanNet's Segmentator on a mesh (written as a binary PLY to a
    temporary folder): its segments per vertex and the best of `repeats` whole-process seconds
    (and compute seconds, where the binary prints `compute_s <seconds>` on stderr)."""
    from plyfile import PlyData, PlyElement

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mesh.ply"
        vertex = np.empty(len(xyz), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
        vertex["x"], vertex["y"], vertex["z"] = (np.asarray(xyz, np.float32)[:, d] for d in range(3))
        face = np.empty(len(faces), dtype=[("vertex_indices", "i4", (3,))])
        face["vertex_indices"] = np.asarray(faces, np.int32)
        PlyData([PlyElement.describe(vertex, "vertex"), PlyElement.describe(face, "face")]).write(str(path))
        process_s, compute_s = np.inf, np.inf
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            done = subprocess.run([binary, str(path), str(k_thresh), str(min_verts)], capture_output=True,
                                  text=True, check=True, timeout=600)
            process_s = min(process_s, time.perf_counter() - start)
            if "compute_s" in done.stderr:
                compute_s = min(compute_s, float(done.stderr.split("compute_s")[1].split()[0]))
        found = sorted(Path(tmp).glob("*.segs.json"))
        if not found:
            raise RuntimeError(f"{binary} wrote no .segs.json next to {path}")
        seg = np.asarray(json.loads(found[0].read_text())["segIndices"])
    out = {"segment": np.unique(seg, return_inverse=True)[1], "process_s": round(float(process_s), 4)}
    if np.isfinite(compute_s):
        out["compute_s"] = round(float(compute_s), 4)
    return out


def mesh_paths(xyz: np.ndarray, rgb: np.ndarray, faces: np.ndarray, truth_labels: np.ndarray, *,
               cfg: OversegConfig, repeats: int, segmentator: str | None, truth: str) -> dict[str, Any]:
    """The mesh-edge path against the kNN path on one mesh (and a Segmentator binary if given)."""
    import dataclasses

    rows: dict[str, Any] = {"points": int(len(xyz)), "faces": int(len(faces))}
    for name, path_cfg in (("mesh_edges", dataclasses.replace(cfg, mesh_edges=True)),
                           ("knn", dataclasses.replace(cfg, mesh_edges=False))):
        result, wall, cpu = _best_of(lambda: overseg_points(xyz, rgb, faces=faces, cfg=path_cfg), repeats)
        rows[name] = {"seconds": round(wall, 4), "cpu_s": round(cpu, 4), "segments": result.n_segments,
                      f"purity_vs_{truth}": round(purity(result.segment, truth_labels), 5),
                      "steps_s": {k: round(v, 4) for k, v in result.timings.items()}}
    rows["knn_over_mesh_edges"] = round(rows["knn"]["seconds"] / rows["mesh_edges"]["seconds"], 3)
    if segmentator:
        try:
            ext = run_segmentator(segmentator, xyz, faces, repeats=repeats)
        except (OSError, subprocess.SubprocessError, RuntimeError, ValueError, KeyError) as exc:
            rows["segmentator"] = {"error": f"{segmentator}: {type(exc).__name__}: {exc}"}
        else:
            seg = ext.pop("segment")
            ext.update(segments=int(seg.max()) + 1, **{f"purity_vs_{truth}": round(purity(seg, truth_labels), 5)})
            rows["segmentator"] = ext
            ref = ext.get("compute_s", ext["process_s"])
            rows["mesh_edges_over_segmentator"] = round(rows["mesh_edges"]["seconds"] / ref, 3)
            rows["mesh_edges_cpu_over_segmentator"] = round(rows["mesh_edges"]["cpu_s"] / ref, 3)
            rows["segments_over_segmentator"] = round(rows["mesh_edges"]["segments"] / max(1, ext["segments"]), 3)
            rows["segmentator_reference"] = "compute_s" if "compute_s" in ext else "process_s"
    return rows


def lidar_sweep(*, tiny: bool, cfg: OversegConfig) -> dict[str, Any]:
    """All / half / quarter of a LiDAR sweep's points (random subsets), with the range-adaptive
    cells (`cfg.range_scale`) and without: counts, purity against instances, seconds."""
    import dataclasses

    scans: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    xyz, rgb, inst = synthetic_lidar_sweep(0, columns=512 if tiny else 2048)
    scans["synthetic_street"] = (xyz, rgb, inst)
    kitti = SHARED_DATA / "semantickitti" / "sequences" / "08"
    if not tiny and (kitti / "velodyne" / "000000.bin").is_file():
        pts = np.fromfile(kitti / "velodyne" / "000000.bin", np.float32).reshape(-1, 4)
        lab = np.fromfile(kitti / "labels" / "000000.label", np.uint32)
        sem, ins = (lab & 0xFFFF).astype(np.int64), (lab >> 16).astype(np.int64)
        scans["semantickitti_08_000000"] = (pts[:, :3], np.repeat(np.clip(pts[:, 3:4] * 255, 0, 255).astype(np.uint8), 3, 1),
                                           np.where(sem == 0, -1, sem * 100000 + ins))
    out: dict[str, Any] = {}
    for name, (xyz, rgb, truth_labels) in scans.items():
        rows: dict[str, Any] = {"points": int(len(xyz))}
        for label, run_cfg in (("range_adaptive", cfg), ("fixed_voxels", dataclasses.replace(cfg, range_scale=0.0))):
            counts, row = [], {}
            for frac in (1, 2, 4):
                keep = np.sort(np.random.default_rng(frac).permutation(len(xyz))[: len(xyz) // frac])
                start = time.perf_counter()
                result = overseg_points(xyz[keep], rgb[keep], viewpoint=np.zeros(3), cfg=run_cfg)
                row[f"1/{frac}"] = {"points": int(len(keep)), "segments": result.n_segments,
                                    "purity_vs_instances": round(purity(result.segment, truth_labels[keep]), 5),
                                    "seconds": round(time.perf_counter() - start, 3)}
                counts.append(result.n_segments)
            row["count_max_over_min"] = round(max(counts) / max(1, min(counts)), 3)
            rows[label] = row
        out[name] = rows
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
    for room, row in result["mesh_paths"].items():
        line = (f"overseg {room} mesh: mesh edges {row['mesh_edges']['seconds']:.4f} s vs kNN {row['knn']['seconds']:.4f} s "
                f"(kNN/edges {row['knn_over_mesh_edges']:.2f})")
        if "mesh_edges_over_segmentator" in row:
            line += (f"; Segmentator {row['segmentator'].get('compute_s', row['segmentator']['process_s']):.4f} s "
                     f"(ratio {row['mesh_edges_over_segmentator']:.2f}), segments {row['mesh_edges']['segments']} vs "
                     f"{row['segmentator']['segments']}")
        print(line)
    for scan, rows in result["lidar_sweep"].items():
        print(f"overseg LiDAR {scan}: all/half/quarter count max/min {rows['range_adaptive']['count_max_over_min']:.2f} "
              f"(fixed voxels {rows['fixed_voxels']['count_max_over_min']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
