"""Evaluation of a run on scenes of a store: semantic, open-vocabulary, instance and box metrics.

Reads a run (checkpoint), the store (points and labels, ``overseg/segment`` and
``overseg/adjacency``, a vocabulary's text embeddings) through :mod:`ws3d_train.infer.predict`. Writes
nothing itself; :func:`write_json` writes the result dict where the caller asks, and
:func:`format_table` renders it for the terminal.

Every scene is predicted whole at full resolution (no crop, no augmentation; each point takes
its voxel's outputs) and compared with the labels of every point of the store:

- ``semantic``: the semantic head alone (argmax over the supervised classes); mIoU, per-class IoU,
  overall and mean class accuracy from one confusion matrix accumulated over all points;
- ``open_vocab``: the CLIP head alone (cosine to the text embedding of each class) and the
  combined prediction (``combine``, see :mod:`ws3d_train.infer.predict`: by default the CLIP head decides
  base vs novel mass and the semantic head splits the base mass); with an open-vocabulary split,
  base, novel and harmonic-mean IoU of each, else their mIoU;
- ``instance``: adjacent over-segments with the same combined class and similar decoder features
  merged into instances; ScanNet AP (0.50:0.90), AP50, AP25 over the non-stuff classes, with the
  benchmark's ``min_region_size`` (100 points; pass less for small synthetic scenes);
- ``box``: axis-aligned boxes of those instances against boxes of the ground-truth instances;
  VOC mAP at IoU 0.25 and 0.5;
- ``boundary``: per voxel (the run's voxel size), the boundary network's probability (``head``),
  its region-level aggregation (``region``, :mod:`ws3d_train.infer.boundary`) and the baselines
  (``overseg_flag``: the over-segmentation's border flag; ``overseg_interface``: the voxels on an
  interface between two over-segments, the geometric part of ``region``; ``random``: a constant
  score, whose AP is the share of boundary voxels) against true semantic boundaries (a labelled voxel with a labelled
  6-neighbour of another class, from every label of the store, novel classes included): average
  precision, best F1 and its threshold, and each score's AP over the flag's.

Classes ignored by the open-vocabulary split are ignored in the ground truth too.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import schema
from pipeline.config import ConfigError
from pipeline.errors import UserError
from pipeline.progress import progress_bar
from pipeline.schema import IGNORE_INDEX
from pipeline.store import Store
from ws3d_train.infer.boundary import BOUNDARY_SCORES, voxel_boundaries
from ws3d_train.infer.instances import boxes_from_instances
from ws3d_train.infer.metrics import (
    BoundaryCurve,
    Boxes,
    ConfusionMatrix,
    InstanceGroundTruth,
    InstancePrediction,
    boundary_quality,
    box_map,
    instance_ap,
    open_vocab_metrics,
    semantic_metrics,
)
from ws3d_train.infer.fusion import fuse_scene
from ws3d_train.data.dataset import DataError
from ws3d_train.infer.predict import (
    STUFF_CLASSES,
    CombineMode,
    infer_scene,
    point_heads,
    predict_classes,
    predict_instances,
    run_combine,
)
from ws3d_train.run import gt_to_run_classes, load_run, resolve_classes, resolve_ov_split

__all__ = ["evaluate", "evaluate_fusion", "format_table", "json_safe", "write_json"]


def _gt_boxes(xyz: np.ndarray, instance: np.ndarray, semantic: np.ndarray, class_ids: np.ndarray) -> Boxes:
    """Boxes of the ground-truth instances ((instance id, class) pairs) of the evaluated classes."""
    valid = (instance >= 0) & np.isin(semantic, class_ids)
    if not valid.any():
        return Boxes(np.zeros((0, 6)), np.zeros(0, np.int64))
    pairs = np.stack([instance[valid], semantic[valid]], axis=1)
    uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
    ids = np.full(instance.shape[0], -1, np.int64)
    ids[valid] = inverse.reshape(-1)
    bounds, classes, _ = boxes_from_instances(xyz, ids, uniq[:, 1], np.ones(uniq.shape[0]))
    return Boxes(bounds, classes)


def _group_metrics(conf: np.ndarray, names: Sequence[str], base: Sequence[int], novel: Sequence[int]) -> dict[str, Any]:
    sem = semantic_metrics(conf, names)
    out: dict[str, Any] = {"miou": sem["miou"], "oa": sem["oa"], "iou": sem["iou"]}
    if novel:
        ov = open_vocab_metrics(conf, base, novel)
        out.update(base_miou=ov["base_miou"], novel_miou=ov["novel_miou"], hiou=ov["hiou"])
    return out


def evaluate(
    run: str | Path,
    store_path: str | Path,
    scene_ids: Sequence[str] | None = None,
    *,
    vocab: str | None = None,
    ov_split: str | None = None,
    combine: CombineMode | None = None,
    novel_bias: float = 0.0,
    sim_threshold: float = 0.9,
    min_region_size: int = 100,
    instance_ignore: Sequence[str] | None = None,
    ensemble_2d: bool = False,
    gt_ignore: Sequence[int] = (),
    vs_fusion: bool = False,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate a run on scenes of a store.

    Args:
        run: a run directory (latest checkpoint) or a checkpoint file.
        store_path: the store.
        scene_ids: scenes to evaluate (None: every scene of the store); see
            :func:`ws3d_train.run.resolve_scene_ids` for split names.
        vocab: None: the run's own text embeddings (else the store's ``classes``); a name: that
            store vocabulary.
        ov_split: None: the run's own split; "none": no split; else a manifest name (``b15n4``)
            or ``novel=name,...``.
        combine: ``calibrated``, ``clip`` or ``semantic``: the final prediction that instances
            and boxes are built from; None (default): the run's rule
            (:func:`ws3d_train.infer.predict.run_combine`).
        novel_bias: calibrated-stacking margin added to novel log-scores.
        sim_threshold: cosine threshold for merging segments into instances.
        min_region_size: smallest ground-truth / predicted instance in points (ScanNet: 100).
        instance_ignore: class names without instances (default: wall/floor-like, see
            :data:`ws3d_train.infer.predict.STUFF_CLASSES`).
        ensemble_2d: the CLIP head per point is the 3D feature or the scene's fused 2D feature,
            whichever is more confident (OpenScene's 2D-3D ensemble; needs the embed stage's
            ``clip/segment`` of the scenes); ``open_vocab.share_2d`` says how often 2D won.
        gt_ignore: class ids whose ground truth is treated as unlabelled (the predictions are
            unchanged): model selection on dev rooms hides the novel classes' labels this way.
        vs_fusion: also score the final prediction against the 2D fusion's class of every point
            (:func:`ws3d_train.infer.fusion.fuse_scene`: CLIP on the scene's own images, no 3D
            label), key ``vs_2d_fusion``: on dev rooms, where the novel classes' labels stay
            hidden, its novel mIoU says how much of the open vocabulary fine-tuning kept.
        device: ``auto``, ``cpu``, ``cuda`` ...
        progress: show a progress bar over scenes.

    Returns:
        ``{"run", "step", "store", "scenes", "points", "classes", "split", "semantic",
        "open_vocab", "instance", "box", "seconds"}`` with NaN where a metric is undefined
        (:func:`write_json` writes them as null).
    """
    t0 = time.time()
    loaded = load_run(run, device=device)
    store = Store.open(store_path)
    scene_ids = list(scene_ids) if scene_ids is not None else store.scene_ids()
    if not scene_ids:
        raise ValueError(f"{store_path}: no scene to evaluate")
    setup = resolve_classes(loaded, store, vocab=vocab, ov_split=ov_split)
    combine = combine or run_combine(loaded)
    names = list(setup.class_names)
    # a store of another class list: its labels scored in the run's label space, by class name
    gt_lut = gt_to_run_classes(store.class_names, names)
    no_overseg = [s for s in scene_ids if not store.has(s, schema.SEGMENT)]
    if no_overseg:
        raise DataError(f"{store_path}: {len(no_overseg)} scene(s) have no overseg/segment (e.g. {no_overseg[:3]}); "
                        "run `ws3d overseg` first (instances are built from over-segments)")
    num_classes = len(names)
    ignored = np.asarray(sorted(set(setup.ignored_ids) | {int(c) for c in gt_ignore}), np.int64)
    stuff = STUFF_CLASSES if instance_ignore is None else frozenset(instance_ignore)
    instance_ids = np.array(
        [c for c in range(num_classes) if names[c] not in stuff and c not in set(setup.ignored_ids)], np.int64
    )

    cm_semantic = ConfusionMatrix(num_classes)
    cm_clip = ConfusionMatrix(num_classes)
    cm_combined = ConfusionMatrix(num_classes)
    cm_vs_fusion = ConfusionMatrix(num_classes)
    fusion_text = _fusion_text(store, names) if vs_fusion else None
    candidates = list(setup.base_ids) + list(setup.novel_ids)
    inst_pred: list[InstancePrediction] = []
    inst_gt: list[InstanceGroundTruth] = []
    box_pred: list[Boxes] = []
    box_gt: list[Boxes] = []
    curves = {name: BoundaryCurve() for name in BOUNDARY_SCORES}
    total_points = 0
    points_2d = 0.0
    unlabelled: list[str] = []
    for scene_id in progress_bar(scene_ids, desc="eval", unit="scene", enabled=progress):
        gt = store.read(scene_id, schema.SEMANTIC).astype(np.int64)
        if gt_lut is not None:
            gt = np.where(gt == IGNORE_INDEX, IGNORE_INDEX, gt_lut[np.clip(gt, 0, len(gt_lut) - 1)])
        if not (gt != IGNORE_INDEX).any():  # an unlabelled scan (e.g. a test scene): nothing to score
            unlabelled.append(scene_id)
            continue
        outputs = infer_scene(loaded, store, scene_id)
        if ignored.size:
            gt[np.isin(gt, ignored)] = IGNORE_INDEX
        gt_instance = store.read(scene_id, schema.INSTANCE).astype(np.int64)
        total_points += gt.shape[0]

        semantic, clip, share_2d = point_heads(outputs, setup, store, ensemble_2d)
        points_2d += share_2d * gt.shape[0]
        sem_cls, _ = predict_classes(semantic, clip, setup, mode="semantic")
        clip_cls, _ = predict_classes(semantic, clip, setup, mode="clip", novel_bias=novel_bias)
        comb_cls, comb_score = predict_classes(semantic, clip, setup, mode=combine, novel_bias=novel_bias)
        cm_semantic.update(sem_cls.cpu().numpy(), gt)
        cm_clip.update(clip_cls.cpu().numpy(), gt)
        pred = comb_cls.cpu().numpy()
        score = comb_score.cpu().numpy().astype(np.float64)
        cm_combined.update(pred, gt)
        if fusion_text is not None:
            fused, _, _ = fuse_scene(store, scene_id, fusion_text, candidates)
            cm_vs_fusion.update(pred, fused)

        segment = store.read(scene_id, schema.SEGMENT)
        voxels = voxel_boundaries(outputs.coords, outputs.boundary, outputs.point_to_voxel.cpu().numpy(), segment,
                                  store.read(scene_id, schema.BOUNDARY), gt)
        for name, curve in curves.items():
            curve.update(voxels.scores[name][voxels.labelled], voxels.truth[voxels.labelled])
        instance, inst_class, inst_score = predict_instances(
            segment, store.read(scene_id, schema.ADJACENCY), pred,
            outputs.to_points(outputs.feats).cpu().numpy(), score, names, sim_threshold=sim_threshold, min_points=min_region_size,
            ignore_classes=list(stuff),
        )
        inst_pred.append(InstancePrediction.from_instance_ids(instance, inst_class, inst_score))
        inst_gt.append(InstanceGroundTruth(instance=gt_instance, semantic=gt))
        bounds, classes, scores = boxes_from_instances(outputs.xyz, instance, inst_class, inst_score)
        box_pred.append(Boxes(bounds, classes, scores))
        box_gt.append(_gt_boxes(outputs.xyz, gt_instance, gt, instance_ids))

    if len(unlabelled) == len(scene_ids):
        raise UserError(f"{store_path}: the {len(scene_ids)} scene(s) to evaluate are unlabelled (e.g. {unlabelled[0]}); "
                        "use `ws3d predict --format scannet` to export predictions instead")
    base, novel = list(setup.base_ids), list(setup.novel_ids)
    instance_names = [names[c] for c in instance_ids]
    return {
        "run": str(loaded.checkpoint),
        "step": loaded.step,
        "store": str(store_path),
        "scenes": len(scene_ids) - len(unlabelled),
        "unlabelled_scenes": unlabelled,
        "points": total_points,
        "classes": names,
        "label_space": "store" if gt_lut is None else "run (store labels mapped by class name)",
        "split": {
            "base": [names[c] for c in base],
            "novel": [names[c] for c in novel],
            "ignored": [names[c] for c in setup.ignored_ids],
        },
        "semantic": {"head": "semantic", **semantic_metrics(cm_semantic.matrix, names)},
        "open_vocab": {
            "vocab": vocab,
            "combine": combine,
            "novel_bias": novel_bias,
            "ensemble_2d": ensemble_2d,
            "share_2d": points_2d / max(total_points, 1),
            "clip": _group_metrics(cm_clip.matrix, names, base, novel),
            "combined": _group_metrics(cm_combined.matrix, names, base, novel),
        },
        **({"vs_2d_fusion": {"reference": "2d fusion class of every point (no 3D label)",
                              **_group_metrics(cm_vs_fusion.matrix, names, base, novel)}} if vs_fusion else {}),
        "instance": {
            "min_region_size": min_region_size,
            "sim_threshold": sim_threshold,
            **instance_ap(inst_pred, inst_gt, class_ids=instance_ids, class_names=instance_names, min_region_size=min_region_size),
        },
        "box": box_map(box_pred, box_gt, (0.25, 0.5), class_ids=instance_ids.tolist(), class_names=instance_names),
        "boundary": boundary_summary(curves, voxel_size_m=loaded.data.voxel_size_m),
        "seconds": round(time.time() - t0, 3),
    }


def boundary_summary(curves: dict[str, BoundaryCurve], *, voxel_size_m: float | None) -> dict[str, Any]:
    """The ``boundary`` record of an evaluation: each score's quality, the random baseline (AP =
    the share of boundary voxels) and each score's AP over the over-segmentation flag's."""
    out: dict[str, Any] = {
        "truth": "labelled voxel with a labelled 6-neighbour of another class",
        "voxel_size_m": voxel_size_m,
        **{name: boundary_quality(curve) for name, curve in curves.items()},
    }
    rate = out["head"]["positive_rate"]
    out["random"] = {"ap": rate, "best_f1": 2 * rate / (1 + rate) if rate == rate else float("nan")}
    flag_ap = out["overseg_flag"]["ap"]
    for name in curves:
        out[f"{name}_ap_over_flag"] = out[name]["ap"] / flag_ap if flag_ap and flag_ap == flag_ap else float("nan")
    return out


def _fusion_text(store: Store, names: Sequence[str], vocab: str = "classes") -> np.ndarray:
    """The store vocabulary's text embeddings, one row per name of `names` (in that order).

    Raises:
        ConfigError when the store has no such vocabulary or it lacks one of the names.
    """
    try:
        text, attrs = store.read_vocab(vocab)
    except KeyError as exc:
        raise ConfigError(str(exc)) from exc
    vocab_names = list(attrs.get("names") or store.class_names)
    missing = [n for n in names if n not in vocab_names]
    if missing:
        raise ConfigError(f"{store.path}: vocabulary {vocab!r} lacks {missing[:3]}")
    return text[[vocab_names.index(n) for n in names]]


def evaluate_fusion(
    store_path: str | Path,
    scene_ids: Sequence[str],
    *,
    ov_split: str | None,
    vocab: str = "classes",
    sim_threshold: float = 0.9,
    min_region_size: int = 100,
) -> dict[str, Any]:
    """The 2D-fusion baseline on scenes of a store (:mod:`ws3d_train.infer.fusion`: the teacher's
    segment embeddings against the class texts, no 3D training), scored like a run.

    Returns:
        the keys of :func:`ws3d_train.infer.evaluate.evaluate` (``semantic`` is NaN: there is no
        semantic head) with ``"run": "2d-fusion"``.
    """
    t0 = time.time()
    store = Store.open(store_path)
    names = store.class_names
    C = len(names)
    text = _fusion_text(store, names, vocab)
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


# ---------------------------------------------------------------------------------------------
# output


def json_safe(value: Any) -> Any:
    """A copy with NaN/inf floats replaced by None and numpy scalars/arrays made plain."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(results: dict[str, Any], path: str | Path) -> Path:
    """Write results as JSON (NaN -> null, strict JSON); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(results), indent=2, allow_nan=False) + "\n")
    return path


def _pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{100.0 * float(value):.1f}"


def format_table(results: dict[str, Any], *, per_class: bool = True) -> str:
    """The results of :func:`evaluate` as a terminal table (percentages; '-' where undefined)."""
    sem, ov, inst, box = results["semantic"], results["open_vocab"], results["instance"], results["box"]
    has_split = bool(results["split"]["novel"])
    lines = [
        f"run {results['run']} (step {results['step']}) on {results['scenes']} scene(s), {results['points']} points",
        "",
        f"{'semantic (semantic head)':<30} mIoU {_pct(sem['miou']):>5}   OA {_pct(sem['oa']):>5}   mAcc {_pct(sem['macc']):>5}",
    ]
    for key, label in (("clip", "open-vocab (CLIP head)"), ("combined", f"open-vocab ({ov['combine']})")):
        group = ov[key]
        row = f"{label:<30} mIoU {_pct(group['miou']):>5}"
        if has_split:
            row += f"   base {_pct(group['base_miou']):>5}   novel {_pct(group['novel_miou']):>5}   hIoU {_pct(group['hiou']):>5}"
        lines.append(row)
    vs = results.get("vs_2d_fusion")
    if vs:  # agreement with the 2D fusion, not accuracy: the reference holds no 3D label
        row = f"{'agreement with 2D fusion':<30} mIoU {_pct(vs['miou']):>5}"
        if has_split:
            row += f"   base {_pct(vs['base_miou']):>5}   novel {_pct(vs['novel_miou']):>5}"
        lines.append(row)
    size = f" (>= {inst['min_region_size']} pts)" if inst.get("min_region_size") is not None else ""
    lines.append(f"{'instances' + size:<30} AP {_pct(inst['ap']):>5}   AP50 {_pct(inst['ap50']):>5}   AP25 {_pct(inst['ap25']):>5}")
    lines.append(f"{'boxes' + size:<30} mAP@25 {_pct(box['map@0.25']):>5}   mAP@50 {_pct(box['map@0.5']):>5}")
    bd = results.get("boundary")
    if bd:
        lines.append(f"{'boundaries (AP / best F1)':<30} head {_pct(bd['head']['ap']):>5} / {_pct(bd['head']['best_f1']):>5}   "
                     f"region {_pct(bd['region']['ap']):>5} / {_pct(bd['region']['best_f1']):>5}   "
                     f"over-seg flag {_pct(bd['overseg_flag']['ap']):>5} / {_pct(bd['overseg_flag']['best_f1']):>5}   "
                     f"interface {_pct(bd['overseg_interface']['ap']):>5} / {_pct(bd['overseg_interface']['best_f1']):>5}   "
                     f"random {_pct(bd['random']['ap']):>5}")
    if per_class:
        novel = set(results["split"]["novel"])
        lines += ["", f"{'class':<20} {'IoU sem':>8} {'IoU ov':>8} {'AP50':>6} {'box@25':>7}"]
        for name in results["classes"]:
            tag = f"{name}{' *' if name in novel else ''}"
            ap50 = inst["per_class"].get(name, {}).get("ap50")
            b25 = box["per_class"].get(name, {}).get("ap@0.25")
            lines.append(
                f"{tag:<20} {_pct(sem['iou'][name]):>8} {_pct(ov['combined']['iou'][name]):>8} {_pct(ap50):>6} {_pct(b25):>7}"
            )
        if novel:
            lines.append("* novel class (no label during fine-tuning)")
    return "\n".join(lines)
