"""The 2D-fusion baseline: the teacher's image-text similarity projected onto points, no 3D training.

What OpenScene calls 2D fusion, with the features this project stores: every over-segment's
CLIP embedding (`clip/segment`, cut from the views where the pixel->point maps show it best) is
compared with the text embedding of each class, and its points take the nearest class. Points of
segments no view showed take the mean embedding of the views whose visible lists hold them (and a
point no view shows, the scene's mean view embedding). Nothing is learnt: the row says what the
2D teacher alone knows, so the distance to the trained rows is what 3D distillation and
fine-tuning add.

Reads: points/semantic, points/instance (only to score), overseg/segment, overseg/adjacency,
views/visible_ptr, views/visible_ids, clip/view, clip/segment, clip/segment_seen, vocab/<name>.
Writes nothing; returns the same result layout as :func:`ws3d_train.evaluate.evaluate`.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import schema
from pipeline.config import ConfigError
from pipeline.schema import IGNORE_INDEX
from pipeline.store import Store
from ws3d_train.instances import boxes_from_instances
from ws3d_train.metrics import Boxes, ConfusionMatrix, InstanceGroundTruth, InstancePrediction, box_map, instance_ap
from ws3d_train.predict import STUFF_CLASSES, predict_instances

__all__ = ["fuse_scene", "evaluate_fusion"]


def fuse_point_embeddings(
    segment: np.ndarray, segment_embed: np.ndarray, segment_seen: np.ndarray,
    visible_ptr: np.ndarray, visible_ids: np.ndarray, view_embed: np.ndarray,
) -> np.ndarray:
    """A unit CLIP embedding per point from the 2D features (pure core).

    Args:
        segment: int [N] segment per point (-1 = none); segment_embed: [S, D]; segment_seen: [S] bool.
        visible_ptr: int [V+1], visible_ids: int [M] (CSR of the points each view shows).
        view_embed: [V, D] view embeddings.
    Returns:
        float32 [N, D] unit embeddings.
    """
    N, D = len(segment), segment_embed.shape[1]
    view_embed = view_embed.astype(np.float32)
    out = np.zeros((N, D), np.float32)
    counts = np.zeros(N, np.float32)
    # the views showing each point (fallback for points of unseen segments)
    view_of = np.repeat(np.arange(len(visible_ptr) - 1), np.diff(visible_ptr))
    np.add.at(out, visible_ids, view_embed[view_of])
    np.add.at(counts, visible_ids, 1.0)
    scene_mean = view_embed.mean(axis=0) if len(view_embed) else np.zeros(D, np.float32)
    out[counts == 0] = scene_mean
    seen = (segment >= 0) & segment_seen[np.clip(segment, 0, None)].astype(bool)
    out[seen] = segment_embed[segment[seen]].astype(np.float32)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norm, 1e-8)


def fuse_scene(store: Store, scene_id: str, text: np.ndarray, candidates: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class [N], score [N] (softmax at CLIP's 100x logit scale), embedding [N, D]) of one scene."""
    missing = [spec.name for spec in (schema.CLIP_SEGMENT, schema.CLIP_VIEW, schema.VISIBLE_PTR, schema.SEGMENT)
               if not store.has(scene_id, spec)]
    if missing:
        raise ConfigError(f"{store.path}: scene {scene_id} lacks {missing}; run overseg, render and embed first")
    embed = fuse_point_embeddings(
        store.read(scene_id, schema.SEGMENT).astype(np.int64), store.read(scene_id, schema.CLIP_SEGMENT),
        store.read(scene_id, schema.CLIP_SEGMENT_SEEN).astype(bool), store.read(scene_id, schema.VISIBLE_PTR),
        store.read(scene_id, schema.VISIBLE_IDS).astype(np.int64), store.read(scene_id, schema.CLIP_VIEW),
    )
    keep = np.asarray(sorted(candidates), np.int64)
    logits = 100.0 * embed @ text[keep].astype(np.float32).T
    logits -= logits.max(axis=1, keepdims=True)
    prob = np.exp(logits)
    prob /= prob.sum(axis=1, keepdims=True)
    local = prob.argmax(axis=1)
    return keep[local], prob[np.arange(len(local)), local], embed


def evaluate_fusion(
    store_path: str | Path,
    scene_ids: Sequence[str],
    *,
    ov_split: str | None,
    vocab: str = "classes",
    sim_threshold: float = 0.9,
    min_region_size: int = 100,
) -> dict[str, Any]:
    """The 2D-fusion baseline on scenes of a store, scored like a run (same metrics, same layout).

    Returns:
        the keys of :func:`ws3d_train.evaluate.evaluate` (``semantic`` is NaN: there is no
        semantic head) with ``"run": "2d-fusion"``.
    """
    from ws3d_train.evaluate import _group_metrics, _gt_boxes
    from ws3d_train.run import resolve_ov_split

    t0 = time.time()
    store = Store.open(store_path)
    names = store.class_names
    C = len(names)
    try:
        text, attrs = store.read_vocab(vocab)
    except KeyError as exc:
        raise ConfigError(str(exc)) from exc
    vocab_names = list(attrs.get("names") or names)
    text = text[[vocab_names.index(n) for n in names]]
    split = resolve_ov_split(ov_split, names, store.dataset)
    base = list(split.base) if split is not None else list(range(C))
    novel = list(split.novel) if split is not None else []
    ignored = np.asarray(list(split.ignored) if split is not None else [], np.int64)
    instance_ids = np.array([c for c in range(C) if names[c] not in STUFF_CLASSES and c not in set(ignored.tolist())], np.int64)
    cm = ConfusionMatrix(C)
    inst_pred, inst_gt, box_pred, box_gt = [], [], [], []
    points = 0
    for scene_id in scene_ids:
        gt = store.read(scene_id, schema.SEMANTIC).astype(np.int64)
        if ignored.size:
            gt[np.isin(gt, ignored)] = IGNORE_INDEX
        pred, score, embed = fuse_scene(store, scene_id, text, base + novel)
        cm.update(pred, gt)
        points += len(gt)
        gt_instance = store.read(scene_id, schema.INSTANCE).astype(np.int64)
        xyz = store.read(scene_id, schema.XYZ)
        instance, inst_class, inst_score = predict_instances(
            store.read(scene_id, schema.SEGMENT), store.read(scene_id, schema.ADJACENCY), pred, embed,
            score.astype(np.float64), names, sim_threshold=sim_threshold, min_points=min_region_size,
            ignore_classes=list(STUFF_CLASSES),
        )
        inst_pred.append(InstancePrediction.from_instance_ids(instance, inst_class, inst_score))
        inst_gt.append(InstanceGroundTruth(instance=gt_instance, semantic=gt))
        bounds, classes, scores = boxes_from_instances(xyz, instance, inst_class, inst_score)
        box_pred.append(Boxes(bounds, classes, scores))
        box_gt.append(_gt_boxes(xyz, gt_instance, gt, instance_ids))
    combined = _group_metrics(cm.matrix, names, base, novel)
    instance_names = [names[c] for c in instance_ids]
    nan_sem = {"head": "none", "miou": float("nan")}
    return {
        "run": "2d-fusion", "step": 0, "store": str(store_path), "scenes": len(scene_ids), "points": points,
        "classes": names,
        "split": {"base": [names[c] for c in base], "novel": [names[c] for c in novel],
                  "ignored": [names[c] for c in ignored.tolist()]},
        "semantic": nan_sem,
        "open_vocab": {"vocab": vocab, "combine": "2d-fusion", "novel_bias": 0.0, "clip": combined, "combined": combined},
        "instance": {"min_region_size": min_region_size, "sim_threshold": sim_threshold,
                     **instance_ap(inst_pred, inst_gt, class_ids=instance_ids, class_names=instance_names,
                                   min_region_size=min_region_size)},
        "box": box_map(box_pred, box_gt, (0.25, 0.5), class_ids=instance_ids.tolist(), class_names=instance_names),
        "seconds": round(time.time() - t0, 3),
    }
