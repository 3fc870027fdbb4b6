"""What a dataset is to ws3d (:class:`Dataset`) and what its reader returns (:class:`RawScene`).

One module per dataset under `pipeline/datasets/` declares a :class:`Dataset`: its name, how a
scene id looks, its reader (listing and reading raw release files into :class:`RawScene`, no store
I/O) with the reader's config, and how its manifests under `data_manifests/<name>/` are read (scene
lists and splits, the raw label -> training id map). `pipeline.datasets` registers them in one
place; `pipeline.datasets.ingest` writes what the readers return.

Readers open raw files through :func:`open_raw` (or :func:`read_raw`): a FIFO, a device or a
folder where a file should be fails the scene at once, naming the file, instead of hanging or
reading for ever.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Literal

import numpy as np

from pipeline.errors import SUSPECT_KINDS, SceneError, is_suspect, tag, warning_kind  # noqa: F401 (re-exported)

_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def open_raw(scene_id: str, path: str | Path, mode: str = "rb", **kwargs: Any) -> IO[Any]:
    """Open a raw file for reading, refusing anything but a regular file.

    The file is opened without blocking and checked on its descriptor (no gap between check and
    use), so that a FIFO among the raw files (whose open or read waits for a writer for ever) or a
    device (endless) fails at once.

    Raises:
        SceneError naming the file: missing, unreadable, or not a regular file.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise SceneError(scene_id, path, "file is missing") from None
    except OSError as exc:
        raise SceneError(scene_id, path, f"cannot open: {exc.strerror or exc}") from None
    try:
        mode_bits = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode_bits):
            kind = next((name for test, name in _FILE_KINDS if test(mode_bits)), "not a regular file")
            raise SceneError(scene_id, path, f"is {kind}, not a regular file (a raw file must be one)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        raise


def read_raw(scene_id: str, path: str | Path) -> bytes:
    """The bytes of a raw file (see :func:`open_raw`)."""
    with open_raw(scene_id, path) as handle:
        try:
            return handle.read()
        except OSError as exc:
            raise SceneError(scene_id, path, f"cannot read: {exc.strerror or exc}") from None


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
    """Things a person should know (labels missing from a table, skipped lines), with counts;
    tagged with a kind by :func:`tag` (``[kind] message``), printed by ingest a line per scene and kind."""
    label_source: str = "annotations"
    """Where the labels came from: "annotations" (the dataset's own), "aggregation" or
    "labels-ply" (ScanNet: semantics only), "none" (unlabelled: IGNORE_INDEX, no instances)."""
    annotated_points: int | None = None
    """Points that carry a raw annotation (an object's label, a raw class other than
    "unlabelled"), whether or not it maps to a training class; None: every point of a labelled
    scan. Ingest checks the share of them that got a class (a wrong label table maps none)."""
    label_table: str | None = None
    """The file that mapped raw labels to training classes (named when most fail to map)."""

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


@dataclass(frozen=True)
class Dataset:
    """A dataset, declared once in its own module and registered in `pipeline.datasets`."""

    name: str
    """Its name (`--dataset`, the store's `dataset` attribute, its folder in `data_manifests/`)."""
    scene_id: re.Pattern[str]
    """What one of its scene ids looks like (on top of `pipeline.schema.check_scene_id`)."""
    reader_config: type | None = None
    """The frozen config dataclass of its reader (`ingest.reader.*` options); None: no reader
    (a label space with manifests only, e.g. ScanNet200)."""
    list_scenes: Callable[[Path, Any], list[str]] | None = None
    """`list_scenes(raw_dir, reader_cfg)`: the scene ids a raw release folder holds, sorted."""
    read_scene: Callable[..., RawScene] | None = None
    """`read_scene(raw_dir, scene_id, cfg=reader_cfg)`: one scene in the project's conventions."""
    scene_lists: Callable[[Path], dict[str, tuple[str, ...]]] | None = None
    """`scene_lists(folder)`: every named scene list (split) of its manifest folder, validated
    together, with "all"; None: no official lists (e.g. synthetic rooms)."""
    label_map: Callable[[Path, tuple[str, ...]], list[tuple[Any, int]]] | None = None
    """`label_map(folder, class_names)`: (raw label, training id or IGNORE_INDEX) pairs."""
    scenes_folder: str = ""
    """Manifest folder of its scene lists when it borrows another dataset's (ScanNet200 uses
    ScanNet's); empty: its own."""
    class_names: Callable[[Any], tuple[str, ...]] | None = None
    """`class_names(reader_cfg)`: the store's classes when the reader config chooses them (plain
    files); None: the dataset's own `data_manifests/<name>/classes.csv`."""
    folder_splits: Callable[[list[str]], dict[str, tuple[str, ...]]] | None = None
    """`folder_splits(scene_ids)`: splits derived from a store's scene ids (plain files: the top
    folder `train/`, `val/`, `test/`) for a dataset without scene lists."""

    @property
    def readable(self) -> bool:
        """Whether raw files of this dataset can be ingested."""
        return self.read_scene is not None

