"""The executor: sync vs local cluster, failures reported per scene, shards, the CLI end to end."""
from __future__ import annotations

import functools

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from pipeline import schema
from pipeline.executor import ExecutorConfig, read_scene_list, run_scenes, select_shard
from pipeline.ingest import IngestConfig, run_scene as ingest_scene
from pipeline.readers import scannet
from pipeline.store import Store
from tests.synthdata import small_raw


def _ingest_all(raw, store_path, kind):
    store = Store.create(store_path, dataset="synthetic", class_names=list(scannet.CLASS_NAMES))
    fn = functools.partial(ingest_scene, str(store_path), str(raw), cfg=IngestConfig(dataset="synthetic"))
    return store, run_scenes("ingest", fn, scannet.list_scenes(raw), ExecutorConfig(kind=kind, workers=2), progress=False)


def test_sync_and_local_cluster_write_the_same_store(tmp_path):
    raw = small_raw(tmp_path / "raw", 3)
    # one bad scene among good ones: truncated PLY
    ply = raw / "scans" / "scene0001_00" / "scene0001_00_vh_clean_2.ply"
    ply.write_bytes(ply.read_bytes()[:1000])
    a, report_a = _ingest_all(raw, tmp_path / "a.zarr", "sync")
    b, report_b = _ingest_all(raw, tmp_path / "b.zarr", "local")
    for report in (report_a, report_b):
        assert [r.status for r in report.results] == ["done", "failed", "done"]
        failed = report.of("failed")[0]
        assert failed.file == str(ply) and "PLY" in failed.error
        assert "scene0001_00" in report.summary()
    assert a.scene_ids() == b.scene_ids() == ["scene0000_00", "scene0002_00"]
    for scene_id in a.scene_ids():
        for spec in schema.arrays_of_stage("ingest"):
            assert np.array_equal(a.read(scene_id, spec), b.read(scene_id, spec))


def test_shards_partition_and_scene_lists_are_checked(tmp_path):
    ids = [f"scene{i:04d}_00" for i in range(10)]
    shards = [select_shard(ids, f"{i}/3") for i in range(3)]
    assert sorted(sum(shards, [])) == ids and not set(shards[0]) & set(shards[1])
    with pytest.raises(ValueError):
        select_shard(ids, "3/3")
    listing = tmp_path / "list.txt"
    listing.write_text("scene0000_00\n# comment\n../../etc/passwd\n")
    with pytest.raises(ValueError, match="list.txt:3"):
        read_scene_list(listing)


def test_cli_ingest_validate_info_and_rerun(tmp_path):
    raw = small_raw(tmp_path / "raw", 2)
    runner = CliRunner()
    store = tmp_path / "s.zarr"
    result = runner.invoke(app, ["ingest", "-d", "synthetic", "-r", str(raw), "-s", str(store), "-x", "sync"])
    assert result.exit_code == 0, result.output
    assert "2 done" in result.output
    result = runner.invoke(app, ["ingest", "-d", "synthetic", "-r", str(raw), "-s", str(store), "-x", "sync"])
    assert "2 skipped" in result.output
    result = runner.invoke(app, ["validate", "-s", str(store)])
    assert result.exit_code == 0 and "0 problem" in result.output
    result = runner.invoke(app, ["info", "-s", str(store)])
    assert result.exit_code == 0 and "scene0001_00" in result.output
    # a broken scene makes the run exit non-zero with the summary, the other scene still done
    (raw / "scans" / "scene0001_00" / "scene0001_00.aggregation.json").write_text("{not json")
    result = runner.invoke(app, ["ingest", "-d", "synthetic", "-r", str(raw), "-s", str(tmp_path / "t.zarr"), "-x", "sync"])
    assert result.exit_code == 1
    assert "FAILED scene0001_00" in result.output and "aggregation.json" in result.output
    assert Store.open(tmp_path / "t.zarr").scene_ids() == ["scene0000_00"]
