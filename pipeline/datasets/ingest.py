"""The ingest stage: raw dataset files -> the `points/` and `mesh/` groups of a scene in the store.

Reads raw files through the dataset's reader (`pipeline.datasets`); writes `schema.XYZ, RGB,
SEMANTIC, INSTANCE` and `FACES` (meshes) in one atomic scene write, with the reader's warnings and
stats in the record. Its config hash covers the config (less the limits that only accept or refuse
a scene) and the raw folder it read.

Inputs are bounded before anything is written: coordinates so far from the origin that float32
(the store's type) cannot resolve `max_coordinate_step_m` there (a scan in UTM or ECEF
coordinates: every x collapses onto a few values) fail the scene, and so does a labelled scan of
which less than `min_label_coverage` of the annotated points map to a training class (a wrong
label table maps none). The readers bound the rest (segment ids, files that are no regular file).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import schema
from pipeline.config import ConfigError, from_dict, to_dict
from pipeline.datasets import get_dataset, readable_datasets
from pipeline.datasets.base import RawScene, tag
from pipeline.errors import SceneError
from pipeline.stage import Stage, StageOption, StageOutput, StageRun
from pipeline.store import Store

LABEL_SOURCE_TEXT = {
    "aggregation": "aggregation",
    "labels-ply": "labels-ply (semantics only)",
    "none": "none (unlabelled)",
    "annotations": "annotations",
}
"""How `ws3d info` and the ingest record name each `RawScene.label_source`."""
UNLABELLED = "none"
"""`label_source` of a scene with no labels at all (semantic IGNORE_INDEX, no instances): the
ingest record's top-level `label_source` key says it, for stages that must skip such scenes."""


@dataclass(frozen=True)
class IngestConfig:
    """How raw scans become store scenes."""

    dataset: str = "scannet"
    """scannet | synthetic | s3dis | semantickitti | files (plain scan files, any layout)."""
    reader: dict[str, Any] = field(default_factory=dict)
    """Options of the dataset's reader config (e.g. reader.label_table=..., reader.merge_scans=3)."""
    dedupe_points: bool = True
    """Drop exact duplicate points of point clouds (not meshes), counted in a warning."""
    max_coordinate_step_m: float = 0.005
    """The coarsest float32 resolution accepted at the scan's largest coordinate (float32 resolves
    0.004 m at 50 km from the origin, 64 m at 1e9 m): farther out, shift the scan near the origin
    first. 0 accepts anything."""
    min_label_coverage: float = 0.5
    """Least share of a labelled scan's annotated points that must map to a training class (a wrong
    label table maps none); 0 accepts any share (then only a warning)."""

    def __post_init__(self) -> None:
        if self.max_coordinate_step_m < 0:
            raise ValueError(f"ingest.max_coordinate_step_m must be >= 0, got {self.max_coordinate_step_m}")
        if not 0.0 <= self.min_label_coverage <= 1.0:
            raise ValueError(f"ingest.min_label_coverage must lie in [0, 1], got {self.min_label_coverage}")

    def reader_config(self) -> Any:
        """The dataset's reader config from `reader` (strict: an unknown option raises ConfigError)."""
        dataset = get_dataset(self.dataset, readable=True)
        return from_dict(dataset.reader_config, dict(self.reader), where="ingest.reader")


def class_names(dataset: str, reader_cfg: Any = None) -> list[str]:
    """The training class names of a dataset's store (plain files: those its reader config chooses)."""
    from pipeline.datasets import load_classes

    chooser = get_dataset(dataset).class_names
    if chooser is not None:
        return list(chooser(reader_cfg if reader_cfg is not None else get_dataset(dataset).reader_config()))
    return list(load_classes(dataset))


def list_raw_scenes(raw_dir: str | Path, cfg: IngestConfig) -> list[str]:
    """The scene ids a raw release folder holds."""
    return get_dataset(cfg.dataset, readable=True).list_scenes(Path(raw_dir), cfg.reader_config())


ACCEPT_ONLY_FIELDS = ("max_coordinate_step_m", "min_label_coverage")
"""IngestConfig fields that only accept or refuse a scene: not in the hash (a scene written under
one limit is the same scene under another)."""


def hashed_fields(cfg: IngestConfig) -> dict[str, Any]:
    """The part of the config that changes what ingest writes."""
    return {name: value for name, value in to_dict(cfg).items() if name not in ACCEPT_ONLY_FIELDS}


def check_coordinate_precision(scene: RawScene, max_step_m: float) -> None:
    """SceneError when float32 cannot resolve ``max_step_m`` at the scan's largest coordinate."""
    if max_step_m <= 0 or not len(scene.xyz):
        return
    largest = float(np.abs(scene.xyz).max())
    step = float(np.spacing(np.float32(largest)))
    if step > max_step_m:
        distinct = int(len(np.unique(scene.xyz[:, int(np.abs(scene.xyz).max(axis=0).argmax())])))
        raise SceneError(
            scene.scene_id, scene.source_files[0] if scene.source_files else None,
            f"coordinates reach {largest:.3g} m, where float32 resolves only {step:.3g} m (more than "
            f"ingest.max_coordinate_step_m={max_step_m:g}; {distinct:,} distinct values left on that axis for "
            f"{len(scene.xyz):,} points): shift the scan near the origin first (subtract a site origin)",
        )


def check_label_coverage(scene: RawScene, min_coverage: float) -> str | None:
    """SceneError when less than ``min_coverage`` of the annotated points of a labelled scan got a
    training class; a warning (returned) when some did not."""
    if scene.label_source == "none":
        return None
    annotated = len(scene.xyz) if scene.annotated_points is None else scene.annotated_points
    if annotated <= 0:
        return None
    share = int((scene.semantic != schema.IGNORE_INDEX).sum()) / annotated
    if share >= max(min_coverage, 0.5):
        return None
    table = f" through {scene.label_table}" if scene.label_table else ""
    text = (f"only {share:.1%} of the {annotated:,} annotated points map to a training class{table}")
    if share < min_coverage:
        raise SceneError(
            scene.scene_id, scene.label_table or (scene.source_files[0] if scene.source_files else None),
            f"{text} (less than ingest.min_label_coverage={min_coverage:g}): a wrong label table or class list? "
            "ingest.min_label_coverage=0 accepts it",
        )
    return text if share < 0.5 else None


def clean_scene(scene: RawScene, cfg: IngestConfig) -> RawScene:
    """Check a reader's output (finite, bounded coordinates; label coverage) and drop exact
    duplicate points of point clouds (with a warning)."""
    scene.validate()
    check_coordinate_precision(scene, cfg.max_coordinate_step_m)
    coverage_note = check_label_coverage(scene, cfg.min_label_coverage)
    if coverage_note:
        scene = dataclasses.replace(scene, warnings=scene.warnings + [coverage_note])
    if cfg.dedupe_points and scene.faces is None:
        _, first = np.unique(scene.xyz, axis=0, return_index=True)
        if len(first) < len(scene.xyz):
            keep = np.sort(first)
            dropped = len(scene.xyz) - len(keep)
            scene = dataclasses.replace(
                scene, xyz=scene.xyz[keep], rgb=scene.rgb[keep], semantic=scene.semantic[keep],
                instance=scene.instance[keep],
                warnings=scene.warnings + [tag("duplicates", f"{dropped} duplicate point(s) dropped")],
            )
    if len(scene.xyz) < 4 or float(np.ptp(scene.xyz, axis=0).max()) == 0.0:
        raise SceneError(scene.scene_id, scene.source_files[0] if scene.source_files else None,
                         "degenerate scene: fewer than 4 points or all points identical")
    return scene


def scene_arrays(scene: RawScene) -> dict[schema.ArraySpec, np.ndarray]:
    """The store arrays of a scene (faces for meshes only)."""
    arrays = {schema.XYZ: scene.xyz, schema.RGB: scene.rgb, schema.SEMANTIC: scene.semantic,
              schema.INSTANCE: scene.instance}
    if scene.faces is not None:
        arrays[schema.FACES] = scene.faces
    return arrays


def compute(store: Store, scene_id: str, cfg: IngestConfig, run: StageRun) -> StageOutput:
    """Read one raw scene through its dataset's reader and check it."""
    dataset = get_dataset(cfg.dataset, readable=True)
    scene = clean_scene(dataset.read_scene(Path(run.raw), scene_id, cfg=cfg.reader_config()), cfg)
    n_classes = len(store.class_names)
    labelled = scene.semantic[scene.semantic != schema.IGNORE_INDEX]
    if len(labelled) and (labelled.min() < 0 or labelled.max() >= n_classes):
        raise SceneError(scene_id, scene.source_files[0] if scene.source_files else None,
                         f"semantic ids outside 0..{n_classes - 1}")
    stats = {
        "kind": scene.kind,
        "points": int(len(scene.xyz)),
        "faces": int(len(scene.faces)) if scene.faces is not None else 0,
        "instances": int(len(np.unique(scene.instance[scene.instance >= 0]))),
        "class_points": np.bincount(labelled.astype(np.int64), minlength=n_classes).tolist(),
        "labelled_fraction": float(len(labelled) / max(1, len(scene.xyz))),
        "label_source": scene.label_source,
        "labels": LABEL_SOURCE_TEXT.get(scene.label_source, scene.label_source),
        "sensor_origin": None if scene.sensor_origin is None else [float(v) for v in scene.sensor_origin],
        "warnings": list(scene.warnings),
        "source_files": list(scene.source_files),
    }
    return StageOutput(scene_arrays(scene), stats, record={"label_source": scene.label_source},
                       result_stats={"points": stats["points"], "warnings": scene.warnings})


def _raw_folder(run: StageRun) -> tuple[str, ...]:
    return (str(Path(run.raw).resolve()),)


def _list_scenes(run: StageRun) -> list[str]:
    return list_raw_scenes(run.raw, run.cfg)


def _prepare(run: StageRun) -> None:
    """Check the raw folder and the reader options; create the store for the dataset's classes."""
    if run.raw is None or not Path(run.raw).is_dir():
        raise ConfigError(f"{run.raw}: raw folder not found")
    reader_cfg = run.cfg.reader_config()
    Store.create(run.store, dataset=run.cfg.dataset, class_names=class_names(run.cfg.dataset, reader_cfg))


INGEST = Stage(
    name="ingest", config=IngestConfig, help="Read raw scans into the store (one atomic scene group per scan).",
    reads=(), writes=schema.STAGE_GROUPS["ingest"], compute=compute, hashed=hashed_fields, hash_inputs=_raw_folder,
    list_scenes=_list_scenes, prepare=_prepare,
    options=(
        StageOption("dataset", ("--dataset", "-d"), " | ".join(readable_datasets()), required=True),
        StageOption("raw", ("--raw", "-r"), "The dataset's raw release folder.", raw=True, required=True),
    ),
)
"""The ingest stage."""
