"""Manifest files under `data_manifests/`: the readers every dataset module shares.

`data_manifests/` holds one folder per dataset (`data_manifests/PROVENANCE.md` says where each
file comes from): `classes.csv` (train_index, name, ...), scene lists or the files they are built
from, label maps and `ov_splits.yaml`. This module reads those files strictly (an unknown class, a
duplicate scene, overlapping splits, a malformed scene id raise :class:`ManifestError` naming the
file and line) and holds what is the same for every dataset: class lists, open-vocabulary splits,
limited-annotation budgets and their deterministic point choice. How one dataset's scene lists and
label map are laid out is its own module's business (`pipeline.datasets.<name>`); the dataset-aware
entry points (`load_split("scannet", "val")`, ...) are in `pipeline.datasets`. Writes nothing.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml

from pipeline.errors import SceneError
from pipeline.schema import check_scene_id

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "data_manifests"
"""The project's manifests folder (the repository's `data_manifests/`)."""

LIMITED_RECONSTRUCTION_NAMES: tuple[str, ...] = ("lr1", "lr5", "lr10", "lr20")
"""ScanNet limited-reconstruction scene lists: 1/5/10/20 % of the training scenes."""

LIMITED_ANNOTATION_NAMES: tuple[str, ...] = ("la20", "la50", "la100", "la200")
"""Limited-annotation settings: 20/50/100/200 labelled points per scene."""

OFFICIAL_SPLITS = ("train", "val", "test")
"""The official split names of a benchmark with held-out test scenes."""

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


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ManifestError(path, "missing manifest file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(path, f"cannot read: {exc}") from exc


def read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV with a header, as (line number, row); raise if a required column is absent."""
    lines = read_text(path).splitlines()
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


def read_yaml_mapping(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """A YAML mapping and the line of each top-level key."""
    text = read_text(path)
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


def parse_scene_lines(path: Path, dataset: str, pattern: re.Pattern[str]) -> list[tuple[int, str]]:
    """(line, scene id) of a scene-list file: one id a line; blank lines and `#` comments skipped.

    Checks each id (safe plain name, the dataset's scene-id `pattern`) and duplicates.
    """
    out: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(read_text(path).splitlines(), start=1):
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
def read_classes(folder: str) -> tuple[str, ...]:
    """The training class names of `<folder>/classes.csv`, index = training id (0..C-1)."""
    path = Path(folder) / "classes.csv"
    names: list[str] = []
    for line, row in read_csv(path, ("train_index", "name")):
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


def class_column_map(folder: Path, column: str) -> list[tuple[Any, int]]:
    """(raw id, training id) pairs from an integer column of `<folder>/classes.csv` (ScanNet's
    `nyu40_id`, ScanNet200's `scannet_category_id`)."""
    path = folder / "classes.csv"
    pairs: list[tuple[Any, int]] = []
    for line, row in read_csv(path, ("train_index", column, "name")):
        if not row[column].isdigit():
            raise ManifestError(path, f"{column} must be an integer, got {row[column]!r}", line)
        pairs.append((int(row[column]), int(row["train_index"])))
    return pairs


def shipped_label_map(name: str, label_map: Any, class_names: tuple[str, ...]) -> dict[Any, int]:
    """A reader's label map from the project's own `data_manifests/<name>/` (`label_map` is the
    dataset's `label_map(folder, class_names)`), checked."""
    folder = DEFAULT_ROOT / name
    return dict(check_label_pairs(folder, label_map(folder, class_names)))


def check_label_pairs(folder: Path, pairs: list[tuple[Any, int]]) -> tuple[tuple[Any, int], ...]:
    """The pairs of a label map, checked for raw labels listed twice."""
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1}, key=str)
    if dupes:
        raise ManifestError(folder, f"label map lists raw label(s) {dupes} twice")
    return tuple(pairs)


# --- scene lists ------------------------------------------------------------------------------


def check_disjoint(lists: dict[str, list[tuple[int, str]]], files: dict[str, Path], names: tuple[str, ...]) -> None:
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


# --- open-vocabulary splits -------------------------------------------------------------------


def read_ov_splits(path: Path, classes: tuple[str, ...]) -> dict[str, OVSplit]:
    """The open-vocabulary splits of an `ov_splits.yaml` over `classes` (empty without the file)."""
    if not path.exists():
        return {}
    index = {name: i for i, name in enumerate(classes)}
    data, lines = read_yaml_mapping(path)
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


def clear_cache() -> None:
    """Forget files read by this module (after editing them in a running process)."""
    for fn in (read_classes, _official_file):
        fn.cache_clear()
