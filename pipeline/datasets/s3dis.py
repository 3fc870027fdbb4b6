"""S3DIS: its reader (one room of the release -> `RawScene`, a coloured point cloud, z up, metres),
its rooms, areas and splits, and its label map.

Reads, under `raw_dir` (the release root, e.g. `Stanford3dDataset_v1.2_Aligned_Version/`):

    Area_<k>/<room>/Annotations/<class>_<i>.txt   "x y z r g b" per line, one file per instance
    Area_<k>/<room>/<room>.txt                    the whole room, same format (only counted)

Writes nothing. Scene ids are `Area_<k>_<room>` (e.g. `Area_1_office_2`, the form of PointNet's
`all_data_label.txt`): a plain name without `/`, so `Area_1/office_2` becomes `Area_1_office_2`.

The points are the concatenation of the Annotations files, in natural file order (`clutter_2`
before `clutter_10`), as the release is normally used (PointNet's `collect_point_label`,
mmdetection3d, Pointcept): every point then has a class and an instance. Semantics come from the
file's class name through `data_manifests/s3dis/label_map.csv` (13 classes; `stairs`, found in a
few rooms, maps to clutter as is common practice); an unknown class name is an error naming the
file. Each file is one instance (ids 0..K-1 in file order). The room's own `<room>.txt` is not
parsed; its line count is compared with the annotated points and a difference is a warning.

Some release files are damaged (`Area_5/hallway_6/Annotations/ceiling_1.txt` has a stray
non-numeric byte on line 180389): lines with a non-numeric character or the wrong number of
columns are skipped and reported in `RawScene.warnings` with file and line numbers.

Manifests (`data_manifests/s3dis/`): `classes.csv`, `label_map.csv` (annotation class name ->
class), `rooms.csv` (area, room) and `splits.yaml` (split -> areas: `train`/`val`, the 6 folds,
`area<k>`).
"""
from __future__ import annotations

import functools
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.datasets import manifests
from pipeline.datasets.base import Dataset, RawScene, read_raw, tag
from pipeline.datasets.manifests import ManifestError
from pipeline.errors import SceneError
from pipeline.schema import check_scene_id

CLASS_NAMES: tuple[str, ...] = manifests.read_classes(str(manifests.DEFAULT_ROOT / "s3dis"))
"""ceiling floor wall beam column window door table chair sofa bookcase board clutter."""

_SCENE_ID = re.compile(r"^(Area_\d+)_(.+)$")
_ANNOTATION_FILE = re.compile(r"^(.+)_(\d+)\.txt$")
_N_COLUMNS = 6

# Bytes a numeric line may hold: digits, sign, decimal point, exponent, whitespace.
_NUMERIC_BYTE = np.zeros(256, dtype=bool)
_NUMERIC_BYTE[list(b"0123456789+-.eE \t\r\n")] = True
_SPACE_BYTE = np.zeros(256, dtype=bool)
_SPACE_BYTE[list(b" \t\r\n")] = True


@dataclass(frozen=True)
class S3DISReaderConfig:
    """How S3DIS rooms are read."""

    check_room_file: bool = True
    """Count the lines of the room's own `<room>.txt` and warn when they differ from the annotated
    points (plus skipped lines). The file is read but not parsed; off saves that read."""
    max_skipped_lines: int = 100
    """More damaged lines than this in one room is an error, not a warning: such a room is
    more likely a wrong file than the release's known stray byte."""


def scene_id_of(area: str, room: str) -> str:
    """`("Area_1", "office_2") -> "Area_1_office_2"`."""
    return check_scene_id(f"{area}_{room}")


def split_scene_id(scene_id: str) -> tuple[str, str]:
    """`"Area_1_office_2" -> ("Area_1", "office_2")`; raises SceneError for another form."""
    match = _SCENE_ID.match(scene_id)
    if not match:
        raise SceneError(scene_id, None, "expected an S3DIS scene id 'Area_<k>_<room>', e.g. Area_1_office_2")
    return match.group(1), match.group(2)


def list_scenes(raw_dir: Path, cfg: S3DISReaderConfig | None = None) -> list[str]:
    """Scene ids of every room with an `Annotations/` folder under `raw_dir`, sorted."""
    raw_dir = Path(raw_dir)
    scenes = []
    for ann in sorted(raw_dir.glob("Area_*/*/Annotations")):
        if not ann.is_dir():
            continue
        room_dir = ann.parent
        try:
            scenes.append(scene_id_of(room_dir.parent.name, room_dir.name))
        except ValueError as exc:
            warnings.warn(f"{room_dir}: skipped, not a usable scene name ({exc})", stacklevel=2)
    return scenes


def parse_numeric_lines(data: bytes, n_columns: int = _N_COLUMNS) -> tuple[np.ndarray, np.ndarray]:
    """Parse whitespace-separated numbers, `n_columns` per line, skipping damaged lines.

    Fast path: NumPy's C parser on the whole text. Only when that fails, a vectorised scan marks
    lines holding a non-numeric byte or another number of columns, drops them and parses the rest.

    Args:
        data: the file's bytes.
        n_columns: numbers per line.
    Returns:
        (values float64 [M, n_columns], skipped line numbers int64 [S], 1-based). Blank lines are
        neither values nor skipped.
    Raises:
        ValueError: text that still does not parse after dropping damaged lines (e.g. "1.2.3").
    """
    if not data.strip():
        return np.zeros((0, n_columns)), np.zeros(0, dtype=np.int64)
    try:
        values = np.loadtxt(io.BytesIO(data), dtype=np.float64, comments=None, ndmin=2)
        if values.shape[1] == n_columns:
            return values, np.zeros(0, dtype=np.int64)
    except ValueError:
        pass
    buf = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(buf == 10)
    # Line k spans [start[k], end[k]); a last line without a newline still counts.
    ends = newlines if buf[-1] == 10 else np.append(newlines, len(buf))
    starts = np.concatenate(([0], ends[:-1] + 1))
    bad = np.zeros(len(ends), dtype=bool)
    bad_bytes = np.flatnonzero(~_NUMERIC_BYTE[buf])
    bad[np.searchsorted(ends, bad_bytes)] = True
    space = _SPACE_BYTE[buf]
    token_start = np.flatnonzero(~space & np.concatenate(([True], space[:-1])))
    tokens = np.diff(np.searchsorted(token_start, np.concatenate(([0], ends))))
    bad |= (tokens != n_columns) & (tokens != 0)
    # Cut the damaged lines (with their newline) out: +1 where one starts, -1 after it ends.
    delta = np.zeros(len(buf) + 1, dtype=np.int8)
    np.add.at(delta, starts[bad], 1)  # add, not assign: one line's end is the next one's start
    np.add.at(delta, ends[bad] + 1, -1)
    keep = np.cumsum(delta[:-1], dtype=np.int8) == 0
    clean = buf[keep].tobytes()
    values = (
        np.loadtxt(io.BytesIO(clean), dtype=np.float64, comments=None, ndmin=2)
        if clean.strip()
        else np.zeros((0, n_columns))
    )
    return values.reshape(-1, n_columns), np.flatnonzero(bad).astype(np.int64) + 1


def _natural_key(path: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))


def _format_lines(lines: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(v)) for v in lines[:limit])
    return f"line {shown}" if len(lines) == 1 else f"lines {shown}{', ...' if len(lines) > limit else ''}"


def _room_file(room_dir: Path) -> Path | None:
    expected = room_dir / f"{room_dir.name}.txt"
    if expected.exists():
        return expected
    # The release has at least one room whose file is named differently
    # (Area_6/copyRoom_1/copy_Room_1.txt): accept a single .txt beside Annotations/.
    others = sorted(room_dir.glob("*.txt"))
    return others[0] if len(others) == 1 else None


def _count_lines(data: bytes) -> int:
    """Non-empty lines of a text file."""
    lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    empty = data.count(b"\n\n") + (1 if data.startswith(b"\n") else 0)
    return lines - empty


def read_scene(raw_dir: Path, scene_id: str, *, cfg: S3DISReaderConfig = S3DISReaderConfig()) -> RawScene:
    """Read one room.

    Returns:
        RawScene with xyz float32 [N,3], rgb uint8 [N,3], semantic int16 [N] (0..12),
        instance int32 [N] (one per Annotations file), kind "points".
    Raises:
        SceneError: missing folders, an unknown class name, unparseable or too damaged files.
    """
    raw_dir = Path(raw_dir)
    try:
        check_scene_id(scene_id)
    except ValueError as exc:
        raise SceneError(str(scene_id), None, str(exc)) from None
    area, room = split_scene_id(scene_id)
    room_dir = raw_dir / area / room
    ann_dir = room_dir / "Annotations"
    if not ann_dir.is_dir():
        raise SceneError(
            scene_id, ann_dir, "no Annotations folder (expected Area_<k>/<room>/Annotations/<class>_<i>.txt)"
        )
    files = sorted(ann_dir.glob("*.txt"), key=_natural_key)
    if not files:
        raise SceneError(scene_id, ann_dir, "no <class>_<i>.txt files in Annotations")
    label_map = _default_label_map()

    blocks: list[np.ndarray] = []
    labels: list[int] = []
    scene_warnings: list[str] = []
    n_skipped = 0
    for path in files:
        match = _ANNOTATION_FILE.match(path.name)
        if not match:
            raise SceneError(scene_id, path, "annotation file name is not <class>_<i>.txt")
        name = match.group(1)
        if name not in label_map:
            raise SceneError(
                scene_id, path, f"unknown class {name!r}; expected one of {sorted(label_map)}"
            )
        try:
            values, skipped = parse_numeric_lines(read_raw(scene_id, path))
        except ValueError as exc:
            raise SceneError(scene_id, path, f"cannot parse 'x y z r g b' lines: {exc}") from None
        if len(skipped):
            n_skipped += len(skipped)
            scene_warnings.append(tag(
                "damaged-lines", f"{path.relative_to(raw_dir)}: skipped {len(skipped)} damaged line(s) "
                f"(non-numeric or not 6 columns): {_format_lines(skipped)}"
            ))
        if len(values) == 0:
            scene_warnings.append(f"{path.relative_to(raw_dir)}: no points, instance dropped")
            continue
        blocks.append(values)
        labels.append(label_map[name])
    if n_skipped > cfg.max_skipped_lines:
        raise SceneError(
            scene_id, ann_dir, f"{n_skipped} damaged lines (more than max_skipped_lines={cfg.max_skipped_lines})"
        )
    if not blocks:
        raise SceneError(scene_id, ann_dir, "the Annotations files hold no points")

    values = np.concatenate(blocks)
    sizes = np.array([len(b) for b in blocks])
    semantic = np.repeat(np.array(labels, dtype=np.int16), sizes)
    instance = np.repeat(np.arange(len(blocks), dtype=np.int32), sizes)
    colour = values[:, 3:6]
    outside = int(((colour < 0) | (colour > 255)).any(axis=1).sum())
    if outside:
        scene_warnings.append(f"{outside} points have colour values outside 0..255 (clipped)")
    rgb = np.clip(np.rint(colour), 0, 255).astype(np.uint8)
    xyz = values[:, :3].astype(np.float32)

    source_files = [str(p) for p in files]
    if cfg.check_room_file:
        room_path = _room_file(room_dir)
        if room_path is None:
            scene_warnings.append(f"{room_dir.relative_to(raw_dir)}: no room file <room>.txt, point count not checked")
        else:
            source_files.insert(0, str(room_path))
            room_lines = _count_lines(read_raw(scene_id, room_path))
            if room_lines != len(xyz) + n_skipped:
                dropped = room_lines - len(xyz) - n_skipped
                what = (f"{dropped} unannotated point(s) ({100 * dropped / max(1, room_lines):.1f}%) dropped"
                        if dropped > 0 else "more annotated points than the room holds")
                scene_warnings.append(tag(
                    "unannotated" if dropped > 0 else "count-mismatch",
                    f"{room_path.relative_to(raw_dir)}: {room_lines} lines, but the Annotations files hold "
                    f"{len(xyz)} points (+{n_skipped} skipped lines): {what}; the points come from Annotations"
                ))
    return RawScene(
        scene_id=scene_id,
        xyz=xyz,
        rgb=rgb,
        semantic=semantic,
        instance=instance,
        kind="points",
        source_files=source_files,
        warnings=scene_warnings,
    )


# --- manifests ------------------------------------------------------------------------------

SCENE_ID = re.compile(r"^Area_[1-6]_[A-Za-z]+_\d+$")
"""An S3DIS scene id: `Area_1_office_2`."""


def scene_lists(folder: Path) -> dict[str, tuple[str, ...]]:
    """The rooms of `rooms.csv` grouped into the splits of `splits.yaml` (train/val disjoint), and "all"."""
    rooms_path = folder / "rooms.csv"
    by_area: dict[int, list[str]] = {k: [] for k in range(1, 7)}
    seen: dict[str, int] = {}
    for line, row in manifests.read_csv(rooms_path, ("area", "room")):
        match = re.fullmatch(r"Area_([1-6])", row["area"])
        if not match:
            raise ManifestError(rooms_path, f"unknown area {row['area']!r}; expected Area_1..Area_6", line)
        scene = f"{row['area']}_{row['room']}"
        try:
            check_scene_id(scene)
        except ValueError as exc:
            raise ManifestError(rooms_path, str(exc), line) from None
        if not SCENE_ID.match(scene):
            raise ManifestError(rooms_path, f"unknown scene {scene!r}: room names are <kind>_<n>, e.g. office_2", line)
        if scene in seen:
            raise ManifestError(rooms_path, f"duplicate scene {scene!r} (first at line {seen[scene]})", line)
        seen[scene] = line
        by_area[int(match.group(1))].append(scene)

    splits_path = folder / "splits.yaml"
    data, lines = manifests.read_yaml_mapping(splits_path)
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


def label_map(folder: Path, class_names: tuple[str, ...]) -> list[tuple[str, int]]:
    """(annotation class name, training id) from `label_map.csv` (`stairs` -> clutter)."""
    index = {name: i for i, name in enumerate(class_names)}
    path = folder / "label_map.csv"
    pairs: list[tuple[str, int]] = []
    for line, row in manifests.read_csv(path, ("raw", "class")):
        if row["class"] not in index:
            raise ManifestError(path, f"unknown class {row['class']!r}; expected one of {list(class_names)}", line)
        pairs.append((row["raw"], index[row["class"]]))
    return pairs


@functools.lru_cache(maxsize=1)
def _default_label_map() -> dict[str, int]:
    return manifests.shipped_label_map("s3dis", label_map, CLASS_NAMES)


DATASET = Dataset(
    name="s3dis", scene_id=SCENE_ID, reader_config=S3DISReaderConfig, list_scenes=list_scenes,
    read_scene=read_scene, scene_lists=scene_lists, label_map=label_map,
)
"""S3DIS (Stanford3dDataset_v1.2_Aligned_Version), 13 classes."""

