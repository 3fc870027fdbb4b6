"""Evaluation metrics: semantic, open-vocabulary, instance (ScanNet AP) and box (VOC mAP).

Pure numpy (no torch, no I/O): the evaluation loop feeds per-scene predictions in and writes the
returned dicts to the terminal table and the JSON file.

- Semantic: one confusion matrix (rows ground truth, columns prediction) accumulated over the
  split; IoU, accuracies and the open-vocabulary base/novel/harmonic IoU all derive from it.
- Instances: the logic of the ScanNet benchmark script (``evaluate_semantic_instance.py``).
- Boxes: the VOC area-under-the-envelope AP used by VoteNet/ScanNet detection (``eval_det``).
- Boundaries: a score per voxel (or point) against true semantic boundaries, accumulated in a
  fixed histogram of scores (:class:`BoundaryCurve`, memory bounded whatever the split's size);
  average precision (the step-wise sum ``sum_k (R_k - R_{k-1}) P_k`` over descending thresholds,
  as scikit-learn's ``average_precision_score``) and the best F1 over thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.schema import IGNORE_INDEX

__all__ = [
    "BOUNDARY_BINS",
    "BoundaryCurve",
    "Boxes",
    "ConfusionMatrix",
    "InstanceGroundTruth",
    "InstancePrediction",
    "INSTANCE_OVERLAPS",
    "box_iou_3d",
    "boundary_quality",
    "box_map",
    "confusion_matrix",
    "instance_ap",
    "open_vocab_metrics",
    "semantic_metrics",
    "semantic_boundaries",
    "voc_ap",
]


# ---------------------------------------------------------------------------------------------
# semantic segmentation


def confusion_matrix(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore: int = IGNORE_INDEX
) -> np.ndarray:
    """Confusion matrix of one set of points.

    Args:
        pred: [N] int predicted class in ``[0, num_classes)``.
        gt: [N] int ground-truth class in ``[0, num_classes)`` or ``ignore``.
        num_classes: C.
        ignore: ground-truth value of unlabelled points; they are not counted.

    Returns:
        [C, C] int64, ``conf[g, p]`` = number of points of class g predicted as p.

    Raises:
        ValueError: on shape mismatch, or a counted point whose gt or prediction is out of range.
    """
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    gt = np.asarray(gt).reshape(-1).astype(np.int64)
    if pred.shape != gt.shape:
        raise ValueError(f"pred has {pred.size} points but gt has {gt.size}")
    keep = gt != ignore
    g, p = gt[keep], pred[keep]
    if g.size and (g.min() < 0 or g.max() >= num_classes):
        raise ValueError(f"gt classes must lie in [0, {num_classes}) or equal {ignore}")
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"predicted classes must lie in [0, {num_classes}) on labelled points")
    return np.bincount(g * num_classes + p, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


class ConfusionMatrix:
    """Accumulates :func:`confusion_matrix` over scenes.

    ``cm = ConfusionMatrix(20); cm.update(pred, gt); semantic_metrics(cm.matrix, names)``.
    """

    def __init__(self, num_classes: int, *, ignore: int = IGNORE_INDEX) -> None:
        self.num_classes = int(num_classes)
        self.ignore = int(ignore)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one scene's points (see :func:`confusion_matrix`)."""
        self.matrix += confusion_matrix(pred, gt, self.num_classes, self.ignore)

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another accumulator's counts (e.g. from another worker)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class into {self.num_classes}-class matrix")
        self.matrix += other.matrix

    def reset(self) -> None:
        self.matrix[...] = 0


def _iou_per_class(conf: np.ndarray) -> np.ndarray:
    """[C] IoU, NaN for classes absent from both gt and prediction."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(axis=0) + conf.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def semantic_metrics(conf: np.ndarray, class_names: Sequence[str]) -> dict:
    """Semantic segmentation metrics from a confusion matrix.

    IoU_c = TP / (TP + FP + FN). A class absent from both the ground truth and the predictions
    has no IoU (NaN) and is excluded from the mean; a class that is predicted but absent from the
    ground truth has IoU 0 and counts (it only produced false positives). Per-class accuracy is
    TP / (number of gt points of the class), NaN for classes absent from the gt, and the mean class
    accuracy averages the classes present in the gt.

    Args:
        conf: [C, C] confusion matrix (rows gt, columns prediction).
        class_names: C names.

    Returns:
        ``{"miou", "oa", "macc", "num_points", "iou": {name: float}, "acc": {name: float}}``
        with NaN where undefined (JSON writers should map NaN to null).
    """
    conf = np.asarray(conf, dtype=np.int64)
    if conf.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix {conf.shape} does not match {len(class_names)} class names")
    iou = _iou_per_class(conf)
    tp = np.diag(conf).astype(np.float64)
    gt_count = conf.sum(axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(gt_count > 0, tp / np.where(gt_count > 0, gt_count, 1.0), np.nan)
    total = int(conf.sum())
    return {
        "miou": _nanmean(iou),
        "oa": float(tp.sum() / total) if total else float("nan"),
        "macc": _nanmean(acc),
        "num_points": total,
        "iou": {name: float(v) for name, v in zip(class_names, iou)},
        "acc": {name: float(v) for name, v in zip(class_names, acc)},
    }


def open_vocab_metrics(
    conf: np.ndarray, base_ids: Sequence[int], novel_ids: Sequence[int]
) -> dict:
    """Base, novel and harmonic-mean IoU of an open-vocabulary split.

    ``conf`` is the confusion matrix of the prediction over all (base + novel) classes. The
    base (novel) mIoU averages the per-class IoU of the base (novel) classes, skipping classes
    absent from both gt and prediction (as :func:`semantic_metrics`); ``hiou = 2 b n / (b + n)``,
    0 when both are 0 and NaN when either is undefined.

    Args:
        conf: [C, C] confusion matrix.
        base_ids: class ids seen with labels during fine-tuning.
        novel_ids: class ids never labelled.

    Returns:
        ``{"miou", "base_miou", "novel_miou", "hiou"}``.
    """
    base_ids = np.asarray(base_ids, dtype=np.int64)
    novel_ids = np.asarray(novel_ids, dtype=np.int64)
    if np.intersect1d(base_ids, novel_ids).size:
        raise ValueError(f"base and novel class ids overlap: {np.intersect1d(base_ids, novel_ids).tolist()}")
    iou = _iou_per_class(conf)
    base = _nanmean(iou[base_ids])
    novel = _nanmean(iou[novel_ids])
    if np.isnan(base) or np.isnan(novel):
        hiou = float("nan")
    elif base + novel == 0:
        hiou = 0.0
    else:
        hiou = 2.0 * base * novel / (base + novel)
    return {"miou": _nanmean(iou), "base_miou": base, "novel_miou": novel, "hiou": hiou}


# ---------------------------------------------------------------------------------------------
# instance segmentation (ScanNet benchmark)

#: IoU thresholds of the ScanNet AP: ``np.arange(0.5, 0.95, 0.05)`` (0.50 ... 0.90, as the
#: benchmark script has it; 0.95 is not included) plus 0.25 for AP25.
INSTANCE_OVERLAPS: tuple[float, ...] = tuple(float(x) for x in np.append(np.arange(0.5, 0.95, 0.05), 0.25))


BOUNDARY_BINS = 10_000
"""Score bins of :class:`BoundaryCurve`: scores are quantised to 1e-4 (a 0/1 flag stays exact)."""


def semantic_boundaries(labels: np.ndarray, edges: np.ndarray, ignore: int = IGNORE_INDEX) -> np.ndarray:
    """True semantic boundaries: a row with a neighbour of another class.

    Args:
        labels: [N] int class per row (voxel or point), ``ignore`` unlabelled.
        edges: [E, 2] int neighbouring row pairs (6-neighbour voxels, mesh edges ...).
        ignore: the unlabelled value; an unlabelled neighbour makes no boundary.

    Returns:
        [N] bool.
    """
    labels = np.asarray(labels).reshape(-1)
    edges = np.asarray(edges, np.int64).reshape(-1, 2)
    out = np.zeros(labels.shape[0], bool)
    if edges.size == 0:
        return out
    a, b = labels[edges[:, 0]], labels[edges[:, 1]]
    differ = (a != b) & (a != ignore) & (b != ignore)
    out[edges[differ, 0]] = True
    out[edges[differ, 1]] = True
    return out


class BoundaryCurve:
    """Accumulates boundary scores against truth over scenes in a fixed histogram.

    ``curve.update(score, truth)`` per scene (scores in [0, 1]; rows to leave out, e.g. unlabelled
    ones, are not passed), then :func:`boundary_quality` ``(curve)``. Memory: two arrays of
    :data:`BOUNDARY_BINS` + 1 counts.
    """

    def __init__(self, bins: int = BOUNDARY_BINS) -> None:
        self.bins = int(bins)
        self.positive = np.zeros(self.bins + 1, np.int64)
        self.negative = np.zeros(self.bins + 1, np.int64)

    def update(self, score: np.ndarray, truth: np.ndarray) -> None:
        score = np.asarray(score, np.float64).reshape(-1)
        truth = np.asarray(truth).reshape(-1).astype(bool)
        if score.shape != truth.shape:
            raise ValueError(f"BoundaryCurve.update: {score.size} scores for {truth.size} truths")
        if score.size and not np.isfinite(score).all():
            raise ValueError("BoundaryCurve.update: scores must be finite")
        index = np.clip(np.rint(score * self.bins), 0, self.bins).astype(np.int64)
        self.positive += np.bincount(index[truth], minlength=self.bins + 1)
        self.negative += np.bincount(index[~truth], minlength=self.bins + 1)


def boundary_quality(curve: BoundaryCurve) -> dict[str, float]:
    """Average precision, best F1 (and its threshold) and the positive rate of a :class:`BoundaryCurve`.

    Thresholds run over the occupied score bins from the top; rows in one bin are tied. A
    constant (or random) score has AP equal to the positive rate, the reference every boundary
    figure is read against.

    Returns:
        ``{"ap", "best_f1", "best_threshold", "positive_rate", "rows"}``; NaN AP and F1 without a
        positive row.
    """
    pos = curve.positive[::-1].astype(np.float64)
    neg = curve.negative[::-1].astype(np.float64)
    total_pos, rows = pos.sum(), pos.sum() + neg.sum()
    out = {"positive_rate": float(total_pos / rows) if rows else float("nan"), "rows": int(rows)}
    if total_pos == 0:
        return {"ap": float("nan"), "best_f1": float("nan"), "best_threshold": float("nan"), **out}
    occupied = (pos + neg) > 0
    tp, fp = np.cumsum(pos)[occupied], np.cumsum(neg)[occupied]
    precision = tp / (tp + fp)
    recall = tp / total_pos
    ap = float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    best = int(np.argmax(f1))
    thresholds = (curve.bins - np.flatnonzero(occupied)) / curve.bins
    return {"ap": ap, "best_f1": float(f1[best]), "best_threshold": float(thresholds[best]), **out}


@dataclass(frozen=True)
class InstancePrediction:
    """Predicted instances of one scene."""

    masks: Sequence[np.ndarray]
    """I arrays of point indices, one per instance (instances may overlap)."""
    classes: np.ndarray
    """[I] int class id per instance."""
    scores: np.ndarray
    """[I] float confidence per instance."""

    @classmethod
    def from_instance_ids(
        cls, instance_id: np.ndarray, classes: np.ndarray, scores: np.ndarray
    ) -> InstancePrediction:
        """From a per-point instance id [N] (-1 none; ids index ``classes`` and ``scores``)."""
        instance_id = np.asarray(instance_id).reshape(-1)
        classes = np.asarray(classes).reshape(-1)
        n_inst = classes.shape[0]
        if instance_id.size and instance_id.max() >= n_inst:
            raise ValueError(f"instance id {instance_id.max()} but only {n_inst} classes given")
        order = np.argsort(instance_id, kind="stable")
        sorted_id = instance_id[order]
        bounds = np.searchsorted(sorted_id, np.arange(n_inst + 1))
        masks = [order[bounds[k] : bounds[k + 1]] for k in range(n_inst)]
        return cls(masks=masks, classes=classes, scores=np.asarray(scores, dtype=np.float64).reshape(-1))


@dataclass(frozen=True)
class InstanceGroundTruth:
    """Ground truth of one scene."""

    instance: np.ndarray
    """[N] int instance id per point, negative for points of no instance."""
    semantic: np.ndarray
    """[N] int class id per point (``IGNORE_INDEX`` where unlabelled)."""


def _gt_instances(gt: InstanceGroundTruth, class_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ground-truth instances as ScanNet forms them: one per (instance id, class) pair.

    Returns ``(point_gt [N] int index into the instances or -1, gt_class [G], gt_size [G],
    void [N] bool)``; void points are those that belong to no instance of an evaluated class.
    """
    inst = np.asarray(gt.instance).reshape(-1).astype(np.int64)
    sem = np.asarray(gt.semantic).reshape(-1).astype(np.int64)
    if inst.shape != sem.shape:
        raise ValueError(f"gt instance ({inst.size}) and semantic ({sem.size}) lengths differ")
    valid = (inst >= 0) & np.isin(sem, class_ids)
    point_gt = np.full(inst.shape, -1, dtype=np.int64)
    if valid.any():
        pairs = np.stack([inst[valid], sem[valid]], axis=1)
        uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
        point_gt[valid] = inverse.reshape(-1)
        gt_class = uniq[:, 1]
        gt_size = np.bincount(inverse.reshape(-1), minlength=uniq.shape[0])
    else:
        gt_class = np.zeros(0, dtype=np.int64)
        gt_size = np.zeros(0, dtype=np.int64)
    return point_gt, gt_class, gt_size, ~valid


def _ap_from_matches(y_true: np.ndarray, y_score: np.ndarray, hard_false_negatives: int) -> float:
    """ScanNet's precision-recall integration (``evaluate_matches``), kept step for step."""
    order = np.argsort(y_score, kind="stable")
    y_score_sorted = y_score[order]
    y_true_sorted = y_true[order]
    cumsum = np.cumsum(y_true_sorted)
    _, unique_indices = np.unique(y_score_sorted, return_index=True)
    num_prec_recall = len(unique_indices) + 1
    num_examples = len(y_score_sorted)
    num_true_examples = cumsum[-1] if len(cumsum) > 0 else 0
    precision = np.zeros(num_prec_recall)
    recall = np.zeros(num_prec_recall)
    cumsum = np.append(cumsum, 0)  # cumsum[-1] == 0 serves index -1 below
    idx = unique_indices
    cs = cumsum[idx - 1]
    tp = num_true_examples - cs
    fp = num_examples - idx - tp
    fn = cs + hard_false_negatives
    with np.errstate(invalid="ignore", divide="ignore"):
        precision[:-1] = tp / (tp + fp)
        recall[:-1] = tp / (tp + fn)
    precision[-1] = 1.0
    recall[-1] = 0.0
    recall_for_conv = np.concatenate([[recall[0]], recall, [0.0]])
    step_widths = np.convolve(recall_for_conv, [-0.5, 0, 0.5], "valid")
    return float(np.dot(precision, step_widths))


def instance_ap(
    predictions: Sequence[InstancePrediction],
    ground_truths: Sequence[InstanceGroundTruth],
    *,
    class_ids: Sequence[int],
    class_names: Sequence[str] | None = None,
    min_region_size: int = 100,
    overlaps: Sequence[float] = INSTANCE_OVERLAPS,
) -> dict:
    """ScanNet-style instance segmentation AP (AP over IoU 0.50:0.90, AP50, AP25).

    Follows the benchmark script ``evaluate_semantic_instance.py``:
    ground-truth instances are (instance id, class) pairs with at least ``min_region_size``
    points; predictions with fewer points are dropped. For each class and IoU threshold t, every
    gt instance takes, among the predictions of its class that overlap it (in the order they were
    given, as the script does), the first one not yet used with IoU > t; a further match to an
    already matched gt keeps the higher score as the true positive and counts the lower one as a
    false positive. An unmatched prediction is a false positive unless more than a fraction t of
    its points lie on void points (no instance of an evaluated class) or on too-small gt
    instances. Unmatched gt instances are false negatives. AP integrates the precision-recall curve
    at the unique scores with the script's step widths. AP is NaN for a class with no gt in the
    whole set and 0 for a class with gt but no prediction; means are NaN-skipping.

    Simplifications against the script: no distance-based filters (the script's defaults disable
    them too); gt points of an evaluated class with a negative instance id count as void (the
    script's "group" instances, ids < 1000, behave alike).

    Args:
        predictions: one :class:`InstancePrediction` per scene.
        ground_truths: one :class:`InstanceGroundTruth` per scene, same order.
        class_ids: the class ids evaluated (ScanNet: the 18 instance classes, not wall/floor).
        class_names: names for the per-class dict (default: the ids as strings).
        min_region_size: minimum points of a gt instance / prediction (ScanNet: 100).
        overlaps: IoU thresholds; AP averages all but 0.25.

    Returns:
        ``{"ap", "ap50", "ap25", "per_class": {name: {"ap", "ap50", "ap25"}}}``.
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(f"{len(predictions)} predicted scenes but {len(ground_truths)} ground truths")
    class_ids_arr = np.asarray(class_ids, dtype=np.int64)
    names = [str(c) for c in class_ids] if class_names is None else list(class_names)
    if len(names) != len(class_ids_arr):
        raise ValueError(f"{len(names)} class names for {len(class_ids_arr)} class ids")
    overlaps = tuple(float(o) for o in overlaps)

    # Per scene and class: gt sizes, pred sizes/scores/void counts, and the [P, G] intersections.
    # scene_data[s][c] = (gt_size [G], gt_small [G], pred_size [P], pred_score [P],
    #                     pred_void [P], inter [P, G]) over the gt and predictions of class c
    scene_data: list[dict[int, tuple]] = []
    for s, (pred, gt) in enumerate(zip(predictions, ground_truths)):
        point_gt, gt_class, gt_size, void = _gt_instances(gt, class_ids_arr)
        n_points = point_gt.shape[0]
        pred_classes = np.asarray(pred.classes).reshape(-1).astype(np.int64)
        pred_scores = np.asarray(pred.scores).reshape(-1).astype(np.float64)
        if not (len(pred.masks) == pred_classes.size == pred_scores.size):
            raise ValueError(
                f"scene {s}: {len(pred.masks)} masks, {pred_classes.size} classes, {pred_scores.size} scores"
            )
        per_class: dict[int, tuple] = {}
        for c in class_ids_arr.tolist():
            g_sel = np.flatnonzero(gt_class == c)
            keep_pred = []
            for k in np.flatnonzero(pred_classes == c):
                idx = np.unique(np.asarray(pred.masks[k], dtype=np.int64))
                if idx.size and (idx.min() < 0 or idx.max() >= n_points):
                    raise ValueError(f"scene {s}: instance {k} indexes outside [0, {n_points})")
                if idx.size >= min_region_size:
                    keep_pred.append((k, idx))
            n_g, n_p = g_sel.size, len(keep_pred)
            # map gt instance index -> column within this class
            col = np.full(gt_class.shape[0] + 1, -1, dtype=np.int64)
            col[g_sel] = np.arange(n_g)
            inter = np.zeros((n_p, n_g), dtype=np.int64)
            pred_size = np.zeros(n_p, dtype=np.int64)
            pred_void = np.zeros(n_p, dtype=np.int64)
            for r, (_, idx) in enumerate(keep_pred):
                pred_size[r] = idx.size
                pred_void[r] = int(void[idx].sum())
                cols = col[point_gt[idx]]  # point_gt == -1 -> col[-1] == -1
                cols = cols[cols >= 0]
                inter[r] = np.bincount(cols, minlength=n_g)
            gt_sz = gt_size[g_sel]
            per_class[c] = (
                gt_sz,
                gt_sz < min_region_size,
                pred_size,
                pred_scores[[k for k, _ in keep_pred]] if n_p else np.zeros(0),
                pred_void,
                inter,
            )
        scene_data.append(per_class)

    ap = np.full((len(class_ids_arr), len(overlaps)), np.nan)
    for oi, th in enumerate(overlaps):
        for li, c in enumerate(class_ids_arr.tolist()):
            y_true: list[np.ndarray] = []
            y_score: list[np.ndarray] = []
            hard_fn = 0
            has_gt = has_pred = False
            for per_class in scene_data:
                gt_sz, gt_small, pred_size, pred_score, pred_void, inter = per_class[c]
                big = ~gt_small
                if big.any():
                    has_gt = True
                if pred_size.size:
                    has_pred = True
                union = gt_sz[None, :] + pred_size[:, None] - inter
                with np.errstate(invalid="ignore", divide="ignore"):
                    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
                visited = np.zeros(pred_size.size, dtype=bool)
                tp_scores: list[float] = []
                fp_scores: list[float] = []
                for g in np.flatnonzero(big):  # loop over gt instances, not points
                    matched = False
                    score = -np.inf
                    for p in np.flatnonzero(inter[:, g] > 0):  # the script's matched_pred order
                        if visited[p] or not iou[p, g] > th:
                            continue
                        if matched:
                            # a second match: the lower score is a false positive; as in the
                            # script, that prediction is not marked visited
                            fp_scores.append(min(score, pred_score[p]))
                            score = max(score, pred_score[p])
                        else:
                            matched = True
                            score = pred_score[p]
                            visited[p] = True
                    if matched:
                        tp_scores.append(score)
                    else:
                        hard_fn += 1
                # Unmatched predictions are false positives unless mostly on ignored points. The
                # script tests the overlap against every same-class gt, small ones included.
                above = (iou > th).any(axis=1)
                for p in np.flatnonzero(~above):
                    num_ignore = pred_void[p] + inter[p, gt_small].sum()
                    if num_ignore / pred_size[p] <= th:
                        fp_scores.append(pred_score[p])
                y_true.append(np.concatenate([np.ones(len(tp_scores)), np.zeros(len(fp_scores))]))
                y_score.append(np.asarray(tp_scores + fp_scores, dtype=np.float64))
            if has_gt and has_pred:
                ap[li, oi] = _ap_from_matches(np.concatenate(y_true), np.concatenate(y_score), hard_fn)
            elif has_gt:
                ap[li, oi] = 0.0

    is25 = np.isclose(overlaps, 0.25)
    is50 = np.isclose(overlaps, 0.5)
    rest = ~is25
    cls_ap = np.array([_nanmean(row[rest]) for row in ap])
    cls_ap50 = ap[:, is50][:, 0] if is50.any() else np.full(len(class_ids_arr), np.nan)
    cls_ap25 = ap[:, is25][:, 0] if is25.any() else np.full(len(class_ids_arr), np.nan)
    return {
        "ap": _nanmean(cls_ap),
        "ap50": _nanmean(cls_ap50),
        "ap25": _nanmean(cls_ap25),
        "per_class": {
            name: {"ap": float(a), "ap50": float(a50), "ap25": float(a25)}
            for name, a, a50, a25 in zip(names, cls_ap, cls_ap50, cls_ap25)
        },
    }


# ---------------------------------------------------------------------------------------------
# 3D detection (axis-aligned boxes)


@dataclass(frozen=True)
class Boxes:
    """Axis-aligned 3D boxes of one scene."""

    bounds: np.ndarray
    """[K, 6] float (xmin, ymin, zmin, xmax, ymax, zmax)."""
    classes: np.ndarray
    """[K] int class id."""
    scores: np.ndarray | None = None
    """[K] float confidence (predictions; ignored for ground truth)."""


def box_iou_3d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of axis-aligned boxes.

    Args:
        a: [P, 6] boxes (min xyz, max xyz).
        b: [G, 6] boxes.

    Returns:
        [P, G] IoU in [0, 1] (0 where the union has zero volume).
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 6)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 6)
    lo = np.maximum(a[:, None, :3], b[None, :, :3])
    hi = np.minimum(a[:, None, 3:], b[None, :, 3:])
    inter = np.clip(hi - lo, 0.0, None).prod(axis=2)
    vol_a = np.clip(a[:, 3:] - a[:, :3], 0.0, None).prod(axis=1)
    vol_b = np.clip(b[:, 3:] - b[:, :3], 0.0, None).prod(axis=1)
    union = vol_a[:, None] + vol_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC (2010+) AP: area under the monotone envelope of the precision-recall curve.

    Args:
        recall: [K] recall after each detection, in score order.
        precision: [K] precision after each detection.
    """
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def box_map(
    pred_boxes: Sequence[Boxes],
    gt_boxes: Sequence[Boxes],
    thresholds: Sequence[float] = (0.25, 0.5),
    *,
    class_ids: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
) -> dict:
    """VOC-style 3D detection mAP at each IoU threshold (VoteNet's ``eval_det``).

    Per class, all predicted boxes of the split are sorted by score (descending); each is a true
    positive if its best-IoU gt box of the same class in the same scene has IoU > threshold and
    is not yet taken, else a false positive. AP is :func:`voc_ap` of the cumulative
    precision/recall; NaN for a class with no gt box, 0 for a class with gt but no prediction.

    Args:
        pred_boxes: one :class:`Boxes` per scene (scores required).
        gt_boxes: one :class:`Boxes` per scene, same order.
        thresholds: IoU thresholds.
        class_ids: classes evaluated (default: every class with a gt box).
        class_names: names for the per-class dict (default: ids as strings).

    Returns:
        ``{"map@0.25": float, ..., "per_class": {name: {"ap@0.25": float, ...}}}``.
    """
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError(f"{len(pred_boxes)} predicted scenes but {len(gt_boxes)} ground truths")
    if class_ids is None:
        class_ids = sorted({int(c) for g in gt_boxes for c in np.asarray(g.classes).reshape(-1)})
    names = [str(c) for c in class_ids] if class_names is None else list(class_names)
    if len(names) != len(class_ids):
        raise ValueError(f"{len(names)} class names for {len(class_ids)} class ids")

    # IoU of every prediction with every gt box of its scene, computed once for all thresholds
    ious = []
    for s, (pb, gb) in enumerate(zip(pred_boxes, gt_boxes)):
        if pb.scores is None:
            raise ValueError(f"scene {s}: predicted boxes need scores")
        ious.append(box_iou_3d(pb.bounds, gb.bounds))

    out: dict = {"per_class": {name: {} for name in names}}
    for th in thresholds:
        key = f"ap@{th:g}"
        aps = []
        for name, c in zip(names, class_ids):
            npos = 0
            dets = []  # (score, scene, pred row)
            for s, (pb, gb) in enumerate(zip(pred_boxes, gt_boxes)):
                npos += int((np.asarray(gb.classes) == c).sum())
                rows = np.flatnonzero(np.asarray(pb.classes) == c)
                dets.extend((float(pb.scores[r]), s, int(r)) for r in rows)
            if npos == 0:
                ap = float("nan")
            elif not dets:
                ap = 0.0
            else:
                dets.sort(key=lambda d: -d[0])  # stable: ties keep input order
                taken = [np.zeros(len(g.classes), dtype=bool) for g in gt_boxes]
                tp = np.zeros(len(dets))
                for d, (_, s, r) in enumerate(dets):  # loop over detections, as eval_det
                    same = np.flatnonzero(np.asarray(gt_boxes[s].classes) == c)
                    if same.size == 0:
                        continue
                    row = ious[s][r, same]
                    best = int(np.argmax(row))
                    if row[best] > th and not taken[s][same[best]]:
                        tp[d] = 1.0
                        taken[s][same[best]] = True
                ctp = np.cumsum(tp)
                cfp = np.cumsum(1.0 - tp)
                ap = voc_ap(ctp / npos, ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps))
            out["per_class"][name][key] = ap
            aps.append(ap)
        out[f"map@{th:g}"] = _nanmean(np.asarray(aps))
    return out
