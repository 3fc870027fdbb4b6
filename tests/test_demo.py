"""The demo pipeline end to end at the smallest scale, and the report's pictures."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from pipeline.config import from_dict
from pipeline.executor import ExecutorConfig
from tests.synthdata import SMALL
from ws3d_train.demo import DemoConfig, format_results, run_demo


def test_demo_smallest_scale_runs_and_writes_results_and_pictures(tmp_path):
    cfg = DemoConfig(out=str(tmp_path / "demo"), train_scenes=3, val_scenes=1, dev_scenes=1, corpus_rooms=2, room=SMALL,
                     teacher_steps=15, teacher_seconds=4.0,
                     pretrain_steps=2, finetune_steps=2, voxel_size_m=0.1, max_voxels=5000, batch_size=1,
                     executor=ExecutorConfig(kind="sync"))
    lines: list[str] = []
    results = run_demo(cfg, echo=lines.append)
    written = json.loads((tmp_path / "demo" / "results.json").read_text())
    row = written["table"]["LA +pretrain (full)"]
    assert set(row) >= {"mIoU", "novel mIoU", "hIoU", "AP50", "box mAP@25", "boundary AP", "region AP", "flag AP"}
    assert 0.0 <= row["mIoU"]["mean"] <= 1.0
    # model selection happened on the dev room; the validation run refits on the training and dev rooms
    assert written["val_scenes"] == 1 and written["train_scenes"] == 3 and written["dev_scenes"] == 1
    assert set(written["preprocess_seconds"]) >= {"ingest", "overseg", "render", "corpus", "teacher", "embed"}
    assert "LA +pretrain (full)" in format_results(results)
    # boundaries: the evaluation's voxels and the per-vertex check of `ws3d predict` against the raw annotation
    boundary = written["metrics"]["boundary"]
    assert 0 < boundary["random"]["ap"] < 1 and boundary["head"]["rows"] == boundary["overseg_flag"]["rows"] > 0
    assert row["boundary AP"]["mean"] == pytest.approx(boundary["head"]["ap"])
    vertex = written["vertex_boundaries"]
    assert 0 <= vertex["predict"]["ap"] <= 1 and vertex["overseg_flag"]["rows"] == vertex["predict"]["rows"] > 0
    assert "boundaries per vertex" in format_results(results)
    # one table from one prediction: mIoU is the calibrated prediction's, the semantic head apart
    assert row["mIoU"]["mean"] == pytest.approx(written["metrics"]["open_vocab"]["combined"]["miou"])
    assert row["sem-head mIoU"]["mean"] == pytest.approx(written["metrics"]["semantic"]["miou"])
    assert written["metrics"]["instance"]["min_region_size"] == cfg.min_region_size
    assert "instances of >= 20 points" in format_results(results)
    # the 2D-fusion baseline row, no training
    fusion = written["table"]["2d fusion"]
    assert 0.0 <= fusion["mIoU"]["mean"] <= 1.0 and fusion["sem-head mIoU"]["mean"] is None
    # the 2D-3D ensemble: the full run's checkpoint, scored with the scenes' fused 2D features
    ensemble = written["table"]["LA full + 2d-3d ensemble"]
    assert 0.0 <= ensemble["mIoU"]["mean"] <= 1.0
    assert ensemble["sem-head mIoU"]["mean"] == pytest.approx(row["sem-head mIoU"]["mean"])  # same network
    assert set(written["ratios"]) >= {"full_novel_over_base", "ensemble_novel_over_chance"}
    # the protocol: the teacher's corpus is its own rooms, never a 3D room
    protocol = written["protocol"]
    assert len(protocol["teacher_scenes"]) == 2 and len(protocol["train_scenes"]) == 3 and len(protocol["val_scenes"]) == 1
    assert len(protocol["dev_scenes"]) == 1 and set(protocol["dev_scenes"]) <= set(protocol["train_scenes"])
    assert protocol["refit"] and "refit" in protocol["dev_split"] and not set(protocol["val_scenes"]) & set(protocol["train_scenes"])
    assert "validation runs refit" in format_results(results)
    import yaml

    read = tmp_path / "demo" / "fit.txt"
    for run in ("pretrain", "finetune"):  # what the runs read: the refit's rooms, never a validation room
        assert yaml.safe_load((tmp_path / "demo" / run / "config.yaml").read_text())["scenes"] == str(read)
    assert sorted(read.read_text().split()) == sorted(protocol["train_scenes"])
    scenes_3d = set(protocol["train_scenes"]) | set(protocol["val_scenes"]) | set(protocol["dev_scenes"])
    assert not set(protocol["teacher_scenes"]) & scenes_3d
    assert protocol["teacher_store"] != str(tmp_path / "demo" / "store.zarr")
    assert protocol["novel_classes"] == ["sofa", "bookshelf", "desk", "toilet"]
    assert protocol["labelled_points_per_scene"] == 20
    teacher = json.loads((tmp_path / "demo" / "teacher" / "teacher_corpus.json").read_text())
    assert sorted(teacher["scenes"]) == sorted(protocol["teacher_scenes"])
    assert set(written["teacher"]["crop_accuracy_3d_val"]) >= {"base", "novel"}
    pictures = sorted((tmp_path / "demo" / "report").glob("*.png"))
    names = {p.name.split("_")[0] for p in pictures}
    assert {"training", "views", "query"} <= names, pictures
    for picture in pictures:
        with Image.open(picture) as image:
            assert image.size[0] > 200 and image.size[1] > 100


def test_demo_config_is_strict():
    with pytest.raises(ValueError):
        from_dict(DemoConfig, {"sclae": 2})


def test_demo_refuses_unknown_benchmark_rows_before_any_work(tmp_path):
    cfg = DemoConfig(out=str(tmp_path / "demo"), ablation=True, rows=("supervised", "+magic"))
    with pytest.raises(ValueError, match=r"\+magic"):
        run_demo(cfg, echo=lambda _: None)
    with pytest.raises(ValueError, match="setting xx"):
        run_demo(DemoConfig(out=str(tmp_path / "demo"), ablation=True, settings=("la", "xx")), echo=lambda _: None)
    assert not (tmp_path / "demo").exists()


def test_dev_split_never_overlaps_the_training_or_validation_lists():
    from ws3d_train.demo import split_rooms

    train_all = [f"scene{i:04d}_00" for i in range(24)]
    val = [f"scene{i:04d}_00" for i in range(24, 32)]
    for seed in range(5):
        lists = split_rooms(train_all, val, dev=4, limited=5, seed=seed)
        train, dev, lr = set(lists["train"]), set(lists["dev"]), set(lists["lr"])
        assert len(dev) == 4 and len(train) == 20 and train | dev == set(train_all)
        assert not dev & train and not dev & set(val) and not train & set(val)
        assert len(lr) == 5 and lr <= train  # the fully labelled rooms are training rooms
    assert split_rooms(train_all, val, dev=4, limited=5, seed=0) == split_rooms(train_all, val, dev=4, limited=5, seed=0)
    assert split_rooms(train_all, val, dev=4, limited=5, seed=0)["dev"] != split_rooms(train_all, val, dev=4, limited=5, seed=1)["dev"]
    assert split_rooms(train_all, val, dev=0, limited=5, seed=0)["dev"] == []
    with pytest.raises(ValueError, match="leaves none"):
        split_rooms(train_all[:2], val, dev=2, limited=1, seed=0)


def test_runs_scored_on_the_dev_rooms_never_train_on_them():
    from ws3d_train.demo import training_rooms

    prep = {"train_list": "train.txt", "fit_list": "fit.txt", "dev": ["scene0001_00"]}
    assert training_rooms(DemoConfig(eval_split="dev"), prep) == ("train.txt", "")
    assert training_rooms(DemoConfig(eval_split="dev", refit=True), prep) == ("train.txt", "")
    assert training_rooms(DemoConfig(eval_split="val"), prep) == ("fit.txt", "_refit")
    assert training_rooms(DemoConfig(eval_split="val", refit=False), prep) == ("train.txt", "")
    assert training_rooms(DemoConfig(eval_split="val"), {**prep, "dev": []}) == ("train.txt", "")


def test_a_refit_run_keeps_its_evaluation_apart_and_scene_lists_are_rewritten_only_on_change(tmp_path):
    from ws3d_train.demo import _write_if_changed, kept_evaluation

    prep = {"train_list": "train.txt", "fit_list": "fit.txt", "dev": ["scene0001_00"]}
    refit = kept_evaluation(DemoConfig(out=str(tmp_path)), prep, "+pretrain (full)", 0, "lr")
    alone = kept_evaluation(DemoConfig(out=str(tmp_path), refit=False), prep, "+pretrain (full)", 0, "lr")
    dev = kept_evaluation(DemoConfig(out=str(tmp_path), eval_split="dev", tag="x"), prep, "+pretrain (full)", 0, "lr")
    assert len({refit, alone, dev}) == 3 and refit.name == "lr_plus_pretrain_full_s0_refit.json"
    assert dev == tmp_path / "eval" / "dev" / "lr_plus_pretrain_full_s0_x.json"
    # 2D fusion trains nothing: one evaluation whatever the training rooms
    assert kept_evaluation(DemoConfig(out=str(tmp_path)), prep, "2d fusion", 0) == \
        kept_evaluation(DemoConfig(out=str(tmp_path), refit=False), prep, "2d fusion", 0)
    lists = tmp_path / "train.txt"
    _write_if_changed(lists, "a\nb\n")
    before = lists.stat().st_ino
    _write_if_changed(lists, "a\nb\n")
    assert lists.stat().st_ino == before  # unchanged: not rewritten
    _write_if_changed(lists, "a\n")
    assert lists.read_text() == "a\n" and not list(tmp_path.glob("*.tmp"))


def test_anchor_ratios_from_table_means():
    from ws3d_train.demo import anchor_ratios

    def row(miou, base, novel):
        return {"mIoU": {"mean": miou}, "base mIoU": {"mean": base}, "novel mIoU": {"mean": novel}}

    table = {"LA supervised": row(0.10, 0.12, 0.04), "LA +pretrain (full)": row(0.16, 0.18, 0.09),
             "all base labels": row(0.32, 0.36, 0.10), "LR supervised": row(0.20, 0.2, 0.0),
             "LR +boundary energy": row(0.215, 0.2, 0.0)}
    table["LR +boundary energy"].update({"boundary AP": {"mean": 0.6}, "flag AP": {"mean": 0.2}, "region AP": {"mean": 0.5}})
    ratios = anchor_ratios(table, chance=0.02)
    assert ratios["full_novel_over_base"] == pytest.approx(0.5)
    assert ratios["full_novel_over_chance"] == pytest.approx(4.5)
    assert ratios["full_over_all_base_labels"] == pytest.approx(0.5)
    assert ratios["full_minus_supervised_miou"] == pytest.approx(6.0)
    assert ratios["lr_energy_gain_miou"] == pytest.approx(1.5)
    assert ratios["lr_plus_boundary_energy_boundary_ap_over_flag"] == pytest.approx(3.0)
    assert ratios["lr_plus_boundary_energy_region_ap_over_flag"] == pytest.approx(2.5)
    assert not any(k.startswith("ensemble") for k in ratios)  # no such row, no such ratio
    assert "energy_gain_miou" not in ratios  # LA has no such pair of rows


def test_every_benchmark_setting_is_a_valid_finetune_config_and_diagnostics_change_one_term():
    from ws3d_train.demo import SETTINGS
    from ws3d_train.train.finetune import FinetuneConfig

    for name, overrides in SETTINGS.items():  # a typo in a field name would be refused here, not after an hour
        from_dict(FinetuneConfig, {"store": "s", **{k: v for k, v in overrides.items() if k != "init"}}, where=name)

    def differs(a: str, b: str) -> set[str]:
        keys = set(SETTINGS[a]) | set(SETTINGS[b])
        return {k for k in keys if SETTINGS[a].get(k) != SETTINGS[b].get(k)}

    assert differs("+boundary only", "+boundary energy") == {"w_energy"}
    assert differs("full without energy", "+pretrain (full)") == {"w_energy"}
    assert differs("+boundary only", "supervised") == {"w_boundary"}  # the boundary head alone
    assert differs("+region (single-stage)", "+region (multi-stage)") == {"region_stages", "region_embedding"}
    assert differs("+region (multi-stage)", "+boundary energy") == {"w_region", "region_stages", "region_embedding", "two_copies"}
