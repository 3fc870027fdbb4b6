"""Neighbour search for point clouds: k nearest neighbours (optionally radius-bounded) and radius CSR.

Pure functions over arrays (no store I/O). Both use scipy's `cKDTree` with `workers=-1`, so the
queries run on every core without a Python loop over points. Results are deterministic: every
query is independent, so the worker count does not change them.

Conventions: neighbour lists never contain the query point itself; missing neighbours (fewer
than k within the radius) are -1 in the padded form and sorted last; distances are in metres.
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def knn(
    xyz: np.ndarray,
    k: int,
    *,
    radius: float | None = None,
    tree: cKDTree | None = None,
    chunk: int = 1 << 18,
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other points of every point, optionally within `radius` (a hybrid search).

    Args:
        xyz: float [N, 3] positions.
        k: neighbours per point (the point itself excluded).
        radius: keep only neighbours closer than this (metres); None = no bound.
        tree: a `cKDTree` already built on `xyz` (built here when None).
        chunk: query points per batch (bounds the temporary memory; results do not depend on it).

    Returns:
        index: int32 [N, k], neighbour ids sorted by distance (ties by the tree's order), -1 padded.
        dist: float32 [N, k], their distances, +inf where index is -1.
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    n = len(xyz)
    if k < 1:
        raise ValueError(f"knn: k must be >= 1, got {k}")
    if n == 0:
        return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
    tree = tree if tree is not None else cKDTree(xyz)
    index = np.empty((n, k), np.int32)
    dist = np.empty((n, k), np.float32)
    # query in row chunks: scipy's float64/int64 [rows, k+1] outputs and the reordering below
    # would otherwise need ~1 GB per million points
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        index[start:stop], dist[start:stop] = _knn_rows(tree, xyz[start:stop], start, n, k, radius)
    return index, dist


def _knn_rows(
    tree: cKDTree, query: np.ndarray, first: int, n: int, k: int, radius: float | None
) -> tuple[np.ndarray, np.ndarray]:
    rows = len(query)
    kq = min(k + 1, n)
    bound = np.inf if radius is None else float(radius)
    dist, index = tree.query(query, k=kq, distance_upper_bound=bound, workers=-1)
    dist = np.asarray(dist, np.float64).reshape(rows, kq)
    index = np.asarray(index, np.int64).reshape(rows, kq)
    # Drop the query point itself. It is usually column 0, but with duplicate points another
    # copy may come first (or the point may be beyond the k+1 reported), so mask it wherever it is.
    valid = (index != np.arange(first, first + rows)[:, None]) & (index < n)
    # A stable sort of the "invalid" flag moves valid entries to the front keeping distance order.
    order = np.argsort(~valid, axis=1, kind="stable")
    index = np.take_along_axis(index, order, axis=1)
    dist = np.take_along_axis(dist, order, axis=1)
    valid = np.take_along_axis(valid, order, axis=1)
    index = np.where(valid, index, -1)[:, :k]
    dist = np.where(valid, dist, np.inf)[:, :k]
    if index.shape[1] < k:  # fewer than k+1 points in the whole cloud
        pad = k - index.shape[1]
        index = np.pad(index, ((0, 0), (0, pad)), constant_values=-1)
        dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=np.inf)
    return index.astype(np.int32), dist.astype(np.float32)


def radius_csr(xyz: np.ndarray, radius: float, *, tree: cKDTree | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All other points within `radius` of every point, as CSR (sorted by point, then by id).

    Args:
        xyz: float [N, 3] positions.
        radius: metres (inclusive, as scipy's `query_pairs`).

    Returns:
        ptr: int64 [N + 1] offsets; the neighbours of point i are `ids[ptr[i]:ptr[i+1]]`.
        ids: int32 [M] neighbour ids, ascending within each point.
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    n = len(xyz)
    tree = tree if tree is not None else cKDTree(xyz)
    pairs = tree.query_pairs(float(radius), output_type="ndarray")  # [P, 2], i < j, each once
    src = np.concatenate([pairs[:, 0], pairs[:, 1]])
    dst = np.concatenate([pairs[:, 1], pairs[:, 0]])
    order = np.lexsort((dst, src))
    src, dst = src[order], dst[order]
    ptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(src, minlength=n), out=ptr[1:])
    return ptr, dst.astype(np.int32)
