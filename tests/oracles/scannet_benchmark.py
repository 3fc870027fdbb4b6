"""The ScanNet benchmark's evaluation, written from its published description (ScanNet v2
benchmark, "evaluate_semantic_label" and "evaluate_semantic_instance"), as the tests' oracle for
`ws3d predict --format scannet|scannet-instance` exports and for `ws3d_train.infer.metrics`.

Semantic IoU per class over the NYU40 ids of the 20 benchmark classes, ground truth of other ids
(0 = unannotated) ignored, a prediction of a non-benchmark id counted as wrong; instance AP per
class over the 18 benchmark classes without wall and floor, averaged over overlaps 0.50:0.90 in
steps of 0.05 (``np.arange(0.5, 0.95, 0.05)``, the benchmark's "AP"), plus AP at 0.50 and 0.25,
ground-truth and predicted regions smaller than ``min_region_size`` = 100 vertices left out. Ground
truth instances are encoded as the benchmark does: ``nyu40 id * 1000 + instance + 1`` per vertex,
``0`` (or an id < 1000) for none. It agreed with the official scripts to 1e-16 when checked.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ws3d_train.infer.export import BENCHMARK_NYU40_IDS, INSTANCE_NYU40_IDS, MIN_REGION_SIZE


def gt_instance_ids(semantic_nyu40: np.ndarray, instance: np.ndarray) -> np.ndarray:
    """[N] int64 benchmark ground-truth encoding: ``nyu40 * 1000 + instance + 1``, 0 for none."""
    semantic_nyu40 = np.asarray(semantic_nyu40, np.int64)
    instance = np.asarray(instance, np.int64)
    return np.where((instance >= 0) & (semantic_nyu40 > 0), semantic_nyu40 * 1000 + instance + 1, 0)


def evaluate_semantic_export(pred: Sequence[np.ndarray], gt: Sequence[np.ndarray]) -> dict[str, object]:
    """Per-class IoU over the 20 benchmark NYU40 ids, summed over scenes.

    ``pred`` and ``gt``: per scene, [N] NYU40 ids per vertex. Ground truth outside the 20 ids
    (0 = unannotated) is ignored; a prediction outside them is a miss (a false negative of the
    true class, a false positive of no class).

    Returns:
        ``{"iou": {nyu40 id: IoU or NaN}, "miou": mean over classes present in gt or pred}``.
    """
    valid = np.asarray(BENCHMARK_NYU40_IDS)
    size = 41
    confusion = np.zeros((size, size), np.int64)
    for p, g in zip(pred, gt):
        p, g = np.asarray(p, np.int64).reshape(-1), np.asarray(g, np.int64).reshape(-1)
        if p.shape != g.shape:
            raise ValueError(f"prediction has {p.shape[0]} vertices, ground truth {g.shape[0]}")
        keep = np.isin(g, valid)
        p = np.where((p >= 0) & (p < size), p, 0)
        np.add.at(confusion, (g[keep], p[keep]), 1)
    iou = {}
    for label in valid:
        tp = confusion[label, label]
        fn = confusion[label, :].sum() - tp
        others = [c for c in valid if c != label]
        fp = confusion[others, label].sum()
        denom = tp + fp + fn
        iou[int(label)] = float(tp / denom) if denom > 0 else float("nan")
    values = [v for v in iou.values() if np.isfinite(v)]
    return {"iou": iou, "miou": float(np.mean(values)) if values else float("nan")}


@dataclass(frozen=True)
class _PredInstance:
    scene: int
    mask: np.ndarray  # [N] bool
    label: int
    confidence: float


def read_instance_export(out_dir: str | Path, scene_id: str, num_vertices: int) -> list[tuple[np.ndarray, int, float]]:
    """(mask [N] bool, NYU40 id, confidence) of every instance line of ``DIR/<scene_id>.txt``."""
    out_dir = Path(out_dir)
    found = []
    for lineno, line in enumerate((out_dir / f"{scene_id}.txt").read_text().splitlines(), 1):
        if not line.strip():
            continue
        rel, label, conf = line.split()
        mask = np.loadtxt(out_dir / rel, dtype=np.int64, ndmin=1)
        if mask.shape[0] != num_vertices:
            raise ValueError(f"{out_dir / rel}: {mask.shape[0]} lines for {num_vertices} vertices")
        found.append((mask != 0, int(label), float(conf)))
    return found


def _average_precision(y_true: np.ndarray, y_score: np.ndarray, hard_fn: int) -> float:
    """AP from the benchmark's precision/recall curve (step integration over unique scores)."""
    if y_true.size == 0:
        return 0.0
    order = np.argsort(y_score, kind="stable")
    y_score, y_true = y_score[order], y_true[order]
    cumsum = np.cumsum(y_true)
    _, unique = np.unique(y_score, return_index=True)
    num = len(unique) + 1
    total, n = cumsum[-1], len(y_score)
    precision, recall = np.zeros(num), np.zeros(num)
    cumsum = np.append(cumsum, 0)
    for i, idx in enumerate(unique):
        below = cumsum[idx - 1]  # true examples scored below this threshold (index -1 -> appended 0)
        tp = total - below
        fp = n - idx - tp
        fn = below + hard_fn
        precision[i] = tp / (tp + fp) if tp + fp > 0 else 0.0
        recall[i] = tp / (tp + fn) if tp + fn > 0 else 0.0
    precision[-1], recall[-1] = 1.0, 0.0
    padded = np.concatenate([[recall[0]], recall, [0.0]])
    widths = np.convolve(padded, [-0.5, 0, 0.5], "valid")
    return float(np.dot(precision, widths))


def evaluate_instance_export(
    predictions: Sequence[Sequence[tuple[np.ndarray, int, float]]],
    gt_ids: Sequence[np.ndarray],
    *,
    min_region_size: int = MIN_REGION_SIZE,
) -> dict[str, object]:
    """ScanNet instance AP of exported predictions against benchmark-encoded ground truth.

    Args:
        predictions: per scene, its (mask, NYU40 id, confidence) instances.
        gt_ids: per scene, [N] ``nyu40 * 1000 + k`` per vertex (:func:`gt_instance_ids`).
        min_region_size: smaller ground-truth and predicted regions are left out.

    Returns:
        ``{"ap", "ap50", "ap25", "per_class": {nyu40 id: {"ap", "ap50", "ap25"}}}``; AP is the mean
        over overlaps 0.50..0.90 (step 0.05), classes without ground truth or prediction are NaN
        and left out of the means.
    """
    overlaps = np.append(np.arange(0.5, 0.95, 0.05), 0.25)
    labels = INSTANCE_NYU40_IDS
    # per scene: gt instances (label, mask), the void mask (vertices of no benchmark class)
    gts, preds = [], []
    for s, (ids, scene_preds) in enumerate(zip(gt_ids, predictions)):
        ids = np.asarray(ids, np.int64)
        sem = ids // 1000
        void = ~np.isin(sem, labels)
        scene_gt = []
        for value in np.unique(ids[ids >= 1000]):
            label = int(value // 1000)
            mask = ids == value
            if label in labels:
                scene_gt.append((label, mask, int(mask.sum())))
        gts.append((scene_gt, void))
        for mask, label, conf in scene_preds:
            mask = np.asarray(mask, bool)
            if label in labels and int(mask.sum()) >= min_region_size:
                preds.append(_PredInstance(s, mask, int(label), float(conf)))
    ap = np.full((len(labels), len(overlaps)), np.nan)
    for li, label in enumerate(labels):
        class_gt = [(s, m, n) for s, (scene_gt, _) in enumerate(gts) for (lab, m, n) in scene_gt if lab == label]
        class_pred = [p for p in preds if p.label == label]
        has_gt = any(n >= min_region_size for _, _, n in class_gt)
        if not has_gt:
            continue  # the benchmark leaves a class without ground truth out (NaN)
        if not class_pred:
            ap[li, :] = 0.0
            continue
        for oi, threshold in enumerate(overlaps):
            y_true, y_score = [], []
            visited = set()
            hard_fn = 0
            for s, gmask, gcount in class_gt:
                if gcount < min_region_size:
                    continue  # too small to count (predictions on it are ignored below)
                matched_score = None
                # in the order the predictions were listed, as the benchmark's script does
                for p in (p for p in class_pred if p.scene == s):
                    key = id(p)
                    if key in visited:
                        continue
                    inter = int((p.mask & gmask).sum())
                    iou = inter / (gcount + int(p.mask.sum()) - inter)
                    if iou > threshold:
                        if matched_score is None:
                            matched_score = p.confidence
                            visited.add(key)
                        else:  # a second match of this gt: the lower-scored one is a false positive
                            y_true.append(0)
                            y_score.append(min(matched_score, p.confidence))
                            matched_score = max(matched_score, p.confidence)
                if matched_score is None:
                    hard_fn += 1
                else:
                    y_true.append(1)
                    y_score.append(matched_score)
            for p in class_pred:
                if id(p) in visited:
                    continue
                scene_gt, void = gts[p.scene]
                pcount = int(p.mask.sum())
                matches = False
                ignore = int((p.mask & void).sum())
                for lab, gmask, gcount in scene_gt:
                    if lab != label:
                        continue
                    inter = int((p.mask & gmask).sum())
                    if inter and inter / (gcount + pcount - inter) > threshold:
                        matches = True
                        break
                    if gcount < min_region_size:
                        ignore += inter
                if matches:
                    continue  # overlaps a gt matched by a better prediction: counted above
                if ignore / pcount <= threshold:
                    y_true.append(0)
                    y_score.append(p.confidence)
            ap[li, oi] = _average_precision(np.asarray(y_true, float), np.asarray(y_score, float), hard_fn)

    def mean(values: np.ndarray) -> float:
        finite = values[np.isfinite(values)]
        return float(finite.mean()) if finite.size else float("nan")

    i50 = int(np.argmin(np.abs(overlaps - 0.5)))
    i25 = len(overlaps) - 1
    per_class = {
        int(label): {"ap": mean(ap[li, :i25]), "ap50": float(ap[li, i50]), "ap25": float(ap[li, i25])}
        for li, label in enumerate(labels) if np.isfinite(ap[li]).any()
    }
    return {
        "ap": mean(np.array([mean(ap[li, :i25]) for li in range(len(labels))])),
        "ap50": mean(ap[:, i50]),
        "ap25": mean(ap[:, i25]),
        "per_class": per_class,
        "min_region_size": min_region_size,
    }
