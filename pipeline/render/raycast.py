"""Ray casting of triangle meshes: Open3D's `RaycastingScene` (Embree on the CPU, no display).

Pure functions (no store I/O): pixel rays of pinhole cameras (a numba kernel), one `cast_rays`
call for the rays of several views, and a fused numba pass that gives each pixel the barycentric
colour of the triangle it hits and the point it shows: the hit triangle's corner nearest (in
metres) to the surface point the pixel sees, among the corners visible in the view (exactly,
`pipeline.render.visibility.mesh_visibility`), else the next nearest; -1 if none.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

from pipeline import parallel
from pipeline.render import visibility

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


def fill_rays(K: np.ndarray, poses: np.ndarray, height: int, width: int, rays: np.ndarray, threads: int) -> None:
    """Fill rays float32 [V * H * W, 6] (see `make_rays`); K, poses float64, contiguous."""
    kernel = _make_rays_par if parallel.use_parallel(rays.shape[0], threads) else _make_rays_ser
    kernel(K, poses, height, width, rays)


@njit(inline="always")
def _shade_assign_span(lo, hi, t_hit, prim, uvs, depth_bits, faces, xyz, rgb, visible_row, out_rgb, out_index):
    """Pixels lo..hi of one view in a batch: the barycentric colour of the hit (black on a
    miss), and the hit triangle's corner nearest to the hit point that is visible in the view
    (visible_row[vertex], the view's row of the mask), else the next nearest; -1 if none or
    nothing drawn. (A loop over pixels, not an inlined function a pixel: the serial driver
    around a per-pixel body ran at half this speed.)"""
    for p in range(lo, hi):
        if depth_bits[p] == 0 and not np.isfinite(t_hit[p]):  # a miss (the depth bits: cheaper first)
            out_index[p] = -1
            out_rgb[p, 0] = 0
            out_rgb[p, 1] = 0
            out_rgb[p, 2] = 0
            continue
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
        if depth_bits[p] == 0:  # float16 depth 0: nothing drawn (nonzero bits of a depth >= 0: > 0)
            out_index[p] = -1
            continue
        va = visible_row[a]
        vb = visible_row[b]
        vc = visible_row[c]
        if not (va or vb or vc):
            out_index[p] = -1
            continue
        wb = np.float64(u)
        wc = np.float64(v)
        wa = 1.0 - wb - wc
        # the hit point from its barycentric coordinates, and its squared distance to each corner
        da = 0.0
        db = 0.0
        dc = 0.0
        for k in range(3):
            xa = xyz[a, k]
            xb = xyz[b, k]
            xc = xyz[c, k]
            h = wa * xa + wb * xb + wc * xc
            da += (h - xa) ** 2
            db += (h - xb) ** 2
            dc += (h - xc) ** 2
        # the nearest visible corner, ties in the face's order (= the first visible one of the
        # corners sorted stably by distance)
        best = -1
        d_best = np.inf
        if va:
            best = a
            d_best = da
        if vb and db < d_best:
            best = b
            d_best = db
        if vc and dc < d_best:
            best = c
        out_index[p] = best


@njit(parallel=True, cache=True)
def _shade_assign_par(t_hit, prim, uvs, depth_bits, faces, xyz, rgb, visible, height, width, out_rgb, out_index):
    """`_shade_assign_span` for every pixel of a batch of views [V * H * W], a row at a time
    (depth_bits: the stored float16 depths viewed as uint16; visible bool [V, N])."""
    for r in prange(t_hit.shape[0] // width):
        _shade_assign_span(r * width, (r + 1) * width, t_hit, prim, uvs, depth_bits, faces, xyz, rgb,
                           visible[r // height], out_rgb, out_index)


@njit(cache=True)
def _shade_assign_ser(t_hit, prim, uvs, depth_bits, faces, xyz, rgb, visible, height, width, out_rgb, out_index):
    """Serial `_shade_assign_par`, a view at a time."""
    hw = height * width
    for view in range(t_hit.shape[0] // hw):
        _shade_assign_span(view * hw, (view + 1) * hw, t_hit, prim, uvs, depth_bits, faces, xyz, rgb,
                           visible[view], out_rgb, out_index)


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
    fill_rays(np.ascontiguousarray(K, dtype=np.float64), poses, height, width, rays.reshape(-1, 6), threads)
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
    visibility_tol_m: float = 0.01,
    threads: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray cast a vertex-coloured mesh from several cameras.

    Args:
        xyz: float32 [N, 3] vertices; rgb: uint8 [N, 3]; faces: int [F, 3].
        poses: [V, 4, 4] world->camera (OpenCV); K: [3, 3] intrinsics shared by the views.
        H, W: image size.
        raycaster: a `build_raycaster(xyz, faces)` to reuse (built here when None).
        views_per_batch: views cast per `cast_rays` call.
        occlusion_rel_tol, occlusion_abs_tol_m: the depth band of the cheap pre-test (points
            further behind every depth around their pixel are hidden without a ray).
        visibility_tol_m: a vertex is visible when the ray from the camera reaches it within this.

    Returns:
        rgb: uint8 [V, H, W, 3] barycentric colours (black where nothing is hit);
        depth: float16 [V, H, W] z-depth in metres (0 = nothing);
        point_index: int32 [V, H, W] the hit triangle's vertex nearest to the hit point that is
        visible in the view (`pipeline.render.visibility.mesh_visibility`), else the next; -1 if none.
    """
    out = mesh_views(xyz, rgb, faces, poses, K, H, W, raycaster=raycaster, views_per_batch=views_per_batch,
                      tol=(occlusion_rel_tol, occlusion_abs_tol_m, near_m), visibility_tol_m=visibility_tol_m,
                      threads=threads)
    return out[0], out[1], out[2]


def mesh_views(xyz, rgb, faces, poses, K, H, W, *, raycaster, views_per_batch, tol, visibility_tol_m, threads):
    """`render_mesh_views` plus the visibility mask bool [V, N] it used and the number of
    occlusion rays it cast."""
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
    occlusion_rays = 0
    for start in range(0, n_views, batch):
        stop = min(n_views, start + batch)
        n_pix = (stop - start) * hw
        fill_rays(K, poses[start:stop], H, W, rays[:n_pix], threads)
        hits = cast(raycaster, rays[:n_pix], threads=threads)
        t_hit = hits["t_hit"]
        dq = np.where(np.isfinite(t_hit), t_hit, np.float32(0.0))  # full precision, for the visibility
        d16 = out_depth[start:stop].reshape(-1)
        d16[...] = dq
        occlusion_rays += visibility.mesh_visibility(
            raycaster, xyz, poses[start:stop], K, dq, H, W, tol_m=visibility_tol_m, pre_rel=tol[0], pre_abs_m=tol[1],
            near_m=tol[2], threads=threads, out=visible[start:stop])[1]
        kernel = _shade_assign_par if parallel.use_parallel(n_pix, threads) else _shade_assign_ser
        kernel(t_hit, hits["primitive_ids"], hits["primitive_uvs"], d16.view(np.uint16), faces, xyz, rgb,
               visible[start:stop], H, W, out_rgb[start:stop].reshape(-1, 3), out_index[start:stop].reshape(-1))
    return out_rgb, out_depth, out_index, visible, occlusion_rays
