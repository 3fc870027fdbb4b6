"""SemanticKITTI: its reader (one LiDAR scan, optionally with the scans before it -> `RawScene`),
its sequences and splits, and its label map.

Reads, under `raw_dir` (the folder holding `sequences/`):

    sequences/<XX>/velodyne/<NNNNNN>.bin   float32 x y z intensity per point (sensor frame)
    sequences/<XX>/labels/<NNNNNN>.label   uint32 per point: lower 16 bits semantic id, upper 16 instance id
    sequences/<XX>/poses.txt, calib.txt    only when merging scans (`merge_scans > 1`)
    semantic-kitti.yaml                    the official label config (`learning_map`), see `label_yaml`

Writes nothing. Scene ids are `<XX>_<NNNNNN>` (e.g. `08_000000`): one scene per scan.

Labels: the raw semantic id goes through the yaml's `learning_map` onto 0..19 (moving classes onto
their static class, as the official map says); 0 (unlabelled, outlier, ...) becomes `IGNORE_INDEX`
and 1..19 the training ids 0..18 (`CLASS_NAMES`). Without a yaml the same map, copied into
`data_manifests/semantickitti/label_map.csv`, is used. The instance of a point is its full 32-bit
label (instance id with its semantic id, since ids repeat across classes) renumbered 0..K-1;
points with instance id 0 get -1. Scans without a label file (the test sequences) are read with
every point ignored, and a warning says so. Intensity becomes a grey colour.

Merging: with `merge_scans = n`, scene `XX_k` holds scans k-n+1..k (fewer at the start of a
sequence), moved into scan k's sensor frame with the KITTI poses (`poses.txt`, left camera) and
the velodyne-to-camera transform `Tr` of `calib.txt`: T_velo = Tr^-1 · P · Tr.

Manifests (`data_manifests/semantickitti/`): `classes.csv`, `label_map.csv` (raw id -> class) and
`sequences.csv` (sequence, split, scans): one scene per scan.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from pipeline.datasets import manifests
from pipeline.datasets.base import Dataset, RawScene, open_raw, tag
from pipeline.datasets.manifests import ManifestError
from pipeline.errors import SceneError
from pipeline.schema import IGNORE_INDEX, check_scene_id

CLASS_NAMES: tuple[str, ...] = manifests.read_classes(str(manifests.DEFAULT_ROOT / "semantickitti"))
"""car bicycle motorcycle truck other-vehicle person bicyclist motorcyclist road parking sidewalk
other-ground building fence vegetation trunk terrain pole traffic-sign (training ids 0..18)."""

_SCENE_ID = re.compile(r"^(\d{2})_(\d{6})$")
_UNMAPPED = np.int16(-1)
"""Marks raw ids the label map does not know (a lookup-table value no training id uses)."""


@dataclass(frozen=True)
class SemanticKITTIReaderConfig:
    """How SemanticKITTI scans are read."""

    merge_scans: int = 1
    """Scans per scene: scan k and the `merge_scans - 1` scans before it, in scan k's frame.
    More than 1 needs `poses.txt` and `calib.txt` in the sequence folder."""
    label_yaml: str | None = None
    """The label config (`learning_map`, `labels`). None: `<raw_dir>/semantic-kitti.yaml` if it
    exists, else the official map kept in `data_manifests/semantickitti/label_map.csv`."""
    intensity_scale: float = 255.0
    """Grey value = clip(intensity * scale, 0, 255); KITTI intensities lie in 0..1."""


def scene_id_of(sequence: int | str, frame: int) -> str:
    """`(8, 0) -> "08_000000"`."""
    return check_scene_id(f"{int(sequence):02d}_{int(frame):06d}")


def split_scene_id(scene_id: str) -> tuple[str, int]:
    """`"08_000000" -> ("08", 0)`; raises SceneError for another form."""
    match = _SCENE_ID.match(scene_id)
    if not match:
        raise SceneError(scene_id, None, "expected a SemanticKITTI scene id '<sequence>_<frame>', e.g. 08_000000")
    return match.group(1), int(match.group(2))


def list_scenes(raw_dir: Path, cfg: SemanticKITTIReaderConfig | None = None) -> list[str]:
    """Scene ids of every `sequences/XX/velodyne/NNNNNN.bin` under `raw_dir`, sorted."""
    scenes = []
    for path in sorted(Path(raw_dir).glob("sequences/*/velodyne/*.bin")):
        seq = path.parent.parent.name
        if re.fullmatch(r"\d{2}", seq) and re.fullmatch(r"\d{6}", path.stem):
            scenes.append(f"{seq}_{path.stem}")
    return scenes


# --- label map ------------------------------------------------------------------------------


def lookup_table(raw_to_train: dict[int, int]) -> np.ndarray:
    """int16 [65536]: raw semantic id -> training id, `IGNORE_INDEX`, or -1 where unknown."""
    lut = np.full(1 << 16, _UNMAPPED, dtype=np.int16)
    for raw, train in raw_to_train.items():
        lut[int(raw)] = train
    return lut


@functools.lru_cache(maxsize=4)
def _yaml_map(path: str, mtime_ns: int) -> tuple[tuple[int, int], ...]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        with open_raw("-", path, "r", encoding="utf-8") as f:
            config = yaml.load(f, Loader=loader)
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SceneError("-", path, f"cannot read the label config: {exc}") from None
    try:
        learning_map = {int(k): int(v) for k, v in config["learning_map"].items()}
        inverse = {int(k): int(v) for k, v in config["learning_map_inv"].items()}
        labels = {int(k): str(v) for k, v in config["labels"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SceneError("-", path, f"expected learning_map, learning_map_inv and labels mappings: {exc!r}") from None
    # Training ids are stored with CLASS_NAMES: a config whose classes differ would mislabel silently.
    names = tuple(labels.get(inverse.get(i, -1), "?") for i in range(1, len(CLASS_NAMES) + 1))
    if names != CLASS_NAMES or max(learning_map.values()) != len(CLASS_NAMES):
        raise SceneError(
            "-", path, f"learning_map classes 1..{len(CLASS_NAMES)} are {names}; expected {CLASS_NAMES}"
        )
    return tuple((raw, learn - 1 if learn > 0 else IGNORE_INDEX) for raw, learn in learning_map.items())


def load_learning_map(label_yaml: str | Path) -> dict[int, int]:
    """Raw semantic id -> training id (0..18) or `IGNORE_INDEX`, from a `semantic-kitti.yaml`.

    Raises SceneError (scene "-") when the file is unreadable or its 19 classes are not `CLASS_NAMES`.
    """
    path = Path(label_yaml).resolve()
    mtime = path.stat().st_mtime_ns if path.exists() else 0
    return dict(_yaml_map(str(path), mtime))


def _resolve_label_map(raw_dir: Path, cfg: SemanticKITTIReaderConfig) -> tuple[dict[int, int], str | None]:
    if cfg.label_yaml is not None:
        path = Path(cfg.label_yaml)
        if not path.exists():
            raise SceneError("-", path, "label_yaml not found")
        return load_learning_map(path), str(path)
    default = raw_dir / "semantic-kitti.yaml"
    if default.exists():
        return load_learning_map(default), str(default)
    return _default_label_map(), None


def decode_labels(labels: np.ndarray, lut: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split raw uint32 labels into training semantics and instances.

    Args:
        labels: uint32 [N] (lower 16 bits semantic id, upper 16 instance id).
        lut: int16 [65536] from `lookup_table`.
    Returns:
        semantic int16 [N] (training id or IGNORE_INDEX; raw ids unknown to the map are ignored),
        instance int32 [N] (0..K-1 over distinct full labels with instance id > 0, else -1),
        unknown raw ids uint16 [U] (sorted, those the map lacks).
    """
    labels = np.asarray(labels, dtype=np.uint32)
    raw = (labels & 0xFFFF).astype(np.uint16)
    semantic = lut[raw]
    unknown_mask = semantic == _UNMAPPED
    unknown = np.unique(raw[unknown_mask])
    semantic = np.where(unknown_mask, np.int16(IGNORE_INDEX), semantic).astype(np.int16)
    has_instance = (labels >> 16) > 0
    instance = np.full(len(labels), -1, dtype=np.int32)
    if has_instance.any():
        _, inverse = np.unique(labels[has_instance], return_inverse=True)
        instance[has_instance] = inverse.astype(np.int32)
    return semantic, instance, unknown


def looks_like_xyz_records(raw: np.ndarray, columns: int = 4) -> bool:
    """Whether float32 values meant as `columns`-float records (x y z intensity) are rather x y z
    triples: consecutive points of a scan are neighbours, so read with the right record width the
    median step between consecutive points is small; read with the wrong one it jumps across the
    scene. On the real SemanticKITTI scan: 0.18 m as x y z intensity, 30 m as x y z; its x y z alone
    the other way round (0.18 m vs 36 m)."""
    if raw.size % 3 or raw.size < 3 * 8:
        return False

    def step(width: int) -> float:
        pts = raw[: raw.size // width * width].reshape(-1, width)[:20_000, :3].astype(np.float64)
        return float(np.median(np.linalg.norm(np.diff(pts, axis=0), axis=1)))

    return 5.0 * step(3) < step(columns)


def training_id_labels(labels: np.ndarray, semantic: np.ndarray) -> str | None:
    """A warning when labels look like training ids (0..19) rather than the raw ids the label map
    takes (10 car, 40 road, ...): most of them are then unknown or ignored, silently."""
    raw = np.asarray(labels, np.uint32) & 0xFFFF
    annotated = raw > 1  # 0 unlabeled, 1 outlier
    if not annotated.any() or int(raw.max()) >= 20:
        return None
    lost = annotated & (semantic == IGNORE_INDEX)
    share = float(lost.sum() / annotated.sum())
    if share < 0.5:
        return None
    return tag("labels-lost", f"{100 * share:.0f}% of the annotated points lost their label: every raw id is "
                              f"below 20 (max {int(raw.max())}), as training ids are, but the label map takes raw "
                              "SemanticKITTI ids (10 car, 40 road, ...); convert them, or ingest with --dataset "
                              "files reader.classes=semantickitti")


# --- poses ----------------------------------------------------------------------------------


def _read_calib_tr(path: Path, scene_id: str) -> np.ndarray:
    with open_raw(scene_id, path) as handle:
        text = handle.read().decode("utf-8", errors="replace")
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key.strip() == "Tr":
            values = np.array(rest.split(), dtype=np.float64)
            if values.size != 12:
                raise SceneError(scene_id, path, f"Tr has {values.size} numbers, expected 12 (3x4)")
            return np.vstack([values.reshape(3, 4), [0.0, 0.0, 0.0, 1.0]])
    raise SceneError(scene_id, path, "no 'Tr:' line (velodyne-to-camera transform)")


def _read_poses(path: Path, scene_id: str) -> np.ndarray:
    try:
        with open_raw(scene_id, path) as handle:
            values = np.loadtxt(handle, dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as exc:
        raise SceneError(scene_id, path, f"cannot read poses.txt (needed to merge scans): {exc}") from None
    if values.shape[1] != 12:
        raise SceneError(scene_id, path, f"poses have {values.shape[1]} numbers a line, expected 12 (3x4)")
    poses = np.tile(np.eye(4), (len(values), 1, 1))
    poses[:, :3, :4] = values.reshape(-1, 3, 4)
    return poses


def velodyne_poses(camera_poses: np.ndarray, tr: np.ndarray) -> np.ndarray:
    """Sensor poses in the world frame: T_velo_i = Tr^-1 · P_i · Tr.

    Args:
        camera_poses: float64 [T, 4, 4], KITTI `poses.txt` (left camera i -> camera 0).
        tr: float64 [4, 4], velodyne -> left camera (`calib.txt` Tr).
    Returns:
        float64 [T, 4, 4], velodyne i -> world (velodyne 0).
    """
    return np.linalg.inv(tr) @ camera_poses @ tr


# --- reading --------------------------------------------------------------------------------


def _read_scan(seq_dir: Path, frame: int, scene_id: str) -> tuple[np.ndarray, np.ndarray | None, Path, Path]:
    bin_path = seq_dir / "velodyne" / f"{frame:06d}.bin"
    label_path = seq_dir / "labels" / f"{frame:06d}.label"
    try:
        with open_raw(scene_id, bin_path) as handle:
            raw = np.fromfile(handle, dtype=np.float32)
    except OSError as exc:
        raise SceneError(scene_id, bin_path, f"cannot read scan: {exc}") from None
    if raw.size % 4:
        hint = " (it is a whole number of 12-byte x y z records: read it with --dataset files)" if raw.size % 3 == 0 else ""
        raise SceneError(scene_id, bin_path, f"{raw.size * 4} bytes is not a whole number of points (16 bytes each){hint}")
    if looks_like_xyz_records(raw):
        raise SceneError(scene_id, bin_path, "the file holds x y z records (12 bytes a point), not x y z intensity: "
                         "read it with --dataset files reader.columns='x y z'")
    points = raw.reshape(-1, 4)
    labels = None
    if label_path.exists():
        with open_raw(scene_id, label_path) as handle:
            labels = np.fromfile(handle, dtype=np.uint32)
        if len(labels) != len(points):
            raise SceneError(
                scene_id,
                label_path,
                f"{len(labels)} labels for {len(points)} points in {bin_path.name} (count mismatch)",
            )
    return points, labels, bin_path, label_path


def read_scene(
    raw_dir: Path, scene_id: str, *, cfg: SemanticKITTIReaderConfig = SemanticKITTIReaderConfig()
) -> RawScene:
    """Read one scan (with `cfg.merge_scans - 1` earlier scans merged in).

    Returns:
        RawScene with xyz float32 [N,3] in the sensor frame of scan k, rgb uint8 [N,3] (grey
        intensity), semantic int16 [N] (0..18 or IGNORE_INDEX), instance int32 [N] (-1 none),
        kind "lidar", sensor_origin [0, 0, 0].
    Raises:
        SceneError: missing or malformed files, a label config with other classes.
    """
    raw_dir = Path(raw_dir)
    try:
        check_scene_id(scene_id)
    except ValueError as exc:
        raise SceneError(str(scene_id), None, str(exc)) from None
    seq, frame = split_scene_id(scene_id)
    if cfg.merge_scans < 1:
        raise SceneError(scene_id, None, f"merge_scans must be >= 1, got {cfg.merge_scans}")
    seq_dir = raw_dir / "sequences" / seq
    if not (seq_dir / "velodyne" / f"{frame:06d}.bin").exists():
        raise SceneError(scene_id, seq_dir / "velodyne" / f"{frame:06d}.bin", "scan not found")
    try:
        raw_to_train, yaml_path = _resolve_label_map(raw_dir, cfg)
    except SceneError as exc:
        raise SceneError(scene_id, exc.file, exc.message) from None
    lut = lookup_table(raw_to_train)

    first = max(0, frame - cfg.merge_scans + 1)
    frames = [f for f in range(first, frame + 1) if (seq_dir / "velodyne" / f"{f:06d}.bin").exists()]
    scene_warnings: list[str] = []
    if len(frames) < cfg.merge_scans:
        scene_warnings.append(tag("merge-short", f"merged {len(frames)} scan(s), not {cfg.merge_scans}: earlier scans absent"))
    source_files = [yaml_path] if yaml_path else []
    to_current = None
    if len(frames) > 1:
        poses_path, calib_path = seq_dir / "poses.txt", seq_dir / "calib.txt"
        velo = velodyne_poses(_read_poses(poses_path, scene_id), _read_calib_tr(calib_path, scene_id))
        if len(velo) <= frame:
            raise SceneError(scene_id, poses_path, f"{len(velo)} poses, none for scan {frame}")
        to_current = np.linalg.inv(velo[frame]) @ velo  # [T, 4, 4]: velodyne j -> velodyne k
        source_files += [str(poses_path), str(calib_path)]

    xyz_parts, intensity_parts, label_parts = [], [], []
    missing_labels = 0
    for f in frames:
        points, labels, bin_path, label_path = _read_scan(seq_dir, f, scene_id)
        xyz = points[:, :3].astype(np.float64)
        if to_current is not None and f != frame:
            xyz = xyz @ to_current[f, :3, :3].T + to_current[f, :3, 3]
        xyz_parts.append(xyz)
        intensity_parts.append(points[:, 3])
        source_files.append(str(bin_path))
        if labels is None:
            missing_labels += len(points)
            # Label 0 is "unlabeled" in every SemanticKITTI config: ignored, no instance.
            labels = np.zeros(len(points), dtype=np.uint32)
        else:
            source_files.append(str(label_path))
        label_parts.append(labels)
    labels = np.concatenate(label_parts)
    semantic, instance, unknown = decode_labels(labels, lut)
    annotated = int(((labels & 0xFFFF) != 0).sum())  # raw id 0: "unlabeled" (also every point without a label file)
    if missing_labels:
        scene_warnings.append(tag("unlabelled", f"no label file: {missing_labels} points ignored (test sequence?)"))
    if len(unknown):
        n_unknown = int(np.isin(labels & 0xFFFF, unknown).sum())
        scene_warnings.append(tag("labels-unknown",
            f"{n_unknown} points have raw semantic ids {unknown.tolist()} unknown to the label map (ignored)"
        ))
    lost = training_id_labels(labels, semantic)
    if lost:
        scene_warnings.append(lost)
    intensity = np.concatenate(intensity_parts).astype(np.float64)
    rgb_grey = np.clip(np.rint(intensity * cfg.intensity_scale), 0, 255).astype(np.uint8)
    if not rgb_grey.any():
        scene_warnings.append(tag("no-colour", "intensity is 0 everywhere: rendered views are black (CLIP sees "
                                               "nothing); a sweep saved without intensity?"))
    return RawScene(
        scene_id=scene_id,
        xyz=np.concatenate(xyz_parts).astype(np.float32),
        rgb=np.repeat(rgb_grey[:, None], 3, axis=1),
        semantic=semantic,
        instance=instance,
        kind="lidar",
        sensor_origin=np.zeros(3, dtype=np.float32),
        source_files=source_files,
        warnings=scene_warnings,
        annotated_points=annotated,
        label_table=yaml_path or str(manifests.DEFAULT_ROOT / "semantickitti" / "label_map.csv"),
    )


# --- manifests ------------------------------------------------------------------------------

SCENE_ID = re.compile(r"^\d{2}_\d{6}$")
"""A SemanticKITTI scene id: `<sequence>_<frame>`, e.g. `08_000000`."""


def scene_lists(folder: Path) -> dict[str, tuple[str, ...]]:
    """One scene per scan of every sequence of `sequences.csv`, by official split, and "all"."""
    path = folder / "sequences.csv"
    out: dict[str, list[str]] = {name: [] for name in manifests.OFFICIAL_SPLITS}
    seen: dict[str, int] = {}
    for line, row in manifests.read_csv(path, ("sequence", "split", "scans")):
        seq, split, scans = row["sequence"], row["split"], row["scans"]
        if not re.fullmatch(r"\d{2}", seq):
            raise ManifestError(path, f"unknown sequence {seq!r}; expected two digits, e.g. 08", line)
        if seq in seen:
            raise ManifestError(
                path, f"duplicate sequence {seq!r} (first at line {seen[seq]}): overlapping splits", line
            )
        if split not in out:
            raise ManifestError(path, f"unknown split {split!r}; expected one of {manifests.OFFICIAL_SPLITS}", line)
        if not scans.isdigit() or int(scans) < 1:
            raise ManifestError(path, f"scans must be a positive integer, got {scans!r}", line)
        seen[seq] = line
        out[split].extend(f"{seq}_{frame:06d}" for frame in range(int(scans)))
    lists = {name: tuple(v) for name, v in out.items()}
    lists["all"] = tuple(scene for name in manifests.OFFICIAL_SPLITS for scene in lists[name])
    return lists


def label_map(folder: Path, class_names: tuple[str, ...]) -> list[tuple[int, int]]:
    """(raw semantic id, training id or IGNORE_INDEX) from `label_map.csv` (the official learning map)."""
    index = {name: i for i, name in enumerate(class_names)}
    path = folder / "label_map.csv"
    pairs: list[tuple[int, int]] = []
    for line, row in manifests.read_csv(path, ("raw_id", "class")):
        if not row["raw_id"].isdigit():
            raise ManifestError(path, f"raw_id must be an integer, got {row['raw_id']!r}", line)
        cls = row["class"]
        if cls and cls not in index:
            raise ManifestError(path, f"unknown class {cls!r}; expected one of {list(class_names)} or empty (ignored)", line)
        pairs.append((int(row["raw_id"]), index[cls] if cls else IGNORE_INDEX))
    return pairs


@functools.lru_cache(maxsize=1)
def _default_label_map() -> dict[int, int]:
    return manifests.shipped_label_map("semantickitti", label_map, CLASS_NAMES)


DATASET = Dataset(
    name="semantickitti", scene_id=SCENE_ID, reader_config=SemanticKITTIReaderConfig, list_scenes=list_scenes,
    read_scene=read_scene, scene_lists=scene_lists, label_map=label_map,
)
"""SemanticKITTI, 19 classes, one scene per LiDAR scan."""

