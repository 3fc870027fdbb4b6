"""Over-segmentation: normals, curvature, Point Feature Histograms, region growing, segment graph.

Reads `points/xyz`, `points/rgb`, `points/semantic` and `mesh/faces` (when the scene is a mesh);
writes the `overseg` group: `schema.NORMAL, CURVATURE, SEGMENT, BOUNDARY, SEMANTIC_BOUNDARY,
ADJACENCY, ADJACENCY_BORDER`.

The pure core `overseg_points` runs, on arrays:
1. k nearest neighbours (`pipeline.neighbours.knn`, optionally radius-bounded);
2. normals (area-weighted mesh vertex normals, or PCA oriented towards a viewpoint);
   then, so that segments follow the surface and not its sampling (`voxel_m` > 0): the points
   are pooled into surface voxels (a `voxel_m` cell and one of six normal directions, so the
   two sides of a thin slab stay apart) and everything below runs on the voxels (centroid,
   mean colour, mean normal), with neighbourhoods, thresholds and the smallest segment size in
   metres; each point takes its voxel's segment. The same surface sampled 1x or 12x as densely
   gives about the same segments (and a dense cloud costs little more than its neighbour search);
   the surface variation l0 / (l0 + l1 + l2) as curvature, over the neighbours within the tangent
   band (so the far side of a thin slab, or a picture on a wall, does not look like curvature);
3. Rusu's Point Feature Histograms: the Darboux-frame angles (alpha, phi, theta) of every point
   pair of a small neighbourhood, binned bins**3 and normalised;
4. region growing in order of increasing curvature: a neighbour joins when the normal angle, its
   offset from the current point's tangent plane, the PFH affinity (histogram intersection) and
   the colour distance (to the neighbour and to the segment's mean) pass; points above the seed
   curvature join but do not spread; an optional radius cap keeps segments region-sized;
5. small segments merged into their most similar adjacent segment (normal and colour);
6. boundary flags, semantic-boundary flags and the segment adjacency graph with border sizes.

Every kernel is numba (`cache=True`, no fastmath: fastmath changes floor() at PFH bin edges).
Parallel kernels write one row per point; the growing and merging are sequential; so results do
not depend on the thread count.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit, prange

from pipeline import schema
from pipeline.config import config_hash, to_dict
from pipeline.executor import SceneResult
from pipeline.neighbours import knn
from pipeline.readers.base import SceneError
from pipeline.store import Store


@dataclass(frozen=True)
class OversegConfig:
    """Thresholds of the over-segmentation (defaults tuned on synthetic ScanNet-like rooms)."""

    k_neighbours: int = 16
    """Neighbours per point (and per voxel) for PCA, growing, merging and boundaries."""
    voxel_m: float = 0.02
    """Side of the surface voxels that segments are grown on (metres); 0 = grow on the points
    themselves (then counts depend on the sampling density)."""
    voxel_radius_factor: float = 2.5
    """Boundaries and the segment graph link voxels within this many `voxel_m` (a band of fixed
    width in metres at any density; the nearest 4 always count, for sparse LiDAR far field).
    Growing uses the k nearest voxels (bounded by `radius_m` when set)."""
    min_segment_area_m2: float = 0.01
    """With voxels: segments covering fewer than this many square metres (area / voxel_m**2
    voxels) are merged into their most similar neighbour (replaces `min_segment_points`)."""
    radius_m: float = 0.0
    """Drop neighbours farther than this (metres); 0 = plain kNN. Useful for sparse LiDAR far field."""
    k_pfh: int = 8
    """Neighbours (besides the point) whose pairs make a point's PFH: (k+1)k/2 pairs."""
    pfh_bins: int = 5
    """Bins per PFH angle; the histogram has pfh_bins**3 entries."""
    max_normal_angle_deg: float = 15.0
    """A neighbour joins only if its normal is within this angle of the current point's (unsigned)."""
    max_plane_offset_m: float = 0.01
    """...and it lies within this distance of the current point's tangent plane (keeps pictures,
    doors and objects standing a little in front of a wall out of the wall)."""
    min_pfh_affinity: float = 0.25
    """...and the histogram intersection of their PFHs is at least this (0..1)."""
    max_colour_dist: float = 40.0
    """...and their (neighbourhood-smoothed) RGB colours differ by at most this (0..255 units)..."""
    max_colour_dist_segment: float = 20.0
    """...and its smoothed colour is within this of the segment's running mean colour."""
    max_seed_curvature: float = 0.05
    """Points with higher curvature do not spread a segment they join; those that no segment
    reaches seed their own after all flatter seeds (and are usually merged as small segments)."""
    max_segment_radius_m: float = 0.4
    """A point joins only within this distance of the segment's seed; 0 = unbounded. Keeps large
    planes (floors, walls) in region-sized pieces like ScanNet's shipped segments."""
    min_segment_points: int = 30
    """Segments with fewer points are merged into their most similar adjacent segment."""
    merge_colour_scale: float = 100.0
    """Merging score = |cos(normal angle)| - colour distance / this (RGB units)."""
    colour_smoothing: bool = True
    """Denoise colours before the colour tests: average with the neighbours within the tangent
    band (max_plane_offset_m) whose colour is within max_colour_dist (see `smooth_colours`)."""

    def __post_init__(self) -> None:
        if self.k_neighbours < 3 or not 2 <= self.k_pfh <= min(22, self.k_neighbours):
            raise ValueError(f"overseg: need 3 <= k_neighbours and 2 <= k_pfh <= min(22, k_neighbours), got "
                             f"k_neighbours={self.k_neighbours} k_pfh={self.k_pfh}")
        if not 2 <= self.pfh_bins <= 12:
            raise ValueError(f"overseg: pfh_bins must be in 2..12, got {self.pfh_bins}")
        if not 0.0 < self.max_normal_angle_deg <= 180.0:
            raise ValueError(f"overseg: max_normal_angle_deg must be in (0, 180], got {self.max_normal_angle_deg}")
        for name in ("radius_m", "voxel_m", "voxel_radius_factor", "min_segment_area_m2", "max_plane_offset_m", "max_colour_dist", "max_colour_dist_segment",
                     "max_seed_curvature", "max_segment_radius_m", "min_pfh_affinity", "merge_colour_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"overseg: {name} must be >= 0, got {getattr(self, name)}")
        if self.merge_colour_scale == 0:
            raise ValueError("overseg: merge_colour_scale must be > 0")
        if self.min_segment_points < 1:
            raise ValueError(f"overseg: min_segment_points must be >= 1, got {self.min_segment_points}")


@dataclass
class OversegResult:
    """The over-segmentation of one scene (all arrays per point unless said otherwise)."""

    normal: np.ndarray
    """float32 [N, 3] unit normals."""
    curvature: np.ndarray
    """float32 [N] surface variation l0 / (l0 + l1 + l2), 0 (plane) .. 1/3 (isotropic)."""
    segment: np.ndarray
    """int32 [N] segment id in 0..S-1."""
    boundary: np.ndarray
    """uint8 [N] 1 where a neighbour is in another segment."""
    semantic_boundary: np.ndarray
    """uint8 [N] 1 where a labelled neighbour has another label, 0 where not, 255 where unknown."""
    adjacency: np.ndarray
    """int32 [P, 2] adjacent segment pairs, a < b, sorted."""
    adjacency_border: np.ndarray
    """int32 [P] points (of either segment) that have a neighbour in the other segment."""
    timings: dict[str, float]
    """Seconds per step."""

    @property
    def n_segments(self) -> int:
        return int(self.segment.max()) + 1 if len(self.segment) else 0


# --------------------------------------------------------------------------------------------
# normals and curvature
# --------------------------------------------------------------------------------------------
def mesh_vertex_normals(xyz: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals of a triangle mesh (the faces' winding gives the side).

    Args:
        xyz: float [N, 3] vertices. faces: int [F, 3] vertex ids.

    Returns:
        float64 [N, 3], unit where the vertex touches a non-degenerate face, else zero.
    """
    v = np.asarray(xyz, np.float64)
    f = np.asarray(faces, np.int64)
    n = len(v)
    # the cross product's length is twice the face area: summing it weights faces by area
    face_n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    ids = f.ravel()
    out = np.empty((n, 3), np.float64)
    for c in range(3):  # 3 bincounts over all corners, no loop over points
        out[:, c] = np.bincount(ids, weights=np.repeat(face_n[:, c], 3), minlength=n)
    length = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, length, out=np.zeros_like(out), where=length > 1e-20)


@njit(cache=True)
def _smallest_eigen(cov):  # pragma: no cover - compiled
    """Smallest eigenvalue, trace and a unit eigenvector of the smallest eigenvalue of a symmetric
    3x3 matrix, in closed form (trigonometric eigenvalues, eigenvector from the largest cross
    product of two rows of A - l0 I): ~20x faster than a LAPACK call per point."""
    scale = 0.0
    for a in range(3):
        for b in range(3):
            scale = max(scale, abs(cov[a, b]))
    if scale == 0.0:
        return 0.0, 0.0, 0.0, 0.0, 1.0
    a00, a01, a02 = cov[0, 0] / scale, cov[0, 1] / scale, cov[0, 2] / scale
    a11, a12, a22 = cov[1, 1] / scale, cov[1, 2] / scale, cov[2, 2] / scale
    q = (a00 + a11 + a22) / 3.0
    p1 = a01 * a01 + a02 * a02 + a12 * a12
    b00, b11, b22 = a00 - q, a11 - q, a22 - q
    p2 = b00 * b00 + b11 * b11 + b22 * b22 + 2.0 * p1
    if p2 <= 1e-30:  # isotropic: every direction is an eigenvector
        return q * scale, 3.0 * q * scale, 0.0, 0.0, 1.0
    p = np.sqrt(p2 / 6.0)
    det = (b00 * (b11 * b22 - a12 * a12) - a01 * (a01 * b22 - a12 * a02) + a02 * (a01 * a12 - b11 * a02))
    r = det / (2.0 * p * p * p)
    r = min(max(r, -1.0), 1.0)
    phi = np.arccos(r) / 3.0
    l0 = q + 2.0 * p * np.cos(phi + 2.0 * np.pi / 3.0)  # the smallest of the three
    l0 = max(l0, 0.0)
    # rows of A - l0 I; the eigenvector is orthogonal to all of them
    r0x, r0y, r0z = a00 - l0, a01, a02
    r1x, r1y, r1z = a01, a11 - l0, a12
    r2x, r2y, r2z = a02, a12, a22 - l0
    c0x, c0y, c0z = r0y * r1z - r0z * r1y, r0z * r1x - r0x * r1z, r0x * r1y - r0y * r1x
    c1x, c1y, c1z = r0y * r2z - r0z * r2y, r0z * r2x - r0x * r2z, r0x * r2y - r0y * r2x
    c2x, c2y, c2z = r1y * r2z - r1z * r2y, r1z * r2x - r1x * r2z, r1x * r2y - r1y * r2x
    n0 = c0x * c0x + c0y * c0y + c0z * c0z
    n1 = c1x * c1x + c1y * c1y + c1z * c1z
    n2 = c2x * c2x + c2y * c2y + c2z * c2z
    if n0 >= n1 and n0 >= n2:
        ex, ey, ez, nn = c0x, c0y, c0z, n0
    elif n1 >= n2:
        ex, ey, ez, nn = c1x, c1y, c1z, n1
    else:
        ex, ey, ez, nn = c2x, c2y, c2z, n2
    if nn <= 0.0:
        return l0 * scale, 3.0 * q * scale, 0.0, 0.0, 1.0
    nn = np.sqrt(nn)
    return l0 * scale, 3.0 * q * scale, ex / nn, ey / nn, ez / nn


@njit(parallel=True, cache=True)
def _pca_kernel(xyz, nbr, ref_normal, band):  # pragma: no cover - compiled
    n, k = nbr.shape
    normal = np.zeros((n, 3), np.float64)
    curvature = np.ones(n, np.float64)
    for i in prange(n):
        ids = np.empty(k + 1, np.int64)
        ids[0] = i
        m = 1
        r0, r1, r2 = ref_normal[i, 0], ref_normal[i, 1], ref_normal[i, 2]
        filtered = band > 0 and (r0 != 0.0 or r1 != 0.0 or r2 != 0.0)
        for t in range(k):
            j = nbr[i, t]
            if j < 0:
                break
            if filtered:
                off = r0 * (xyz[j, 0] - xyz[i, 0]) + r1 * (xyz[j, 1] - xyz[i, 1]) + r2 * (xyz[j, 2] - xyz[i, 2])
                if abs(off) > band:
                    continue
            ids[m] = j
            m += 1
        if m < 3:
            if filtered:
                normal[i, 0], normal[i, 1], normal[i, 2] = r0, r1, r2
            else:
                normal[i, 2] = 1.0
            continue
        mx, my, mz = 0.0, 0.0, 0.0
        for q in range(m):
            mx += xyz[ids[q], 0]
            my += xyz[ids[q], 1]
            mz += xyz[ids[q], 2]
        mx /= m
        my /= m
        mz /= m
        cov = np.zeros((3, 3), np.float64)
        for q in range(m):
            p = ids[q]
            dx, dy, dz = xyz[p, 0] - mx, xyz[p, 1] - my, xyz[p, 2] - mz
            cov[0, 0] += dx * dx
            cov[0, 1] += dx * dy
            cov[0, 2] += dx * dz
            cov[1, 1] += dy * dy
            cov[1, 2] += dy * dz
            cov[2, 2] += dz * dz
        cov[1, 0] = cov[0, 1]
        cov[2, 0] = cov[0, 2]
        cov[2, 1] = cov[1, 2]
        l0, total, e0, e1, e2 = _smallest_eigen(cov)
        curvature[i] = l0 / total if total > 0 else 1.0
        normal[i, 0], normal[i, 1], normal[i, 2] = e0, e1, e2
    return normal, curvature


def pca_normals_curvature(
    xyz: np.ndarray, nbr: np.ndarray, *, ref_normal: np.ndarray | None = None, band_m: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """PCA over each point and its neighbours: normal (smallest eigenvector) and surface variation.

    With `ref_normal` and `band_m` > 0, only neighbours within `band_m` of the point's tangent
    plane (through the point, normal `ref_normal`) take part: the far side of a thin slab (a table
    top, a door, a curtain) and surfaces standing just in front of a wall then no longer make a
    flat point look curved. Rows of `ref_normal` that are zero are not filtered.

    Args:
        xyz: float [N, 3]. nbr: int32 [N, k] neighbour ids, -1 padded last.
        ref_normal: float [N, 3] or None. band_m: metres.

    Returns:
        normal: float64 [N, 3] unit, unoriented (see `orient_normals`); where fewer than 2
            neighbours are left: `ref_normal`, else +z.
        curvature: float64 [N] l0 / (l0 + l1 + l2); 1 where fewer than 2 neighbours are left.
    """
    xyz = np.ascontiguousarray(xyz, np.float64)
    ref = np.zeros_like(xyz) if ref_normal is None else np.ascontiguousarray(ref_normal, np.float64)
    return _pca_kernel(xyz, np.ascontiguousarray(nbr, np.int32), ref, float(band_m))


def orient_normals(normal: np.ndarray, xyz: np.ndarray, viewpoint: np.ndarray) -> np.ndarray:
    """Flip normals to face `viewpoint` (float [3]); float64 [N, 3]."""
    normal = np.asarray(normal, np.float64)
    towards = np.asarray(viewpoint, np.float64)[None, :] - np.asarray(xyz, np.float64)
    flip = np.einsum("ij,ij->i", normal, towards) < 0
    return np.where(flip[:, None], -normal, normal)


# --------------------------------------------------------------------------------------------
# Point Feature Histograms
# --------------------------------------------------------------------------------------------
@njit(cache=True)
def pfh_pair_bin(p1, n1, p2, n2, bins):  # pragma: no cover - compiled
    """Bin (0..bins**3-1) of the Rusu/PCL pair feature of (p1, n1), (p2, n2); -1 if undefined.

    The source of the Darboux frame is the point whose normal makes the smaller angle with the
    line joining them (PCL's `computePairFeatures`); u = n_s, v = d x u / |d x u|, w = u x v,
    alpha = v . n_t, phi = u . d / |d|, theta = atan2(w . n_t, u . n_t).
    """
    dx, dy, dz = p2[0] - p1[0], p2[1] - p1[1], p2[2] - p1[2]
    dist = np.sqrt(dx * dx + dy * dy + dz * dz)
    if dist == 0.0:
        return -1
    a1 = (n1[0] * dx + n1[1] * dy + n1[2] * dz) / dist
    a2 = (n2[0] * dx + n2[1] * dy + n2[2] * dz) / dist
    if abs(a1) < abs(a2):  # acos(|a1|) > acos(|a2|): p2 is the source
        ux, uy, uz = n2[0], n2[1], n2[2]
        tx, ty, tz = n1[0], n1[1], n1[2]
        dx, dy, dz = -dx, -dy, -dz
        phi = -a2
    else:
        ux, uy, uz = n1[0], n1[1], n1[2]
        tx, ty, tz = n2[0], n2[1], n2[2]
        phi = a1
    vx, vy, vz = dy * uz - dz * uy, dz * ux - dx * uz, dx * uy - dy * ux
    vn = np.sqrt(vx * vx + vy * vy + vz * vz)
    if vn == 0.0:
        return -1
    vx, vy, vz = vx / vn, vy / vn, vz / vn
    wx, wy, wz = uy * vz - uz * vy, uz * vx - ux * vz, ux * vy - uy * vx
    alpha = vx * tx + vy * ty + vz * tz
    theta = np.arctan2(wx * tx + wy * ty + wz * tz, ux * tx + uy * ty + uz * tz)
    b0 = int(np.floor(bins * ((theta + np.pi) / (2.0 * np.pi))))
    b1 = int(np.floor(bins * ((alpha + 1.0) * 0.5)))
    b2 = int(np.floor(bins * ((phi + 1.0) * 0.5)))
    b0 = min(max(b0, 0), bins - 1)
    b1 = min(max(b1, 0), bins - 1)
    b2 = min(max(b2, 0), bins - 1)
    return b0 + b1 * bins + b2 * bins * bins


@njit(parallel=True, cache=True)
def _pfh_counts_kernel(xyz, normal, nbr, k_pfh, bins):  # pragma: no cover - compiled
    n = nbr.shape[0]
    nb = bins * bins * bins
    # uint8 counts (at most (k+1)k/2 <= 253 pairs): 125 bytes a point, not 500, for big rooms
    counts = np.zeros((n, nb), np.uint8)
    totals = np.zeros(n, np.int32)
    for i in prange(n):
        ids = np.empty(k_pfh + 1, np.int64)
        ids[0] = i
        m = 1
        for t in range(k_pfh):
            j = nbr[i, t]
            if j < 0:
                break
            ids[m] = j
            m += 1
        total = 0
        for a in range(m):
            for b in range(a + 1, m):
                h = pfh_pair_bin(xyz[ids[a]], normal[ids[a]], xyz[ids[b]], normal[ids[b]], bins)
                if h >= 0:
                    counts[i, h] += 1
                    total += 1
        totals[i] = total
    return counts, totals


def pfh_counts(
    xyz: np.ndarray, normal: np.ndarray, nbr: np.ndarray, *, k_pfh: int, bins: int = 5,
) -> tuple[np.ndarray, np.ndarray]:
    """Point Feature Histograms as pair counts: uint8 [N, bins**3] and the pairs counted, int32 [N].

    All pairs (a < b) of the list [i, nbr[i, 0], ..., nbr[i, k_pfh-1]] (valid entries) are
    binned by `pfh_pair_bin`; pairs with coincident points or a degenerate frame are skipped.
    Args: xyz float [N, 3]; normal float [N, 3] unit; nbr int32 [N, k >= k_pfh], -1 padded last.
    """
    if (k_pfh + 1) * k_pfh // 2 > 255:
        raise ValueError(f"k_pfh={k_pfh}: at most 22 (pair counts are stored as uint8)")
    return _pfh_counts_kernel(
        np.ascontiguousarray(xyz, np.float64), np.ascontiguousarray(normal, np.float64),
        np.ascontiguousarray(nbr, np.int32), int(k_pfh), int(bins),
    )


def pfh_histograms(xyz: np.ndarray, normal: np.ndarray, nbr: np.ndarray, *, k_pfh: int, bins: int = 5) -> np.ndarray:
    """Normalised Point Feature Histograms (see `pfh_counts`): float32 [N, bins**3], rows sum to 1
    (all zero where no pair is defined)."""
    counts, totals = pfh_counts(xyz, normal, nbr, k_pfh=k_pfh, bins=bins)
    return (counts / np.maximum(totals, 1)[:, None]).astype(np.float32)


@njit(parallel=True, cache=True)
def _edge_affinity_kernel(counts, totals, nbr):  # pragma: no cover - compiled
    n, k = nbr.shape
    nb = counts.shape[1]
    aff = np.zeros((n, k), np.float32)
    for i in prange(n):
        if totals[i] == 0:
            continue
        # min(h_i, h_j) is zero wherever h_i is: only i's non-empty bins matter (few on surfaces)
        nz = np.empty(nb, np.int64)
        m = 0
        for h in range(nb):
            if counts[i, h] > 0:
                nz[m] = h
                m += 1
        ti = 1.0 / totals[i]
        for t in range(k):
            j = nbr[i, t]
            if j < 0:
                break
            if totals[j] == 0:
                continue
            tj = 1.0 / totals[j]
            s = 0.0
            for q in range(m):
                h = nz[q]
                s += min(counts[i, h] * ti, counts[j, h] * tj)
            aff[i, t] = s
    return aff


def edge_affinity(counts: np.ndarray, totals: np.ndarray, nbr: np.ndarray) -> np.ndarray:
    """PFH histogram intersection sum_b min(h_i[b], h_j[b]) of every neighbour edge, from
    `pfh_counts` output; float32 [N, k], 0 where the neighbour is -1 or a histogram is empty."""
    return _edge_affinity_kernel(
        np.ascontiguousarray(counts, np.uint8), np.ascontiguousarray(totals, np.int32),
        np.ascontiguousarray(nbr, np.int32),
    )


@njit(parallel=True, cache=True)
def _smooth_colour_kernel(xyz, normal, rgb, nbr, band, cutoff2):  # pragma: no cover - compiled
    n, k = nbr.shape
    out = np.empty((n, 3), np.float32)
    for i in prange(n):
        m = 1.0
        a0, a1, a2 = float(rgb[i, 0]), float(rgb[i, 1]), float(rgb[i, 2])
        for t in range(k):
            j = nbr[i, t]
            if j < 0:
                break
            off = (normal[i, 0] * (xyz[j, 0] - xyz[i, 0]) + normal[i, 1] * (xyz[j, 1] - xyz[i, 1])
                   + normal[i, 2] * (xyz[j, 2] - xyz[i, 2]))
            if abs(off) > band:
                continue
            e0, e1, e2 = float(rgb[j, 0]) - rgb[i, 0], float(rgb[j, 1]) - rgb[i, 1], float(rgb[j, 2]) - rgb[i, 2]
            if e0 * e0 + e1 * e1 + e2 * e2 > cutoff2:
                continue
            m += 1.0
            a0 += rgb[j, 0]
            a1 += rgb[j, 1]
            a2 += rgb[j, 2]
        out[i, 0], out[i, 1], out[i, 2] = a0 / m, a1 / m, a2 / m
    return out


def smooth_colours(
    xyz: np.ndarray, normal: np.ndarray, rgb: np.ndarray, nbr: np.ndarray, *, band_m: float, cutoff: float,
) -> np.ndarray:
    """Edge-preserving colour denoising: each point's mean with the neighbours that lie within
    `band_m` of its tangent plane and whose colour is within `cutoff` (RGB units) of its own, so
    that colours are not blended across object borders or between a wall and what hangs on it.

    Args:
        xyz: [N, 3]. normal: [N, 3] unit. rgb: [N, 3] 0..255. nbr: int32 [N, k].

    Returns:
        float32 [N, 3].
    """
    return _smooth_colour_kernel(
        np.ascontiguousarray(xyz, np.float64), np.ascontiguousarray(normal, np.float64),
        np.ascontiguousarray(rgb, np.float32), np.ascontiguousarray(nbr, np.int32), float(band_m), float(cutoff) ** 2,
    )


# --------------------------------------------------------------------------------------------
# region growing and merging
# --------------------------------------------------------------------------------------------
@njit(cache=True)
def _grow_kernel(order, nbr, xyz, normal, colour, curvature, aff, cos_max, plane_off, min_aff,
                 col2, colseg2, max_seed_curv, radius2):  # pragma: no cover - compiled
    n, k = nbr.shape
    seg = np.full(n, -1, np.int32)
    queue = np.empty(n, np.int64)
    nseg = 0
    for s_pos in range(n):
        s = order[s_pos]
        if seg[s] >= 0:
            continue
        seg[s] = nseg
        head, tail = 0, 1
        queue[0] = s
        count = 1.0
        c0, c1, c2 = colour[s, 0], colour[s, 1], colour[s, 2]
        sx, sy, sz = xyz[s, 0], xyz[s, 1], xyz[s, 2]
        while head < tail:
            i = queue[head]
            head += 1
            for t in range(k):
                j = nbr[i, t]
                if j < 0:
                    break
                if seg[j] >= 0:
                    continue
                dot = normal[i, 0] * normal[j, 0] + normal[i, 1] * normal[j, 1] + normal[i, 2] * normal[j, 2]
                if abs(dot) < cos_max:
                    continue
                dx, dy, dz = xyz[j, 0] - xyz[i, 0], xyz[j, 1] - xyz[i, 1], xyz[j, 2] - xyz[i, 2]
                if abs(normal[i, 0] * dx + normal[i, 1] * dy + normal[i, 2] * dz) > plane_off:
                    continue
                if aff[i, t] < min_aff:
                    continue
                e0, e1, e2 = colour[j, 0] - colour[i, 0], colour[j, 1] - colour[i, 1], colour[j, 2] - colour[i, 2]
                if e0 * e0 + e1 * e1 + e2 * e2 > col2:
                    continue
                e0, e1, e2 = colour[j, 0] - c0 / count, colour[j, 1] - c1 / count, colour[j, 2] - c2 / count
                if e0 * e0 + e1 * e1 + e2 * e2 > colseg2:
                    continue
                if radius2 > 0:
                    dx, dy, dz = xyz[j, 0] - sx, xyz[j, 1] - sy, xyz[j, 2] - sz
                    if dx * dx + dy * dy + dz * dz > radius2:
                        continue
                seg[j] = nseg
                count += 1.0
                c0 += colour[j, 0]
                c1 += colour[j, 1]
                c2 += colour[j, 2]
                # a high-curvature point (an edge, a corner) joins but does not carry the segment on
                if curvature[j] <= max_seed_curv:
                    queue[tail] = j
                    tail += 1
        nseg += 1
    return seg, nseg


def grow_regions(
    nbr: np.ndarray, xyz: np.ndarray, normal: np.ndarray, colour: np.ndarray, curvature: np.ndarray,
    affinity: np.ndarray, *, cfg: OversegConfig,
) -> np.ndarray:
    """Region growing (a BFS per seed, seeds by increasing curvature, ties by point id).

    Args:
        nbr: int32 [N, k] neighbours (-1 padded last). xyz: [N, 3]. normal: [N, 3] unit.
        colour: [N, 3] RGB 0..255 (already smoothed if wanted). curvature: [N].
        affinity: float32 [N, k] PFH histogram intersection per edge (`edge_affinity`).

    Returns:
        int32 [N] segment ids 0..S-1 in seed order (every point gets one: leftover points seed
        their own segments after all low-curvature seeds).
    """
    order = np.argsort(np.asarray(curvature, np.float64), kind="stable").astype(np.int64)
    seg, _ = _grow_kernel(
        order, np.ascontiguousarray(nbr, np.int32), np.ascontiguousarray(xyz, np.float64),
        np.ascontiguousarray(normal, np.float64), np.ascontiguousarray(colour, np.float64),
        np.ascontiguousarray(curvature, np.float64), np.ascontiguousarray(affinity, np.float32),
        float(np.cos(np.deg2rad(cfg.max_normal_angle_deg))), float(cfg.max_plane_offset_m),
        float(cfg.min_pfh_affinity), float(cfg.max_colour_dist) ** 2, float(cfg.max_colour_dist_segment) ** 2,
        float(cfg.max_seed_curvature), float(cfg.max_segment_radius_m) ** 2,
    )
    return seg


@njit(cache=True)
def _find(parent, a):  # pragma: no cover - compiled
    root = a
    while parent[root] != root:
        root = parent[root]
    while parent[a] != root:  # path compression
        nxt = parent[a]
        parent[a] = root
        a = nxt
    return root


@njit(cache=True)
def _merge_kernel(seg, nseg, nbr, normal, colour, min_points, colour_scale):  # pragma: no cover - compiled
    n, k = nbr.shape
    count = np.zeros(nseg, np.int64)
    nsum = np.zeros((nseg, 3), np.float64)
    csum = np.zeros((nseg, 3), np.float64)
    ref = np.zeros((nseg, 3), np.float64)
    seen = np.zeros(nseg, np.bool_)
    for p in range(n):
        s = seg[p]
        if not seen[s]:
            seen[s] = True
            ref[s, 0], ref[s, 1], ref[s, 2] = normal[p, 0], normal[p, 1], normal[p, 2]
        # normals may come with either sign: align each with the segment's first before summing
        sign = 1.0 if normal[p, 0] * ref[s, 0] + normal[p, 1] * ref[s, 1] + normal[p, 2] * ref[s, 2] >= 0 else -1.0
        for c in range(3):
            nsum[s, c] += sign * normal[p, c]
            csum[s, c] += colour[p, c]
        count[s] += 1
    # points of each segment (CSR) and member lists of the union-find roots
    ptr = np.zeros(nseg + 1, np.int64)
    for p in range(n):
        ptr[seg[p] + 1] += 1
    for s in range(nseg):
        ptr[s + 1] += ptr[s]
    fill = ptr[:-1].copy()
    pts = np.empty(n, np.int64)
    for p in range(n):
        pts[fill[seg[p]]] = p
        fill[seg[p]] += 1
    parent = np.arange(nseg)
    nxt = np.full(nseg, -1, np.int64)
    last = np.arange(nseg)
    initial = count.copy()
    order = np.argsort(initial, kind="mergesort")  # smallest first, ties by id
    for q in range(nseg):
        s = order[q]
        if initial[s] >= min_points:
            break
        r = _find(parent, s)
        if count[r] >= min_points:
            continue
        nr = np.sqrt(nsum[r, 0] ** 2 + nsum[r, 1] ** 2 + nsum[r, 2] ** 2)
        best = -1
        best_score = -np.inf
        m = r
        while m >= 0:
            for e in range(ptr[m], ptr[m + 1]):
                p = pts[e]
                for t in range(k):
                    j = nbr[p, t]
                    if j < 0:
                        break
                    o = _find(parent, seg[j])
                    if o == r or o == best:
                        continue
                    no = np.sqrt(nsum[o, 0] ** 2 + nsum[o, 1] ** 2 + nsum[o, 2] ** 2)
                    cos = 0.0
                    if nr > 0 and no > 0:
                        dot = nsum[r, 0] * nsum[o, 0] + nsum[r, 1] * nsum[o, 1] + nsum[r, 2] * nsum[o, 2]
                        cos = abs(dot) / (nr * no)
                    d0 = csum[r, 0] / count[r] - csum[o, 0] / count[o]
                    d1 = csum[r, 1] / count[r] - csum[o, 1] / count[o]
                    d2 = csum[r, 2] / count[r] - csum[o, 2] / count[o]
                    score = cos - np.sqrt(d0 * d0 + d1 * d1 + d2 * d2) / colour_scale
                    if score > best_score or (score == best_score and o < best):
                        best_score = score
                        best = o
            m = nxt[m]
        if best < 0:
            continue  # an isolated segment: nothing to merge into
        dot = nsum[r, 0] * nsum[best, 0] + nsum[r, 1] * nsum[best, 1] + nsum[r, 2] * nsum[best, 2]
        sign = 1.0 if dot >= 0 else -1.0
        for c in range(3):
            nsum[best, c] += sign * nsum[r, c]
            csum[best, c] += csum[r, c]
        count[best] += count[r]
        parent[r] = best
        nxt[last[best]] = r
        last[best] = last[r]
    root = np.empty(nseg, np.int64)
    for s in range(nseg):
        root[s] = _find(parent, s)
    return root


def merge_small_segments(
    segment: np.ndarray, nbr: np.ndarray, normal: np.ndarray, colour: np.ndarray, *,
    min_points: int, colour_scale: float,
) -> np.ndarray:
    """Merge segments smaller than `min_points` into their most similar adjacent segment.

    Small segments are taken smallest first (ties by id); each joins the adjacent segment (over
    kNN edges) with the highest |cos(mean normals)| - |mean colour difference| / colour_scale,
    and a merged segment that is still small is merged again when its turn comes.

    Args:
        segment: int [N] ids 0..S-1. nbr: int32 [N, k]. normal: [N, 3]. colour: [N, 3] RGB.

    Returns:
        int32 [N] ids 0..S'-1, numbered by each segment's first point.
    """
    segment = np.asarray(segment)
    nseg = int(segment.max()) + 1 if len(segment) else 0
    if nseg == 0:
        return segment.astype(np.int32)
    root = _merge_kernel(
        segment.astype(np.int64), nseg, np.ascontiguousarray(nbr, np.int32),
        np.ascontiguousarray(normal, np.float64), np.ascontiguousarray(colour, np.float64),
        int(min_points), float(colour_scale),
    )
    return relabel_by_first_point(root[segment])


def relabel_by_first_point(labels: np.ndarray) -> np.ndarray:
    """Map arbitrary labels to 0..S-1 in the order of each label's first point; int32 [N]."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse].astype(np.int32)


# --------------------------------------------------------------------------------------------
# boundaries and the segment graph
# --------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def _boundary_kernel(seg, nbr, nseg):  # pragma: no cover - compiled
    n, k = nbr.shape
    boundary = np.zeros(n, np.uint8)
    keys = np.full((n, k), -1, np.int64)
    for i in prange(n):
        a = seg[i]
        m = 0
        for t in range(k):
            j = nbr[i, t]
            if j < 0:
                break
            b = seg[j]
            if b == a:
                continue
            boundary[i] = 1
            key = min(a, b) * nseg + max(a, b)
            dup = False
            for q in range(m):  # count each point once per pair
                if keys[i, q] == key:
                    dup = True
                    break
            if not dup:
                keys[i, m] = key
                m += 1
    return boundary, keys


def segment_graph(segment: np.ndarray, nbr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boundary flags and the segment adjacency graph over kNN edges.

    Args:
        segment: int [N] ids 0..S-1. nbr: int32 [N, k], -1 padded.

    Returns:
        boundary: uint8 [N], 1 where a neighbour is in another segment.
        pairs: int32 [P, 2] adjacent pairs (a < b), sorted.
        border: int32 [P] points of a or b with a neighbour in the other one.
    """
    nseg = int(segment.max()) + 1 if len(segment) else 1
    boundary, keys = _boundary_kernel(
        np.ascontiguousarray(segment, np.int64), np.ascontiguousarray(nbr, np.int32), nseg
    )
    keys = keys[keys >= 0]
    uniq, border = np.unique(keys, return_counts=True)
    pairs = np.stack([uniq // nseg, uniq % nseg], axis=1).astype(np.int32).reshape(-1, 2)
    return boundary, pairs, border.astype(np.int32)


@njit(parallel=True, cache=True)
def _semantic_boundary_kernel(sem, nbr, ignore):  # pragma: no cover - compiled
    n, k = nbr.shape
    out = np.zeros(n, np.uint8)
    for i in prange(n):
        a = sem[i]
        if a == ignore:
            out[i] = 255
            continue
        for t in range(k):
            j = nbr[i, t]
            if j < 0:
                break
            b = sem[j]
            if b != ignore and b != a:
                out[i] = 1
                break
    return out


def semantic_boundary(semantic: np.ndarray | None, nbr: np.ndarray) -> np.ndarray:
    """1 where a labelled neighbour has another label, 0 where none has, 255 where unknown.

    Unknown: the point is unlabelled (`schema.IGNORE_INDEX`) or the scene has no labels at all.
    Returns uint8 [N].
    """
    n = len(nbr)
    if semantic is None or not np.any(np.asarray(semantic) != schema.IGNORE_INDEX):
        return np.full(n, 255, np.uint8)
    return _semantic_boundary_kernel(
        np.ascontiguousarray(semantic, np.int64), np.ascontiguousarray(nbr, np.int32), schema.IGNORE_INDEX
    )


def surface_voxels(xyz: np.ndarray, normal: np.ndarray, voxel_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Pool points into surface voxels: a `voxel_m` cell and the normal's dominant signed axis.

    Args:
        xyz: float [N, 3]. normal: float [N, 3] unit (oriented). voxel_m: metres.

    Returns:
        inverse: int64 [N] voxel of each point, voxels numbered by their first point;
        first: int64 [V] that first point of each voxel.
    """
    cell = np.floor((xyz - xyz.min(axis=0)) / voxel_m).astype(np.int64)
    dims = cell.max(axis=0) + 1
    axis = np.argmax(np.abs(normal), axis=1)
    side = np.take_along_axis(normal, axis[:, None], axis=1)[:, 0] < 0
    key = ((cell[:, 0] * dims[1] + cell[:, 1]) * dims[2] + cell[:, 2]) * 6 + axis * 2 + side
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    order = np.argsort(first, kind="stable")
    rank[order] = np.arange(len(first))
    return rank[inverse.ravel()], first[order]


def _pool(values: np.ndarray, inverse: np.ndarray, n_voxels: int) -> np.ndarray:
    """Mean of float [N, d] values per voxel, float64 [V, d]."""
    out = np.zeros((n_voxels, values.shape[1]), np.float64)
    count = np.bincount(inverse, minlength=n_voxels).astype(np.float64)
    for d in range(values.shape[1]):
        out[:, d] = np.bincount(inverse, weights=values[:, d], minlength=n_voxels)
    return out / np.maximum(count, 1.0)[:, None]


def purity(segment: np.ndarray, instance: np.ndarray) -> float:
    """Point-weighted purity: the fraction of points whose segment's majority instance is theirs.

    Points without an instance (id < 0) count neither way and take no part in the majority.
    Returns NaN when no point has an instance.
    """
    segment = np.asarray(segment, np.int64)
    instance = np.asarray(instance, np.int64)
    keep = instance >= 0
    if not keep.any():
        return float("nan")
    seg, inst = segment[keep], instance[keep]
    key = seg * (int(inst.max()) + 1) + inst
    uniq, counts = np.unique(key, return_counts=True)
    seg_of = uniq // (int(inst.max()) + 1)
    majority = np.zeros(int(seg.max()) + 1, np.int64)
    np.maximum.at(majority, seg_of, counts)
    return float(majority.sum() / len(seg))


# --------------------------------------------------------------------------------------------
# the pure core
# --------------------------------------------------------------------------------------------
def overseg_points(
    xyz: np.ndarray,
    rgb: np.ndarray,
    *,
    faces: np.ndarray | None = None,
    semantic: np.ndarray | None = None,
    viewpoint: np.ndarray | None = None,
    cfg: OversegConfig = OversegConfig(),
) -> OversegResult:
    """Over-segment one scene (pure: arrays in, arrays out).

    Args:
        xyz: float [N, 3] metres. rgb: uint8 [N, 3].
        faces: int [F, 3] triangles (meshes): normals from the mesh; PCA normals otherwise (and
            for vertices on no non-degenerate face).
        semantic: int [N] labels with `schema.IGNORE_INDEX`, for the semantic boundary (None: 255).
        viewpoint: float [3] that PCA normals are turned towards; None = the centre of the bounds
            (inside a room). LiDAR: the sensor.
        cfg: thresholds.

    Returns:
        An `OversegResult`.
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    xyz = np.ascontiguousarray(xyz, np.float64)
    n = len(xyz)
    if n == 0:
        raise ValueError("overseg: the scene has no points")
    if viewpoint is None:
        viewpoint = 0.5 * (xyz.min(axis=0) + xyz.max(axis=0))
    band = cfg.max_plane_offset_m
    has_faces = faces is not None and len(faces) > 0
    if cfg.voxel_m > 0:
        return _overseg_voxels(xyz, rgb, faces if has_faces else None, semantic, viewpoint, cfg, timings, lap)
    nbr, _ = knn(xyz, cfg.k_neighbours, radius=cfg.radius_m if cfg.radius_m > 0 else None)
    lap("neighbours")
    if has_faces:
        mesh_n = mesh_vertex_normals(xyz, faces)
        has_mesh = np.any(mesh_n != 0, axis=1)
        pca_n, curvature = pca_normals_curvature(xyz, nbr, ref_normal=mesh_n, band_m=band)
        normal = np.where(has_mesh[:, None], mesh_n, orient_normals(pca_n, xyz, viewpoint))
    else:
        pca_n, _ = pca_normals_curvature(xyz, nbr)
        # a second pass inside the tangent band: better normals and curvature at thin slabs
        pca_n, curvature = pca_normals_curvature(xyz, nbr, ref_normal=pca_n, band_m=band)
        normal = orient_normals(pca_n, xyz, viewpoint)
    lap("normals")
    colour = np.asarray(rgb, np.float32)
    segment = _grow_and_merge(nbr, xyz, normal, colour, curvature, cfg.min_segment_points, cfg, lap)
    boundary, pairs, border = segment_graph(segment, nbr)
    sem_boundary = semantic_boundary(semantic, nbr)
    lap("graph")
    return OversegResult(
        normal=normal.astype(np.float32), curvature=curvature.astype(np.float32), segment=segment,
        boundary=boundary, semantic_boundary=sem_boundary, adjacency=pairs, adjacency_border=border,
        timings=timings,
    )


def _grow_and_merge(nbr, xyz, normal, colour, curvature, min_size: int, cfg: OversegConfig, lap) -> np.ndarray:
    """PFH affinities, colour smoothing, region growing and small-segment merging over a
    neighbour graph (of points or of surface voxels): int32 segment ids per item."""
    counts, totals = pfh_counts(xyz, normal, nbr, k_pfh=cfg.k_pfh, bins=cfg.pfh_bins)
    affinity = edge_affinity(counts, totals, nbr)
    del counts, totals
    lap("pfh")
    if cfg.colour_smoothing:
        colour = smooth_colours(xyz, normal, colour, nbr, band_m=cfg.max_plane_offset_m, cutoff=cfg.max_colour_dist)
    segment = grow_regions(nbr, xyz, normal, colour, curvature, affinity, cfg=cfg)
    lap("grow")
    segment = merge_small_segments(segment, nbr, normal, colour, min_points=min_size,
                                   colour_scale=cfg.merge_colour_scale)
    lap("merge")
    return segment


def _overseg_voxels(xyz, rgb, faces, semantic, viewpoint, cfg: OversegConfig, timings, lap) -> OversegResult:
    """`overseg_points` on surface voxels (cfg.voxel_m > 0): no per-point neighbour search at all.

    Meshes: voxels are split by the vertices' mesh normals (six signed axes), so the two sides
    of a thin slab stay apart. Clouds: plain cells (a slab thinner than a voxel is one surface
    at this resolution); voxel normals by PCA, oriented towards `viewpoint`. Boundaries, the
    segment graph and semantic boundaries are computed between neighbouring voxels (a band
    about `voxel_radius_factor * voxel_m` wide at any density); every point takes its voxel's
    segment, curvature, boundary flags and (clouds, or vertices on no face) normal.
    """
    band = cfg.max_plane_offset_m
    n = len(xyz)
    mesh_n = mesh_vertex_normals(xyz, faces) if faces is not None else np.zeros((n, 3))
    inverse, _ = surface_voxels(xyz, mesh_n, cfg.voxel_m)
    n_vox = int(inverse.max()) + 1
    weight = np.bincount(inverse, minlength=n_vox)
    v_xyz = _pool(xyz, inverse, n_vox)
    v_colour = _pool(np.asarray(rgb, np.float64), inverse, n_vox).astype(np.float32)
    v_mesh = _pool(mesh_n, inverse, n_vox)
    length = np.linalg.norm(v_mesh, axis=1, keepdims=True)
    has_mesh = length[:, 0] > 1e-9
    v_mesh = np.where(has_mesh[:, None], v_mesh / np.maximum(length, 1e-12), 0.0)
    v_nbr, v_dist = knn(v_xyz, cfg.k_neighbours, radius=cfg.radius_m if cfg.radius_m > 0 else None)
    band_nbr = v_nbr.copy()  # the metric neighbourhood of boundaries and the graph
    if cfg.voxel_radius_factor > 0:
        far = v_dist > cfg.voxel_radius_factor * cfg.voxel_m
        far[:, :4] = False
        band_nbr[far] = -1  # distances ascend along a row: -1 stays at the end
    lap("neighbours")
    if has_mesh.all():
        _, v_curv = pca_normals_curvature(v_xyz, v_nbr, ref_normal=v_mesh, band_m=band)
        v_normal = v_mesh
    else:
        v_pca, _ = pca_normals_curvature(v_xyz, v_nbr, ref_normal=v_mesh, band_m=band if has_mesh.any() else 0.0)
        v_pca, v_curv = pca_normals_curvature(v_xyz, v_nbr, ref_normal=np.where(has_mesh[:, None], v_mesh, v_pca),
                                              band_m=band)
        v_normal = np.where(has_mesh[:, None], v_mesh, orient_normals(v_pca, v_xyz, viewpoint))
    point_has_mesh = np.any(mesh_n != 0, axis=1)
    normal = np.where(point_has_mesh[:, None], mesh_n, orient_normals(v_normal[inverse], xyz, viewpoint))
    lap("normals")
    min_size = max(1, int(round(cfg.min_segment_area_m2 / cfg.voxel_m ** 2)))
    v_seg = _grow_and_merge(v_nbr, v_xyz, v_normal, v_colour, v_curv, min_size, cfg, lap)
    segment = relabel_by_first_point(v_seg[inverse])
    v_seg = np.zeros(n_vox, np.int32)
    v_seg[inverse] = segment  # voxel segments in the points' numbering
    nseg = int(segment.max()) + 1
    v_boundary, keys = _boundary_kernel(v_seg.astype(np.int64), band_nbr, nseg)
    owner = np.broadcast_to(np.arange(n_vox)[:, None], keys.shape)[keys >= 0]
    keys = keys[keys >= 0]
    uniq, slot = np.unique(keys, return_inverse=True)
    border = np.bincount(slot.ravel(), weights=weight[owner], minlength=len(uniq)).astype(np.int32)
    pairs = np.stack([uniq // nseg, uniq % nseg], axis=1).astype(np.int32).reshape(-1, 2)
    sem_boundary = _voxel_semantic_boundary(semantic, inverse, n_vox, band_nbr)
    lap("graph")
    return OversegResult(
        normal=normal.astype(np.float32), curvature=v_curv[inverse].astype(np.float32), segment=segment,
        boundary=v_boundary[inverse], semantic_boundary=sem_boundary, adjacency=pairs,
        adjacency_border=border, timings=timings,
    )


@njit(cache=True)
def _voxel_semantic_boundary_kernel(sem, inverse, lo, hi, v_nbr, ignore):  # pragma: no cover - compiled
    out = np.zeros(sem.shape[0], np.uint8)
    for i in range(sem.shape[0]):
        a = sem[i]
        if a == ignore:
            out[i] = 255
            continue
        v = inverse[i]
        if lo[v] != a or hi[v] != a:
            out[i] = 1
            continue
        for t in range(v_nbr.shape[1]):
            w = v_nbr[v, t]
            if w < 0:
                break
            if lo[w] <= hi[w] and (lo[w] != a or hi[w] != a):
                out[i] = 1
                break
    return out


def _voxel_semantic_boundary(semantic, inverse: np.ndarray, n_vox: int, v_nbr: np.ndarray) -> np.ndarray:
    """1 where a labelled point of the point's voxel or a neighbouring voxel has another label,
    0 where none has, 255 where unknown (unlabelled point, or no labels): uint8 [N]."""
    n = len(inverse)
    if semantic is None or not np.any(np.asarray(semantic) != schema.IGNORE_INDEX):
        return np.full(n, 255, np.uint8)
    sem = np.asarray(semantic, np.int64)
    labelled = sem != schema.IGNORE_INDEX
    big = np.iinfo(np.int64).max
    lo = np.full(n_vox, big, np.int64)
    hi = np.full(n_vox, -big, np.int64)
    np.minimum.at(lo, inverse[labelled], sem[labelled])
    np.maximum.at(hi, inverse[labelled], sem[labelled])
    return _voxel_semantic_boundary_kernel(sem, inverse.astype(np.int64), lo, hi,
                                           np.ascontiguousarray(v_nbr, np.int32), schema.IGNORE_INDEX)


# --------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------
def run_scene(store_path: str, scene_id: str, cfg: OversegConfig, force: bool = False) -> SceneResult:
    """Over-segment one ingested scene of the store; skipped when complete with this config."""
    store = Store.open(store_path)
    ingest = store.stage_record(scene_id, "ingest")
    if ingest is None:
        raise SceneError(scene_id, None, f"not ingested in {store_path}; run `ws3d ingest` first")
    h = config_hash(cfg, str(ingest.get("config_hash", "")))
    if not force and store.is_complete(scene_id, "overseg", h):
        return SceneResult(scene_id, "skipped")
    start = time.perf_counter()
    xyz = store.read(scene_id, schema.XYZ)
    rgb = store.read(scene_id, schema.RGB)
    n = len(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3 or n == 0:
        raise SceneError(scene_id, None, f"points/xyz must be a non-empty [N, 3] array, got {xyz.shape}")
    if not np.isfinite(xyz).all():
        raise SceneError(scene_id, None, "points/xyz holds NaN or infinite coordinates")
    if rgb.shape != (n, 3):
        raise SceneError(scene_id, None, f"points/rgb must be [{n}, 3] like xyz, got {rgb.shape}")
    semantic = store.read(scene_id, schema.SEMANTIC) if store.has(scene_id, schema.SEMANTIC) else None
    if semantic is not None and semantic.shape != (n,):
        raise SceneError(scene_id, None, f"points/semantic must be [{n}], got {semantic.shape}")
    faces = store.read(scene_id, schema.FACES) if store.has(scene_id, schema.FACES) else None
    if faces is not None and len(faces) and (faces.min() < 0 or faces.max() >= n):
        raise SceneError(scene_id, None, f"mesh/faces index vertices outside 0..{n - 1}")
    stats_in = ingest.get("stats", {}) or {}
    viewpoint = None
    if stats_in.get("kind") == "lidar":
        origin = stats_in.get("sensor_origin")
        viewpoint = np.asarray(origin if origin is not None else (0.0, 0.0, 0.0), np.float64)
    result = overseg_points(xyz, rgb, faces=faces, semantic=semantic, viewpoint=viewpoint, cfg=cfg)
    stats: dict[str, Any] = {
        "points": int(n),
        "segments": result.n_segments,
        "points_per_segment": float(n / max(1, result.n_segments)),
        "boundary_fraction": float(result.boundary.mean()),
        "adjacent_pairs": int(len(result.adjacency)),
        "normals": "mesh" if faces is not None and len(faces) else "pca",
        "seconds": {k: round(v, 4) for k, v in result.timings.items()},
    }
    if store.has(scene_id, schema.INSTANCE):  # only where instances are annotated
        p = purity(result.segment, store.read(scene_id, schema.INSTANCE))
        if not np.isnan(p):
            stats["purity"] = p
    arrays = {
        schema.NORMAL: result.normal, schema.CURVATURE: result.curvature, schema.SEGMENT: result.segment,
        schema.BOUNDARY: result.boundary, schema.SEMANTIC_BOUNDARY: result.semantic_boundary,
        schema.ADJACENCY: result.adjacency, schema.ADJACENCY_BORDER: result.adjacency_border,
    }
    store.write_stage(scene_id, "overseg", arrays, {"config": to_dict(cfg), "config_hash": h, "stats": stats})
    return SceneResult(scene_id, "done", seconds=time.perf_counter() - start, stats=stats)


def summarise(store: Store) -> dict[str, Any]:
    """Segment counts and purity over the store's over-segmented scenes (for `ws3d info`)."""
    counts, purities, pps = [], [], []
    for scene_id in store.scene_ids():
        record = store.stage_record(scene_id, "overseg")
        if record is None:
            continue
        stats = record.get("stats", {})
        counts.append(int(stats.get("segments", 0)))
        pps.append(float(stats.get("points_per_segment", 0.0)))
        if stats.get("purity") is not None:
            purities.append(float(stats["purity"]))
    return {
        "scenes": len(counts),
        "segments_total": int(sum(counts)),
        "segments_mean": float(np.mean(counts)) if counts else 0.0,
        "segments_min": int(min(counts)) if counts else 0,
        "segments_max": int(max(counts)) if counts else 0,
        "points_per_segment_mean": float(np.mean(pps)) if pps else 0.0,
        "purity_mean": float(np.mean(purities)) if purities else None,
        "purity_min": float(min(purities)) if purities else None,
    }

