"""Evaluation: every metric group on a tiny store, consistency with direct computations, output."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline import schema
from pipeline.schema import IGNORE_INDEX
from pipeline.store import Store
from tests.conftest import TINY_CLASSES, make_tiny_store, tiny_run_config
from ws3d_train.infer.evaluate import _gt_boxes, evaluate, format_table, json_safe, write_json
from ws3d_train.train.finetune import FinetuneConfig, finetune
from ws3d_train.infer.metrics import ConfusionMatrix, semantic_metrics
from ws3d_train.run import ClassSetup, load_run
from ws3d_train.infer.predict import predict_classes, predict_scene


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("ev") / "store", n_scenes=2, n_points=800, seed=5)


@pytest.fixture(scope="module")
def run(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("ev_run") / "run"
    finetune(
        tiny_run_config(FinetuneConfig, store, batch_size=2, steps=2, labels="all", ov_split="novel=chair", lr=0.01),
        out,
    )
    return out


def _finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def test_evaluate_returns_every_group_finite(run, store, tmp_path):
    result = evaluate(run, store, min_region_size=20, device="cpu")
    assert result["scenes"] == 2 and result["points"] == sum(
        Store.open(store).shape(s, schema.XYZ)[0] for s in Store.open(store).scene_ids()
    )
    assert result["split"] == {"base": ["floor", "wall", "table", "cabinet"], "novel": ["chair"], "ignored": []}
    sem = result["semantic"]
    assert all(_finite(sem[k]) for k in ("miou", "oa", "macc"))
    assert set(sem["iou"]) == set(TINY_CLASSES)
    for group in ("clip", "combined"):
        g = result["open_vocab"][group]
        assert all(_finite(g[k]) for k in ("miou", "base_miou", "novel_miou", "hiou")), group
        assert 0.0 <= g["hiou"] <= 1.0
    inst = result["instance"]
    assert all(_finite(inst[k]) for k in ("ap", "ap50", "ap25"))
    assert set(inst["per_class"]) == {"chair", "table", "cabinet"}  # wall and floor form no instances
    assert _finite(result["box"]["map@0.25"]) and _finite(result["box"]["map@0.5"])
    bd = result["boundary"]
    for name in ("head", "region", "overseg_flag", "overseg_interface"):
        assert 0.0 <= bd[name]["ap"] <= 1.0 and bd[name]["rows"] == bd["head"]["rows"] > 0, name
    assert bd["random"]["ap"] == pytest.approx(bd["head"]["positive_rate"]) and 0 < bd["random"]["ap"] < 1
    assert bd["head_ap_over_flag"] == pytest.approx(bd["head"]["ap"] / bd["overseg_flag"]["ap"])
    assert result["open_vocab"]["combine"] == "calibrated"  # the run's rule (its config's default)

    path = write_json(result, tmp_path / "eval.json")
    loaded = json.loads(path.read_text())  # strict JSON: NaN would not parse back as a number
    assert loaded["semantic"]["miou"] == pytest.approx(sem["miou"])
    table = format_table(result)
    for words in ("semantic", "open-vocab (CLIP head)", "open-vocab (calibrated)", "instances", "boxes", "chair *",
                  "boundaries (AP / best F1)"):
        assert words in table
    size = result["instance"]["min_region_size"]
    assert f"instances (>= {size} pts)" in table and f"boxes (>= {size} pts)" in table  # AP states its region size


def test_semantic_metrics_match_a_direct_computation(run, store):
    result = evaluate(run, store, combine="semantic", min_region_size=20, device="cpu")
    s = Store.open(store)
    cm = ConfusionMatrix(len(TINY_CLASSES))
    loaded = load_run(run, device="cpu")
    for scene_id in s.scene_ids():
        pred = predict_scene(loaded, store, scene_id, combine="semantic")
        assert pred.pred_class.shape == (s.shape(scene_id, schema.XYZ)[0],)
        assert set(np.unique(pred.pred_class)) <= {0, 1, 3, 4}, "the semantic head predicts base classes only"
        cm.update(pred.pred_class, s.read(scene_id, schema.SEMANTIC))
    direct = semantic_metrics(cm.matrix, TINY_CLASSES)
    assert result["semantic"]["miou"] == pytest.approx(direct["miou"])
    assert result["open_vocab"]["combined"]["miou"] == pytest.approx(direct["miou"])
    assert result["semantic"]["oa"] == pytest.approx(direct["oa"])


def test_ov_split_none_and_other_splits(run, store):
    plain = evaluate(run, store, ov_split="none", min_region_size=20, device="cpu")
    assert plain["split"]["novel"] == [] and "hiou" not in plain["open_vocab"]["combined"]
    two = evaluate(run, store, ov_split="novel=chair,table", min_region_size=20, device="cpu")
    assert two["split"]["novel"] == ["chair", "table"]
    assert _finite(two["open_vocab"]["clip"]["hiou"])


def test_predict_classes_modes_by_hand():
    text = torch.eye(3)
    setup = ClassSetup(("a", "b", "c"), text, base_ids=(0, 2), novel_ids=(1,), ignored_ids=())
    semantic = torch.tensor([[5.0, 0.0, 0.0], [0.0, 9.0, 1.0]])  # column 1 (novel) is never used
    clip = torch.tensor([[0.1, 1.0, 0.0], [0.0, 0.0, 1.0]])
    cls, _ = predict_classes(semantic, clip, setup, mode="semantic")
    assert cls.tolist() == [0, 2]
    cls, prob = predict_classes(semantic, clip, setup, mode="clip")
    assert cls.tolist() == [1, 2] and bool((prob > 0.9).all())
    cls, _ = predict_classes(semantic, clip, setup, mode="calibrated")
    assert cls.tolist() == [1, 2]  # the CLIP head gives row 0 to the novel class
    ignored = ClassSetup(("a", "b", "c"), text, base_ids=(0,), novel_ids=(2,), ignored_ids=(1,))
    cls, _ = predict_classes(semantic, torch.tensor([[0.0, 1.0, 0.2]]).repeat(2, 1), ignored, mode="clip")
    assert 1 not in cls.tolist(), "an ignored class was predicted"


def test_gt_boxes_by_hand():
    xyz = np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2], [5, 5, 5], [6, 6, 6]], float)
    instance = np.array([0, 0, 1, 1, -1])
    semantic = np.array([2, 2, 3, 3, 3])
    boxes = _gt_boxes(xyz, instance, semantic, np.array([2, 3]))
    np.testing.assert_allclose(boxes.bounds, [[0, 0, 0, 1, 1, 1], [2, 2, 2, 5, 5, 5]])
    assert boxes.classes.tolist() == [2, 3]
    assert _gt_boxes(xyz, instance, semantic, np.array([4])).bounds.shape == (0, 6)


def test_json_safe():
    out = json_safe({"a": float("nan"), "b": [np.float32(1.5), np.inf], "c": np.arange(2), "d": {1: np.int64(3)}})
    assert out == {"a": None, "b": [1.5, None], "c": [0, 1], "d": {"1": 3}}
    json.dumps(out, allow_nan=False)


def test_hidden_ground_truth_leaves_predictions_alone(run, store):
    plain = evaluate(run, store, min_region_size=20, device="cpu")
    hidden = evaluate(run, store, min_region_size=20, device="cpu", gt_ignore=[TINY_CLASSES.index("chair")])
    assert plain["points"] == hidden["points"]
    # the chair's points are no longer scored, its predictions still made (false positives now)
    assert math.isnan(hidden["open_vocab"]["combined"]["iou"]["chair"]) or hidden["open_vocab"]["combined"]["iou"]["chair"] == 0.0
    assert hidden["open_vocab"]["combined"]["iou"] != plain["open_vocab"]["combined"]["iou"]


def test_ignored_classes_are_ignored_in_ground_truth(run, store):
    # wall ignored by the split: its points are neither counted nor predicted
    s = Store.open(store)
    semantic = [s.read(x, schema.SEMANTIC) for x in s.scene_ids()]
    wall = TINY_CLASSES.index("wall")
    assert all((sem == wall).any() for sem in semantic)
    result = evaluate(run, store, ov_split="novel=chair;ignored=wall", min_region_size=20, device="cpu")
    assert result["split"]["ignored"] == ["wall"]
    counted = sum(int(((sem != IGNORE_INDEX) & (sem != wall)).sum()) for sem in semantic)
    assert result["semantic"]["num_points"] == counted
    for group in (result["semantic"], result["open_vocab"]["clip"], result["open_vocab"]["combined"]):
        assert math.isnan(group["iou"]["wall"]), "wall was predicted or counted"


def test_ensemble_features_take_the_more_confident_side():
    from ws3d_train.infer.fusion import ensemble_features

    text = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    feat_3d = torch.tensor([[2.0, 0.1, 0], [0.5, 0.5, 1.0]])  # row 0 confident, row 1 not
    feat_2d = torch.tensor([[0.6, 0.8, 0], [0, 3.0, 0.1]])
    out, took_2d = ensemble_features(feat_3d, feat_2d, text)
    assert took_2d.tolist() == [False, True]
    assert torch.allclose(out.norm(dim=1), torch.ones(2))
    assert torch.allclose(out[0], torch.nn.functional.normalize(feat_3d[0], dim=0))
    assert torch.allclose(out[1], torch.nn.functional.normalize(feat_2d[1], dim=0))


def test_evaluate_with_the_2d_ensemble_uses_the_scenes_fused_features(run, store):
    from ws3d_train.infer.fusion import fused_embeddings

    plain = evaluate(run, store, min_region_size=20, device="cpu")
    mixed = evaluate(run, store, min_region_size=20, device="cpu", ensemble_2d=True)
    assert plain["open_vocab"]["share_2d"] == 0.0 and not plain["open_vocab"]["ensemble_2d"]
    share = mixed["open_vocab"]["share_2d"]
    assert 0.0 < share <= 1.0
    # the semantic head is untouched by the ensemble; the CLIP head's prediction is not
    assert mixed["semantic"]["miou"] == pytest.approx(plain["semantic"]["miou"])
    # the same per-point choice by hand on one scene
    opened = Store.open(store)
    scene = opened.scene_ids()[0]
    loaded = load_run(run, device="cpu")
    from ws3d_train.infer.predict import infer_scene, point_heads
    from ws3d_train.run import resolve_classes

    setup = resolve_classes(loaded, opened)
    outputs = infer_scene(loaded, opened, scene)
    _, clip, _ = point_heads(outputs, setup, opened, ensemble_2d=True)
    fused = torch.from_numpy(fused_embeddings(opened, scene))
    feat_3d = torch.nn.functional.normalize(outputs.to_points(outputs.clip), dim=1)
    text = torch.nn.functional.normalize(setup.text.float(), dim=1)
    wins_2d = (fused @ text.T).max(1).values > (feat_3d @ text.T).max(1).values
    expect = torch.where(wins_2d[:, None], fused, feat_3d)
    assert torch.allclose(clip, expect, atol=1e-6)
    pred = predict_scene(run, store, scene, ensemble_2d=True, device="cpu")
    assert np.allclose(pred.clip, expect.numpy(), atol=1e-5)


def test_score_against_the_2d_fusion_uses_no_label_and_matches_a_direct_computation(run, store):
    from ws3d_train.infer.evaluate import _fusion_text
    from ws3d_train.infer.fusion import fuse_scene
    from ws3d_train.infer.metrics import open_vocab_metrics

    hidden = [TINY_CLASSES.index("chair")]
    result = evaluate(run, store, min_region_size=20, device="cpu", vs_fusion=True, gt_ignore=hidden)
    plain = evaluate(run, store, min_region_size=20, device="cpu")
    assert "vs_2d_fusion" not in plain
    vs = result["vs_2d_fusion"]
    opened = Store.open(store)
    loaded = load_run(run, device="cpu")
    text = _fusion_text(opened, TINY_CLASSES)
    base = [TINY_CLASSES.index(n) for n in result["split"]["base"]]
    novel = [TINY_CLASSES.index(n) for n in result["split"]["novel"]]
    cm = ConfusionMatrix(len(TINY_CLASSES))
    for scene_id in opened.scene_ids():
        pred = predict_scene(loaded, store, scene_id)
        fused, _, _ = fuse_scene(opened, scene_id, text, base + novel)
        cm.update(pred.pred_class, fused)
    direct = open_vocab_metrics(cm.matrix, base, novel)
    assert vs["novel_miou"] == pytest.approx(direct["novel_miou"])
    assert vs["base_miou"] == pytest.approx(direct["base_miou"])
    # the reference is the 2D fusion, not the ground truth: hiding the novel labels changes nothing in it
    unhidden = evaluate(run, store, min_region_size=20, device="cpu", vs_fusion=True)
    assert unhidden["vs_2d_fusion"]["novel_miou"] == pytest.approx(vs["novel_miou"])


def test_eval_command_scores_against_the_2d_fusion_on_request(run, store, tmp_path):
    import json

    from typer.testing import CliRunner

    from cli import app

    direct = evaluate(run, store, min_region_size=20, device="cpu", vs_fusion=True)["vs_2d_fusion"]
    for flag, target in (([], tmp_path / "plain.json"), (["--vs-fusion"], tmp_path / "vs.json")):
        result = CliRunner().invoke(app, ["eval", "--run", str(run), "--store", str(store), "--split", "all",
                                          "--min-region-size", "20", "--out", str(target), *flag])
        assert result.exit_code == 0, result.output
        written = json.loads(target.read_text())
        assert ("agreement with 2D fusion" in result.output) == bool(flag)
        assert ("vs_2d_fusion" in written) == bool(flag)
    assert written["vs_2d_fusion"]["novel_miou"] == pytest.approx(direct["novel_miou"])
