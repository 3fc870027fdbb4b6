"""The render stage: reads a scene from the store, renders it with the pure core
(`pipeline.render.core.render_scene`) and writes the `views` group.

Reads (ingest): `points/xyz`, `points/rgb`, `mesh/faces` (meshes only), `points/semantic` (for the
unseen-point statistics only) and the ingest record's stats (`kind`: "mesh" | "points" | "lidar",
optional `sensor_origin`).
Writes (`views/`): rgb u8 [V,H,W,3], depth f16 [V,H,W] (z-depth in metres, 0 = nothing),
point_index i32 [V,H,W] (-1 = nothing), K [V,3,3], pose [V,4,4] (world->camera, OpenCV),
the visible point ids of each view as CSR (visible_ptr, visible_ids), per-point view counts,
and coverage statistics in the stage record (with what stays unseen).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pipeline import schema
from pipeline.errors import SceneError, tag
from pipeline.render.config import RenderConfig
from pipeline.stage import Stage, StageOutput, StageRun
from pipeline.store import Store


def compute(store: Store, scene_id: str, cfg: RenderConfig, run: StageRun) -> StageOutput:
    """Render one ingested scene of the store."""
    from pipeline.render.core import render_scene  # Open3D and numba kernels: loaded when a scene runs

    ingest = store.stage_record(scene_id, "ingest") or {}
    ingest_stats = ingest.get("stats") or {}
    kind = ingest_stats.get("kind")
    if kind not in ("mesh", "points", "lidar"):
        raise SceneError(scene_id, None, f"ingest stats 'kind' must be mesh, points or lidar, got {kind!r}")
    if kind == "mesh" and not store.has(scene_id, schema.FACES):
        raise SceneError(scene_id, None, "kind is 'mesh' but the scene has no mesh/faces")
    # one read for all inputs; the labels only say which classes stay unseen
    wanted = [schema.XYZ, schema.RGB] + [schema.FACES] * (kind == "mesh")
    labelled = store.has(scene_id, schema.SEMANTIC)
    inputs = store.read_many(scene_id, wanted + [schema.SEMANTIC] * labelled)
    xyz, rgb = inputs[0], inputs[1]
    faces = inputs[2] if kind == "mesh" else None
    semantic = inputs[-1] if labelled else None
    if faces is not None and len(faces) == 0:
        raise SceneError(scene_id, None, "kind is 'mesh' but mesh/faces is empty")
    if len(xyz) == 0:
        raise SceneError(scene_id, None, "scene has no points")
    origin = ingest_stats.get("sensor_origin")
    result = render_scene(xyz, rgb, faces, kind=kind, cfg=cfg,
                          sensor_origin=None if origin is None else np.asarray(origin, dtype=np.float64))
    unseen = result.view_count == 0
    if unseen.any() and semantic is not None:  # which classes stay unseen
        classes = semantic[unseen][semantic[unseen] >= 0].astype(np.int64)
        if len(classes):
            counts = np.bincount(classes, minlength=len(store.class_names))
            share = counts / max(1, int(unseen.sum()))
            top = np.argsort(-counts, kind="stable")[:5]
            result.stats["unseen"]["by_class"] = {store.class_names[c]: round(float(share[c]), 4)
                                                  for c in top if counts[c] > 0}
    low = coverage_warning(result.stats.get("coverage"), kind)
    if low:
        result.stats["warnings"] = [*result.stats.get("warnings", []), low]
    return StageOutput(result.arrays(), result.stats)


LOW_COVERAGE = 0.5
"""Share of a scan's points seen by some view below which its render is suspect. Measured with
the default render config (docs/benchmarks.md, docs/datasets.md): a synthetic room 0.958, the real
ScanNet scan 0.951, the real SemanticKITTI sweep from its sensor 0.729, the real Open3D-ML sweep
(a map frame) 0.114 with the sensor assumed at the origin and 0.675 with `sensor_origin=auto`."""


def coverage_warning(coverage: float | None, kind: str) -> str | None:
    """A `low-coverage` warning when the views see less than :data:`LOW_COVERAGE` of the points."""
    if coverage is None or coverage >= LOW_COVERAGE:
        return None
    hint = ("a sweep in a map frame? set the sensor position (ingest reader.sensor_origin)" if kind == "lidar"
            else "cameras found little free space: a scan of an outdoor site or a single object?")
    return tag("low-coverage", f"the views see {100 * coverage:.0f}% of the points: {hint}")


def summarise(store: Any) -> dict[str, Any]:
    """Render stats over a store's scenes for `ws3d info`: scenes rendered, views, mean coverage."""
    records = [r for s in store.scene_ids() if (r := store.stage_record(s, "render")) is not None]
    cover = [r["stats"]["coverage"] for r in records if "coverage" in r.get("stats", {})]
    views = [r["stats"]["views"] for r in records if "views" in r.get("stats", {})]
    return {
        "scenes_rendered": len(records),
        "views": int(sum(views)),
        "mean_coverage": round(float(np.mean(cover)), 4) if cover else None,
        "min_coverage": round(float(np.min(cover)), 4) if cover else None,
    }


RENDER = Stage(
    name="render", config=RenderConfig,
    help="Render views with exact pixel -> point correspondence (ray casting / splatting).",
    reads=("points", "mesh"), writes=schema.STAGE_GROUPS["render"], upstream=("ingest",), compute=compute, summarise=summarise,
)
"""The render stage."""
