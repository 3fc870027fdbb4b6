"""Benchmark of the render stage (`make bench`): measured against a reference in the same process.

Reads: a generated room (`pipeline.synth`, or a box room built here when that is absent) and, if
present, the real SemanticKITTI scan under `../shared/data` (else a synthetic LiDAR-like cloud).
Writes: only a temporary store, deleted afterwards. Returns a dict of numbers (JSON-safe).

Measured:
- the whole stage through `run_scene` (read inputs, choose cameras, cast, colour, point indices,
  visibility lists, write to the store) in output rays (V x H x W pixels) per second, against the
  bare Open3D `cast_rays` rate for the same mesh and the same chosen cameras: "cold" builds a
  fresh `RaycastingScene` and casts all rays in one call (what any renderer of these cameras
  must do; the BVH is built on the first cast), "warm" casts again on the built scene;
- splatting in points per second (points x views) on the LiDAR scan;
- peak memory of the process (resource.getrusage).
"""
from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import cameras, render, schema
from pipeline.render import RenderConfig, build_raycaster, cast, render_scene, run_scene, splat_points
from pipeline.store import Store

KITTI_SCAN = Path(__file__).resolve().parents[1].parent / "shared/data/semantickitti/sequences/08/velodyne/000000.bin"


def _box_room(edge: float = 0.04, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 5 x 4 m room (floor, walls, a few boxes) of ~100k triangles with noisy vertex colours."""
    rng = np.random.default_rng(seed)
    xyz, rgb, faces, n = [], [], [], 0

    def quad(origin, u, v, colour):
        nonlocal n
        origin, u, v = (np.asarray(a, float) for a in (origin, u, v))
        nu, nv = (max(1, int(np.ceil(np.linalg.norm(a) / edge))) for a in (u, v))
        s, t = np.meshgrid(np.linspace(0, 1, nu + 1), np.linspace(0, 1, nv + 1), indexing="ij")
        xyz.append(origin + s.reshape(-1, 1) * u + t.reshape(-1, 1) * v)
        idx = np.arange((nu + 1) * (nv + 1)).reshape(nu + 1, nv + 1)
        a, b, c, d = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
        faces.append(np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)]) + n)
        rgb.append(np.clip(np.asarray(colour) + rng.normal(0, 8, (len(xyz[-1]), 3)), 0, 255).astype(np.uint8))
        n += len(xyz[-1])

    sx, sy, h = 5.0, 4.0, 2.4
    quad((0, 0, 0), (sx, 0, 0), (0, sy, 0), (150, 120, 90))
    for origin, u in (((0, 0, 0), (sx, 0, 0)), ((sx, 0, 0), (0, sy, 0)), ((sx, sy, 0), (-sx, 0, 0)), ((0, sy, 0), (0, -sy, 0))):
        quad(origin, u, (0, 0, h), (220, 220, 210))
    for lo, hi, colour in (((0.5, 0.5, 0), (1.5, 1.1, 0.8), (120, 70, 40)), ((3.0, 2.5, 0), (4.2, 3.5, 0.45), (60, 80, 150)),
                           ((4.4, 0.2, 0), (4.9, 0.8, 1.9), (200, 200, 200))):
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        d = hi - lo
        x, y, z = np.eye(3)
        for o, u, v in ((lo + z * d[2], x * d[0], y * d[1]), (lo, x * d[0], z * d[2]), (lo + y * d[1], x * d[0], z * d[2]),
                        (lo, y * d[1], z * d[2]), (lo + x * d[0], y * d[1], z * d[2])):
            quad(o, u, v, colour)
    return np.concatenate(xyz).astype(np.float32), np.concatenate(rgb), np.concatenate(faces).astype(np.int32)


def bench_mesh() -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """The benchmark mesh: the project's generated room 0 when `pipeline.synth` exists."""
    try:
        from pipeline import synth
    except ImportError:
        xyz, rgb, faces = _box_room()
        return xyz, rgb, faces, "box room (pipeline.synth absent)"
    room = synth.make_room(0, 0)
    return room.xyz, room.rgb, room.faces, "pipeline.synth.make_room(0, 0)"


def lidar_scan() -> tuple[np.ndarray, np.ndarray, str]:
    """The real SemanticKITTI scan (xyz, grey rgb) if present, else a synthetic scanner-like cloud."""
    if KITTI_SCAN.is_file():
        scan = np.fromfile(KITTI_SCAN, dtype=np.float32).reshape(-1, 4)
        grey = np.clip(scan[:, 3] * 255, 0, 255).astype(np.uint8)
        return scan[:, :3], np.stack([grey] * 3, 1), str(KITTI_SCAN)
    rng = np.random.default_rng(0)
    beams = np.deg2rad(np.linspace(-24.8, 2.0, 64))
    yaw = np.deg2rad(np.arange(0, 360, 0.19))
    el, az = np.meshgrid(beams, yaw)
    rng_m = np.where(el < 0, np.minimum(1.73 / np.tan(-np.minimum(el, -1e-3)), 60), 40) * rng.uniform(0.9, 1.0, el.shape)
    xyz = np.stack([rng_m * np.cos(el) * np.cos(az), rng_m * np.cos(el) * np.sin(az), rng_m * np.sin(el)], -1).reshape(-1, 3)
    return xyz.astype(np.float32), np.full((len(xyz), 3), 128, np.uint8), "synthetic 64-beam scan"


def _ingest(store: Store, scene_id: str, xyz: np.ndarray, rgb: np.ndarray, faces: np.ndarray | None, kind: str) -> None:
    n = len(xyz)
    arrays = {schema.XYZ: xyz, schema.RGB: rgb, schema.SEMANTIC: np.zeros(n, np.int16), schema.INSTANCE: np.full(n, -1, np.int32)}
    if faces is not None:
        arrays[schema.FACES] = faces
    store.write_stage(scene_id, "ingest", arrays, {"config_hash": "bench", "stats": {"kind": kind}})


def _warm_up(cfg: RenderConfig) -> None:
    """Compile (or load from numba's cache) every kernel, serial and parallel, on a tiny scene, and
    start Open3D's ray caster, outside the timings (both sides of the comparison use Open3D)."""
    xyz, rgb, faces = _box_room(edge=0.5)
    default = render.PARALLEL_MIN_ITEMS
    try:
        for threshold in (0, default):  # 0: every kernel takes its parallel variant
            render.PARALLEL_MIN_ITEMS = threshold
            render_scene(xyz, rgb, faces, kind="mesh", cfg=RenderConfig(width=32, height=24, max_views=2))
            render_scene(xyz, rgb, None, kind="points", cfg=RenderConfig(width=32, height=24, max_views=2))
            render_scene(xyz, rgb, None, kind="lidar", cfg=RenderConfig(width=32, height=24))
    finally:
        render.PARALLEL_MIN_ITEMS = default


def bench_render(*, repeats: int = 3, cfg: RenderConfig = RenderConfig()) -> dict[str, Any]:
    """Run the render benchmark; returns the measured numbers (best of `repeats` for each timing)."""
    import open3d as o3d

    _warm_up(cfg)
    xyz, rgb, faces, mesh_name = bench_mesh()
    out: dict[str, Any] = {"mesh": mesh_name, "vertices": int(len(xyz)), "triangles": int(len(faces)),
                           "image": f"{cfg.width}x{cfg.height}"}
    stage_s, cold_s, warm_s, run_stats = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="ws3d-bench-render-") as tmp:
        store = Store.create(Path(tmp) / "store", dataset="bench", class_names=["thing"])
        for r in range(repeats):
            scene_id = f"bench{r}"
            _ingest(store, scene_id, xyz, rgb, faces, "mesh")  # a fresh scene: no old group to replace
            t0 = time.perf_counter()
            result = run_scene(str(store.path), scene_id, cfg)
            stage_s.append(time.perf_counter() - t0)
            run_stats.append(result.stats)
            # the bare reference on the same mesh and the cameras the stage chose, same process
            poses = store.read(scene_id, schema.VIEW_POSE).astype(np.float64)
            K = store.read(scene_id, schema.VIEW_K)[0].astype(np.float64)
            # the very rays the stage cast (its kernel; `cameras.pixel_rays` gives the same up to rounding)
            rays = render.make_rays(K, poses, cfg.height, cfg.width).reshape(-1, 6)
            tensor = o3d.core.Tensor.from_numpy(rays)
            t0 = time.perf_counter()
            raycaster = build_raycaster(xyz, faces)
            raycaster.cast_rays(tensor, nthreads=cfg.threads)
            cold_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            raycaster.cast_rays(tensor, nthreads=cfg.threads)
            warm_s.append(time.perf_counter() - t0)
            del rays, tensor, raycaster
        n_rays = int(len(poses) * cfg.height * cfg.width)
        stage, cold, warm = min(stage_s), min(cold_s), min(warm_s)
        stats = run_stats[int(np.argmin(stage_s))]  # the breakdown of the best run
        out.update(
            views=int(len(poses)), output_rays=n_rays, rays_cast_by_stage=int(stats["rays_cast"]),
            coverage=stats["coverage"], coverage_of_observable=stats["coverage_of_observable"],
            stage_seconds=round(stage, 4), stage_mrays_per_s=round(n_rays / stage / 1e6, 3),
            bare_cold_seconds=round(cold, 4), bare_cold_mrays_per_s=round(n_rays / cold / 1e6, 3),
            bare_warm_seconds=round(warm, 4), bare_warm_mrays_per_s=round(n_rays / warm / 1e6, 3),
            ratio_vs_cold=round(cold / stage, 3), ratio_vs_warm=round(warm / stage, 3),
            # the store write (zarr + blosc zstd, pipeline.store) alone costs about a cold cast
            ratio_vs_cold_without_write=round(cold / max(stage - stats["seconds_write"], 1e-9), 3),
            stage_breakdown_s={k: stats[k] for k in ("seconds_choose", "seconds_render", "seconds_visibility", "seconds_write")},
            stage_runs_s=[round(s, 4) for s in stage_s], bare_cold_runs_s=[round(s, 4) for s in cold_s],
        )
        # splatting: the LiDAR scan from its sensor, the stage's six cameras
        scan_xyz, scan_rgb, scan_name = lidar_scan()
        res = render_scene(scan_xyz, scan_rgb, None, kind="lidar", cfg=cfg)
        poses = res.pose.astype(np.float64)
        K = res.K[0].astype(np.float64)
        radius = np.linalg.norm(scan_xyz, axis=1) * np.tan(np.deg2rad(cfg.lidar_angular_radius_deg))
        splat_s = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            splat_points(scan_xyz, scan_rgb, poses, K, cfg.height, cfg.width, radius_m=radius,
                         max_radius_px=cfg.max_splat_radius_px)
            splat_s.append(time.perf_counter() - t0)
        _ingest(store, "lidar", scan_xyz, scan_rgb, None, "lidar")
        t0 = time.perf_counter()
        lidar = run_scene(str(store.path), "lidar", cfg)
        lidar_stage = time.perf_counter() - t0
        best = min(splat_s)
        out.update(
            splat_scan=scan_name, splat_points=int(len(scan_xyz)), splat_views=int(len(poses)),
            splat_seconds=round(best, 4), splat_mpoints_per_s=round(len(scan_xyz) * len(poses) / best / 1e6, 3),
            lidar_stage_seconds=round(lidar_stage, 4), lidar_coverage=lidar.stats["coverage"],
        )
    out["peak_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["ratio_ok"] = out["ratio_vs_cold"] >= 0.5
    return out


if __name__ == "__main__":
    print(json.dumps(bench_render(), indent=2))
