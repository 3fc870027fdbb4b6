"""A store on object storage, end to end, against a real S3 server on 127.0.0.1 (moto's, its own
process): a workflow (ingest, overseg, render, embed) into ``s3://`` gives the arrays the same
workflow gives in a folder, `validate --deep` passes, pre-training reads it (several loader
workers too), and a kill -9 mid-stage then a rerun equals a clean run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from cli import app
from pipeline import schema
from pipeline.datasets import scannet
from pipeline.store import Store
from tests.conftest import tiny_run_config
from tests.paths import ROOT
from tests.synthdata import small_raw

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _arrays(url: str) -> dict:
    store = Store.open(url)
    return {(s, spec.group, spec.name): store.read(s, spec) for s in store.scene_ids()
            for spec in schema.SCENE_ARRAYS if store.has(s, spec)}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _workflow(tmp_path, raw, stages, model=None) -> str:
    wf = {"dataset": "synthetic", "raw": str(raw), "stages": list(stages), "executor": {"kind": "sync"},
          "render": {"max_views": 3, "width": 48, "height": 36}}
    if model is not None:
        wf["embed"] = {"model": str(model)}
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(wf))
    return str(path)


def test_a_workflow_into_s3_equals_one_into_a_folder_and_pretraining_reads_it(tmp_path, s3_store_url):
    from pipeline.teacher.config import TeacherConfig
    from pipeline.teacher.fit import random_teacher
    from ws3d_train.train.pretrain import PretrainConfig, pretrain

    raw = small_raw(tmp_path / "raw", 1)
    model = random_teacher(tmp_path / "clip", scannet.CLASS_NAMES,
                           TeacherConfig(vision_layers=1, text_layers=1, projection_dim=16))
    wf = _workflow(tmp_path, raw, ["ingest", "overseg", "render", "embed"], model)
    folder = str(tmp_path / "local.zarr")
    for store in (s3_store_url, folder):
        result = CliRunner().invoke(app, ["preprocess", "--workflow", wf, f"store={store}"])
        assert result.exit_code == 0, result.output
    assert _same(_arrays(s3_store_url), _arrays(folder))
    assert np.array_equal(Store.open(s3_store_url).read_vocab("classes")[0], Store.open(folder).read_vocab("classes")[0])
    result = CliRunner().invoke(app, ["validate", "-s", s3_store_url, "--deep"])
    assert result.exit_code == 0 and "0 problem(s)" in result.output, result.output
    summary = pretrain(tiny_run_config(PretrainConfig, s3_store_url, steps=2, batch_size=1), tmp_path / "run")
    assert summary["steps"] == 2 and np.isfinite(summary["loss_first"])
    assert not any(p.name.startswith("s3") for p in tmp_path.iterdir())  # nothing written to a local `s3:` folder


@pytest.mark.slow
def test_loader_workers_read_an_s3_store_like_the_main_process(tmp_path, s3_store_url):
    """Worker processes (spawned: the test never forks after torch started threads) open the store
    again and read what the main process reads."""
    import torch

    from tests.conftest import make_tiny_store
    from ws3d_train.data.dataset import DataConfig, SceneDataset

    make_tiny_store(s3_store_url, n_scenes=2, n_points=400)
    dataset = SceneDataset(s3_store_url, None, cfg=DataConfig(voxel_size_m=0.1), split="eval")
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    got = {sample.scene_id: sample for sample in loader}
    for i, scene_id in enumerate(dataset.scene_ids):
        assert np.array_equal(got[scene_id].coords, dataset[i].coords) and np.array_equal(got[scene_id].feats, dataset[i].feats)


def _kill_mid_run(cmd: list[str], url: str, minimum: int, total: int) -> int:
    """Start `cmd` in its own session, kill -9 the whole process group once `minimum` scenes are
    committed in `url`; return how many were."""
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done = len(Store.open(url).scene_ids())
        except Exception:  # the store is being created
            done = 0
        if done >= minimum:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI, and the scheduler and workers of a local cluster
    proc.wait()
    done = len(Store.open(url).scene_ids())
    assert minimum <= done < total, f"the kill was meant to land mid-run ({done} of {total} scenes done)"
    return done


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["sync", "local"])
def test_kill_minus_nine_on_s3_then_rerun_equals_a_clean_run(tmp_path, s3_store_url, executor):
    raw = small_raw(tmp_path / "raw", 6)
    clean = str(tmp_path / "clean.zarr")
    base = [sys.executable, "-m", "cli", "ingest", "-d", "synthetic", "-r", str(raw)]
    assert subprocess.run(base + ["-s", clean, "-x", "sync"], cwd=ROOT, capture_output=True).returncode == 0
    extra = ["executor.workers=2"] if executor == "local" else []
    done = _kill_mid_run(base + ["-s", s3_store_url, "-x", executor, *extra], s3_store_url, 2, 6)
    rerun = subprocess.run(base + ["-s", s3_store_url, "-x", "sync"], cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{done} skipped" in rerun.stdout  # committed scenes were not redone
    assert _same(_arrays(s3_store_url), _arrays(clean))
    result = CliRunner().invoke(app, ["validate", "-s", s3_store_url, "--deep"])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_every_stage_on_s3_with_the_local_executor_equals_the_sync_one(tmp_path, s3_store_url):
    from pipeline.teacher.config import TeacherConfig
    from pipeline.teacher.fit import random_teacher

    raw = small_raw(tmp_path / "raw", 3)
    model = random_teacher(tmp_path / "clip", scannet.CLASS_NAMES,
                           TeacherConfig(vision_layers=1, text_layers=1, projection_dim=16))
    wf = _workflow(tmp_path, raw, ["ingest", "overseg", "render", "embed"], model)
    folder = str(tmp_path / "sync.zarr")
    result = CliRunner().invoke(app, ["preprocess", "--workflow", wf, f"store={folder}"])
    assert result.exit_code == 0, result.output
    done = subprocess.run([sys.executable, "-m", "cli", "preprocess", "--workflow", wf, f"store={s3_store_url}",
                           "executor.kind=local", "executor.workers=2"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _same(_arrays(s3_store_url), _arrays(folder))
