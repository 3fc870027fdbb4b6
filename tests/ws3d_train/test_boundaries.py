"""Region-level boundaries on the segment graph (ws3d_train.boundaries), against brute-force loops."""
from __future__ import annotations

import pytest
import torch

from ws3d_train.boundaries import region_boundaries, voxel_neighbour_edges, voxel_region_score


def test_region_boundaries_and_voxel_scores_match_loops() -> None:
    gen = torch.Generator().manual_seed(4)
    xyz = torch.unique(torch.randint(0, 6, (150, 3), generator=gen), dim=0)
    coords = torch.cat([torch.zeros(xyz.shape[0], 1, dtype=torch.long), xyz], 1)
    n = coords.shape[0]
    seg = (xyz[:, 0] // 2) * 3 + xyz[:, 1] // 2  # blocks of 2 x 2 columns
    seg[0] = -1  # a voxel in no segment joins no pair
    prob = torch.rand(n, generator=gen, dtype=torch.float64)
    edges = voxel_neighbour_edges(coords)
    s_count = int(seg.max()) + 1
    regions = region_boundaries(prob, seg, edges, s_count)
    interfaces: dict[tuple[int, int], list[float]] = {}
    for i, j in edges.tolist():
        a, b = int(seg[i]), int(seg[j])
        if a != b and a >= 0 and b >= 0:
            interfaces.setdefault((min(a, b), max(a, b)), []).append(0.5 * float(prob[i] + prob[j]))
    assert [tuple(p) for p in regions.pairs.tolist()] == sorted(interfaces)
    for k, pair in enumerate(sorted(interfaces)):
        assert float(regions.prob[k]) == pytest.approx(sum(interfaces[pair]) / len(interfaces[pair]))
    for a in range(s_count):
        mine = [float(regions.prob[k]) for k, p in enumerate(regions.pairs.tolist()) if a in p]
        assert float(regions.segment_score[a]) == pytest.approx(max(mine, default=0.0))
    score = voxel_region_score(regions, edges, n)
    for v in range(n):
        mine = [float(regions.prob[regions.edge_pair[e]]) for e, (i, j) in enumerate(edges.tolist())
                if v in (i, j) and int(regions.edge_pair[e]) >= 0]
        assert float(score[v]) == pytest.approx(max(mine, default=0.0))
    assert float(score[0]) == 0.0  # no segment, no interface


def test_region_boundaries_without_edges() -> None:
    regions = region_boundaries(torch.rand(3), torch.tensor([0, 1, 2]), torch.zeros((0, 2), dtype=torch.long), 3)
    assert regions.pairs.shape == (0, 2) and regions.segment_score.tolist() == [0.0, 0.0, 0.0]
    assert voxel_region_score(regions, torch.zeros((0, 2), dtype=torch.long), 3).tolist() == [0.0, 0.0, 0.0]
