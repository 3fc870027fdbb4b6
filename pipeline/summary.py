"""`ws3d info`: a summary of a store (scenes, points, classes, instances, stages, segments), with
each stage's own figures over the store (`Stage.summarise`).

Reads stage records (attrs) and a few small arrays; writes nothing.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pipeline import schema
from pipeline.stages import STAGES
from pipeline.store import Store


def summarise_store(store: Store) -> dict[str, Any]:
    """Per-scene and total figures, from the stage records (cheap) and segment/instance arrays."""
    rows = []
    class_points = np.zeros(len(store.class_names), dtype=np.int64)
    for scene_id in store.scene_ids():
        record = store.stage_record(scene_id, "ingest") or {}
        stats = record.get("stats", {})
        row: dict[str, Any] = {
            "scene": scene_id, "kind": stats.get("kind"), "points": stats.get("points"),
            "instances": stats.get("instances"), "warnings": len(stats.get("warnings", [])),
            "labels": stats.get("labels", stats.get("label_source", "annotations")),
            "stages": [s for s in schema.STAGE_GROUPS if store.stage_record(scene_id, s) is not None],
        }
        class_points += np.asarray(stats.get("class_points", [0] * len(class_points)), dtype=np.int64)
        overseg = store.stage_record(scene_id, "overseg")
        if overseg is not None:
            row["segments"] = overseg.get("stats", {}).get("segments")
            row["purity"] = overseg.get("stats", {}).get("purity")
        render = store.stage_record(scene_id, "render")
        if render is not None:
            row["views"] = render.get("stats", {}).get("views")
            row["coverage"] = render.get("stats", {}).get("coverage")
        embed = store.stage_record(scene_id, "embed")
        if embed is not None:  # segment crops through the CLIP encoder (the stage's cost)
            row["crops"] = embed.get("stats", {}).get("crops")
        rows.append(row)
    present = [name for name, count in zip(store.class_names, class_points) if count > 0]
    return {
        "store": str(store.path), "dataset": store.dataset, "schema_version": store.attrs["schema_version"],
        "scenes": len(rows), "points": int(sum(r["points"] or 0 for r in rows)),
        "instances": int(sum(r["instances"] or 0 for r in rows)),
        "classes_present": present, "class_points": dict(zip(store.class_names, class_points.tolist())),
        "vocabularies": store.vocab_names(), "per_scene": rows,
        "label_sources": {src: sum(1 for r in rows if r["labels"] == src) for src in sorted({r["labels"] for r in rows})},
        "stage_summaries": {stage.name: stage.summarise(store) for stage in STAGES if stage.summarise is not None},
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A readable table."""
    lines = [
        f"store {summary['store']}  dataset={summary['dataset']}  schema v{summary['schema_version']}",
        f"{summary['scenes']} scenes, {summary['points']:,} points, {summary['instances']} instances, "
        f"{len(summary['classes_present'])} classes present: {', '.join(summary['classes_present'])}",
        f"vocabularies: {', '.join(summary['vocabularies']) or '-'}",
        "labels: " + (", ".join(f"{src} x{n}" for src, n in summary.get("label_sources", {}).items()) or "-"),
        "",
        f"{'scene':<24}{'kind':<7}{'points':>10}{'inst':>6}{'segs':>7}{'purity':>8}{'views':>6}{'cover':>7}  "
        f"{'labels':<29}stages",
    ]
    for r in summary["per_scene"]:
        def fmt(value: Any, spec: str) -> str:
            return format(value, spec) if isinstance(value, (int, float)) else "-"
        lines.append(
            f"{r['scene']:<24}{str(r['kind']):<7}{fmt(r['points'], ',d'):>10}{fmt(r['instances'], 'd'):>6}"
            f"{fmt(r.get('segments'), 'd'):>7}{fmt(r.get('purity'), '.3f'):>8}{fmt(r.get('views'), 'd'):>6}"
            f"{fmt(r.get('coverage'), '.3f'):>7}  {str(r.get('labels', '-')):<29}{','.join(r['stages'])}"
        )
    return "\n".join(lines)
