"""The render stage: 2D views of each scan with the exact point shown by every pixel.

Reads (ingest): `points/xyz`, `points/rgb`, `mesh/faces` (meshes only), `points/semantic` (for
the unseen-point statistics only) and the ingest record's stats (`kind`: "mesh" | "points" |
"lidar", optional `sensor_origin`).
Writes (`views/`): rgb u8 [V,H,W,3], depth f16 [V,H,W] (z-depth in metres, 0 = nothing),
point_index i32 [V,H,W] (-1 = nothing), K [V,3,3], pose [V,4,4] (world->camera, OpenCV),
the visible point ids of each view as CSR (visible_ptr, visible_ids), per-point view counts,
and coverage statistics in the stage record (with what stays unseen).

This module is the thin runner and the stage's config; the work lives in:
- `pipeline.cameras`: pinhole math and the camera choice. Indoors: positions on a grid at eye
  height in free space (>= `clearance_m` from every surface), `headings` headings at each of
  `pitches_deg`; positions whose tiny renders look mostly at nothing are outside the scan and
  dropped; a sample of points is scored against every candidate (meshes: one exact occlusion ray
  from each position to each sample; clouds: a depth test against low-resolution splats) and
  views are chosen greedily by newly seen samples until `coverage_target` of the observable
  points or `max_views`; one more greedy round adds views for what the full-size views missed.
  LiDAR: `lidar_headings` cameras at the sensor looking around.
- `pipeline.raycast`: meshes through Open3D's `RaycastingScene` (built once per scene, the rays
  of several views in one call); colour is the barycentric blend of the hit triangle's vertex
  colours; a pixel records the hit triangle's corner nearest to the surface point it sees that is
  visible in the view.
- `pipeline.splat`: point clouds by a numba z-buffer, splat radii from the local point spacing.
- `pipeline.visibility`: a mesh vertex is visible when the ray from the camera reaches it within
  `visibility_tol_m` (exact, occlusion-aware); a cloud point when it is not behind the z-buffer
  at its pixel by more than a tolerance from its local spacing. A pixel records a point only if
  it is visible, and a view's list holds all its visible points.
- `pipeline.parallel`: when the numba kernels use several threads.

Public names of the former one-file module are re-exported here (`build_raycaster`, `cast`,
`make_rays`, `splat_points`, `visible_points`, `greedy_cover`, ...).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numba
import numpy as np

from pipeline import cameras, raycast, schema, splat, visibility
from pipeline.cameras import candidate_positions, greedy_cover
from pipeline.config import config_hash, to_dict
from pipeline.executor import SceneResult
from pipeline.parallel import PARALLEL_MIN_ITEMS, use_parallel
from pipeline.raycast import build_raycaster, cast, cast_depth, make_rays, render_mesh_views
from pipeline.readers.base import SceneError
from pipeline.splat import local_spacing, splat_depth, splat_points
from pipeline.visibility import (
    exact_visible,
    mesh_visibility,
    points_visibility,
    sample_visibility,
    unoccluded_from,
    visibility_csr,
    visible_points,
)

STAGE = "render"


@dataclass(frozen=True)
class RenderConfig:
    """How views are chosen and rendered."""

    width: int = 320
    """Image width in pixels."""
    height: int = 240
    """Image height in pixels."""
    hfov_deg: float = 90.0
    """Horizontal field of view of indoor cameras (degrees)."""
    max_views: int = 20
    """Most views per indoor scene."""
    coverage_target: float = 0.95
    """Stop adding indoor views once this fraction of the points is seen, or all the observable
    ones (seen by some candidate: points under furniture or against walls may be seen by none)."""
    min_view_gain: float = 0.001
    """A view is added only if it newly shows at least this fraction of the sampled points."""
    eye_height_m: tuple[float, float] = (0.5, 1.6)
    """Range of camera heights above the floor (each candidate position draws one): low ones
    see under tables and between chairs, as a handheld scanner did."""
    clearance_m: float = 0.2
    """Candidate positions keep at least this distance from every surface."""
    headings: int = 8
    """Headings per candidate position, evenly spaced around the vertical."""
    pitches_deg: tuple[float, ...] = (-10.0, -40.0, -70.0)
    """Pitches of indoor cameras (negative = looking down): the steeper one sees the floor
    between furniture and the tops of low objects, which an eye-height level view misses."""
    grid_step_m: float = 0.25
    """Finest spacing of the candidate position grid (coarser in big scenes, see max_positions)."""
    max_positions: int = 96
    """Most candidate positions per scene (spread out by farthest-point sampling)."""
    candidate_width: int = 4
    """Meshes: width of the tiny candidate renders (height keeps the aspect) that find positions
    outside the scan (see min_hit_fraction): 4 x 3 pixels a candidate are 288 rays a position,
    enough for its hit fraction (8 x 6 chose the same views at 4x the rays, which are scattered
    and so cost more each than image rays). Candidates are scored exactly, by casting a ray from
    each position to each sampled point."""
    point_candidate_width: int = 64
    """Point clouds: width of the candidate renders that find positions outside the scan and
    score candidates by a depth test of the sampled points."""
    min_hit_fraction: float = 0.6
    """A position whose candidates' pixels hit a surface less often than this is outside the
    scan (e.g. beyond a wall) and is dropped."""
    coverage_samples: int = 2048
    """Points sampled to score candidates and estimate coverage during the greedy choice."""
    refine_rounds: int = 4
    """After rendering, rounds of extra views chosen for a fresh sample of the points the
    full-size views missed (the first sample's greedy choice overfits it)."""
    refine_samples: int = 512
    """Points sampled from those still unseen for each refinement round."""
    floor_percentile: float = 1.0
    """The floor height is this percentile of the points' z."""
    lidar_headings: int = 6
    """Cameras at a LiDAR sensor, evenly spaced in heading."""
    lidar_hfov_deg: float = 90.0
    """Horizontal field of view of LiDAR cameras (degrees)."""
    lidar_pitch_deg: float = -10.0
    """Pitch of LiDAR cameras: a scanner sees about +2..-25 degrees, so look slightly down."""
    point_radius_m: float = 0.0
    """World radius of an indoor point's splat; 0 = `point_radius_factor` x its local spacing."""
    point_radius_factor: float = 2.0
    """Automatic splat radius in local point spacings (`pipeline.splat.local_spacing`, metres):
    irregular (scanned, sampled) clouds leave holes at 1x, through which hidden surfaces show."""
    splat_depth_tol_factor: float = 2.0
    """Clouds: a point is hidden when it lies behind the z-buffer at its pixel by more than this
    many of its own splat radii (a neighbour's disc on the same tilted surface is not an occluder)."""
    lidar_angular_radius_deg: float = 0.35
    """A LiDAR point's splat radius as an angle seen from the sensor (beams are ~0.2-0.4 deg apart)."""
    max_splat_radius_px: float = 8.0
    """Largest splat radius in pixels (points very close to a camera)."""
    visibility_tol_m: float = 0.01
    """Meshes: a vertex is visible when the ray from the camera reaches it within this (metres)."""
    occlusion_rel_tol: float = 0.02
    """Meshes: vertices further behind every depth around their pixel than this fraction of it...
    (point clouds: the tolerance of the low-resolution candidate estimate)..."""
    occlusion_abs_tol_m: float = 0.02
    """...plus this many metres are hidden without casting their occlusion ray (a pre-test)."""
    near_m: float = 0.05
    """Nothing nearer than this to a camera is drawn."""
    views_per_batch: int = 16
    """Views cast in one `cast_rays` call (bounds memory: ~56 bytes a pixel in flight, 70 MB at
    320 x 240). Batches of 16 views (1.2 million pixels) also take the per-pixel and per-point
    kernels past `pipeline.parallel.PARALLEL_MIN_ITEMS`, onto all threads."""
    threads: int = 0
    """Threads for ray casting and the numba kernels; 0 = all cores. Set 1 when an executor runs
    one worker process per core (threads beyond the free cores only wait for each other)."""
    seed: int = 0
    """Seed of the candidate heights and the coverage sample."""


@dataclass
class RenderResult:
    """The rendered views of one scene (all arrays in the store's dtypes)."""

    rgb: np.ndarray
    """uint8 [V, H, W, 3]."""
    depth: np.ndarray
    """float16 [V, H, W], z-depth in metres, 0 = nothing."""
    point_index: np.ndarray
    """int32 [V, H, W], -1 = nothing."""
    K: np.ndarray
    """float32 [V, 3, 3]."""
    pose: np.ndarray
    """float32 [V, 4, 4], world->camera, OpenCV."""
    visible_ptr: np.ndarray
    """int64 [V + 1] CSR offsets."""
    visible_ids: np.ndarray
    """int32 [M] sorted point ids per view."""
    view_count: np.ndarray
    """uint16 [N] views showing each point."""
    stats: dict[str, Any] = field(default_factory=dict)
    """Coverage, counts and timings (JSON-safe)."""

    def arrays(self) -> dict[schema.ArraySpec, np.ndarray]:
        """The store arrays of the `views` group."""
        return {
            schema.VIEW_RGB: self.rgb,
            schema.VIEW_DEPTH: self.depth,
            schema.VIEW_POINT_INDEX: self.point_index,
            schema.VIEW_K: self.K,
            schema.VIEW_POSE: self.pose,
            schema.VISIBLE_PTR: self.visible_ptr,
            schema.VISIBLE_IDS: self.visible_ids,
            schema.VIEW_COUNT: self.view_count,
        }


def _as_stored(a: np.ndarray) -> np.ndarray:
    """Round cameras to the stored float32 before rendering, so the stored K and pose reproduce
    every projection the renderer made (the oracle tests rely on it)."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def render_scene(
    xyz: np.ndarray,
    rgb: np.ndarray,
    faces: np.ndarray | None,
    *,
    kind: Literal["mesh", "points", "lidar"],
    cfg: RenderConfig = RenderConfig(),
    sensor_origin: np.ndarray | None = None,
) -> RenderResult:
    """The whole stage for one scene, without I/O: choose cameras, render, visibility lists.

    Args:
        xyz: float32 [N, 3] points (mesh vertices), metres, z up; rgb: uint8 [N, 3].
        faces: int [F, 3] for kind="mesh", else None.
        kind: "mesh" (ray cast), "points" (indoor cloud, splatted), "lidar" (splatted from the sensor).
        sensor_origin: [3] LiDAR sensor position (default the origin).

    Returns:
        A `RenderResult` with the views, the visibility CSR and stats.
    """
    if cfg.threads <= 0:
        return _render_scene(xyz, rgb, faces, kind, cfg, sensor_origin)
    previous = numba.get_num_threads()
    numba.set_num_threads(min(cfg.threads, numba.config.NUMBA_NUM_THREADS))
    try:
        return _render_scene(xyz, rgb, faces, kind, cfg, sensor_origin)
    finally:
        numba.set_num_threads(previous)


def _render_scene(xyz: np.ndarray, rgb: np.ndarray, faces: np.ndarray | None, kind: Literal["mesh", "points", "lidar"],
                  cfg: RenderConfig, sensor_origin: np.ndarray | None) -> RenderResult:
    """`render_scene` on numba's current threads."""
    t_start = time.perf_counter()
    xyz = np.ascontiguousarray(xyz, dtype=np.float32)
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    n_points = len(xyz)
    rng = np.random.default_rng(cfg.seed)
    H, W = cfg.height, cfg.width
    stats: dict[str, Any] = {"kind": kind, "points": n_points}
    tol = (float(cfg.occlusion_rel_tol), float(cfg.occlusion_abs_tol_m), float(cfg.near_m))
    raycaster = None
    rays_cast = 0
    floor_z = None

    if kind == "lidar":
        origin = np.zeros(3) if sensor_origin is None else np.asarray(sensor_origin, dtype=np.float64)
        K = cameras.intrinsics(W, H, cfg.lidar_hfov_deg)
        yaw = 2 * np.pi * np.arange(cfg.lidar_headings) / cfg.lidar_headings
        poses = _as_stored(cameras.heading_poses(origin, yaw, np.deg2rad(cfg.lidar_pitch_deg)))
        K = _as_stored(K)
        ranges = np.linalg.norm(xyz - origin.astype(np.float32), axis=1)
        radius = (ranges * np.tan(np.deg2rad(cfg.lidar_angular_radius_deg))).astype(np.float32)
        t_choose = time.perf_counter()
        img_rgb, depth, index, visible = splat._splat_views(
            xyz, rgb, poses, K, H, W, radius_m=radius, max_radius_px=cfg.max_splat_radius_px,
            depth_tol_m=cfg.splat_depth_tol_factor * radius, near_m=cfg.near_m, threads=cfg.threads)
        stats.update(candidates=len(poses), positions=1, coverage_estimate=None, fallback_camera=False)
    else:
        K = _as_stored(cameras.intrinsics(W, H, cfg.hfov_deg))
        w_low = cfg.candidate_width if kind == "mesh" else cfg.point_candidate_width
        h_low = max(1, round(w_low * H / W))
        K_low = cameras.intrinsics(w_low, h_low, cfg.hfov_deg)
        if kind == "mesh":
            if faces is None or len(faces) == 0:
                raise ValueError("kind='mesh' needs faces")
            faces = np.ascontiguousarray(faces, dtype=np.int32)
            raycaster = build_raycaster(xyz, faces)
            spacing = cameras.spacing_of_mesh(xyz, faces, rng)
            radius: float | np.ndarray = 0.0

            from scipy.spatial import cKDTree

            vertex_tree = cKDTree(xyz, balanced_tree=False, compact_nodes=False)

            def clearance(q: np.ndarray) -> np.ndarray:
                # distance to the nearest vertex, less half an edge: a lower bound of the distance
                # to the surface within the mesh's edge length (Open3D's exact distance query
                # builds a second BVH, which costs more than the whole camera choice)
                return vertex_tree.query(q, k=1, workers=-1)[0] - 0.5 * spacing
        else:
            from scipy.spatial import cKDTree

            tree = cKDTree(xyz, balanced_tree=False, compact_nodes=False)
            spacing = cameras.spacing_of_points(tree, xyz, rng)
            radius = (np.full(n_points, cfg.point_radius_m, np.float32) if cfg.point_radius_m > 0
                      else (cfg.point_radius_factor * local_spacing(xyz, tree=tree)).astype(np.float32))

            def clearance(q: np.ndarray) -> np.ndarray:
                return tree.query(q, k=1, workers=-1)[0]

            def low_depth(p: np.ndarray) -> np.ndarray:
                # at low resolution every point is about one pixel: the centre-pixel rule fills it
                return splat_depth(xyz, p, K_low, h_low, w_low, radius_m=radius,
                                   max_radius_px=1.0, near_m=cfg.near_m)

        positions, floor_z = candidate_positions(xyz, cfg, clearance, rng)
        fallback = len(positions) == 0
        if fallback:  # nothing is clear of surfaces: the centre of the footprint at eye height
            centre = np.sum(cameras.xy_bounds(xyz), axis=0) / 2
            positions = np.array([[centre[0], centre[1], floor_z + np.mean(cfg.eye_height_m)]])
        yaw = 2 * np.pi * np.arange(cfg.headings) / cfg.headings
        pitches = np.deg2rad(np.asarray(cfg.pitches_deg, dtype=np.float64))
        per_position = cfg.headings * len(pitches)
        cand = _as_stored(cameras.heading_grid(positions, yaw, pitches))
        sample_ids = np.sort(rng.choice(n_points, size=min(n_points, cfg.coverage_samples), replace=False))
        samples = xyz[sample_ids]
        if kind == "mesh":
            # exact occlusion: one ray from each position to each sample, then each candidate's frustum
            # (a low-resolution depth image misses thin occluders and overestimates coverage)
            low_hit, clear = cameras.probe_candidates(raycaster, K_low, h_low, w_low, cand, positions, samples,
                                                      cfg=cfg, reach=cameras.reach(xyz, cfg))
            rays_cast += low_hit.size + int(clear.any(1).sum()) * clear.shape[1]

            def score(sample_xyz: np.ndarray, clear_ps: np.ndarray) -> np.ndarray:
                seen_cs = np.zeros((len(cand), len(sample_xyz)), np.bool_)
                kernel = cameras._candidate_seen_par if use_parallel(seen_cs.size, cfg.threads) else cameras._candidate_seen_ser
                kernel(sample_xyz, cand, K, H, W, float(cfg.near_m), clear_ps, per_position, seen_cs)
                return seen_cs

            def rescore(sample_xyz: np.ndarray) -> tuple[np.ndarray, int]:
                clear_ps = np.zeros((len(positions), len(sample_xyz)), np.bool_)  # outside: sees nothing
                clear_ps[inside] = unoccluded_from(raycaster, positions[inside], sample_xyz, rel_tol=0.0,
                                                   abs_tol_m=cfg.visibility_tol_m, threads=cfg.threads)
                return score(sample_xyz, clear_ps), int(inside.sum()) * len(sample_xyz)

            seen = score(samples, clear)
        else:
            depth_low = low_depth(cand)
            low_hit = (depth_low > 0).reshape(len(cand), -1)

            def rescore(sample_xyz: np.ndarray) -> tuple[np.ndarray, int]:
                return sample_visibility(sample_xyz, cand, K_low, depth_low, rel_tol=cfg.occlusion_rel_tol,
                                         abs_tol_m=cfg.occlusion_abs_tol_m, near_m=cfg.near_m,
                                         threads=cfg.threads), 0

            seen, _ = rescore(samples)
        # positions looking mostly at nothing are outside the scan (behind a wall)
        hit_fraction = low_hit.reshape(len(positions), -1).mean(1)
        inside = hit_fraction >= cfg.min_hit_fraction
        if not inside.any():
            inside[int(np.argmax(hit_fraction))] = True
            fallback = True
        allowed = np.repeat(inside, per_position)
        # some points no candidate can see (floor under furniture, backs against walls): the
        # target is coverage_target of all points, or all the points some allowed candidate sees
        observable = seen[allowed].any(0)
        observable_fraction = float(observable.mean()) if len(observable) else 0.0
        target = min(cfg.coverage_target, observable_fraction)
        min_gain = max(1, int(np.ceil(cfg.min_view_gain * len(samples))))
        chosen, covered = greedy_cover(seen, max_views=cfg.max_views, target=target, allowed=allowed,
                                       min_gain=min_gain)
        if not chosen:  # nothing seen by the estimate: still give one view from the best position
            chosen = [int(np.argmax(np.where(allowed, low_hit.mean(1), -1)))]
        estimate = float(covered.mean()) if len(covered) else 0.0
        t_choose = time.perf_counter()

        def render(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
            if kind == "mesh":
                return raycast._mesh_views(xyz, rgb, faces, p, K, H, W, raycaster=raycaster,
                                           views_per_batch=cfg.views_per_batch, tol=tol,
                                           visibility_tol_m=cfg.visibility_tol_m, threads=cfg.threads)
            return (*splat._splat_views(xyz, rgb, p, K, H, W, radius_m=radius, max_radius_px=cfg.max_splat_radius_px,
                                        depth_tol_m=cfg.splat_depth_tol_factor * radius, near_m=cfg.near_m,
                                        threads=cfg.threads), 0)

        poses = cand[chosen]
        img_rgb, depth, index, visible, n_occ = render(poses)
        rays_cast += n_occ
        for _ in range(cfg.refine_rounds):
            seen_now = visible.any(0)
            n_seen = int(np.count_nonzero(seen_now))
            if n_seen >= target * n_points or len(chosen) >= cfg.max_views:
                break
            # what the full-size views really show replaces the estimate: a fresh sample of the
            # points they miss is scored against the candidates, and views chosen for it
            unseen_ids = np.flatnonzero(~seen_now)
            sub = np.sort(rng.choice(unseen_ids, size=min(len(unseen_ids), cfg.refine_samples), replace=False))
            seen_sub, n_probe = rescore(xyz[sub])
            rays_cast += n_probe
            weight = len(unseen_ids) / len(sub)  # points each sample stands for
            mask = allowed.copy()
            mask[chosen] = False
            want = (target * n_points - n_seen) / len(unseen_ids)  # share of the unseen still wanted
            extra, _ = greedy_cover(seen_sub, max_views=cfg.max_views - len(chosen), target=min(1.0, want),
                                    allowed=mask, min_gain=int(np.ceil(cfg.min_view_gain * n_points / weight)))
            if not extra:
                break
            more = render(cand[extra])
            rays_cast += more[4]
            img_rgb, depth, index, visible = (np.concatenate([a, b])
                                              for a, b in zip((img_rgb, depth, index, visible), more[:4]))
            chosen = chosen + extra
            poses = cand[chosen]
        stats.update(candidates=len(cand), positions=int(len(positions)), positions_inside=int(inside.sum()),
                     coverage_estimate=round(estimate, 4), observable_estimate=round(observable_fraction, 4),
                     fallback_camera=bool(fallback),
                     point_spacing_m=round(spacing, 4), floor_z=round(floor_z, 3))
    t_render = time.perf_counter()
    ptr, ids, view_count = visibility_csr(visible)
    n_recorded = visibility._count_recorded(index.reshape(-1), n_points)
    t_vis = time.perf_counter()
    n_views = len(poses)
    seen_points = view_count > 0
    rays_cast += index.size if kind == "mesh" else 0
    stats.update(
        views=n_views,
        coverage=round(float(seen_points.mean()) if n_points else 0.0, 4),
        coverage_pixels=round(n_recorded / n_points if n_points else 0.0, 4),
        views_per_seen_point=round(float(view_count[seen_points].mean()) if seen_points.any() else 0.0, 3),
        # depths are never negative: nonzero float16 bits are a depth > 0 (an integer test is faster)
        pixels_hit=round(np.count_nonzero(depth.view(np.uint16)) / max(depth.size, 1), 4),
        pixels_with_point=round(np.count_nonzero(index >= 0) / max(index.size, 1), 4),
        visible_entries=int(ptr[-1]),
        rays_cast=int(rays_cast),
        coverage_of_observable=(round(min(1.0, float(seen_points.mean()) / stats["observable_estimate"]), 4)
                                if stats.get("observable_estimate") else None),
        unseen=unseen_statistics(xyz, faces if kind == "mesh" else None, ~seen_points, floor_z=floor_z),
        seconds_choose=round(t_choose - t_start, 4),
        seconds_render=round(t_render - t_choose, 4),
        seconds_visibility=round(t_vis - t_render, 4),
    )
    return RenderResult(
        rgb=img_rgb, depth=depth, point_index=index,
        K=np.repeat(K[None].astype(np.float32), n_views, axis=0), pose=poses.astype(np.float32),
        visible_ptr=ptr, visible_ids=ids, view_count=view_count, stats=stats,
    )


def unseen_statistics(xyz: np.ndarray, faces: np.ndarray | None, unseen: np.ndarray, *,
                      floor_z: float | None) -> dict[str, Any]:
    """What stays unseen (JSON-safe): its share of the points and where it is.

    Keys: share; near_floor (of the unseen, the share within 0.25 m of the floor: under
    furniture); facing_down (meshes: the share whose normal points down, undersides of tables
    and shelves); facing_wall (meshes: horizontal normals, i.e. backs and sides against walls or
    other objects, and the inside of gaps).
    """
    n_unseen = int(np.count_nonzero(unseen))
    out: dict[str, Any] = {"points": n_unseen, "share": round(n_unseen / max(1, len(xyz)), 4)}
    if not n_unseen:
        return out
    pts = xyz[unseen]
    if floor_z is not None:
        out["near_floor"] = round(float(np.mean(pts[:, 2] < floor_z + 0.25)), 4)
    if faces is not None and len(faces):
        at = unseen[faces]
        touch = faces[at[:, 0] | at[:, 1] | at[:, 2]]  # only the faces at unseen vertices
        v = xyz.astype(np.float64)
        fn = np.cross(v[touch[:, 1]] - v[touch[:, 0]], v[touch[:, 2]] - v[touch[:, 0]])
        normal = np.zeros((len(xyz), 3))
        corners = touch.ravel()  # each face's normal onto its three corners
        for d in range(3):
            normal[:, d] = np.bincount(corners, weights=np.repeat(fn[:, d], 3), minlength=len(xyz))
        nz = normal[unseen, 2] / np.maximum(np.linalg.norm(normal[unseen], axis=1), 1e-12)
        out["facing_down"] = round(float(np.mean(nz < -0.5)), 4)
        out["facing_sideways"] = round(float(np.mean(np.abs(nz) <= 0.5)), 4)
    return out


def run_scene(store_path: str, scene_id: str, cfg: RenderConfig = RenderConfig(), force: bool = False) -> SceneResult:
    """Render one scene of a store (skipped when a complete render with the same config exists)."""
    from pipeline.store import Store

    store = Store.open(store_path)
    ingest = store.stage_record(scene_id, "ingest")
    if ingest is None:
        raise SceneError(scene_id, None, "not ingested (no ingest record); run `ws3d ingest` first")
    h = config_hash(cfg, str(ingest.get("config_hash")))
    if not force and store.is_complete(scene_id, STAGE, h):
        return SceneResult(scene_id, "skipped")
    ingest_stats = ingest.get("stats") or {}
    kind = ingest_stats.get("kind")
    if kind not in ("mesh", "points", "lidar"):
        raise SceneError(scene_id, None, f"ingest stats 'kind' must be mesh, points or lidar, got {kind!r}")
    if kind == "mesh" and not store.has(scene_id, schema.FACES):
        raise SceneError(scene_id, None, "kind is 'mesh' but the scene has no mesh/faces")
    # one read for all inputs; the labels only say which classes stay unseen
    wanted = [schema.XYZ, schema.RGB] + [schema.FACES] * (kind == "mesh")
    labelled = store.has(scene_id, schema.SEMANTIC)
    inputs = store.read_many(scene_id, wanted + [schema.SEMANTIC] * labelled)
    xyz, rgb = inputs[0], inputs[1]
    faces = inputs[2] if kind == "mesh" else None
    semantic = inputs[-1] if labelled else None
    if faces is not None and len(faces) == 0:
        raise SceneError(scene_id, None, "kind is 'mesh' but mesh/faces is empty")
    if len(xyz) == 0:
        raise SceneError(scene_id, None, "scene has no points")
    origin = ingest_stats.get("sensor_origin")
    result = render_scene(xyz, rgb, faces, kind=kind, cfg=cfg,
                          sensor_origin=None if origin is None else np.asarray(origin, dtype=np.float64))
    unseen = result.view_count == 0
    if unseen.any() and semantic is not None:  # which classes stay unseen
        classes = semantic[unseen][semantic[unseen] >= 0].astype(np.int64)
        if len(classes):
            counts = np.bincount(classes, minlength=len(store.class_names))
            share = counts / max(1, int(unseen.sum()))
            top = np.argsort(-counts, kind="stable")[:5]
            result.stats["unseen"]["by_class"] = {store.class_names[c]: round(float(share[c]), 4)
                                                  for c in top if counts[c] > 0}
    t0 = time.perf_counter()
    store.write_stage(scene_id, STAGE, result.arrays(),
                      record={"config": to_dict(cfg), "config_hash": h, "stats": result.stats})
    stats = dict(result.stats, seconds_write=round(time.perf_counter() - t0, 4))
    return SceneResult(scene_id, "done", stats=stats)


def summarise(store: Any) -> dict[str, Any]:
    """Render stats over a store's scenes for `ws3d info`: scenes rendered, views, mean coverage."""
    records = [r for s in store.scene_ids() if (r := store.stage_record(s, STAGE)) is not None]
    cover = [r["stats"]["coverage"] for r in records if "coverage" in r.get("stats", {})]
    views = [r["stats"]["views"] for r in records if "views" in r.get("stats", {})]
    return {
        "scenes_rendered": len(records),
        "views": int(sum(views)),
        "mean_coverage": round(float(np.mean(cover)), 4) if cover else None,
        "min_coverage": round(float(np.min(cover)), 4) if cover else None,
    }


__all__ = [
    "RenderConfig", "RenderResult", "build_raycaster", "cast", "cast_depth", "make_rays", "render_mesh_views",
    "splat_points", "splat_depth", "local_spacing", "visible_points", "visibility_csr", "mesh_visibility",
    "points_visibility", "exact_visible", "unoccluded_from", "sample_visibility", "greedy_cover",
    "candidate_positions", "render_scene", "run_scene", "summarise", "unseen_statistics", "PARALLEL_MIN_ITEMS",
]
