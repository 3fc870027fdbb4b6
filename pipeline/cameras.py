"""Pinhole cameras: intrinsics, look-at poses, rays, projection and back-projection.

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

import numpy as np

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
