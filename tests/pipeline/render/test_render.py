"""The render stage (pipeline.render.core, pipeline.render.cameras, pipeline.render.export).

Oracles from the stored arrays alone: every recorded pixel's back-projected surface point lies on
a triangle incident to the recorded vertex (meshes) or inside the recorded point's splat (point
clouds), and every recorded or listed point projects into its view unhidden. Plus: occlusion by a
wall, coverage of synthetic rooms, the numba splatting against a brute-force numpy version, the
store round trip (skip on rerun, the executor), and the exported pictures.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline import parallel as render_parallel
from pipeline import schema
from pipeline.render import cameras, raycast, splat, visibility
from pipeline.executor import ExecutorConfig, run_scenes
from pipeline.render.config import RenderConfig
from pipeline.render.raycast import build_raycaster, cast, render_mesh_views
from pipeline.render.cameras import greedy_cover
from pipeline.render.core import render_scene
from pipeline.render.stage import RENDER
from pipeline.render.splat import splat_points
from pipeline.render.visibility import unoccluded_from, visible_points
from pipeline.store import Store
from tests.paths import SHARED_DATA

KITTI_SCAN = SHARED_DATA / "semantickitti/sequences/08/velodyne/000000.bin"
SMALL = dict(width=64, height=48)
"""Small images keep the default run fast."""


# --- synthetic scenes ---------------------------------------------------------------------------


class _Mesh:
    """Quads as grids of triangles (vertices not shared between quads), with a colour each."""

    def __init__(self) -> None:
        self.xyz: list[np.ndarray] = []
        self.rgb: list[np.ndarray] = []
        self.faces: list[np.ndarray] = []
        self.n = 0

    def quad(self, origin, u, v, colour, edge: float) -> range:
        origin, u, v = (np.asarray(a, float) for a in (origin, u, v))
        nu = max(1, math.ceil(np.linalg.norm(u) / edge))
        nv = max(1, math.ceil(np.linalg.norm(v) / edge))
        s, t = np.meshgrid(np.linspace(0, 1, nu + 1), np.linspace(0, 1, nv + 1), indexing="ij")
        pts = origin + s.reshape(-1, 1) * u + t.reshape(-1, 1) * v
        idx = np.arange(len(pts)).reshape(nu + 1, nv + 1)
        a, b, c, d = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
        self.faces.append(np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)]) + self.n)
        # a colour gradient across the quad, so interpolation is visible and testable
        ramp = (40 * s.reshape(-1, 1)).astype(int)
        self.rgb.append(np.clip(np.asarray(colour) + ramp, 0, 255).astype(np.uint8))
        self.xyz.append(pts)
        ids = range(self.n, self.n + len(pts))
        self.n += len(pts)
        return ids

    def box(self, lo, hi, colour, edge: float) -> range:
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        dx, dy, dz = hi - lo
        x, y, z = np.eye(3)
        first = self.n
        self.quad(lo + z * dz, x * dx, y * dy, colour, edge)
        self.quad(lo, x * dx, z * dz, colour, edge)
        self.quad(lo + y * dy, x * dx, z * dz, colour, edge)
        self.quad(lo, y * dy, z * dz, colour, edge)
        self.quad(lo + x * dx, y * dy, z * dz, colour, edge)
        return range(first, self.n)

    def build(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (np.concatenate(self.xyz).astype(np.float32), np.concatenate(self.rgb),
                np.concatenate(self.faces).astype(np.int32))


def small_room(edge: float = 0.1, size=(4.0, 3.5), height: float = 2.4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A room without a ceiling (like a ScanNet scan): floor, four walls, a table-like box."""
    m = _Mesh()
    sx, sy = size
    m.quad((0, 0, 0), (sx, 0, 0), (0, sy, 0), (150, 120, 90), edge)
    for origin, u, colour in (((0, 0, 0), (sx, 0, 0), (200, 200, 190)), ((sx, 0, 0), (0, sy, 0), (190, 200, 210)),
                              ((sx, sy, 0), (-sx, 0, 0), (210, 190, 190)), ((0, sy, 0), (0, -sy, 0), (190, 210, 190))):
        m.quad(origin, u, (0, 0, height), colour, edge)
    m.box((1.2, 1.0, 0.0), (2.0, 1.6, 0.75), (120, 60, 40), edge)
    return m.build()


def point_cloud_of(xyz: np.ndarray, faces: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Points sampled uniformly on a mesh's surface [n, 3]."""
    rng = np.random.default_rng(seed)
    tri = xyz[faces].astype(np.float64)
    area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1) / 2
    pick = rng.choice(len(faces), size=n, p=area / area.sum())
    r1, r2 = rng.random(n), rng.random(n)
    flip = r1 + r2 > 1
    r1[flip], r2[flip] = 1 - r1[flip], 1 - r2[flip]
    t = tri[pick]
    return (t[:, 0] + r1[:, None] * (t[:, 1] - t[:, 0]) + r2[:, None] * (t[:, 2] - t[:, 0])).astype(np.float32)


# --- oracle helpers -----------------------------------------------------------------------------


def point_triangle_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Distance [M] from points p [M, 3] to triangles (a, b, c) [M, 3] (Ericson's closest point)."""
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = (ab * ap).sum(1), (ac * ap).sum(1)
    bp = p - b
    d3, d4 = (ab * bp).sum(1), (ac * bp).sum(1)
    cp = p - c
    d5, d6 = (ab * cp).sum(1), (ac * cp).sum(1)
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = va + vb + vc
        v_in, w_in = vb / denom, vc / denom
        closest = a + ab * v_in[:, None] + ac * w_in[:, None]
        # the six outside regions, in the order Ericson tests them
        t_ab = np.clip(d1 / (d1 - d3), 0, 1)
        t_ac = np.clip(d2 / (d2 - d6), 0, 1)
        t_bc = np.clip((d4 - d3) / ((d4 - d3) + (d5 - d6)), 0, 1)
    regions = [
        ((d1 <= 0) & (d2 <= 0), a),
        ((d3 >= 0) & (d4 <= d3), b),
        ((vc <= 0) & (d1 >= 0) & (d3 <= 0), a + ab * t_ab[:, None]),
        ((d6 >= 0) & (d5 <= d6), c),
        ((vb <= 0) & (d2 >= 0) & (d6 <= 0), a + ac * t_ac[:, None]),
        ((va <= 0) & ((d4 - d3) >= 0) & ((d5 - d6) >= 0), b + (c - b) * t_bc[:, None]),
    ]
    for mask, point in reversed(regions):  # reversed + overwrite: the first matching region wins
        closest = np.where(mask[:, None], point, closest)
    return np.linalg.norm(p - closest, axis=1)


def check_recorded_points_unhidden(xyz, depth, index, K, poses, tol_abs, tol_rel=2e-3) -> None:
    """Clouds: every recorded point, projected with the stored camera, lands in the image and is not
    behind the stored depth at its pixel (beyond its own tolerance tol_abs [N] plus float16 slack)."""
    tol_abs = np.broadcast_to(np.asarray(tol_abs, np.float64), (len(xyz),))
    for v in range(len(index)):
        ids = np.unique(index[v][index[v] >= 0])
        check_listed_points_unhidden(xyz[ids], depth[v], K[v], poses[v], tol_abs=tol_abs[ids] + 1e-4, tol_rel=tol_rel)


def check_listed_points_exactly_visible(raycaster, xyz, listed, K, pose, H, W, tol_m=0.01) -> None:
    """Meshes: the listed points of a view are the exactly visible ones (a ray for every point in
    the frustum, no pre-test): none hidden, and at most 1% of the visible ones left out."""
    exact = visibility.exact_visible(raycaster, xyz, pose[None].astype(np.float64), K.astype(np.float64), H, W,
                                 tol_m=tol_m)[0]
    want = np.flatnonzero(exact)
    assert np.isin(listed, want).all(), f"{(~np.isin(listed, want)).sum()} listed points are hidden by the exact test"
    assert len(listed) >= 0.99 * len(want), f"only {len(listed)} of {len(want)} exactly visible points listed"


def check_listed_points_unhidden(pts, depth_v, K, pose, tol_rel=0.025, tol_abs=0.021) -> None:
    uv, z = cameras.project(pts, K, pose)
    assert np.isfinite(uv).all(), "a recorded point is behind the camera"
    px = cameras.pixel_of(uv)
    H, W = depth_v.shape
    inside = (px[:, 0] >= 0) & (px[:, 0] < W) & (px[:, 1] >= 0) & (px[:, 1] < H)
    assert inside.all(), f"{(~inside).sum()} recorded points project outside the image"
    d = depth_v[px[:, 1], px[:, 0]].astype(np.float64)
    hidden = (d > 0) & (z > d * (1 + tol_rel) + tol_abs)
    assert not hidden.any(), f"{hidden.sum()} recorded points are hidden: z={z[hidden][:5]} depth={d[hidden][:5]}"


def check_mesh_oracle(xyz, faces, depth, index, K, poses) -> int:
    """Back-projected pixels lie on a triangle incident to their recorded vertex; returns pixels checked."""
    order = np.argsort(faces.ravel(), kind="stable")
    sorted_v = faces.ravel()[order]
    starts = np.searchsorted(sorted_v, np.arange(len(xyz) + 1))
    checked = 0
    for v in range(len(index)):
        world = cameras.backproject(depth[v].astype(np.float32), K[v], poses[v])
        rows, cols = np.nonzero(index[v] >= 0)
        pid = index[v][rows, cols]
        p = world[rows, cols]
        zd = depth[v][rows, cols].astype(np.float64)
        best = np.full(len(pid), np.inf)
        # up to 8 incident triangles per vertex in these meshes: check them all, keep the nearest
        counts = starts[pid + 1] - starts[pid]
        for k in range(int(counts.max())):
            has = counts > k
            f = order[starts[pid[has]] + k] // 3
            tri = xyz[faces[f]].astype(np.float64)
            dist = point_triangle_distance(p[has], tri[:, 0], tri[:, 1], tri[:, 2])
            best[has] = np.minimum(best[has], dist)
        bad = best > 2e-3 * zd + 1e-4
        assert not bad.any(), f"view {v}: {bad.sum()} pixels off their vertex's triangles by {best[bad][:5]}"
        checked += len(pid)
    return checked


def check_splat_oracle(xyz, radius_m, depth, index, K, poses, max_radius_px) -> int:
    """Back-projected pixels lie inside the recorded point's splat; returns pixels checked."""
    checked = 0
    f = float(K[0][0, 0])
    for v in range(len(index)):
        world = cameras.backproject(depth[v].astype(np.float32), K[v], poses[v])
        rows, cols = np.nonzero(index[v] >= 0)
        pid = index[v][rows, cols]
        _, z = cameras.project(xyz[pid], K[v], poses[v])
        r_px = np.maximum(np.minimum(f * np.broadcast_to(radius_m, (len(xyz),))[pid] / z, max_radius_px), math.sqrt(0.5))
        allowed = r_px * z / f * (1 + 1e-3) + 3e-3 * z + 1e-4
        dist = np.linalg.norm(world[rows, cols] - xyz[pid], axis=1)
        bad = dist > allowed
        assert not bad.any(), f"view {v}: {bad.sum()} pixels outside their point's splat: {dist[bad][:5]} > {allowed[bad][:5]}"
        checked += len(pid)
    return checked


def check_visibility_lists(xyz, depth, index, K, poses, ptr, ids, view_count, *, tol_abs=None, raycaster=None) -> None:
    """The CSR lists contain every recorded point, are sorted and unique, pass the visibility test
    (meshes, with `raycaster`: exact rays; clouds: unhidden at their pixel within `tol_abs` [N]),
    and the view counts are their histogram."""
    assert ptr[0] == 0 and ptr[-1] == len(ids) and (np.diff(ptr) >= 0).all()
    for v in range(len(index)):
        listed = ids[ptr[v]:ptr[v + 1]]
        assert (np.diff(listed) > 0).all(), "visible ids must be sorted and unique"
        recorded = np.unique(index[v][index[v] >= 0])
        assert np.isin(recorded, listed).all(), "a recorded point is missing from the view's visible list"
        if raycaster is not None:
            check_listed_points_exactly_visible(raycaster, xyz, listed, K[v], poses[v], *depth[v].shape)
        else:
            tol = np.broadcast_to(np.asarray(tol_abs, np.float64), (len(xyz),))[listed] + 1e-4
            check_listed_points_unhidden(xyz[listed], depth[v], K[v], poses[v], tol_abs=tol, tol_rel=2e-3)
    np.testing.assert_array_equal(view_count, np.bincount(ids, minlength=len(xyz)))


# --- cameras ------------------------------------------------------------------------------------


def test_look_at_follows_opencv_axes_and_projection_round_trips() -> None:
    K = cameras.intrinsics(64, 48, 90.0)
    assert K[0, 0] == pytest.approx(32.0) and K[0, 2] == pytest.approx(31.5)
    pose = cameras.look_at(np.array([0.0, 0.0, 1.5]), np.array([5.0, 0.0, 1.5]))  # looking along +x
    pts = np.array([[5.0, 0.0, 1.5], [5.0, -1.0, 1.5], [5.0, 0.0, 2.5]])  # ahead, to the right, above
    uv, z = cameras.project(pts, K, pose)
    np.testing.assert_allclose(z, 5.0)
    np.testing.assert_allclose(uv[0], [31.5, 23.5])
    assert uv[1, 0] > 31.5, "a point to the right (-y when looking along +x) must have larger u"
    assert uv[2, 1] < 23.5, "a point above must have smaller v (y down)"
    np.testing.assert_allclose(cameras.camera_centres(pose[None])[0], [0, 0, 1.5], atol=1e-12)
    depth = np.full((48, 64), 3.0)
    world = cameras.backproject(depth, K, pose)
    uv2, z2 = cameras.project(world.reshape(-1, 3), K, pose)
    np.testing.assert_allclose(z2, 3.0)
    cols, rows = np.meshgrid(np.arange(64), np.arange(48))
    np.testing.assert_allclose(uv2, np.stack([cols.ravel(), rows.ravel()], 1), atol=1e-9)
    down = cameras.heading_poses(np.zeros(3), np.array([0.0]), np.deg2rad(-20))[0]
    assert (down[2, :3] @ [0, 0, 1]) == pytest.approx(-math.sin(np.deg2rad(20))), "negative pitch looks down"


def test_rays_hit_parameter_is_z_depth() -> None:
    xyz, rgb, faces = small_room(edge=0.25)
    K = cameras.intrinsics(32, 24, 90.0)
    poses = cameras.heading_poses(np.array([2.0, 1.75, 1.4]), np.array([0.3]), -0.2)
    _, depth, _ = render_mesh_views(xyz, rgb, faces, poses, K, 24, 32)
    world = cameras.backproject(depth[0].astype(np.float32), K, poses[0])
    hit = depth[0] > 0
    # every surface of the room is a plane x, y = 0/4/3.5 or z = 0/0.75...: back-projections land on one
    p = world[hit]
    on_plane = np.min(np.abs(np.stack([p[:, 0], p[:, 0] - 4, p[:, 1], p[:, 1] - 3.5, p[:, 2], p[:, 2] - 0.75,
                                       p[:, 0] - 1.2, p[:, 0] - 2.0, p[:, 1] - 1.0, p[:, 1] - 1.6], 1)), axis=1)
    assert np.all(on_plane < 5e-3 * depth[0][hit].astype(float) + 1e-4)


# --- oracles from the stored arrays --------------------------------------------------------------


def _ingest(store_path: Path, scene_id: str, xyz, rgb, faces, kind: str, stats_extra: dict | None = None) -> Store:
    store = Store.create(store_path, dataset="synthetic", class_names=["thing"])
    n = len(xyz)
    arrays = {schema.XYZ: xyz, schema.RGB: rgb, schema.SEMANTIC: np.zeros(n, np.int16),
              schema.INSTANCE: np.full(n, -1, np.int32)}
    if faces is not None:
        arrays[schema.FACES] = faces
    store.write_stage(scene_id, "ingest", arrays, {"config_hash": "x", "stats": {"kind": kind, **(stats_extra or {})}})
    return store


def _stored(store: Store, scene_id: str) -> dict[str, np.ndarray]:
    specs = {"rgb": schema.VIEW_RGB, "depth": schema.VIEW_DEPTH, "index": schema.VIEW_POINT_INDEX, "K": schema.VIEW_K,
             "pose": schema.VIEW_POSE, "ptr": schema.VISIBLE_PTR, "ids": schema.VISIBLE_IDS, "count": schema.VIEW_COUNT}
    return {k: store.read(scene_id, spec) for k, spec in specs.items()}


def test_mesh_round_trip_oracle_and_skip(tmp_path: Path) -> None:
    xyz, rgb, faces = small_room(edge=0.2)
    store = _ingest(tmp_path / "store", "room0", xyz, rgb, faces, "mesh")
    cfg = RenderConfig(max_views=6, **SMALL)
    result = RENDER.run_scene(str(store.path), "room0", cfg)
    assert result.status == "done" and result.stats["views"] >= 1
    s = _stored(store, "room0")
    V = len(s["pose"])
    assert s["rgb"].shape == (V, 48, 64, 3) and s["rgb"].dtype == np.uint8
    assert s["depth"].dtype == np.float16 and s["index"].dtype == np.int32 and s["count"].dtype == np.uint16
    assert s["K"].shape == (V, 3, 3) and s["ptr"].shape == (V + 1,)
    record = store.stage_record("room0", "render")
    assert record["stats"]["coverage"] == result.stats["coverage"]
    checked = check_mesh_oracle(xyz, faces, s["depth"], s["index"], s["K"], s["pose"])
    assert checked > 0.5 * s["index"].size
    check_visibility_lists(xyz, s["depth"], s["index"], s["K"], s["pose"], s["ptr"], s["ids"], s["count"],
                           raycaster=build_raycaster(xyz, faces))
    # colours are the barycentric blend of the hit triangle's corners: within the corners' range
    v, r, c = np.argwhere(s["index"] >= 0)[0]
    assert (s["rgb"][v, r, c] > 0).any()
    # cameras stand inside the room, clear of the walls, at eye height
    centres = cameras.camera_centres(s["pose"].astype(np.float64))
    clear = cfg.clearance_m - 0.1  # vertex distance less half an edge (0.2 m here) bounds it
    assert (centres[:, 0] > clear).all() and (centres[:, 0] < 4 - clear).all() and (centres[:, 1] > clear).all()
    lo, hi = cfg.eye_height_m
    assert (centres[:, 2] >= lo - 1e-4).all() and (centres[:, 2] <= hi + 1e-4).all()
    assert RENDER.run_scene(str(store.path), "room0", cfg).status == "skipped"
    assert RENDER.run_scene(str(store.path), "room0", cfg, force=True).status == "done"
    assert RENDER.run_scene(str(store.path), "room0", RenderConfig(max_views=5, **SMALL)).status == "done"  # new config


def test_points_round_trip_splat_oracle(tmp_path: Path) -> None:
    xyz_m, _, faces = small_room(edge=0.25)
    xyz = point_cloud_of(xyz_m, faces, 6000)
    rgb = np.random.default_rng(0).integers(0, 255, (len(xyz), 3)).astype(np.uint8)
    store = _ingest(tmp_path / "store", "cloud0", xyz, rgb, None, "points")
    cfg = RenderConfig(max_views=6, point_radius_m=0.04, **SMALL)
    result = RENDER.run_scene(str(store.path), "cloud0", cfg)
    assert result.status == "done"
    s = _stored(store, "cloud0")
    assert check_splat_oracle(xyz, cfg.point_radius_m, s["depth"], s["index"], s["K"], s["pose"], cfg.max_splat_radius_px) > 0
    tol = cfg.splat_depth_tol_factor * cfg.point_radius_m
    check_recorded_points_unhidden(xyz, s["depth"], s["index"], s["K"], s["pose"], tol_abs=tol)
    check_visibility_lists(xyz, s["depth"], s["index"], s["K"], s["pose"], s["ptr"], s["ids"], s["count"], tol_abs=tol)
    hit = s["index"] >= 0
    np.testing.assert_array_equal(s["rgb"][hit], rgb[s["index"][hit]])


def test_lidar_cameras_at_sensor_and_oracle(tmp_path: Path) -> None:
    # a scanner-like cloud: rings on the ground 1.7 m below the sensor, and a wall of points around
    rng = np.random.default_rng(1)
    ang = rng.uniform(0, 2 * np.pi, 8000)
    rad = rng.uniform(3, 20, 8000)
    ground = np.stack([rad * np.cos(ang), rad * np.sin(ang), np.full(8000, -1.7)], 1)
    a2 = rng.uniform(0, 2 * np.pi, 4000)
    wall = np.stack([15 * np.cos(a2), 15 * np.sin(a2), rng.uniform(-1.7, 1.0, 4000)], 1)
    xyz = np.concatenate([ground, wall]).astype(np.float32)
    rgb = np.full((len(xyz), 3), 128, np.uint8)
    store = _ingest(tmp_path / "store", "scan0", xyz, rgb, None, "lidar")
    cfg = RenderConfig(**SMALL)
    assert RENDER.run_scene(str(store.path), "scan0", cfg).status == "done"
    s = _stored(store, "scan0")
    assert len(s["pose"]) == cfg.lidar_headings
    np.testing.assert_allclose(cameras.camera_centres(s["pose"].astype(np.float64)), 0.0, atol=1e-5)
    ranges = np.linalg.norm(xyz, axis=1)
    radius = ranges * np.tan(np.deg2rad(cfg.lidar_angular_radius_deg))
    assert check_splat_oracle(xyz, radius, s["depth"], s["index"], s["K"], s["pose"], cfg.max_splat_radius_px) > 0
    check_visibility_lists(xyz, s["depth"], s["index"], s["K"], s["pose"], s["ptr"], s["ids"], s["count"],
                           tol_abs=cfg.splat_depth_tol_factor * radius.astype(np.float32))
    assert store.stage_record("scan0", "render")["stats"]["coverage"] > 0.5


@pytest.mark.skipif(not KITTI_SCAN.is_file(), reason=f"real SemanticKITTI sample not found at {KITTI_SCAN}")
def test_real_semantickitti_scan_oracle() -> None:
    scan = np.fromfile(KITTI_SCAN, dtype=np.float32).reshape(-1, 4)
    xyz = scan[:, :3]
    grey = np.clip(scan[:, 3] * 255, 0, 255).astype(np.uint8)
    cfg = RenderConfig()
    res = render_scene(xyz, np.stack([grey] * 3, 1), None, kind="lidar", cfg=cfg)
    assert res.rgb.shape == (6, 240, 320, 3)
    ranges = np.linalg.norm(xyz, axis=1)
    radius = ranges * np.tan(np.deg2rad(cfg.lidar_angular_radius_deg))
    K, pose = res.K.astype(np.float64), res.pose.astype(np.float64)
    assert check_splat_oracle(xyz, radius, res.depth, res.point_index, K, pose, cfg.max_splat_radius_px) > 10_000
    check_visibility_lists(xyz, res.depth, res.point_index, K, pose, res.visible_ptr, res.visible_ids, res.view_count,
                           tol_abs=cfg.splat_depth_tol_factor * radius.astype(np.float32))
    # the scanner sees about -25..+2 degrees: nearly every point lies in the six views' frusta
    assert res.stats["coverage"] > 0.5, res.stats


# --- occlusion and coverage ---------------------------------------------------------------------


def _wall_and_object(edge: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray, range]:
    m = _Mesh()
    m.quad((0, -3, 0), (0, 6, 0), (0, 0, 3), (200, 200, 200), edge)  # a wall in the plane x = 0
    m.quad((-4, -3, 0), (8, 0, 0), (0, 6, 0), (120, 100, 80), 0.25)  # a floor on both sides
    obj = m.box((1.0, -0.4, 0.0), (1.8, 0.4, 1.0), (200, 40, 40), edge)  # an object behind it
    xyz, rgb, faces = m.build()
    return xyz, rgb, faces, obj


def test_object_behind_wall_is_not_visible_from_the_other_side() -> None:
    xyz, rgb, faces, obj = _wall_and_object()
    K = cameras.intrinsics(64, 48, 90.0)
    front = cameras.look_at(np.array([-1.5, 0.0, 1.4]), np.array([1.4, 0.0, 0.5]))[None]
    back = cameras.look_at(np.array([3.5, 0.0, 1.4]), np.array([1.4, 0.0, 0.5]))[None]
    obj_ids = np.arange(obj.start, obj.stop)
    for pose, expect in ((front, False), (back, True)):
        _, depth, index = render_mesh_views(xyz, rgb, faces, pose, K, 48, 64)
        ptr, ids, _ = visible_points(xyz, pose, K, depth)
        assert np.isin(index, obj_ids).any() == expect
        assert np.isin(ids, obj_ids).any() == expect
    # the same with splatted points
    cloud = point_cloud_of(xyz, faces, 40000)  # ~4 cm apart: 8 cm discs leave no holes in the wall
    is_obj = (cloud[:, 0] > 0.99) & (cloud[:, 0] < 1.81) & (np.abs(cloud[:, 1]) < 0.41) & (cloud[:, 2] < 1.01)
    for pose, expect in ((front, False), (back, True)):
        _, depth, index = splat_points(cloud, np.zeros((len(cloud), 3), np.uint8), pose, K, 48, 64, radius_m=0.08)
        ptr, ids, _ = visible_points(cloud, pose, K, depth)
        assert is_obj[index[index >= 0]].any() == expect
        assert is_obj[ids].any() == expect


def test_coverage_of_a_synthetic_room() -> None:
    xyz, rgb, faces = small_room(edge=0.1)
    cfg = RenderConfig(width=160, height=120)
    res = render_scene(xyz, rgb, faces, kind="mesh", cfg=cfg)
    # floor, walls and an open-bottomed box: only the floor under the box is hidden from everywhere
    assert res.stats["coverage"] >= 0.95, res.stats
    assert res.stats["views"] <= cfg.max_views
    assert abs(res.stats["coverage_estimate"] - res.stats["coverage"]) < 0.05, "the greedy estimate must be close"
    # greedy choice stops at the target instead of always using max_views
    assert res.stats["views"] < cfg.max_views


@pytest.mark.slow
def test_coverage_of_generated_rooms() -> None:
    synth = pytest.importorskip("pipeline.datasets.synthetic")
    for index in range(3):
        room = synth.make_room(0, index)
        res = render_scene(room.xyz, room.rgb, room.faces, kind="mesh", cfg=RenderConfig())
        # scanner-like rooms keep only what a scanner saw: 95 % of the points, in at most 20 views
        assert res.stats["coverage"] >= 0.95, res.stats
        assert res.stats["views"] <= 20, res.stats


def test_greedy_cover_picks_largest_new_sets_and_stops() -> None:
    seen = np.zeros((4, 10), bool)
    seen[0, :6] = True
    seen[1, 4:9] = True
    seen[2, :3] = True
    seen[3, 9] = True
    chosen, covered = greedy_cover(seen, max_views=10, target=1.0)
    assert chosen == [0, 1, 3] and covered.all()
    chosen, _ = greedy_cover(seen, max_views=10, target=0.85)
    assert chosen == [0, 1]
    chosen, _ = greedy_cover(seen, max_views=1, target=1.0)
    assert chosen == [0]
    chosen, _ = greedy_cover(seen, max_views=10, target=1.0, allowed=np.array([False, True, True, True]))
    assert chosen[0] == 1


def _greedy_cover_brute_force(seen, *, max_views, target, covered=None, allowed=None):
    """The obvious greedy choice: recount every candidate's new samples each round."""
    covered = np.zeros(seen.shape[1], bool) if covered is None else covered.copy()
    allowed = np.ones(len(seen), bool) if allowed is None else allowed.copy()
    chosen = []
    while len(chosen) < max_views and covered.mean() < target and allowed.any():
        gain = (seen & ~covered).sum(1)
        gain[~allowed] = -1
        best = int(np.argmax(gain))
        if gain[best] <= 0:
            break
        chosen.append(best)
        allowed[best] = False
        covered |= seen[best]
    return chosen, covered


def test_greedy_cover_matches_brute_force() -> None:
    rng = np.random.default_rng(5)
    for trial in range(20):
        seen = rng.random((40, 300)) < rng.uniform(0.02, 0.3)
        seen[rng.integers(0, 40, 5)] = seen[rng.integers(0, 40, 5)]  # duplicate rows: ties
        kwargs = dict(max_views=int(rng.integers(1, 30)), target=float(rng.uniform(0.5, 1.0)))
        if trial % 2:
            kwargs.update(covered=rng.random(300) < 0.2, allowed=rng.random(40) < 0.7)
        got, got_cov = greedy_cover(seen, **kwargs)
        want, want_cov = _greedy_cover_brute_force(seen, **kwargs)
        assert got == want
        np.testing.assert_array_equal(got_cov, want_cov)


def test_candidate_scores_match_projection() -> None:
    # seen[c, s]: sample s is clear from c's position and falls into c's image in front of the
    # near plane, computed position by position; the oracle projects with cameras.project
    rng = np.random.default_rng(3)
    positions = rng.uniform(-1, 1, (5, 3))
    yaw = 2 * np.pi * np.arange(8) / 8
    cand = cameras.heading_grid(positions, yaw, np.deg2rad([-10.0, -40.0, -70.0]))
    samples = rng.uniform(-3, 3, (300, 3)).astype(np.float32)
    clear = rng.random((len(positions), len(samples))) < 0.7
    K = cameras.intrinsics(64, 48, 90.0)
    per_position = len(cand) // len(positions)
    want = np.zeros((len(cand), len(samples)), bool)
    for c, pose in enumerate(cand):
        uv, z = cameras.project(samples, K, pose)
        ok = z > 0.05
        px = cameras.pixel_of(np.where(ok[:, None], uv, 0.0))
        want[c] = ok & (px[:, 0] >= 0) & (px[:, 0] < 64) & (px[:, 1] >= 0) & (px[:, 1] < 48) & clear[c // per_position]
    for kernel in (cameras._candidate_seen_ser, cameras._candidate_seen_par):
        got = np.zeros_like(want)
        kernel(samples, cand, K, 48, 64, 0.05, clear, per_position, got)
        assert want.any() and (~want).any()
        assert (got != want).mean() < 1e-3  # the oracle's float rounding may differ at a pixel border


def test_occlusion_probe_matches_the_closest_hit_rule() -> None:
    # unoccluded_from tests any hit before a scaled ray's t = 1; the rule it stands for is on the
    # closest hit t (cast_rays) along the unscaled segment eye -> sample
    xyz, rgb, faces = small_room(edge=0.2)
    raycaster = build_raycaster(xyz, faces)
    rng = np.random.default_rng(2)
    eyes = np.stack([rng.uniform(0.5, 3.5, 6), rng.uniform(0.5, 3.0, 6), rng.uniform(0.3, 1.6, 6)], 1)
    samples = xyz[rng.choice(len(xyz), 500, replace=False)]
    got = unoccluded_from(raycaster, eyes, samples, rel_tol=0.02, abs_tol_m=0.02)
    rays = np.concatenate([np.repeat(eyes, len(samples), 0),
                           (samples[None, :, :] - eyes[:, None, :]).reshape(-1, 3)], 1).astype(np.float32)
    t = cast(raycaster, rays)["t_hit"].reshape(len(eyes), len(samples)).astype(np.float64)
    dist = np.linalg.norm(rays[:, 3:].astype(np.float64), axis=1).reshape(t.shape)
    want = dist <= t * dist * 1.02 + 0.02
    assert 0.1 < want.mean() < 0.95, "the test needs both hidden and visible samples"
    np.testing.assert_array_equal(got, want)


def test_serial_and_parallel_kernels_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    # kernels run serially below parallel.PARALLEL_MIN_ITEMS: both variants must give the same views
    xyz, rgb, faces = small_room(edge=0.2)
    cloud = point_cloud_of(xyz, faces, 4000)
    cloud_rgb = np.random.default_rng(0).integers(0, 255, (len(cloud), 3)).astype(np.uint8)
    cfg = RenderConfig(max_views=4, point_radius_m=0.05, **SMALL)
    runs = []
    for threshold in (1 << 40, 0):
        monkeypatch.setattr(render_parallel, "PARALLEL_MIN_ITEMS", threshold)
        runs.append([render_scene(xyz, rgb, faces, kind="mesh", cfg=cfg),
                     render_scene(cloud, cloud_rgb, None, kind="points", cfg=cfg)])
    for serial, parallel in zip(*runs):
        assert serial.stats["views"] >= 1
        for spec, array in serial.arrays().items():
            np.testing.assert_array_equal(array, parallel.arrays()[spec], err_msg=spec.name)


# --- splatting against brute force --------------------------------------------------------------


def splat_brute_force(xyz, rgb, poses, K, H, W, radius_m, max_radius_px, rel, abs_tol, near):
    """The obvious O(points x pixels) version of `splat_points` in numpy."""
    xyz64 = xyz.astype(np.float64)
    cols, rows = np.meshgrid(np.arange(W), np.arange(H))
    out_rgb = np.zeros((len(poses), H, W, 3), np.uint8)
    out_depth = np.zeros((len(poses), H, W), np.float16)
    out_index = np.full((len(poses), H, W), -1, np.int32)
    radius = np.broadcast_to(np.asarray(radius_m, np.float32), (len(xyz),)).astype(np.float64)
    for v, P in enumerate(poses):
        x, y, z = xyz64[:, 0], xyz64[:, 1], xyz64[:, 2]
        cx = P[0, 0] * x + P[0, 1] * y + P[0, 2] * z + P[0, 3]
        cy = P[1, 0] * x + P[1, 1] * y + P[1, 2] * z + P[1, 3]
        cz = P[2, 0] * x + P[2, 1] * y + P[2, 2] * z + P[2, 3]
        ok = cz > near
        czs = np.where(ok, cz, 1.0)
        u = K[0, 0] * cx / czs + K[0, 2]
        w = K[1, 1] * cy / czs + K[1, 2]
        cu, cv = np.floor(u + 0.5), np.floor(w + 0.5)
        ok &= (cu >= 0) & (cu < W) & (cv >= 0) & (cv < H)
        rp = np.minimum(K[0, 0] * radius / czs, max_radius_px)
        z32 = cz.astype(np.float32)
        dx = cols.reshape(1, -1) - u[:, None]
        dy = rows.reshape(1, -1) - w[:, None]
        cover = (dx * dx + dy * dy <= (rp * rp)[:, None]) | ((cols.reshape(1, -1) == cu[:, None]) & (rows.reshape(1, -1) == cv[:, None]))
        cover &= ok[:, None]
        key = np.where(cover, z32[:, None], np.inf)
        zmin = key.min(0)
        winner = np.where(cover & (key == zmin[None]), np.arange(len(xyz))[:, None], len(xyz)).min(0)
        hit = winner < len(xyz)
        idx = np.where(hit, winner, -1).reshape(H, W)
        d16 = np.where(hit, zmin, 0).astype(np.float16).reshape(H, W)
        out_depth[v] = d16
        out_rgb[v][hit.reshape(H, W)] = rgb[winner[hit]]
        # a recorded point must not be hidden at its own pixel
        rec = idx >= 0
        i = idx[rec]
        dq = d16.astype(np.float32).astype(np.float64)[cv[i].astype(int), cu[i].astype(int)]
        keep = (dq <= 0) | (cz[i] <= dq * (1 + rel) + np.broadcast_to(np.asarray(abs_tol, np.float64), (len(xyz),))[i])
        kept = idx.copy()
        kept[np.nonzero(rec)[0][~keep], np.nonzero(rec)[1][~keep]] = -1
        out_index[v] = kept
    return out_rgb, out_depth, out_index


def test_splatting_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    xyz = rng.uniform([-1, -1, 2], [1, 1, 5], (300, 3)).astype(np.float32)
    xyz[:20, 2] = 3.0  # equal depths: ties go to the lower id
    xyz[20:40] = xyz[40:60]  # duplicates
    rgb = rng.integers(0, 255, (300, 3)).astype(np.uint8)
    radius = rng.uniform(0.01, 0.2, 300).astype(np.float32)
    K = cameras.intrinsics(32, 24, 70.0)
    poses = np.stack([cameras.look_at(np.zeros(3), np.array([0, 0, 4.0]), up=np.array([0, -1.0, 0])),
                      cameras.look_at(np.array([0.5, 0.2, 0.0]), np.array([0, 0, 4.0]), up=np.array([0, -1.0, 0]))])
    got = splat_points(xyz, rgb, poses, K, 24, 32, radius_m=radius, max_radius_px=5.0)
    # the visibility rule: not behind the z-buffer at its own pixel by more than 2 splat radii + 0.1 %
    want = splat_brute_force(xyz, rgb, poses, K, 24, 32, radius, 5.0, 1e-3, (2 * radius).astype(np.float32), 0.05)
    for g, w, name in zip(got, want, ("rgb", "depth", "index")):
        np.testing.assert_array_equal(g, w, err_msg=name)
    assert (got[2] >= 0).sum() > 100, "the test cloud must cover a good part of the image"


# --- executor and export ------------------------------------------------------------------------


def test_runs_through_the_executor_and_reports_bad_input(tmp_path: Path) -> None:
    xyz, rgb, faces = small_room(edge=0.3)
    store = _ingest(tmp_path / "store", "a", xyz, rgb, faces, "mesh")
    store.write_stage("b", "ingest", {schema.XYZ: xyz, schema.RGB: rgb, schema.SEMANTIC: np.zeros(len(xyz), np.int16),
                                      schema.INSTANCE: np.zeros(len(xyz), np.int32)},
                      {"config_hash": "x", "stats": {"kind": "mesh"}})  # a mesh without faces
    fn = functools.partial(RENDER.run_scene, str(store.path), cfg=RenderConfig(max_views=2, **SMALL))
    report = run_scenes("render", fn, ["a", "b"], ExecutorConfig(kind="sync"), progress=False)
    status = {r.scene_id: r for r in report.results}
    assert status["a"].status == "done"
    assert status["b"].status == "failed" and "faces" in status["b"].error


def test_tiny_cloud_still_gets_a_view() -> None:
    rng = np.random.default_rng(0)
    xyz = rng.uniform(0, 0.5, (100, 3)).astype(np.float32)  # no room around it: every position fails
    res = render_scene(xyz, np.zeros((100, 3), np.uint8), None, kind="points", cfg=RenderConfig(**SMALL))
    assert res.stats["views"] >= 1 and res.rgb.shape[1:] == (48, 64, 3)


def test_export_writes_pictures_pillow_reopens(tmp_path: Path) -> None:
    from PIL import Image

    from pipeline.render.export import export_views

    xyz, rgb, faces = small_room(edge=0.3)
    store = _ingest(tmp_path / "store", "room0", xyz, rgb, faces, "mesh")
    RENDER.run_scene(str(store.path), "room0", RenderConfig(max_views=3, **SMALL))
    paths = export_views(store.path, "room0", tmp_path / "pics")
    n_views = len(store.read("room0", schema.VIEW_POSE))
    assert len(paths) == 3 * n_views + 1
    for p in paths[:-1]:
        with Image.open(p) as im:
            assert im.size == (64, 48) and im.mode == "RGB"
    with Image.open(paths[-1]) as sheet:
        assert sheet.width >= 3 * 32 and sheet.height >= 24
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="no scene 'room1'"):  # a user's mistake: one line, no traceback
        export_views(store.path, "room1", tmp_path / "none")
    _ingest(tmp_path / "store", "room2", xyz, rgb, faces, "mesh")  # ingested, not rendered
    with pytest.raises(UserError, match="room2 has no rendered views; run `ws3d render` first"):
        export_views(store.path, "room2", tmp_path / "none")


@pytest.mark.slow
def test_bench_render_reports_numbers() -> None:
    from ws3d_train.bench.render import bench_render

    out = bench_render(repeats=1)
    for key in ("stage_mrays_per_s", "bare_cold_mrays_per_s", "ratio_vs_cold", "splat_mpoints_per_s", "peak_memory_mb"):
        assert out[key] > 0, key
    assert out["views"] >= 1 and out["coverage"] > 0.5


# --- exact visibility: brute-force oracles --------------------------------------------------------


def ray_triangle_t(origins: np.ndarray, dirs: np.ndarray, tri: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Möller-Trumbore in float64 for every ray [R] against every triangle [T, 3, 3]: the closest
    hit parameter t [R] (inf = miss; t in units of the direction's length) and its triangle [R]."""
    a, e1, e2 = tri[:, 0], tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    best_t = np.full(len(origins), np.inf)
    best_f = np.full(len(origins), -1)
    for s in range(0, len(origins), chunk):
        o, d = origins[s:s + chunk, None, :], dirs[s:s + chunk, None, :]
        p = np.cross(d, e2[None])
        det = np.einsum("rtk,tk->rt", p, e1)
        ok = np.abs(det) > 1e-12
        inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
        tv = o - a[None]
        u = np.einsum("rtk,rtk->rt", tv, p) * inv
        q = np.cross(tv, e1[None])
        v = np.einsum("rtk,rtk->rt", np.broadcast_to(d, q.shape), q) * inv
        t = np.einsum("rtk,tk->rt", q, e2) * inv
        hit = ok & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 1e-9)
        t = np.where(hit, t, np.inf)
        best_t[s:s + chunk] = t.min(1)
        best_f[s:s + chunk] = np.where(np.isfinite(t.min(1)), t.argmin(1), -1)
    return best_t, best_f


def _oracle_scene():
    """A wall with an object behind it, a floor, and a low box in front: occlusion at many depths."""
    m = _Mesh()
    m.quad((0, -2, 0), (0, 4, 0), (0, 0, 2), (200, 200, 200), 0.3)   # wall x = 0
    m.quad((-3, -2, 0), (6, 0, 0), (0, 4, 0), (120, 100, 80), 0.4)   # floor
    m.box((1.0, -0.4, 0.0), (1.6, 0.4, 0.9), (200, 40, 40), 0.2)     # behind the wall
    m.box((-1.6, -0.5, 0.0), (-1.0, 0.3, 0.5), (40, 40, 200), 0.15)  # a low box in front
    return m.build()


def _oracle_views():
    K = cameras.intrinsics(64, 48, 90.0)
    poses = np.stack([cameras.look_at(np.array([-2.8, 0.4, 1.5]), np.array([0.5, -0.2, 0.4])),
                      cameras.look_at(np.array([-2.5, -1.5, 0.8]), np.array([0.0, 0.5, 0.6])),
                      cameras.look_at(np.array([3.0, 1.2, 1.7]), np.array([-1.0, -0.3, 0.2]))])
    return np.asarray(K, np.float32).astype(np.float64), np.asarray(poses, np.float32).astype(np.float64)


def test_mesh_visibility_equals_brute_force_ray_test() -> None:
    xyz, rgb, faces = _oracle_scene()
    K, poses = _oracle_views()
    raycaster = build_raycaster(xyz, faces)
    _, depth, index = render_mesh_views(xyz, rgb, faces, poses, K, 48, 64)
    ptr, ids, _ = visible_points(xyz, poses, K, depth, raycaster=raycaster, tol_m=0.01)
    tri = xyz[faces].astype(np.float64)
    centres = cameras.camera_centres(poses)
    n_hidden_total = loose_hidden = 0
    # the old depth-band rule (2 % + 2 cm at the point's own pixel), for comparison
    loose, loose_ids, _ = visible_points(xyz, poses, K, depth, tol_m=0.02, occlusion_rel_tol=0.02)
    for v in range(len(poses)):
        uv, z = cameras.project(xyz, K, poses[v])
        px = cameras.pixel_of(np.nan_to_num(uv, nan=-1e9))
        inside = (z > 0.05) & (px[:, 0] >= 0) & (px[:, 0] < 64) & (px[:, 1] >= 0) & (px[:, 1] < 48)
        cand = np.flatnonzero(inside)
        d = xyz[cand].astype(np.float64) - centres[v]
        dist = np.linalg.norm(d, axis=1)
        t, _ = ray_triangle_t(np.broadcast_to(centres[v], d.shape), d / dist[:, None], tri)
        want = cand[t >= dist - 0.01]
        got = ids[ptr[v]:ptr[v + 1]]
        # float32 (Embree) vs float64 at triangle edges: allow a handful of points either way
        mismatch = len(np.setxor1d(got, want))
        assert mismatch <= max(2, 0.005 * len(want)), (v, mismatch, len(want))
        n_hidden_total += len(cand) - len(want)
        recorded = np.unique(index[v][index[v] >= 0])
        assert np.isin(recorded, got).all()
        loose_hidden += len(np.setdiff1d(loose_ids[loose[v]:loose[v + 1]], want))
    assert n_hidden_total > 100, "the scene must hide points from the cameras"
    assert loose_hidden > 0, "the old depth-band rule should let some hidden points through here"


def test_pixels_record_the_nearest_visible_corner() -> None:
    xyz, rgb, faces = _oracle_scene()
    K, poses = _oracle_views()
    raycaster = build_raycaster(xyz, faces)
    _, depth, index = render_mesh_views(xyz, rgb, faces, poses, K, 48, 64)
    visible = visibility.exact_visible(raycaster, xyz, poses, K, 48, 64)
    tri = xyz[faces].astype(np.float64)
    rays = make_rays_for_test(K, poses, 48, 64)
    agree, total = 0, 0
    for v in range(len(poses)):
        o, d = rays[v, :, :3].astype(np.float64), rays[v, :, 3:].astype(np.float64)
        t, f = ray_triangle_t(o, d, tri)
        hit = np.isfinite(t)
        p = o[hit] + t[hit, None] * d[hit]
        corners = faces[f[hit]]
        dist = np.linalg.norm(xyz[corners].astype(np.float64) - p[:, None, :], axis=2)
        dist = np.where(visible[v][corners], dist, np.inf)
        want = np.where(np.isfinite(dist.min(1)), corners[np.arange(len(p)), dist.argmin(1)], -1)
        got = index[v].reshape(-1)[hit]
        agree += int((got == want).sum())
        total += len(want)
        # wherever the pixel records a vertex it is at least as near as every visible corner
        rec = got >= 0
        d_got = np.linalg.norm(xyz[got[rec]].astype(np.float64) - p[rec], axis=1)
        assert (d_got <= dist[rec].min(1) + 1e-4).mean() > 0.99
    assert total > 3000 and agree / total > 0.99, (agree, total)


def _shade_reference(t_hit, prim, uvs, depth16, faces, xyz, rgb, visible, hw):
    """Per-pixel numpy version of the fused shading pass: barycentric colour (black on a miss) and
    the hit triangle's nearest corner visible in the pixel's view (-1: none, or depth 0)."""
    n = len(t_hit)
    out_rgb = np.zeros((n, 3), np.uint8)
    out_index = np.full(n, -1, np.int32)
    for p in range(n):
        if not np.isfinite(t_hit[p]):
            continue
        corners = faces[prim[p]]
        u, v = float(uvs[p, 0]), float(uvs[p, 1])
        w = np.array([1.0 - u - v, u, v])
        out_rgb[p] = np.clip(w @ rgb[corners].astype(np.float64) + 0.5, 0, 255).astype(np.uint8)
        if depth16[p] == 0:
            continue
        bary = np.array([1.0 - np.float64(uvs[p, 0]) - np.float64(uvs[p, 1]), uvs[p, 0], uvs[p, 1]])
        hit = bary @ xyz[corners].astype(np.float64)
        dist = ((hit - xyz[corners]) ** 2).sum(1)
        dist = np.where(visible[p // hw, corners], dist, np.inf)
        if np.isfinite(dist.min()):
            out_index[p] = corners[int(np.argmin(dist))]
    return out_rgb, out_index


def test_shading_kernels_match_a_per_pixel_reference() -> None:

    xyz, rgb, faces = _oracle_scene()
    K, poses = _oracle_views()
    H, W = 12, 16
    K = np.asarray(cameras.intrinsics(W, H, 90.0), np.float32).astype(np.float64)
    hits = cast(build_raycaster(xyz, faces), raycast.make_rays(K, poses, H, W).reshape(-1, 6))
    t_hit = hits["t_hit"]
    depth = np.where(np.isfinite(t_hit), t_hit, 0.0).astype(np.float16)
    depth[::7] = 0  # hits whose stored depth is 0: coloured, no point
    rng = np.random.default_rng(0)
    visible = rng.random((len(poses), len(xyz))) < 0.6  # some pixels with no visible corner at all
    want_rgb, want_index = _shade_reference(t_hit, hits["primitive_ids"], hits["primitive_uvs"], depth,
                                            faces.astype(np.int32), xyz, rgb, visible, H * W)
    assert (~np.isfinite(t_hit)).any() and (want_index == -1).sum() > (depth == 0).sum()
    for kernel in (raycast._shade_assign_ser, raycast._shade_assign_par):
        out_rgb = np.empty((len(t_hit), 3), np.uint8)
        out_index = np.empty(len(t_hit), np.int32)
        kernel(t_hit, hits["primitive_ids"], hits["primitive_uvs"], depth.view(np.uint16), faces.astype(np.int32),
               xyz, rgb, visible, H, W, out_rgb, out_index)
        np.testing.assert_array_equal(out_rgb, want_rgb)
        np.testing.assert_array_equal(out_index, want_index)


def test_occlusion_rays_follow_the_mask_in_nonzero_order() -> None:

    rng = np.random.default_rng(1)
    xyz = rng.uniform(-2, 2, (300, 3)).astype(np.float32)
    centres = rng.uniform(-2, 2, (3, 3))
    centres[1] = xyz[5]  # a point at a camera centre: within the tolerance, never hidden
    mask = rng.random((3, 300)) < 0.3
    mask[1, 5] = True
    n = int(mask.sum())
    rays, short = np.empty((n, 6), np.float32), np.empty(n, np.bool_)
    view, point = np.empty(n, np.int32), np.empty(n, np.int32)
    visibility._occlusion_rays_kernel(xyz, centres, mask, 0.01, rays, short, view, point)
    want_view, want_point = np.nonzero(mask)
    np.testing.assert_array_equal(view, want_view)
    np.testing.assert_array_equal(point, want_point)
    d = xyz[want_point].astype(np.float64) - centres[want_view]
    dist = np.linalg.norm(d, axis=1)
    scale = np.where(dist > 0.01, (dist - 0.01) / np.maximum(dist, 1e-300), 1.0)
    np.testing.assert_allclose(rays[:, :3], centres[want_view].astype(np.float32))
    np.testing.assert_allclose(rays[:, 3:], (d * scale[:, None]).astype(np.float32), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(short, dist <= 0.01)
    assert short.sum() == 1
    # what the rays hit clears the mask, except where the point is at the camera
    hidden = np.ones(n, np.bool_)
    visibility._drop_hidden(mask, view, point, hidden, short)
    assert mask.sum() == 1 and mask[1, 5]


def make_rays_for_test(K, poses, H, W) -> np.ndarray:
    return raycast.make_rays(K, poses, H, W)


def test_cloud_visibility_agrees_with_a_ray_test_against_splat_discs() -> None:
    """Clouds: the z-buffer rule against the geometric one (the ray camera -> point passes a
    nearer point's disc by less than its radius, that point nearer by more than the tolerance)."""
    xyz_m, _, faces = _oracle_scene()
    cloud = point_cloud_of(xyz_m, faces, 6000, seed=3)
    spacing = splat.local_spacing(cloud)
    radius = (2.0 * spacing).astype(np.float32)
    K, poses = _oracle_views()
    _, depth, index = splat_points(cloud, np.zeros((len(cloud), 3), np.uint8), poses, K, 48, 64, radius_m=radius)
    ptr, ids, _ = visible_points(cloud, poses, K, depth, tol_m=2.0 * radius)
    centres = cameras.camera_centres(poses)
    agree, total = 0, 0
    for v in range(len(poses)):
        uv, z = cameras.project(cloud, K, poses[v])
        px = cameras.pixel_of(np.nan_to_num(uv, nan=-1e9))
        inside = np.flatnonzero((z > 0.05) & (px[:, 0] >= 0) & (px[:, 0] < 64) & (px[:, 1] >= 0) & (px[:, 1] < 48))
        c = centres[v]
        d = cloud[inside].astype(np.float64) - c
        dist = np.linalg.norm(d, axis=1)
        unit = d / dist[:, None]
        rel = cloud.astype(np.float64) - c  # every point j against every ray i
        along = unit @ rel.T
        off = np.sqrt(np.maximum((rel ** 2).sum(1)[None, :] - along ** 2, 0.0))
        blocks = (off <= radius[None, :]) & (along > 0) & (along < dist[:, None] - 2.0 * radius[inside][:, None])
        want = inside[~blocks.any(1)]
        got = ids[ptr[v]:ptr[v + 1]]
        agree += len(inside) - len(np.setxor1d(got, want))
        total += len(inside)
    assert agree / total > 0.95, agree / total
