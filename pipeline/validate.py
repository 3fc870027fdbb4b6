"""Validation of a store against `pipeline.schema`: shapes, dtypes, dimension agreement, ranges;
and the scans that passed their stages with suspect warnings (:data:`pipeline.errors.SUSPECT_KINDS`:
black views, a LiDAR sweep in a map frame, most labels lost, unannotated points dropped, views
that see little), flagged.

Reads every array of every scene (or the listed ones); writes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline import schema
from pipeline.errors import is_suspect, warning_kind
from pipeline.store import Store


@dataclass
class Problem:
    scene_id: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.scene_id}: {self.where}: {self.message}"


@dataclass
class ValidationReport:
    scenes: int = 0
    problems: list[Problem] = field(default_factory=list)
    flagged: list[Problem] = field(default_factory=list)
    """Scenes whose stage records hold suspect warnings (where = the stage and the warning's kind)."""

    @property
    def ok(self) -> bool:
        return not self.problems and not self.flagged


def suspect_warnings(store: Store, scene_id: str) -> list[Problem]:
    """The suspect warnings kept in a scene's stage records, one :class:`Problem` each."""
    out = []
    for stage in schema.STAGE_GROUPS:
        record = store.stage_record(scene_id, stage) or {}
        for text in (record.get("stats") or {}).get("warnings") or ():
            if is_suspect(str(text)):
                kind, message = warning_kind(str(text))
                out.append(Problem(scene_id, f"{stage} [{kind}]", message))
    return out


def validate_scene(store: Store, scene_id: str) -> list[Problem]:
    """All problems of one scene (empty list when it follows the schema)."""
    problems: list[Problem] = []
    dims: dict[str, int] = {}

    def bad(where: str, message: str) -> None:
        problems.append(Problem(scene_id, where, message))

    arrays: dict[schema.ArraySpec, np.ndarray] = {}
    for stage, groups in schema.STAGE_GROUPS.items():
        present = [g for g in groups if store.has_group(scene_id, g)]
        if not present:
            if stage == "ingest":
                bad("points", "group missing (ingest incomplete)")
            continue
        if store.stage_record(scene_id, stage) is None:
            bad(stage, "stage record (attrs) missing")
        for spec in schema.arrays_of_stage(stage):
            name = f"{spec.group}/{spec.name}"
            if not store.has(scene_id, spec):
                if not spec.optional:
                    bad(name, "array missing")
                continue
            try:
                data = store.read(scene_id, spec)
            except Exception as exc:  # corrupt chunks surface as various codec/IO errors
                bad(name, f"unreadable: {type(exc).__name__}: {exc}")
                continue
            if data.dtype != np.dtype(spec.dtype):
                bad(name, f"dtype {data.dtype}, schema says {spec.dtype}")
            if data.ndim != len(spec.dims):
                bad(name, f"shape {data.shape}, schema dims {spec.dims}")
                continue
            for axis, dim in enumerate(spec.dims):
                size = data.shape[axis]
                if isinstance(dim, int):
                    if size != dim:
                        bad(name, f"axis {axis} is {size}, schema says {dim}")
                elif dim == "V+1":
                    dims.setdefault("V", size - 1)
                    if dims["V"] != size - 1:
                        bad(name, f"has {size} offsets for {dims['V']} views")
                elif dims.setdefault(dim, size) != size:
                    bad(name, f"dimension {dim} is {size} but {dims[dim]} elsewhere in the scene")
            arrays[spec] = data
    _check_values(arrays, dims, len(store.class_names), bad)
    return problems


def _check_values(arrays, dims, n_classes, bad) -> None:
    n = dims.get("N", 0)
    if schema.XYZ in arrays and not np.isfinite(arrays[schema.XYZ]).all():
        bad("points/xyz", "NaN or infinite coordinates")
    if schema.SEMANTIC in arrays:
        sem = arrays[schema.SEMANTIC]
        ok = (sem == schema.IGNORE_INDEX) | ((sem >= 0) & (sem < n_classes))
        if not ok.all():
            bad("points/semantic", f"{int((~ok).sum())} labels outside 0..{n_classes - 1} and not IGNORE_INDEX")
    if schema.FACES in arrays and arrays[schema.FACES].size:
        faces = arrays[schema.FACES]
        if faces.min() < 0 or faces.max() >= n:
            bad("mesh/faces", "vertex index out of range")
    if schema.SEGMENT in arrays:
        seg = arrays[schema.SEGMENT]
        if seg.size and (seg.min() < 0 or len(np.unique(seg)) != seg.max() + 1):
            bad("overseg/segment", "segment ids are not contiguous 0..S-1")
        dims["S"] = int(seg.max()) + 1 if seg.size else 0
        if schema.ADJACENCY in arrays and arrays[schema.ADJACENCY].size:
            adj = arrays[schema.ADJACENCY]
            if adj.min() < 0 or adj.max() >= dims["S"] or (adj[:, 0] >= adj[:, 1]).any():
                bad("overseg/adjacency", "pairs must be segment ids with a < b")
        if schema.CLIP_SEGMENT in arrays and len(arrays[schema.CLIP_SEGMENT]) != dims["S"]:
            bad("clip/segment", f"{len(arrays[schema.CLIP_SEGMENT])} rows for {dims['S']} segments")
    if schema.VIEW_POINT_INDEX in arrays:
        idx = arrays[schema.VIEW_POINT_INDEX]
        if idx.size and (idx.min() < -1 or idx.max() >= n):
            bad("views/point_index", "point ids outside -1..N-1")
    if schema.VISIBLE_PTR in arrays and schema.VISIBLE_IDS in arrays:
        ptr, ids = arrays[schema.VISIBLE_PTR], arrays[schema.VISIBLE_IDS]
        if ptr[0] != 0 or ptr[-1] != len(ids) or (np.diff(ptr) < 0).any():
            bad("views/visible_ptr", "not a valid CSR offset array")
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            bad("views/visible_ids", "point ids out of range")
    for spec in (schema.CLIP_VIEW, schema.CLIP_SEGMENT):
        if spec in arrays and not np.isfinite(arrays[spec].astype(np.float32)).all():
            bad(f"{spec.group}/{spec.name}", "NaN or infinite embeddings")


def validate_store(store: Store, scene_ids: list[str] | None = None) -> ValidationReport:
    """Validate the listed (default: all) scenes and the vocabularies."""
    report = ValidationReport()
    ids = scene_ids if scene_ids is not None else store.scene_ids()
    for scene_id in ids:
        report.scenes += 1
        if not store.has_scene(scene_id):
            report.problems.append(Problem(scene_id, "-", "scene not in the store"))
            continue
        report.problems.extend(validate_scene(store, scene_id))
        report.flagged.extend(suspect_warnings(store, scene_id))
    for name in store.vocab_names():
        text, attrs = store.read_vocab(name)
        if len(attrs.get("names", [])) != len(text):
            report.problems.append(Problem("vocab", name, f"{len(text)} embeddings for {len(attrs.get('names', []))} names"))
    return report
