"""The overseg stage: reads a scene's points (and faces) from the store, over-segments them with
the pure core (`pipeline.overseg.core.overseg_points`) and writes the `overseg` group.

Reads `points/xyz`, `points/rgb`, `points/semantic`, `points/instance` (purity only) and
`mesh/faces` (meshes); writes `schema.NORMAL, CURVATURE, SEGMENT, BOUNDARY, SEMANTIC_BOUNDARY,
ADJACENCY, ADJACENCY_BORDER`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pipeline import schema
from pipeline.errors import SceneError
from pipeline.overseg.config import OversegConfig
from pipeline.stage import Stage, StageOutput, StageRun
from pipeline.store import Store


def compute(store: Store, scene_id: str, cfg: OversegConfig, run: StageRun) -> StageOutput:
    """Over-segment one ingested scene of the store."""
    from pipeline.overseg.core import overseg_points  # numba kernels: loaded when a scene runs
    from pipeline.overseg.regions import purity

    ingest = store.stage_record(scene_id, "ingest") or {}
    xyz = store.read(scene_id, schema.XYZ)
    rgb = store.read(scene_id, schema.RGB)
    n = len(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3 or n == 0:
        raise SceneError(scene_id, None, f"points/xyz must be a non-empty [N, 3] array, got {xyz.shape}")
    if not np.isfinite(xyz).all():
        raise SceneError(scene_id, None, "points/xyz holds NaN or infinite coordinates")
    if rgb.shape != (n, 3):
        raise SceneError(scene_id, None, f"points/rgb must be [{n}, 3] like xyz, got {rgb.shape}")
    semantic = store.read(scene_id, schema.SEMANTIC) if store.has(scene_id, schema.SEMANTIC) else None
    if semantic is not None and semantic.shape != (n,):
        raise SceneError(scene_id, None, f"points/semantic must be [{n}], got {semantic.shape}")
    faces = store.read(scene_id, schema.FACES) if store.has(scene_id, schema.FACES) else None
    if faces is not None and len(faces) and (faces.min() < 0 or faces.max() >= n):
        raise SceneError(scene_id, None, f"mesh/faces index vertices outside 0..{n - 1}")
    stats_in = ingest.get("stats", {}) or {}
    viewpoint = None
    if stats_in.get("kind") == "lidar":
        origin = stats_in.get("sensor_origin")
        viewpoint = np.asarray(origin if origin is not None else (0.0, 0.0, 0.0), np.float64)
    result = overseg_points(xyz, rgb, faces=faces, semantic=semantic, viewpoint=viewpoint, cfg=cfg)
    stats: dict[str, Any] = {
        "points": int(n),
        "segments": result.n_segments,
        "points_per_segment": float(n / max(1, result.n_segments)),
        "boundary_fraction": float(result.boundary.mean()),
        "adjacent_pairs": int(len(result.adjacency)),
        "normals": "mesh" if faces is not None and len(faces) else "pca",
        "seconds": {k: round(v, 4) for k, v in result.timings.items()},
    }
    if store.has(scene_id, schema.INSTANCE):  # only where instances are annotated
        p = purity(result.segment, store.read(scene_id, schema.INSTANCE))
        if not np.isnan(p):
            stats["purity"] = p
    arrays = {
        schema.NORMAL: result.normal, schema.CURVATURE: result.curvature, schema.SEGMENT: result.segment,
        schema.BOUNDARY: result.boundary, schema.SEMANTIC_BOUNDARY: result.semantic_boundary,
        schema.ADJACENCY: result.adjacency, schema.ADJACENCY_BORDER: result.adjacency_border,
    }
    return StageOutput(arrays, stats)


def summarise(store: Store) -> dict[str, Any]:
    """Segment counts and purity over the store's over-segmented scenes (for `ws3d info`)."""
    counts, purities, pps = [], [], []
    for scene_id in store.scene_ids():
        record = store.stage_record(scene_id, "overseg")
        if record is None:
            continue
        stats = record.get("stats", {})
        counts.append(int(stats.get("segments", 0)))
        pps.append(float(stats.get("points_per_segment", 0.0)))
        if stats.get("purity") is not None:
            purities.append(float(stats["purity"]))
    return {
        "scenes": len(counts),
        "segments_total": int(sum(counts)),
        "segments_mean": float(np.mean(counts)) if counts else 0.0,
        "segments_min": int(min(counts)) if counts else 0,
        "segments_max": int(max(counts)) if counts else 0,
        "points_per_segment_mean": float(np.mean(pps)) if pps else 0.0,
        "purity_mean": float(np.mean(purities)) if purities else None,
        "purity_min": float(min(purities)) if purities else None,
    }


OVERSEG = Stage(
    name="overseg", config=OversegConfig,
    help="Over-segment scenes: normals, PFH, region growing, boundaries, segment graph.",
    reads=("points", "mesh"), writes=schema.STAGE_GROUPS["overseg"], upstream=("ingest",), compute=compute, summarise=summarise,
)
"""The overseg stage."""
