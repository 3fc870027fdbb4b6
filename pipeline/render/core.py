"""The render stage's pure core: choose cameras, render views, list what each view shows.

`render_scene(xyz, rgb, faces, kind=..., cfg=...)` does the whole stage for one scene on arrays (no
I/O; `pipeline.render.stage` reads and writes the store). Its steps are named functions of this
module, over the work of its siblings:

- `pipeline.render.cameras`: pinhole math and the camera choice. Indoors: positions on a grid at eye
  height in free space (>= `clearance_m` from every surface), `headings` headings at each of
  `pitches_deg`; positions whose tiny renders look mostly at nothing are outside the scan and
  dropped; a sample of points is scored against every candidate (meshes: one exact occlusion ray
  from each position to each sample; clouds: a depth test against low-resolution splats) and
  views are chosen greedily by newly seen samples until `coverage_target` of the observable
  points or `max_views`; rounds of refinement add views for what the full-size views missed.
  LiDAR: `lidar_headings` cameras at the sensor looking around.
- `pipeline.render.raycast`: meshes through Open3D's `RaycastingScene` (built once per scene, the rays
  of several views in one call); colour is the barycentric blend of the hit triangle's vertex
  colours; a pixel records the hit triangle's corner nearest to the surface point it sees that is
  visible in the view.
- `pipeline.render.splat`: point clouds by a numba z-buffer, splat radii from the local point spacing.
- `pipeline.render.visibility`: a mesh vertex is visible when the ray from the camera reaches it within
  `visibility_tol_m` (exact, occlusion-aware); a cloud point when it is not behind the z-buffer
  at its pixel by more than a tolerance from its local spacing. A pixel records a point only if
  it is visible, and a view's list holds all its visible points.
- `pipeline.parallel`: when the numba kernels use several threads.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numba
import numpy as np

from pipeline import schema
from pipeline.render import cameras, raycast, splat, visibility
from pipeline.render.cameras import candidate_positions, greedy_cover
from pipeline.render.config import RenderConfig
from pipeline.render.splat import local_spacing, splat_depth
from pipeline.render.visibility import sample_visibility, unoccluded_from, visibility_csr

Kind = Literal["mesh", "points", "lidar"]


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


@dataclass
class _Views:
    """Rendered views of a scene before the visibility lists: images, the visibility mask bool
    [V, N] they were drawn with, cameras, and what choosing them cost."""

    rgb: np.ndarray
    depth: np.ndarray
    index: np.ndarray
    visible: np.ndarray
    poses: np.ndarray
    K: np.ndarray
    rays_cast: int = 0
    floor_z: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    seconds_choose: float = 0.0

    def add(self, more: "_Views") -> None:
        """Append the views of `more` (same K)."""
        self.rgb, self.depth, self.index, self.visible, self.poses = (
            np.concatenate([a, b]) for a, b in zip((self.rgb, self.depth, self.index, self.visible, self.poses),
                                                   (more.rgb, more.depth, more.index, more.visible, more.poses)))
        self.rays_cast += more.rays_cast


def _as_stored(a: np.ndarray) -> np.ndarray:
    """Round cameras to the stored float32 before rendering, so the stored K and pose reproduce
    every projection the renderer made (the oracle tests rely on it)."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def render_scene(
    xyz: np.ndarray,
    rgb: np.ndarray,
    faces: np.ndarray | None,
    *,
    kind: Kind,
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


def _render_scene(xyz: np.ndarray, rgb: np.ndarray, faces: np.ndarray | None, kind: Kind, cfg: RenderConfig,
                  sensor_origin: np.ndarray | None) -> RenderResult:
    """`render_scene` on numba's current threads."""
    t_start = time.perf_counter()
    xyz = np.ascontiguousarray(xyz, dtype=np.float32)
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if kind == "lidar":
        views = lidar_views(xyz, rgb, cfg, sensor_origin)
    else:
        views = indoor_views(xyz, rgb, faces, kind, cfg)
    t_choose = t_start + views.seconds_choose
    t_render = time.perf_counter()
    ptr, ids, view_count = visibility_csr(views.visible)
    n_points = len(xyz)
    n_recorded = visibility.count_recorded(views.index.reshape(-1), n_points)
    t_vis = time.perf_counter()
    stats: dict[str, Any] = {"kind": kind, "points": n_points, **views.stats}
    n_views = len(views.poses)
    seen_points = view_count > 0
    rays_cast = views.rays_cast + (views.index.size if kind == "mesh" else 0)
    depth, index = views.depth, views.index
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
        unseen=unseen_statistics(xyz, faces if kind == "mesh" else None, ~seen_points, floor_z=views.floor_z),
        seconds_choose=round(t_choose - t_start, 4),
        seconds_render=round(t_render - t_choose, 4),
        seconds_visibility=round(t_vis - t_render, 4),
    )
    return RenderResult(
        rgb=views.rgb, depth=depth, point_index=index,
        K=np.repeat(views.K[None].astype(np.float32), n_views, axis=0), pose=views.poses.astype(np.float32),
        visible_ptr=ptr, visible_ids=ids, view_count=view_count, stats=stats,
    )


def lidar_views(xyz: np.ndarray, rgb: np.ndarray, cfg: RenderConfig, sensor_origin: np.ndarray | None) -> _Views:
    """LiDAR: `lidar_headings` cameras at the sensor, splats of an angular radius."""
    t0 = time.perf_counter()
    H, W = cfg.height, cfg.width
    origin = np.zeros(3) if sensor_origin is None else np.asarray(sensor_origin, dtype=np.float64)
    yaw = 2 * np.pi * np.arange(cfg.lidar_headings) / cfg.lidar_headings
    poses = _as_stored(cameras.heading_poses(origin, yaw, np.deg2rad(cfg.lidar_pitch_deg)))
    K = _as_stored(cameras.intrinsics(W, H, cfg.lidar_hfov_deg))
    ranges = np.linalg.norm(xyz - origin.astype(np.float32), axis=1)
    radius = (ranges * np.tan(np.deg2rad(cfg.lidar_angular_radius_deg))).astype(np.float32)
    seconds_choose = time.perf_counter() - t0
    img_rgb, depth, index, visible = splat.splat_views(
        xyz, rgb, poses, K, H, W, radius_m=radius, max_radius_px=cfg.max_splat_radius_px,
        depth_tol_m=cfg.splat_depth_tol_factor * radius, near_m=cfg.near_m, threads=cfg.threads)
    return _Views(img_rgb, depth, index, visible, poses, K, seconds_choose=seconds_choose,
                  stats=dict(candidates=len(poses), positions=1, coverage_estimate=None, fallback_camera=False))


class _IndoorScene:
    """What the indoor camera choice asks of a scene, for a mesh (ray cast, scored by exact
    occlusion rays) or a cloud (splatted, scored by a depth test against low-resolution splats):
    the distance of a candidate position to the surface, how candidates see a sample of points,
    and full-size renders. Drawing from `rng` in the same order as the stage always has."""

    def __init__(self, xyz: np.ndarray, rgb: np.ndarray, faces: np.ndarray | None, kind: Kind, cfg: RenderConfig,
                 rng: np.random.Generator):
        from scipy.spatial import cKDTree

        self.xyz, self.rgb, self.kind, self.cfg = xyz, rgb, kind, cfg
        self.H, self.W = cfg.height, cfg.width
        self.K = _as_stored(cameras.intrinsics(self.W, self.H, cfg.hfov_deg))
        self.w_low = cfg.candidate_width if kind == "mesh" else cfg.point_candidate_width
        self.h_low = max(1, round(self.w_low * self.H / self.W))
        self.K_low = cameras.intrinsics(self.w_low, self.h_low, cfg.hfov_deg)
        self.tol = (float(cfg.occlusion_rel_tol), float(cfg.occlusion_abs_tol_m), float(cfg.near_m))
        self.inside: np.ndarray | None = None
        self.depth_low: np.ndarray | None = None
        if kind == "mesh":
            if faces is None or len(faces) == 0:
                raise ValueError("kind='mesh' needs faces")
            self.faces = np.ascontiguousarray(faces, dtype=np.int32)
            self.raycaster = raycast.build_raycaster(xyz, self.faces)
            self.spacing = cameras.spacing_of_mesh(xyz, self.faces, rng)
            self.radius: float | np.ndarray = 0.0
            self.tree = cKDTree(xyz, balanced_tree=False, compact_nodes=False)
        else:
            self.faces, self.raycaster = None, None
            self.tree = cKDTree(xyz, balanced_tree=False, compact_nodes=False)
            self.spacing = cameras.spacing_of_points(self.tree, xyz, rng)
            self.radius = (np.full(len(xyz), cfg.point_radius_m, np.float32) if cfg.point_radius_m > 0
                           else (cfg.point_radius_factor * local_spacing(xyz, tree=self.tree)).astype(np.float32))

    def clearance(self, q: np.ndarray) -> np.ndarray:
        """Metres from positions q [P, 3] to the surface (meshes: to the nearest vertex less half an
        edge, a lower bound within the mesh's edge length; Open3D's exact distance query builds a
        second BVH, which costs more than the whole camera choice)."""
        dist = self.tree.query(q, k=1, workers=-1)[0]
        return dist - 0.5 * self.spacing if self.kind == "mesh" else dist

    def probe(self, cand: np.ndarray, positions: np.ndarray, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """First look at the candidates [C, 4, 4]: which low-resolution pixels hit a surface
        (bool [C, h_low * w_low]), which samples each sees (bool [C, S]), and the rays cast."""
        cfg = self.cfg
        if self.kind == "mesh":
            # exact occlusion: one ray from each position to each sample, then each candidate's frustum
            # (a low-resolution depth image misses thin occluders and overestimates coverage)
            low_hit, clear = cameras.probe_candidates(self.raycaster, self.K_low, self.h_low, self.w_low, cand,
                                                      positions, samples, cfg=cfg, reach=cameras.reach(self.xyz, cfg))
            rays = low_hit.size + int(clear.any(1).sum()) * clear.shape[1]
            return low_hit, self._seen(cand, samples, clear), rays
        # at low resolution every point is about one pixel: the centre-pixel rule fills it
        self.depth_low = splat_depth(self.xyz, cand, self.K_low, self.h_low, self.w_low, radius_m=self.radius,
                                     max_radius_px=1.0, near_m=cfg.near_m)
        low_hit = (self.depth_low > 0).reshape(len(cand), -1)
        seen, _ = self.rescore(cand, positions, samples)
        return low_hit, seen, 0

    def _seen(self, cand: np.ndarray, sample_xyz: np.ndarray, clear: np.ndarray) -> np.ndarray:
        per_position = self.cfg.headings * len(self.cfg.pitches_deg)
        return cameras.candidate_seen(sample_xyz, cand, self.K, self.H, self.W, near_m=self.cfg.near_m, clear=clear,
                                      per_position=per_position, threads=self.cfg.threads)

    def rescore(self, cand: np.ndarray, positions: np.ndarray, sample_xyz: np.ndarray) -> tuple[np.ndarray, int]:
        """Which of a fresh sample [S, 3] each candidate sees, and the rays cast for it."""
        cfg = self.cfg
        if self.kind == "mesh":
            inside = self.inside
            clear = np.zeros((len(positions), len(sample_xyz)), np.bool_)  # outside: sees nothing
            clear[inside] = unoccluded_from(self.raycaster, positions[inside], sample_xyz, rel_tol=0.0,
                                            abs_tol_m=cfg.visibility_tol_m, threads=cfg.threads)
            return self._seen(cand, sample_xyz, clear), int(inside.sum()) * len(sample_xyz)
        return sample_visibility(sample_xyz, cand, self.K_low, self.depth_low, rel_tol=cfg.occlusion_rel_tol,
                                 abs_tol_m=cfg.occlusion_abs_tol_m, near_m=cfg.near_m, threads=cfg.threads), 0

    def render(self, poses: np.ndarray) -> _Views:
        """Full-size views from `poses` [V, 4, 4] with the visibility mask they were drawn with."""
        cfg = self.cfg
        if self.kind == "mesh":
            img, depth, index, visible, n_occ = raycast.mesh_views(
                self.xyz, self.rgb, self.faces, poses, self.K, self.H, self.W, raycaster=self.raycaster,
                views_per_batch=cfg.views_per_batch, tol=self.tol, visibility_tol_m=cfg.visibility_tol_m,
                threads=cfg.threads)
        else:
            img, depth, index, visible = splat.splat_views(
                self.xyz, self.rgb, poses, self.K, self.H, self.W, radius_m=self.radius,
                max_radius_px=cfg.max_splat_radius_px, depth_tol_m=cfg.splat_depth_tol_factor * self.radius,
                near_m=cfg.near_m, threads=cfg.threads)
            n_occ = 0
        return _Views(img, depth, index, visible, poses, self.K, rays_cast=n_occ)


def indoor_views(xyz: np.ndarray, rgb: np.ndarray, faces: np.ndarray | None, kind: Kind, cfg: RenderConfig) -> _Views:
    """Indoors (a mesh or a cloud): candidate cameras in the free space of the room, a greedy cover
    of a sample of the points, full-size renders, then rounds of views for what they missed."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    n_points = len(xyz)
    scene = _IndoorScene(xyz, rgb, faces, kind, cfg, rng)
    positions, floor_z = candidate_positions(xyz, cfg, scene.clearance, rng)
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
    low_hit, seen, rays_cast = scene.probe(cand, positions, samples)
    # positions looking mostly at nothing are outside the scan (behind a wall)
    hit_fraction = low_hit.reshape(len(positions), -1).mean(1)
    inside = hit_fraction >= cfg.min_hit_fraction
    if not inside.any():
        inside[int(np.argmax(hit_fraction))] = True
        fallback = True
    scene.inside = inside
    allowed = np.repeat(inside, per_position)
    # some points no candidate can see (floor under furniture, backs against walls): the
    # target is coverage_target of all points, or all the points some allowed candidate sees
    observable = seen[allowed].any(0)
    observable_fraction = float(observable.mean()) if len(observable) else 0.0
    target = min(cfg.coverage_target, observable_fraction)
    min_gain = max(1, int(np.ceil(cfg.min_view_gain * len(samples))))
    chosen, covered = greedy_cover(seen, max_views=cfg.max_views, target=target, allowed=allowed, min_gain=min_gain)
    if not chosen:  # nothing seen by the estimate: still give one view from the best position
        chosen = [int(np.argmax(np.where(allowed, low_hit.mean(1), -1)))]
    estimate = float(covered.mean()) if len(covered) else 0.0
    seconds_choose = time.perf_counter() - t0

    views = scene.render(cand[chosen])
    views.rays_cast += rays_cast
    refine_views(views, scene, cand, positions, allowed, chosen, target, rng)
    views.floor_z, views.seconds_choose = floor_z, seconds_choose
    views.stats = dict(candidates=len(cand), positions=int(len(positions)), positions_inside=int(inside.sum()),
                       coverage_estimate=round(estimate, 4), observable_estimate=round(observable_fraction, 4),
                       fallback_camera=bool(fallback), point_spacing_m=round(scene.spacing, 4), floor_z=round(floor_z, 3))
    return views


def refine_views(views: _Views, scene: _IndoorScene, cand: np.ndarray, positions: np.ndarray, allowed: np.ndarray,
                 chosen: list[int], target: float, rng: np.random.Generator) -> None:
    """Up to `refine_rounds` rounds: what the full-size views really show replaces the estimate; a
    fresh sample of the points they miss is scored against the candidates, and views are chosen
    for it (the first sample's greedy choice overfits it). Adds to `views` and `chosen` in place."""
    cfg = scene.cfg
    n_points = len(scene.xyz)
    for _ in range(cfg.refine_rounds):
        seen_now = views.visible.any(0)
        n_seen = int(np.count_nonzero(seen_now))
        if n_seen >= target * n_points or len(chosen) >= cfg.max_views:
            break
        unseen_ids = np.flatnonzero(~seen_now)
        sub = np.sort(rng.choice(unseen_ids, size=min(len(unseen_ids), cfg.refine_samples), replace=False))
        seen_sub, n_probe = scene.rescore(cand, positions, scene.xyz[sub])
        views.rays_cast += n_probe
        weight = len(unseen_ids) / len(sub)  # points each sample stands for
        mask = allowed.copy()
        mask[chosen] = False
        want = (target * n_points - n_seen) / len(unseen_ids)  # share of the unseen still wanted
        extra, _ = greedy_cover(seen_sub, max_views=cfg.max_views - len(chosen), target=min(1.0, want),
                                allowed=mask, min_gain=int(np.ceil(cfg.min_view_gain * n_points / weight)))
        if not extra:
            break
        views.add(scene.render(cand[extra]))
        chosen.extend(extra)


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
