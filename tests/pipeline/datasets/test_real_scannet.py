"""The real ScanNet sample (`../shared/data/scannet/scans/scene0470_00`): render coverage with exact
visibility, ingest through the store. Skips with a reason when the sample is absent."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import schema
from pipeline.datasets.ingest import INGEST, IngestConfig
from pipeline.datasets import scannet
from pipeline.render.config import RenderConfig
from pipeline.render.raycast import build_raycaster
from pipeline.render.visibility import exact_visible
from pipeline.render.core import render_scene
from pipeline.store import Store
from pipeline.summary import format_summary, summarise_store
from tests.synthdata import SHARED_DATA

RAW = SHARED_DATA / "scannet"
SCENE = "scene0470_00"
pytestmark = pytest.mark.skipif(not (RAW / "scans" / SCENE).is_dir(),
                                reason=f"real ScanNet sample absent ({RAW}/scans/{SCENE})")


def test_real_scan_ingests_with_semantics_only(tmp_path):
    store = Store.create(tmp_path / "s.zarr", dataset="scannet", class_names=list(scannet.CLASS_NAMES))
    assert INGEST.run_scene(str(store.path), SCENE, IngestConfig(dataset="scannet"), raw=str(RAW)).status == "done"
    record = store.stage_record(SCENE, "ingest")
    assert record["label_source"] == "labels-ply" and record["stats"]["instances"] == 0
    assert record["stats"]["labelled_fraction"] > 0.5
    assert (store.read(SCENE, schema.INSTANCE) == -1).all()
    assert "labels-ply (semantics only)" in format_summary(summarise_store(store))


@pytest.mark.slow
def test_real_scan_coverage_and_exact_lists():
    scene = scannet.read_scene(RAW, SCENE)
    cfg = RenderConfig()
    res = render_scene(scene.xyz, scene.rgb, scene.faces, kind="mesh", cfg=cfg)
    assert res.stats["views"] <= 20 and res.stats["coverage"] >= 0.95, res.stats
    assert {"share", "near_floor", "facing_down"} <= set(res.stats["unseen"])
    # every listed point is exactly visible (a ray from the camera reaches it within 1 cm)
    raycaster = build_raycaster(scene.xyz, scene.faces)
    exact = exact_visible(raycaster, scene.xyz, res.pose[:4].astype(np.float64), res.K[0].astype(np.float64),
                          cfg.height, cfg.width, tol_m=cfg.visibility_tol_m)
    for v in range(4):
        listed = res.visible_ids[res.visible_ptr[v]:res.visible_ptr[v + 1]]
        assert exact[v, listed].all()
        assert len(listed) >= 0.99 * exact[v].sum()
