"""Instances and boxes from a semantic prediction and the over-segmentation graph.

Pure numpy/scipy, no I/O: evaluation and ``ws3d predict`` call these on one scene's per-point
outputs (converted to numpy) and its segment adjacency from the store.

An instance is a connected group of adjacent segments that share a predicted class and whose
mean embeddings are similar (cosine above a threshold); grouping is single-linkage, computed as
the connected components of the graph of such adjacent pairs.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

__all__ = ["boxes_from_instances", "instances_from_segments"]


def instances_from_segments(
    seg: np.ndarray,
    pred_class: np.ndarray,
    embed: np.ndarray,
    adjacency_pairs: np.ndarray,
    *,
    sim_threshold: float = 0.9,
    ignore_classes: Iterable[int] = (),
    point_score: np.ndarray | None = None,
    min_points: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group segments into instances.

    1. Each segment takes the majority predicted class of its points (ties: smallest id).
    2. Segments of a class in ``ignore_classes`` (e.g. wall, floor) form no instance.
    3. Adjacent segments of the same class whose mean embeddings (L2-normalised) have cosine
       similarity > ``sim_threshold`` are merged; merging is transitive (connected components).
    4. Instances with fewer than ``min_points`` points are dropped.

    The score of an instance is the mean of ``point_score`` over its points when given (e.g. the
    maximum softmax probability of each point), else its purity: the fraction of its points whose
    predicted class equals the instance's class.

    Args:
        seg: [N] int global segment id, -1 for none.
        pred_class: [N] int predicted class per point (>= 0).
        embed: [N, D] float embedding per point (e.g. the CLIP-space head).
        adjacency_pairs: [P, 2] int pairs of adjacent segment ids (either order, duplicates ok).
        sim_threshold: cosine threshold for merging.
        ignore_classes: classes that never form instances.
        point_score: optional [N] float per-point confidence.
        min_points: minimum instance size.

    Returns:
        ``(instance_id [N] int64 (-1 for none), instance_class [I] int64, instance_score [I]
        float64)`` with instance ids ``0..I-1``.
    """
    seg = np.asarray(seg).reshape(-1).astype(np.int64)
    pred_class = np.asarray(pred_class).reshape(-1).astype(np.int64)
    embed = np.asarray(embed, dtype=np.float64)
    n = seg.shape[0]
    if pred_class.shape[0] != n or embed.shape[0] != n:
        raise ValueError(f"seg ({n}), pred_class ({pred_class.shape[0]}) and embed ({embed.shape[0]}) lengths differ")
    if n and pred_class.min() < 0:
        raise ValueError("pred_class must be >= 0")
    empty = (np.full(n, -1, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))
    valid = seg >= 0
    if not valid.any():
        return empty
    num_seg = int(seg.max()) + 1
    num_cls = int(pred_class.max()) + 1
    s_idx = seg[valid]

    # majority class per segment
    votes = np.bincount(s_idx * num_cls + pred_class[valid], minlength=num_seg * num_cls).reshape(num_seg, num_cls)
    seg_size = votes.sum(axis=1)
    seg_class = votes.argmax(axis=1)

    # mean embedding per segment: a sparse [S, N] averaging matrix times embed
    rows = np.flatnonzero(valid)
    pool = sp.csr_matrix(
        (1.0 / seg_size[s_idx], (s_idx, rows)), shape=(num_seg, n)
    )
    seg_embed = np.asarray(pool @ embed)
    norm = np.linalg.norm(seg_embed, axis=1, keepdims=True)
    seg_embed = seg_embed / np.where(norm > 0, norm, 1.0)

    candidate = (seg_size > 0) & ~np.isin(seg_class, np.fromiter(ignore_classes, dtype=np.int64))

    pairs = np.asarray(adjacency_pairs, dtype=np.int64).reshape(-1, 2)
    if pairs.size:
        if pairs.min() < 0:
            raise ValueError("adjacency_pairs contain negative segment ids")
        pairs = pairs[(pairs < num_seg).all(axis=1)]  # segments absent from these points
        a, b = pairs[:, 0], pairs[:, 1]
        cos = np.einsum("ij,ij->i", seg_embed[a], seg_embed[b])
        join = candidate[a] & candidate[b] & (seg_class[a] == seg_class[b]) & (cos > sim_threshold) & (a != b)
        a, b = a[join], b[join]
    else:
        a = b = np.zeros(0, dtype=np.int64)
    graph = sp.coo_matrix((np.ones(a.size), (a, b)), shape=(num_seg, num_seg))
    _, component = connected_components(graph, directed=False)

    # compact ids over candidate segments; every segment of a component shares its class
    comp_of_candidate = component[candidate]
    uniq, inverse = np.unique(comp_of_candidate, return_inverse=True)
    seg_instance = np.full(num_seg, -1, dtype=np.int64)
    seg_instance[candidate] = inverse.reshape(-1)
    inst_class = np.zeros(uniq.size, dtype=np.int64)
    inst_class[inverse.reshape(-1)] = seg_class[candidate]

    instance_id = np.full(n, -1, dtype=np.int64)
    instance_id[valid] = seg_instance[s_idx]
    has = instance_id >= 0
    size = np.bincount(instance_id[has], minlength=uniq.size)
    if point_score is not None:
        ps = np.asarray(point_score, dtype=np.float64).reshape(-1)
        if ps.shape[0] != n:
            raise ValueError(f"point_score has {ps.shape[0]} rows, expected {n}")
        total = np.bincount(instance_id[has], weights=ps[has], minlength=uniq.size)
    else:
        agree = (pred_class[has] == inst_class[instance_id[has]]).astype(np.float64)
        total = np.bincount(instance_id[has], weights=agree, minlength=uniq.size)
    score = total / np.maximum(size, 1)

    keep = size >= max(int(min_points), 1)
    if not keep.all():
        remap = np.full(uniq.size + 1, -1, dtype=np.int64)
        remap[:-1][keep] = np.arange(int(keep.sum()))
        instance_id = remap[instance_id]  # -1 -> remap[-1] == -1
        inst_class, score = inst_class[keep], score[keep]
    return instance_id, inst_class, score


def boxes_from_instances(
    xyz: np.ndarray,
    instance_id: np.ndarray,
    instance_class: np.ndarray,
    instance_score: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Axis-aligned bounding box of each instance's points.

    Args:
        xyz: [N, 3] float point coordinates.
        instance_id: [N] int in ``[0, I)`` or -1.
        instance_class: [I] int.
        instance_score: [I] float.

    Returns:
        ``(bounds [K, 6] (xmin, ymin, zmin, xmax, ymax, zmax), classes [K], scores [K])`` for the
        K instances that have at least one point, in instance-id order (wrap in
        :class:`ws3d_train.infer.metrics.Boxes` for :func:`ws3d_train.infer.metrics.box_map`).
    """
    xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    instance_id = np.asarray(instance_id).reshape(-1).astype(np.int64)
    instance_class = np.asarray(instance_class).reshape(-1)
    instance_score = np.asarray(instance_score, dtype=np.float64).reshape(-1)
    if instance_id.shape[0] != xyz.shape[0]:
        raise ValueError(f"instance_id has {instance_id.shape[0]} rows, xyz {xyz.shape[0]}")
    has = instance_id >= 0
    ids = instance_id[has]
    if ids.size and ids.max() >= instance_class.shape[0]:
        raise ValueError(f"instance id {ids.max()} but only {instance_class.shape[0]} classes")
    if ids.size == 0:
        return np.zeros((0, 6)), instance_class[:0], instance_score[:0]
    order = np.argsort(ids, kind="stable")
    ids_sorted = ids[order]
    pts = xyz[has][order]
    starts = np.flatnonzero(np.r_[True, ids_sorted[1:] != ids_sorted[:-1]])
    present = ids_sorted[starts]
    lo = np.minimum.reduceat(pts, starts, axis=0)
    hi = np.maximum.reduceat(pts, starts, axis=0)
    return np.concatenate([lo, hi], axis=1), instance_class[present], instance_score[present]
