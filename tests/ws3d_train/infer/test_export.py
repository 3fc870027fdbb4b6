"""ScanNet benchmark export: the files, their vertex order, and an evaluator written from the
benchmark's description (hand-computed oracles); unlabelled scans are exported, not trained on."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree
from typer.testing import CliRunner

from cli import app
from pipeline import schema
from pipeline.schema import IGNORE_INDEX
from pipeline.store import Store
from tests.synthdata import small_raw
from tests.oracles.scannet_benchmark import (
    evaluate_instance_export,
    evaluate_semantic_export,
    gt_instance_ids,
    read_instance_export,
)
from ws3d_train.infer.export import BENCHMARK_NYU40_IDS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# the evaluator against hand-computed cases


def test_semantic_iou_follows_the_benchmark_rules():
    #        vertex:  0  1  2  3  4  5
    gt = np.array([1, 1, 2, 0, 3, 40])  # 0 unannotated and 40 (not a benchmark class) are ignored
    pred = np.array([1, 2, 2, 5, 13, 1])  # 13 is no benchmark class: a miss for vertex 4's class 3
    result = evaluate_semantic_export([pred], [gt])
    # wall (1): tp 1, fn 1 (vertex 1 -> 2), fp 0 -> 1/2; floor (2): tp 1, fp 1 (vertex 1) -> 1/2;
    # cabinet (3): tp 0, fn 1 -> 0; every other class absent -> NaN, left out of the mean
    assert result["iou"][1] == pytest.approx(0.5) and result["iou"][2] == pytest.approx(0.5)
    assert result["iou"][3] == 0.0 and np.isnan(result["iou"][4])
    assert result["miou"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    perfect = evaluate_semantic_export([gt], [gt])
    assert perfect["miou"] == 1.0


def _mask(n, idx):
    m = np.zeros(n, bool)
    m[idx] = True
    return m


def test_instance_ap_follows_the_benchmark_rules():
    n = 1000
    chair, table = 5, 7  # NYU40 ids
    gt_sem = np.zeros(n, np.int64)
    gt_inst = np.full(n, -1)
    gt_sem[:200], gt_inst[:200] = chair, 0  # a 200-vertex chair
    gt_sem[300:450], gt_inst[300:450] = table, 1  # a table
    gt_sem[450:500], gt_inst[450:500] = chair, 2  # a 50-vertex chair: under min_region_size (100)
    gt_sem[800:], gt_inst[800:] = 1, 3  # a wall: not an instance class, void for the AP
    gt = gt_instance_ids(gt_sem, gt_inst)
    good = (_mask(n, slice(0, 190)), chair, 0.9)  # IoU 0.95 with the big chair
    spurious = (_mask(n, slice(300, 450)), chair, 0.5)  # a "chair" on the table: a false positive
    on_void = (_mask(n, slice(820, 950)), chair, 0.99)  # all on the wall (void): ignored
    on_small = (_mask(n, slice(380, 500)), chair, 0.95)  # 50 of its 120 vertices on the small chair

    def chair_ap(predictions):
        return evaluate_instance_export([predictions], [gt])["per_class"][chair]

    # the true positive scored above the false positive: precision 1 at recall 1 -> AP 1
    result = chair_ap([good, spurious, on_void])
    assert result == {"ap": pytest.approx(1.0), "ap50": pytest.approx(1.0), "ap25": pytest.approx(1.0)}
    # a false positive scored above the true positive: the benchmark's curve gives 0.25
    assert chair_ap([good, (spurious[0], chair, 0.95)])["ap50"] == pytest.approx(0.25)
    # 42 % of on_small lies on the too-small chair: ignored at overlap 0.25, a false positive at 0.5
    small = chair_ap([good, on_small])
    assert small["ap25"] == pytest.approx(1.0) and small["ap50"] == pytest.approx(0.25)
    # a mask at IoU 0.725: a match for overlaps 0.50..0.70 (5 of the 9 in 0.50:0.90) -> AP 5/9
    assert chair_ap([(_mask(n, slice(0, 145)), chair, 0.8)])["ap"] == pytest.approx(5 / 9)
    # nothing predicted: AP 0 for the classes with ground truth (chair, table), the others left out
    empty = evaluate_instance_export([[]], [gt])
    assert sorted(empty["per_class"]) == [chair, table] and empty["ap50"] == 0.0
    # means over classes: chair 1, table 0 (nothing predicted as a table)
    assert evaluate_instance_export([[good]], [gt])["ap50"] == pytest.approx(0.5)
    # predicted regions under min_region_size are dropped
    tiny = (_mask(n, slice(0, 60)), chair, 0.99)
    assert chair_ap([good, tiny])["ap50"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# export end to end: real reader, store, run, CLI


def _write_overseg(store: Store, scene_id: str, cell_m: float = 0.6) -> None:
    """Grid cells as over-segments (enough for instances), written through the schema."""
    xyz = store.read(scene_id, schema.XYZ)
    n = len(xyz)
    cell = np.floor((xyz - xyz.min(0)) / cell_m).astype(np.int64)
    _, segment = np.unique(cell, axis=0, return_inverse=True)
    segment = segment.reshape(-1).astype(np.int32)
    pairs = cKDTree(xyz).query_pairs(0.06, output_type="ndarray")
    cross = pairs[segment[pairs[:, 0]] != segment[pairs[:, 1]]]
    seg_pairs = np.sort(segment[cross], axis=1)
    adjacency, counts = np.unique(seg_pairs, axis=0, return_counts=True)
    boundary = np.zeros(n, np.uint8)
    boundary[cross.reshape(-1)] = 1
    store.write_stage(scene_id, "overseg", {
        schema.NORMAL: np.zeros((n, 3), np.float16), schema.CURVATURE: np.zeros(n, np.float16),
        schema.SEGMENT: segment, schema.BOUNDARY: boundary, schema.SEMANTIC_BOUNDARY: np.full(n, 255, np.uint8),
        schema.ADJACENCY: adjacency.astype(np.int32).reshape(-1, 2), schema.ADJACENCY_BORDER: counts.astype(np.int32),
    }, {"config": {}, "config_hash": "test", "stats": {}})


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Three small ScanNet-layout rooms (the last without annotation files: a test scan), ingested
    by the real reader, hand over-segmented, a random 16-d vocabulary, a 1-step fine-tuned run."""
    from ws3d_train.data.dataset import DataConfig
    from ws3d_train.train.finetune import FinetuneConfig, finetune as _finetune
    from ws3d_train.network import NetworkConfig

    base = tmp_path_factory.mktemp("bench")
    raw = small_raw(base / "raw", 3)
    test_scan = raw / "scans" / "scene0002_00"
    (test_scan / "scene0002_00.aggregation.json").unlink()
    (test_scan / "scene0002_00_vh_clean_2.0.010000.segs.json").unlink()
    store_path = base / "s.zarr"
    result = CliRunner().invoke(app, ["ingest", "-d", "synthetic", "-r", str(raw), "-s", str(store_path), "-x", "sync"])
    assert result.exit_code == 0, result.output
    store = Store.open(store_path)
    assert store.scene_ids() == ["scene0000_00", "scene0001_00", "scene0002_00"]
    for scene_id in store.scene_ids():
        _write_overseg(store, scene_id)
    rng = np.random.default_rng(0)
    text = rng.standard_normal((len(store.class_names), 16))
    store.write_vocab("classes", text / np.linalg.norm(text, axis=1, keepdims=True),
                      {"names": store.class_names, "prompts": ["a {}."], "model": ""})
    run = base / "run"
    with pytest.warns(UserWarning, match="unlabelled scene"):
        summary = _finetune(FinetuneConfig(
            store=str(store_path), data=DataConfig(voxel_size_m=0.1, max_voxels=3000),
            network=NetworkConfig(preset="tiny", backend="torch"), num_workers=0, progress=False, tensorboard=False,
            batch_size=2, steps=1, labels="all", w_align=0.0,
        ), run)
    return {"raw": raw, "store": store_path, "run": run, "summary": summary, "base": base}


def test_an_unlabelled_scan_is_ingested_and_skipped_for_training(bench):
    store = Store.open(bench["store"])
    assert not (store.read("scene0002_00", schema.SEMANTIC) != IGNORE_INDEX).any()
    assert (store.read("scene0002_00", schema.INSTANCE) == -1).all()
    assert bench["summary"]["unlabelled_scenes_skipped"] == ["scene0002_00"]
    assert bench["summary"]["scenes"] == 2
    result = CliRunner().invoke(app, ["info", "-s", str(bench["store"])])
    assert result.exit_code == 0 and "unlabelled" in result.output


def test_semantic_export_has_one_nyu40_id_per_raw_vertex(bench, tmp_path):
    from plyfile import PlyData

    from ws3d_train.infer.predict import predict_scene

    scenes = tmp_path / "scenes.txt"
    scenes.write_text("scene0001_00\nscene0002_00\n")  # a labelled scan and the unlabelled one
    out = tmp_path / "sem"
    result = CliRunner().invoke(app, ["predict", "--run", str(bench["run"]), "-s", str(bench["store"]),
                                      "--scenes", str(scenes), "--format", "scannet", "--raw", str(bench["raw"]),
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["scene0001_00.txt", "scene0002_00.txt"]
    nyu = np.asarray(BENCHMARK_NYU40_IDS)
    store = Store.open(bench["store"])
    for scene_id in ("scene0001_00", "scene0002_00"):
        lines = (out / f"{scene_id}.txt").read_text().split("\n")
        assert lines[-1] == ""  # one id a line, newline-terminated
        ids = np.array(lines[:-1], dtype=np.int64)
        ply = bench["raw"] / "scans" / scene_id / f"{scene_id}_vh_clean_2.ply"
        assert len(ids) == PlyData.read(str(ply))["vertex"].count
        assert set(np.unique(ids)) <= set(nyu.tolist())
        # line i is store point i (the store keeps the PLY's vertex order)
        pred = predict_scene(bench["run"], bench["store"], scene_id, device="cpu")
        np.testing.assert_array_equal(ids, nyu[pred.pred_class])
    # scored by the benchmark evaluator against the labelled scan's ground truth
    gt = store.read("scene0001_00", schema.SEMANTIC).astype(np.int64)
    gt_nyu = np.where(gt >= 0, nyu[np.clip(gt, 0, None)], 0)
    pred = np.loadtxt(out / "scene0001_00.txt", dtype=np.int64)
    scored = evaluate_semantic_export([pred], [gt_nyu])
    assert 0.0 <= scored["miou"] <= 1.0
    assert evaluate_semantic_export([gt_nyu], [gt_nyu])["miou"] == 1.0


def test_instance_export_format_and_score(bench, tmp_path):
    out = tmp_path / "inst"
    result = CliRunner().invoke(app, ["predict", "--run", str(bench["run"]), "-s", str(bench["store"]),
                                      "--scene", "scene0000_00", "--format", "scannet-instance",
                                      "--min-region-size", "20", "-o", str(out)])
    assert result.exit_code == 0, result.output
    store = Store.open(bench["store"])
    n = store.shape("scene0000_00", schema.XYZ)[0]
    text = (out / "scene0000_00.txt").read_text()
    for line in text.splitlines():
        rel, label, conf = line.split()
        assert rel.startswith("pred_mask/scene0000_00_") and rel.endswith(".txt")
        assert int(label) in BENCHMARK_NYU40_IDS and 0.0 <= float(conf) <= 1.0
    predicted = read_instance_export(out, "scene0000_00", n)
    assert len(predicted) == len(text.splitlines())
    nyu = np.asarray(BENCHMARK_NYU40_IDS)
    semantic = store.read("scene0000_00", schema.SEMANTIC).astype(np.int64)
    gt = gt_instance_ids(np.where(semantic >= 0, nyu[np.clip(semantic, 0, None)], 0), store.read("scene0000_00", schema.INSTANCE))
    scored = evaluate_instance_export([predicted], [gt])
    assert all(0.0 <= scored[k] <= 1.0 or np.isnan(scored[k]) for k in ("ap", "ap50", "ap25"))
    # the ground truth written in the export format scores 1 (format and evaluator agree)
    truth = [(gt == v, int(v // 1000), 1.0) for v in np.unique(gt[gt >= 1000])]
    assert evaluate_instance_export([truth], [gt])["ap"] == pytest.approx(1.0)


def test_eval_skips_the_unlabelled_scan(bench):
    from ws3d_train.infer.evaluate import evaluate

    result = evaluate(bench["run"], bench["store"], None, min_region_size=20, device="cpu")
    assert result["unlabelled_scenes"] == ["scene0002_00"] and result["scenes"] == 2
