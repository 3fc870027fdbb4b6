"""Per-point (or per-voxel) features of the over-segmentation: normals and curvature, Rusu's Point
Feature Histograms, the PFH affinity of each neighbour edge, and colour smoothing within the
tangent band. numba kernels (`cache=True`, no fastmath: fastmath changes floor() at PFH bin edges).
Each per-item kernel is one inlined body over a span of items with a serial and a parallel driver
(`pipeline.parallel.use_parallel` picks, on the item count: a parallel launch on shared cores
costs more than a serial pass over a room, and the work per item, ~k neighbour reads, is small:
a room's mesh runs on one thread, as ScanNet's Segmentator does, and costs no more CPU time than
it); every item's row is written by one span, so results do not depend on the
thread count. Pure."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from pipeline import parallel

SPAN = 4096
"""Items per span of the parallel drivers (one prange iteration each)."""


# --------------------------------------------------------------------------------------------
# normals and curvature
# --------------------------------------------------------------------------------------------
def per_item(value: float | np.ndarray, n: int) -> np.ndarray:
    """A threshold given once for all items or per item, as a contiguous float64 [n] array."""
    if np.ndim(value) == 0:
        return np.full(n, float(value), np.float64)
    value = np.ascontiguousarray(value, np.float64)
    if value.shape != (n,):
        raise ValueError(f"per-item threshold: expected shape ({n},), got {value.shape}")
    return value


@njit(cache=True)
def _mesh_normals_kernel(v, f):  # pragma: no cover - compiled
    n = v.shape[0]
    out = np.zeros((n, 3), np.float64)
    area = np.zeros(n, np.float64)
    for t in range(f.shape[0]):
        a, b, c = f[t, 0], f[t, 1], f[t, 2]
        ux, uy, uz = v[b, 0] - v[a, 0], v[b, 1] - v[a, 1], v[b, 2] - v[a, 2]
        wx, wy, wz = v[c, 0] - v[a, 0], v[c, 1] - v[a, 1], v[c, 2] - v[a, 2]
        # the cross product's length is twice the face area: summing it weights faces by area
        cx, cy, cz = uy * wz - uz * wy, uz * wx - ux * wz, ux * wy - uy * wx
        third = np.sqrt(cx * cx + cy * cy + cz * cz) / 6.0
        for q in (a, b, c):
            out[q, 0] += cx
            out[q, 1] += cy
            out[q, 2] += cz
            area[q] += third
    for i in range(n):
        length = np.sqrt(out[i, 0] ** 2 + out[i, 1] ** 2 + out[i, 2] ** 2)
        if length > 1e-20:
            out[i, 0] /= length
            out[i, 1] /= length
            out[i, 2] /= length
        else:
            out[i, 0] = out[i, 1] = out[i, 2] = 0.0
    return out, area


def mesh_vertex_normals_areas(xyz: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Area-weighted vertex normals of a triangle mesh (the faces' winding gives the side) and
    each vertex's share of the surface (a third of the area of every face it is a corner of).

    Args:
        xyz: float [N, 3] vertices. faces: int [F, 3] vertex ids.

    Returns:
        normal: float64 [N, 3], unit where the vertex touches a non-degenerate face, else zero.
        area: float64 [N] square metres (sums to the mesh's area).
    """
    return _mesh_normals_kernel(np.ascontiguousarray(xyz, np.float64),
                                np.ascontiguousarray(faces, np.int64).reshape(-1, 3))


def mesh_vertex_normals(xyz: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals of a triangle mesh: float64 [N, 3] (see `mesh_vertex_normals_areas`)."""
    return mesh_vertex_normals_areas(xyz, faces)[0]


@njit(cache=True)
def _smallest_eigen(c00, c01, c02, c11, c12, c22):  # pragma: no cover - compiled
    """Smallest eigenvalue, trace and a unit eigenvector of the smallest eigenvalue of a symmetric
    3x3 matrix (its six upper entries), in closed form (trigonometric eigenvalues, eigenvector
    from the largest cross product of two rows of A - l0 I): ~20x faster than a LAPACK call."""
    scale = max(abs(c00), abs(c01), abs(c02), abs(c11), abs(c12), abs(c22))
    if scale == 0.0:
        return 0.0, 0.0, 0.0, 0.0, 1.0
    a00, a01, a02 = c00 / scale, c01 / scale, c02 / scale
    a11, a12, a22 = c11 / scale, c12 / scale, c22 / scale
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


@njit(cache=True)
def _in_band(xyz, i, j, r0, r1, r2, filtered, band):  # pragma: no cover - compiled
    if not filtered:
        return True
    off = r0 * (xyz[j, 0] - xyz[i, 0]) + r1 * (xyz[j, 1] - xyz[i, 1]) + r2 * (xyz[j, 2] - xyz[i, 2])
    return abs(off) <= band


@njit(inline="always")
def _pca_span(lo, hi, xyz, nbr, ref_normal, band, normal, curvature):  # pragma: no cover - compiled
    # two passes over the neighbours (mean, then centred covariance) and no per-item arrays:
    # allocations in the loop cost more than the arithmetic
    k = nbr.shape[1]
    for i in range(lo, hi):
        r0, r1, r2 = ref_normal[i, 0], ref_normal[i, 1], ref_normal[i, 2]
        b = band[i]
        filtered = b > 0 and (r0 != 0.0 or r1 != 0.0 or r2 != 0.0)
        m = 1
        mx, my, mz = xyz[i, 0], xyz[i, 1], xyz[i, 2]
        for t in range(k):
            j = nbr[i, t]
            if j < 0:
                break
            if _in_band(xyz, i, j, r0, r1, r2, filtered, b):
                mx += xyz[j, 0]
                my += xyz[j, 1]
                mz += xyz[j, 2]
                m += 1
        if m < 3:
            curvature[i] = 1.0
            if filtered:
                normal[i, 0], normal[i, 1], normal[i, 2] = r0, r1, r2
            else:
                normal[i, 0], normal[i, 1], normal[i, 2] = 0.0, 0.0, 1.0
            continue
        mx /= m
        my /= m
        mz /= m
        dx, dy, dz = xyz[i, 0] - mx, xyz[i, 1] - my, xyz[i, 2] - mz
        c00, c01, c02 = dx * dx, dx * dy, dx * dz
        c11, c12, c22 = dy * dy, dy * dz, dz * dz
        for t in range(k):
            j = nbr[i, t]
            if j < 0:
                break
            if _in_band(xyz, i, j, r0, r1, r2, filtered, b):
                dx, dy, dz = xyz[j, 0] - mx, xyz[j, 1] - my, xyz[j, 2] - mz
                c00 += dx * dx
                c01 += dx * dy
                c02 += dx * dz
                c11 += dy * dy
                c12 += dy * dz
                c22 += dz * dz
        l0, total, e0, e1, e2 = _smallest_eigen(c00, c01, c02, c11, c12, c22)
        curvature[i] = l0 / total if total > 0 else 1.0
        normal[i, 0], normal[i, 1], normal[i, 2] = e0, e1, e2


@njit(cache=True)
def _pca_ser(xyz, nbr, ref_normal, band, normal, curvature):  # pragma: no cover - compiled
    _pca_span(0, nbr.shape[0], xyz, nbr, ref_normal, band, normal, curvature)


@njit(parallel=True, cache=True)
def _pca_par(xyz, nbr, ref_normal, band, normal, curvature):  # pragma: no cover - compiled
    n = nbr.shape[0]
    for c in prange((n + SPAN - 1) // SPAN):
        _pca_span(c * SPAN, min(n, (c + 1) * SPAN), xyz, nbr, ref_normal, band, normal, curvature)


@njit(inline="always")
def _variation_span(lo, hi, xyz, nbr, normal, band, curvature):  # pragma: no cover - compiled
    k = nbr.shape[1]
    for i in range(lo, hi):
        r0, r1, r2 = normal[i, 0], normal[i, 1], normal[i, 2]
        m = 1
        mx, my, mz = xyz[i, 0], xyz[i, 1], xyz[i, 2]
        for t in range(k):
            j = nbr[i, t]
            if j < 0:
                break
            if _in_band(xyz, i, j, r0, r1, r2, band > 0, band):
                mx += xyz[j, 0]
                my += xyz[j, 1]
                mz += xyz[j, 2]
                m += 1
        if m < 3:
            curvature[i] = 1.0
            continue
        mx /= m
        my /= m
        mz /= m
        dx, dy, dz = xyz[i, 0] - mx, xyz[i, 1] - my, xyz[i, 2] - mz
        off = dx * r0 + dy * r1 + dz * r2
        along, total = off * off, dx * dx + dy * dy + dz * dz
        for t in range(k):
            j = nbr[i, t]
            if j < 0:
                break
            if _in_band(xyz, i, j, r0, r1, r2, band > 0, band):
                dx, dy, dz = xyz[j, 0] - mx, xyz[j, 1] - my, xyz[j, 2] - mz
                off = dx * r0 + dy * r1 + dz * r2
                along += off * off
                total += dx * dx + dy * dy + dz * dz
        curvature[i] = along / total if total > 0 else 1.0


@njit(cache=True)
def _variation_ser(xyz, nbr, normal, band, curvature):  # pragma: no cover - compiled
    _variation_span(0, nbr.shape[0], xyz, nbr, normal, band, curvature)


@njit(parallel=True, cache=True)
def _variation_par(xyz, nbr, normal, band, curvature):  # pragma: no cover - compiled
    n = nbr.shape[0]
    for c in prange((n + SPAN - 1) // SPAN):
        _variation_span(c * SPAN, min(n, (c + 1) * SPAN), xyz, nbr, normal, band, curvature)


def surface_variation_along(xyz: np.ndarray, nbr: np.ndarray, normal: np.ndarray, *, band_m: float) -> np.ndarray:
    """Surface variation with a known normal (a mesh's): the neighbourhood's variance along the
    normal over its total variance, sum((d . n)^2) / sum(|d|^2) about the centroid, over the
    point and its neighbours within `band_m` of its tangent plane (all where `band_m` is 0).

    The Rayleigh quotient of the covariance at `normal`: the PCA surface variation
    l0 / (l0 + l1 + l2) where the normal is the PCA normal, a little above it elsewhere (the
    median ratio on the real ScanNet sample is 1.16), with no eigen-solve.

    Args:
        xyz: float [N, 3]. nbr: int32 [N, k], -1 padded last. normal: float [N, 3] unit.

    Returns:
        float64 [N], 0 (plane) .. 1; 1 where fewer than 2 neighbours are left.
    """
    xyz = np.ascontiguousarray(xyz, np.float64)
    nbr = np.ascontiguousarray(nbr, np.int32)
    out = np.empty(len(xyz), np.float64)
    kernel = _variation_par if parallel.use_parallel(len(nbr), 0) else _variation_ser
    kernel(xyz, nbr, np.ascontiguousarray(normal, np.float64), float(band_m), out)
    return out


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
        ref_normal: float [N, 3] or None. band_m: metres, one for all or float [N] per point.

    Returns:
        normal: float64 [N, 3] unit, unoriented (see `orient_normals`); where fewer than 2
            neighbours are left: `ref_normal`, else +z.
        curvature: float64 [N] l0 / (l0 + l1 + l2); 1 where fewer than 2 neighbours are left.
    """
    xyz = np.ascontiguousarray(xyz, np.float64)
    nbr = np.ascontiguousarray(nbr, np.int32)
    ref = np.zeros_like(xyz) if ref_normal is None else np.ascontiguousarray(ref_normal, np.float64)
    normal, curvature = np.empty((len(xyz), 3), np.float64), np.empty(len(xyz), np.float64)
    kernel = _pca_par if parallel.use_parallel(len(nbr), 0) else _pca_ser
    kernel(xyz, nbr, ref, per_item(band_m, len(xyz)), normal, curvature)
    return normal, curvature


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


@njit(inline="always")
def _pfh_span(lo, hi, xyz, normal, nbr, k_pfh, bins, counts, totals):  # pragma: no cover - compiled
    ids = np.empty(k_pfh + 1, np.int64)  # one per span, not per item
    for i in range(lo, hi):
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


@njit(cache=True)
def _pfh_ser(xyz, normal, nbr, k_pfh, bins, counts, totals):  # pragma: no cover - compiled
    _pfh_span(0, nbr.shape[0], xyz, normal, nbr, k_pfh, bins, counts, totals)


@njit(parallel=True, cache=True)
def _pfh_par(xyz, normal, nbr, k_pfh, bins, counts, totals):  # pragma: no cover - compiled
    n = nbr.shape[0]
    for c in prange((n + SPAN - 1) // SPAN):
        _pfh_span(c * SPAN, min(n, (c + 1) * SPAN), xyz, normal, nbr, k_pfh, bins, counts, totals)


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
    nbr = np.ascontiguousarray(nbr, np.int32)
    # uint8 counts (at most (k+1)k/2 <= 253 pairs): 125 bytes a point, not 500, for big rooms
    counts = np.zeros((len(nbr), bins ** 3), np.uint8)
    totals = np.zeros(len(nbr), np.int32)
    kernel = _pfh_par if parallel.use_parallel(len(nbr) * k_pfh * k_pfh, 0) else _pfh_ser
    kernel(np.ascontiguousarray(xyz, np.float64), np.ascontiguousarray(normal, np.float64), nbr, int(k_pfh),
           int(bins), counts, totals)
    return counts, totals


def pfh_histograms(xyz: np.ndarray, normal: np.ndarray, nbr: np.ndarray, *, k_pfh: int, bins: int = 5) -> np.ndarray:
    """Normalised Point Feature Histograms (see `pfh_counts`): float32 [N, bins**3], rows sum to 1
    (all zero where no pair is defined)."""
    counts, totals = pfh_counts(xyz, normal, nbr, k_pfh=k_pfh, bins=bins)
    return (counts / np.maximum(totals, 1)[:, None]).astype(np.float32)


@njit(inline="always")
def _affinity_span(lo, hi, counts, totals, nbr, aff):  # pragma: no cover - compiled
    k = nbr.shape[1]
    nb = counts.shape[1]
    nz = np.empty(nb, np.int64)  # one per span, not per item
    for i in range(lo, hi):
        if totals[i] == 0:
            continue
        # min(h_i, h_j) is zero wherever h_i is: only i's non-empty bins matter (few on surfaces)
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


@njit(cache=True)
def _affinity_ser(counts, totals, nbr, aff):  # pragma: no cover - compiled
    _affinity_span(0, nbr.shape[0], counts, totals, nbr, aff)


@njit(parallel=True, cache=True)
def _affinity_par(counts, totals, nbr, aff):  # pragma: no cover - compiled
    n = nbr.shape[0]
    for c in prange((n + SPAN - 1) // SPAN):
        _affinity_span(c * SPAN, min(n, (c + 1) * SPAN), counts, totals, nbr, aff)


def edge_affinity(counts: np.ndarray, totals: np.ndarray, nbr: np.ndarray) -> np.ndarray:
    """PFH histogram intersection sum_b min(h_i[b], h_j[b]) of every neighbour edge, from
    `pfh_counts` output; float32 [N, k], 0 where the neighbour is -1 or a histogram is empty."""
    nbr = np.ascontiguousarray(nbr, np.int32)
    aff = np.zeros(nbr.shape, np.float32)
    kernel = _affinity_par if parallel.use_parallel(len(nbr), 0) else _affinity_ser
    kernel(np.ascontiguousarray(counts, np.uint8), np.ascontiguousarray(totals, np.int32), nbr, aff)
    return aff


@njit(inline="always")
def _smooth_span(lo, hi, xyz, normal, rgb, nbr, band, cutoff2, out):  # pragma: no cover - compiled
    k = nbr.shape[1]
    for i in range(lo, hi):
        m = 1.0
        a0, a1, a2 = float(rgb[i, 0]), float(rgb[i, 1]), float(rgb[i, 2])
        for t in range(k):
            j = nbr[i, t]
            if j < 0:
                break
            off = (normal[i, 0] * (xyz[j, 0] - xyz[i, 0]) + normal[i, 1] * (xyz[j, 1] - xyz[i, 1])
                   + normal[i, 2] * (xyz[j, 2] - xyz[i, 2]))
            if abs(off) > band[i]:
                continue
            e0, e1, e2 = float(rgb[j, 0]) - rgb[i, 0], float(rgb[j, 1]) - rgb[i, 1], float(rgb[j, 2]) - rgb[i, 2]
            if e0 * e0 + e1 * e1 + e2 * e2 > cutoff2:
                continue
            m += 1.0
            a0 += rgb[j, 0]
            a1 += rgb[j, 1]
            a2 += rgb[j, 2]
        out[i, 0], out[i, 1], out[i, 2] = a0 / m, a1 / m, a2 / m


@njit(cache=True)
def _smooth_ser(xyz, normal, rgb, nbr, band, cutoff2, out):  # pragma: no cover - compiled
    _smooth_span(0, nbr.shape[0], xyz, normal, rgb, nbr, band, cutoff2, out)


@njit(parallel=True, cache=True)
def _smooth_par(xyz, normal, rgb, nbr, band, cutoff2, out):  # pragma: no cover - compiled
    n = nbr.shape[0]
    for c in prange((n + SPAN - 1) // SPAN):
        _smooth_span(c * SPAN, min(n, (c + 1) * SPAN), xyz, normal, rgb, nbr, band, cutoff2, out)


def smooth_colours(
    xyz: np.ndarray, normal: np.ndarray, rgb: np.ndarray, nbr: np.ndarray, *, band_m: float, cutoff: float,
) -> np.ndarray:
    """Edge-preserving colour denoising: each point's mean with the neighbours that lie within
    `band_m` of its tangent plane and whose colour is within `cutoff` (RGB units) of its own, so
    that colours are not blended across object borders or between a wall and what hangs on it.

    Args:
        xyz: [N, 3]. normal: [N, 3] unit. rgb: [N, 3] 0..255. nbr: int32 [N, k].
        band_m: metres, one for all or float [N] per point.

    Returns:
        float32 [N, 3].
    """
    nbr = np.ascontiguousarray(nbr, np.int32)
    out = np.empty((len(nbr), 3), np.float32)
    kernel = _smooth_par if parallel.use_parallel(len(nbr), 0) else _smooth_ser
    kernel(np.ascontiguousarray(xyz, np.float64), np.ascontiguousarray(normal, np.float64),
           np.ascontiguousarray(rgb, np.float32), nbr, per_item(band_m, len(nbr)), float(cutoff) ** 2, out)
    return out
