"""Prediction and open-vocabulary queries: PLY files that Open3D reads back, a tiny offline CLIP."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import schema
from pipeline.clip.model import load_encoder, model_identity
from pipeline.config import ConfigError
from pipeline.store import Store
from tests.conftest import TINY_CLASSES, TINY_CLIP_DIM, make_tiny_clip, make_tiny_store, tiny_run_config
from ws3d_train.train.finetune import FinetuneConfig, finetune
from ws3d_train.infer.predict import class_palette, clip_model_of_store, format_query, predict_scene, query_scene, write_heatmap_ply, write_prediction_ply
from ws3d_train.run import load_run

o3d = pytest.importorskip("open3d")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def store(tmp_path_factory, clip_dir):
    path = make_tiny_store(tmp_path_factory.mktemp("pr") / "store", n_scenes=1, n_points=800, seed=7)
    s = Store.open(path)
    text, attrs = s.read_vocab("classes")
    # record the model as `ws3d embed` does: its identity string
    s.write_vocab("classes", text, {**attrs, "model": model_identity(str(clip_dir))})
    return path


@pytest.fixture(scope="module")
def run(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("pr_run") / "run"
    finetune(tiny_run_config(FinetuneConfig, store, batch_size=1, steps=1, labels="all"), out)
    return out


def test_class_palette_is_fixed_and_distinct():
    a, b = class_palette(25), class_palette(25)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (25, 3) and a.dtype == np.uint8
    assert len({tuple(c) for c in a}) == 25
    np.testing.assert_array_equal(class_palette(5), a[:5])


def test_prediction_ply_round_trip(tmp_path):
    from plyfile import PlyData

    rng = np.random.default_rng(0)
    xyz = rng.uniform(0, 3, (500, 3)).astype(np.float32)
    cls = rng.integers(-3, 5, 500)  # below -1: unknown too (black)
    inst = rng.integers(-1, 9, 500)
    path = write_prediction_ply(tmp_path / "sub" / "pred.ply", xyz, cls, inst, num_classes=5)
    pcd = o3d.io.read_point_cloud(str(path))
    assert len(pcd.points) == 500 and pcd.has_colors()
    np.testing.assert_allclose(np.asarray(pcd.points), xyz, atol=1e-6)
    expected = np.where((cls >= 0)[:, None], class_palette(5)[cls.clip(min=0)], 0) / 255.0
    np.testing.assert_allclose(np.asarray(pcd.colors), expected, atol=1e-6)
    vertex = PlyData.read(str(path))["vertex"]
    np.testing.assert_array_equal(vertex["label"], cls)
    np.testing.assert_array_equal(vertex["instance"], inst)
    with pytest.raises(ValueError, match="classes for"):
        write_prediction_ply(tmp_path / "bad.ply", xyz, cls[:10])


def test_heatmap_ply(tmp_path):
    xyz = np.zeros((4, 3), np.float32)
    path = write_heatmap_ply(tmp_path / "h.ply", xyz, np.array([-1.0, 0.0, 0.5, 1.0]))
    pcd = o3d.io.read_point_cloud(str(path))
    colours = np.asarray(pcd.colors)
    assert len(pcd.points) == 4
    assert colours[0, 2] > colours[0, 0] and colours[3, 0] > colours[3, 2]  # low blue, high red


def test_predict_scene_writes_a_readable_ply(run, store, tmp_path):
    s = Store.open(store)
    scene_id = s.scene_ids()[0]
    n = s.shape(scene_id, schema.XYZ)[0]
    pred = predict_scene(run, store, scene_id, device="cpu", min_instance_points=5)
    assert pred.pred_class.shape == (n,) and pred.score.shape == (n,) and pred.instance.shape == (n,)
    assert pred.clip.shape == (n, TINY_CLIP_DIM)
    np.testing.assert_allclose(np.linalg.norm(pred.clip, axis=1), 1.0, atol=1e-4)
    assert pred.pred_class.min() >= 0 and pred.pred_class.max() < len(TINY_CLASSES)
    assert pred.instance.max() < len(pred.instance_class) and pred.instance.min() >= -1
    np.testing.assert_allclose(pred.xyz, s.read(scene_id, schema.XYZ))
    path = write_prediction_ply(tmp_path / "pred.ply", pred.xyz, pred.pred_class, pred.instance, num_classes=len(TINY_CLASSES))
    assert len(o3d.io.read_point_cloud(str(path)).points) == n
    whole = write_prediction_ply(tmp_path / "whole.ply", pred)  # the same from the prediction object, plus boundary
    from plyfile import PlyData

    a, b = PlyData.read(str(path))["vertex"], PlyData.read(str(whole))["vertex"]
    for name in ("x", "y", "z", "red", "green", "blue", "label", "instance"):
        np.testing.assert_array_equal(a[name], b[name])
    assert "boundary" not in a.data.dtype.names
    boundary = np.asarray(b["boundary"])
    np.testing.assert_array_equal(boundary, pred.boundary)
    assert boundary.shape == (n,) and boundary.min() >= 0.0 and boundary.max() <= 1.0
    flag = s.read(scene_id, schema.BOUNDARY).astype(bool)
    assert (boundary[~flag] == 0).all() and boundary[flag].max() > 0  # semantic borders lie on over-segment borders


def test_clip_model_of_store_reads_identities(tmp_path, clip_dir, store):
    assert clip_model_of_store(Store.open(store)) == str(clip_dir.resolve())
    s = Store.create(tmp_path / "other", dataset="synthetic", class_names=["a"])
    for model, expected in (
        ("dir:/models/my:clip:0123456789abcdef/model.safetensors:fedcba9876543210", "/models/my:clip"),
        ("dir:/m:0123456789abcdef", "/m"),
        ("hub:openai/clip-vit-base-patch32", "openai/clip-vit-base-patch32"),
        ("/plain/folder", "/plain/folder"),
    ):
        s.write_vocab("classes", np.ones((1, 4)), {"names": ["a"], "model": model})
        assert clip_model_of_store(s) == expected


def test_query_scene_heatmap_and_segments(run, store, clip_dir, tmp_path):
    s = Store.open(store)
    scene_id = s.scene_ids()[0]
    n = s.shape(scene_id, schema.XYZ)[0]
    result = query_scene(run, store, scene_id, "a red chair", top_k=3, out_ply=tmp_path / "q.ply", device="cpu")
    assert result.similarity.shape == (n,)
    assert result.similarity.min() >= -1.0 - 1e-5 and result.similarity.max() <= 1.0 + 1e-5
    assert 1 <= len(result.segments) <= 3
    scores = [m.score for m in result.segments]
    assert scores == sorted(scores, reverse=True)
    assert len(o3d.io.read_point_cloud(str(result.ply)).points) == n
    # oracle: per-point cosine between the predicted CLIP features and the text tower's embedding
    query = load_encoder(str(clip_dir), device="cpu").encode_texts(["a red chair"])[0]
    pred = predict_scene(load_run(run, device="cpu"), store, scene_id, device="cpu")
    np.testing.assert_allclose(result.similarity, pred.clip @ query, atol=1e-4)
    segment = s.read(scene_id, schema.SEGMENT)
    best = result.segments[0]
    assert best.points == int((segment == best.segment).sum())
    assert best.score == pytest.approx(float(result.similarity[segment == best.segment].mean()), abs=1e-5)
    np.testing.assert_allclose(best.centroid, s.read(scene_id, schema.XYZ)[segment == best.segment].mean(axis=0), atol=1e-4)
    table = format_query(result)
    assert "a red chair" in table and str(best.segment) in table
    # an explicit model folder gives the same answer; one of another width is refused
    again = query_scene(run, store, scene_id, "a red chair", model_dir=str(clip_dir), device="cpu")
    np.testing.assert_allclose(again.similarity, result.similarity, atol=1e-6)
    narrow = make_tiny_clip(tmp_path / "narrow", projection_dim=16)
    with pytest.raises(ConfigError, match="16-d"):
        query_scene(run, store, scene_id, "a red chair", model_dir=str(narrow), device="cpu")
