"""Neighbour search for point clouds: k nearest neighbours (optionally radius-bounded) and radius CSR.

Pure functions over arrays (no store I/O). Both use scipy's `cKDTree` with `workers=-1`, so the
queries run on every core without a Python loop over points. Results are deterministic: every
query is independent, so the worker count does not change them.

Conventions: neighbour lists never contain the query point itself; missing neighbours (fewer
than k within the radius) are -1 in the padded form and sorted last; distances are in metres.
"""
from __future__ import annotations

import numpy as np
from numba import njit
from scipy.spatial import cKDTree


def knn(
    xyz: np.ndarray,
    k: int,
    *,
    radius: float | None = None,
    tree: cKDTree | None = None,
    chunk: int = 1 << 18,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other points of every point (or of `rows`), optionally within `radius`.

    Args:
        xyz: float [N, 3] positions.
        k: neighbours per point (the point itself excluded).
        radius: keep only neighbours closer than this (metres); None = no bound.
        tree: a `cKDTree` already built on `xyz` (built here when None).
        chunk: query points per batch (bounds the temporary memory; results do not depend on it).
        rows: int [R] the points to query (None: all N).

    Returns:
        index: int32 [N, k] (or [R, k]), neighbour ids sorted by distance (ties by the tree's order), -1 padded.
        dist: float32 [N, k], their distances, +inf where index is -1.
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    n = len(xyz)
    if k < 1:
        raise ValueError(f"knn: k must be >= 1, got {k}")
    if n == 0:
        return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
    tree = tree if tree is not None else cKDTree(xyz)
    query = np.arange(n) if rows is None else np.asarray(rows, np.int64)
    index = np.empty((len(query), k), np.int32)
    dist = np.empty((len(query), k), np.float32)
    # query in row chunks: scipy's float64/int64 [rows, k+1] outputs and the reordering below
    # would otherwise need ~1 GB per million points
    for start in range(0, len(query), chunk):
        ids = query[start:start + chunk]
        index[start:start + len(ids)], dist[start:start + len(ids)] = _knn_rows(tree, xyz[ids], ids, n, k, radius)
    return index, dist


def _knn_rows(
    tree: cKDTree, query: np.ndarray, self_ids: np.ndarray, n: int, k: int, radius: float | None
) -> tuple[np.ndarray, np.ndarray]:
    rows = len(query)
    kq = min(k + 1, n)
    bound = np.inf if radius is None else float(radius)
    dist, index = tree.query(query, k=kq, distance_upper_bound=bound, workers=-1)
    dist = np.asarray(dist, np.float64).reshape(rows, kq)
    index = np.asarray(index, np.int64).reshape(rows, kq)
    # Drop the query point itself. It is usually column 0, but with duplicate points another
    # copy may come first (or the point may be beyond the k+1 reported), so mask it wherever it is.
    valid = (index != self_ids[:, None]) & (index < n)
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


@njit(cache=True)
def _mesh_graph_kernel(faces, item, n_items, xyz, k):  # pragma: no cover - compiled
    # both directions of the face edges linking two different items, as CSR: a pass over the
    # faces counts them, a second fills them (no edge list in between)
    nf = faces.shape[0]
    ptr = np.zeros(n_items + 1, np.int64)
    for f in range(nf):
        a, b, c = item[faces[f, 0]], item[faces[f, 1]], item[faces[f, 2]]
        if a != b:
            ptr[a + 1] += 1
            ptr[b + 1] += 1
        if b != c:
            ptr[b + 1] += 1
            ptr[c + 1] += 1
        if c != a:
            ptr[c + 1] += 1
            ptr[a + 1] += 1
    most = 0
    for v in range(n_items):
        most = max(most, ptr[v + 1])
        ptr[v + 1] += ptr[v]
    fill = ptr[:-1].copy()
    col = np.empty(ptr[n_items], np.int32)
    for f in range(nf):
        a, b, c = item[faces[f, 0]], item[faces[f, 1]], item[faces[f, 2]]
        if a != b:
            col[fill[a]] = b
            fill[a] += 1
            col[fill[b]] = a
            fill[b] += 1
        if b != c:
            col[fill[b]] = c
            fill[b] += 1
            col[fill[c]] = b
            fill[c] += 1
        if c != a:
            col[fill[c]] = a
            fill[c] += 1
            col[fill[a]] = c
            fill[a] += 1
    index = np.empty((n_items, k), np.int32)
    dist = np.empty((n_items, k), np.float32)
    mark = np.full(n_items, -1, np.int32)  # mark[j] == v: j is already in v's row
    ids = np.empty(most, np.int32)
    d = np.empty(most, np.float32)
    for v in range(n_items):
        u = 0
        px, py, pz = xyz[v, 0], xyz[v, 1], xyz[v, 2]
        for q in range(ptr[v], ptr[v + 1]):  # distinct, in the order the faces list them
            j = col[q]
            if mark[j] == v:
                continue
            mark[j] = v
            dx, dy, dz = xyz[j, 0] - px, xyz[j, 1] - py, xyz[j, 2] - pz
            ids[u] = j
            d[u] = np.sqrt(dx * dx + dy * dy + dz * dz)
            u += 1
        if u > k:  # more links than room (a voxel pooling many fine vertices): the k nearest
            for r in range(1, u):
                dj, j = d[r], ids[r]
                q = r
                while q > 0 and (d[q - 1] > dj or (d[q - 1] == dj and ids[q - 1] > j)):
                    d[q] = d[q - 1]
                    ids[q] = ids[q - 1]
                    q -= 1
                d[q] = dj
                ids[q] = j
            u = k
        for r in range(u):
            index[v, r] = ids[r]
            dist[v, r] = d[r]
        for r in range(u, k):
            index[v, r] = -1
            dist[v, r] = np.inf
    return index, dist


@njit(cache=True)
def _components(index):  # pragma: no cover - compiled
    """Connected pieces of a neighbour graph: each item's smallest reachable id, int64 [V]."""
    n, k = index.shape
    comp = np.full(n, -1, np.int64)
    stack = np.empty(n, np.int64)
    for s in range(n):  # a depth-first flood from each unlabelled item, in id order
        if comp[s] >= 0:
            continue
        comp[s] = s
        top = 1
        stack[0] = s
        while top > 0:
            top -= 1
            v = stack[top]
            for t in range(k):
                j = index[v, t]
                if j < 0:
                    break
                if comp[j] < 0:
                    comp[j] = s
                    stack[top] = j
                    top += 1
    return comp


@njit(cache=True)
def hash_keys(n):  # pragma: no cover - compiled
    """An empty open-addressing table for up to `n` int64 keys: (keys [2^b >= 2n], filled with -1;
    the mask 2^b - 1). Slots are found by :func:`hash_slot`."""
    bits = 1
    while (1 << bits) < 2 * n:
        bits += 1
    return np.full(1 << bits, -1, np.int64), (1 << bits) - 1


@njit(cache=True)
def hash_slot(table_key, key, mask):  # pragma: no cover - compiled
    """The slot of `key` in a table of :func:`hash_keys` (linear probing): where it is, or the
    empty slot (-1) where it goes."""
    h = (key * 0x9E3779B1) & mask
    while table_key[h] != -1 and table_key[h] != key:
        h = (h + 1) & mask
    return h


CONTACTS = 4
"""Links to other pieces of a mesh kept per item (the nearest)."""


@njit(cache=True)
def lower_corner(xyz):  # pragma: no cover - compiled
    """[3] float64 per-axis minimum of [N, 3] points (N >= 1), in one pass."""
    lo = np.empty(3, np.float64)
    for d in range(3):
        lo[d] = xyz[0, d]
    for i in range(xyz.shape[0]):
        for d in range(3):
            lo[d] = min(lo[d], xyz[i, d])
    return lo


@njit(cache=True)
def _contact_kernel(xyz, comp, index, dist, radius):  # pragma: no cover - compiled
    # adds the contacts to index and dist in place
    n, k = index.shape
    lo = lower_corner(xyz)
    # cells of side `radius` (a margin of one cell on every side), numbered in first-item order:
    # a dense grid where the bounds are small (a room), else a hash table
    cx = np.empty(n, np.int64)
    cy = np.empty(n, np.int64)
    cz = np.empty(n, np.int64)
    d0, d1, d2 = 0, 0, 0
    for i in range(n):
        cx[i] = np.int64(np.floor((xyz[i, 0] - lo[0]) / radius)) + 1
        cy[i] = np.int64(np.floor((xyz[i, 1] - lo[1]) / radius)) + 1
        cz[i] = np.int64(np.floor((xyz[i, 2] - lo[2]) / radius)) + 1
        d0, d1, d2 = max(d0, cx[i] + 2), max(d1, cy[i] + 2), max(d2, cz[i] + 2)
    dense = d0 * d1 * d2 <= max(8 * n, 1 << 21)
    if dense:
        grid = np.full(d0 * d1 * d2, -1, np.int32)
        mask = 0
        table_key = np.empty(0, np.int64)
    else:
        grid = np.empty(0, np.int32)
        table_key, mask = hash_keys(n)
    table_val = np.empty(len(table_key), np.int32)
    of = np.empty(n, np.int32)
    n_cells = 0
    for i in range(n):
        key = (cx[i] * d1 + cy[i]) * d2 + cz[i]
        if dense:
            if grid[key] < 0:
                grid[key] = n_cells
                n_cells += 1
            of[i] = grid[key]
        else:
            h = hash_slot(table_key, key, mask)
            if table_key[h] == -1:
                table_key[h] = key
                table_val[h] = n_cells
                n_cells += 1
            of[i] = table_val[h]
    start = np.zeros(n_cells + 1, np.int64)
    lo_comp = np.full(n_cells, np.iinfo(np.int64).max, np.int64)
    hi_comp = np.full(n_cells, -1, np.int64)
    first_item = np.full(n_cells, -1, np.int64)
    for i in range(n):
        c = of[i]
        start[c + 1] += 1
        lo_comp[c] = min(lo_comp[c], comp[i])
        hi_comp[c] = max(hi_comp[c], comp[i])
        if first_item[c] < 0:
            first_item[c] = i
    for c in range(n_cells):
        start[c + 1] += start[c]
    fill = start[:-1].copy()
    members = np.empty(n, np.int64)
    for i in range(n):
        members[fill[of[i]]] = i
        fill[of[i]] += 1
    # a coarse grid (cells of 4 x 4 x 4 cells, dense grids only) with each coarse cell's
    # components: where a coarse cell and its 26 neighbours hold one piece, so do the
    # neighbourhoods of all its cells, and their 27 look-ups in the large grid are skipped
    g0, g1, g2 = (d0 // 4 + 3, d1 // 4 + 3, d2 // 4 + 3) if dense else (0, 0, 0)
    g_lo = np.full(g0 * g1 * g2, np.iinfo(np.int64).max, np.int64)
    g_hi = np.full(g0 * g1 * g2, -1, np.int64)
    g_state = np.zeros(g0 * g1 * g2, np.int8)  # 0 not known yet, 1 one piece around, 2 several
    for i in range(n if dense else 0):
        g = ((cx[i] // 4 + 1) * g1 + cy[i] // 4 + 1) * g2 + cz[i] // 4 + 1
        g_lo[g] = min(g_lo[g], comp[i])
        g_hi[g] = max(g_hi[g], comp[i])
    out_i, out_d = index, dist  # in place: a copy of two [V, k] arrays costs more than the search
    near = np.empty(27, np.int64)
    cand = np.empty(CONTACTS, np.int64)
    cand_d = np.empty(CONTACTS, np.float64)
    r2 = radius * radius
    for c in range(n_cells):
        i0 = first_item[c]
        if dense:
            gx, gy, gz = cx[i0] // 4 + 1, cy[i0] // 4 + 1, cz[i0] // 4 + 1
            g = (gx * g1 + gy) * g2 + gz
            if g_state[g] == 0:
                a_lo, a_hi = g_lo[g], g_hi[g]
                for ex in range(-1, 2):
                    for ey in range(-1, 2):
                        for ez in range(-1, 2):
                            h = ((gx + ex) * g1 + gy + ey) * g2 + gz + ez
                            a_lo = min(a_lo, g_lo[h])
                            a_hi = max(a_hi, g_hi[h])
                g_state[g] = 1 if a_lo == a_hi else 2
            if g_state[g] == 1:  # one mesh piece all around
                continue
        m, c_lo, c_hi = 0, lo_comp[c], hi_comp[c]
        for dx in range(-1, 2):
            for dy in range(-1, 2):
                for dz in range(-1, 2):
                    key = ((cx[i0] + dx) * d1 + cy[i0] + dy) * d2 + cz[i0] + dz
                    if dense:
                        other = grid[key]
                    else:
                        h = hash_slot(table_key, key, mask)
                        other = table_val[h] if table_key[h] == key else -1
                    if other >= 0:
                        near[m] = other
                        c_lo = min(c_lo, lo_comp[other])
                        c_hi = max(c_hi, hi_comp[other])
                        m += 1
        if c_lo == c_hi:  # one mesh piece all around: nothing to add
            continue
        for e in range(start[c], start[c + 1]):
            i = members[e]
            u = 0  # the nearest items of other pieces, (distance, id) order
            for q in range(m):
                if lo_comp[near[q]] == comp[i] and hi_comp[near[q]] == comp[i]:
                    continue  # that cell holds only i's own piece
                for f in range(start[near[q]], start[near[q] + 1]):
                    j = members[f]
                    if comp[j] == comp[i]:
                        continue
                    ex, ey, ez = xyz[j, 0] - xyz[i, 0], xyz[j, 1] - xyz[i, 1], xyz[j, 2] - xyz[i, 2]
                    dd = ex * ex + ey * ey + ez * ez
                    if dd > r2:
                        continue
                    dj = np.sqrt(dd)
                    if u == CONTACTS and (dj > cand_d[u - 1] or (dj == cand_d[u - 1] and j > cand[u - 1])):
                        continue
                    r = min(u, CONTACTS - 1)
                    while r > 0 and (cand_d[r - 1] > dj or (cand_d[r - 1] == dj and cand[r - 1] > j)):
                        cand_d[r] = cand_d[r - 1]
                        cand[r] = cand[r - 1]
                        r -= 1
                    cand_d[r] = dj
                    cand[r] = j
                    u = min(u + 1, CONTACTS)
            if u == 0:
                continue
            # the nearest contacts take the free slots after the row's mesh links
            t = 0
            while t < k and out_i[i, t] >= 0:
                t += 1
            for b in range(min(u, k - t)):
                out_i[i, t + b] = cand[b]
                out_d[i, t + b] = cand_d[b]


def mesh_neighbours(
    faces: np.ndarray, item: np.ndarray, xyz: np.ndarray, k: int, *, contact_m: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours from a mesh's own edges: items (vertices, or the voxels that pool them) that a
    triangle edge links, in the padded form of `knn` (no nearest-neighbour search); plus, with
    `contact_m` > 0, the `CONTACTS` nearest items of *other* connected pieces of the mesh within
    `contact_m` (an object standing on the floor, a fragment floating near a wall), found on a
    grid of `contact_m` cells only where two pieces come that close.

    Args:
        faces: int [F, 3] vertex ids. item: int [N_vertices] the item of each vertex (identity
            for vertices themselves). xyz: float [V, 3] the items' positions. k: most neighbours
            kept per item (the nearest; ties by id). contact_m: metres.

    Returns:
        index: int32 [V, k] distinct neighbours, -1 padded last: the linked items in the order
            the faces first list them (the k nearest, by distance then id, where more are
            linked), then the nearest contacts (by distance then id) in the free slots.
        dist: float32 [V, k] their distances, +inf where index is -1.
    """
    if k < 1:
        raise ValueError(f"mesh_neighbours: k must be >= 1, got {k}")
    xyz = np.ascontiguousarray(xyz, np.float64)
    faces = np.ascontiguousarray(faces, np.int64).reshape(-1, 3)
    index, dist = _mesh_graph_kernel(faces, np.ascontiguousarray(item, np.int64), len(xyz), xyz, int(k))
    if contact_m > 0 and len(xyz) > 1:
        _contact_kernel(xyz, _components(index), index, dist, float(contact_m))
    return index, dist
