"""The executor: sync vs local cluster, failures reported per scene, shards, the CLI end to end."""
from __future__ import annotations

import functools

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from pipeline import schema
from pipeline.executor import ExecutorConfig, read_scene_list, run_scenes, select_shard
from pipeline.datasets.ingest import INGEST, IngestConfig
from pipeline.datasets import scannet
from pipeline.store import Store
from tests.synthdata import small_raw
from tests.paths import ROOT


def _ingest_all(raw, store_path, kind):
    store = Store.create(store_path, dataset="synthetic", class_names=list(scannet.CLASS_NAMES))
    fn = functools.partial(INGEST.run_scene, str(store_path), cfg=IngestConfig(dataset="synthetic"), raw=str(raw))
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


def _fake_bin(folder, **commands):
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in commands.items():
        path = folder / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return folder


def test_a_cluster_without_its_submit_command_fails_at_once(tmp_path, monkeypatch):
    import time

    from pipeline.executor import ClusterError
    from pipeline.errors import UserError

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for kind, command in (("slurm", "sbatch"), ("pbs", "qsub")):
        start = time.perf_counter()
        with pytest.raises(ClusterError, match=command) as info:
            run_scenes("ingest", str, ["scene0000_00"], ExecutorConfig(kind=kind), progress=False)
        assert time.perf_counter() - start < 5 and isinstance(info.value, UserError)
        assert "executor.kind=local" in str(info.value)


def test_no_worker_joining_stops_with_the_command_queue_and_script(tmp_path, monkeypatch):
    """A fake `sbatch` accepts the job but nothing ever starts (a wrong queue, a job stuck pending):
    the run stops after worker_timeout_s naming sbatch, the queue and the job script."""
    import os
    import time

    from pipeline.executor import ClusterError

    fake = _fake_bin(tmp_path / "bin", sbatch='echo "Submitted batch job 4242"', scancel="exit 0", squeue="exit 0")
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    cfg = ExecutorConfig(kind="slurm", queue="gpu-nope", jobs=1, worker_timeout_s=2.0, job_dir=str(tmp_path / "jobs"))
    start = time.perf_counter()
    with pytest.raises(ClusterError) as info:
        run_scenes("ingest", str, ["scene0000_00"], cfg, progress=False)
    message = str(info.value)
    assert time.perf_counter() - start < 60
    script = tmp_path / "jobs" / "ws3d-slurm-job.sh"
    assert "`sbatch`" in message and "gpu-nope" in message and str(script) in message and "waited 2 s" in message
    assert script.is_file() and "#SBATCH" in script.read_text() and "gpu-nope" in script.read_text()


def test_workflows_run_locally_unless_a_cluster_is_asked_for():
    import subprocess

    from pipeline.workflow import load_workflow

    root = ROOT
    for name in ("scannet", "s3dis", "semantickitti", "synthetic"):
        assert load_workflow(root / "workflows" / f"{name}.yaml", []).executor.kind == "local", name
    assert load_workflow(root / "workflows" / "scannet.slurm.yaml", []).executor.kind == "slurm"
    assert load_workflow(root / "workflows" / "s3dis.pbs.yaml", []).executor.kind == "pbs"

    def planned(*args):
        out = subprocess.run(["make", "-n", "-s", "preprocess", *args], cwd=root, capture_output=True, text=True, check=True)
        return out.stdout.strip().splitlines()[-1]

    assert "workflows/scannet.yaml" in planned("DATASET=scannet") and "executor.kind" not in planned("DATASET=scannet")
    line = planned("DATASET=scannet", "EXECUTOR=slurm")
    assert "workflows/scannet.slurm.yaml" in line and "executor.kind=slurm" in line
    line = planned("DATASET=synthetic", "EXECUTOR=slurm")  # no synthetic.slurm.yaml: the default with kind=slurm
    assert "workflows/synthetic.yaml" in line and "executor.kind=slurm" in line
