"""The ingest stage: raw dataset files -> the `points/` and `mesh/` groups of a scene in the store.

Reads raw files through the dataset's reader (`pipeline.datasets`); writes `schema.XYZ, RGB,
SEMANTIC, INSTANCE` and `FACES` (meshes) in one atomic scene write, with the reader's warnings and
stats in the record. Its config hash covers the config and the raw folder it read.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import schema
from pipeline.config import ConfigError, from_dict
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


def clean_scene(scene: RawScene, cfg: IngestConfig) -> RawScene:
    """Check a reader's output and drop exact duplicate points of point clouds (with a warning)."""
    scene.validate()
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
    reads=(), writes=schema.STAGE_GROUPS["ingest"], compute=compute, hash_inputs=_raw_folder,
    list_scenes=_list_scenes, prepare=_prepare,
    options=(
        StageOption("dataset", ("--dataset", "-d"), " | ".join(readable_datasets()), required=True),
        StageOption("raw", ("--raw", "-r"), "The dataset's raw release folder.", raw=True, required=True),
    ),
)
"""The ingest stage."""
