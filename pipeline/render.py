"""The render stage: 2D views of each scan with the exact point shown by every pixel.

Reads (ingest): `points/xyz`, `points/rgb`, `mesh/faces` (meshes only) and the ingest record's
stats (`kind`: "mesh" | "points" | "lidar", optional `sensor_origin`).
Writes (`views/`): rgb u8 [V,H,W,3], depth f16 [V,H,W] (z-depth in metres, 0 = nothing),
point_index i32 [V,H,W] (-1 = nothing), K [V,3,3], pose [V,4,4] (world->camera, OpenCV),
the visible point ids of each view as CSR (visible_ptr, visible_ids), per-point view counts,
and coverage statistics in the stage record.

How:
- Meshes are ray cast with Open3D's `RaycastingScene` (Embree on the CPU; no display, no
  OffscreenRenderer), built once per scene; the rays of several views go in one `cast_rays`
  call. Colour is the barycentric interpolation of the hit triangle's vertex colours; the point
  a pixel shows is the hit triangle's vertex with the largest barycentric weight (the next ones
  if that vertex is itself not visible in the view).
- Point clouds (S3DIS, LiDAR) are splatted by a numba z-buffer: each point a disc whose pixel
  radius is its world radius over its depth; the nearest depth wins each pixel.
- Visibility, one rule everywhere: a point is visible in a view when it projects into the image
  and is not behind the view's stored depth at its own pixel (within `occlusion_*_tol`). A
  pixel records a point only if it is visible, and a view's visible list holds all its visible
  points (so also points too small to win a pixel of their own): the 2D-3D correspondence is
  exact and occlusion-aware, which the tests check from the stored arrays alone.
- Cameras indoors: positions on a grid at eye height (1.2-1.6 m above the floor) in free space
  (>= `clearance_m` from every surface), `headings` headings each with a slight downward pitch.
  Positions whose tiny renders look mostly at nothing are outside the scan and dropped. A sample
  of points is tested against every candidate (meshes: one occlusion ray from each position to
  each sample, in the same `test_occlusions` call as the tiny renders' rays; point clouds: a depth
  test against low-resolution splats), and views are chosen greedily by
  newly seen samples until `coverage_target` of the observable points or `max_views`; one more
  greedy round can add views for what the full-size views missed. LiDAR: `lidar_headings`
  cameras at the sensor looking around.
- Speed (the bench compares the whole stage with a bare build + `cast_rays` of its rays): few
  calls into Open3D (the scene's BVH is built once, by the first query), one fused numba pass for
  colour and point index, and numba kernels that stay on one thread below `PARALLEL_MIN_ITEMS`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numba
import numpy as np
from numba import njit, prange

from pipeline import cameras, schema
from pipeline.config import config_hash, to_dict
from pipeline.executor import SceneResult
from pipeline.readers.base import SceneError

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
    max_views: int = 24
    """Most views per indoor scene."""
    coverage_target: float = 0.95
    """Stop adding indoor views once this fraction of the observable points is seen (observable:
    seen by some candidate; points under furniture or against walls no eye-height camera sees)."""
    eye_height_m: tuple[float, float] = (1.2, 1.6)
    """Range of camera heights above the floor (each candidate position draws one)."""
    clearance_m: float = 0.3
    """Candidate positions keep at least this distance from every surface."""
    headings: int = 8
    """Headings per candidate position, evenly spaced around the vertical."""
    pitch_deg: float = -15.0
    """Pitch of indoor cameras (negative = looking down)."""
    grid_step_m: float = 0.5
    """Finest spacing of the candidate position grid (coarser in big scenes, see max_positions)."""
    max_positions: int = 32
    """Most candidate positions per scene (spread out by farthest-point sampling)."""
    candidate_width: int = 8
    """Meshes: width of the tiny candidate renders (height keeps the aspect) that find positions
    outside the scan (see min_hit_fraction). Candidates are scored exactly, by casting a ray
    from each position to each sampled point."""
    point_candidate_width: int = 64
    """Point clouds: width of the candidate renders that find positions outside the scan and
    score candidates by a depth test of the sampled points."""
    min_hit_fraction: float = 0.6
    """A position whose candidates' pixels hit a surface less often than this is outside the
    scan (e.g. beyond a wall) and is dropped."""
    coverage_samples: int = 2048
    """Points sampled to score candidates and estimate coverage during the greedy choice."""
    refine_rounds: int = 1
    """After rendering, rounds of extra views chosen against what the full-size views missed."""
    floor_percentile: float = 1.0
    """The floor height is this percentile of the points' z."""
    lidar_headings: int = 6
    """Cameras at a LiDAR sensor, evenly spaced in heading."""
    lidar_hfov_deg: float = 90.0
    """Horizontal field of view of LiDAR cameras (degrees)."""
    lidar_pitch_deg: float = -10.0
    """Pitch of LiDAR cameras: a scanner sees about +2..-25 degrees, so look slightly down."""
    point_radius_m: float = 0.0
    """World radius of an indoor point's splat; 0 = `point_radius_factor` x the median spacing."""
    point_radius_factor: float = 2.0
    """Automatic splat radius in median nearest-neighbour spacings: irregular (scanned, sampled)
    clouds leave holes at 1x, through which hidden surfaces would show."""
    lidar_angular_radius_deg: float = 0.35
    """A LiDAR point's splat radius as an angle seen from the sensor (beams are ~0.2-0.4 deg apart)."""
    max_splat_radius_px: float = 8.0
    """Largest splat radius in pixels (points very close to a camera)."""
    occlusion_rel_tol: float = 0.02
    """A recorded point may lie behind the depth at its own pixel by this fraction of that depth..."""
    occlusion_abs_tol_m: float = 0.02
    """...plus this many metres (covers grazing surfaces and float16 depth)."""
    near_m: float = 0.05
    """Nothing nearer than this to a camera is drawn."""
    views_per_batch: int = 8
    """Views cast in one `cast_rays` call (bounds memory: ~56 bytes a pixel in flight)."""
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


# --- numba kernels ------------------------------------------------------------------------------
# No fastmath: the splatting kernel must agree bit for bit with its numpy oracle.
#
# The per-pixel and per-point kernels come in pairs, a serial and a parallel driver around one
# inlined body: starting a parallel region costs ~0.05 ms on an idle machine but up to a scheduler
# time slice (~10 ms) when the cores are shared with other work, which is about what a serial pass
# over a few hundred thousand items takes (`_parallel` picks). (One Python function compiled both
# ways would share numba's on-disk cache entry, so the drivers are separate functions.)

PARALLEL_MIN_ITEMS = 1 << 20
"""Kernels over fewer items (pixels, point x view tests) than this run on one thread: on two
shared cores the break-even of the parallel variants is between ~0.4 and 1 million items (five
320x240 views are 384k pixels; 24 views 1.8 million)."""


def _parallel(items: int, threads: int) -> bool:
    """Whether a kernel over `items` items should run on several threads (`threads`: the config's)."""
    return threads != 1 and numba.get_num_threads() > 1 and items >= PARALLEL_MIN_ITEMS


@njit(inline="always")
def _ray_row(K, poses, height, width, vr, rays):
    """Rays of image row vr = view * H + row: rays[vr * W + col] = (camera centre,
    R^T K^-1 (col, row, 1)), for col in [0, W)."""
    v = vr // height
    y = (np.float64(vr - v * height) - K[1, 2]) / K[1, 1]
    c0 = -(poses[v, 0, 0] * poses[v, 0, 3] + poses[v, 1, 0] * poses[v, 1, 3] + poses[v, 2, 0] * poses[v, 2, 3])
    c1 = -(poses[v, 0, 1] * poses[v, 0, 3] + poses[v, 1, 1] * poses[v, 1, 3] + poses[v, 2, 1] * poses[v, 2, 3])
    c2 = -(poses[v, 0, 2] * poses[v, 0, 3] + poses[v, 1, 2] * poses[v, 1, 3] + poses[v, 2, 2] * poses[v, 2, 3])
    q = vr * width
    for col in range(width):
        x = (np.float64(col) - K[0, 2]) / K[0, 0]
        rays[q, 0] = c0
        rays[q, 1] = c1
        rays[q, 2] = c2
        for k in range(3):  # direction R^T (x, y, 1)
            rays[q, 3 + k] = poses[v, 0, k] * x + poses[v, 1, k] * y + poses[v, 2, k]
        q += 1


@njit(parallel=True, cache=True)
def _make_rays_par(K, poses, height, width, rays):  # pragma: no cover - numba
    """`_ray_row` for every row of every view: rays float32 [V * H * W, 6]."""
    for vr in prange(poses.shape[0] * height):  # one parallel loop: few thread launches
        _ray_row(K, poses, height, width, vr, rays)


@njit(cache=True)
def _make_rays_ser(K, poses, height, width, rays):  # pragma: no cover - numba
    """Serial `_make_rays_par`."""
    for vr in range(poses.shape[0] * height):
        _ray_row(K, poses, height, width, vr, rays)


@njit(inline="always")
def _visible_at_own_pixel(x, y, z, poses, v, K, depth_q, base, height, width, rel, abs_tol, near):
    """True if world point (x, y, z) projects into view v's image and is not behind the depth
    there. (poses and v, not poses[v]: a slice in a parallel loop costs atomic refcounting.)"""
    cx = poses[v, 0, 0] * x + poses[v, 0, 1] * y + poses[v, 0, 2] * z + poses[v, 0, 3]
    cy = poses[v, 1, 0] * x + poses[v, 1, 1] * y + poses[v, 1, 2] * z + poses[v, 1, 3]
    cz = poses[v, 2, 0] * x + poses[v, 2, 1] * y + poses[v, 2, 2] * z + poses[v, 2, 3]
    if cz <= near:
        return False
    col = math.floor(K[0, 0] * cx / cz + K[0, 2] + 0.5)
    row = math.floor(K[1, 1] * cy / cz + K[1, 2] + 0.5)
    if col < 0 or col >= width or row < 0 or row >= height:
        return False
    d = depth_q[base + row * width + col]
    return d <= 0.0 or cz <= d * (1.0 + rel) + abs_tol


@njit(inline="always")
def _visible_point(i, xyz, poses, K, depth_q, height, width, rel, abs_tol, near, mask):
    """mask[v, i] for every view v (`_visible_at_own_pixel` on depth_q [V * H * W])."""
    x = np.float64(xyz[i, 0])
    y = np.float64(xyz[i, 1])
    z = np.float64(xyz[i, 2])
    hw = height * width
    for v in range(poses.shape[0]):
        mask[v, i] = _visible_at_own_pixel(x, y, z, poses, v, K, depth_q, v * hw, height, width, rel, abs_tol, near)


@njit(parallel=True, cache=True)
def _visible_mask_par(xyz, poses, K, depth_q, height, width, rel, abs_tol, near, mask):  # pragma: no cover
    """mask[v, i] (bool [V, N]): point i projects into view v's image and is not hidden behind the
    depth at its pixel. Parallel over points: balanced even with few views."""
    for i in prange(xyz.shape[0]):
        _visible_point(i, xyz, poses, K, depth_q, height, width, rel, abs_tol, near, mask)


@njit(cache=True)
def _visible_mask_ser(xyz, poses, K, depth_q, height, width, rel, abs_tol, near, mask):  # pragma: no cover
    """Serial `_visible_mask_par`."""
    for i in range(xyz.shape[0]):
        _visible_point(i, xyz, poses, K, depth_q, height, width, rel, abs_tol, near, mask)


@njit(inline="always")
def _shade_assign_pixel(p, view, t_hit, prim, uvs, depth_q, faces, rgb, visible, out_rgb, out_index):
    """Pixel p of a batch: the barycentric colour of the hit (black on a miss), and the hit
    triangle's corner with the largest barycentric weight that is visible in the pixel's view
    (visible[view, vertex]), else the next; -1 if none or nothing drawn."""
    out_index[p] = -1
    if not np.isfinite(t_hit[p]):
        out_rgb[p, 0] = 0
        out_rgb[p, 1] = 0
        out_rgb[p, 2] = 0
        return
    f = prim[p]
    a = faces[f, 0]
    b = faces[f, 1]
    c = faces[f, 2]
    u = uvs[p, 0]
    v = uvs[p, 1]
    w = 1.0 - u - v
    for ch in range(3):
        val = w * rgb[a, ch] + u * rgb[b, ch] + v * rgb[c, ch] + 0.5
        out_rgb[p, ch] = np.uint8(min(255.0, max(0.0, val)))
    if depth_q[p] <= 0.0:
        return
    wb = np.float64(u)
    wc = np.float64(v)
    wa = 1.0 - wb - wc
    # the corners by barycentric weight, descending, ties in the face's order; the first without
    # branches (the order is random from pixel to pixel, so branches would mispredict)
    b_wins = wb > wa
    i01 = b if b_wins else a
    w01 = wb if b_wins else wa
    i0 = c if wc > w01 else i01
    if visible[view, i0]:
        out_index[p] = i0
        return
    if wa >= wb:
        if wa >= wc:
            i1, i2 = (c, b) if wc > wb else (b, c)
        else:
            i1, i2 = a, b
    elif wb >= wc:
        i1, i2 = (c, a) if wc > wa else (a, c)
    else:
        i1, i2 = b, a
    if visible[view, i1]:
        out_index[p] = i1
    elif visible[view, i2]:
        out_index[p] = i2


@njit(parallel=True, cache=True)
def _shade_assign_par(t_hit, prim, uvs, depth_q, faces, rgb, visible, height, width, out_rgb, out_index):
    """`_shade_assign_pixel` for every pixel of a batch of views [V * H * W], a row at a time."""
    for r in prange(t_hit.shape[0] // width):
        view = r // height
        for p in range(r * width, (r + 1) * width):
            _shade_assign_pixel(p, view, t_hit, prim, uvs, depth_q, faces, rgb, visible, out_rgb, out_index)


@njit(cache=True)
def _shade_assign_ser(t_hit, prim, uvs, depth_q, faces, rgb, visible, height, width, out_rgb, out_index):
    """Serial `_shade_assign_par`."""
    hw = height * width
    for view in range(t_hit.shape[0] // hw):
        for p in range(view * hw, (view + 1) * hw):
            _shade_assign_pixel(p, view, t_hit, prim, uvs, depth_q, faces, rgb, visible, out_rgb, out_index)


@njit(parallel=True, cache=True)
def _splat_kernel(xyz, radius_m, poses, K, height, width, max_radius_px, near, zbuf, index):  # pragma: no cover
    """Z-buffer splatting, one view per thread (no races): nearest float32 depth wins, ties to the
    lower point id. Points whose centre falls outside the image are skipped (their recorded pixel
    would not project into the image)."""
    f = K[0, 0]
    for v in prange(poses.shape[0]):
        pose = poses[v]
        for r in range(height):
            for c in range(width):
                zbuf[v, r, c] = np.inf
                index[v, r, c] = -1
        for i in range(xyz.shape[0]):
            x = np.float64(xyz[i, 0])
            y = np.float64(xyz[i, 1])
            z = np.float64(xyz[i, 2])
            cx = pose[0, 0] * x + pose[0, 1] * y + pose[0, 2] * z + pose[0, 3]
            cy = pose[1, 0] * x + pose[1, 1] * y + pose[1, 2] * z + pose[1, 3]
            cz = pose[2, 0] * x + pose[2, 1] * y + pose[2, 2] * z + pose[2, 3]
            if cz <= near:
                continue
            u = K[0, 0] * cx / cz + K[0, 2]
            w = K[1, 1] * cy / cz + K[1, 2]
            cu = math.floor(u + 0.5)
            cv = math.floor(w + 0.5)
            if cu < 0 or cu >= width or cv < 0 or cv >= height:
                continue
            z32 = np.float32(cz)
            rp = f * np.float64(radius_m[i]) / cz
            if rp > max_radius_px:
                rp = max_radius_px
            if z32 < zbuf[v, cv, cu]:
                zbuf[v, cv, cu] = z32
                index[v, cv, cu] = i
            r0 = max(0, math.ceil(w - rp))
            r1 = min(height - 1, math.floor(w + rp))
            c0 = max(0, math.ceil(u - rp))
            c1 = min(width - 1, math.floor(u + rp))
            rr = rp * rp
            for row in range(r0, r1 + 1):
                dy = row - w
                for col in range(c0, c1 + 1):
                    dx = col - u
                    if dx * dx + dy * dy <= rr and z32 < zbuf[v, row, col]:
                        zbuf[v, row, col] = z32
                        index[v, row, col] = i


@njit(cache=True)
def _keep_visible(index, visible, hw):  # pragma: no cover
    """Drop (set to -1) pixels whose recorded point is not visible in their view (hidden at its
    own pixel): visible[view, point] from `_visible_mask`."""
    for p in range(index.shape[0]):
        i = index[p]
        if i >= 0 and not visible[p // hw, i]:
            index[p] = -1


@njit(inline="always")
def _candidate_seen_row(c, xyz, poses, K, height, width, near, clear, per_position, seen):
    p = c // per_position
    for s in range(xyz.shape[0]):
        if not clear[p, s]:
            continue
        x = np.float64(xyz[s, 0])
        y = np.float64(xyz[s, 1])
        z = np.float64(xyz[s, 2])
        cz = poses[c, 2, 0] * x + poses[c, 2, 1] * y + poses[c, 2, 2] * z + poses[c, 2, 3]
        if cz <= near:
            continue
        cx = poses[c, 0, 0] * x + poses[c, 0, 1] * y + poses[c, 0, 2] * z + poses[c, 0, 3]
        cy = poses[c, 1, 0] * x + poses[c, 1, 1] * y + poses[c, 1, 2] * z + poses[c, 1, 3]
        col = math.floor(K[0, 0] * cx / cz + K[0, 2] + 0.5)
        row = math.floor(K[1, 1] * cy / cz + K[1, 2] + 0.5)
        seen[c, s] = col >= 0 and col < width and row >= 0 and row < height


@njit(parallel=True, cache=True)
def _candidate_seen_par(xyz, poses, K, height, width, near, clear, per_position, seen):  # pragma: no cover
    """seen[c, s] (zeroed by the caller): sample s is unoccluded from candidate c's position
    (clear[c // per_position, s]) and projects into c's image in front of the near plane."""
    for c in prange(poses.shape[0]):
        _candidate_seen_row(c, xyz, poses, K, height, width, near, clear, per_position, seen)


@njit(cache=True)
def _candidate_seen_ser(xyz, poses, K, height, width, near, clear, per_position, seen):  # pragma: no cover
    """Serial `_candidate_seen_par`."""
    for c in range(poses.shape[0]):
        _candidate_seen_row(c, xyz, poses, K, height, width, near, clear, per_position, seen)


@njit(cache=True)
def _segment_rays_kernel(eyes, samples, rel, abs_tol, rays, near):  # pragma: no cover
    """See `_segment_rays` (serial: a few ten thousand rays)."""
    n_s = samples.shape[0]
    for e in range(eyes.shape[0]):
        for s in range(n_s):
            q = e * n_s + s
            d0 = np.float64(samples[s, 0]) - eyes[e, 0]
            d1 = np.float64(samples[s, 1]) - eyes[e, 1]
            d2 = np.float64(samples[s, 2]) - eyes[e, 2]
            dist = math.sqrt(d0 * d0 + d1 * d1 + d2 * d2)
            t_clear = (dist - abs_tol) / (dist * (1.0 + rel)) if dist > 0.0 else 0.0
            near[e, s] = not t_clear > 0.0
            scale = 1.0 if near[e, s] else t_clear
            rays[q, 0] = eyes[e, 0]
            rays[q, 1] = eyes[e, 1]
            rays[q, 2] = eyes[e, 2]
            rays[q, 3] = d0 * scale
            rays[q, 4] = d1 * scale
            rays[q, 5] = d2 * scale


@njit(cache=True)
def _fill_csr(visible, ptr, ids, counts):  # pragma: no cover
    """ids[ptr[v]:ptr[v + 1]] = the ids i with visible[v, i], ascending; counts[i] += views of i."""
    for v in range(visible.shape[0]):  # serial: memory-bound, and a parallel region costs more
        k = ptr[v]
        for i in range(visible.shape[1]):
            if visible[v, i]:
                ids[k] = i
                counts[i] += 1
                k += 1


@njit(cache=True)
def _count_recorded(index, n_points):  # pragma: no cover
    """How many distinct points the pixels record (index int32 [P], -1 = none)."""
    mark = np.zeros(n_points, np.bool_)
    n = 0
    for p in range(index.shape[0]):
        i = index[p]
        if i >= 0 and not mark[i]:
            mark[i] = True
            n += 1
    return n


def _make_rays(K: np.ndarray, poses: np.ndarray, height: int, width: int, rays: np.ndarray, threads: int) -> None:
    """Fill rays float32 [V * H * W, 6] (see `make_rays`); K, poses float64, contiguous."""
    kernel = _make_rays_par if _parallel(rays.shape[0], threads) else _make_rays_ser
    kernel(K, poses, height, width, rays)


def _visible_mask(xyz: np.ndarray, poses: np.ndarray, K: np.ndarray, depth_q: np.ndarray, height: int, width: int,
                  tol: tuple[float, float, float], threads: int, out: np.ndarray | None = None) -> np.ndarray:
    """bool [V, N]: point i projects into view v's image and is not hidden behind the depth at its
    pixel. xyz float32 [N, 3]; poses, K float64; depth_q float32 [V * H * W] (the stored depth);
    tol = (rel, abs, near)."""
    mask = np.empty((len(poses), len(xyz)), np.bool_) if out is None else out
    kernel = _visible_mask_par if _parallel(mask.size, threads) else _visible_mask_ser
    kernel(xyz, poses, K, depth_q, height, width, *tol, mask)
    return mask


# --- pure cores ---------------------------------------------------------------------------------


def build_raycaster(xyz: np.ndarray, faces: np.ndarray) -> Any:
    """An Open3D `RaycastingScene` holding one triangle mesh (build once per scene).

    Args:
        xyz: float [N, 3] vertices; faces: int [F, 3] vertex ids.
    """
    import open3d as o3d

    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(
        o3d.core.Tensor(np.ascontiguousarray(xyz, dtype=np.float32)),
        o3d.core.Tensor(np.ascontiguousarray(faces, dtype=np.uint32)),
    )
    return scene


def cast(raycaster: Any, rays: np.ndarray, *, threads: int = 0) -> dict[str, np.ndarray]:
    """Cast float32 rays [R, 6]; returns NumPy t_hit [R] (inf = miss), primitive_ids [R],
    primitive_uvs [R, 2] (hit = (1-u-v) v0 + u v1 + v v2)."""
    import open3d as o3d

    out = raycaster.cast_rays(o3d.core.Tensor.from_numpy(np.ascontiguousarray(rays)), nthreads=threads)
    return {k: out[k].numpy() for k in ("t_hit", "primitive_ids", "primitive_uvs")}


def make_rays(K: np.ndarray, poses: np.ndarray, height: int, width: int, *, threads: int = 0) -> np.ndarray:
    """`cameras.pixel_rays` computed by a numba kernel: float32 [V, H * W, 6]."""
    poses = np.ascontiguousarray(poses, dtype=np.float64)
    rays = np.empty((len(poses), height * width, 6), np.float32)
    _make_rays(np.ascontiguousarray(K, dtype=np.float64), poses, height, width, rays.reshape(-1, 6), threads)
    return rays


def cast_depth(raycaster: Any, K: np.ndarray, poses: np.ndarray, height: int, width: int, *,
               threads: int = 0) -> np.ndarray:
    """z-depth images float32 [V, H, W] (0 = miss) of all `poses` [V, 4, 4] in one cast."""
    t = cast(raycaster, make_rays(K, poses, height, width, threads=threads).reshape(-1, 6), threads=threads)["t_hit"]
    return np.where(np.isfinite(t), t, 0.0).astype(np.float32).reshape(len(poses), height, width)


def render_mesh_views(
    xyz: np.ndarray,
    rgb: np.ndarray,
    faces: np.ndarray,
    poses: np.ndarray,
    K: np.ndarray,
    H: int,
    W: int,
    *,
    raycaster: Any = None,
    views_per_batch: int = 8,
    occlusion_rel_tol: float = 0.02,
    occlusion_abs_tol_m: float = 0.02,
    near_m: float = 0.05,
    threads: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray cast a vertex-coloured mesh from several cameras.

    Args:
        xyz: float32 [N, 3] vertices; rgb: uint8 [N, 3]; faces: int [F, 3].
        poses: [V, 4, 4] world->camera (OpenCV); K: [3, 3] intrinsics shared by the views.
        H, W: image size.
        raycaster: a `build_raycaster(xyz, faces)` to reuse (built here when None).
        views_per_batch: views cast per `cast_rays` call.

    Returns:
        rgb: uint8 [V, H, W, 3] barycentric colours (black where nothing is hit);
        depth: float16 [V, H, W] z-depth in metres (0 = nothing);
        point_index: int32 [V, H, W] the hit triangle's vertex with the largest barycentric
        weight that is visible in the view (`visible_points`' rule), else the next; -1 if none.
    """
    out = _mesh_views(xyz, rgb, faces, poses, K, H, W, raycaster=raycaster, views_per_batch=views_per_batch,
                      tol=(occlusion_rel_tol, occlusion_abs_tol_m, near_m), threads=threads)
    return out[0], out[1], out[2]


def _mesh_views(xyz, rgb, faces, poses, K, H, W, *, raycaster, views_per_batch, tol, threads):
    """`render_mesh_views` plus the visibility mask bool [V, N] it used."""
    tol = tuple(map(float, tol))
    xyz = np.ascontiguousarray(xyz, dtype=np.float32)
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    faces = np.ascontiguousarray(faces, dtype=np.int32)
    poses = np.ascontiguousarray(poses, dtype=np.float64)
    K = np.ascontiguousarray(K, dtype=np.float64)
    if raycaster is None:
        raycaster = build_raycaster(xyz, faces)
    n_views = len(poses)
    hw = H * W
    out_rgb = np.empty((n_views, H, W, 3), np.uint8)
    out_depth = np.empty((n_views, H, W), np.float16)
    out_index = np.empty((n_views, H, W), np.int32)
    visible = np.empty((n_views, len(xyz)), np.bool_)
    batch = max(1, views_per_batch)
    rays = np.empty((min(batch, n_views) * hw, 6), np.float32)
    for start in range(0, n_views, batch):
        stop = min(n_views, start + batch)
        n_pix = (stop - start) * hw
        _make_rays(K, poses[start:stop], H, W, rays[:n_pix], threads)
        hits = cast(raycaster, rays[:n_pix], threads=threads)
        t_hit = hits["t_hit"]
        # visibility uses the depth as stored (float16), so the stored arrays alone reproduce it
        d16 = out_depth[start:stop].reshape(-1)
        d16[...] = np.where(np.isfinite(t_hit), t_hit, np.float32(0.0))
        dq = d16.astype(np.float32)
        _visible_mask(xyz, poses[start:stop], K, dq, H, W, tol, threads, out=visible[start:stop])
        kernel = _shade_assign_par if _parallel(n_pix, threads) else _shade_assign_ser
        kernel(t_hit, hits["primitive_ids"], hits["primitive_uvs"], dq, faces, rgb, visible[start:stop], H, W,
               out_rgb[start:stop].reshape(-1, 3), out_index[start:stop].reshape(-1))
    return out_rgb, out_depth, out_index, visible


def splat_points(
    xyz: np.ndarray,
    rgb: np.ndarray,
    poses: np.ndarray,
    K: np.ndarray,
    H: int,
    W: int,
    *,
    radius_m: float | np.ndarray,
    max_radius_px: float = 8.0,
    occlusion_rel_tol: float = 0.02,
    occlusion_abs_tol_m: float = 0.02,
    near_m: float = 0.05,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render a point cloud by z-buffer splatting (numba, one view per thread).

    A point is a disc facing the camera at its depth z, radius ``f * radius_m / z`` pixels (at
    most `max_radius_px`); it covers the pixels whose centres lie in the disc, and always the
    pixel its centre falls in. Points whose centre falls outside the image are not drawn. The
    nearest depth (float32) wins a pixel; equal depths go to the lower point id. A pixel then keeps
    its point only if that point is visible in the view (`visible_points`' rule: not hidden at its
    own pixel); its colour and depth stay either way.

    Args:
        xyz: float [N, 3]; rgb: uint8 [N, 3]; poses: [V, 4, 4]; K: [3, 3]; H, W: image size.
        radius_m: splat radius in metres, a scalar or float [N].

    Returns:
        rgb uint8 [V, H, W, 3], depth float16 [V, H, W] (0 = nothing),
        point_index int32 [V, H, W] (-1 = nothing or hidden at its own pixel).
    """
    out = _splat_views(xyz, rgb, poses, K, H, W, radius_m=radius_m, max_radius_px=max_radius_px,
                       tol=(occlusion_rel_tol, occlusion_abs_tol_m, near_m))
    return out[0], out[1], out[2]


def _splat_views(xyz, rgb, poses, K, H, W, *, radius_m, max_radius_px, tol, threads=0):
    """`splat_points` plus the visibility mask bool [V, N] it used."""
    tol = tuple(map(float, tol))
    xyz = np.ascontiguousarray(xyz, dtype=np.float32)
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    poses = np.ascontiguousarray(poses, dtype=np.float64)
    K = np.ascontiguousarray(K, dtype=np.float64)
    radius = np.ascontiguousarray(np.broadcast_to(np.asarray(radius_m, dtype=np.float32), (len(xyz),)))
    n_views = len(poses)
    zbuf = np.empty((n_views, H, W), np.float32)
    index = np.empty((n_views, H, W), np.int32)
    _splat_kernel(xyz, radius, poses, K, H, W, float(max_radius_px), tol[2], zbuf, index)
    hit = index >= 0
    depth16 = np.where(hit, zbuf, 0.0).astype(np.float16)
    out_rgb = np.zeros((n_views, H, W, 3), np.uint8)
    out_rgb[hit] = rgb[index[hit]]
    visible = _visible_mask(xyz, poses, K, depth16.astype(np.float32).reshape(-1), H, W, tol, threads)
    _keep_visible(index.reshape(-1), visible, H * W)
    return out_rgb, depth16, index, visible


def splat_depth(xyz: np.ndarray, poses: np.ndarray, K: np.ndarray, H: int, W: int, *, radius_m: float | np.ndarray,
                max_radius_px: float = 8.0, near_m: float = 0.05) -> np.ndarray:
    """Only the z-buffer of `splat_points`: float32 [V, H, W], 0 = nothing."""
    xyz = np.ascontiguousarray(xyz, dtype=np.float32)
    radius = np.ascontiguousarray(np.broadcast_to(np.asarray(radius_m, dtype=np.float32), (len(xyz),)))
    zbuf = np.empty((len(poses), H, W), np.float32)
    index = np.empty((len(poses), H, W), np.int32)
    _splat_kernel(xyz, radius, np.ascontiguousarray(poses, dtype=np.float64), np.ascontiguousarray(K, dtype=np.float64),
                  H, W, float(max_radius_px), float(near_m), zbuf, index)
    return np.where(index >= 0, zbuf, 0.0).astype(np.float32)


def visibility_csr(visible: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR lists of a visibility mask bool [V, N]: ptr int64 [V + 1], ids int32 [M] (each view's
    ids ascending), view_count uint16 [N] (saturating at 65535)."""
    visible = np.ascontiguousarray(visible, dtype=np.bool_)
    per_view = visible.sum(1, dtype=np.int64)
    ptr = np.zeros(len(visible) + 1, np.int64)
    np.cumsum(per_view, out=ptr[1:])
    ids = np.empty(int(ptr[-1]), np.int32)
    counts = np.zeros(visible.shape[1], np.int64)
    _fill_csr(visible, ptr, ids, counts)
    return ptr, ids, np.minimum(counts, np.iinfo(np.uint16).max).astype(np.uint16)


def visible_points(
    xyz: np.ndarray,
    poses: np.ndarray,
    K: np.ndarray,
    depth: np.ndarray,
    *,
    occlusion_rel_tol: float = 0.02,
    occlusion_abs_tol_m: float = 0.02,
    near_m: float = 0.05,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The points each view shows, as CSR, and per-point view counts.

    A point is visible in a view when it projects into the image and is not hidden behind the
    view's depth at its own pixel by more than the tolerance (nothing drawn there also counts as
    not hidden). Every point a pixel records passes this test, so these lists contain the
    point-index images' ids and also the points too small to win a pixel of their own.

    Args:
        xyz: float [N, 3]; poses: [V, 4, 4]; K: [3, 3].
        depth: [V, H, W] z-depth as stored (float16 is fine), 0 = nothing.

    Returns:
        ptr int64 [V + 1]; ids int32 [M] (each view's ids, sorted); view_count uint16 [N]
        (saturating at 65535).
    """
    visible = sample_visibility(xyz, poses, K, depth, rel_tol=occlusion_rel_tol, abs_tol_m=occlusion_abs_tol_m,
                                near_m=near_m, threads=0)
    return visibility_csr(visible)


def sample_visibility(sample_xyz: np.ndarray, poses: np.ndarray, K: np.ndarray, depth: np.ndarray, *,
                      rel_tol: float, abs_tol_m: float, near_m: float, threads: int = 0) -> np.ndarray:
    """bool [C, S]: which of the samples [S, 3] each candidate [C, 4, 4] sees (the rule of
    `visible_points`) against its depth image [C, h, w] (as stored: float16 is fine) with
    intrinsics K [3, 3]."""
    _, height, width = depth.shape
    return _visible_mask(np.ascontiguousarray(sample_xyz, dtype=np.float32), np.ascontiguousarray(poses, dtype=np.float64),
                         np.ascontiguousarray(K, dtype=np.float64),
                         np.ascontiguousarray(depth, dtype=np.float32).reshape(-1), height, width,
                         (float(rel_tol), float(abs_tol_m), float(near_m)), threads)


def _segment_rays(eyes: np.ndarray, samples: np.ndarray, rel_tol: float, abs_tol_m: float,
                  out: np.ndarray) -> np.ndarray:
    """Rays out [P * S, 6] from each eye [P, 3] towards each sample [S, 3], scaled so that t = 1
    is where the sample stops being hidden: a hit at t < 1 lies clearly before the sample (the
    visibility rule: the sample at distance d is hidden behind a surface at distance d' when
    d > d' (1 + rel_tol) + abs_tol_m). Returns bool [P, S]: samples within abs_tol_m of the eye,
    never hidden."""
    near = np.empty((len(eyes), len(samples)), np.bool_)
    _segment_rays_kernel(np.ascontiguousarray(eyes, dtype=np.float64), np.ascontiguousarray(samples, dtype=np.float32),
                         float(rel_tol), float(abs_tol_m), out, near)
    return near


def unoccluded_from(raycaster: Any, eyes: np.ndarray, sample_xyz: np.ndarray, *, rel_tol: float, abs_tol_m: float,
                    threads: int = 0) -> np.ndarray:
    """bool [P, S]: nothing on the mesh lies between eye p [P, 3] and sample s [S, 3] (beyond the
    tolerance), by one occlusion ray per pair tested in one call (any hit, no closest hit)."""
    import open3d as o3d

    rays = np.empty((len(eyes) * len(sample_xyz), 6), np.float32)
    near = _segment_rays(eyes, sample_xyz, rel_tol, abs_tol_m, rays)
    hidden = raycaster.test_occlusions(o3d.core.Tensor.from_numpy(rays), tnear=0.0, tfar=1.0, nthreads=threads)
    return near | ~hidden.numpy().reshape(near.shape)


def greedy_cover(seen: np.ndarray, *, max_views: int, target: float, covered: np.ndarray | None = None,
                 allowed: np.ndarray | None = None) -> tuple[list[int], np.ndarray]:
    """Choose candidates greedily by how many not-yet-covered samples each adds.

    Args:
        seen: bool [C, S] candidate c sees sample s.
        max_views: most candidates to choose.
        target: stop once this fraction of the S samples is covered.
        covered: bool [S] samples already covered (default none).
        allowed: bool [C] candidates that may be chosen (default all).

    Returns:
        chosen candidate ids in order, and the covered mask [S] afterwards.
    """
    n_cand, n_samples = seen.shape
    covered = np.zeros(n_samples, bool) if covered is None else covered.copy()
    allowed = np.ones(n_cand, bool) if allowed is None else allowed.copy()
    chosen: list[int] = []
    if not n_samples:
        return chosen, covered
    # gains kept up to date by subtracting what each choice newly covers (few columns a round)
    gain = np.count_nonzero(seen & ~covered, axis=1)
    n_covered = int(np.count_nonzero(covered))
    while len(chosen) < max_views and n_covered / n_samples < target and allowed.any():
        best = int(np.argmax(np.where(allowed, gain, -1)))
        if not allowed[best] or gain[best] <= 0:
            break
        chosen.append(best)
        allowed[best] = False
        new = seen[best] & ~covered
        gain -= np.count_nonzero(seen[:, new], axis=1)
        covered |= new
        n_covered += int(np.count_nonzero(new))
    return chosen, covered


def _farthest_points(xy: np.ndarray, k: int) -> np.ndarray:
    """Indices of k points spread by farthest-point sampling (deterministic, starts at the first)."""
    if len(xy) <= k:
        return np.arange(len(xy))
    picked = [0]
    dist = np.linalg.norm(xy - xy[0], axis=1)
    for _ in range(k - 1):  # k iterations (tens), each vectorised over the candidates
        nxt = int(np.argmax(dist))
        picked.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(xy - xy[nxt], axis=1))
    return np.sort(np.asarray(picked))


def _xy_bounds(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) of x and y, float64 [2] each (per column: numpy's axis-0 reductions of an
    [N, 3] array are ~25x slower)."""
    lo = np.array([xyz[:, 0].min(), xyz[:, 1].min()], dtype=np.float64)
    hi = np.array([xyz[:, 0].max(), xyz[:, 1].max()], dtype=np.float64)
    return lo, hi


def candidate_positions(xyz: np.ndarray, cfg: RenderConfig, clearance: Callable[[np.ndarray], np.ndarray],
                        rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Eye positions [P, 3] on a grid over the scan's footprint, at 1.2-1.6 m (config) above the
    floor, at least `clearance_m` from every surface (`clearance(points [Q, 3]) -> dist [Q]`).
    Returns the positions and the floor height."""
    lo, hi = _xy_bounds(xyz)
    floor_z = float(np.percentile(xyz[:, 2], cfg.floor_percentile))
    extent = np.maximum(hi - lo, 1e-3)
    # a grid of ~4x max_positions cells: enough survive the clearance test to spread out
    step = max(cfg.grid_step_m, math.sqrt(float(np.prod(extent)) / (4 * cfg.max_positions)))
    nx, ny = (np.maximum(1, np.floor(extent / step)).astype(int) + 1)
    gx = lo[0] + (extent[0] - (nx - 1) * step) / 2 + step * np.arange(nx)
    gy = lo[1] + (extent[1] - (ny - 1) * step) / 2 + step * np.arange(ny)
    xx, yy = np.meshgrid(gx, gy, indexing="ij")
    h0, h1 = cfg.eye_height_m
    zz = floor_z + rng.uniform(h0, h1, size=xx.size)
    pos = np.stack([xx.ravel(), yy.ravel(), zz], -1)
    pos = pos[clearance(pos) >= cfg.clearance_m]
    return pos[_farthest_points(pos[:, :2], cfg.max_positions)], floor_z


def _spacing_of_mesh(xyz: np.ndarray, faces: np.ndarray, rng: np.random.Generator) -> float:
    sample = faces[rng.integers(0, len(faces), size=4096)]
    edges = np.linalg.norm(xyz[sample[:, 0]] - xyz[sample[:, 1]], axis=1)
    return float(np.median(edges)) if len(edges) else 0.05


def _spacing_of_points(tree: Any, xyz: np.ndarray, rng: np.random.Generator) -> float:
    sample = xyz[rng.choice(len(xyz), size=min(len(xyz), 4000), replace=False)]
    dist, _ = tree.query(sample, k=2)
    d = dist[:, 1][np.isfinite(dist[:, 1])]
    return float(np.median(d)) if len(d) else 0.05


def _heading_grid(positions: np.ndarray, yaw: np.ndarray, pitch_rad: float) -> np.ndarray:
    """`cameras.heading_poses` at every position [P, 3]: float64 [P * Y, 4, 4], position-major
    (the rotations are shared; only the translations differ)."""
    rot = cameras.heading_poses(np.zeros(3), yaw, pitch_rad)
    poses = np.repeat(rot[None], len(positions), axis=0)
    poses[:, :, :3, 3] = -np.einsum("yij,pj->pyi", rot[:, :3, :3], np.asarray(positions, dtype=np.float64))
    return poses.reshape(-1, 4, 4)


def _reach(xyz: np.ndarray, cfg: RenderConfig) -> float:
    """A distance beyond every surface as seen from any candidate position (metres)."""
    lo = np.array([xyz[:, k].min() for k in range(3)], dtype=np.float64)  # per column: see _xy_bounds
    hi = np.array([xyz[:, k].max() for k in range(3)], dtype=np.float64)
    return 2.0 * (float(np.linalg.norm(hi - lo)) + max(cfg.eye_height_m)) + 1.0


def _probe_candidates(raycaster: Any, K_low: np.ndarray, h_low: int, w_low: int, cand: np.ndarray,
                      positions: np.ndarray, samples: np.ndarray, *, cfg: RenderConfig,
                      reach: float) -> tuple[np.ndarray, np.ndarray]:
    """Meshes: two questions about the candidates in one `test_occlusions` call (any hit, cheaper
    than `cast_rays`' closest hit with all its outputs).

    Returns:
        low_hit: bool [C, h_low * w_low], the low-resolution pixels of each candidate [C, 4, 4]
        that show a surface (directions have camera z = 1, scaled so t = 1 is `reach` metres away
        or more: every surface of the scene);
        clear: bool [P, S], nothing hides sample s [S, 3] from position p [P, 3] (`unoccluded_from`).
    """
    import open3d as o3d

    n_low = len(cand) * h_low * w_low
    rays = np.empty((n_low + len(positions) * len(samples), 6), np.float32)
    _make_rays(np.ascontiguousarray(K_low, dtype=np.float64), np.ascontiguousarray(cand, dtype=np.float64),
               h_low, w_low, rays[:n_low], cfg.threads)
    rays[:n_low, 3:] *= np.float32(reach)
    near = _segment_rays(positions, samples, cfg.occlusion_rel_tol, cfg.occlusion_abs_tol_m, rays[n_low:])
    hit = raycaster.test_occlusions(o3d.core.Tensor.from_numpy(rays), tnear=0.0, tfar=1.0,
                                    nthreads=cfg.threads).numpy()
    return hit[:n_low].reshape(len(cand), -1), near | ~hit[n_low:].reshape(near.shape)


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

    if kind == "lidar":
        origin = np.zeros(3) if sensor_origin is None else np.asarray(sensor_origin, dtype=np.float64)
        K = cameras.intrinsics(W, H, cfg.lidar_hfov_deg)
        yaw = 2 * np.pi * np.arange(cfg.lidar_headings) / cfg.lidar_headings
        poses = _as_stored(cameras.heading_poses(origin, yaw, np.deg2rad(cfg.lidar_pitch_deg)))
        K = _as_stored(K)
        ranges = np.linalg.norm(xyz - origin.astype(np.float32), axis=1)
        radius = (ranges * np.tan(np.deg2rad(cfg.lidar_angular_radius_deg))).astype(np.float32)
        t_choose = time.perf_counter()
        img_rgb, depth, index, visible = _splat_views(xyz, rgb, poses, K, H, W, radius_m=radius,
                                                      max_radius_px=cfg.max_splat_radius_px, tol=tol,
                                                      threads=cfg.threads)
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
            spacing = _spacing_of_mesh(xyz, faces, rng)
            radius: float | np.ndarray = 0.0

            def clearance(q: np.ndarray) -> np.ndarray:
                import open3d as o3d
                return raycaster.compute_distance(o3d.core.Tensor(q.astype(np.float32)), nthreads=cfg.threads).numpy()
        else:
            from scipy.spatial import cKDTree

            tree = cKDTree(xyz, balanced_tree=False, compact_nodes=False)
            spacing = _spacing_of_points(tree, xyz, rng)
            radius = cfg.point_radius_m or cfg.point_radius_factor * spacing

            def clearance(q: np.ndarray) -> np.ndarray:
                return tree.query(q, k=1, workers=-1)[0]

            def low_depth(p: np.ndarray) -> np.ndarray:
                # at low resolution every point is about one pixel: the centre-pixel rule fills it
                return splat_depth(xyz, p, K_low, h_low, w_low, radius_m=radius,
                                   max_radius_px=1.0, near_m=cfg.near_m)

        positions, floor_z = candidate_positions(xyz, cfg, clearance, rng)
        fallback = len(positions) == 0
        if fallback:  # nothing is clear of surfaces: the centre of the footprint at eye height
            centre = np.sum(_xy_bounds(xyz), axis=0) / 2
            positions = np.array([[centre[0], centre[1], floor_z + np.mean(cfg.eye_height_m)]])
        yaw = 2 * np.pi * np.arange(cfg.headings) / cfg.headings
        cand = _as_stored(_heading_grid(positions, yaw, np.deg2rad(cfg.pitch_deg)))
        sample_ids = np.sort(rng.choice(n_points, size=min(n_points, cfg.coverage_samples), replace=False))
        samples = xyz[sample_ids]
        if kind == "mesh":
            # exact occlusion: one ray from each position to each sample, then each heading's frustum
            # (a low-resolution depth image misses thin occluders and overestimates coverage)
            low_hit, clear = _probe_candidates(raycaster, K_low, h_low, w_low, cand, positions, samples, cfg=cfg,
                                               reach=_reach(xyz, cfg))
            rays_cast += low_hit.size + clear.size
            seen = np.zeros((len(cand), len(samples)), np.bool_)
            kernel = _candidate_seen_par if _parallel(seen.size, cfg.threads) else _candidate_seen_ser
            kernel(samples, cand, K, H, W, float(cfg.near_m), clear, cfg.headings, seen)
        else:
            depth_low = low_depth(cand)
            low_hit = (depth_low > 0).reshape(len(cand), -1)
            seen = sample_visibility(samples, cand, K_low, depth_low, rel_tol=cfg.occlusion_rel_tol,
                                     abs_tol_m=cfg.occlusion_abs_tol_m, near_m=cfg.near_m, threads=cfg.threads)
        # positions looking mostly at nothing are outside the scan (behind a wall)
        hit_fraction = low_hit.reshape(len(positions), -1).mean(1)
        inside = hit_fraction >= cfg.min_hit_fraction
        if not inside.any():
            inside[int(np.argmax(hit_fraction))] = True
            fallback = True
        allowed = np.repeat(inside, cfg.headings)
        # some points no eye-height camera can see (floor under furniture, backs against walls):
        # the target is a fraction of the points some allowed candidate sees
        observable = seen[allowed].any(0)
        observable_fraction = float(observable.mean()) if len(observable) else 0.0
        target = cfg.coverage_target * observable_fraction
        chosen, covered = greedy_cover(seen, max_views=cfg.max_views, target=target, allowed=allowed)
        if not chosen:  # nothing seen by the estimate: still give one view from the best position
            chosen = [int(np.argmax(np.where(allowed, low_hit.mean(1), -1)))]
        estimate = float(covered.mean()) if len(covered) else 0.0
        t_choose = time.perf_counter()

        def render(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
            if kind == "mesh":
                return _mesh_views(xyz, rgb, faces, p, K, H, W, raycaster=raycaster,
                                   views_per_batch=cfg.views_per_batch, tol=tol, threads=cfg.threads)
            return _splat_views(xyz, rgb, p, K, H, W, radius_m=radius, max_radius_px=cfg.max_splat_radius_px, tol=tol,
                                threads=cfg.threads)

        poses = cand[chosen]
        img_rgb, depth, index, visible = render(poses)
        for _ in range(cfg.refine_rounds):
            seen_now = visible.any(0)
            if np.count_nonzero(seen_now) >= target * n_points or len(chosen) >= cfg.max_views:
                break
            # what the full-size views really show replaces the estimate; choose more views
            mask = allowed.copy()
            mask[chosen] = False
            extra, _ = greedy_cover(seen, max_views=cfg.max_views - len(chosen), target=target,
                                    covered=seen_now[sample_ids], allowed=mask)
            if not extra:
                break
            more = render(cand[extra])
            img_rgb, depth, index, visible = (np.concatenate([a, b])
                                              for a, b in zip((img_rgb, depth, index, visible), more))
            chosen = chosen + extra
            poses = cand[chosen]
        stats.update(candidates=len(cand), positions=int(len(positions)), positions_inside=int(inside.sum()),
                     coverage_estimate=round(estimate, 4), observable_estimate=round(observable_fraction, 4),
                     fallback_camera=bool(fallback),
                     point_spacing_m=round(spacing, 4), floor_z=round(floor_z, 3))
    t_render = time.perf_counter()
    ptr, ids, view_count = visibility_csr(visible)
    n_recorded = _count_recorded(index.reshape(-1), n_points)
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
        seconds_choose=round(t_choose - t_start, 4),
        seconds_render=round(t_render - t_choose, 4),
        seconds_visibility=round(t_vis - t_render, 4),
    )
    return RenderResult(
        rgb=img_rgb, depth=depth, point_index=index,
        K=np.repeat(K[None].astype(np.float32), n_views, axis=0), pose=poses.astype(np.float32),
        visible_ptr=ptr, visible_ids=ids, view_count=view_count, stats=stats,
    )


# --- runner -------------------------------------------------------------------------------------


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
    xyz = store.read(scene_id, schema.XYZ)
    rgb = store.read(scene_id, schema.RGB)
    faces = None
    if kind == "mesh":
        if not store.has(scene_id, schema.FACES):
            raise SceneError(scene_id, None, "kind is 'mesh' but the scene has no mesh/faces")
        faces = store.read(scene_id, schema.FACES)
        if len(faces) == 0:
            raise SceneError(scene_id, None, "kind is 'mesh' but mesh/faces is empty")
    if len(xyz) == 0:
        raise SceneError(scene_id, None, "scene has no points")
    origin = ingest_stats.get("sensor_origin")
    result = render_scene(xyz, rgb, faces, kind=kind, cfg=cfg,
                          sensor_origin=None if origin is None else np.asarray(origin, dtype=np.float64))
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
    "splat_points", "splat_depth", "visible_points", "visibility_csr", "unoccluded_from", "sample_visibility",
    "greedy_cover", "candidate_positions", "render_scene", "run_scene", "summarise",
]
