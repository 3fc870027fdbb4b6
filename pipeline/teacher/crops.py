"""The teacher's training crops: captioned crops of the objects and segments of a corpus store's
rendered views (class by majority with a purity bound, colour by majority), and the scene split
that holds whole rooms out.

Reads (corpus store only): views/rgb, views/point_index (render), points/semantic,
points/instance, points/rgb (ingest), overseg/segment (overseg, when `sources` has "segment").
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from pipeline import schema
from pipeline.clip.crops import extract_crops, segment_crops
from pipeline.clip.defaults import OPENAI_CLIP_MEAN
from pipeline.errors import SceneError
from pipeline.store import Store
from pipeline.teacher.captions import colour_index, unit_colours
from pipeline.teacher.config import TeacherConfig


def unit_classes(unit: np.ndarray, semantic: np.ndarray, num_classes: int, min_purity: float) -> np.ndarray:
    """Majority class of each unit (object or segment), -1 where impure or unlabelled.

    Args:
        unit: int [N] unit id per point, -1 = none.
        semantic: int [N] class id per point, IGNORE_INDEX = unlabelled.
    Returns:
        int64 [U] (U = max unit id + 1): the class holding >= min_purity of the unit's points.
    """
    U = int(unit.max()) + 1 if len(unit) and unit.max() >= 0 else 0
    has_unit = unit >= 0
    labelled = has_unit & (semantic >= 0) & (semantic < num_classes)
    votes = np.bincount(unit[labelled].astype(np.int64) * num_classes + semantic[labelled],
                        minlength=U * num_classes).reshape(U, num_classes)
    sizes = np.bincount(unit[has_unit], minlength=U)
    best = votes.argmax(axis=1)
    ok = votes[np.arange(U), best] >= min_purity * np.maximum(sizes, 1)
    return np.where(ok & (sizes > 0), best, -1).astype(np.int64)


def scene_crops(
    view_rgb: np.ndarray, point_index: np.ndarray, units: Sequence[np.ndarray], semantic: np.ndarray,
    num_classes: int, cfg: TeacherConfig, rng: np.random.Generator, point_colour: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Captioned crops of one scene's units (pure core of `collect_crops`).

    Args:
        view_rgb: uint8 [V, H, W, 3]; point_index: int32 [V, H, W] (-1 = nothing).
        units: per-point unit ids (e.g. instance, segment), each int [N], -1 = none.
        semantic: int [N] classes (IGNORE_INDEX = unlabelled).
        point_colour: int [N] named colour per point (`colour_index`); None: no colours.
    Returns:
        crops uint8 [M, crop_size, crop_size, 3], class ids int64 [M], colour ids int64 [M] (-1: none).
    """
    views, boxes, ids, colours = [], [], [], []
    for unit in units:
        classes = unit_classes(unit, semantic, num_classes, cfg.min_purity)
        if not (classes >= 0).any():
            continue
        unit_colour = (unit_colours(unit, point_colour, cfg.min_colour_share) if point_colour is not None
                       else np.full(len(classes), -1, np.int64))
        chosen = segment_crops(
            point_index, unit, num_segments=len(classes), k=cfg.views_per_object, min_pixels=cfg.min_pixels,
            scales=cfg.scales, min_side=16.0,
        )
        keep = np.flatnonzero(classes[chosen.segment] >= 0)
        views.append(chosen.view[keep])
        boxes.append(chosen.box[keep])
        ids.append(classes[chosen.segment[keep]])
        colours.append(unit_colour[chosen.segment[keep]])
    if not ids or not sum(len(i) for i in ids):
        return np.zeros((0, cfg.crop_size, cfg.crop_size, 3), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64)
    view, box, class_ids, colour_ids = (np.concatenate(a) for a in (views, boxes, ids, colours))
    if cfg.max_crops_per_scene and len(class_ids) > cfg.max_crops_per_scene:
        # subsample before cutting: cutting is the expensive part
        pick = np.sort(rng.choice(len(class_ids), cfg.max_crops_per_scene, replace=False))
        view, box, class_ids, colour_ids = view[pick], box[pick], class_ids[pick], colour_ids[pick]
    images = torch.from_numpy(np.ascontiguousarray(view_rgb)).permute(0, 3, 1, 2).float().div_(255.0)
    cut = extract_crops(images, view, box, size=cfg.crop_size, fill=OPENAI_CLIP_MEAN)
    crops = cut.mul_(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return crops, class_ids.astype(np.int64), colour_ids.astype(np.int64)


def collect_crops(
    store_path: str, scene_ids: Sequence[str], cfg: TeacherConfig, *, colours: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crops of objects and segments from the rendered views of a store, with their class and colour ids.

    Needs ingest (semantic, instance, rgb) and render; overseg too when `sources` has "segment".
    Returns:
        crops uint8 [M, crop_size, crop_size, 3], class ids int64 [M] (store class indices),
        colour ids int64 [M] (COLOUR_NAMES index, -1: none or `colours` False).
    """
    store = Store.open(store_path)
    num_classes = len(store.class_names)
    rng = np.random.default_rng(cfg.seed)
    unknown = set(cfg.sources) - {"instance", "segment"}
    if unknown:
        raise ValueError(f"TeacherConfig.sources: unknown {sorted(unknown)}; use 'instance' and/or 'segment'")
    crops, ids, cols = [], [], []
    for scene_id in scene_ids:
        try:
            view_rgb = store.read(scene_id, schema.VIEW_RGB)
            point_index = store.read(scene_id, schema.VIEW_POINT_INDEX)
            semantic = store.read(scene_id, schema.SEMANTIC).astype(np.int64)
            point_colour = colour_index(store.read(scene_id, schema.RGB)) if colours else None
            units = []
            if "instance" in cfg.sources:
                units.append(store.read(scene_id, schema.INSTANCE).astype(np.int64))
            if "segment" in cfg.sources:
                units.append(store.read(scene_id, schema.SEGMENT).astype(np.int64))
        except KeyError as exc:
            raise SceneError(scene_id, None, f"teacher crops need ingest, render and overseg: {exc}") from exc
        c, i, k = scene_crops(view_rgb, point_index, units, semantic, num_classes, cfg, rng, point_colour)
        crops.append(c)
        ids.append(i)
        cols.append(k)
    if not crops:
        return np.zeros((0, cfg.crop_size, cfg.crop_size, 3), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(crops), np.concatenate(ids), np.concatenate(cols)


def split_scenes(scene_ids: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) scene lists; at least one held-out scene when there are two or more."""
    ids = sorted(scene_ids)
    if len(ids) < 2 or fraction <= 0:
        return ids, []
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = min(len(ids) - 1, max(1, int(round(len(ids) * fraction))))
    val = sorted(ids[i] for i in order[:n_val])
    return [s for s in ids if s not in set(val)], val
