"""Benchmark of the render stage (`make bench`): measured against a reference in the same process.

Reads: a generated room (`pipeline.datasets.synthetic`, or a box room built here when that is absent), the
real ScanNet scan `../shared/data/scannet/scans/scene0470_00` when present, and the real
SemanticKITTI scan under `../shared/data` (else a synthetic LiDAR-like cloud).
Writes: only a temporary store, deleted afterwards. Returns a dict of numbers (JSON-safe).

Measured:
- exactness of the lists (`audit_mesh_views`, on the synthetic room and under `real_scan`): the
  share of listed (view, point) entries that a ray from the camera finds hidden (the exact test,
  a ray for every point in the frustum, no pre-test), the recall of exactly visible points, the
  same share for the former rule (the depth at the point's own pixel, 2 % + 2 cm band) and how
  far behind its hidden points lie, and the distance between the surface point a pixel sees and
  the vertex it records (also for the former max-barycentric choice); coverage and view count;
- the whole stage through `pipeline.stage.run_scene` (read inputs, choose cameras, cast, colour, point indices,
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

from pipeline import parallel, schema
from pipeline.render import cameras
from pipeline.render.config import RenderConfig
from pipeline.render.core import RenderResult, render_scene
from pipeline.render.raycast import build_raycaster, cast, make_rays
from pipeline.render.splat import splat_points
from pipeline.render.stage import RENDER
from pipeline.stage import StageRun, run_scene
from pipeline.store import Store
from ws3d_train.bench import SHARED_DATA

KITTI_SCAN = SHARED_DATA / "semantickitti/sequences/08/velodyne/000000.bin"
SCANNET_RAW = SHARED_DATA / "scannet"
SCANNET_SCENE = "scene0470_00"


def audit_mesh_views(xyz: np.ndarray, faces: np.ndarray, res: RenderResult, cfg: RenderConfig) -> dict[str, Any]:
    """How exact a mesh render's correspondences are (see the module docstring); JSON-safe dict."""
    from pipeline.render.visibility import exact_visible, points_visibility

    xyz = np.ascontiguousarray(xyz, np.float32)
    faces = np.ascontiguousarray(faces, np.int32)
    poses, K = res.pose.astype(np.float64), res.K[0].astype(np.float64)
    H, W = cfg.height, cfg.width
    raycaster = build_raycaster(xyz, faces)
    exact = exact_visible(raycaster, xyz, poses, K, H, W, tol_m=cfg.visibility_tol_m)
    listed = np.zeros_like(exact)
    for v in range(len(poses)):
        listed[v, res.visible_ids[res.visible_ptr[v]:res.visible_ptr[v + 1]]] = True
    out: dict[str, Any] = {
        "views": int(len(poses)), "coverage": res.stats["coverage"],
        "listed_entries": int(listed.sum()), "exact_entries": int(exact.sum()),
        "listed_occluded_share": round(float((listed & ~exact).sum() / max(1, listed.sum())), 5),
        "exact_recall": round(float((listed & exact).sum() / max(1, exact.sum())), 5),
    }
    # the same views through the former rule: the depth at the point's own pixel, 2 % + 2 cm
    rays = make_rays(K, poses, H, W).reshape(-1, 6)
    hits = cast(raycaster, rays)
    t = hits["t_hit"]
    depth = np.where(np.isfinite(t), t, 0.0).astype(np.float32)
    loose = points_visibility(xyz, poses, K, depth, H, W, tol_m=0.02, rel_tol=0.02)
    wrong = loose & ~exact
    out["former_rule_occluded_share"] = round(float(wrong.sum() / max(1, loose.sum())), 5)
    v_idx, p_idx = np.nonzero(wrong)
    if len(v_idx):  # how far behind the first surface those points lie
        centres = cameras.camera_centres(poses)
        d = xyz[p_idx].astype(np.float64) - centres[v_idx]
        dist = np.linalg.norm(d, axis=1)
        first = cast(raycaster, np.concatenate([centres[v_idx], d / dist[:, None]], 1).astype(np.float32))["t_hit"]
        behind = dist - first
        out["former_rule_hidden_by_over_5cm_share"] = round(float((behind > 0.05).sum() / loose.sum()), 5)
        out["former_rule_hidden_by_over_10cm_share"] = round(float((behind > 0.10).sum() / loose.sum()), 5)
    # pixel -> point: distance from the surface point a pixel sees to the vertex it records
    index = res.point_index.reshape(-1)
    rec = (index >= 0) & np.isfinite(t)
    hit_pt = rays[rec, :3].astype(np.float64) + t[rec, None] * rays[rec, 3:].astype(np.float64)
    dist = np.linalg.norm(xyz[index[rec]].astype(np.float64) - hit_pt, axis=1)
    out["pixel_point_m_p50"] = round(float(np.median(dist)), 5) if len(dist) else None
    out["pixel_point_m_p90"] = round(float(np.percentile(dist, 90)), 5) if len(dist) else None
    corners = faces[hits["primitive_ids"][rec]]
    uv = hits["primitive_uvs"][rec].astype(np.float64)
    bary = np.stack([1 - uv[:, 0] - uv[:, 1], uv[:, 0], uv[:, 1]], 1)
    maxbary = corners[np.arange(len(corners)), bary.argmax(1)]
    d_max = np.linalg.norm(xyz[maxbary].astype(np.float64) - hit_pt, axis=1)
    out["former_max_barycentric_m_p50"] = round(float(np.median(d_max)), 5) if len(d_max) else None
    out["pixel_point_over_former"] = round(float(np.median(dist) / max(np.median(d_max), 1e-12)), 4) if len(dist) else None
    out["unseen"] = res.stats.get("unseen")
    return out


def _stage_vs_bare(store: Store, name: str, xyz, rgb, faces, cfg: RenderConfig, repeats: int) -> tuple[dict[str, Any], Any]:
    """The whole stage (`run_scene`) against a fresh build + one `cast_rays` of the same rays."""
    import open3d as o3d

    stage_s, cold_s, warm_s, run_stats = [], [], [], []
    stage_cpu, cold_cpu = [], []  # CPU seconds of the process (all threads): steadier on shared cores
    for r in range(repeats):
        scene_id = f"{name}{r}"
        _ingest(store, scene_id, xyz, rgb, faces, "mesh")  # a fresh scene: no old group to replace
        t0, c0 = time.perf_counter(), time.process_time()
        result = run_scene(RENDER, StageRun(str(store.path), cfg), scene_id)
        stage_s.append(time.perf_counter() - t0)
        stage_cpu.append(time.process_time() - c0)
        run_stats.append(result.stats)
        poses = store.read(scene_id, schema.VIEW_POSE).astype(np.float64)
        K = store.read(scene_id, schema.VIEW_K)[0].astype(np.float64)
        rays = make_rays(K, poses, cfg.height, cfg.width).reshape(-1, 6)
        tensor = o3d.core.Tensor.from_numpy(rays)
        t0, c0 = time.perf_counter(), time.process_time()
        raycaster = build_raycaster(xyz, faces)
        raycaster.cast_rays(tensor, nthreads=cfg.threads)
        cold_s.append(time.perf_counter() - t0)
        cold_cpu.append(time.process_time() - c0)
        t0 = time.perf_counter()
        raycaster.cast_rays(tensor, nthreads=cfg.threads)
        warm_s.append(time.perf_counter() - t0)
        del rays, tensor, raycaster
    n_rays = int(len(poses) * cfg.height * cfg.width)
    stage, cold, warm = min(stage_s), min(cold_s), min(warm_s)
    stats = run_stats[int(np.argmin(stage_s))]
    return {
        "vertices": int(len(xyz)), "triangles": int(len(faces)),
        "views": int(len(poses)), "output_rays": n_rays, "rays_cast_by_stage": int(stats["rays_cast"]),
        "coverage": stats["coverage"], "coverage_of_observable": stats["coverage_of_observable"],
        "stage_seconds": round(stage, 4), "stage_mrays_per_s": round(n_rays / stage / 1e6, 3),
        "bare_cold_seconds": round(cold, 4), "bare_cold_mrays_per_s": round(n_rays / cold / 1e6, 3),
        "bare_warm_seconds": round(warm, 4),
        "ratio_vs_cold": round(cold / stage, 3), "ratio_vs_warm": round(warm / stage, 3),
        "ratio_vs_cold_without_write": round(cold / max(stage - stats["seconds_write"], 1e-9), 3),
        # the same comparison in CPU seconds of the process (best of each, all threads counted):
        # less stretched than wall clock when other processes share the cores
        "ratio_vs_cold_cpu": round(min(cold_cpu) / max(min(stage_cpu), 1e-9), 3),
        "stage_breakdown_s": {k: stats[k] for k in ("seconds_choose", "seconds_render", "seconds_visibility", "seconds_write")},
        "stage_runs_s": [round(s, 4) for s in stage_s], "bare_cold_runs_s": [round(s, 4) for s in cold_s],
    }, stats


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
    """The benchmark mesh: the project's generated room 0 when `pipeline.datasets.synthetic` exists."""
    try:
        from pipeline.datasets import synthetic as synth
    except ImportError:
        xyz, rgb, faces = _box_room()
        return xyz, rgb, faces, "box room (pipeline.datasets.synthetic absent)"
    room = synth.make_room(0, 0)
    return room.xyz, room.rgb, room.faces, "pipeline.datasets.synthetic.make_room(0, 0)"


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
    default = parallel.PARALLEL_MIN_ITEMS
    try:
        for threshold in (0, default):  # 0: every kernel takes its parallel variant
            parallel.PARALLEL_MIN_ITEMS = threshold
            render_scene(xyz, rgb, faces, kind="mesh", cfg=RenderConfig(width=32, height=24, max_views=2))
            render_scene(xyz, rgb, None, kind="points", cfg=RenderConfig(width=32, height=24, max_views=2))
            render_scene(xyz, rgb, None, kind="lidar", cfg=RenderConfig(width=32, height=24))
    finally:
        parallel.PARALLEL_MIN_ITEMS = default


def bench_render(*, repeats: int = 3, cfg: RenderConfig = RenderConfig(), tiny: bool = False) -> dict[str, Any]:
    """Run the render benchmark; returns the measured numbers (best of `repeats` for each timing).

    `tiny`: a small box room, small images, one repeat, no real scans (for tests)."""
    import dataclasses

    if tiny:
        repeats, cfg = 1, dataclasses.replace(cfg, width=64, height=48, max_views=4)
    _warm_up(cfg)
    if tiny:
        xyz, rgb, faces = _box_room(edge=0.2)
        mesh_name = "box room (tiny)"
    else:
        xyz, rgb, faces, mesh_name = bench_mesh()
    out: dict[str, Any] = {"mesh": mesh_name, "image": f"{cfg.width}x{cfg.height}"}
    with tempfile.TemporaryDirectory(prefix="ws3d-bench-render-") as tmp:
        store = Store.create(Path(tmp) / "store", dataset="bench", class_names=["thing"])
        timing, _ = _stage_vs_bare(store, "bench", xyz, rgb, faces, cfg, repeats)
        out.update(timing)
        res = render_scene(xyz, rgb, faces, kind="mesh", cfg=cfg)
        out["exact"] = audit_mesh_views(xyz, faces, res, cfg)
        real = SCANNET_RAW / "scans" / SCANNET_SCENE
        if real.is_dir() and not tiny:
            from pipeline.datasets import scannet

            scene = scannet.read_scene(SCANNET_RAW, SCANNET_SCENE)
            timing, _ = _stage_vs_bare(store, "real", scene.xyz, scene.rgb, scene.faces, cfg, repeats)
            res = render_scene(scene.xyz, scene.rgb, scene.faces, kind="mesh", cfg=cfg)
            out["real_scan"] = {"scene": SCANNET_SCENE, **timing, "exact": audit_mesh_views(scene.xyz, scene.faces, res, cfg)}
        else:
            out["real_scan"] = {"skipped": f"{real} absent" if not tiny else "tiny"}
        # splatting: the LiDAR scan from its sensor, the stage's six cameras
        scan_xyz, scan_rgb, scan_name = lidar_scan()
        if tiny:
            scan_xyz, scan_rgb = scan_xyz[::20], scan_rgb[::20]
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
        lidar = run_scene(RENDER, StageRun(str(store.path), cfg), "lidar")
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
