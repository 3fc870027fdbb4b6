"""Predicted semantic boundaries of a scene: per voxel, per region pair, per point; and their truth.

Reads nothing itself: the caller passes a scene's network outputs (:class:`ws3d_train.infer.predict.SceneOutputs`)
and the store's per-point ``overseg/segment`` and ``overseg/boundary``. Used by ``ws3d eval`` (boundary
average precision against true semantic boundaries, beside the over-segmentation flag and random)
and by ``ws3d predict`` (the per-vertex ``boundary`` property of its PLY).

Three scores per voxel, all in [0, 1]:

- ``head``: the boundary network's probability;
- ``region``: the region-level label (:func:`ws3d_train.boundaries.region_boundaries`: the head's
  probabilities averaged over the interface of each pair of adjacent over-segments) of the segment
  interfaces the voxel lies on, 0 inside a segment; a semantic boundary is (nearly always) an
  over-segment border, and the average over a whole interface is steadier than one voxel's value;
- ``overseg_flag``: 1 where any point of the voxel is an over-segment border point (the
  baseline: every geometric border called semantic);
- ``overseg_interface``: 1 where the voxel lies on an interface between two over-segments at the
  voxel resolution (``region`` with a boundary network that says 1 everywhere: the geometric part
  of ``region``, its own baseline).

Per point (:func:`point_boundary`), ``region`` takes the point's voxel score where the point is an
over-segment border point and 0 elsewhere (the over-segmentation says where a border runs at the
points' resolution, the boundary network whether it is semantic).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from pipeline.schema import IGNORE_INDEX
from ws3d_train.boundaries import region_boundaries, voxel_neighbour_edges, voxel_region_score
from ws3d_train.data.dataset import voxel_any, voxel_majority
from ws3d_train.infer.metrics import semantic_boundaries

__all__ = ["BOUNDARY_SCORES", "PointRule", "VoxelBoundaries", "point_boundary", "voxel_boundaries"]

BOUNDARY_SCORES = ("head", "region", "overseg_flag", "overseg_interface")
"""The voxel scores :func:`voxel_boundaries` returns, in the order of ``ws3d eval``'s table."""

PointRule = Literal["head", "region"]


@dataclass(frozen=True, eq=False)
class VoxelBoundaries:
    """Boundary scores and truth on the voxels of one scene."""

    scores: dict[str, np.ndarray]
    """Per name of :data:`BOUNDARY_SCORES`: [Nv] float64 in [0, 1]."""
    truth: np.ndarray | None
    """[Nv] bool true semantic boundary (a labelled voxel with a labelled 6-neighbour of another
    class), None without labels."""
    labelled: np.ndarray | None
    """[Nv] bool voxels with a label (the rows scored)."""


def voxel_boundaries(
    coords: torch.Tensor,
    boundary_prob: torch.Tensor,
    point_to_voxel: np.ndarray,
    segment: np.ndarray,
    flag: np.ndarray,
    semantic: np.ndarray | None = None,
) -> VoxelBoundaries:
    """Scores (and, given point labels, truth) of a scene's voxels.

    Args:
        coords: [Nv, 4] int voxel coordinates (batch, x, y, z).
        boundary_prob: [Nv] float boundary network probability.
        point_to_voxel: [N] int64 voxel of each point.
        segment: [N] int over-segment of each point (a voxel takes its points' majority).
        flag: [N] 0/1 over-segment border flag of each point (``overseg/boundary``).
        semantic: [N] int point labels (IGNORE_INDEX unknown; voxels take the majority), or None.

    Returns:
        :class:`VoxelBoundaries`.
    """
    num_voxels = int(coords.shape[0])
    point_to_voxel = np.asarray(point_to_voxel, np.int64)
    edges = voxel_neighbour_edges(coords.cpu())
    voxel_segment = voxel_majority(point_to_voxel, np.asarray(segment, np.int64), num_voxels, ignore=-1)
    num_segments = int(voxel_segment.max()) + 1 if num_voxels else 0
    head = boundary_prob.detach().float().cpu()
    regions = region_boundaries(head, torch.from_numpy(voxel_segment), edges, max(num_segments, 1))
    region = voxel_region_score(regions, edges, num_voxels)
    scores = {
        "head": head.double().numpy(),
        "region": region.double().numpy(),
        "overseg_flag": voxel_any(point_to_voxel, np.asarray(flag).astype(bool), num_voxels).astype(np.float64),
        "overseg_interface": (regions.edge_pair.new_zeros(num_voxels).index_fill(
            0, edges[regions.edge_pair >= 0].reshape(-1), 1) > 0).double().numpy(),
    }
    if semantic is None:
        return VoxelBoundaries(scores, None, None)
    voxel_label = voxel_majority(point_to_voxel, np.asarray(semantic, np.int64), num_voxels)
    truth = semantic_boundaries(voxel_label, edges.numpy())
    return VoxelBoundaries(scores, truth, voxel_label != IGNORE_INDEX)


def point_boundary(voxels: VoxelBoundaries, point_to_voxel: np.ndarray, flag: np.ndarray,
                   rule: PointRule = "region") -> np.ndarray:
    """[N] float32 boundary probability per point.

    Args:
        voxels: :func:`voxel_boundaries` of the scene.
        point_to_voxel: [N] voxel of each point.
        flag: [N] 0/1 over-segment border flag of each point.
        rule: ``region`` (the voxel's region-level score on over-segment border points, 0 elsewhere)
            or ``head`` (the voxel's boundary network probability).
    """
    p2v = np.asarray(point_to_voxel, np.int64)
    if rule == "head":
        return voxels.scores["head"][p2v].astype(np.float32)
    if rule != "region":
        raise ValueError(f"point_boundary: rule must be 'head' or 'region', got {rule!r}")
    return np.where(np.asarray(flag).astype(bool), voxels.scores["region"][p2v], 0.0).astype(np.float32)
