"""Semantic boundaries on voxels and on the segment graph, shared by training and inference.

Pure torch, no I/O: the 6-neighbour graph of a set of voxels (:func:`voxel_neighbour_edges`), the
aggregation of per-voxel boundary probabilities into region-level boundary labels on the segment
graph (:func:`region_boundaries`: which adjacent over-segments a semantic boundary separates), and
their projection back onto voxels (:func:`voxel_region_score`). The fine-tuning losses
(``ws3d_train.train.losses``: the boundary-aware energy) and inference (``ws3d_train.infer``: the
`boundary` of ``ws3d predict``, the boundary metrics of ``ws3d eval``) use the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RegionBoundaries", "region_boundaries", "voxel_neighbour_edges", "voxel_region_score"]


@dataclass(frozen=True, eq=False)
class RegionBoundaries:
    """Region-level boundaries: per-voxel boundary probabilities aggregated on the segment graph.

    The graph is the one the voxels show (two segments are adjacent where a 6-neighbour voxel pair
    joins them: ``overseg/adjacency`` at the voxel resolution, restricted to what a crop keeps).
    """

    pairs: torch.Tensor
    """[P, 2] int64 adjacent segment pairs (a < b), sorted."""
    prob: torch.Tensor
    """[P] float probability that a semantic boundary separates the pair: the mean of the voxel
    boundary probabilities over the pair's interface (both voxels of each joining edge)."""
    edge_pair: torch.Tensor
    """[E] int64 pair of each voxel edge, -1 for edges inside one segment or touching no segment."""
    segment_score: torch.Tensor
    """[S] float how much each segment is a boundary region: the largest ``prob`` of its pairs (0
    for a segment with no adjacent segment)."""


def region_boundaries(
    boundary_prob: torch.Tensor, seg: torch.Tensor, edges: torch.Tensor, num_segments: int
) -> RegionBoundaries:
    """Aggregate voxel boundary probabilities into region-level boundary labels.

    Args:
        boundary_prob: [N] float boundary probability per voxel.
        seg: [N] int64 global segment id, -1 for none.
        edges: [E, 2] int64 neighbouring voxel pairs (:func:`voxel_neighbour_edges`).
        num_segments: S.

    Returns:
        :class:`RegionBoundaries` (differentiable in ``boundary_prob``).
    """
    seg = seg.long()
    device = boundary_prob.device
    if edges.numel() == 0:
        empty = torch.zeros((0, 2), dtype=torch.long, device=device)
        return RegionBoundaries(empty, boundary_prob.new_zeros(0), torch.zeros(0, dtype=torch.long, device=device),
                                boundary_prob.new_zeros(num_segments))
    i, j = edges[:, 0].long(), edges[:, 1].long()
    si, sj = seg[i], seg[j]
    cross = (si != sj) & (si >= 0) & (sj >= 0)
    a, b = torch.minimum(si, sj)[cross], torch.maximum(si, sj)[cross]
    keys, inverse = torch.unique(a * num_segments + b, return_inverse=True)
    pairs = torch.stack([keys // num_segments, keys % num_segments], dim=1)
    value = 0.5 * (boundary_prob[i[cross]] + boundary_prob[j[cross]])
    total = value.new_zeros(keys.numel()).index_add(0, inverse, value)
    count = torch.bincount(inverse, minlength=keys.numel()).to(value.dtype)
    prob = total / count.clamp(min=1)
    edge_pair = torch.full((edges.shape[0],), -1, dtype=torch.long, device=device)
    edge_pair[cross] = inverse
    score = prob.new_zeros(num_segments)
    score = score.scatter_reduce(0, pairs[:, 0], prob, reduce="amax", include_self=True)
    score = score.scatter_reduce(0, pairs[:, 1], prob, reduce="amax", include_self=True)
    return RegionBoundaries(pairs, prob, edge_pair, score)


def voxel_region_score(regions: RegionBoundaries, edges: torch.Tensor, num_voxels: int) -> torch.Tensor:
    """Region-level boundaries back on voxels: each voxel's largest pair probability over the
    segment interfaces it lies on (0 for voxels inside a segment).

    Args:
        regions: :func:`region_boundaries` of these edges.
        edges: [E, 2] int64 the voxel edges it was computed from.
        num_voxels: N.

    Returns:
        [N] float.
    """
    out = regions.prob.new_zeros(num_voxels)
    across = regions.edge_pair >= 0
    if not bool(across.any()):
        return out
    value = regions.prob[regions.edge_pair[across]]
    for side in (edges[across, 0].long(), edges[across, 1].long()):
        out = out.scatter_reduce(0, side, value, reduce="amax", include_self=True)
    return out


def voxel_neighbour_edges(coords: torch.Tensor) -> torch.Tensor:
    """6-connected neighbour pairs among voxels.

    Each voxel coordinate is packed into one int64 key; keys are sorted once and the +x, +y and
    +z neighbour of every voxel is found by binary search. Pairs never cross scenes (the batch
    index is part of the key).

    Args:
        coords: [N, 4] integer (batch, x, y, z), each row unique.

    Returns:
        [E, 2] int64 row pairs (i, j) with i < j, each unordered neighbour pair once, sorted
        lexicographically.

    Raises:
        ValueError: on duplicate rows or coordinates too spread out to pack into 63 bits.
    """
    if coords.dim() != 2 or coords.shape[1] != 4:
        raise ValueError(f"coords must be [N,4] (batch,x,y,z); got {tuple(coords.shape)}")
    device = coords.device
    n = coords.shape[0]
    if n == 0:
        return torch.zeros((0, 2), dtype=torch.long, device=device)
    c = coords.long()
    c = c - c.min(dim=0).values
    # +2: room for the +1 neighbour of the largest coordinate without wrapping into the next row
    extent = (c.max(dim=0).values + 2).tolist()
    total = 1
    for e in extent:
        total *= int(e)
    if total >= 2**62:
        raise ValueError(f"voxel coordinate extents {extent} are too large to pack into int64 keys")
    strides = [extent[1] * extent[2] * extent[3], extent[2] * extent[3], extent[3], 1]
    stride_t = torch.tensor(strides, dtype=torch.long, device=device)
    key = (c * stride_t).sum(dim=1)
    sorted_key, order = torch.sort(key)
    if bool((sorted_key[1:] == sorted_key[:-1]).any()):
        raise ValueError("voxel_neighbour_edges: coords contain duplicate voxels")
    pairs = []
    for axis_stride in strides[1:]:  # three axis offsets, not a loop over voxels
        query = key + axis_stride
        pos = torch.searchsorted(sorted_key, query).clamp(max=n - 1)
        hit = sorted_key[pos] == query
        src = torch.nonzero(hit, as_tuple=True)[0]
        dst = order[pos[hit]]
        pairs.append(torch.stack([src, dst], dim=1))
    edges = torch.cat(pairs, dim=0)
    edges = torch.sort(edges, dim=1).values
    # lexicographic order for a deterministic output
    edges = edges[torch.argsort(edges[:, 0] * n + edges[:, 1])]
    return edges
