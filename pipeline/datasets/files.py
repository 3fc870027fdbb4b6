"""Plain scan files (`--dataset files`): every scan file under a folder becomes a scene, no layout.

A robot's own scans come in no benchmark's layout: a folder of `.ply`, `.pcd`, `.npy`/`.npz`,
`.las`/`.laz`, `.txt`/`.xyz`/`.pts` or `.bin` files, meshes or clouds, with or without colour and
labels. Each file under the raw folder (recursively) is one scene; its id is its path relative to
the folder without the extension, folders joined by `__` and other unsafe characters made `_`
(`site_a/scan 01.ply` -> `site_a__scan_01`; two files with the same stem get their extension
appended). A top folder named `train`, `val` or `test` puts its scans in that split
(:func:`folder_splits`), so `ws3d pretrain` and `ws3d eval --split val` work on one's own scans.

Readers (well-kept libraries, no hand-written binary parsing):

- `.ply`: plyfile. `x y z`; colour as `red green blue`, `r g b` or `diffuse_red ...` (8- or 16-bit
  integers or floats in 0..1); a per-vertex label (`label`, `class`, `semantic`, ...) and
  `instance` when present; `face` triangles (polygons fanned into triangles). A PLY whose face
  element is absent or empty is a point cloud, not a mesh with 0 faces.
- `.pcd`: Open3D's tensor reader (ASCII, binary and binary_compressed; custom fields such as
  `label`, `instance` and `intensity` kept).
- `.npy`: an [N, k] array (columns by `columns`, or by k: 3 `x y z`, 4 `x y z intensity`,
  6 `x y z r g b`, 7 `x y z r g b label`, 8 `... label instance`) or a structured array with
  named fields; labels kept apart are read from `X_labels.npy` beside `X_points.npy`, or from
  `labels/X.npy` beside `points/X.npy` (:func:`label_sidecar`). `.npz`: named arrays (`xyz`/`points`/`coord`, `rgb`/`colors`, `label`/`semantic`,
  `instance`, `faces`, `intensity`), or one unnamed [N, k] array.
- `.las`/`.laz`: laspy (with lazrs for LAZ): scaled coordinates, 16-bit colour, `intensity`,
  `classification` as the label.
- `.txt`/`.xyz`/`.pts`: numeric columns (whitespace or commas, `#` comments; a first line holding
  only the point count, as Leica `.pts` files have, is skipped); columns as for `.npy` (`.pts`
  with 4 or 7 columns: `x y z intensity [r g b]`).
- `.bin`: float32 records (KITTI's `x y z intensity` unless `columns` says otherwise).

Options (:class:`FilesReaderConfig`, `ingest.reader.*`): the class list of the store, a label map
(raw label -> class name), the up axis, the units, the column meaning, the scan kind (mesh,
points or LiDAR with its sensor position) and which fields hold labels. Scans without colour are
grey (and say so); scans without labels are unlabelled (as a ScanNet test scan).

:func:`load_scan` reads one file into arrays in the project's conventions; `Model.predict_file`
uses it too, so a file predicts the same whether or not it went through a store.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.datasets import manifests
from pipeline.datasets.base import Dataset, RawScene, tag
from pipeline.datasets.semantickitti import looks_like_xyz_records
from pipeline.errors import SceneError, UserError
from pipeline.schema import IGNORE_INDEX, check_scene_id

EXTENSIONS: tuple[str, ...] = (".ply", ".pcd", ".npy", ".npz", ".las", ".laz", ".txt", ".xyz", ".pts", ".bin")
"""File extensions read as scans (case-insensitive)."""
SPLIT_FOLDERS: tuple[str, ...] = ("train", "val", "test")
"""Top folders of the raw folder that name a split."""
UNITS_M: dict[str, float] = {"m": 1.0, "dm": 0.1, "cm": 0.01, "mm": 0.001, "km": 1000.0, "in": 0.0254,
                             "ft": 0.3048, "yd": 0.9144}
"""Metres per unit of `units`."""
GREY = 128
"""Colour of points of a scan without colour or intensity."""

LABEL_FIELDS = ("label", "labels", "class", "semantic", "semantic_label", "semantic_id", "sem", "category",
                "scalar_label", "scalar_class", "classification")
"""Field names read as the per-point label, first match wins (case-insensitive)."""
INSTANCE_FIELDS = ("instance", "instances", "instance_id", "instance_label", "object_id", "objectid", "inst",
                   "scalar_instance")
"""Field names read as the per-point instance id."""
INTENSITY_FIELDS = ("intensity", "scalar_intensity", "reflectance", "remission", "i")
COLOUR_FIELDS = (("red", "green", "blue"), ("r", "g", "b"), ("diffuse_red", "diffuse_green", "diffuse_blue"))
XYZ_KEYS = ("xyz", "points", "positions", "coord", "coords", "vertices", "pos", "point", "pc")
RGB_KEYS = ("rgb", "colors", "colours", "color", "colour")
FACE_KEYS = ("faces", "triangles", "face", "tris")
COLUMN_NAMES = ("x", "y", "z", "r", "g", "b", "intensity", "label", "instance", "nx", "ny", "nz", "_")
"""Names `columns` may use (`_` skips a column; `red green blue` are accepted for `r g b`)."""
_DEFAULT_COLUMNS = {3: "x y z", 4: "x y z intensity", 6: "x y z r g b", 7: "x y z r g b label",
                    8: "x y z r g b label instance"}
_PTS_COLUMNS = {4: "x y z intensity", 7: "x y z intensity r g b"}


@dataclass(frozen=True)
class FilesReaderConfig:
    """How plain scan files are read (`ingest.reader.*`, e.g. `reader.up_axis=y reader.units=mm`)."""

    classes: str = "scannet"
    """The store's class list: a dataset with a class list in `data_manifests/` (scannet,
    scannet200, s3dis, semantickitti, synthetic) or a file of class names (one a line, or a
    `classes.csv` with `train_index,name`). A run trained on that dataset predicts in its space."""
    label_map: str = ""
    """How raw labels become classes. Empty: the labels are already class ids 0..C-1 of `classes`
    (other values are ignored, counted). `dataset`: the raw ids of the `classes` dataset's own
    release (NYU40 ids for scannet, raw SemanticKITTI ids, ...). Else a file: CSV with a
    `raw,class` header (an empty class ignores that label) or a YAML mapping raw -> class name."""
    ignore_labels: tuple[int, ...] = (-1,)
    """Raw labels meaning "unlabelled" (not counted as lost)."""
    up_axis: Literal["x", "y", "z", "-x", "-y", "-z"] = "z"
    """The scan's up axis; turned onto +z (meshes from graphics tools are often y-up)."""
    units: str = "m"
    """Length unit of the coordinates: m, dm, cm, mm, km, in, ft, yd, or metres per unit as a number."""
    columns: str = ""
    """Meaning of the columns of text files, unstructured `.npy` arrays and `.bin` records, e.g.
    `x y z r g b label` (names: x y z r g b intensity label instance nx ny nz, `_` skips one);
    empty: chosen by the column count (see the module docstring), said in a warning."""
    kind: Literal["auto", "mesh", "points", "lidar"] = "auto"
    """auto: a file with faces is a mesh, else a point cloud; lidar: seen from `sensor_origin`."""
    sensor_origin: tuple[float, float, float] | Literal["auto"] = (0.0, 0.0, 0.0)
    """Where the LiDAR was (kind lidar), in the file's frame and units; `auto`: estimated from the
    sweep (:func:`estimate_sensor_origin`), for a sweep saved in a map frame."""
    label_field: str = ""
    """Name of the field holding labels (empty: the first of `LABEL_FIELDS` present)."""
    instance_field: str = ""
    """Name of the field holding instance ids (empty: the first of `INSTANCE_FIELDS` present)."""
    intensity_as_colour: bool = True
    """Scans with intensity but no colour are shown grey by intensity (as SemanticKITTI is)."""


@dataclass
class Scan:
    """One scan file in the project's conventions (what :func:`load_scan` returns)."""

    xyz: np.ndarray
    """float32 [N, 3] metres, z up."""
    rgb: np.ndarray
    """uint8 [N, 3]; grey by intensity, or :data:`GREY`, when the file has no colour."""
    label: np.ndarray | None
    """int64 [N] raw labels as the file holds them, None without labels."""
    instance: np.ndarray | None
    """int64 [N] instance ids (-1 none), None without."""
    faces: np.ndarray | None
    """int32 [F, 3] triangles, None for a point cloud."""
    kind: Literal["mesh", "points", "lidar"]
    sensor_origin: np.ndarray | None = None
    """float32 [3] the LiDAR's position (kind lidar), metres, z up."""
    colour: Literal["rgb", "intensity", "none"] = "rgb"
    """Where `rgb` came from."""
    warnings: list[str] = field(default_factory=list)


# --- scene ids and listing --------------------------------------------------------------------


def scene_id_of(relative: str | Path) -> str:
    """A file's path relative to the raw folder -> a safe scene id (`a/b c.ply` -> `a__b_c`)."""
    parts = list(Path(relative).with_suffix("").parts)
    safe = [re.sub(r"[^A-Za-z0-9_.-]+", "_", p).strip("._") or "x" for p in parts]
    return check_scene_id("__".join(safe))


def is_scan_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in EXTENSIONS and not path.name.startswith(".")


def scan_files(raw_dir: str | Path) -> dict[str, Path]:
    """Scene id -> file of every scan under `raw_dir` (recursively), sorted by id.

    Two files with the same path stem (`a.ply`, `a.npy`) get their extension appended to the id.

    Raises:
        UserError: the folder does not exist or holds no scan file.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise UserError(f"{raw_dir}: no such folder (expected a folder of scan files)")
    paths = sorted(p for p in raw_dir.rglob("*") if is_scan_file(p)
                   and not any(part.startswith(".") for part in p.relative_to(raw_dir).parts))
    sidecars = {side for p in paths for side in [label_sidecar(p)] if side is not None}
    paths = [p for p in paths if p not in sidecars]
    if not paths:
        raise UserError(f"{raw_dir}: no scan file ({', '.join(EXTENSIONS)}) in it or below it")
    stems: dict[str, list[Path]] = {}
    for path in paths:
        stems.setdefault(scene_id_of(path.relative_to(raw_dir)), []).append(path)
    out: dict[str, Path] = {}
    for scene_id, group in stems.items():
        for path in group:
            name = scene_id if len(group) == 1 else check_scene_id(f"{scene_id}_{path.suffix.lower().lstrip('.')}")
            out[name] = path
    return dict(sorted(out.items()))


@functools.lru_cache(maxsize=4)
def _cached_scan_files(raw_dir: str) -> dict[str, Path]:
    """:func:`scan_files` listed once per process (a scene read does not walk the folder again)."""
    return scan_files(raw_dir)


def list_scenes(raw_dir: Path, cfg: FilesReaderConfig | None = None) -> list[str]:
    """Scene ids of every scan file under `raw_dir`, sorted."""
    return list(scan_files(raw_dir))


def folder_splits(scene_ids: list[str]) -> dict[str, tuple[str, ...]]:
    """Splits named by the top folder of the scans (`train/`, `val/`, `test/`), only those present."""
    out: dict[str, list[str]] = {}
    for scene_id in scene_ids:
        top = scene_id.split("__", 1)[0].lower()
        if "__" in scene_id and top in SPLIT_FOLDERS:
            out.setdefault(top, []).append(scene_id)
    return {name: tuple(ids) for name, ids in out.items()}


# --- class list and label map -----------------------------------------------------------------


def class_names_of(cfg: FilesReaderConfig) -> tuple[str, ...]:
    """The store's class names from `cfg.classes` (a dataset's class list or a file).

    Raises:
        UserError naming the file or the datasets known.
    """
    return _class_names(cfg.classes)


@functools.lru_cache(maxsize=16)
def _class_names(spec: str) -> tuple[str, ...]:
    path = Path(spec)
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return manifests.read_classes(str(path.parent)) if path.name == "classes.csv" else _csv_names(path)
        names = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
        names = [n for n in names if n]
        if not names or len(set(names)) != len(names):
            raise UserError(f"{path}: expected class names, one a line, without duplicates")
        return tuple(names)
    folder = manifests.DEFAULT_ROOT / spec
    if re.fullmatch(r"[a-z0-9_]+", spec) and (folder / "classes.csv").is_file():
        return manifests.read_classes(str(folder))
    known = sorted(p.name for p in manifests.DEFAULT_ROOT.iterdir() if (p / "classes.csv").is_file())
    raise UserError(f"reader.classes={spec!r}: neither a file nor a dataset with a class list ({', '.join(known)})")


def _csv_names(path: Path) -> tuple[str, ...]:
    rows = manifests.read_csv(path, ("name",))
    names = tuple(row["name"] for _, row in rows)
    if not names or len(set(names)) != len(names):
        raise UserError(f"{path}: expected a 'name' column of distinct class names")
    return names


def label_lookup(cfg: FilesReaderConfig) -> dict[Any, int] | None:
    """Raw label -> class id (or IGNORE_INDEX) from `cfg.label_map`; None: labels are class ids.

    Raises:
        UserError naming the label-map file and line.
    """
    return _label_lookup(cfg.label_map, cfg.classes)


@functools.lru_cache(maxsize=16)
def _label_lookup(spec: str, classes: str) -> dict[Any, int] | None:
    names = _class_names(classes)
    index = {n: i for i, n in enumerate(names)}
    if not spec:
        return None
    if spec == "dataset":
        from pipeline.datasets import load_label_map  # the registry imports this module

        if Path(classes).is_file():
            raise UserError("reader.label_map=dataset needs reader.classes to name a dataset, not a file")
        try:
            return dict(load_label_map(classes))
        except manifests.ManifestError as exc:
            raise UserError(f"reader.label_map=dataset: {exc}") from None
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"reader.label_map={spec!r}: no such file (or 'dataset', or empty for class ids)")
    pairs: list[tuple[Any, str]] = []
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            mapping = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(mapping, dict):
            raise UserError(f"{path}: expected a mapping raw label -> class name")
        pairs = [(k, "" if v is None else str(v)) for k, v in mapping.items()]
        lines = [0] * len(pairs)
    else:
        rows = manifests.read_csv(path, ("raw", "class"))
        pairs = [(row["raw"], row["class"]) for _, row in rows]
        lines = [line for line, _ in rows]
    out: dict[Any, int] = {}
    for (raw, name), line in zip(pairs, lines):
        if name and name not in index:
            raise UserError(f"{path}{f':{line}' if line else ''}: unknown class {name!r}; the class list "
                            f"{classes!r} has {list(names)[:6]}...")
        key = _as_label_key(raw)
        out[key] = index[name] if name else IGNORE_INDEX
    return out


def _as_label_key(raw: Any) -> Any:
    text = str(raw).strip()
    try:
        value = float(text)
        return int(value) if value.is_integer() else text
    except ValueError:
        return text


def map_labels(raw: np.ndarray, lookup: dict[Any, int] | None, n_classes: int,
               ignore: tuple[int, ...]) -> tuple[np.ndarray, dict[str, Any]]:
    """Raw labels [N] -> int16 class ids (IGNORE_INDEX where unlabelled, unknown or ignored).

    Returns:
        (semantic, stats): stats count `unlabelled` (raw in `ignore`), `lost` (labels the map or
        the class range does not know) and list the most common lost raw values.
    """
    raw = np.asarray(raw).reshape(-1).astype(np.int64)
    ignored = np.isin(raw, np.asarray(ignore, np.int64))
    if lookup is None:
        known = (raw >= 0) & (raw < n_classes)
        semantic = np.where(known & ~ignored, raw, IGNORE_INDEX)
    else:
        keys = np.array([k for k in lookup if isinstance(k, (int, np.integer))], np.int64)
        values = np.array([lookup[int(k)] for k in keys], np.int64)
        order = np.argsort(keys)
        keys, values = keys[order], values[order]
        pos = np.clip(np.searchsorted(keys, raw), 0, max(len(keys) - 1, 0))
        known = (keys[pos] == raw) if len(keys) else np.zeros(len(raw), bool)
        semantic = np.where(known & ~ignored, values[pos] if len(keys) else IGNORE_INDEX, IGNORE_INDEX)
    lost_mask = ~known & ~ignored
    lost_values, lost_counts = np.unique(raw[lost_mask], return_counts=True)
    top = np.argsort(-lost_counts)[:8]
    stats = {"unlabelled": int(ignored.sum()), "lost": int(lost_mask.sum()),
             "lost_values": {int(lost_values[i]): int(lost_counts[i]) for i in top},
             "labelled_raw": int((~ignored).sum()), "max_raw": int(raw.max(initial=-1))}
    return semantic.astype(np.int16), stats


# --- reading one file -------------------------------------------------------------------------


def _field(names: tuple[str, ...] | list[str], wanted: str, candidates: tuple[str, ...]) -> str | None:
    lower = {n.lower(): n for n in names}
    if wanted:
        return lower.get(wanted.lower())
    return next((lower[c] for c in candidates if c in lower), None)


def colour_u8(values: np.ndarray) -> np.ndarray:
    """Colours of any common encoding -> uint8: 8-bit as is, 16-bit scaled, floats in 0..1 scaled."""
    values = np.asarray(values)
    if values.dtype == np.uint8:
        return values
    v = values.astype(np.float64)
    top = float(np.nanmax(v)) if v.size else 0.0
    if np.issubdtype(values.dtype, np.floating) and top <= 1.0:
        v = v * 255.0
    elif top > 255.0:
        v = v / 257.0  # 16-bit colour (LAS, some PLYs)
    return np.clip(np.rint(np.nan_to_num(v)), 0, 255).astype(np.uint8)


def _integral(values: np.ndarray, what: str, path: Path) -> np.ndarray:
    values = np.asarray(values).reshape(-1)
    if np.issubdtype(values.dtype, np.integer):
        return values.astype(np.int64)
    if not np.isfinite(values).all() or not np.all(np.mod(values, 1) == 0):
        raise SceneError("-", path, f"{what} values are not integers")
    return values.astype(np.int64)


@dataclass
class _Fields:
    """What a reader found, before conventions (units, axes, colour, labels) are applied."""

    xyz: np.ndarray
    rgb: np.ndarray | None = None
    intensity: np.ndarray | None = None
    label: np.ndarray | None = None
    instance: np.ndarray | None = None
    faces: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)


def _from_named(names: list[str], get: Any, cfg: FilesReaderConfig, path: Path) -> _Fields:
    """Fields from a record of named per-point arrays (PLY vertices, structured npy, npz, PCD, LAS)."""
    lower = {n.lower(): n for n in names}
    xyz_names = [lower.get(a) for a in ("x", "y", "z")]
    if None in xyz_names:
        raise SceneError("-", path, f"no x, y, z fields (has: {', '.join(names)})")
    columns = [np.asarray(get(n)) for n in xyz_names]
    # float32 stays float32 (a scan's own precision); anything else (float64 LAS coordinates far
    # from the origin, integers) is read as float64 and rounded once, after its shift to metres
    dtype = np.float32 if all(c.dtype == np.float32 for c in columns) else np.float64
    xyz = np.empty((len(columns[0]), 3), dtype)
    for d, column in enumerate(columns):
        xyz[:, d] = column
    out = _Fields(xyz)
    for triple in COLOUR_FIELDS:
        found = [lower.get(c) for c in triple]
        if None not in found:
            out.rgb = colour_u8(np.stack([np.asarray(get(n)) for n in found], axis=1))
            break
    name = _field(names, "", INTENSITY_FIELDS)
    if name is not None:
        out.intensity = np.asarray(get(name), np.float64).reshape(-1)
    name = _field(names, cfg.label_field, LABEL_FIELDS)
    if cfg.label_field and name is None:
        raise SceneError("-", path, f"reader.label_field={cfg.label_field!r}: no such field (has: {', '.join(names)})")
    if name is not None:
        out.label = _integral(get(name), f"label field {name!r}", path)
    name = _field(names, cfg.instance_field, INSTANCE_FIELDS)
    if cfg.instance_field and name is None:
        raise SceneError("-", path, f"reader.instance_field={cfg.instance_field!r}: no such field (has: {', '.join(names)})")
    if name is not None:
        out.instance = _integral(get(name), f"instance field {name!r}", path)
    return out


def _read_ply(path: Path, cfg: FilesReaderConfig) -> _Fields:
    from plyfile import PlyData

    try:
        try:  # fast path: triangles declared with a fixed list length
            ply = PlyData.read(str(path), known_list_len={"face": {"vertex_indices": 3}})
        except Exception:  # polygons, another list name, or no faces: read generically
            ply = PlyData.read(str(path))
        vertex = ply["vertex"].data
    except KeyError:
        raise SceneError("-", path, "PLY has no 'vertex' element") from None
    except Exception as exc:  # plyfile raises its own parse errors, struct and value errors on garbage
        raise SceneError("-", path, f"unreadable PLY (truncated or garbled?): {type(exc).__name__}: {exc}") from None
    names = list(vertex.dtype.names or ())
    out = _from_named(names, lambda n: vertex[n], cfg, path)
    if "face" in ply and len(ply["face"].data):
        face = ply["face"].data
        key = next((k for k in ("vertex_indices", "vertex_index") if k in (face.dtype.names or ())), None)
        if key is None:
            raise SceneError("-", path, f"face element without vertex_indices (has: {face.dtype.names})")
        out.faces = _triangulate(face[key], path)
    return out


def _triangulate(indices: np.ndarray, path: Path) -> np.ndarray:
    """Faces as triangles: fixed-length rows as they are, polygons fanned (a loop over faces only
    when polygons of several sizes are mixed, grouped by size)."""
    if indices.dtype != object:
        arr = np.asarray(indices, np.int64)
    else:
        sizes = np.fromiter((len(f) for f in indices), np.int64, len(indices))
        if (sizes == 3).all():
            arr = np.vstack(indices).astype(np.int64)
        else:
            tris = []
            for k in np.unique(sizes):
                if k < 3:
                    continue
                poly = np.vstack(indices[sizes == k]).astype(np.int64)
                tris += [poly[:, [0, j, j + 1]] for j in range(1, k - 1)]
            arr = np.concatenate(tris) if tris else np.zeros((0, 3), np.int64)
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise SceneError("-", path, f"faces must have 3 or more vertices, got shape {arr.shape}")
    if arr.shape[1] > 3:
        arr = np.concatenate([arr[:, [0, j, j + 1]] for j in range(1, arr.shape[1] - 1)])
    return arr.astype(np.int32)


def _pcd_declared_points(head: bytes, path: Path) -> int:
    """The point count a PCD header declares (POINTS, else WIDTH x HEIGHT). Checked before Open3D
    reads the file: without it Open3D's reader returns points of uninitialised memory."""
    values: dict[str, str] = {}
    for line in head.split(b"\n"):
        parts = line.decode("ascii", "replace").split()
        if parts and not parts[0].startswith("#"):
            values[parts[0].upper()] = " ".join(parts[1:])
            if parts[0].upper() == "DATA":
                break
    try:
        if "POINTS" in values:
            declared = int(values["POINTS"])
        else:
            declared = int(values["WIDTH"]) * int(values["HEIGHT"])
    except (KeyError, ValueError):
        raise SceneError("-", path, "not a readable PCD header: no POINTS (or WIDTH and HEIGHT) count") from None
    if declared <= 0:
        raise SceneError("-", path, f"PCD header declares {declared} points")
    return declared


def _pcd_check_length(path: Path, declared: int) -> None:
    """Refuse a PCD whose data is shorter than its header's count (Open3D fills the missing points
    with uninitialised memory): ascii counts its data lines, binary its bytes."""
    data = path.read_bytes()
    at = data.find(b"\nDATA")
    end = data.find(b"\n", at + 1)
    if at < 0 or end < 0:
        raise SceneError("-", path, "unreadable PCD (truncated or garbled?): no data after the header")
    header = {}
    for line in data[:end].split(b"\n"):
        parts = line.decode("ascii", "replace").split()
        if parts and not parts[0].startswith("#"):
            header[parts[0].upper()] = parts[1:]
    kind = (header.get("DATA") or [""])[0].lower()
    body = data[end + 1:]
    if kind == "ascii":
        found = sum(1 for line in body.split(b"\n") if line.strip() and not line.lstrip().startswith(b"#"))
    elif kind == "binary":
        try:
            sizes = [int(v) for v in header["SIZE"]]
            counts = [int(v) for v in header.get("COUNT", ["1"] * len(sizes))]
            found = len(body) // max(1, sum(a * b for a, b in zip(sizes, counts)))
        except (KeyError, ValueError):
            raise SceneError("-", path, "not a readable PCD header: no SIZE/COUNT for binary data") from None
    else:  # binary_compressed: Open3D checks its own sizes
        return
    if found < declared:
        raise SceneError("-", path, f"unreadable PCD (truncated?): {found} points in the file, the header says {declared}")


def _read_pcd(path: Path, cfg: FilesReaderConfig) -> _Fields:
    import open3d as o3d

    head = path.read_bytes()[:4096]
    if b"DATA" not in head or b"FIELDS" not in head:
        raise SceneError("-", path, "not a PCD file (no FIELDS/DATA header)")
    declared = _pcd_declared_points(head, path)
    _pcd_check_length(path, declared)
    o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)
    cloud = o3d.t.io.read_point_cloud(str(path))
    point = cloud.point
    if "positions" not in point or len(point["positions"]) == 0:
        raise SceneError("-", path, "unreadable PCD (truncated or garbled?): no points read")
    if len(point["positions"]) != declared:
        raise SceneError("-", path, f"unreadable PCD (truncated or garbled?): {len(point['positions'])} points "
                                    f"read, the header says {declared}")
    arrays = {key: point[key].numpy() for key in point}
    arrays = {k: (v[:, 0] if v.ndim == 2 and v.shape[1] == 1 else v) for k, v in arrays.items()}
    xyz = arrays.pop("positions")
    named: dict[str, np.ndarray] = {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2]}
    if "colors" in arrays:
        colours = arrays.pop("colors")
        named.update(red=colours[:, 0], green=colours[:, 1], blue=colours[:, 2])
    named.update({k: v for k, v in arrays.items() if v.ndim == 1})
    return _from_named(list(named), named.__getitem__, cfg, path)


def _columns(cfg: FilesReaderConfig, n_columns: int, path: Path, warnings: list[str]) -> list[str]:
    text = cfg.columns
    if not text:
        table = _PTS_COLUMNS if path.suffix.lower() == ".pts" and n_columns in _PTS_COLUMNS else _DEFAULT_COLUMNS
        if n_columns not in table:
            raise SceneError("-", path, f"{n_columns} columns: say what they are with reader.columns='x y z ...'")
        text = table[n_columns]
        if n_columns > 3:
            warnings.append(tag("columns-guessed", f"{n_columns} columns read as '{text}' (set reader.columns otherwise)"))
    names = [{"red": "r", "green": "g", "blue": "b"}.get(n, n) for n in re.split(r"[\s,]+", text.strip().lower())]
    unknown = [n for n in names if n not in COLUMN_NAMES]
    if unknown:
        raise UserError(f"reader.columns={cfg.columns!r}: unknown column name(s) {unknown}; use {' '.join(COLUMN_NAMES)}")
    if not {"x", "y", "z"} <= set(names):
        raise UserError(f"reader.columns={cfg.columns!r}: needs x, y and z")
    if len(names) != n_columns:
        raise SceneError("-", path, f"reader.columns names {len(names)} columns but the file has {n_columns}")
    return names


def _from_columns(values: np.ndarray, cfg: FilesReaderConfig, path: Path) -> _Fields:
    warnings: list[str] = []
    names = _columns(cfg, values.shape[1], path, warnings)
    col = {n: values[:, i] for i, n in enumerate(names) if n != "_"}
    dtype = np.float32 if values.dtype == np.float32 else np.float64
    out = _Fields(np.stack([col["x"], col["y"], col["z"]], axis=1).astype(dtype), warnings=warnings)
    if {"r", "g", "b"} <= set(col):
        out.rgb = colour_u8(np.stack([col["r"], col["g"], col["b"]], axis=1))
    if "intensity" in col:
        out.intensity = np.asarray(col["intensity"], np.float64)
    if "label" in col:
        out.label = _integral(col["label"], "label column", path)
    if "instance" in col:
        out.instance = _integral(col["instance"], "instance column", path)
    return out


def label_sidecar(path: Path) -> Path | None:
    """The file holding the labels of a `.npy` scan kept apart, where there is one: `X_points.npy`
    -> `X_labels.npy`, or `points/X.npy` -> `labels/X.npy` (Open3D-ML's demo layout)."""
    if path.suffix.lower() != ".npy":
        return None
    candidates = []
    if path.stem.endswith("_points"):
        candidates.append(path.with_name(path.stem[: -len("_points")] + "_labels.npy"))
    if path.parent.name == "points":
        candidates.append(path.parent.parent / "labels" / path.name)
    return next((c for c in candidates if c.is_file()), None)


def _read_npy(path: Path, cfg: FilesReaderConfig) -> _Fields:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise SceneError("-", path, f"unreadable .npy (truncated, or pickled objects?): {exc}") from None
    out = _from_array(array, cfg, path)
    side = label_sidecar(path)
    if side is not None and out.label is None:
        try:
            labels = np.load(side, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise SceneError("-", side, f"unreadable labels .npy: {exc}") from None
        if labels.ndim > 2 or (labels.ndim == 2 and labels.shape[1] != 1) or len(labels) != len(out.xyz):
            raise SceneError("-", side, f"labels of shape {labels.shape} for {len(out.xyz)} points (expected [N] or [N, 1])")
        out.label = _integral(labels.reshape(-1), "labels", side)
    return out


def _from_array(array: np.ndarray, cfg: FilesReaderConfig, path: Path) -> _Fields:
    if array.dtype.names:
        return _from_named(list(array.dtype.names), lambda n: array[n], cfg, path)
    if array.ndim != 2 or array.shape[1] < 3 or not np.issubdtype(array.dtype, np.number):
        raise SceneError("-", path, f"expected a numeric [N, 3+] array or named fields, got {array.dtype} {array.shape}")
    return _from_columns(array, cfg, path)


def _read_npz(path: Path, cfg: FilesReaderConfig) -> _Fields:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError, KeyError) as exc:
        raise SceneError("-", path, f"unreadable .npz: {exc}") from None
    lower = {k.lower(): k for k in arrays}
    key = next((lower[k] for k in XYZ_KEYS if k in lower), None)
    if key is None:
        if len(arrays) == 1:
            return _from_array(next(iter(arrays.values())), cfg, path)
        raise SceneError("-", path, f"no point array among {sorted(arrays)} (expected one of {', '.join(XYZ_KEYS)})")
    points = arrays[key]
    if points.ndim != 2 or points.shape[1] < 3:
        raise SceneError("-", path, f"{key!r} must be [N, 3+], got {points.shape}")
    out = _from_columns(points, cfg, path) if points.shape[1] > 3 and cfg.columns else \
        _Fields(points[:, :3].astype(np.float32 if points.dtype == np.float32 else np.float64))
    n = len(points)

    def per_point(keys: tuple[str, ...], what: str, wanted: str = "") -> np.ndarray | None:
        name = lower.get(wanted.lower()) if wanted else next((lower[k] for k in keys if k in lower), None)
        if wanted and name is None:
            raise SceneError("-", path, f"reader.{what}_field={wanted!r}: no such array (has: {sorted(arrays)})")
        if name is None:
            return None
        value = arrays[name]
        if len(value) != n:
            raise SceneError("-", path, f"{name!r} has {len(value)} rows for {n} points (count mismatch)")
        return value

    rgb = per_point(RGB_KEYS, "rgb")
    if rgb is not None:
        out.rgb = colour_u8(np.asarray(rgb).reshape(n, -1)[:, :3])
    intensity = per_point(INTENSITY_FIELDS, "intensity")
    if intensity is not None:
        out.intensity = np.asarray(intensity, np.float64).reshape(-1)
    label = per_point(LABEL_FIELDS, "label", cfg.label_field)
    if label is not None:
        out.label = _integral(label, "labels", path)
    instance = per_point(INSTANCE_FIELDS, "instance", cfg.instance_field)
    if instance is not None:
        out.instance = _integral(instance, "instances", path)
    face_key = next((lower[k] for k in FACE_KEYS if k in lower), None)
    if face_key is not None and len(arrays[face_key]):
        out.faces = _triangulate(np.asarray(arrays[face_key]), path)
    return out


def _read_las(path: Path, cfg: FilesReaderConfig) -> _Fields:
    try:
        import laspy
    except ImportError:
        raise UserError(f"{path}: reading LAS/LAZ needs laspy: pip install 'laspy[lazrs]'") from None
    try:
        las = laspy.read(str(path))
    except Exception as exc:  # laspy raises LaspyException, ValueError, OSError on damaged files
        raise SceneError("-", path, f"unreadable LAS/LAZ: {type(exc).__name__}: {exc}") from None
    dims = set(las.point_format.dimension_names)
    named: dict[str, np.ndarray] = {"x": np.asarray(las.x), "y": np.asarray(las.y), "z": np.asarray(las.z)}
    if {"red", "green", "blue"} <= dims:
        named.update(red=np.asarray(las.red), green=np.asarray(las.green), blue=np.asarray(las.blue))
    if "intensity" in dims:
        named["intensity"] = np.asarray(las.intensity)
    if "classification" in dims:
        named["classification"] = np.asarray(las.classification)
    for extra in las.point_format.extra_dimension_names:
        named[extra] = np.asarray(las[extra])
    return _from_named(list(named), named.__getitem__, cfg, path)


def _read_text(path: Path, cfg: FilesReaderConfig) -> _Fields:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SceneError("-", path, f"cannot read: {exc}") from None
    lines = data.lstrip().split(b"\n", 1)
    first = lines[0].strip()
    if re.fullmatch(rb"\d+", first) and len(lines) > 1:  # a point-count line (.pts)
        data = lines[1]
    sample = data[:4096]
    delimiter = "," if sample.count(b",") > sample.count(b"\n") else None
    try:
        import io

        values = np.loadtxt(io.BytesIO(data), dtype=np.float64, comments="#", delimiter=delimiter, ndmin=2)
    except ValueError as exc:
        raise SceneError("-", path, f"not numeric columns: {exc}") from None
    if values.shape[0] == 0:
        raise SceneError("-", path, "no points")
    return _from_columns(values, cfg, path)


def _read_bin(path: Path, cfg: FilesReaderConfig) -> _Fields:
    raw = np.fromfile(path, dtype=np.float32)
    columns = len(re.split(r"[\s,]+", cfg.columns.strip())) if cfg.columns else 4
    if raw.size % columns:
        hint = " (12 bytes a point: an x y z-only file? set reader.columns='x y z')" if raw.size % 3 == 0 else ""
        raise SceneError("-", path, f"{raw.size * 4} bytes is not a whole number of {columns}-float records{hint}")
    if not cfg.columns and looks_like_xyz_records(raw, columns):
        raise SceneError("-", path, "the file holds x y z records (12 bytes a point), not x y z intensity: "
                         "set reader.columns='x y z'")
    values = raw.reshape(-1, columns).astype(np.float64)
    if not cfg.columns:
        cfg = _with_columns(cfg, "x y z intensity")
    return _from_columns(values, cfg, path)


def _with_columns(cfg: FilesReaderConfig, columns: str) -> FilesReaderConfig:
    import dataclasses

    return dataclasses.replace(cfg, columns=columns)


_READERS = {".ply": _read_ply, ".pcd": _read_pcd, ".npy": _read_npy, ".npz": _read_npz, ".las": _read_las,
            ".laz": _read_las, ".txt": _read_text, ".xyz": _read_text, ".pts": _read_text, ".bin": _read_bin}


def _up_rotation(up: str) -> np.ndarray:
    """A proper rotation taking the `up` axis onto +z."""
    table = {
        "z": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        "-z": [[1, 0, 0], [0, -1, 0], [0, 0, -1]],
        "y": [[1, 0, 0], [0, 0, -1], [0, 1, 0]],
        "-y": [[1, 0, 0], [0, 0, 1], [0, -1, 0]],
        "x": [[0, 0, -1], [0, 1, 0], [1, 0, 0]],
        "-x": [[0, 0, 1], [0, 1, 0], [-1, 0, 0]],
    }
    return np.asarray(table[up], np.float64)


def metres_per_unit(units: str) -> float:
    """`units` -> metres per unit (a name of :data:`UNITS_M` or a positive number)."""
    if units in UNITS_M:
        return UNITS_M[units]
    try:
        value = float(units)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"reader.units={units!r}: expected one of {', '.join(UNITS_M)} or metres per unit (> 0)")
    return value


def load_scan(path: str | Path, cfg: FilesReaderConfig = FilesReaderConfig()) -> Scan:
    """Read one scan file into the project's conventions (metres, z up, uint8 colour).

    Raises:
        SceneError naming the file (scene "-") when it is unreadable, malformed or empty;
        UserError for an option that cannot apply (unknown column names, units).
    """
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"{path}: not a scan file ({', '.join(EXTENSIONS)})")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    fields = reader(path, cfg)
    n = len(fields.xyz)
    if n == 0:
        raise SceneError("-", path, "no points")
    for name in ("rgb", "intensity", "label", "instance"):
        value = getattr(fields, name)
        if value is not None and len(value) != n:
            raise SceneError("-", path, f"{name} has {len(value)} rows for {n} points (count mismatch)")
    if not np.isfinite(fields.xyz).all():
        bad = int((~np.isfinite(fields.xyz).all(axis=1)).sum())
        raise SceneError("-", path, f"{bad} points have NaN or infinite coordinates")
    if fields.faces is not None and len(fields.faces) and (fields.faces.min() < 0 or fields.faces.max() >= n):
        raise SceneError("-", path, "faces index vertices out of range")
    scale = metres_per_unit(cfg.units)
    rotation = _up_rotation(cfg.up_axis) * scale
    if cfg.up_axis == "z" and scale == 1.0:  # the common case: no arithmetic on every point
        xyz = np.ascontiguousarray(fields.xyz, np.float32)
    else:
        xyz = (fields.xyz.astype(np.float64) @ rotation.T).astype(np.float32)
    warnings = list(fields.warnings)
    faces = fields.faces if fields.faces is not None and len(fields.faces) else None
    kind: Literal["mesh", "points", "lidar"]
    if cfg.kind == "auto":
        kind = "mesh" if faces is not None else "points"
    elif cfg.kind == "mesh" and faces is None:
        raise SceneError("-", path, "reader.kind=mesh but the file has no faces")
    else:
        kind = cfg.kind
    if kind != "mesh":
        faces = None
    colour: Literal["rgb", "intensity", "none"] = "rgb"
    if fields.rgb is not None:
        rgb = fields.rgb
    elif fields.intensity is not None and cfg.intensity_as_colour:
        rgb = np.repeat(_intensity_grey(fields.intensity)[:, None], 3, axis=1)
        colour = "intensity"
        if not rgb.any():
            warnings.append(tag("no-colour", "intensity is 0 everywhere and there is no colour: rendered views "
                                             "are black (CLIP sees nothing)"))
    else:
        rgb = np.full((n, 3), GREY, np.uint8)
        colour = "none"
        warnings.append(tag("no-colour", "no colour and no intensity: points are grey, rendered views show shapes only"))
    origin = None
    if kind == "lidar" and cfg.sensor_origin == "auto":
        origin = estimate_sensor_origin(xyz)
        warnings.append(tag("sensor-estimated", f"sensor placed at {[round(float(v), 2) for v in origin]} (where the sweep "
                                                f"is densest, {SENSOR_HEIGHT_M} m above its ground)"))
    elif kind == "lidar":
        origin = (np.asarray(cfg.sensor_origin, np.float64) @ rotation.T).astype(np.float32)
    return Scan(xyz=xyz, rgb=np.ascontiguousarray(rgb, np.uint8), label=fields.label, instance=fields.instance,
                faces=None if faces is None else np.ascontiguousarray(faces, np.int32), kind=kind,
                sensor_origin=origin, colour=colour, warnings=warnings)


def _intensity_grey(intensity: np.ndarray) -> np.ndarray:
    """Intensity -> grey 0..255: values in 0..1 scaled by 255, 8-bit as they are, wider ranges by
    their 99th percentile (LAS stores 16-bit intensity)."""
    v = np.nan_to_num(np.asarray(intensity, np.float64))
    top = float(v.max(initial=0.0))
    if top > 255.0:
        v = v * (255.0 / max(float(np.percentile(v, 99)), 1e-9))
    elif top <= 1.0:
        v = v * 255.0
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


SENSOR_HEIGHT_M = 1.73
"""Height of a car-mounted LiDAR above the road (KITTI's Velodyne), for :func:`estimate_sensor_origin`."""


def estimate_sensor_origin(xyz: np.ndarray, *, cell_m: float = 1.0, radius_m: float = 12.0,
                           iterations: int = 20) -> np.ndarray:
    """Where a single LiDAR sweep was taken from. A sweep's density falls with the square of the
    distance to its sensor: start at the densest `cell_m` column, move to the mean of the points
    within `radius_m` until it stops (mean shift), and put the sensor :data:`SENSOR_HEIGHT_M` above
    the median height of the points within 10 m (mostly the road). On the real SemanticKITTI
    sample (its sensor at the origin) this lands 0.7 m from it in xy and 0.08 m in z. float32 [3],
    metres, z up."""
    xy = xyz[:, :2].astype(np.float64)
    lo = xy.min(axis=0)
    cell = max(cell_m, float(np.ptp(xy, axis=0).max()) / 4096.0)  # at most 4096 cells a side
    ij = np.floor((xy - lo) / cell).astype(np.int64)
    width = int(ij[:, 1].max()) + 1
    best = int(np.argmax(np.bincount(ij[:, 0] * width + ij[:, 1])))
    centre = xy[(ij[:, 0] == best // width) & (ij[:, 1] == best % width)].mean(axis=0)
    for _ in range(iterations):
        moved = xy[np.linalg.norm(xy - centre, axis=1) < radius_m].mean(axis=0)
        if np.linalg.norm(moved - centre) < 1e-3:
            break
        centre = moved
    near = np.linalg.norm(xy - centre, axis=1) < 10.0  # the road dominates a car's near field
    ground = float(np.median(xyz[near, 2])) if near.any() else float(np.percentile(xyz[:, 2], 2))
    return np.array([centre[0], centre[1], ground + SENSOR_HEIGHT_M], np.float32)


def sensor_far_warning(xyz: np.ndarray, origin: np.ndarray) -> str | None:
    """A warning when a LiDAR sweep does not surround its sensor (e.g. a sweep saved in a map
    frame with the sensor assumed at the origin: the cameras then look at nothing): the sensor is
    farther from the cloud's nearest points than the cloud is wide around its median."""
    d = np.linalg.norm(xyz.astype(np.float64) - origin, axis=1)
    near = float(np.percentile(d, 1))
    spread = float(np.percentile(np.linalg.norm(xyz - np.median(xyz, axis=0), axis=1), 50))
    if near > max(5.0, spread):
        return tag("sensor-frame", f"the sensor at {[round(float(v), 2) for v in origin]} is {near:.1f} m from the nearest "
                                   "1% of the points: a sweep in a map frame? set reader.sensor_origin=[x,y,z] or "
                                   "reader.sensor_origin=auto (views from the sensor would see little)")
    return None


def read_scene(raw_dir: str | Path, scene_id: str, *, cfg: FilesReaderConfig = FilesReaderConfig()) -> RawScene:
    """Read one scan file of the raw folder into a RawScene (classes of `cfg.classes`)."""
    path = _cached_scan_files(str(Path(raw_dir).resolve())).get(scene_id)
    if path is None or not path.is_file():  # the folder changed since it was listed: list it again
        _cached_scan_files.cache_clear()
        path = _cached_scan_files(str(Path(raw_dir).resolve())).get(scene_id)
    if path is None:
        raise SceneError(scene_id, Path(raw_dir), "no scan file with this scene id under the raw folder")
    try:
        scan = load_scan(path, cfg)
    except SceneError as exc:
        raise SceneError(scene_id, exc.file or path, exc.message) from None
    n = len(scan.xyz)
    warnings = list(scan.warnings)
    names = class_names_of(cfg)
    if scan.label is None:
        semantic = np.full(n, IGNORE_INDEX, np.int16)
        label_source = "none"
    else:
        semantic, stats = map_labels(scan.label, label_lookup(cfg), len(names), tuple(cfg.ignore_labels))
        label_source = "annotations" if (semantic != IGNORE_INDEX).any() else "none"
        if stats["lost"]:
            share = stats["lost"] / max(1, stats["labelled_raw"])
            what = ", ".join(f"{k} x{v}" for k, v in stats["lost_values"].items())
            hint = ""
            if share > 0.5 and cfg.label_map and stats["max_raw"] < len(names):
                hint = "; they look like class ids already: leave reader.label_map empty"
            elif share > 0.5 and not cfg.label_map:
                hint = "; raw ids? set reader.label_map (a raw,class file, or 'dataset')"
            kind = "labels-lost" if share > 0.5 else "labels-unknown"
            warnings.append(tag(kind, f"{stats['lost']} of {stats['labelled_raw']} labelled points "
                                      f"({100 * share:.0f}%) have labels outside the map (ignored): {what}{hint}"))
        if label_source == "none":
            warnings.append(tag("unlabelled", "no label maps to a class: the scan is unlabelled"))
    instance = np.full(n, -1, np.int32) if scan.instance is None else np.where(scan.instance >= 0, scan.instance, -1)
    if scan.kind == "lidar" and scan.sensor_origin is not None:
        far = sensor_far_warning(scan.xyz, scan.sensor_origin)
        if far:
            warnings.append(far)
    scene = RawScene(scene_id, scan.xyz, scan.rgb, semantic, instance.astype(np.int32), scan.kind, faces=scan.faces,
                     sensor_origin=scan.sensor_origin, source_files=[str(path)], warnings=warnings,
                     label_source=label_source)
    scene.validate()
    return scene


DATASET = Dataset(
    name="files", scene_id=re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"), reader_config=FilesReaderConfig,
    list_scenes=list_scenes, read_scene=read_scene, class_names=class_names_of, folder_splits=folder_splits,
)
"""Plain scan files of any layout; classes chosen by `reader.classes`."""
