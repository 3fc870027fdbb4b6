"""Z-buffer splatting of point clouds (S3DIS rooms, LiDAR scans): a numba renderer.

Pure functions (no store I/O). Each point is a disc facing the camera whose world radius comes
from the local point spacing (metres: `local_spacing`), so a cloud renders without holes at any
density; its pixel radius is the world radius over its depth (capped). The nearest depth wins a
pixel. A pixel then keeps its point only if that point is visible in the view by
`pipeline.render.visibility.points_visibility` (not behind the z-buffer at its own pixel by more than
its own depth tolerance, also from its spacing).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from pipeline.render import visibility


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


def local_spacing(xyz: np.ndarray, *, k: int = 3, tree=None) -> np.ndarray:
    """Local point spacing float32 [N] (metres): the mean distance to the k nearest other points.

    Splat radii and depth tolerances scale with it, so that a dense region gets small discs and
    a sparse one (a far wall, LiDAR far field) large ones that still close the surface.
    """
    from scipy.spatial import cKDTree

    xyz = np.ascontiguousarray(xyz, dtype=np.float32)
    if len(xyz) < 2:
        return np.full(len(xyz), 0.05, np.float32)
    tree = tree if tree is not None else cKDTree(xyz, balanced_tree=False, compact_nodes=False)
    kq = min(k + 1, len(xyz))
    dist, _ = tree.query(xyz, k=kq, workers=-1)
    d = np.asarray(dist, np.float64).reshape(len(xyz), kq)[:, 1:]
    d = np.where(np.isfinite(d), d, np.nan)
    out = np.nanmean(d, axis=1)
    return np.where(np.isfinite(out) & (out > 0), out, np.nanmedian(out) if np.isfinite(out).any() else 0.05).astype(np.float32)


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
    depth_tol_m: float | np.ndarray | None = None,
    near_m: float = 0.05,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render a point cloud by z-buffer splatting (numba, one view per thread).

    A point is a disc facing the camera at its depth z, radius ``f * radius_m / z`` pixels (at
    most `max_radius_px`); it covers the pixels whose centres lie in the disc, and always the
    pixel its centre falls in. Points whose centre falls outside the image are not drawn. The
    nearest depth (float32) wins a pixel; equal depths go to the lower point id. A pixel then keeps
    its point only if that point is visible in the view (`pipeline.render.visibility.points_visibility`:
    not behind the z-buffer at its own pixel by more than its depth tolerance); its colour and
    depth stay either way.

    Args:
        xyz: float [N, 3]; rgb: uint8 [N, 3]; poses: [V, 4, 4]; K: [3, 3]; H, W: image size.
        radius_m: splat radius in metres, a scalar or float [N].
        depth_tol_m: depth tolerance of the visibility test, scalar or [N]; None = 2 x radius_m.

    Returns:
        rgb uint8 [V, H, W, 3], depth float16 [V, H, W] (0 = nothing),
        point_index int32 [V, H, W] (-1 = nothing or hidden at its own pixel).
    """
    tol = 2.0 * np.asarray(radius_m, dtype=np.float32) if depth_tol_m is None else depth_tol_m
    out = splat_views(xyz, rgb, poses, K, H, W, radius_m=radius_m, max_radius_px=max_radius_px,
                       depth_tol_m=tol, near_m=near_m)
    return out[0], out[1], out[2]


def splat_views(xyz, rgb, poses, K, H, W, *, radius_m, max_radius_px, depth_tol_m, near_m, threads=0):
    """`splat_points` plus the visibility mask bool [V, N] it used."""
    xyz = np.ascontiguousarray(xyz, dtype=np.float32)
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    poses = np.ascontiguousarray(poses, dtype=np.float64)
    K = np.ascontiguousarray(K, dtype=np.float64)
    radius = np.ascontiguousarray(np.broadcast_to(np.asarray(radius_m, dtype=np.float32), (len(xyz),)))
    n_views = len(poses)
    zbuf = np.empty((n_views, H, W), np.float32)
    index = np.empty((n_views, H, W), np.int32)
    _splat_kernel(xyz, radius, poses, K, H, W, float(max_radius_px), float(near_m), zbuf, index)
    hit = index >= 0
    depth16 = np.where(hit, zbuf, 0.0).astype(np.float16)
    out_rgb = np.zeros((n_views, H, W, 3), np.uint8)
    out_rgb[hit] = rgb[index[hit]]
    # visibility against the depth as stored (float16), so the stored arrays alone reproduce it
    visible = visibility.points_visibility(xyz, poses, K, depth16.astype(np.float32), H, W, tol_m=depth_tol_m,
                                           near_m=near_m, threads=threads)
    visibility.keep_visible(index.reshape(-1), visible, H * W)
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
