"""What every dataset reader returns: a `RawScene` in the project's conventions.

Readers read raw release files only (no store I/O); `pipeline.ingest` writes their output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np


class SceneError(Exception):
    """A scene that cannot be read: names the scene, the file and what was wrong."""

    def __init__(self, scene_id: str, file: str | Path | None, message: str):
        self.scene_id = scene_id
        self.file = str(file) if file is not None else None
        self.message = message
        where = f" ({self.file})" if self.file else ""
        super().__init__(f"scene {scene_id}{where}: {message}")

    def __reduce__(self):  # keep the fields through pickling (Dask workers)
        return (SceneError, (self.scene_id, self.file, self.message))


@dataclass
class RawScene:
    """One scene in the project's conventions, ready to be written by ingest."""

    scene_id: str
    """Plain name (see `pipeline.schema.check_scene_id`)."""
    xyz: np.ndarray
    """float32 [N, 3], metres, world frame, z up."""
    rgb: np.ndarray
    """uint8 [N, 3]; LiDAR intensity as grey."""
    semantic: np.ndarray
    """int16 [N] training class ids (0..C-1) or IGNORE_INDEX."""
    instance: np.ndarray
    """int32 [N] instance ids, -1 where none."""
    kind: Literal["mesh", "points", "lidar"]
    """Decides the renderer: meshes are ray cast, point clouds splatted, LiDAR seen from the sensor."""
    faces: np.ndarray | None = None
    """int32 [F, 3] triangles (meshes only)."""
    sensor_origin: np.ndarray | None = None
    """float32 [3], LiDAR sensor position in the scene frame."""
    source_files: list[str] = field(default_factory=list)
    """The raw files read, for provenance."""
    warnings: list[str] = field(default_factory=list)
    """Things a person should know (labels missing from a table, skipped lines), with counts."""
    label_source: str = "annotations"
    """Where the labels came from: "annotations" (the dataset's own), "aggregation" or
    "labels-ply" (ScanNet: semantics only), "none" (unlabelled: IGNORE_INDEX, no instances)."""

    def validate(self) -> None:
        """Raise SceneError if arrays disagree or hold non-finite / empty data."""
        n = len(self.xyz)
        file = self.source_files[0] if self.source_files else None
        if n == 0:
            raise SceneError(self.scene_id, file, "scene has no points")
        if self.xyz.shape != (n, 3):
            raise SceneError(self.scene_id, file, f"xyz must be [N,3], got {self.xyz.shape}")
        if not np.isfinite(self.xyz).all():
            bad = int((~np.isfinite(self.xyz).all(axis=1)).sum())
            raise SceneError(self.scene_id, file, f"{bad} points have NaN or infinite coordinates")
        for name in ("rgb", "semantic", "instance"):
            arr = getattr(self, name)
            if len(arr) != n:
                raise SceneError(
                    self.scene_id, file, f"{name} has {len(arr)} entries for {n} points (count mismatch)"
                )
        if self.faces is not None and len(self.faces) and (self.faces.min() < 0 or self.faces.max() >= n):
            raise SceneError(self.scene_id, file, "faces index vertices out of range")
