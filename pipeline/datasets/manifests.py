"""Dataset manifests: scene lists, class lists, label maps, limited-label and open-vocabulary splits.

Reads the plain files under `data_manifests/` (one folder per dataset; `data_manifests/PROVENANCE.md`
says where each file comes from) and, for `limited_annotation_mask`, a user's official
limited-annotation file. Writes nothing.

Layout read here (all text a person can diff)::

    data_manifests/
      scannet/      classes.csv (train_index,nyu40_id,name)   scenes/<split>.txt   ov_splits.yaml
      scannet200/   classes.csv (train_index,scannet_category_id,name,...)  (scenes: ../scannet)
      s3dis/        classes.csv   label_map.csv (raw,class)   rooms.csv (area,room)
                    splits.yaml (split -> areas)   ov_splits.yaml
      semantickitti/ classes.csv   label_map.csv (raw_id,raw_name,class)   sequences.csv (sequence,split,scans)
      synthetic/    classes.csv   ov_splits.yaml

Scene ids (`SCENE_ID_PATTERNS`): ScanNet `scene0000_00`; S3DIS `Area_1_office_2` (the release's
`Area_1/office_2`, joined with `_` like PointNet's `all_data_label.txt`); SemanticKITTI one scan,
`<sequence>_<frame>` e.g. `08_000000`.

Every file is validated when first loaded (then cached): an unknown class, an unknown scene, a
duplicate scene, overlapping train/val(/test) lists, a malformed scene id (path separators, `..`;
see `pipeline.schema.check_scene_id`) raise `ManifestError` naming the file and line.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import importlib
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml

from pipeline.readers.base import SceneError
from pipeline.schema import IGNORE_INDEX, check_scene_id

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "data_manifests"
"""The project's manifests folder (the repository's `data_manifests/`)."""

DATASETS: tuple[str, ...] = ("scannet", "scannet200", "s3dis", "semantickitti", "synthetic")
"""Datasets with a manifest folder. `scannet200` shares ScanNet's scene lists."""

SCENE_ID_PATTERNS: dict[str, re.Pattern[str]] = {
    "scannet": re.compile(r"^scene\d{4}_\d{2}$"),
    "scannet200": re.compile(r"^scene\d{4}_\d{2}$"),
    "s3dis": re.compile(r"^Area_[1-6]_[A-Za-z]+_\d+$"),
    "semantickitti": re.compile(r"^\d{2}_\d{6}$"),
    "synthetic": re.compile(r"^.+$"),  # the generator's own names; check_scene_id still applies
}
"""What a scene id of each dataset looks like (on top of `schema.check_scene_id`)."""

LIMITED_RECONSTRUCTION_NAMES: tuple[str, ...] = ("lr1", "lr5", "lr10", "lr20")
"""ScanNet limited-reconstruction scene lists: 1/5/10/20 % of the training scenes."""

LIMITED_ANNOTATION_NAMES: tuple[str, ...] = ("la20", "la50", "la100", "la200")
"""Limited-annotation settings: 20/50/100/200 labelled points per scene."""

_SCENE_FOLDER = {"scannet200": "scannet"}
_OFFICIAL_SPLITS = ("train", "val", "test")
_LA_NAME = re.compile(r"^la(\d+)$")
_OV_NAME = re.compile(r"^b(\d+)n(\d+)$")


class ManifestError(ValueError):
    """A manifest file that is missing or wrong; names the file and, where known, the line."""

    def __init__(self, file: str | Path, message: str, line: int | None = None):
        self.file = str(file)
        self.line = line
        self.message = message
        where = f"{self.file}:{line}" if line is not None else self.file
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # keep the fields through pickling (Dask workers)
        return (ManifestError, (self.file, self.message, self.line))


class OVSplit(NamedTuple):
    """An open-vocabulary split as training class ids (ascending); unpacks as (base, novel, ignored)."""

    base: tuple[int, ...]
    novel: tuple[int, ...]
    ignored: tuple[int, ...]


# --- small file readers ---------------------------------------------------------------------


def _root(root: str | Path | None) -> str:
    return str(Path(root).resolve()) if root is not None else str(DEFAULT_ROOT)


def _check_dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    return dataset


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ManifestError(path, "missing manifest file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(path, f"cannot read: {exc}") from exc


def _read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV with a header, as (line number, row); raise if a required column is absent."""
    lines = _read_text(path).splitlines()
    reader = csv.DictReader(lines)
    header = reader.fieldnames or []
    missing = [c for c in required if c not in header]
    if missing:
        raise ManifestError(path, f"missing column(s) {missing} in header {header}; expected {list(required)}", 1)
    rows = []
    for row in reader:
        if None in row or any(v is None for v in row.values()):
            raise ManifestError(path, f"expected {len(header)} fields {header}", reader.line_num)
        rows.append((reader.line_num, {k: v.strip() for k, v in row.items()}))
    return rows


def _read_yaml_mapping(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """A YAML mapping and the line of each top-level key."""
    text = _read_text(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError(path, f"invalid YAML: {exc}") from exc
    if data is None:
        return {}, {}
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise ManifestError(path, "expected a mapping at the top level")
    lines = {str(k.value): k.start_mark.line + 1 for k, _ in node.value}
    return {str(k): v for k, v in data.items()}, lines


def _parse_scene_lines(path: Path, dataset: str) -> list[tuple[int, str]]:
    """(line, scene id) of a scene-list file: one id a line; blank lines and `#` comments skipped.

    Checks each id (safe plain name, the dataset's pattern) and duplicates.
    """
    pattern = SCENE_ID_PATTERNS[dataset]
    out: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(_read_text(path).splitlines(), start=1):
        scene = raw.split("#", 1)[0].strip()
        if not scene:
            continue
        try:
            check_scene_id(scene)
        except ValueError as exc:
            raise ManifestError(path, str(exc), number) from None
        if not pattern.match(scene):
            raise ManifestError(
                path, f"unknown scene {scene!r}: not a {dataset} scene id (expected {pattern.pattern})", number
            )
        if scene in seen:
            raise ManifestError(path, f"duplicate scene {scene!r} (first at line {seen[scene]})", number)
        seen[scene] = number
        out.append((number, scene))
    return out


# --- classes and label maps -----------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _classes(root: str, dataset: str) -> tuple[str, ...]:
    path = Path(root) / dataset / "classes.csv"
    names: list[str] = []
    for line, row in _read_csv(path, ("train_index", "name")):
        if row["train_index"] != str(len(names)):
            raise ManifestError(
                path, f"train_index must count 0,1,2,...; expected {len(names)}, got {row['train_index']!r}", line
            )
        name = row["name"]
        if not name:
            raise ManifestError(path, "empty class name", line)
        if name in names:
            raise ManifestError(path, f"duplicate class {name!r}", line)
        names.append(name)
    if not names:
        raise ManifestError(path, "no classes")
    return tuple(names)


def load_classes(dataset: str, *, root: str | Path | None = None) -> tuple[str, ...]:
    """The dataset's training class names, index = training id (0..C-1).

    ScanNet: the 20 benchmark classes of NYU40; ScanNet200: 200; S3DIS: 13; SemanticKITTI: 19;
    synthetic: ScanNet's 20.
    """
    return _classes(_root(root), _check_dataset(dataset))


@functools.lru_cache(maxsize=None)
def _label_map(root: str, dataset: str) -> tuple[tuple[Any, int], ...]:
    classes = _classes(root, dataset)
    index = {name: i for i, name in enumerate(classes)}
    folder = Path(root) / dataset
    pairs: list[tuple[Any, int]] = []
    if dataset in ("scannet", "synthetic", "scannet200"):
        column = "scannet_category_id" if dataset == "scannet200" else "nyu40_id"
        path = folder / "classes.csv"
        for line, row in _read_csv(path, ("train_index", column, "name")):
            if not row[column].isdigit():
                raise ManifestError(path, f"{column} must be an integer, got {row[column]!r}", line)
            pairs.append((int(row[column]), int(row["train_index"])))
    elif dataset == "s3dis":
        path = folder / "label_map.csv"
        for line, row in _read_csv(path, ("raw", "class")):
            if row["class"] not in index:
                raise ManifestError(path, f"unknown class {row['class']!r}; expected one of {list(classes)}", line)
            pairs.append((row["raw"], index[row["class"]]))
    elif dataset == "semantickitti":
        path = folder / "label_map.csv"
        for line, row in _read_csv(path, ("raw_id", "class")):
            if not row["raw_id"].isdigit():
                raise ManifestError(path, f"raw_id must be an integer, got {row['raw_id']!r}", line)
            cls = row["class"]
            if cls and cls not in index:
                raise ManifestError(
                    path, f"unknown class {cls!r}; expected one of {list(classes)} or empty (ignored)", line
                )
            pairs.append((int(row["raw_id"]), index[cls] if cls else IGNORE_INDEX))
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1}, key=str)
    if dupes:
        raise ManifestError(folder, f"label map lists raw label(s) {dupes} twice")
    return tuple(pairs)


def load_label_map(dataset: str, *, root: str | Path | None = None) -> dict[Any, int]:
    """Raw label -> training id (or `IGNORE_INDEX`); raw labels not in the map are ignored.

    Keys: ScanNet and synthetic NYU40 ids (int); ScanNet200 raw ScanNet category ids (the `id`
    column of `scannetv2-labels.combined.tsv`); S3DIS annotation class names (str, including
    `stairs` -> clutter); SemanticKITTI raw semantic ids (int, the official `learning_map`, moving
    classes onto their static class, `unlabeled`/`outlier`/... onto `IGNORE_INDEX`).
    """
    return dict(_label_map(_root(root), _check_dataset(dataset)))


# --- scene lists ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _scene_lists(root: str, dataset: str) -> dict[str, tuple[str, ...]]:
    """Every split of a dataset, validated together (so an error shows whatever split is asked)."""
    folder = Path(root) / _SCENE_FOLDER.get(dataset, dataset)
    if dataset in ("scannet", "scannet200"):
        return _scannet_lists(folder / "scenes", dataset)
    if dataset == "s3dis":
        return _s3dis_lists(folder)
    if dataset == "semantickitti":
        return _kitti_lists(folder)
    return {}


def _check_disjoint(lists: dict[str, list[tuple[int, str]]], files: dict[str, Path], names: tuple[str, ...]) -> None:
    for i, a in enumerate(names):
        where_a = {scene: line for line, scene in lists[a]}
        for b in names[i + 1 :]:
            for line, scene in lists[b]:
                if scene in where_a:
                    raise ManifestError(
                        files[b],
                        f"scene {scene!r} is in both {a} ({files[a].name} line {where_a[scene]}) and {b}: "
                        f"overlapping {a}/{b} lists",
                        line,
                    )


def _scannet_lists(folder: Path, dataset: str) -> dict[str, tuple[str, ...]]:
    files = {p.stem: p for p in sorted(folder.glob("*.txt"))}
    for name in _OFFICIAL_SPLITS:
        if name not in files:
            raise ManifestError(folder / f"{name}.txt", "missing manifest file (official split)")
    if "all" in files:
        raise ManifestError(files["all"], "'all' is reserved (the union of train, val and test)")
    lists = {name: _parse_scene_lines(path, dataset) for name, path in files.items()}
    _check_disjoint(lists, files, _OFFICIAL_SPLITS)
    train = {scene for _, scene in lists["train"]}
    full = {scene for name in _OFFICIAL_SPLITS for _, scene in lists[name]}
    for name, entries in lists.items():
        if name in _OFFICIAL_SPLITS:
            continue
        # Limited-reconstruction lists are drawn from the training scenes; other extra lists need
        # only be real scenes.
        allowed, what = (train, "train") if name.startswith("lr") else (full, "train/val/test")
        for line, scene in entries:
            if scene not in allowed:
                kind = "unknown scene" if scene not in full else "scene outside train"
                raise ManifestError(files[name], f"{kind} {scene!r}: not in {what}", line)
    out = {name: tuple(scene for _, scene in entries) for name, entries in lists.items()}
    out["all"] = tuple(scene for name in _OFFICIAL_SPLITS for scene in out[name])
    return out


def _s3dis_lists(folder: Path) -> dict[str, tuple[str, ...]]:
    rooms_path = folder / "rooms.csv"
    by_area: dict[int, list[str]] = {k: [] for k in range(1, 7)}
    seen: dict[str, int] = {}
    for line, row in _read_csv(rooms_path, ("area", "room")):
        match = re.fullmatch(r"Area_([1-6])", row["area"])
        if not match:
            raise ManifestError(rooms_path, f"unknown area {row['area']!r}; expected Area_1..Area_6", line)
        scene = f"{row['area']}_{row['room']}"
        try:
            check_scene_id(scene)
        except ValueError as exc:
            raise ManifestError(rooms_path, str(exc), line) from None
        if not SCENE_ID_PATTERNS["s3dis"].match(scene):
            raise ManifestError(rooms_path, f"unknown scene {scene!r}: room names are <kind>_<n>, e.g. office_2", line)
        if scene in seen:
            raise ManifestError(rooms_path, f"duplicate scene {scene!r} (first at line {seen[scene]})", line)
        seen[scene] = line
        by_area[int(match.group(1))].append(scene)

    splits_path = folder / "splits.yaml"
    data, lines = _read_yaml_mapping(splits_path)
    out: dict[str, tuple[str, ...]] = {}
    areas_of: dict[str, list[int]] = {}
    for name, areas in data.items():
        if name == "all":
            raise ManifestError(splits_path, "'all' is reserved (every room)", lines.get(name))
        if not isinstance(areas, list) or not all(isinstance(a, int) and 1 <= a <= 6 for a in areas):
            raise ManifestError(
                splits_path, f"split {name!r}: expected a list of areas 1..6, got {areas!r}", lines.get(name)
            )
        if len(set(areas)) != len(areas):
            raise ManifestError(splits_path, f"split {name!r}: duplicate area in {areas}", lines.get(name))
        areas_of[name] = areas
        out[name] = tuple(scene for a in areas for scene in by_area[a])
    for name in areas_of:
        if name == "train" or name.endswith("_train"):
            val = "val" if name == "train" else name[: -len("train")] + "val"
            if val in areas_of:
                both = sorted(set(areas_of[name]) & set(areas_of[val]))
                if both:
                    raise ManifestError(
                        splits_path, f"overlapping {name}/{val}: area(s) {both} in both", lines.get(val)
                    )
    out["all"] = tuple(seen)
    return out


def _kitti_lists(folder: Path) -> dict[str, tuple[str, ...]]:
    path = folder / "sequences.csv"
    out: dict[str, list[str]] = {name: [] for name in _OFFICIAL_SPLITS}
    seen: dict[str, int] = {}
    for line, row in _read_csv(path, ("sequence", "split", "scans")):
        seq, split, scans = row["sequence"], row["split"], row["scans"]
        if not re.fullmatch(r"\d{2}", seq):
            raise ManifestError(path, f"unknown sequence {seq!r}; expected two digits, e.g. 08", line)
        if seq in seen:
            raise ManifestError(
                path, f"duplicate sequence {seq!r} (first at line {seen[seq]}): overlapping splits", line
            )
        if split not in out:
            raise ManifestError(path, f"unknown split {split!r}; expected one of {_OFFICIAL_SPLITS}", line)
        if not scans.isdigit() or int(scans) < 1:
            raise ManifestError(path, f"scans must be a positive integer, got {scans!r}", line)
        seen[seq] = line
        out[split].extend(f"{seq}_{frame:06d}" for frame in range(int(scans)))
    lists = {name: tuple(v) for name, v in out.items()}
    lists["all"] = tuple(scene for name in _OFFICIAL_SPLITS for scene in lists[name])
    return lists


def list_splits(dataset: str, *, root: str | Path | None = None) -> tuple[str, ...]:
    """Names accepted by `load_split` for this dataset (sorted; empty for `synthetic`)."""
    return tuple(sorted(_scene_lists(_root(root), _check_dataset(dataset))))


def load_split(dataset: str, name: str, *, root: str | Path | None = None) -> list[str]:
    """The scene ids of one split, in file order.

    ScanNet: `train` (1201), `val` (312), `test` (100), `all`, `lr1`/`lr5`/`lr10`/`lr20`
    (limited reconstructions, subsets of train). S3DIS: `train` (areas 1-4, 6) and `val` (area 5),
    `fold<k>_train`/`fold<k>_val` (6-fold, val = area k), `area<k>`, `all`. SemanticKITTI:
    `train` (sequences 00-07, 09-10), `val` (08), `test` (11-21), `all`, one scene per scan.
    """
    lists = _scene_lists(_root(root), _check_dataset(dataset))
    if name not in lists:
        raise ManifestError(
            Path(_root(root)) / _SCENE_FOLDER.get(dataset, dataset),
            f"unknown split {name!r} for {dataset}; available: {sorted(lists) or 'none'}",
        )
    return list(lists[name])


def read_scene_list(path: str | Path, dataset: str, *, root: str | Path | None = None) -> list[str]:
    """A user's scene-list file (one id a line, `#` comments), checked against the dataset.

    Raises ManifestError for malformed ids, duplicates and (where the dataset has full lists)
    scenes that are not part of it.
    """
    path = Path(path)
    entries = _parse_scene_lines(path, _check_dataset(dataset))
    lists = _scene_lists(_root(root), dataset)
    if "all" in lists:
        full = set(lists["all"])
        for line, scene in entries:
            if scene not in full:
                raise ManifestError(path, f"unknown scene {scene!r}: not in the {dataset} scene lists", line)
    return [scene for _, scene in entries]


# --- open-vocabulary splits -------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _ov_splits(root: str, dataset: str) -> dict[str, OVSplit]:
    path = Path(root) / dataset / "ov_splits.yaml"
    if not path.exists():
        return {}
    classes = _classes(root, dataset)
    index = {name: i for i, name in enumerate(classes)}
    data, lines = _read_yaml_mapping(path)
    out: dict[str, OVSplit] = {}
    for name, spec in data.items():
        line = lines.get(name)
        if not isinstance(spec, dict):
            raise ManifestError(path, f"split {name!r}: expected a mapping with base/novel/ignored", line)
        unknown_keys = sorted(set(spec) - {"base", "novel", "ignored", "note"})
        if unknown_keys:
            raise ManifestError(
                path, f"split {name!r}: unknown key(s) {unknown_keys}; expected base, novel, ignored", line
            )
        parts: dict[str, list[int]] = {}
        for part in ("base", "novel", "ignored"):
            names = spec.get(part, [])
            if not isinstance(names, list):
                raise ManifestError(path, f"split {name!r}: {part} must be a list of class names", line)
            for cls in names:
                if cls not in index:
                    raise ManifestError(
                        path, f"split {name!r}: unknown class {cls!r} in {part}; expected one of {list(classes)}", line
                    )
            parts[part] = [index[c] for c in names]
        flat = parts["base"] + parts["novel"] + parts["ignored"]
        repeated = sorted({classes[i] for i in flat if flat.count(i) > 1})
        if repeated:
            raise ManifestError(
                path, f"split {name!r}: class(es) {repeated} listed twice (base/novel/ignored overlap)", line
            )
        missing = [c for i, c in enumerate(classes) if i not in flat]
        if missing:
            raise ManifestError(path, f"split {name!r}: class(es) {missing} in none of base/novel/ignored", line)
        counts = _OV_NAME.match(name)
        if counts and (int(counts.group(1)), int(counts.group(2))) != (len(parts["base"]), len(parts["novel"])):
            raise ManifestError(
                path,
                f"split {name!r}: name says {counts.group(1)} base / {counts.group(2)} novel, "
                f"lists have {len(parts['base'])} / {len(parts['novel'])}",
                line,
            )
        out[name] = OVSplit(*(tuple(sorted(parts[p])) for p in ("base", "novel", "ignored")))
    return out


def list_ov_splits(dataset: str, *, root: str | Path | None = None) -> tuple[str, ...]:
    """Names accepted by `load_ov_split` (e.g. ScanNet b15n4, b12n7, b10n9; S3DIS b8n4, b6n6)."""
    return tuple(_ov_splits(_root(root), _check_dataset(dataset)))


def load_ov_split(dataset: str, name: str, *, root: str | Path | None = None) -> OVSplit:
    """Base, novel and ignored training class ids (each ascending) of an open-vocabulary split."""
    splits = _ov_splits(_root(root), _check_dataset(dataset))
    if name not in splits:
        raise ManifestError(
            Path(_root(root)) / dataset / "ov_splits.yaml",
            f"unknown open-vocabulary split {name!r} for {dataset}; available: {sorted(splits) or 'none'}",
        )
    return splits[name]


# --- limited annotations ----------------------------------------------------------------------


def limited_annotation_count(name_or_count: str | int) -> int:
    """Points per scene of a limited-annotation setting: "la20", "20" or 20 -> 20."""
    if isinstance(name_or_count, (int, np.integer)) and not isinstance(name_or_count, bool):
        count = int(name_or_count)
    elif isinstance(name_or_count, str) and (
        match := _LA_NAME.match(name_or_count) or re.fullmatch(r"(\d+)", name_or_count)
    ):
        count = int(match.group(1))
    else:
        raise ValueError(f"limited annotation {name_or_count!r}: expected a name like 'la20' or a count")
    if count < 1:
        raise ValueError(f"limited annotation {name_or_count!r}: the count must be at least 1")
    return count


def _scene_rng(seed: int, scene_id: str) -> np.random.Generator:
    # Python's hash() is salted per process; sha256 gives every worker the same stream.
    digest = hashlib.sha256(f"ws3d-limited-annotation:{seed}:{scene_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _torch_load_indices(path: str):
    import pickle

    import torch  # only needed for official files

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as first:
        # Official files may hold NumPy arrays: allow exactly what unpickling those needs.
        core = getattr(np, "_core", None) or np.core
        safe = [np.ndarray, np.dtype, core.multiarray._reconstruct]
        safe += [type(np.dtype(t)) for t in ("int16", "int32", "int64", "uint16", "uint32", "uint64")]
        try:
            with torch.serialization.safe_globals(safe):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise first from None


@functools.lru_cache(maxsize=4)
def _official_file(path: str, mtime_ns: int, size: int) -> dict[str, np.ndarray]:
    try:
        data = _torch_load_indices(path)
    except FileNotFoundError as exc:
        raise ManifestError(path, "official limited-annotation file not found") from exc
    except Exception as exc:  # noqa: BLE001 - torch.load raises KeyError/RuntimeError/... on bad files
        raise ManifestError(path, f"cannot load with torch.load(weights_only=True): {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError(path, f"expected a dict scene name -> point indices, got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        arr = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
        if arr.dtype.kind not in "iu":
            raise ManifestError(path, f"scene {key!r}: expected integer point indices, got dtype {arr.dtype}")
        out[str(key)] = arr.astype(np.int64).ravel()
    return out


def limited_annotation_mask(
    scene_id: str,
    n_points_total: int,
    name_or_count: str | int,
    *,
    seed: int = 0,
    official_file: str | Path | None = None,
    eligible: np.ndarray | None = None,
) -> np.ndarray:
    """Which points of a scene keep their label in a limited-annotation setting.

    With `official_file` (a `torch.load`-able dict: scene name -> point/vertex indices, e.g. the
    ScanNet data-efficient benchmark's files), the scene's indices are taken from it as they are.
    Without it, a deterministic choice that is NOT the official one: `count` points drawn without
    replacement from `eligible` (default: every point), seeded by sha256(seed, scene_id), so each
    (seed, scene) gets the same points in every process and on every machine (for a given NumPy
    PCG64 stream). Fewer eligible points than `count` -> all of them.

    Args:
        scene_id: the scene (the official file's key).
        n_points_total: N, points in the scene.
        name_or_count: "la20"/"la50"/"la100"/"la200", or a count.
        seed: generator seed (ignored with an official file).
        official_file: path of an official limited-annotation file.
        eligible: optional bool [N], where a label exists (e.g. semantic != IGNORE_INDEX).
    Returns:
        bool [N], True at the labelled points.
    """
    count = limited_annotation_count(name_or_count)
    n = int(n_points_total)
    if n < 0:
        raise ValueError(f"scene {scene_id}: n_points_total must be >= 0, got {n}")
    mask = np.zeros(n, dtype=bool)
    if official_file is not None:
        path = Path(official_file).resolve()
        stat = path.stat() if path.exists() else None
        table = _official_file(str(path), stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0)
        if scene_id not in table:
            raise SceneError(scene_id, path, "scene not in the official limited-annotation file")
        idx = table[scene_id]
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise SceneError(
                scene_id, path, f"official indices out of range [0, {n}): min {idx.min()}, max {idx.max()}"
            )
        mask[idx] = True
        return mask
    if eligible is None:
        candidates = np.arange(n)
    else:
        eligible = np.asarray(eligible)
        if eligible.shape != (n,) or eligible.dtype != bool:
            raise ValueError(f"scene {scene_id}: eligible must be bool [{n}], got {eligible.dtype} {eligible.shape}")
        candidates = np.flatnonzero(eligible)
    k = min(count, len(candidates))
    if k == 0:
        return mask
    # k smallest of one uniform key per candidate: the same set whatever k's neighbours are.
    keys = _scene_rng(int(seed), scene_id).random(len(candidates))
    chosen = np.argpartition(keys, k - 1)[:k] if k < len(candidates) else np.arange(len(candidates))
    mask[candidates[chosen]] = True
    return mask


# --- raw data check ---------------------------------------------------------------------------

_READER_OF = {
    "scannet": "scannet",
    "scannet200": "scannet",
    "synthetic": "scannet",
    "s3dis": "s3dis",
    "semantickitti": "semantickitti",
}


def check_raw(
    dataset: str, raw_dir: str | Path, split: str = "all", *, root: str | Path | None = None
) -> tuple[list[str], list[str]]:
    """Compare a split with the scenes a raw download holds (for `ws3d manifests check`).

    Returns:
        (listed but missing on disk, in split order; on disk but not in the split, sorted).
    """
    listed = load_split(dataset, split, root=root)
    reader = importlib.import_module(f"pipeline.readers.{_READER_OF[_check_dataset(dataset)]}")
    on_disk = list(reader.list_scenes(Path(raw_dir)))
    disk_set, listed_set = set(on_disk), set(listed)
    return [s for s in listed if s not in disk_set], sorted(s for s in on_disk if s not in listed_set)


def clear_cache() -> None:
    """Forget loaded manifests (after editing files in a running process)."""
    for fn in (_classes, _label_map, _scene_lists, _ov_splits, _official_file):
        fn.cache_clear()
