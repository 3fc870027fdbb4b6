"""The labels a fine-tuning run may see, and the dataset that serves them.

Reads the manifests (limited-annotation budgets through `pipeline.datasets`) and the store
(through :class:`ws3d_train.data.dataset.SceneDataset`). A label budget by name (``la20`` ...:
that many labelled points per scene, chosen deterministically by
:func:`pipeline.datasets.limited_annotation_mask`, or from an official file), a ratio of each
scene's labelled points (``"0.01"``) or ``"all"``; with an open-vocabulary split, novel (and
ignored) classes lose their labels. Everything label-derived downstream (voxel labels, semantic
boundaries) is computed from these masked labels only; the store's full-label
``overseg/semantic_boundary`` is never let through, so nothing leaks.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.datasets.manifests import limited_annotation_mask
from pipeline.schema import IGNORE_INDEX
from ws3d_train.data.batch import Batch, collate
from ws3d_train.data.dataset import DataConfig, DataError, SceneArrays, SceneDataset, make_sample
from ws3d_train.data.batch import SceneSample

__all__ = ["FinetuneDataset", "apply_label_budget", "collate_copies", "label_mask", "parse_label_budget"]

_LA = re.compile(r"^(?:la)?(\d+)$")


def parse_label_budget(labels: str | float) -> tuple[Literal["all", "count", "ratio"], float]:
    """``"all"`` -> ("all", 0); ``"la20"``/``"20"``/20 -> ("count", 20); ``"0.01"``/0.01 -> ("ratio", 0.01).

    Raises:
        ValueError for anything else (a ratio must lie in (0, 1]).
    """
    if isinstance(labels, bool):
        raise ValueError(f"labels {labels!r}: expected la<N>, a count, a ratio or 'all'")
    if isinstance(labels, (int, float)):
        value = float(labels)
        text = None
    else:
        text = str(labels).strip().lower()
        if text == "all":
            return "all", 0.0
        if (m := _LA.match(text)) is not None:
            value = float(m.group(1))
            if value < 1:
                raise ValueError(f"labels {labels!r}: a count must be at least 1")
            return "count", value
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"labels {labels!r}: expected la<N> (la20, la50 ...), a count, a ratio in (0, 1] or 'all'") from None
    if 0.0 < value <= 1.0 and not (text is None and isinstance(labels, int)):
        return "ratio", value
    if value >= 1.0 and value == int(value):
        return "count", value
    raise ValueError(f"labels {labels!r}: a ratio must lie in (0, 1], a count must be a positive integer")


def label_mask(
    scene_id: str,
    semantic: np.ndarray,
    labels: str | float,
    *,
    seed: int = 0,
    official_file: str | Path | None = None,
) -> np.ndarray:
    """Which points of a scene keep their label under a label budget.

    Only points with a label (``semantic != IGNORE_INDEX``) can be chosen. ``la<N>``: N of them,
    drawn by :func:`pipeline.datasets.limited_annotation_mask` (deterministic per seed and scene;
    all of them when fewer than N) or read from ``official_file``; a ratio r: ``max(1, round(r *
    n_labelled))`` of them drawn the same way; ``all``: every labelled point.

    Args:
        scene_id: the scene (seeds the choice; key of an official file).
        semantic: [N] int labels of the whole scene.
        labels: the budget (see :func:`parse_label_budget`).
        seed: seed of the choice.
        official_file: optional official limited-annotation file (``la<N>`` budgets only).

    Returns:
        [N] bool, True at the points whose label is kept.
    """
    semantic = np.asarray(semantic).reshape(-1)
    labelled = semantic != IGNORE_INDEX
    kind, value = parse_label_budget(labels)
    if kind == "all":
        return labelled.copy()
    n_labelled = int(labelled.sum())
    if kind == "ratio":
        if n_labelled == 0:
            return labelled.copy()
        count = max(1, int(round(value * n_labelled)))
        official_file = None  # official files are per-count benchmarks, not ratios
    else:
        count = int(value)
    mask = limited_annotation_mask(
        scene_id, semantic.shape[0], count, seed=seed, official_file=official_file,
        eligible=None if official_file is not None else labelled,
    )
    return mask & labelled


def apply_label_budget(
    scene_id: str,
    semantic: np.ndarray,
    labels: str | float,
    *,
    removed_classes: Sequence[int] = (),
    seed: int = 0,
    official_file: str | Path | None = None,
) -> np.ndarray:
    """The labels a fine-tuning run sees: :func:`label_mask`, then ``removed_classes`` (novel and
    ignored classes of an open-vocabulary split) set to IGNORE_INDEX.

    Returns:
        [N] int64 labels, IGNORE_INDEX where hidden.
    """
    semantic = np.asarray(semantic).reshape(-1).astype(np.int64)
    mask = label_mask(scene_id, semantic, labels, seed=seed, official_file=official_file)
    out = np.where(mask, semantic, IGNORE_INDEX)
    if len(removed_classes):
        out[np.isin(out, np.asarray(removed_classes, np.int64))] = IGNORE_INDEX
    return out


class FinetuneDataset(SceneDataset):
    """:class:`SceneDataset` whose labels are cut to the run's budget, yielding ``copies``
    differently augmented samples per scene (a list; see :func:`collate_copies`).

    Copy k of item ``(epoch, i)`` is a function of ``(seed, epoch, i, k)`` only, so resuming stays exact.
    """

    def __init__(
        self,
        store_path: str | Path,
        scene_ids: Sequence[str],
        *,
        cfg: DataConfig,
        seed: int,
        labels: str | float,
        label_seed: int = 0,
        official_file: str | None = None,
        removed_classes: Sequence[int] = (),
        copies: int = 2,
    ):
        super().__init__(store_path, scene_ids, cfg=cfg, split="train", seed=seed)
        self.labels = labels
        self.label_seed = int(label_seed)
        self.official_file = official_file
        self.removed_classes = tuple(int(c) for c in removed_classes)
        self.copies = int(copies)

    def read_arrays(self, scene_id: str) -> SceneArrays:
        arrays = super().read_arrays(scene_id)
        arrays.semantic = apply_label_budget(
            scene_id, arrays.semantic, self.labels, removed_classes=self.removed_classes,
            seed=self.label_seed, official_file=self.official_file,
        )
        # the store's semantic boundary comes from the full labels: never let it through
        arrays.semantic_boundary = np.full(arrays.semantic.shape[0], 255, np.uint8)
        return arrays

    def __getitem__(self, key: int | tuple[int, int]) -> list[SceneSample]:  # type: ignore[override]
        epoch, index = (0, key) if isinstance(key, (int, np.integer)) else (int(key[0]), int(key[1]))
        scene_id = self.scene_ids[index]
        try:
            arrays = self.read_arrays(scene_id)
        except KeyError as exc:
            raise DataError(f"{self.store_path}: scene {scene_id}: {exc}") from exc
        return [
            make_sample(
                scene_id, arrays, cfg=self.cfg, voxel_size=self.voxel_size,
                rng=np.random.default_rng([self.seed, epoch, index, copy]),
            )
            for copy in range(self.copies)
        ]


def collate_copies(items: Sequence[Sequence[SceneSample]]) -> Batch:
    """B items of K copies -> one batch of K*B scenes: all first copies, then all second copies,
    so scene b's copy k has batch index ``k * B + b``."""
    if not items:
        raise ValueError("collate_copies: no items")
    copies = len(items[0])
    return collate([item[k] for k in range(copies) for item in items])
