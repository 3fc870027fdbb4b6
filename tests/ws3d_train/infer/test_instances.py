"""Instances from segments and boxes from instances (ws3d_train.infer.instances)."""

from __future__ import annotations

import numpy as np
import pytest

from ws3d_train.infer.instances import boxes_from_instances, instances_from_segments
from ws3d_train.infer.metrics import Boxes, box_map


def _chain_scene():
    """Five segments of 4 points each in a chain 0-1-2-3-4.

    Segments 0, 1 (class 2, same embedding), 2 (class 2, other embedding), 3 (class 0),
    4 (class 2, like 0 and 1 but only adjacent to 3).
    """
    seg = np.repeat(np.arange(5), 4)
    seg_class = np.array([2, 2, 2, 0, 2])
    pred_class = seg_class[seg].copy()
    pred_class[1] = 1  # one dissenting point in segment 0: the majority still says 2
    e = np.array([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    embed = e[seg]
    pairs = np.array([[0, 1], [2, 1], [2, 3], [3, 4], [1, 0]])
    return seg, pred_class, embed, pairs


def test_merges_adjacent_similar_segments_of_one_class() -> None:
    seg, pred_class, embed, pairs = _chain_scene()
    inst, cls, score = instances_from_segments(seg, pred_class, embed, pairs, sim_threshold=0.9)
    seg_inst = inst.reshape(5, 4)
    assert (seg_inst == seg_inst[:, :1]).all()  # a segment is never split
    ids = seg_inst[:, 0]
    assert ids[0] == ids[1]  # merged
    assert len({ids[1], ids[2], ids[3], ids[4]}) == 4  # embedding, class and adjacency separate
    assert len(cls) == 4 and sorted(cls.tolist()) == [0, 2, 2, 2]
    assert cls[ids[0]] == 2 and cls[ids[3]] == 0
    # purity score: 7 of the 8 points of the merged instance agree with its class
    assert score[ids[0]] == pytest.approx(7 / 8)
    assert score[ids[2]] == pytest.approx(1.0)


def test_threshold_ignore_classes_scores_and_min_points() -> None:
    seg, pred_class, embed, pairs = _chain_scene()
    inst, cls, _ = instances_from_segments(seg, pred_class, embed, pairs, sim_threshold=-1.0)
    ids = inst.reshape(5, 4)[:, 0]
    assert ids[0] == ids[1] == ids[2] and len(cls) == 3  # any cosine passes; 3 and 4 stay apart

    inst, cls, _ = instances_from_segments(seg, pred_class, embed, pairs, ignore_classes=(0,))
    assert (inst.reshape(5, 4)[3] == -1).all() and 0 not in cls.tolist()

    point_score = np.linspace(0.0, 1.0, 20)
    inst, cls, score = instances_from_segments(seg, pred_class, embed, pairs, point_score=point_score)
    for k in range(len(cls)):
        assert score[k] == pytest.approx(point_score[inst == k].mean())

    seg2 = seg.copy()
    seg2[seg2 == 4] = -1  # unsegmented points belong to no instance
    seg2[16] = 4  # segment 4 keeps a single point
    inst, cls, score = instances_from_segments(seg2, pred_class, embed, pairs, min_points=2)
    assert (inst[16:] == -1).all()
    assert len(cls) == len(score) == 3 and set(inst[inst >= 0].tolist()) == {0, 1, 2}


def test_no_segments_gives_no_instances() -> None:
    inst, cls, score = instances_from_segments(
        np.full(5, -1), np.zeros(5, dtype=int), np.ones((5, 3)), np.zeros((0, 2), dtype=int)
    )
    assert (inst == -1).all() and cls.size == 0 and score.size == 0


def test_boxes_from_instances_match_loop_and_feed_box_map() -> None:
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(200, 3))
    inst = rng.integers(-1, 5, 200)
    inst[inst == 3] = 4  # instance 3 has no point and yields no box
    cls = np.array([0, 1, 0, 2, 1])
    score = np.array([0.5, 0.6, 0.7, 0.8, 0.9])
    bounds, bcls, bscore = boxes_from_instances(xyz, inst, cls, score)
    present = [k for k in range(5) if (inst == k).any()]
    assert bounds.shape == (len(present), 6)
    for row, k in enumerate(present):
        pts = xyz[inst == k]
        np.testing.assert_allclose(bounds[row], np.r_[pts.min(0), pts.max(0)])
        assert bcls[row] == cls[k] and bscore[row] == score[k]
    # boxes of the ground-truth instances score a perfect mAP against themselves
    boxes = Boxes(bounds, bcls, bscore)
    res = box_map([boxes], [Boxes(bounds, bcls)], (0.25, 0.5))
    assert res["map@0.25"] == pytest.approx(1.0) and res["map@0.5"] == pytest.approx(1.0)
