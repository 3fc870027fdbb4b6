"""Segments from features: region growing in order of curvature, small-segment merging, boundary
flags, the segment adjacency graph, semantic-boundary flags and purity. The growing and merging are
sequential numba kernels; the per-item ones have a serial and a parallel driver around one body
(see `pipeline.overseg.features`); results do not depend on the thread count. Pure."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from pipeline import parallel, schema
from pipeline.overseg.config import OversegConfig
from pipeline.overseg.features import SPAN
from pipeline.overseg.neighbours import hash_keys, hash_slot


# --------------------------------------------------------------------------------------------
# region growing and merging
# --------------------------------------------------------------------------------------------
@njit(cache=True)
def _grow_kernel(order, nbr, xyz, normal, colour, curvature, aff, cos_max, plane_off, sin_slope, min_aff,
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
        r2 = radius2[s]
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
                off = abs(normal[i, 0] * dx + normal[i, 1] * dy + normal[i, 2] * dz)
                # within the tangent band, or (far neighbours of sparse scans) within the slope
                if off > plane_off[i] and off > sin_slope * np.sqrt(dx * dx + dy * dy + dz * dz):
                    continue
                if min_aff > 0 and aff[i, t] < min_aff:
                    continue
                e0, e1, e2 = colour[j, 0] - colour[i, 0], colour[j, 1] - colour[i, 1], colour[j, 2] - colour[i, 2]
                if e0 * e0 + e1 * e1 + e2 * e2 > col2:
                    continue
                e0, e1, e2 = colour[j, 0] - c0 / count, colour[j, 1] - c1 / count, colour[j, 2] - c2 / count
                if e0 * e0 + e1 * e1 + e2 * e2 > colseg2:
                    continue
                if r2 > 0:
                    dx, dy, dz = xyz[j, 0] - sx, xyz[j, 1] - sy, xyz[j, 2] - sz
                    if dx * dx + dy * dy + dz * dz > r2:
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
    affinity: np.ndarray | None, *, cfg: OversegConfig, scale: np.ndarray | None = None,
) -> np.ndarray:
    """Region growing (a BFS per seed, seeds by increasing curvature, ties by point id).

    Args:
        nbr: int32 [N, k] neighbours (-1 padded last). xyz: [N, 3]. normal: [N, 3] unit.
        colour: [N, 3] RGB 0..255 (already smoothed if wanted). curvature: [N].
        affinity: float32 [N, k] PFH histogram intersection per edge (`edge_affinity`); None when
            `cfg.min_pfh_affinity` is 0 (the test is off).
        scale: float [N] per item, >= 1 (None: 1): the tangent band (`max_plane_offset_m`) of an
            item and the radius cap (`max_segment_radius_m`) of a segment it seeds grow with it
            (items of a range-adaptive LiDAR grid stand for larger cells far from the sensor).

    Returns:
        int32 [N] segment ids 0..S-1 in seed order (every point gets one: leftover points seed
        their own segments after all low-curvature seeds).
    """
    # seeds by curvature quantised to 16 bits on a square-root scale (fine near 0, where flat
    # surfaces are): numpy's radix sort, ~10x faster than sorting the floats; ties by id
    level = np.sqrt(np.clip(np.asarray(curvature, np.float64), 0.0, 1.0)) * 65535.0
    order = np.argsort(level.astype(np.uint16), kind="stable").astype(np.int64)
    if affinity is None:
        if cfg.min_pfh_affinity > 0:
            raise ValueError("grow_regions: min_pfh_affinity > 0 needs the PFH affinities")
        affinity = np.zeros((1, 1), np.float32)
    scale = np.ones(len(nbr)) if scale is None else np.asarray(scale, np.float64)
    seg, _ = _grow_kernel(
        order, np.ascontiguousarray(nbr, np.int32), np.ascontiguousarray(xyz, np.float64),
        np.ascontiguousarray(normal, np.float64), np.ascontiguousarray(colour, np.float64),
        np.ascontiguousarray(curvature, np.float64), np.ascontiguousarray(affinity, np.float32),
        float(np.cos(np.deg2rad(cfg.max_normal_angle_deg))), np.ascontiguousarray(cfg.max_plane_offset_m * scale),
        float(np.sin(np.deg2rad(cfg.max_plane_slope_deg))), float(cfg.min_pfh_affinity), float(cfg.max_colour_dist) ** 2, float(cfg.max_colour_dist_segment) ** 2,
        float(cfg.max_seed_curvature), np.ascontiguousarray((cfg.max_segment_radius_m * scale) ** 2),
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
def _merge_kernel(seg, nseg, nbr, normal, colour, weight, min_points, min_weight, colour_scale):  # pragma: no cover - compiled
    n, k = nbr.shape
    count = np.zeros(nseg, np.int64)
    wsum = np.zeros(nseg, np.float64)
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
        wsum[s] += weight[p]
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
    initial = wsum.copy()
    order = np.argsort(initial, kind="mergesort")  # smallest first, ties by id
    for q in range(nseg):
        s = order[q]
        if count[s] >= min_points and initial[s] >= min_weight:
            continue
        r = _find(parent, s)
        if count[r] >= min_points and wsum[r] >= min_weight:
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
        wsum[best] += wsum[r]
        parent[r] = best
        nxt[last[best]] = r
        last[best] = last[r]
    root = np.empty(nseg, np.int64)
    for s in range(nseg):
        root[s] = _find(parent, s)
    return root


def merge_small_segments(
    segment: np.ndarray, nbr: np.ndarray, normal: np.ndarray, colour: np.ndarray, *,
    min_points: int, colour_scale: float, weight: np.ndarray | None = None, min_weight: float = 0.0,
) -> np.ndarray:
    """Merge small segments (fewer than `min_points` items, or less than `min_weight` of
    `weight`, e.g. square metres) into their most similar adjacent segment.

    Small segments are taken smallest first (by weight, ties by id); each joins the adjacent
    segment (over neighbour edges) with the highest |cos(mean normals)| - |mean colour
    difference| / colour_scale, and a merged segment that is still small is merged again when
    its turn comes.

    Args:
        segment: int [N] ids 0..S-1. nbr: int32 [N, k]. normal: [N, 3]. colour: [N, 3] RGB.
        weight: float [N] per item (None: 1 each).

    Returns:
        int32 [N] ids 0..S'-1, numbered by each segment's first point.
    """
    segment = np.asarray(segment)
    nseg = int(segment.max()) + 1 if len(segment) else 0
    if nseg == 0:
        return segment.astype(np.int32)
    weight = np.ones(len(segment)) if weight is None else weight
    root = _merge_kernel(
        segment.astype(np.int64), nseg, np.ascontiguousarray(nbr, np.int32),
        np.ascontiguousarray(normal, np.float64), np.ascontiguousarray(colour, np.float64),
        np.ascontiguousarray(weight, np.float64), int(min_points), float(min_weight), float(colour_scale),
    )
    return relabel_by_first_point(root[segment])


@njit(cache=True)
def _relabel_kernel(labels, lo, hi):  # pragma: no cover - compiled
    rank = np.full(hi - lo + 1, -1, np.int64)
    out = np.empty(labels.shape[0], np.int32)
    s = 0
    for i in range(labels.shape[0]):
        q = labels[i] - lo
        if rank[q] < 0:
            rank[q] = s
            s += 1
        out[i] = rank[q]
    return out


def relabel_by_first_point(labels: np.ndarray) -> np.ndarray:
    """Map arbitrary labels to 0..S-1 in the order of each label's first point; int32 [N]."""
    labels = np.asarray(labels).astype(np.int64, copy=False)
    if len(labels) == 0:
        return np.zeros(0, np.int32)
    lo, hi = int(labels.min()), int(labels.max())
    if hi - lo > 4 * len(labels) + 1024:  # sparse labels: a table would be mostly empty
        _, labels = np.unique(labels, return_inverse=True)
        lo, hi = 0, int(labels.max())
    return _relabel_kernel(np.ascontiguousarray(labels.ravel(), np.int64), lo, hi)


# --------------------------------------------------------------------------------------------
# boundaries and the segment graph
# --------------------------------------------------------------------------------------------
@njit(inline="always")
def _pair_keys(i, seg, nbr, nseg, buf):  # pragma: no cover - compiled
    """The distinct keys min * nseg + max of the segment pairs item i borders, into buf; how many."""
    a = seg[i]
    m = 0
    for t in range(nbr.shape[1]):
        j = nbr[i, t]
        if j < 0:
            break
        b = seg[j]
        if b == a:
            continue
        key = min(a, b) * nseg + max(a, b)
        dup = False
        for q in range(m):  # count each item once per pair
            if buf[q] == key:
                dup = True
                break
        if not dup:
            buf[m] = key
            m += 1
    return m


@njit(inline="always")
def _count_span(lo, hi, seg, nbr, nseg, boundary, count):  # pragma: no cover - compiled
    buf = np.empty(nbr.shape[1], np.int64)
    for i in range(lo, hi):
        m = _pair_keys(i, seg, nbr, nseg, buf)
        count[i + 1] = m
        boundary[i] = 1 if m > 0 else 0


@njit(inline="always")
def _fill_span(lo, hi, seg, nbr, nseg, start, keys, owner):  # pragma: no cover - compiled
    buf = np.empty(nbr.shape[1], np.int64)
    for i in range(lo, hi):
        if start[i + 1] == start[i]:  # an interior item (most of them): no pairs, no second scan
            continue
        m = _pair_keys(i, seg, nbr, nseg, buf)
        for q in range(m):
            keys[start[i] + q] = buf[q]
            owner[start[i] + q] = i


@njit(cache=True)
def _count_ser(seg, nbr, nseg, boundary, count):  # pragma: no cover - compiled
    _count_span(0, nbr.shape[0], seg, nbr, nseg, boundary, count)


@njit(parallel=True, cache=True)
def _count_par(seg, nbr, nseg, boundary, count):  # pragma: no cover - compiled
    n = nbr.shape[0]
    for c in prange((n + SPAN - 1) // SPAN):
        _count_span(c * SPAN, min(n, (c + 1) * SPAN), seg, nbr, nseg, boundary, count)


@njit(cache=True)
def _fill_ser(seg, nbr, nseg, start, keys, owner):  # pragma: no cover - compiled
    _fill_span(0, nbr.shape[0], seg, nbr, nseg, start, keys, owner)


@njit(parallel=True, cache=True)
def _fill_par(seg, nbr, nseg, start, keys, owner):  # pragma: no cover - compiled
    n = nbr.shape[0]
    for c in prange((n + SPAN - 1) // SPAN):
        _fill_span(c * SPAN, min(n, (c + 1) * SPAN), seg, nbr, nseg, start, keys, owner)


def boundary_keys(segment: np.ndarray, nbr: np.ndarray, nseg: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boundary flags and the segment pairs each item borders.

    Args:
        segment: int [N] ids 0..nseg-1. nbr: int32 [N, k], -1 padded last.

    Returns:
        boundary: uint8 [N], 1 where a neighbour is in another segment.
        keys: int64 [M] pair keys min * nseg + max, each item's distinct pairs in item order.
        owner: int64 [M] the item of each key.
    """
    nbr = np.ascontiguousarray(nbr, np.int32)
    seg = np.ascontiguousarray(segment, np.int64)
    n = len(nbr)
    boundary = np.empty(n, np.uint8)
    count = np.zeros(n + 1, np.int64)
    par = parallel.use_parallel(len(nbr), 0)
    (_count_par if par else _count_ser)(seg, nbr, int(nseg), boundary, count)
    start = np.cumsum(count)
    keys, owner = np.empty(start[-1], np.int64), np.empty(start[-1], np.int64)
    (_fill_par if par else _fill_ser)(seg, nbr, int(nseg), start, keys, owner)
    return boundary, keys, owner


def segment_graph(segment: np.ndarray, nbr: np.ndarray, *, weight: np.ndarray | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boundary flags and the segment adjacency graph over neighbour edges.

    Args:
        segment: int [N] ids 0..S-1. nbr: int32 [N, k], -1 padded.
        weight: int [N] what each item counts for in the border sizes (None: 1; the points a
            voxel pools).

    Returns:
        boundary: uint8 [N], 1 where a neighbour is in another segment.
        pairs: int32 [P, 2] adjacent pairs (a < b), sorted.
        border: int32 [P] points of a or b with a neighbour in the other one.
    """
    nseg = int(segment.max()) + 1 if len(segment) else 1
    boundary, keys, owner = boundary_keys(segment, nbr, nseg)
    w = np.ones(len(segment)) if weight is None else np.ascontiguousarray(weight, np.float64)
    uniq, border = _sum_by_key(keys, owner, w)  # a hash table: only the P distinct pairs are sorted
    order = np.argsort(uniq)
    uniq, border = uniq[order], border[order]
    pairs = np.stack([uniq // nseg, uniq % nseg], axis=1).astype(np.int32).reshape(-1, 2)
    return boundary, pairs, np.rint(border).astype(np.int32)


@njit(cache=True)
def _sum_by_key(keys, owner, weight):  # pragma: no cover - compiled
    """The distinct keys (in first-seen order) and the sum of weight[owner] over each."""
    m = keys.shape[0]
    table_key, mask = hash_keys(m)
    table_val = np.empty(len(table_key), np.int64)
    uniq = np.empty(m, np.int64)
    total = np.zeros(m, np.float64)
    u = 0
    for e in range(m):
        key = keys[e]
        h = hash_slot(table_key, key, mask)
        if table_key[h] == -1:
            table_key[h] = key
            table_val[h] = u
            uniq[u] = key
            u += 1
        total[table_val[h]] += weight[owner[e]]
    return uniq[:u].copy(), total[:u].copy()


@njit(inline="always")
def _semantic_span(lo, hi, sem, nbr, ignore, out):  # pragma: no cover - compiled
    k = nbr.shape[1]
    for i in range(lo, hi):
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


@njit(cache=True)
def _semantic_ser(sem, nbr, ignore, out):  # pragma: no cover - compiled
    _semantic_span(0, nbr.shape[0], sem, nbr, ignore, out)


@njit(parallel=True, cache=True)
def _semantic_par(sem, nbr, ignore, out):  # pragma: no cover - compiled
    n = nbr.shape[0]
    for c in prange((n + SPAN - 1) // SPAN):
        _semantic_span(c * SPAN, min(n, (c + 1) * SPAN), sem, nbr, ignore, out)


def semantic_boundary(semantic: np.ndarray | None, nbr: np.ndarray) -> np.ndarray:
    """1 where a labelled neighbour has another label, 0 where none has, 255 where unknown.

    Unknown: the point is unlabelled (`schema.IGNORE_INDEX`) or the scene has no labels at all.
    Returns uint8 [N].
    """
    n = len(nbr)
    if semantic is None or not np.any(np.asarray(semantic) != schema.IGNORE_INDEX):
        return np.full(n, 255, np.uint8)
    nbr = np.ascontiguousarray(nbr, np.int32)
    out = np.zeros(n, np.uint8)
    kernel = _semantic_par if parallel.use_parallel(len(nbr), 0) else _semantic_ser
    kernel(np.ascontiguousarray(semantic, np.int64), nbr, schema.IGNORE_INDEX, out)
    return out


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
