"""The store schema: every array of a ws3d store, declared once.

A store is one Zarr v3 hierarchy per dataset run::

    <store>/                    attrs: schema_version, dataset, class_names, ignore_index
      scenes/<scene_id>/        written by `ingest` (attrs: the ingest stage record)
        points/  mesh/          ingest
        overseg/                overseg
        views/                  render
        clip/                   embed
      vocab/<name>/             text embeddings of a vocabulary (embed)

Each stage owns whole groups (`STAGE_GROUPS`). A stage's group is written under a temporary
directory and renamed into place when whole (see `pipeline.store`), so a group that exists is
complete; its attrs carry the stage record (config, config hash, schema version).

Dimension names used in `ArraySpec.dims`: N points, F faces, S segments, P adjacent segment
pairs, V views, H and W image size, M visible (view, point) entries, D embedding width,
C vocabulary size. Integers are fixed sizes.

Nothing outside this module spells an array path: use `ArraySpec.path(scene_id)`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

SCHEMA_VERSION = 1
"""Bumped whenever an array is added, removed or changes meaning; stores record it."""

IGNORE_INDEX = -100
"""The one ignore label of the project (semantic labels, losses, metrics)."""

SCENE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
"""Scene ids are plain names: no path separators, no `..`, no leading dot."""

VIEWS_PER_CHUNK = 8
"""Views per chunk of the image arrays."""

ROW_CHUNK = 1 << 18
"""Rows per chunk for per-point arrays: 262,144 rows keep a ScanNet scene in a few chunks."""


@dataclass(frozen=True)
class ArraySpec:
    """One array of a scene (or of a vocabulary) in the store."""

    group: str
    """Group inside the scene, e.g. "points"."""
    name: str
    """Array name inside the group, e.g. "xyz"."""
    dtype: str
    """NumPy dtype string."""
    dims: tuple[str | int, ...]
    """Dimension names (see module docstring) or fixed sizes."""
    doc: str
    """What the array holds, with units and frames."""
    optional: bool = False
    """Absent in some scenes (e.g. faces of point-cloud datasets)."""
    codec: str = "zstd"
    """Blosc compressor: "zstd" (small, for data read often) or "lz4" (fast, for bulky images
    written once per scene and rarely read: the render stage's write time matters)."""

    def path(self, scene_id: str) -> str:
        """The array's path inside the store for `scene_id`."""
        return f"scenes/{scene_id}/{self.group}/{self.name}"

    def chunks(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Chunking: images 8 views a chunk (few chunk writes, ~2 MB chunks), the rest by rows."""
        if not shape:
            return ()
        if self.dims and self.dims[0] == "V" and len(shape) > 2:
            return (max(1, min(shape[0], VIEWS_PER_CHUNK)), *shape[1:])
        return (max(1, min(shape[0], ROW_CHUNK)), *shape[1:])


# --- ingest -------------------------------------------------------------------------------
XYZ = ArraySpec("points", "xyz", "float32", ("N", 3), "point positions, metres, world frame (z up)")
RGB = ArraySpec("points", "rgb", "uint8", ("N", 3), "colour 0..255 (LiDAR: intensity as grey)")
SEMANTIC = ArraySpec(
    "points", "semantic", "int16", ("N",), "training class id, IGNORE_INDEX where unlabelled"
)
INSTANCE = ArraySpec("points", "instance", "int32", ("N",), "instance id, -1 where none")
FACES = ArraySpec("mesh", "faces", "int32", ("F", 3), "triangle vertex ids", optional=True)

# --- overseg ------------------------------------------------------------------------------
NORMAL = ArraySpec("overseg", "normal", "float16", ("N", 3), "unit normal (mesh or PCA)")
CURVATURE = ArraySpec("overseg", "curvature", "float16", ("N",), "surface variation l0/(l0+l1+l2)")
SEGMENT = ArraySpec("overseg", "segment", "int32", ("N",), "over-segment id in 0..S-1")
BOUNDARY = ArraySpec("overseg", "boundary", "uint8", ("N",), "1 where a neighbour is in another segment")
SEMANTIC_BOUNDARY = ArraySpec(
    "overseg", "semantic_boundary", "uint8", ("N",),
    "1 where a labelled neighbour has another label, 0 where not, 255 where unknown (no labels)",
)
ADJACENCY = ArraySpec("overseg", "adjacency", "int32", ("P", 2), "adjacent segment pairs (a < b)")
ADJACENCY_BORDER = ArraySpec(
    "overseg", "adjacency_border", "int32", ("P",), "points on the shared border of each pair"
)

# --- render -------------------------------------------------------------------------------
VIEW_RGB = ArraySpec("views", "rgb", "uint8", ("V", "H", "W", 3), "rendered colour", codec="lz4")
VIEW_DEPTH = ArraySpec("views", "depth", "float16", ("V", "H", "W"), "z-depth in metres, 0 = nothing", codec="lz4")
VIEW_POINT_INDEX = ArraySpec(
    "views", "point_index", "int32", ("V", "H", "W"), "point shown by each pixel, -1 = nothing", codec="lz4"
)
VIEW_K = ArraySpec("views", "K", "float32", ("V", 3, 3), "pinhole intrinsics, pixels")
VIEW_POSE = ArraySpec(
    "views", "pose", "float32", ("V", 4, 4), "world->camera, OpenCV (x right, y down, z forward)"
)
VISIBLE_PTR = ArraySpec("views", "visible_ptr", "int64", ("V+1",), "CSR offsets into visible_ids")
VISIBLE_IDS = ArraySpec("views", "visible_ids", "int32", ("M",), "point ids seen by each view (CSR)")
VIEW_COUNT = ArraySpec("views", "view_count", "uint16", ("N",), "number of views showing each point")

# --- embed --------------------------------------------------------------------------------
CLIP_VIEW = ArraySpec("clip", "view", "float16", ("V", "D"), "CLIP embedding of each view, unit")
CLIP_SEGMENT = ArraySpec("clip", "segment", "float16", ("S", "D"), "CLIP embedding per segment, unit")
CLIP_SEGMENT_SEEN = ArraySpec("clip", "segment_seen", "uint8", ("S",), "1 where the segment was seen")

VOCAB_TEXT = ArraySpec("vocab", "text", "float16", ("C", "D"), "text embedding per class name, unit")

STAGE_GROUPS: dict[str, tuple[str, ...]] = {
    "ingest": ("points", "mesh"),
    "overseg": ("overseg",),
    "render": ("views",),
    "embed": ("clip",),
}
"""Which groups each stage writes. `ingest` writes the scene group itself."""

SCENE_ARRAYS: tuple[ArraySpec, ...] = (
    XYZ, RGB, SEMANTIC, INSTANCE, FACES,
    NORMAL, CURVATURE, SEGMENT, BOUNDARY, SEMANTIC_BOUNDARY, ADJACENCY, ADJACENCY_BORDER,
    VIEW_RGB, VIEW_DEPTH, VIEW_POINT_INDEX, VIEW_K, VIEW_POSE, VISIBLE_PTR, VISIBLE_IDS, VIEW_COUNT,
    CLIP_VIEW, CLIP_SEGMENT, CLIP_SEGMENT_SEEN,
)


def arrays_of_group(group: str) -> tuple[ArraySpec, ...]:
    """All declared arrays of one group."""
    return tuple(spec for spec in SCENE_ARRAYS if spec.group == group)


def arrays_of_stage(stage: str) -> tuple[ArraySpec, ...]:
    """All declared arrays a stage writes."""
    return tuple(spec for group in STAGE_GROUPS[stage] for spec in arrays_of_group(group))


def check_scene_id(scene_id: str) -> str:
    """Return `scene_id` if it is a safe plain name, else raise ValueError saying why."""
    if not isinstance(scene_id, str) or not SCENE_ID_PATTERN.match(scene_id) or ".." in scene_id:
        raise ValueError(
            f"invalid scene id {scene_id!r}: expected letters, digits, '_', '-', '.', "
            "no path separators, no '..', not starting with '.'"
        )
    return scene_id


def coerce(spec: ArraySpec, array: np.ndarray) -> np.ndarray:
    """Cast `array` to the spec's dtype, checking its rank; raise ValueError naming the array."""
    array = np.asarray(array)
    if array.ndim != len(spec.dims):
        raise ValueError(
            f"{spec.group}/{spec.name}: expected {len(spec.dims)} dims {spec.dims}, got shape {array.shape}"
        )
    for axis, dim in enumerate(spec.dims):
        if isinstance(dim, int) and array.shape[axis] != dim:
            raise ValueError(f"{spec.group}/{spec.name}: axis {axis} must be {dim}, got {array.shape}")
    return np.ascontiguousarray(array.astype(spec.dtype, copy=False))
