"""ScanNet v2: its raw release reader (`scans/<scene>/`, also read for the synthetic rooms), its
scene lists and label map, and the ScanNet200 label space (manifests only).

Reads, per scene: `<scene>_vh_clean_2.ply` (vertices with colour, faces), the over-segmentation
`<scene>_vh_clean_2.0.010000.segs.json`, the aggregation (`<scene>.aggregation.json` or the v1-era
`<scene>_vh_clean.aggregation.json`), `<scene>.txt` (`axisAlignment`, applied when present) and
the label table `scannetv2-labels.combined.tsv` (`raw_category` -> `nyu40id`), which maps
labels onto the 20 benchmark classes. Labels missing from the table are ignored and counted in
a warning.

Where the labels come from (`RawScene.label_source`, kept in the ingest record):
- "aggregation": the aggregation + segs.json (semantics and instances);
- "labels-ply": no aggregation, but `<scene>_vh_clean_2.labels.ply` (per-vertex NYU40 ids in its
  `label` property): semantics only, every instance -1;
- "none": neither (e.g. a test scan): unlabelled, semantic IGNORE_INDEX everywhere, no instances.

Manifests (`data_manifests/scannet/`): `classes.csv` (train_index, nyu40_id, name) and
`scenes/<split>.txt`: the official `train`, `val` and `test` lists (disjoint) and the
limited-reconstruction lists `lr1`...`lr20` (subsets of train). `data_manifests/scannet200/` holds
ScanNet200's 200 classes (raw ScanNet category ids) over ScanNet's scene lists.
"""
from __future__ import annotations

import csv
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from plyfile import PlyData

from pipeline.datasets import manifests
from pipeline.datasets.base import Dataset, RawScene, open_raw, read_raw, tag
from pipeline.datasets.manifests import ManifestError
from pipeline.errors import SceneError
from pipeline.schema import IGNORE_INDEX, check_scene_id

CLASS_NAMES: tuple[str, ...] = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink",
    "bathtub", "otherfurniture",
)
"""The 20 ScanNet benchmark classes, in training-id order."""
NYU40_IDS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
"""NYU40 id of each benchmark class (same order)."""
LABEL_TABLE = "scannetv2-labels.combined.tsv"
NYU40_COUNT = 41
"""NYU40 ids are 0 (unannotated) .. 40."""


@dataclass(frozen=True)
class ScanNetReaderConfig:
    """How ScanNet scans are read."""

    label_table: str = ""
    """Path of scannetv2-labels.combined.tsv; empty = `<raw>/scannetv2-labels.combined.tsv`."""
    apply_axis_alignment: bool = True
    """Apply `axisAlignment` from `<scene>.txt` when the file has one."""
    scans_subdir: str = "scans"
    """Folder of the raw dir holding one folder per scene (`scans` or `scans_test`)."""


def list_scenes(raw_dir: str | Path, cfg: ScanNetReaderConfig | None = None) -> list[str]:
    """Scene ids found under `raw_dir/scans/` (folders holding a `_vh_clean_2.ply`)."""
    base = Path(raw_dir) / (cfg or ScanNetReaderConfig()).scans_subdir
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: no such folder; expected the ScanNet layout <raw>/scans/<scene>/")
    return sorted(p.name for p in base.iterdir() if (p / f"{p.name}_vh_clean_2.ply").exists())


@functools.lru_cache(maxsize=8)
def load_label_table(path: str) -> dict[str, int]:
    """raw_category -> benchmark training id (IGNORE_INDEX for NYU40 classes outside the 20)."""
    nyu_to_train = {nyu: i for i, nyu in enumerate(NYU40_IDS)}
    table: dict[str, int] = {}
    try:
        with open_raw("-", path, "r", newline="") as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                nyu = int(row["nyu40id"]) if row.get("nyu40id", "").strip() else 0
                table[row["raw_category"].strip()] = nyu_to_train.get(nyu, IGNORE_INDEX)
    except (OSError, KeyError, ValueError) as exc:
        raise SceneError("-", path, f"cannot read the ScanNet label table (raw_category, nyu40id): {exc}") from exc
    return table


def _read_json(scene_id: str, path: Path) -> dict:
    try:
        data = json.loads(read_raw(scene_id, path))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise SceneError(scene_id, path, f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SceneError(scene_id, path, f"expected a JSON object, got a {type(data).__name__}")
    return data


def _segment_ids(scene_id: str, path: Path, values: object, what: str) -> np.ndarray:
    """int64 [K] segment ids from a JSON list; SceneError for anything but non-negative integers
    (a negative id would index the table of segments from its end: wrong labels without a word)."""
    if not isinstance(values, list):
        raise SceneError(scene_id, path, f"{what}: expected a list of segment ids, got {type(values).__name__}")
    if not values:
        return np.zeros(0, dtype=np.int64)
    ids = np.asarray(values)
    if ids.dtype.kind not in "iu" or ids.ndim != 1:  # floats, strings, nested lists, ids beyond 64 bits
        raise SceneError(scene_id, path, f"{what}: segment ids must be integers, found {ids.dtype} values")
    if ids.dtype.kind == "u" and ids.max() > np.iinfo(np.int64).max:
        raise SceneError(scene_id, path, f"{what}: segment id {int(ids.max())} does not fit 64 bits")
    ids = ids.astype(np.int64)
    if ids.min() < 0:
        bad = int((ids < 0).sum())
        raise SceneError(scene_id, path, f"{what}: {bad} negative segment id(s) (e.g. {int(ids.min())}); ids are >= 0")
    return ids


def read_axis_alignment(scene_id: str, path: Path) -> np.ndarray | None:
    """The 4x4 `axisAlignment` of `<scene>.txt`, or None when the file or the line is absent."""
    if not path.exists():
        return None
    for line in read_raw(scene_id, path).decode("utf-8", errors="replace").splitlines():
        if line.strip().startswith("axisAlignment"):
            values = line.split("=", 1)[1].split()
            try:
                matrix = np.array([float(v) for v in values], dtype=np.float64)
            except ValueError:
                raise SceneError(scene_id, path, "axisAlignment holds non-numeric values") from None
            if matrix.size != 16:
                raise SceneError(scene_id, path, f"axisAlignment has {matrix.size} values, expected 16")
            return matrix.reshape(4, 4)
    return None


def read_ply_mesh(scene_id: str, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(xyz f32 [N,3], rgb u8 [N,3], faces i32 [F,3]) from a ScanNet PLY (plyfile reads it)."""
    handle = open_raw(scene_id, path)
    try:
        try:  # fast path: triangles declared as fixed-length lists (what ScanNet ships)
            ply = PlyData.read(handle, known_list_len={"face": {"vertex_indices": 3}})
        except Exception:  # a mesh with non-triangle faces: read generically, checked below
            handle.seek(0)
            ply = PlyData.read(handle)
        vertex = ply["vertex"].data
        xyz = np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=1).astype(np.float32)
        rgb = np.stack([vertex["red"], vertex["green"], vertex["blue"]], axis=1).astype(np.uint8)
        if "face" in ply and len(ply["face"].data):
            indices = ply["face"].data["vertex_indices"]
            faces = np.asarray(indices if indices.dtype != object else np.vstack(indices), dtype=np.int32)
        else:
            faces = np.zeros((0, 3), np.int32)
    except (OSError, ValueError, KeyError, IndexError, EOFError) as exc:
        raise SceneError(scene_id, path, f"unreadable PLY (truncated or garbled?): {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # plyfile raises its own PlyParseError and struct errors on garbage
        raise SceneError(scene_id, path, f"unreadable PLY: {type(exc).__name__}: {exc}") from None
    finally:
        handle.close()
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise SceneError(scene_id, path, f"faces must be triangles, got shape {faces.shape}")
    return xyz, rgb, faces


def read_labels_ply(scene_id: str, path: Path, xyz: np.ndarray) -> tuple[np.ndarray, int, list[str]]:
    """Training ids from `<scene>_vh_clean_2.labels.ply` (NYU40 ids in `label`).

    NYU40 ids outside the 20 benchmark classes (and 0, unannotated) become IGNORE_INDEX; ids that
    are no NYU40 id (outside 0..40) too, counted in a warning. The file must describe the same
    vertices as the mesh (count and positions, before axis alignment).

    Returns:
        (semantic int16 [N], annotated points (label != 0), warnings).
    """
    handle = open_raw(scene_id, path)
    try:
        try:
            ply = PlyData.read(handle, known_list_len={"face": {"vertex_indices": 3}})
        except Exception:  # non-triangle faces or no faces: the vertices are all we need
            handle.seek(0)
            ply = PlyData.read(handle)
        vertex = ply["vertex"].data
        names = vertex.dtype.names or ()
        if "label" not in names:
            raise SceneError(scene_id, path, f"labels PLY has no 'label' vertex property (has: {', '.join(names)})")
        nyu = np.asarray(vertex["label"], dtype=np.int64)
        pos = np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=1).astype(np.float32)
    except SceneError:
        raise
    except Exception as exc:  # plyfile raises its own parse errors on garbage
        raise SceneError(scene_id, path, f"unreadable labels PLY: {type(exc).__name__}: {exc}") from None
    finally:
        handle.close()
    if len(nyu) != len(xyz):
        raise SceneError(scene_id, path, f"labels PLY has {len(nyu)} vertices for the mesh's {len(xyz)} (count mismatch)")
    if len(xyz) and float(np.abs(pos - xyz).max()) > 1e-3:
        raise SceneError(scene_id, path, "labels PLY vertices differ from the mesh's (not the same scan?)")
    # a table over the 41 NYU40 ids only: a huge id in the file must not size an allocation
    lut = np.full(NYU40_COUNT, IGNORE_INDEX, dtype=np.int16)
    lut[list(NYU40_IDS)] = np.arange(len(NYU40_IDS), dtype=np.int16)
    known = (nyu >= 0) & (nyu < NYU40_COUNT)
    semantic = np.where(known, lut[np.where(known, nyu, 0)], IGNORE_INDEX).astype(np.int16)
    warnings = []
    if not known.all():
        odd = np.unique(nyu[~known])
        warnings.append(f"{int((~known).sum())} vertices have labels {odd[:10].tolist()} that are no NYU40 id "
                        "(0..40): ignored")
    return semantic, int((nyu != 0).sum()), warnings


def read_scene(raw_dir: str | Path, scene_id: str, *, cfg: ScanNetReaderConfig = ScanNetReaderConfig()) -> RawScene:
    """Read one ScanNet scan into a RawScene (semantics on the 20 classes, instances, faces).

    Labels from the aggregation, else the labels PLY (semantics only), else none (unlabelled);
    see the module docstring.
    """
    check_scene_id(scene_id)
    raw_dir = Path(raw_dir)
    folder = raw_dir / cfg.scans_subdir / scene_id
    ply_path = folder / f"{scene_id}_vh_clean_2.ply"
    xyz, rgb, faces = read_ply_mesh(scene_id, ply_path)
    n = len(xyz)
    finite = np.isfinite(xyz).all(axis=1)
    if not finite.all():
        raise SceneError(scene_id, ply_path, f"{int((~finite).sum())} vertices have NaN or infinite coordinates")
    files = [str(ply_path)]
    warnings: list[str] = []

    semantic = np.full(n, IGNORE_INDEX, dtype=np.int16)
    instance = np.full(n, -1, dtype=np.int32)
    segs_path = folder / f"{scene_id}_vh_clean_2.0.010000.segs.json"
    agg_candidates = [folder / f"{scene_id}.aggregation.json", folder / f"{scene_id}_vh_clean.aggregation.json"]
    agg_path = next((p for p in agg_candidates if p.exists()), None)
    labels_ply_path = folder / f"{scene_id}_vh_clean_2.labels.ply"
    annotated: int | None = None
    table_path: str | None = None
    if agg_path is None and labels_ply_path.exists():
        label_source = "labels-ply"
        semantic, annotated, label_warnings = read_labels_ply(scene_id, labels_ply_path, xyz)
        files.append(str(labels_ply_path))
        table_path = str(labels_ply_path)
        warnings.append(tag("semantics-only", "semantics from the labels PLY (no aggregation): no instances"))
        warnings += label_warnings
    elif agg_path is None:
        label_source = "none"
        warnings.append(tag("unlabelled", "no annotations (no aggregation, no labels PLY): unlabelled, all points ignored"))
    else:
        label_source = "aggregation"
        table_path_used = cfg.label_table or str(raw_dir / LABEL_TABLE)
        table = load_label_table(table_path_used)
        segs = _read_json(scene_id, segs_path)
        agg = _read_json(scene_id, agg_path)
        files += [str(segs_path), str(agg_path)]
        seg_indices = _segment_ids(scene_id, segs_path, segs.get("segIndices", []), "segIndices")
        if len(seg_indices) != n:
            raise SceneError(scene_id, segs_path, f"segIndices has {len(seg_indices)} entries for {n} vertices (count mismatch)")
        ref = str(agg.get("sceneId", scene_id)).removeprefix("scannet.")
        if ref != scene_id:
            raise SceneError(scene_id, agg_path, f"aggregation is for scene {ref!r}")
        # segment id -> (instance, class) through the ids that occur (not a table as long as the
        # largest id: one huge id in a file must not size an allocation)
        seg_ids, seg_of_vertex = np.unique(seg_indices, return_inverse=True)
        seg_instance = np.full(len(seg_ids), -1, dtype=np.int32)
        seg_class = np.full(len(seg_ids), IGNORE_INDEX, dtype=np.int16)
        seg_annotated = np.zeros(len(seg_ids), dtype=bool)
        missing: dict[str, int] = {}
        groups = agg.get("segGroups")
        if not isinstance(groups, list):
            raise SceneError(scene_id, agg_path, "no segGroups list")
        for k, group in enumerate(groups):  # a loop over objects (tens), not points
            if not isinstance(group, dict):
                raise SceneError(scene_id, agg_path, f"segGroups[{k}] is not an object")
            label = str(group.get("label", "")).strip()
            segments = _segment_ids(scene_id, agg_path, group.get("segments", []), f"segGroups[{k}].segments")
            where = np.minimum(np.searchsorted(seg_ids, segments), max(len(seg_ids) - 1, 0))
            segments = where[seg_ids[where] == segments] if len(seg_ids) else where[:0]
            if label not in table:
                missing[label] = missing.get(label, 0) + 1
                cls = IGNORE_INDEX
            else:
                cls = table[label]
            seg_instance[segments] = int(group.get("objectId", group.get("id", k)))
            seg_class[segments] = cls
            seg_annotated[segments] = True
        annotated = int(seg_annotated[seg_of_vertex].sum())
        table_path = table_path_used
        semantic = seg_class[seg_of_vertex]
        instance = seg_instance[seg_of_vertex]
        if missing:
            warnings.append(tag("labels-unknown",
                f"{sum(missing.values())} object label(s) not in the label table were ignored: "
                + ", ".join(f"{name!r} x{count}" for name, count in sorted(missing.items()))
            ))

    if cfg.apply_axis_alignment:
        txt_path = folder / f"{scene_id}.txt"
        alignment = read_axis_alignment(scene_id, txt_path)
        if alignment is not None:
            xyz = (xyz.astype(np.float64) @ alignment[:3, :3].T + alignment[:3, 3]).astype(np.float32)
            files.append(str(txt_path))
    kind = "mesh"
    if len(faces) == 0:  # a vertex-only PLY is a point cloud (splatted), not a mesh with nothing to ray cast
        kind, faces = "points", None
        warnings.append(tag("no-faces", f"{ply_path.name} has no faces: read as a point cloud"))
    scene = RawScene(scene_id, xyz, rgb, semantic, instance, kind, faces=faces, source_files=files,
                     warnings=warnings, label_source=label_source, annotated_points=annotated,
                     label_table=table_path)
    scene.validate()
    return scene


# --- manifests ------------------------------------------------------------------------------

SCENE_ID = re.compile(r"^scene\d{4}_\d{2}$")
"""A ScanNet scene id: `scene0000_00`."""


def scene_lists(folder: Path) -> dict[str, tuple[str, ...]]:
    """The scene lists of `<folder>/scenes/*.txt` (official splits disjoint, `lr*` within train) and "all"."""
    folder = folder / "scenes"
    files = {p.stem: p for p in sorted(folder.glob("*.txt"))}
    for name in manifests.OFFICIAL_SPLITS:
        if name not in files:
            raise ManifestError(folder / f"{name}.txt", "missing manifest file (official split)")
    if "all" in files:
        raise ManifestError(files["all"], "'all' is reserved (the union of train, val and test)")
    lists = {name: manifests.parse_scene_lines(path, "scannet", SCENE_ID) for name, path in files.items()}
    manifests.check_disjoint(lists, files, manifests.OFFICIAL_SPLITS)
    train = {scene for _, scene in lists["train"]}
    full = {scene for name in manifests.OFFICIAL_SPLITS for _, scene in lists[name]}
    for name, entries in lists.items():
        if name in manifests.OFFICIAL_SPLITS:
            continue
        # Limited-reconstruction lists are drawn from the training scenes; other extra lists need
        # only be real scenes.
        allowed, what = (train, "train") if name.startswith("lr") else (full, "train/val/test")
        for line, scene in entries:
            if scene not in allowed:
                kind = "unknown scene" if scene not in full else "scene outside train"
                raise ManifestError(files[name], f"{kind} {scene!r}: not in {what}", line)
    out = {name: tuple(scene for _, scene in entries) for name, entries in lists.items()}
    out["all"] = tuple(scene for name in manifests.OFFICIAL_SPLITS for scene in out[name])
    return out


def label_map(folder: Path, class_names: tuple[str, ...]) -> list[tuple[int, int]]:
    """(NYU40 id, training id) of the 20 benchmark classes (`classes.csv`'s `nyu40_id`)."""
    return manifests.class_column_map(folder, "nyu40_id")


def scannet200_label_map(folder: Path, class_names: tuple[str, ...]) -> list[tuple[int, int]]:
    """(raw ScanNet category id, training id) of the 200 classes (`scannet_category_id`)."""
    return manifests.class_column_map(folder, "scannet_category_id")


DATASET = Dataset(
    name="scannet", scene_id=SCENE_ID, reader_config=ScanNetReaderConfig, list_scenes=list_scenes,
    read_scene=read_scene, scene_lists=scene_lists, label_map=label_map,
)
"""ScanNet v2 with the 20 benchmark classes."""
SCANNET200 = Dataset(
    name="scannet200", scene_id=SCENE_ID, list_scenes=list_scenes, scene_lists=scene_lists,
    label_map=scannet200_label_map, scenes_folder="scannet",
)
"""ScanNet200's label space over ScanNet's scans and scene lists (manifests only: no reader yet)."""

