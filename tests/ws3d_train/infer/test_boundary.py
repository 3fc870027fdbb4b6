"""Predicted boundaries of a scene (ws3d_train.infer.boundary): voxel scores, truth, per-point rules."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.schema import IGNORE_INDEX
from ws3d_train.infer.boundary import BOUNDARY_SCORES, point_boundary, voxel_boundaries


def _line_scene():
    """Five voxels on a line, two points each; segments 0 0 | 1 | 2 2 at the voxel level, classes
    A A | A | B B: the 1|2 border is semantic, the 0|1 border only geometric."""
    coords = torch.tensor([[0, x, 0, 0] for x in range(5)], dtype=torch.int32)
    point_to_voxel = np.repeat(np.arange(5), 2)
    segment = np.repeat([0, 0, 1, 2, 2], 2)
    flag = np.repeat([0, 1, 1, 1, 0], 2)
    semantic = np.repeat([0, 0, 0, 1, 1], 2)
    semantic[0] = IGNORE_INDEX  # voxel 0 keeps its other point's label
    prob = torch.tensor([0.1, 0.3, 0.7, 0.9, 0.2])
    return coords, prob, point_to_voxel, segment, flag, semantic


def test_voxel_boundaries_scores_and_truth() -> None:
    coords, prob, p2v, segment, flag, semantic = _line_scene()
    vb = voxel_boundaries(coords, prob, p2v, segment, flag, semantic)
    assert set(vb.scores) == set(BOUNDARY_SCORES)
    np.testing.assert_allclose(vb.scores["head"], prob.double().numpy(), rtol=1e-6)
    # interfaces: (0,1) between voxels 1-2 -> (0.3 + 0.7) / 2; (1,2) between voxels 2-3 -> (0.7 + 0.9) / 2
    np.testing.assert_allclose(vb.scores["region"], [0.0, 0.5, 0.8, 0.8, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(vb.scores["overseg_flag"], [0, 1, 1, 1, 0])
    np.testing.assert_array_equal(vb.scores["overseg_interface"], [0, 1, 1, 1, 0])
    assert vb.truth.tolist() == [False, False, True, True, False] and vb.labelled.all()
    assert voxel_boundaries(coords, prob, p2v, segment, flag).truth is None


def test_point_boundary_rules() -> None:
    coords, prob, p2v, segment, flag, semantic = _line_scene()
    vb = voxel_boundaries(coords, prob, p2v, segment, flag, semantic)
    head = point_boundary(vb, p2v, flag, "head")
    np.testing.assert_allclose(head, np.repeat(prob.numpy(), 2), rtol=1e-6)
    region = point_boundary(vb, p2v, flag, "region")
    np.testing.assert_allclose(region, np.repeat([0.0, 0.5, 0.8, 0.8, 0.0], 2), rtol=1e-6)
    flag2 = flag.copy()
    flag2[4] = 0  # a point off the over-segment borders is no boundary, whatever its voxel says
    assert point_boundary(vb, p2v, flag2, "region")[4] == 0.0
