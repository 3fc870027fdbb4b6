"""Ingest: raw dataset files -> the `points/` and `mesh/` groups of a scene in the store.

Reads raw files through `pipeline.readers`; writes `schema.XYZ, RGB, SEMANTIC, INSTANCE` and
`FACES` (meshes) in one atomic scene write, with the reader's warnings and stats in the record.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import schema
from pipeline.config import config_hash, from_dict, to_dict
from pipeline.executor import SceneResult
from pipeline.readers import get_reader
from pipeline.readers.base import RawScene, SceneError
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
    """scannet | synthetic | s3dis | semantickitti."""
    reader: dict[str, Any] = field(default_factory=dict)
    """Options of the dataset's reader config (e.g. reader.label_table=..., reader.merge_scans=3)."""
    dedupe_points: bool = True
    """Drop exact duplicate points of point clouds (not meshes), counted in a warning."""

    def reader_config(self) -> Any:
        _, cls = get_reader(self.dataset)
        return from_dict(cls, dict(self.reader), where="ingest.reader")


def class_names(dataset: str) -> list[str]:
    module, _ = get_reader(dataset)
    return list(module.CLASS_NAMES)


def list_raw_scenes(raw_dir: str | Path, cfg: IngestConfig) -> list[str]:
    module, _ = get_reader(cfg.dataset)
    return module.list_scenes(Path(raw_dir), cfg.reader_config()) if _takes_cfg(module.list_scenes) \
        else module.list_scenes(Path(raw_dir))


def _takes_cfg(fn) -> bool:
    import inspect

    return len(inspect.signature(fn).parameters) > 1


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
                warnings=scene.warnings + [f"{dropped} duplicate point(s) dropped"],
            )
    if len(scene.xyz) < 4 or float(np.ptp(scene.xyz, axis=0).max()) == 0.0:
        raise SceneError(scene.scene_id, scene.source_files[0] if scene.source_files else None,
                         "degenerate scene: fewer than 4 points or all points identical")
    return scene


def scene_arrays(scene: RawScene) -> dict[schema.ArraySpec, np.ndarray]:
    arrays = {schema.XYZ: scene.xyz, schema.RGB: scene.rgb, schema.SEMANTIC: scene.semantic,
              schema.INSTANCE: scene.instance}
    if scene.faces is not None:
        arrays[schema.FACES] = scene.faces
    return arrays


def run_scene(store_path: str, raw_dir: str, scene_id: str, cfg: IngestConfig, force: bool = False) -> SceneResult:
    """Read one raw scene and write it into the store (skipped when complete with this config)."""
    store = Store.open(store_path)
    h = config_hash(cfg, str(Path(raw_dir).resolve()))
    if not force and store.is_complete(scene_id, "ingest", h):
        return SceneResult(scene_id, "skipped")
    module, _ = get_reader(cfg.dataset)
    scene = clean_scene(module.read_scene(Path(raw_dir), scene_id, cfg=cfg.reader_config()), cfg)
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
    store.write_stage(scene_id, "ingest", scene_arrays(scene),
                      {"config": to_dict(cfg), "config_hash": h, "stats": stats, "label_source": scene.label_source})
    return SceneResult(scene_id, "done", stats={"points": stats["points"], "warnings": scene.warnings})
