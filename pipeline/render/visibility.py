"""Visibility: which points each view shows, exactly and occlusion-aware.

Pure functions (no store I/O). Two rules, one per kind of scan:
- Meshes (`mesh_visibility`): a vertex is visible in a view when it projects into the image, in
  front of the near plane, and the ray from the camera centre reaches it: no triangle crosses
  the segment camera -> vertex before `tol_m` (~1 cm) short of it (Open3D `test_occlusions`,
  any hit). A cheap depth pre-test first drops the vertices that lie far behind every depth of
  the 3x3 pixels around their own (beyond `pre_rel` x depth + `pre_abs_m`), which no ray could
  reach; every other vertex gets its ray.
- Point clouds (`points_visibility`): a point is visible when it projects into the image and is
  not behind the splatted z-buffer at its own pixel by more than its own tolerance, which comes
  from its local point spacing (metres, see `pipeline.render.splat`): what a ray test against the
  other points' splat discs says, at pixel centres.
Both give bool [V, N] masks; `visibility_csr` turns a mask into the stored CSR lists.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit, prange

from pipeline import parallel


@njit(inline="always")
def _visible_at_own_pixel(x, y, z, poses, v, K, depth_q, base, height, width, rel, abs_tol, near):
    """True if world point (x, y, z) projects into view v's image and is not behind the depth
    there by more than rel x depth + abs_tol (nothing drawn there: not hidden). (poses and v,
    not poses[v]: a slice in a parallel loop costs atomic refcounting.)"""
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
    """mask[v, i] for every view v (`_visible_at_own_pixel` on depth_q [V * H * W]); abs_tol
    float32 [N] per point."""
    x = np.float64(xyz[i, 0])
    y = np.float64(xyz[i, 1])
    z = np.float64(xyz[i, 2])
    tol = np.float64(abs_tol[i])
    hw = height * width
    for v in range(poses.shape[0]):
        mask[v, i] = _visible_at_own_pixel(x, y, z, poses, v, K, depth_q, v * hw, height, width, rel, tol, near)


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
def _reachable_point(i, xyz, poses, K, depth_q, height, width, rel, abs_tol, near, mask):
    """mask[v, i]: point i projects into view v and is not behind the largest depth of the 3x3
    pixels around its own by more than the band (a miss among them: always a candidate)."""
    x = np.float64(xyz[i, 0])
    y = np.float64(xyz[i, 1])
    z = np.float64(xyz[i, 2])
    hw = height * width
    for v in range(poses.shape[0]):
        mask[v, i] = False
        cx = poses[v, 0, 0] * x + poses[v, 0, 1] * y + poses[v, 0, 2] * z + poses[v, 0, 3]
        cy = poses[v, 1, 0] * x + poses[v, 1, 1] * y + poses[v, 1, 2] * z + poses[v, 1, 3]
        cz = poses[v, 2, 0] * x + poses[v, 2, 1] * y + poses[v, 2, 2] * z + poses[v, 2, 3]
        if cz <= near:
            continue
        col = math.floor(K[0, 0] * cx / cz + K[0, 2] + 0.5)
        row = math.floor(K[1, 1] * cy / cz + K[1, 2] + 0.5)
        if col < 0 or col >= width or row < 0 or row >= height:
            continue
        # the own pixel first: a miss there, or a depth the point is not behind, passes already
        # (the 3x3 maximum is at least that depth), which settles most points in view
        d = depth_q[v * hw + row * width + col]
        if d <= 0.0 or cz <= d * (1.0 + rel) + abs_tol:
            mask[v, i] = True
            continue
        dmax = 0.0
        miss = False
        for r in range(max(0, row - 1), min(height, row + 2)):
            for c in range(max(0, col - 1), min(width, col + 2)):
                d = depth_q[v * hw + r * width + c]
                if d <= 0.0:
                    miss = True
                elif d > dmax:
                    dmax = d
        mask[v, i] = miss or cz <= dmax * (1.0 + rel) + abs_tol


@njit(parallel=True, cache=True)
def _reachable_mask_par(xyz, poses, K, depth_q, height, width, rel, abs_tol, near, mask):  # pragma: no cover
    """`_reachable_point` for every point (parallel over points)."""
    for i in prange(xyz.shape[0]):
        _reachable_point(i, xyz, poses, K, depth_q, height, width, rel, abs_tol, near, mask)


@njit(cache=True)
def _reachable_mask_ser(xyz, poses, K, depth_q, height, width, rel, abs_tol, near, mask):  # pragma: no cover
    """Serial `_reachable_mask_par`."""
    for i in range(xyz.shape[0]):
        _reachable_point(i, xyz, poses, K, depth_q, height, width, rel, abs_tol, near, mask)


@njit(cache=True)
def _occlusion_rays_kernel(xyz, centres, mask, tol, rays, short, view, point):  # pragma: no cover
    """One ray for each (v, i) with mask[v, i], in np.nonzero's order (view-major, ids ascending):
    view[q], point[q] the pair; rays[q] from view v's camera centre towards point i, scaled so
    that t = 1 lies `tol` metres short of the point; short[q]: the point is within `tol` of the
    camera (never hidden). (Scanning the mask here, not np.nonzero first: one pass, no index
    arrays of int64.)"""
    q = 0
    for v in range(mask.shape[0]):
        c0 = centres[v, 0]
        c1 = centres[v, 1]
        c2 = centres[v, 2]
        for i in range(mask.shape[1]):
            if not mask[v, i]:
                continue
            d0 = np.float64(xyz[i, 0]) - c0
            d1 = np.float64(xyz[i, 1]) - c1
            d2 = np.float64(xyz[i, 2]) - c2
            dist = math.sqrt(d0 * d0 + d1 * d1 + d2 * d2)
            scale = (dist - tol) / dist if dist > tol else 0.0
            short[q] = not scale > 0.0
            if short[q]:
                scale = 1.0
            rays[q, 0] = c0
            rays[q, 1] = c1
            rays[q, 2] = c2
            rays[q, 3] = d0 * scale
            rays[q, 4] = d1 * scale
            rays[q, 5] = d2 * scale
            view[q] = v
            point[q] = i
            q += 1


@njit(cache=True)
def _drop_hidden(mask, view, point, hidden, short):  # pragma: no cover
    """mask[view[q], point[q]] = False where the occlusion ray q hit something (hidden[q]) and
    the point is not within the tolerance of the camera (short[q])."""
    for q in range(view.shape[0]):
        if hidden[q] and not short[q]:
            mask[view[q], point[q]] = False


@njit(cache=True)
def _segment_rays_kernel(eyes, samples, rel, abs_tol, rays, near):  # pragma: no cover
    """See `segment_rays` (serial: a few ten thousand rays)."""
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
def count_recorded(index, n_points):  # pragma: no cover
    """How many distinct points the pixels record (index int32 [P], -1 = none)."""
    mark = np.zeros(n_points, np.bool_)
    n = 0
    for p in range(index.shape[0]):
        i = index[p]
        if i >= 0 and not mark[i]:
            mark[i] = True
            n += 1
    return n


@njit(cache=True)
def keep_visible(index, visible, hw):  # pragma: no cover
    """Drop (set to -1) pixels whose recorded point is not visible in their view (hidden at its
    own pixel): visible[view, point] from `_visible_mask`."""
    for p in range(index.shape[0]):
        i = index[p]
        if i >= 0 and not visible[p // hw, i]:
            index[p] = -1


def camera_centres(poses: np.ndarray) -> np.ndarray:
    """Centres float64 [V, 3] of world->camera poses [V, 4, 4]: -R^T t."""
    poses = np.asarray(poses, dtype=np.float64)
    return -np.einsum("vji,vj->vi", poses[:, :3, :3], poses[:, :3, 3])


def mesh_visibility(raycaster: Any, xyz: np.ndarray, poses: np.ndarray, K: np.ndarray, depth: np.ndarray,
                    height: int, width: int, *, tol_m: float = 0.01, pre_rel: float = 0.02, pre_abs_m: float = 0.02,
                    near_m: float = 0.05, threads: int = 0,
                    out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Exact visibility of mesh vertices (see the module docstring) into `out` bool [V, N].

    Args:
        raycaster: the scene's `RaycastingScene` (`pipeline.render.raycast.build_raycaster`).
        xyz: float32 [N, 3] vertices. poses: float64 [V, 4, 4]. K: float64 [3, 3].
        depth: float32 [V * H * W] or [V, H, W] z-depth of the views (0 = nothing), full precision.
        tol_m: a ray that reaches within this of the vertex sees it.
        pre_rel, pre_abs_m: the band of the depth pre-test.
        out: bool [V, N] to fill (allocated when None).

    Returns:
        The mask, and the number of occlusion rays cast.
    """
    import open3d as o3d

    xyz = np.ascontiguousarray(xyz, dtype=np.float32)
    poses = np.ascontiguousarray(poses, dtype=np.float64)
    K = np.ascontiguousarray(K, dtype=np.float64)
    depth_q = np.ascontiguousarray(depth, dtype=np.float32).reshape(-1)
    mask = np.empty((len(poses), len(xyz)), np.bool_) if out is None else out
    kernel = _reachable_mask_par if parallel.use_parallel(mask.size, threads) else _reachable_mask_ser
    kernel(xyz, poses, K, depth_q, height, width, float(pre_rel), float(pre_abs_m), float(near_m), mask)
    n_rays = int(np.count_nonzero(mask))
    if n_rays:
        rays = np.empty((n_rays, 6), np.float32)
        short = np.empty(n_rays, np.bool_)
        view = np.empty(n_rays, np.int32)
        point = np.empty(n_rays, np.int32)
        _occlusion_rays_kernel(xyz, camera_centres(poses), mask, float(tol_m), rays, short, view, point)
        hidden = raycaster.test_occlusions(o3d.core.Tensor.from_numpy(rays), tnear=0.0, tfar=1.0,
                                           nthreads=threads).numpy()
        _drop_hidden(mask, view, point, hidden, short)
    return mask, n_rays


def exact_visible(raycaster: Any, xyz: np.ndarray, poses: np.ndarray, K: np.ndarray, height: int, width: int, *,
                  tol_m: float = 0.01, near_m: float = 0.05, threads: int = 0) -> np.ndarray:
    """bool [V, N]: the exact rule without the depth pre-test (a ray for every point in the
    frustum): the reference the bench and the tests hold `mesh_visibility` to."""
    no_depth = np.zeros(len(poses) * height * width, np.float32)  # every pixel a miss: no pre-test
    return mesh_visibility(raycaster, xyz, poses, K, no_depth, height, width, tol_m=tol_m, near_m=near_m,
                           threads=threads)[0]


def points_visibility(xyz: np.ndarray, poses: np.ndarray, K: np.ndarray, depth: np.ndarray, height: int, width: int, *,
                      tol_m: np.ndarray | float, rel_tol: float = 1e-3, near_m: float = 0.05, threads: int = 0,
                      out: np.ndarray | None = None) -> np.ndarray:
    """bool [V, N]: point i projects into view v and is not behind the z-buffer at its own pixel
    by more than tol_m[i] + rel_tol x depth (float16 slack of the stored depth).

    Args:
        xyz: float [N, 3]. poses: [V, 4, 4]. K: [3, 3]. depth: [V, H, W] or flat, 0 = nothing.
        tol_m: float [N] per-point depth tolerance (metres) or a scalar.
    """
    xyz = np.ascontiguousarray(xyz, dtype=np.float32)
    mask = np.empty((len(poses), len(xyz)), np.bool_) if out is None else out
    tol = np.ascontiguousarray(np.broadcast_to(np.asarray(tol_m, dtype=np.float32), (len(xyz),)))
    kernel = _visible_mask_par if parallel.use_parallel(mask.size, threads) else _visible_mask_ser
    kernel(xyz, np.ascontiguousarray(poses, dtype=np.float64), np.ascontiguousarray(K, dtype=np.float64),
           np.ascontiguousarray(depth, dtype=np.float32).reshape(-1), height, width, float(rel_tol), tol,
           float(near_m), mask)
    return mask


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
    raycaster: Any = None,
    tol_m: np.ndarray | float = 0.02,
    occlusion_rel_tol: float = 1e-3,
    near_m: float = 0.05,
    threads: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The points each view shows, as CSR, and per-point view counts.

    With `raycaster` (meshes): the exact rule of `mesh_visibility` (depth full precision or as
    stored; `tol_m` the ray tolerance, scalar). Without: the z-buffer rule of
    `points_visibility` against `depth` with per-point tolerances `tol_m`.

    Args:
        xyz: float [N, 3]; poses: [V, 4, 4]; K: [3, 3].
        depth: [V, H, W] z-depth (float16 as stored is fine), 0 = nothing.

    Returns:
        ptr int64 [V + 1]; ids int32 [M] (each view's ids, sorted); view_count uint16 [N]
        (saturating at 65535).
    """
    _, height, width = np.shape(depth)
    if raycaster is not None:
        mask, _ = mesh_visibility(raycaster, xyz, poses, K, depth, height, width, tol_m=float(tol_m),
                                  near_m=near_m, threads=threads)
    else:
        mask = points_visibility(xyz, poses, K, depth, height, width, tol_m=tol_m, rel_tol=occlusion_rel_tol,
                                 near_m=near_m, threads=threads)
    return visibility_csr(mask)


def sample_visibility(sample_xyz: np.ndarray, poses: np.ndarray, K: np.ndarray, depth: np.ndarray, *,
                      rel_tol: float, abs_tol_m: np.ndarray | float, near_m: float, threads: int = 0) -> np.ndarray:
    """bool [C, S]: which of the samples [S, 3] each candidate [C, 4, 4] sees (the z-buffer rule
    of `points_visibility`) against its depth image [C, h, w] with intrinsics K [3, 3]."""
    _, height, width = depth.shape
    return points_visibility(sample_xyz, poses, K, depth, height, width, tol_m=abs_tol_m, rel_tol=rel_tol,
                             near_m=near_m, threads=threads)


def segment_rays(eyes: np.ndarray, samples: np.ndarray, rel_tol: float, abs_tol_m: float,
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
    near = segment_rays(eyes, sample_xyz, rel_tol, abs_tol_m, rays)
    hidden = raycaster.test_occlusions(o3d.core.Tensor.from_numpy(rays), tnear=0.0, tfar=1.0, nthreads=threads)
    return near | ~hidden.numpy().reshape(near.shape)
