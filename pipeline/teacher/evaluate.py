"""How well a teacher does: crop classification by the nearest class prompt, colour naming, and
its accuracy on crops of (validation) scenes of a 3D store, by base and novel class (evaluation
only: the teacher is already fitted; the labels of those scenes decide nothing)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.clip.model import embed_vocabulary, load_encoder
from pipeline.store import Store
from pipeline.teacher.captions import COLOUR_NAMES
from pipeline.teacher.config import TeacherConfig
from pipeline.teacher.crops import collect_crops


def crop_predictions(
    encoder: Any, crops: np.ndarray, class_names: Sequence[str], templates: Sequence[str],
    candidates: Sequence[int] | None = None,
) -> np.ndarray:
    """Class of each crop by its nearest class prompt (templates averaged, as the embed stage's
    vocabulary): int64 [M] index into `class_names`. `candidates` restricts the choice (e.g. the
    classes that are evaluated, without the ignored ones)."""
    if len(crops) == 0:
        return np.zeros(0, np.int64)
    keep = np.arange(len(class_names)) if candidates is None else np.asarray(sorted(candidates), np.int64)
    text = embed_vocabulary([class_names[c] for c in keep], templates, encoder)
    image = encoder.encode_images(crops, batch_size=256, fit="crop")
    return keep[(image @ text.T).argmax(axis=1)]


def crop_accuracy(
    encoder: Any, crops: np.ndarray, class_ids: np.ndarray, class_names: Sequence[str], templates: Sequence[str]
) -> tuple[float, float]:
    """(accuracy, mean per-class accuracy) of classifying crops by their nearest class prompt.

    Classification accuracy on crops of known classes (the teacher was trained on every class
    name), not zero-shot recognition of unseen categories.

    Args:
        encoder: a loaded `ClipEncoder`; crops: uint8 [M, h, w, 3]; class_ids: int [M].
    """
    if len(crops) == 0:
        return float("nan"), float("nan")
    correct = crop_predictions(encoder, crops, class_names, templates) == class_ids
    per_class = [correct[class_ids == c].mean() for c in np.unique(class_ids)]
    return float(correct.mean()), float(np.mean(per_class))


def colour_accuracy(
    encoder: Any, crops: np.ndarray, class_ids: np.ndarray, colour_ids: np.ndarray, class_names: Sequence[str],
) -> float:
    """Of the crops with a colour: how often "a photo of a <colour> <class name>." over every named
    colour (with the crop's true class) is nearest for the true colour. NaN without coloured crops."""
    has = np.flatnonzero(colour_ids >= 0)[:1000]
    if not len(has):
        return float("nan")
    image = encoder.encode_images(crops[has], batch_size=256, fit="crop")
    correct = 0
    for c in np.unique(class_ids[has]):
        rows = np.flatnonzero(class_ids[has] == c)
        text = encoder.encode_texts([f"a photo of a {name} {class_names[c]}." for name, _ in COLOUR_NAMES])
        pred = (image[rows] @ text.T).argmax(axis=1)
        correct += int((pred == colour_ids[has][rows]).sum())
    return correct / len(has)


def crop_accuracy_on_store(
    model_dir: str | Path, store_path: str, scene_ids: Sequence[str], cfg: TeacherConfig,
    *, base_ids: Sequence[int] = (), novel_ids: Sequence[int] = (), ignored_ids: Sequence[int] = (),
) -> dict[str, Any]:
    """The teacher's crop-classification accuracy on crops of (validation) scenes of a 3D store,
    split by base and novel class. Evaluation only: the teacher is already fitted; the labels
    of these scenes decide nothing.

    Returns:
        {"all", "base", "novel", "n_base", "n_novel", "per_class"} (accuracy over crops; the
        choice is among the base and novel classes, ignored classes neither chosen nor counted).
    """
    store = Store.open(store_path)
    names = store.class_names
    crops, class_ids, _ = collect_crops(store_path, scene_ids, cfg, colours=False)
    keep = ~np.isin(class_ids, np.asarray(list(ignored_ids), np.int64))
    crops, class_ids = crops[keep], class_ids[keep]
    encoder = load_encoder(str(model_dir), device="cpu", dtype="fp32")
    candidates = [c for c in range(len(names)) if c not in set(ignored_ids)]
    pred = crop_predictions(encoder, crops, names, cfg.templates, candidates)
    correct = pred == class_ids

    def acc(mask: np.ndarray) -> float:
        return float(correct[mask].mean()) if mask.any() else float("nan")

    is_base, is_novel = np.isin(class_ids, list(base_ids)), np.isin(class_ids, list(novel_ids))
    return {"all": acc(np.ones(len(class_ids), bool)), "base": acc(is_base), "novel": acc(is_novel),
            "n_base": int(is_base.sum()), "n_novel": int(is_novel.sum()),
            "per_class": {names[c]: acc(class_ids == c) for c in np.unique(class_ids)}}
