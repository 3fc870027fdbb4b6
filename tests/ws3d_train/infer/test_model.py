"""`from ws3d_train import Model`: a run predicting and answering queries on arrays and files, no
store; the same labels from `ws3d predict --input`; its label space and thread count."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from pipeline import schema
from pipeline.clip.model import model_identity
from pipeline.store import Store
from tests.conftest import TINY_CLASSES, make_tiny_clip, make_tiny_scene, make_tiny_store, tiny_run_config
from tests.paths import ROOT
from ws3d_train.infer.predict import predict_scene

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ws3d_train.train.finetune import FinetuneConfig, finetune

    base = tmp_path_factory.mktemp("model")
    clip = make_tiny_clip(base / "clip")
    store = make_tiny_store(base / "store.zarr", n_scenes=1, n_points=800, seed=7)
    s = Store.open(store)
    text, attrs = s.read_vocab("classes")
    s.write_vocab("classes", text, {**attrs, "model": model_identity(str(clip))})
    run = base / "run"
    finetune(tiny_run_config(FinetuneConfig, store, batch_size=1, steps=1, labels="all", threads=1), run)
    scene = s.scene_ids()[0]
    return {"base": base, "store": store, "run": run, "scene": scene, "clip": clip,
            "xyz": s.read(scene, schema.XYZ), "rgb": s.read(scene, schema.RGB)}


def _write_ply(path, xyz, rgb):
    from plyfile import PlyData, PlyElement

    vertex = np.empty(len(xyz), [("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    vertex["x"], vertex["y"], vertex["z"] = xyz.T
    vertex["red"], vertex["green"], vertex["blue"] = rgb.T
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(path))


def test_predict_on_arrays_matches_the_store_path(setup):
    from ws3d_train import Model

    m = Model.load(setup["run"], device="cpu")
    out = m.predict(setup["xyz"], setup["rgb"], min_instance_points=5)
    ref = predict_scene(setup["run"], setup["store"], setup["scene"], device="cpu")
    n = len(setup["xyz"])
    assert out.class_names == tuple(TINY_CLASSES) and out.labels.shape == (n,) and out.labels.dtype == np.int64
    np.testing.assert_array_equal(out.labels, ref.pred_class)  # the evaluation's path, the same voxels and heads
    np.testing.assert_allclose(out.confidence, ref.score, atol=1e-5)
    scores = out.scores
    assert scores.shape == (n, len(TINY_CLASSES)) and scores.dtype == np.float32
    np.testing.assert_array_equal(scores.argmax(axis=1), out.labels)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-4)  # a distribution over the classes
    assert out.boundary.shape == (n,) and 0.0 <= out.boundary.min() and out.boundary.max() <= 1.0
    assert out.instance.shape == (n,) and out.instance.min() >= -1 and out.instance.max() < len(out.instance_class)
    assert out.segment is not None and out.segment.shape == (n,)  # over-segments computed on the fly
    assert {"voxelise", "network", "classify", "overseg", "instances"} <= set(out.timings)
    fast = m.predict(setup["xyz"], setup["rgb"], instances=False)
    np.testing.assert_array_equal(fast.labels, out.labels)
    assert (fast.instance == -1).all() and "overseg" not in fast.timings
    grey = m.predict(setup["xyz"])  # no colour: grey, as the files reader makes it
    assert grey.labels.shape == (n,)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        m.predict(setup["xyz"][:, :2])
    with pytest.raises(ValueError, match="NaN"):
        m.predict(np.where(np.arange(n)[:, None] == 3, np.nan, setup["xyz"]))


def test_per_voxel_classes_equal_the_per_point_heads_where_points_share_voxels(setup):
    """`Model.predict` picks each voxel's class once and hands it, its score and its boundary to
    the voxel's points; on a scan of several points a voxel that equals picking every point's class from
    its own copy of the heads (the evaluation's path: point_heads, predict_classes)."""
    from ws3d_train import Model
    from ws3d_train.infer.predict import class_probabilities, infer_points, point_heads, predict_classes

    m = Model.load(setup["run"], device="cpu")
    k = 10
    rng = np.random.default_rng(3)
    xyz = (np.repeat(setup["xyz"], k, axis=0) + rng.normal(0, 0.01, (k * len(setup["xyz"]), 3))).astype(np.float32)
    rgb = np.repeat(setup["rgb"], k, axis=0)
    out = m.predict(xyz, rgb, instances=False)
    assert len(out.voxel_scores) < len(xyz) / 4  # several points a voxel
    ref = infer_points(m.run, xyz, rgb, voxel_size=m.voxel_size_m)
    semantic, clip, _ = point_heads(ref, m.classes)
    cls, score = predict_classes(semantic, clip, m.classes, mode=m.combine)
    np.testing.assert_array_equal(out.labels, cls.numpy())
    assert "confidence" not in vars(out) and "boundary" not in vars(out)  # not built until asked for
    assert out.confidence.dtype == np.float32 and out.boundary.dtype == np.float32
    np.testing.assert_allclose(out.confidence, score.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.scores, class_probabilities(semantic, clip, m.classes, mode=m.combine).numpy(),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(out.boundary, ref.to_points(ref.boundary).numpy())
    assert out.confidence is out.confidence  # built once, then kept


def test_file_cli_and_api_give_the_same_labels(setup, tmp_path):
    from plyfile import PlyData

    from ws3d_train import Model

    scans = tmp_path / "scans"
    scans.mkdir()
    _write_ply(scans / "room.ply", setup["xyz"], setup["rgb"])
    np.save(scans / "room_b.npy", np.concatenate([setup["xyz"], setup["rgb"]], axis=1))
    (scans / "broken.pcd").write_bytes(b"# .PCD v0.7\nFIELDS x y z\nDATA ascii\n")
    m = Model.load(setup["run"], device="cpu")
    api = m.predict(setup["xyz"], setup["rgb"], min_instance_points=100)
    from_file = m.predict_file(scans / "room.ply", min_instance_points=100)
    np.testing.assert_array_equal(from_file.labels, api.labels)
    np.testing.assert_array_equal(from_file.instance, api.instance)
    assert from_file.timings["read"] > 0

    out = tmp_path / "pred"
    result = CliRunner().invoke(app, ["predict", "--run", str(setup["run"]), "--input", str(scans), "--out", str(out),
                                      "--device", "cpu"])
    assert result.exit_code == 1, result.output  # one bad scan: the others are written
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.pcd" in errors[0] and "Traceback" not in result.output
    for name in ("room", "room_b"):
        vertex = PlyData.read(str(out / f"{name}.ply"))["vertex"]
        np.testing.assert_array_equal(vertex["label"], api.labels)
        np.testing.assert_array_equal(vertex["instance"], api.instance)
        np.testing.assert_allclose(np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=1), setup["xyz"])
    single = tmp_path / "one.ply"
    result = CliRunner().invoke(app, ["predict", "--run", str(setup["run"]), "--input", str(scans / "room.ply"),
                                      "--out", str(single), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(PlyData.read(str(single))["vertex"]["label"], api.labels)
    result = CliRunner().invoke(app, ["predict", "--run", str(setup["run"]), "--input", str(scans / "room.ply"),
                                      "--out", str(single), "--device", "cpu", "--no-instances"])
    assert result.exit_code == 0 and "0 instances" in result.output, result.output
    vertex = PlyData.read(str(single))["vertex"]
    np.testing.assert_array_equal(vertex["label"], api.labels)
    assert (vertex["instance"] == -1).all() and (api.instance >= 0).any()


def test_threads_are_the_runs(setup):
    from ws3d_train import Model

    m = Model.load(setup["run"], device="cpu")
    assert m.run.threads == 1 and torch.get_num_threads() == 1  # the run trained on 1 thread
    torch.set_num_threads(2)  # as numba's OpenMP layer does after an over-segmentation
    m.predict(setup["xyz"], setup["rgb"], instances=False)
    assert torch.get_num_threads() == 1
    assert Model.load(setup["run"], device="cpu", threads=2).run.threads == 2
    torch.set_num_threads(1)


def test_importing_the_package_does_not_load_torch():
    code = ("import sys, ws3d_train, ws3d_train.bench, ws3d_train.viewer.core, pipeline.datasets.files; "
            "assert 'ws3d_train.infer.model' not in sys.modules and 'torch' not in sys.modules; "
            "from ws3d_train import Model; assert Model.__name__ == 'Model' and 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def _toy(seed: int, corner: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A grey tiny room with one 1.2 m square of its floor painted red."""
    arrays = make_tiny_scene(700, np.random.default_rng(seed), np.eye(5, 32))["ingest"]
    xyz = arrays[schema.XYZ]
    rgb = np.full((len(xyz), 3), 150, np.uint8)
    painted = ((xyz[:, 0] > corner[0]) & (xyz[:, 0] < corner[0] + 1.2) & (xyz[:, 1] > corner[1])
               & (xyz[:, 1] < corner[1] + 1.2) & (xyz[:, 2] < 0.05))
    rgb[painted] = [200, 30, 30]
    return xyz, rgb, painted


def test_a_query_ranks_a_painted_region_first(setup):
    """Teach the CLIP head of a run that red paint looks like "a red chair" (and the rest like "a
    grey wall") on one toy room, then ask another room, its paint elsewhere: the best segment of
    the query and its highest similarities are the painted ones."""
    from ws3d_train import Model
    from ws3d_train.infer.predict import voxel_input
    from ws3d_train.sparse import SparseTensor

    m = Model.load(setup["run"], device="cpu")
    red, grey = m.encode_text("a red chair"), m.encode_text("a grey wall")
    xyz, rgb, painted = _toy(1, (0.3, 0.3))
    inputs = voxel_input(xyz, rgb, m.run.data, m.voxel_size_m)
    voxel_painted = np.bincount(inputs.point_to_voxel, weights=painted, minlength=len(inputs.coords)) > 0
    target = torch.from_numpy(np.where(voxel_painted[:, None], red, grey)).float()
    model = m.run.model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-3)
    torch.manual_seed(0)
    for _ in range(30):
        out = model(SparseTensor(feats=inputs.feats, coords=inputs.coords))
        loss = (1 - torch.nn.functional.cosine_similarity(out.clip, target, dim=1)).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()

    xyz2, rgb2, painted2 = _toy(2, (2.2, 1.5))
    result = m.query_segments(xyz2, "a red chair", rgb2, top_k=3)
    segment = m.oversegment(xyz2, rgb2).segment
    best = result.segments[0]
    assert painted2[segment == best.segment].mean() > 0.9, result.segments
    assert all(painted2[segment == s.segment].mean() < 0.5 for s in result.segments[1:])
    sim = m.query(xyz2, "a red chair", rgb2)
    np.testing.assert_allclose(sim, result.similarity, atol=1e-6)
    assert sim.dtype == np.float32 and sim[painted2].mean() > sim[~painted2].mean() + 0.1
    top = np.argsort(-sim)[: int(painted2.sum()) // 2]
    assert painted2[top].mean() > 0.9


def test_a_store_of_another_class_list_is_predicted_and_scored_in_the_runs_label_space(setup, tmp_path):
    """A run trained on one class list, a store of the same scans under another (reordered, one
    class more): predictions come in the run's classes and the store's labels are scored by name."""
    from ws3d_train.infer.evaluate import evaluate

    s = Store.open(setup["store"])
    scene = setup["scene"]
    other_names = ["cabinet", "window", "table", "wall", "floor", "chair"]
    remap = np.array([other_names.index(n) for n in TINY_CLASSES])
    other = Store.create(tmp_path / "other.zarr", dataset="synthetic", class_names=other_names)
    for stage in ("ingest", "overseg", "render", "embed"):
        arrays = {spec: s.read(scene, spec) for spec in schema.arrays_of_stage(stage) if s.has(scene, spec)}
        if stage == "ingest":
            sem = arrays[schema.SEMANTIC]
            arrays[schema.SEMANTIC] = np.where(sem >= 0, remap[np.clip(sem, 0, None)], sem).astype(np.int16)
        other.write_stage(scene, stage, arrays, s.stage_record(scene, stage))
    pred = predict_scene(setup["run"], other.path, scene, device="cpu")
    ref = predict_scene(setup["run"], setup["store"], scene, device="cpu")
    assert pred.class_names == tuple(TINY_CLASSES)
    np.testing.assert_array_equal(pred.pred_class, ref.pred_class)
    mine = evaluate(setup["run"], setup["store"], [scene], device="cpu", min_region_size=5)
    theirs = evaluate(setup["run"], other.path, [scene], device="cpu", min_region_size=5)
    assert theirs["label_space"].startswith("run") and mine["label_space"] == "store"
    assert theirs["classes"] == TINY_CLASSES
    assert theirs["semantic"]["iou"] == pytest.approx(mine["semantic"]["iou"], nan_ok=True)
    assert theirs["open_vocab"]["combined"]["miou"] == pytest.approx(mine["open_vocab"]["combined"]["miou"])
