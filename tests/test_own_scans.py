"""A folder of one's own scans (no dataset layout) through the CLI: ingest, over-segment, evaluate
a run of another class list on them with the default split, predict; and the whole chain
ingest, overseg, render, embed, pretrain, predict on plain files (about 7 s)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from pipeline import schema
from pipeline.datasets.scannet import CLASS_NAMES as SCANNET
from pipeline.store import Store
from tests.conftest import TINY_CLASSES, make_tiny_scene, make_tiny_store, tiny_run_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_scans(raw: Path, layout: dict[str, int], n_points: int = 700) -> None:
    """Tiny rooms as `.npy` files (x y z r g b label, labels as ScanNet class ids) at the given paths."""
    to_scannet = np.array([SCANNET.index(name) for name in TINY_CLASSES])
    for rel, seed in layout.items():
        arrays = make_tiny_scene(n_points, np.random.default_rng(seed), np.eye(len(TINY_CLASSES), 32))["ingest"]
        sem = arrays[schema.SEMANTIC]
        label = np.where(sem >= 0, to_scannet[np.clip(sem, 0, None)], -1)
        path = raw / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.concatenate([arrays[schema.XYZ], arrays[schema.RGB], label[:, None]], axis=1))


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{args}: exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result.output


def test_own_scans_ingest_overseg_eval_and_predict(tmp_path):
    from ws3d_train.train.finetune import FinetuneConfig, finetune

    raw = tmp_path / "scans"
    write_scans(raw, {"kitchen.npy": 1, "office.npy": 2})
    store = tmp_path / "mine.zarr"
    out = invoke("ingest", "--dataset", "files", "--raw", raw, "--store", store, "-x", "sync")
    assert "ingest: 2 done" in out and "columns-guessed" in out  # the guess is said, a line per scene
    # `overseg.voxel_m=` (the name the docs and workflows use) is taken by `ws3d overseg` as `voxel_m=`
    invoke("overseg", "--store", store, "-x", "sync", "overseg.voxel_m=0.03")
    s = Store.open(store)
    assert s.dataset == "files" and list(s.class_names) == list(SCANNET)
    assert s.stage_record("kitchen", "overseg")["config"]["voxel_m"] == 0.03

    # a run trained on another class list (the tiny store's 5 classes) evaluates on it by class name,
    # and `eval` without --split on a store without a val split evaluates every scan, saying so
    run = tmp_path / "run"
    finetune(tiny_run_config(FinetuneConfig, make_tiny_store(tmp_path / "tiny.zarr", n_scenes=1, n_points=600, seed=3),
                             batch_size=1, steps=1, labels="all", threads=1), run)
    result = CliRunner().invoke(app, ["eval", "--run", str(run), "--store", str(store), "--min-region-size", "5"])
    assert result.exit_code == 0, result.output
    assert "no 'val' split" in result.output and "on 2 scene(s)" in result.output
    assert (run / "eval" / "mine.all.json").is_file()
    invoke("predict", "--run", run, "--store", store, "--scene", "office", "--out", tmp_path / "office.ply")
    from plyfile import PlyData

    label = PlyData.read(str(tmp_path / "office.ply"))["vertex"]["label"]
    assert len(label) == s.shape("office", schema.XYZ)[0] and label.max() < len(TINY_CLASSES)  # the run's classes


def test_folder_splits_train_and_val(tmp_path):
    from ws3d_train.run import has_split, resolve_scene_ids

    raw = tmp_path / "scans"
    write_scans(raw, {"train/a.npy": 1, "train/b.npy": 2, "val/c.npy": 3}, n_points=200)
    invoke("ingest", "--dataset", "files", "--raw", raw, "--store", tmp_path / "s.zarr", "-x", "sync")
    s = Store.open(tmp_path / "s.zarr")
    assert resolve_scene_ids(s, "train") == ["train__a", "train__b"] and resolve_scene_ids(s, "val") == ["val__c"]
    assert has_split(s, "val") and not has_split(s, "test")


def test_a_folder_of_plain_scans_goes_through_every_stage(tmp_path):
    """ingest, overseg, render, embed (a tiny offline CLIP), pretrain, predict: plain files only."""
    from tests.conftest import make_tiny_clip

    raw = tmp_path / "scans"
    write_scans(raw, {"train/a.npy": 1, "train/b.npy": 2, "val/c.npy": 3}, n_points=900)
    store, clip, run = tmp_path / "s.zarr", make_tiny_clip(tmp_path / "clip"), tmp_path / "pre"
    invoke("ingest", "--dataset", "files", "--raw", raw, "--store", store, "-x", "sync")
    for stage in ("overseg", "render"):
        invoke(stage, "--store", store, "-x", "sync")
    invoke("embed", "--store", store, "--model", clip, "-x", "sync", "scales=[1.0]", "views_per_segment=1")
    invoke("validate", "--store", store)
    invoke("pretrain", "--store", store, "--out", run, "steps=2", "batch_size=1", "network.preset=tiny",
           "network.backend=torch", "data.voxel_size_m=0.1", "num_workers=0", "progress=false", "tensorboard=false",
           "threads=1")
    out = invoke("predict", "--run", run, "--input", raw / "val", "--out", tmp_path / "pred")
    assert "wrote" in out and (tmp_path / "pred" / "c.ply").is_file()
    from plyfile import PlyData

    vertex = PlyData.read(str(tmp_path / "pred" / "c.ply"))["vertex"]  # label, instance and boundary per vertex
    assert {"label", "instance", "boundary"} <= set(vertex.data.dtype.names)
    assert 0.0 <= vertex["boundary"].min() and vertex["boundary"].max() <= 1.0
    out = invoke("query", "a chair", "--run", run, "--input", raw / "val" / "c.npy", "--out", tmp_path / "q.ply")
    assert (tmp_path / "q.ply").is_file() and "rank" in out
