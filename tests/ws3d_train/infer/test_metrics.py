"""Metrics of ws3d_train.infer.metrics (and the head combination of ws3d_train.open_vocab) on hand cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.schema import IGNORE_INDEX
from ws3d_train.infer.metrics import (
    BoundaryCurve,
    Boxes,
    ConfusionMatrix,
    InstanceGroundTruth,
    InstancePrediction,
    box_iou_3d,
    boundary_quality,
    box_map,
    confusion_matrix,
    instance_ap,
    open_vocab_metrics,
    semantic_boundaries,
    semantic_metrics,
)
from ws3d_train.open_vocab import classify_open_vocab, combine_heads

# --- semantic --------------------------------------------------------------------------------------


def test_confusion_matrix_counts_and_ignore() -> None:
    gt = np.array([0, 0, 1, 1, 2, IGNORE_INDEX])
    pred = np.array([0, 1, 1, 1, 0, 2])
    conf = confusion_matrix(pred, gt, 3)
    expected = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    np.testing.assert_array_equal(conf, expected)
    acc = ConfusionMatrix(3)
    acc.update(pred[:3], gt[:3])
    acc.update(pred[3:], gt[3:])
    np.testing.assert_array_equal(acc.matrix, expected)
    with pytest.raises(ValueError):
        confusion_matrix(np.array([5]), np.array([0]), 3)


def test_semantic_metrics_with_absent_class() -> None:
    # classes: 0 present and predicted; 1 present; 2 only predicted (false positives); 3 absent
    gt = np.array([0, 0, 0, 1, 1, IGNORE_INDEX])
    pred = np.array([0, 0, 2, 1, 0, 3])
    m = semantic_metrics(confusion_matrix(pred, gt, 4), ["a", "b", "c", "d"])
    # IoU a: tp 2, fp 1 (from b), fn 1 -> 2/4; b: 1/2; c: 0/1; d: absent from both -> NaN
    assert m["iou"]["a"] == pytest.approx(0.5)
    assert m["iou"]["b"] == pytest.approx(0.5)
    assert m["iou"]["c"] == 0.0
    assert math.isnan(m["iou"]["d"])
    assert m["miou"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert m["oa"] == pytest.approx(3 / 5)
    assert m["acc"]["a"] == pytest.approx(2 / 3)
    assert math.isnan(m["acc"]["c"])
    assert m["macc"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["num_points"] == 5


def test_open_vocab_metrics_harmonic_mean() -> None:
    conf = np.diag([10, 10, 10, 10]).astype(np.int64)
    conf[2, 0] = 10  # class 2 (novel) half wrong -> IoU(2) = 1/2, IoU(0) = 10/20
    m = open_vocab_metrics(conf, base_ids=[0, 1], novel_ids=[2, 3])
    base, novel = (0.5 + 1.0) / 2, (0.5 + 1.0) / 2
    assert m["base_miou"] == pytest.approx(base)
    assert m["novel_miou"] == pytest.approx(novel)
    assert m["hiou"] == pytest.approx(2 * base * novel / (base + novel))
    conf2 = np.diag([10, 10, 0, 0]).astype(np.int64)
    conf2[2, 0] = 5
    m2 = open_vocab_metrics(conf2, [0, 1], [2, 3])
    assert m2["novel_miou"] == 0.0 and m2["hiou"] == 0.0
    with pytest.raises(ValueError):
        open_vocab_metrics(conf, [0, 1], [1, 2])


# --- instances -------------------------------------------------------------------------------------


def _scannet_reference_ap(preds, gts, class_ids, min_region_size, overlaps):
    """A near-literal port of ScanNet's evaluate_semantic_instance.py (dicts and loops).

    Returns ap [num_classes, num_overlaps].
    """
    matches = []
    for pred, gt in zip(preds, gts):
        inst = np.asarray(gt.instance)
        sem = np.asarray(gt.semantic)
        void = ~(np.isin(sem, class_ids) & (inst >= 0))
        gt2pred = {c: [] for c in class_ids}
        for i, s in sorted({(int(i), int(s)) for i, s in zip(inst, sem) if i >= 0 and s in class_ids}):
            mask = (inst == i) & (sem == s)
            gt2pred[s].append({"mask": mask, "vert_count": int(mask.sum()), "matched_pred": []})
        pred2gt = {c: [] for c in class_ids}
        for k, (m, c, conf) in enumerate(zip(pred.masks, pred.classes, pred.scores)):
            c = int(c)
            if c not in class_ids:
                continue
            mask = np.zeros(inst.shape[0], dtype=bool)
            mask[m] = True
            num = int(mask.sum())
            if num < min_region_size:
                continue
            p = {"name": k, "vert_count": num, "confidence": conf, "void_intersection": int((void & mask).sum())}
            matched_gt = []
            for g in gt2pred[c]:
                inter = int((g["mask"] & mask).sum())
                if inter > 0:
                    gc, pc = dict(g), dict(p)
                    gc["intersection"] = pc["intersection"] = inter
                    matched_gt.append(gc)
                    g["matched_pred"].append(pc)
            p["matched_gt"] = matched_gt
            pred2gt[c].append(p)
        matches.append((gt2pred, pred2gt))

    ap = np.zeros((len(class_ids), len(overlaps)))
    for oi, th in enumerate(overlaps):
        visited = {}
        for li, c in enumerate(class_ids):
            y_true, y_score = np.empty(0), np.empty(0)
            hard_fn = 0
            has_gt = has_pred = False
            for si, (gt2pred, pred2gt) in enumerate(matches):
                pred_instances = pred2gt[c]
                gt_instances = [g for g in gt2pred[c] if g["vert_count"] >= min_region_size]
                has_gt |= bool(gt_instances)
                has_pred |= bool(pred_instances)
                cur_true = np.ones(len(gt_instances))
                cur_score = np.ones(len(gt_instances)) * -np.inf
                cur_match = np.zeros(len(gt_instances), dtype=bool)
                for gti, g in enumerate(gt_instances):
                    found = False
                    for p in g["matched_pred"]:
                        if visited.get((si, p["name"]), False):
                            continue
                        ov = p["intersection"] / (g["vert_count"] + p["vert_count"] - p["intersection"])
                        if ov > th:
                            if cur_match[gti]:
                                mx, mn = max(cur_score[gti], p["confidence"]), min(cur_score[gti], p["confidence"])
                                cur_score[gti] = mx
                                cur_true = np.append(cur_true, 0)
                                cur_score = np.append(cur_score, mn)
                                cur_match = np.append(cur_match, True)
                            else:
                                found = True
                                cur_match[gti] = True
                                cur_score[gti] = p["confidence"]
                                visited[(si, p["name"])] = True
                    if not found:
                        hard_fn += 1
                cur_true, cur_score = cur_true[cur_match], cur_score[cur_match]
                for p in pred_instances:
                    found_gt = False
                    for g in p["matched_gt"]:
                        ov = g["intersection"] / (g["vert_count"] + p["vert_count"] - g["intersection"])
                        if ov > th:
                            found_gt = True
                            break
                    if not found_gt:
                        num_ignore = p["void_intersection"]
                        for g in p["matched_gt"]:
                            if g["vert_count"] < min_region_size:
                                num_ignore += g["intersection"]
                        if num_ignore / p["vert_count"] <= th:
                            cur_true = np.append(cur_true, 0)
                            cur_score = np.append(cur_score, p["confidence"])
                y_true, y_score = np.append(y_true, cur_true), np.append(y_score, cur_score)
            if has_gt and has_pred:
                order = np.argsort(y_score)
                ys, yt = y_score[order], y_true[order]
                cs = np.cumsum(yt)
                _, uidx = np.unique(ys, return_index=True)
                npr = len(uidx) + 1
                n_ex = len(ys)
                n_true = cs[-1] if len(cs) else 0
                prec, rec = np.zeros(npr), np.zeros(npr)
                cs = np.append(cs, 0)
                for ir, ix in enumerate(uidx):
                    c_ = cs[ix - 1]
                    tp = n_true - c_
                    fp = n_ex - ix - tp
                    fn = c_ + hard_fn
                    prec[ir] = tp / (tp + fp)
                    rec[ir] = tp / (tp + fn)
                prec[-1], rec[-1] = 1.0, 0.0
                rc = np.append(np.append(rec[0], rec), 0.0)
                ap[li, oi] = np.dot(prec, np.convolve(rc, [-0.5, 0, 0.5], "valid"))
            elif has_gt:
                ap[li, oi] = 0.0
            else:
                ap[li, oi] = np.nan
    return ap


def _one_object_scene():
    """200 points: points 0-99 instance 0 of class 1, 100-199 instance 1 of class 2."""
    inst = np.repeat([0, 1], 100)
    sem = np.repeat([1, 2], 100)
    return InstanceGroundTruth(instance=inst, semantic=sem)


def test_instance_ap_perfect_plus_false_positive() -> None:
    gt = _one_object_scene()
    perfect = np.arange(100)
    wrong = np.arange(100, 200)  # a class-1 prediction covering the class-2 object: a false positive
    low_fp = InstancePrediction([perfect, wrong], np.array([1, 1]), np.array([0.9, 0.5]))
    names = ["chair", "table"]
    res = instance_ap([low_fp], [gt], class_ids=[1, 2], class_names=names)["per_class"]["chair"]
    # the false positive scores below the true one: precision is 1 up to recall 1
    assert res["ap"] == pytest.approx(1.0)
    assert res["ap50"] == pytest.approx(1.0) and res["ap25"] == pytest.approx(1.0)
    high_fp = InstancePrediction([perfect, wrong], np.array([1, 1]), np.array([0.9, 0.95]))
    res = instance_ap([high_fp], [gt], class_ids=[1, 2], class_names=names)
    # ScanNet's integration: PR points (r=1, p=0.5) and (r=0, p=0) plus the artificial (0, 1):
    # step widths [0.5, 0.5, 0] -> AP = 0.5 * 0.5 = 0.25
    assert res["per_class"]["chair"]["ap50"] == pytest.approx(0.25)
    assert res["per_class"]["chair"]["ap"] == pytest.approx(0.25)
    assert res["per_class"]["table"]["ap50"] == 0.0  # gt but no prediction
    assert res["ap50"] == pytest.approx(0.125)
    # when the wrong prediction lies on points of a class not evaluated (void), it is ignored
    res = instance_ap([high_fp], [gt], class_ids=[1])
    assert res["ap50"] == pytest.approx(1.0)


def test_instance_ap_absent_classes_and_thresholds() -> None:
    gt = _one_object_scene()
    # class 1: IoU 0.6 (60 of the 100 points, nothing else); class 2: no prediction; class 3: no gt
    pred = InstancePrediction([np.arange(60), np.arange(100, 150)], np.array([1, 3]), np.array([0.8, 0.7]))
    res = instance_ap([pred], [gt], class_ids=[1, 2, 3], class_names=["a", "b", "c"], min_region_size=10)
    a = res["per_class"]["a"]
    assert a["ap25"] == pytest.approx(1.0) and a["ap50"] == pytest.approx(1.0)
    # matched at 0.50 and 0.55 only, of the nine thresholds 0.50 .. 0.90
    assert a["ap"] == pytest.approx(2 / 9)
    assert res["per_class"]["b"]["ap50"] == 0.0
    assert math.isnan(res["per_class"]["c"]["ap50"])
    assert res["ap50"] == pytest.approx(0.5)  # mean over a and b; c has no gt and is skipped
    # a prediction below min_region_size does not count
    res = instance_ap([pred], [gt], class_ids=[1], min_region_size=100)
    assert res["ap50"] == 0.0


def test_instance_ap_matches_scannet_reference_on_random_scenes() -> None:
    rng = np.random.default_rng(7)
    class_ids = [1, 2, 3]
    preds, gts = [], []
    for _ in range(6):
        n = 400
        inst = rng.integers(-1, 6, n)
        inst_class = rng.integers(0, 4, 6)
        sem = np.where(rng.random(n) < 0.1, IGNORE_INDEX, inst_class[np.clip(inst, 0, 5)])
        gts.append(InstanceGroundTruth(inst, sem))
        masks, classes, scores = [], [], []
        for _k in range(rng.integers(4, 12)):  # duplicates, partial and noisy masks, wrong classes
            target = rng.integers(0, 6)
            base = np.flatnonzero(inst == target)
            keep = base[rng.random(base.size) < rng.uniform(0.4, 1.0)]
            extra = rng.choice(n, rng.integers(0, 25), replace=False)
            masks.append(np.union1d(keep, extra))
            classes.append(inst_class[target] if rng.random() < 0.7 else rng.integers(0, 4))
            scores.append(round(float(rng.random()), 1))  # ties on purpose
        preds.append(InstancePrediction(masks, np.array(classes), np.array(scores)))
    overlaps = (0.5, 0.6, 0.75, 0.25, 0.1)
    for min_size in (1, 55):
        ref = _scannet_reference_ap(preds, gts, class_ids, min_size, overlaps)
        assert ((ref > 0.05) & (ref < 0.95)).sum() >= 5  # the case is not trivial
        res = instance_ap(preds, gts, class_ids=class_ids, min_region_size=min_size, overlaps=overlaps)
        for li, c in enumerate(class_ids):
            got50 = res["per_class"][str(c)]["ap50"]
            got25 = res["per_class"][str(c)]["ap25"]
            np.testing.assert_allclose([got50, got25], [ref[li, 0], ref[li, 3]], equal_nan=True)
            rest = np.array([0, 1, 2, 4])
            exp_ap = np.nanmean(ref[li, rest]) if not np.isnan(ref[li, rest]).all() else np.nan
            np.testing.assert_allclose(res["per_class"][str(c)]["ap"], exp_ap, equal_nan=True)


def test_instance_prediction_from_instance_ids() -> None:
    ids = np.array([1, -1, 0, 1, 2, 0])
    p = InstancePrediction.from_instance_ids(ids, np.array([4, 5, 6]), np.array([0.1, 0.2, 0.3]))
    assert [m.tolist() for m in p.masks] == [[2, 5], [0, 3], [4]]


# --- boxes -----------------------------------------------------------------------------------------


def test_box_iou_hand_values() -> None:
    a = np.array([[0, 0, 0, 2, 2, 2], [0, 0, 0, 1, 1, 1]], dtype=float)
    b = np.array([[1, 1, 1, 3, 3, 3]], dtype=float)
    np.testing.assert_allclose(box_iou_3d(a, b), [[1 / 15], [0.0]])


def test_box_map_hand_case() -> None:
    gt = Boxes(np.array([[0, 0, 0, 1, 1, 1], [5, 5, 5, 6, 6, 6]], dtype=float), np.array([0, 0]))
    pred = Boxes(
        np.array(
            [
                [0, 0, 0, 1, 1, 1],  # exact match of gt 0, score 0.9
                [10, 10, 10, 11, 11, 11],  # nothing there, 0.8
                [5, 5, 5, 5.3, 6, 6],  # IoU 0.3 with gt 1, 0.7
                [0, 0, 0, 1, 1, 1],  # duplicate of gt 0, 0.6
                [0, 0, 0, 1, 1, 1],  # class 1 without gt, ignored
            ]
        ),
        np.array([0, 0, 0, 0, 1]),
        np.array([0.9, 0.8, 0.7, 0.6, 0.99]),
    )
    res = box_map([pred], [gt], (0.25, 0.5), class_ids=[0, 1], class_names=["box", "ghost"])
    # @0.25: TP FP TP FP -> recall .5 .5 1 1, precision 1 .5 .667 .5 -> AP .5*1 + .5*2/3
    assert res["per_class"]["box"]["ap@0.25"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    # @0.5: TP FP FP FP -> AP .5
    assert res["per_class"]["box"]["ap@0.5"] == pytest.approx(0.5)
    assert math.isnan(res["per_class"]["ghost"]["ap@0.5"])
    assert res["map@0.25"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    # a class with gt but no prediction scores 0 and counts in the mean
    gt2 = Boxes(np.concatenate([gt.bounds, [[0, 0, 0, 1, 1, 1]]]), np.array([0, 0, 2]))
    res2 = box_map([pred], [gt2], (0.5,), class_ids=[0, 2])
    assert res2["per_class"]["2"]["ap@0.5"] == 0.0
    assert res2["map@0.5"] == pytest.approx(0.25)


# --- open vocabulary -------------------------------------------------------------------------------


def test_classify_open_vocab_is_cosine() -> None:
    feat = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    torch.testing.assert_close(classify_open_vocab(feat, text), torch.tensor([[1.0, 0.0], [0.5**0.5, 0.5**0.5]]))


def test_combine_heads_calibrated() -> None:
    # vocabulary of 3: base {0, 2}, novel {1}
    clip = torch.tensor([[0.30, 0.20, 0.29], [0.20, 0.30, 0.21]])
    sem = torch.tensor([[0.0, 3.0], [1.0, 0.0]])  # semantic head over (class 0, class 2)
    out = combine_heads(sem, clip, [0, 2], [1], clip_temperature=0.01)
    probs = out.exp()
    torch.testing.assert_close(probs.sum(1), torch.ones(2))  # still a distribution
    q = torch.softmax(clip / 0.01, 1)
    mass = q[:, [0, 2]].sum(1)
    torch.testing.assert_close(probs[:, 1], q[:, 1])
    torch.testing.assert_close(probs[:, [0, 2]], mass[:, None] * torch.softmax(sem, 1))
    # point 0: CLIP prefers class 0, the semantic head re-splits the base mass to class 2
    assert out.argmax(1).tolist() == [2, 1]
    assert combine_heads(sem, clip, [0, 2], [1], mode="clip").argmax(1).tolist() == [0, 1]
    # a large novel bias turns every prediction novel
    assert combine_heads(sem, clip, [0, 2], [1], novel_bias=20.0).argmax(1).tolist() == [1, 1]
    with pytest.raises(ValueError):
        combine_heads(sem, clip, [0], [1])


# --- boundaries ------------------------------------------------------------------------------------


def _brute_ap_f1(score: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Average precision (scikit-learn's step-wise definition, ties as one threshold) and best F1,
    one threshold at a time."""
    ap, prev_recall, best = 0.0, 0.0, 0.0
    for t in sorted(set(score.tolist()), reverse=True):
        chosen = score >= t
        tp = float((chosen & truth).sum())
        precision, recall = tp / chosen.sum(), tp / truth.sum()
        ap += (recall - prev_recall) * precision
        prev_recall = recall
        if precision + recall > 0:
            best = max(best, 2 * precision * recall / (precision + recall))
    return ap, best


def test_boundary_quality_matches_a_brute_force_reference() -> None:
    rng = np.random.default_rng(0)
    for trial in range(5):
        n = 400
        truth = rng.random(n) < 0.15
        score = np.round(np.clip(0.3 * truth + rng.random(n) * 0.8, 0, 1), 2)  # ties on purpose
        curve = BoundaryCurve()
        half = n // 2  # accumulated over two "scenes"
        curve.update(score[:half], truth[:half])
        curve.update(score[half:], truth[half:])
        got = boundary_quality(curve)
        ap, f1 = _brute_ap_f1(score, truth)
        assert got["ap"] == pytest.approx(ap, abs=1e-9) and got["best_f1"] == pytest.approx(f1, abs=1e-9)
        assert got["positive_rate"] == pytest.approx(truth.mean()) and got["rows"] == n
    # a constant score (random's expectation) has AP = the positive rate; a perfect one 1
    flat = BoundaryCurve()
    flat.update(np.full(10, 0.5), np.arange(10) < 3)
    assert boundary_quality(flat)["ap"] == pytest.approx(0.3)
    perfect = BoundaryCurve()
    perfect.update((np.arange(10) < 3).astype(float), np.arange(10) < 3)
    assert boundary_quality(perfect)["ap"] == pytest.approx(1.0) and boundary_quality(perfect)["best_f1"] == 1.0
    assert boundary_quality(perfect)["best_threshold"] == 1.0
    empty = BoundaryCurve()
    empty.update(np.zeros(3), np.zeros(3, bool))
    assert math.isnan(boundary_quality(empty)["ap"])
    with pytest.raises(ValueError):
        flat.update(np.full(2, np.nan), np.zeros(2, bool))


def test_semantic_boundaries_by_hand() -> None:
    labels = np.array([0, 0, 1, IGNORE_INDEX, 1, 2])
    edges = np.array([[0, 1], [1, 2], [2, 3], [3, 4], [4, 5]])
    # 1|2 differ, 4|5 differ; an unlabelled neighbour (3) makes no boundary
    assert semantic_boundaries(labels, edges).tolist() == [False, True, True, False, True, True]
    assert not semantic_boundaries(labels, np.zeros((0, 2), np.int64)).any()
