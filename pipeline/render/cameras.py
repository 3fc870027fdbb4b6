"""Pinhole cameras: intrinsics, look-at poses, rays, projection and back-projection; and the
render stage's camera choice (candidate positions in the free space of a room, headings and
pitches, scoring by exact occlusion rays, greedy cover).

Pure functions over arrays (no I/O); the render stage and the tests use them, and so can anyone
reading the stored views (`views/K`, `views/pose`). One convention everywhere:

- A pose is a 4x4 world->camera matrix: ``x_cam = R @ x_world + t``, OpenCV axes (x right,
  y down, z forward). The camera centre in the world is ``-R.T @ t``.
- ``K = [[f, 0, cx], [0, f, cy], [0, 0, 1]]`` in pixels. Pixel (column u, row v) has its centre at
  the integer coordinates (u, v), so the image centre is ``((W - 1) / 2, (H - 1) / 2)``. A
  projected point falls in pixel ``floor(u + 0.5), floor(v + 0.5)``.
- Depth is the z coordinate in the camera frame (metres), not the distance along the ray.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
from numba import njit, prange

from pipeline.parallel import use_parallel

WORLD_UP = np.array([0.0, 0.0, 1.0])
"""The store's up axis (z up, metres)."""


def intrinsics(width: int, height: int, hfov_deg: float) -> np.ndarray:
    """Pinhole intrinsics with square pixels and the principal point at the image centre.

    Args:
        width, height: image size in pixels.
        hfov_deg: horizontal field of view in degrees (0 < hfov < 180).

    Returns:
        K: float64 [3, 3].
    """
    if not 0.0 < hfov_deg < 180.0:
        raise ValueError(f"horizontal field of view must be in (0, 180) degrees, got {hfov_deg}")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    f = 0.5 * width / np.tan(np.deg2rad(hfov_deg) / 2.0)
    return np.array([[f, 0.0, (width - 1) / 2.0], [0.0, f, (height - 1) / 2.0], [0.0, 0.0, 1.0]])


def vertical_fov_deg(K: np.ndarray, height: int) -> float:
    """The vertical field of view (degrees) of intrinsics `K` [3, 3] for an image `height` tall."""
    return float(np.rad2deg(2.0 * np.arctan(0.5 * height / K[1, 1])))


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray = WORLD_UP) -> np.ndarray:
    """World->camera pose of a camera at `eye` [3] looking at `target` [3], no roll.

    Returns:
        pose: float64 [4, 4], OpenCV axes (x right, y down, z forward).
    """
    eye = np.asarray(eye, dtype=np.float64)
    forward = np.asarray(target, dtype=np.float64) - eye
    norm = np.linalg.norm(forward)
    if norm == 0.0:
        raise ValueError("look_at: eye and target coincide")
    forward /= norm
    right = np.cross(forward, np.asarray(up, dtype=np.float64))
    if np.linalg.norm(right) < 1e-9:
        raise ValueError("look_at: viewing direction is parallel to the up vector")
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, down, forward])
    pose[:3, 3] = -pose[:3, :3] @ eye
    return pose


def heading_poses(eye: np.ndarray, yaw_rad: np.ndarray, pitch_rad: float) -> np.ndarray:
    """Poses of cameras at `eye` [3] looking along headings `yaw_rad` [Y] (from +x towards +y).

    `pitch_rad` < 0 tilts the cameras down (|pitch| < 90 degrees). Returns float64 [Y, 4, 4]
    world->camera poses, no roll (the same as `look_at` towards eye + forward).
    """
    yaw = np.atleast_1d(np.asarray(yaw_rad, dtype=np.float64))
    eye = np.asarray(eye, dtype=np.float64)
    cp, sp = np.cos(pitch_rad), np.sin(pitch_rad)
    cy, sy = np.cos(yaw), np.sin(yaw)
    forward = np.stack([cp * cy, cp * sy, np.full_like(yaw, sp)], -1)
    right = np.stack([sy, -cy, np.zeros_like(yaw)], -1)  # forward x up, normalised
    down = np.cross(forward, right)
    poses = np.tile(np.eye(4), (len(yaw), 1, 1))
    poses[:, :3, :3] = np.stack([right, down, forward], 1)
    poses[:, :3, 3] = -poses[:, :3, :3] @ eye
    return poses


def camera_centres(poses: np.ndarray) -> np.ndarray:
    """Camera centres in the world [V, 3] of world->camera `poses` [V, 4, 4]."""
    poses = np.asarray(poses, dtype=np.float64)
    return -np.einsum("vji,vj->vi", poses[:, :3, :3], poses[:, :3, 3])


def camera_directions(K: np.ndarray, height: int, width: int) -> np.ndarray:
    """Ray directions through every pixel centre in the camera frame, z component 1.

    Returns float64 [H * W, 3], row-major over (row, column). Because z = 1, a ray's hit
    parameter t along such a direction is the hit's z-depth.
    """
    K = np.asarray(K, dtype=np.float64)
    cols, rows = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    x = (cols.ravel() - K[0, 2]) / K[0, 0]
    y = (rows.ravel() - K[1, 2]) / K[1, 1]
    return np.stack([x, y, np.ones_like(x)], -1)


def pixel_rays(K: np.ndarray, poses: np.ndarray, height: int, width: int) -> np.ndarray:
    """Rays (origin, direction) in the world through every pixel centre of every view.

    Args:
        K: [3, 3] intrinsics shared by the views.
        poses: [V, 4, 4] world->camera.

    Returns:
        rays: float32 [V, H * W, 6] = (ox, oy, oz, dx, dy, dz); the direction's camera z is 1,
        so the hit parameter is the z-depth (the layout Open3D's `cast_rays` takes).
    """
    poses = np.asarray(poses, dtype=np.float64)
    dirs_cam = camera_directions(K, height, width)
    rays = np.empty((len(poses), height * width, 6), dtype=np.float32)
    rays[:, :, :3] = camera_centres(poses)[:, None, :]
    for v, pose in enumerate(poses):  # a loop over views (a few dozen), each a vectorised matmul
        rays[v, :, 3:] = dirs_cam @ pose[:3, :3]  # row form of R^T d
    return rays


def project(xyz: np.ndarray, K: np.ndarray, pose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project world points into one camera.

    Args:
        xyz: [N, 3] world points.
        K: [3, 3]; pose: [4, 4] world->camera.

    Returns:
        uv: float64 [N, 2] pixel coordinates (column, row), NaN where z <= 0.
        z: float64 [N] depth in the camera frame.
    """
    pose = np.asarray(pose, dtype=np.float64)
    cam = np.asarray(xyz, dtype=np.float64) @ pose[:3, :3].T + pose[:3, 3]
    z = cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = K[0, 0] * cam[:, 0] / z + K[0, 2]
        v = K[1, 1] * cam[:, 1] / z + K[1, 2]
    uv = np.stack([u, v], -1)
    uv[z <= 0] = np.nan
    return uv, z


def pixel_of(uv: np.ndarray) -> np.ndarray:
    """The integer pixel (column, row) [N, 2] holding each projected point `uv` [N, 2]."""
    return np.floor(np.asarray(uv) + 0.5).astype(np.int64)


def backproject(depth: np.ndarray, K: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """World positions of every pixel's surface point from a z-depth image.

    Args:
        depth: [H, W] z-depth in metres (0 = nothing).
        K: [3, 3]; pose: [4, 4] world->camera.

    Returns:
        xyz: float64 [H, W, 3] world points, NaN where depth is 0.
    """
    height, width = depth.shape
    pose = np.asarray(pose, dtype=np.float64)
    d = np.asarray(depth, dtype=np.float64).reshape(-1, 1)
    cam = camera_directions(K, height, width) * d
    world = (cam - pose[:3, 3]) @ pose[:3, :3]  # R^T (x_cam - t) in row form
    world[d[:, 0] <= 0] = np.nan
    return world.reshape(height, width, 3)


# --- camera choice of the render stage -----------------------------------------------------------


def heading_grid(positions: np.ndarray, yaw: np.ndarray, pitches_rad: Sequence[float]) -> np.ndarray:
    """`heading_poses` at every position [P, 3] for every pitch: float64 [P * len(pitches) * Y,
    4, 4], position-major, then pitch, then yaw (the rotations are shared; only the
    translations differ)."""
    rot = np.concatenate([heading_poses(np.zeros(3), yaw, float(p)) for p in pitches_rad])
    poses = np.repeat(rot[None], len(positions), axis=0)
    poses[:, :, :3, 3] = -np.einsum("yij,pj->pyi", rot[:, :3, :3], np.asarray(positions, dtype=np.float64))
    return poses.reshape(-1, 4, 4)


@njit(inline="always")
def _candidate_seen_position(p, xyz, poses, K, height, width, near, clear, per_position, seen):
    """Candidates p * per_position ... of position p: each sample unoccluded from p is loaded once
    and projected into each of them."""
    for s in range(xyz.shape[0]):
        if not clear[p, s]:
            continue
        x = np.float64(xyz[s, 0])
        y = np.float64(xyz[s, 1])
        z = np.float64(xyz[s, 2])
        for c in range(p * per_position, (p + 1) * per_position):
            cz = poses[c, 2, 0] * x + poses[c, 2, 1] * y + poses[c, 2, 2] * z + poses[c, 2, 3]
            if cz <= near:
                continue
            cx = poses[c, 0, 0] * x + poses[c, 0, 1] * y + poses[c, 0, 2] * z + poses[c, 0, 3]
            col = math.floor(K[0, 0] * cx / cz + K[0, 2] + 0.5)
            if col < 0 or col >= width:
                continue
            cy = poses[c, 1, 0] * x + poses[c, 1, 1] * y + poses[c, 1, 2] * z + poses[c, 1, 3]
            row = math.floor(K[1, 1] * cy / cz + K[1, 2] + 0.5)
            seen[c, s] = row >= 0 and row < height


@njit(parallel=True, cache=True)
def _candidate_seen_par(xyz, poses, K, height, width, near, clear, per_position, seen):  # pragma: no cover
    """seen[c, s] (zeroed by the caller): sample s is unoccluded from candidate c's position
    (clear[c // per_position, s]) and projects into c's image in front of the near plane.
    Candidates come position-major, per_position of them at each position."""
    for p in prange(poses.shape[0] // per_position):
        _candidate_seen_position(p, xyz, poses, K, height, width, near, clear, per_position, seen)


@njit(cache=True)
def _candidate_seen_ser(xyz, poses, K, height, width, near, clear, per_position, seen):  # pragma: no cover
    """Serial `_candidate_seen_par`."""
    for p in range(poses.shape[0] // per_position):
        _candidate_seen_position(p, xyz, poses, K, height, width, near, clear, per_position, seen)


def candidate_seen(sample_xyz: np.ndarray, poses: np.ndarray, K: np.ndarray, height: int, width: int, *,
                   near_m: float, clear: np.ndarray, per_position: int, threads: int = 0) -> np.ndarray:
    """bool [C, S]: sample s [S, 3] is unoccluded from candidate c's position (clear [P, S], the
    candidates [C, 4, 4] position-major, `per_position` at each) and projects into c's image
    (K [3, 3], height x width) in front of `near_m`."""
    seen = np.zeros((len(poses), len(sample_xyz)), np.bool_)
    kernel = _candidate_seen_par if use_parallel(seen.size, threads) else _candidate_seen_ser
    kernel(sample_xyz, poses, K, height, width, float(near_m), clear, per_position, seen)
    return seen


@njit(cache=True)
def _greedy_cover_kernel(seen, covered, allowed, max_views, target, min_gain, chosen):  # pragma: no cover
    """See `greedy_cover`: covered, allowed updated in place; chosen int64 [max_views] filled;
    returns how many were chosen. Gains are kept up to date by subtracting, for each choice,
    what it newly covers (a few columns a round: C x S work in all, not C x S a round)."""
    n_cand, n_samples = seen.shape
    gain = np.zeros(n_cand, np.int64)
    for c in range(n_cand):
        g = 0
        for s in range(n_samples):  # sums, not branches: seen is too irregular to predict
            g += np.int64(seen[c, s] & ~covered[s])
        gain[c] = g
    n_covered = 0
    for s in range(n_samples):
        if covered[s]:
            n_covered += 1
    new = np.empty(n_samples, np.int64)
    n_chosen = 0
    while n_chosen < max_views and n_covered / n_samples < target:
        best = -1
        best_gain = -1
        for c in range(n_cand):  # the first of the largest gains among the allowed
            if allowed[c] and gain[c] > best_gain:
                best = c
                best_gain = gain[c]
        if best < 0 or best_gain < max(1, min_gain):
            break
        chosen[n_chosen] = best
        n_chosen += 1
        allowed[best] = False
        n_new = 0
        for s in range(n_samples):
            if seen[best, s] and not covered[s]:
                new[n_new] = s
                n_new += 1
                covered[s] = True
        for c in range(n_cand):
            g = 0
            for k in range(n_new):
                g += np.int64(seen[c, new[k]])
            gain[c] -= g
        n_covered += n_new
    return n_chosen


def greedy_cover(seen: np.ndarray, *, max_views: int, target: float, covered: np.ndarray | None = None,
                 allowed: np.ndarray | None = None, min_gain: int = 1) -> tuple[list[int], np.ndarray]:
    """Choose candidates greedily by how many not-yet-covered samples each adds.

    Args:
        seen: bool [C, S] candidate c sees sample s.
        max_views: most candidates to choose.
        target: stop once this fraction of the S samples is covered.
        covered: bool [S] samples already covered (default none).
        allowed: bool [C] candidates that may be chosen (default all).
        min_gain: stop when the best candidate adds fewer new samples than this.

    Returns:
        chosen candidate ids in order (ties: the lowest id), and the covered mask [S] afterwards.
    """
    seen = np.ascontiguousarray(seen, dtype=np.bool_)
    n_cand, n_samples = seen.shape
    covered = np.zeros(n_samples, np.bool_) if covered is None else np.array(covered, dtype=np.bool_)
    allowed = np.ones(n_cand, np.bool_) if allowed is None else np.array(allowed, dtype=np.bool_)
    if not n_samples or max_views <= 0:
        return [], covered
    chosen = np.empty(max_views, np.int64)
    n = _greedy_cover_kernel(seen, covered, allowed, int(max_views), float(target), int(min_gain), chosen)
    return [int(c) for c in chosen[:n]], covered


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


def xy_bounds(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) of x and y, float64 [2] each (per column: numpy's axis-0 reductions of an
    [N, 3] array are ~25x slower)."""
    lo = np.array([xyz[:, 0].min(), xyz[:, 1].min()], dtype=np.float64)
    hi = np.array([xyz[:, 0].max(), xyz[:, 1].max()], dtype=np.float64)
    return lo, hi


def candidate_positions(xyz: np.ndarray, cfg: Any, clearance: Callable[[np.ndarray], np.ndarray],
                        rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Eye positions [P, 3] on a grid over the scan's footprint, at 1.2-1.6 m (config) above the
    floor, at least `clearance_m` from every surface (`clearance(points [Q, 3]) -> dist [Q]`).
    Returns the positions and the floor height."""
    lo, hi = xy_bounds(xyz)
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


def spacing_of_mesh(xyz: np.ndarray, faces: np.ndarray, rng: np.random.Generator) -> float:
    sample = faces[rng.integers(0, len(faces), size=4096)]
    edges = np.linalg.norm(xyz[sample[:, 0]] - xyz[sample[:, 1]], axis=1)
    return float(np.median(edges)) if len(edges) else 0.05


def spacing_of_points(tree: Any, xyz: np.ndarray, rng: np.random.Generator) -> float:
    sample = xyz[rng.choice(len(xyz), size=min(len(xyz), 4000), replace=False)]
    dist, _ = tree.query(sample, k=2)
    d = dist[:, 1][np.isfinite(dist[:, 1])]
    return float(np.median(d)) if len(d) else 0.05


def reach(xyz: np.ndarray, cfg: Any) -> float:
    """A distance beyond every surface as seen from any candidate position (metres)."""
    lo = np.array([xyz[:, k].min() for k in range(3)], dtype=np.float64)  # per column: see xy_bounds
    hi = np.array([xyz[:, k].max() for k in range(3)], dtype=np.float64)
    return 2.0 * (float(np.linalg.norm(hi - lo)) + max(cfg.eye_height_m)) + 1.0


def probe_candidates(raycaster: Any, K_low: np.ndarray, h_low: int, w_low: int, cand: np.ndarray,
                      positions: np.ndarray, samples: np.ndarray, *, cfg: Any,
                      reach: float) -> tuple[np.ndarray, np.ndarray]:
    """Meshes: two questions about the candidates, by `test_occlusions` (any hit, cheaper than
    `cast_rays`' closest hit with all its outputs): first tiny renders, then exact occlusion rays
    from the positions inside the scan only (see `min_hit_fraction`; the others see nothing).

    Returns:
        low_hit: bool [C, h_low * w_low], the low-resolution pixels of each candidate [C, 4, 4]
        that show a surface (directions have camera z = 1, scaled so t = 1 is `reach` metres away
        or more: every surface of the scene);
        clear: bool [P, S], nothing hides sample s [S, 3] from position p [P, 3]
        (`pipeline.render.visibility.unoccluded_from`); False for positions outside the scan.
    """
    import open3d as o3d

    from pipeline.render.raycast import fill_rays
    from pipeline.render.visibility import segment_rays

    n_low = len(cand) * h_low * w_low
    rays = np.empty((n_low, 6), np.float32)
    fill_rays(np.ascontiguousarray(K_low, dtype=np.float64), np.ascontiguousarray(cand, dtype=np.float64),
               h_low, w_low, rays, cfg.threads)
    rays[:, 3:] *= np.float32(reach)
    low_hit = raycaster.test_occlusions(o3d.core.Tensor.from_numpy(rays), tnear=0.0, tfar=1.0,
                                        nthreads=cfg.threads).numpy().reshape(len(cand), -1)
    fraction = low_hit.reshape(len(positions), -1).mean(1)
    inside = fraction >= cfg.min_hit_fraction
    if not inside.any():
        inside[int(np.argmax(fraction))] = True
    clear = np.zeros((len(positions), len(samples)), np.bool_)
    seg = np.empty((int(inside.sum()) * len(samples), 6), np.float32)
    # the exact visibility rule of the stage (no relative band, `visibility_tol_m`)
    near = segment_rays(positions[inside], samples, 0.0, cfg.visibility_tol_m, seg)
    hit = raycaster.test_occlusions(o3d.core.Tensor.from_numpy(seg), tnear=0.0, tfar=1.0, nthreads=cfg.threads).numpy()
    clear[inside] = near | ~hit.reshape(near.shape)
    return low_hit, clear
