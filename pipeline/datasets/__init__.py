"""The datasets ws3d knows, registered in one place, and their manifests by dataset name.

Each dataset is one module of this package declaring a :class:`~pipeline.datasets.base.Dataset`
(reader, reader config, scene-id pattern, how its scene lists and label map are read from
`data_manifests/<name>/`). :data:`DATASETS` below is the registry: adding a dataset is its
module, one line here and its tests (see `docs/development.md`).

The functions here are the dataset-aware entry points to `data_manifests/`: class lists, label
maps, scene lists and splits, open-vocabulary splits, a user's scene-list file, and a comparison
of a split with a raw download. Every file is validated when first loaded (then cached): an
unknown class, an unknown scene, a duplicate scene, overlapping train/val(/test) lists, a
malformed scene id raise :class:`ManifestError` naming the file and line. Writes nothing.

Scene ids: ScanNet `scene0000_00`; S3DIS `Area_1_office_2` (the release's `Area_1/office_2`,
joined with `_` like PointNet's `all_data_label.txt`); SemanticKITTI one scan, `<sequence>_<frame>`
e.g. `08_000000`; synthetic rooms the generator's names; plain files their path below the raw
folder (`site_a/scan_01.ply` -> `site_a__scan_01`).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError
from pipeline.datasets import files, s3dis, scannet, semantickitti, synthetic
from pipeline.datasets.base import Dataset, RawScene
from pipeline.datasets.manifests import (
    DEFAULT_ROOT,
    LIMITED_ANNOTATION_NAMES,
    LIMITED_RECONSTRUCTION_NAMES,
    ManifestError,
    OVSplit,
    check_label_pairs,
    limited_annotation_count,
    limited_annotation_mask,
    parse_scene_lines,
    read_classes,
    read_ov_splits,
)
from pipeline.datasets import manifests as _manifests

__all__ = [
    "DATASETS", "DEFAULT_ROOT", "Dataset", "LIMITED_ANNOTATION_NAMES", "LIMITED_RECONSTRUCTION_NAMES",
    "ManifestError", "OVSplit", "RawScene", "check_raw", "clear_cache", "get_dataset", "limited_annotation_count",
    "limited_annotation_mask", "list_ov_splits", "list_splits", "load_classes", "load_label_map", "load_ov_split",
    "load_split", "readable_datasets", "read_scene_list",
]

DATASETS: dict[str, Dataset] = {
    d.name: d for d in (scannet.DATASET, scannet.SCANNET200, s3dis.DATASET, semantickitti.DATASET, synthetic.DATASET,
                        files.DATASET)
}
"""Every dataset by name. ScanNet200 has manifests but no reader of its own yet; `files` (plain scan
files) has a reader but no manifests: its classes come from its reader config."""


def get_dataset(name: str, *, readable: bool = False) -> Dataset:
    """The dataset called `name` (with ``readable``: one whose raw files can be ingested).

    Raises:
        ConfigError naming the known datasets.
    """
    dataset = DATASETS.get(name)
    known = readable_datasets() if readable else tuple(DATASETS)
    if dataset is None or name not in known:
        raise ConfigError(f"unknown dataset {name!r}; expected one of {', '.join(known)}")
    return dataset


def readable_datasets() -> tuple[str, ...]:
    """Names of the datasets with a reader (what `ws3d ingest --dataset` takes)."""
    return tuple(name for name, d in DATASETS.items() if d.readable)


def _root(root: str | Path | None) -> str:
    return str(Path(root).resolve()) if root is not None else str(DEFAULT_ROOT)


def _folder(root: str, name: str) -> Path:
    return Path(root) / get_dataset(name).name


# --- classes and label maps -----------------------------------------------------------------


def load_classes(dataset: str, *, root: str | Path | None = None) -> tuple[str, ...]:
    """The dataset's training class names, index = training id (0..C-1).

    ScanNet: the 20 benchmark classes of NYU40; ScanNet200: 200; S3DIS: 13; SemanticKITTI: 19;
    synthetic: ScanNet's 20.
    """
    return read_classes(str(_folder(_root(root), dataset)))


@functools.lru_cache(maxsize=None)
def _label_map(root: str, name: str) -> tuple[tuple[Any, int], ...]:
    folder = _folder(root, name)
    dataset = get_dataset(name)
    pairs = dataset.label_map(folder, read_classes(str(folder))) if dataset.label_map is not None else []
    return check_label_pairs(folder, pairs)


def load_label_map(dataset: str, *, root: str | Path | None = None) -> dict[Any, int]:
    """Raw label -> training id (or `IGNORE_INDEX`); raw labels not in the map are ignored.

    Keys: ScanNet and synthetic NYU40 ids (int); ScanNet200 raw ScanNet category ids (the `id`
    column of `scannetv2-labels.combined.tsv`); S3DIS annotation class names (str, including
    `stairs` -> clutter); SemanticKITTI raw semantic ids (int, the official `learning_map`, moving
    classes onto their static class, `unlabeled`/`outlier`/... onto `IGNORE_INDEX`).
    """
    return dict(_label_map(_root(root), dataset))


# --- scene lists ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _scene_lists(root: str, name: str) -> dict[str, tuple[str, ...]]:
    """Every split of a dataset, validated together (so an error shows whatever split is asked)."""
    dataset = get_dataset(name)
    if dataset.scene_lists is None:
        return {}
    return dataset.scene_lists(Path(root) / (dataset.scenes_folder or dataset.name))


def list_splits(dataset: str, *, root: str | Path | None = None) -> tuple[str, ...]:
    """Names accepted by `load_split` for this dataset (sorted; empty for `synthetic`)."""
    return tuple(sorted(_scene_lists(_root(root), dataset)))


def load_split(dataset: str, name: str, *, root: str | Path | None = None) -> list[str]:
    """The scene ids of one split, in file order.

    ScanNet: `train` (1201), `val` (312), `test` (100), `all`, `lr1`/`lr5`/`lr10`/`lr20`
    (limited reconstructions, subsets of train). S3DIS: `train` (areas 1-4, 6) and `val` (area 5),
    `fold<k>_train`/`fold<k>_val` (6-fold, val = area k), `area<k>`, `all`. SemanticKITTI:
    `train` (sequences 00-07, 09-10), `val` (08), `test` (11-21), `all`, one scene per scan.
    """
    lists = _scene_lists(_root(root), dataset)
    if name not in lists:
        d = get_dataset(dataset)
        raise ManifestError(
            Path(_root(root)) / (d.scenes_folder or d.name),
            f"unknown split {name!r} for {dataset}; available: {sorted(lists) or 'none'}",
        )
    return list(lists[name])


def read_scene_list(path: str | Path, dataset: str, *, root: str | Path | None = None) -> list[str]:
    """A user's scene-list file (one id a line, `#` comments), checked against the dataset.

    Raises ManifestError for malformed ids, duplicates and (where the dataset has full lists)
    scenes that are not part of it.
    """
    path = Path(path)
    entries = parse_scene_lines(path, dataset, get_dataset(dataset).scene_id)
    lists = _scene_lists(_root(root), dataset)
    if "all" in lists:
        full = set(lists["all"])
        for line, scene in entries:
            if scene not in full:
                raise ManifestError(path, f"unknown scene {scene!r}: not in the {dataset} scene lists", line)
    return [scene for _, scene in entries]


# --- open-vocabulary splits -------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _ov_splits(root: str, name: str) -> dict[str, OVSplit]:
    folder = _folder(root, name)
    path = folder / "ov_splits.yaml"
    return read_ov_splits(path, read_classes(str(folder))) if path.exists() else {}


def list_ov_splits(dataset: str, *, root: str | Path | None = None) -> tuple[str, ...]:
    """Names accepted by `load_ov_split` (e.g. ScanNet b15n4, b12n7, b10n9; S3DIS b8n4, b6n6)."""
    return tuple(_ov_splits(_root(root), dataset))


def load_ov_split(dataset: str, name: str, *, root: str | Path | None = None) -> OVSplit:
    """Base, novel and ignored training class ids (each ascending) of an open-vocabulary split."""
    splits = _ov_splits(_root(root), dataset)
    if name not in splits:
        raise ManifestError(
            _folder(_root(root), dataset) / "ov_splits.yaml",
            f"unknown open-vocabulary split {name!r} for {dataset}; available: {sorted(splits) or 'none'}",
        )
    return splits[name]


# --- raw data check ---------------------------------------------------------------------------


def check_raw(
    dataset: str, raw_dir: str | Path, split: str = "all", *, root: str | Path | None = None
) -> tuple[list[str], list[str]]:
    """Compare a split with the scenes a raw download holds (for `ws3d manifests check`).

    Returns:
        (listed but missing on disk, in split order; on disk but not in the split, sorted).
    """
    listed = load_split(dataset, split, root=root)
    d = get_dataset(dataset)
    on_disk = list(d.list_scenes(Path(raw_dir), None)) if d.list_scenes is not None else []
    disk_set, listed_set = set(on_disk), set(listed)
    return [s for s in listed if s not in disk_set], sorted(s for s in on_disk if s not in listed_set)


def clear_cache() -> None:
    """Forget loaded manifests (after editing files in a running process)."""
    for fn in (_label_map, _scene_lists, _ov_splits):
        fn.cache_clear()
    _manifests.clear_cache()
