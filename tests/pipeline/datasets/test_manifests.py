"""data_manifests/ and its loader: counts, disjoint splits, validation errors, limited labels, OV splits."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import datasets as m
from pipeline.datasets.manifests import ManifestError
from pipeline.errors import SceneError
from pipeline.schema import IGNORE_INDEX
from tests.paths import SHARED_DATA

SHARED = SHARED_DATA
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"real samples not found at {SHARED} (../shared/data is absent on this machine)"
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A private copy of data_manifests/ that a test may break."""
    copy = tmp_path / "manifests"
    shutil.copytree(m.DEFAULT_ROOT, copy)
    return copy


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


# --- the shipped manifests ------------------------------------------------------------------


def test_scannet_official_counts_and_disjoint():
    train, val, test = (m.load_split("scannet", s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (1201, 312, 100)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert m.load_split("scannet", "all") == train + val + test
    assert m.load_split("scannet200", "val") == val


@pytest.mark.parametrize("name,count", [("lr1", 12), ("lr5", 60), ("lr10", 120), ("lr20", 240)])
def test_scannet_limited_reconstructions(name, count):
    scenes = m.load_split("scannet", name)
    assert len(scenes) == count == len(set(scenes))
    assert set(scenes) <= set(m.load_split("scannet", "train"))


def test_s3dis_areas_and_folds():
    all_rooms = m.load_split("s3dis", "all")
    assert len(all_rooms) == 272 and "Area_1_office_2" in all_rooms
    sizes = {k: len(m.load_split("s3dis", f"area{k}")) for k in range(1, 7)}
    assert sizes == {1: 44, 2: 40, 3: 23, 4: 49, 5: 68, 6: 48}
    train, val = m.load_split("s3dis", "train"), m.load_split("s3dis", "val")
    assert val == m.load_split("s3dis", "area5") and all(s.startswith("Area_5_") for s in val)
    assert not set(train) & set(val) and len(train) + len(val) == 272
    for k in range(1, 7):
        fold_train, fold_val = m.load_split("s3dis", f"fold{k}_train"), m.load_split("s3dis", f"fold{k}_val")
        assert set(fold_val) == set(m.load_split("s3dis", f"area{k}"))
        assert not set(fold_train) & set(fold_val) and set(fold_train) | set(fold_val) == set(all_rooms)


def test_semantickitti_sequences():
    train, val, test = (m.load_split("semantickitti", s) for s in ("train", "val", "test"))
    assert {s[:2] for s in train} == {"00", "01", "02", "03", "04", "05", "06", "07", "09", "10"}
    assert {s[:2] for s in val} == {"08"} and {s[:2] for s in test} == {f"{k}" for k in range(11, 22)}
    assert (len(train) + len(val), len(test)) == (23_201, 20_351)  # the published scan counts
    assert val[0] == "08_000000" and len(val) == 4071


def test_class_lists():
    assert len(m.load_classes("scannet")) == 20 and m.load_classes("scannet")[-1] == "otherfurniture"
    assert len(m.load_classes("scannet200")) == 200
    assert m.load_classes("s3dis") == tuple(
        "ceiling floor wall beam column window door table chair sofa bookcase board clutter".split()
    )
    assert len(m.load_classes("semantickitti")) == 19 and m.load_classes("semantickitti")[0] == "car"
    assert m.load_classes("synthetic") == m.load_classes("scannet")
    # the official ScanNet file agrees with classes.csv (ids and names, its misspelling aside)
    official = (m.DEFAULT_ROOT / "scannet" / "classes_SemVoxLabel-nyu40id.txt").read_text().split("\n")
    pairs = [(int(a), b.replace("refridgerator", "refrigerator")) for a, b in (ln.split(None, 1) for ln in official)]
    assert pairs == [(k, m.load_classes("scannet")[v]) for k, v in m.load_label_map("scannet").items()]
    s3dis_txt = (m.DEFAULT_ROOT / "s3dis" / "class_names.txt").read_text().split()
    assert tuple(s3dis_txt) == m.load_classes("s3dis")


def test_label_maps():
    s3dis = m.load_label_map("s3dis")
    assert s3dis["stairs"] == s3dis["clutter"] == 12
    kitti = m.load_label_map("semantickitti")
    names = m.load_classes("semantickitti")
    assert kitti[0] == kitti[1] == kitti[52] == IGNORE_INDEX
    assert kitti[252] == kitti[10] == names.index("car") and kitti[60] == names.index("road")
    scannet = m.load_label_map("scannet")
    assert scannet[39] == 19 and scannet[36] == m.load_classes("scannet").index("bathtub")


@needs_shared
def test_kitti_classes_match_the_official_yaml():
    config = yaml.safe_load((SHARED / "semantickitti" / "semantic-kitti.yaml").read_text())
    names = tuple(config["labels"][config["learning_map_inv"][i]] for i in range(1, 20))
    assert names == m.load_classes("semantickitti")
    assert {k: (v - 1 if v else IGNORE_INDEX) for k, v in config["learning_map"].items()} == m.load_label_map(
        "semantickitti"
    )


def _names(dataset: str, ids: tuple[int, ...]) -> set[str]:
    return {m.load_classes(dataset)[i] for i in ids}


@pytest.mark.parametrize(
    "dataset,name,novel",
    [
        ("scannet", "b15n4", {"sofa", "bookshelf", "desk", "toilet"}),
        ("scannet", "b12n7", {"bed", "chair", "table", "bookshelf", "picture", "sink", "bathtub"}),
        ("scannet", "b10n9", {"bookshelf", "picture", "counter", "desk", "refrigerator", "shower curtain",
                              "toilet", "sink", "bathtub"}),
        ("s3dis", "b8n4", {"window", "table", "sofa", "bookcase"}),
        ("s3dis", "b6n6", {"floor", "window", "door", "table", "bookcase", "board"}),
        ("synthetic", "b15n4", {"sofa", "bookshelf", "desk", "toilet"}),
    ],
)
def test_open_vocabulary_splits(dataset, name, novel):
    split = m.load_ov_split(dataset, name)
    base, novel_ids, ignored = split
    assert _names(dataset, novel_ids) == novel
    assert _names(dataset, ignored) == ({"otherfurniture"} if dataset != "s3dis" else {"clutter"})
    everything = sorted(base + novel_ids + ignored)
    assert everything == list(range(len(m.load_classes(dataset))))
    assert list(base) == sorted(base) and split.novel == novel_ids
    assert name in m.list_ov_splits(dataset)


def test_unknown_names():
    with pytest.raises(ManifestError, match="unknown split 'lr3'"):
        m.load_split("scannet", "lr3")
    with pytest.raises(ManifestError, match="unknown open-vocabulary split"):
        m.load_ov_split("s3dis", "b15n4")
    with pytest.raises(ValueError, match="unknown dataset"):
        m.load_classes("nuscenes")
    with pytest.raises(ManifestError, match="none"):
        m.load_split("synthetic", "train")


# --- the loader's errors, one by one --------------------------------------------------------


def test_error_duplicate_scene(root):
    train = root / "scannet" / "scenes" / "train.txt"
    first = train.read_text().splitlines()[0]
    train.write_text(train.read_text() + first + "\n")
    with pytest.raises(ManifestError, match=f"duplicate scene '{first}' \\(first at line 1\\)") as info:
        m.load_split("scannet", "val", root=root)  # any split: the dataset is validated as a whole
    assert info.value.file.endswith("train.txt") and info.value.line == 1202


def test_error_overlapping_train_val(root):
    val_scene = (root / "scannet" / "scenes" / "val.txt").read_text().split()[0]
    train = root / "scannet" / "scenes" / "train.txt"
    train.write_text(train.read_text() + val_scene + "\n")
    with pytest.raises(ManifestError, match=f"'{val_scene}' is in both train .*overlapping train/val"):
        m.load_split("scannet", "train", root=root)


def test_error_unknown_scene(root):
    lr1 = root / "scannet" / "scenes" / "lr1.txt"
    lr1.write_text(lr1.read_text() + "scene9999_00\n")
    with pytest.raises(ManifestError, match="unknown scene 'scene9999_00'") as info:
        m.load_split("scannet", "lr1", root=root)
    assert info.value.line == 13
    lr1.write_text((root / "scannet" / "scenes" / "val.txt").read_text().split()[0] + "\n")
    m.clear_cache()
    with pytest.raises(ManifestError, match="scene outside train"):
        m.load_split("scannet", "lr1", root=root)


def test_error_scene_id_form(root):
    test = root / "scannet" / "scenes" / "test.txt"
    original = test.read_text()
    for bad in ("scans/scene0707_00", "../scene0707_00", "scene0707_00.."):
        test.write_text(bad + "\n" + original)
        m.clear_cache()
        with pytest.raises(ManifestError, match="invalid scene id") as info:
            m.load_split("scannet", "test", root=root)
        assert info.value.line == 1
    test.write_text("Area_1_office_2\n" + original)
    m.clear_cache()
    with pytest.raises(ManifestError, match="not a scannet scene id"):
        m.load_split("scannet", "test", root=root)


def test_error_unknown_class_in_ov_split(root):
    path = root / "scannet" / "ov_splits.yaml"
    _edit(path, "novel: [sofa, bookshelf, desk, toilet]", "novel: [sofa, bookshelf, desk, lavatory]")
    with pytest.raises(ManifestError, match="split 'b15n4': unknown class 'lavatory' in novel") as info:
        m.load_ov_split("scannet", "b12n7", root=root)
    assert info.value.file.endswith("ov_splits.yaml") and info.value.line is not None


def test_error_ov_split_not_a_partition(root):
    path = root / "s3dis" / "ov_splits.yaml"
    _edit(path, "novel: [window, table, sofa, bookcase]", "novel: [window, table, sofa, bookcase, chair]")
    with pytest.raises(ManifestError, match="'chair'.* listed twice"):
        m.load_ov_split("s3dis", "b8n4", root=root)
    m.clear_cache()
    _edit(path, "novel: [window, table, sofa, bookcase, chair]", "novel: [window, table, sofa]")
    with pytest.raises(ManifestError, match="'bookcase'.* in none"):
        m.load_ov_split("s3dis", "b8n4", root=root)


def test_error_unknown_class_in_label_map(root):
    path = root / "s3dis" / "label_map.csv"
    _edit(path, "stairs,clutter", "stairs,steps")
    with pytest.raises(ManifestError, match="unknown class 'steps'") as info:
        m.load_label_map("s3dis", root=root)
    assert info.value.line == 15


def test_error_class_index_order(root):
    _edit(root / "s3dis" / "classes.csv", "3,beam", "4,beam")
    with pytest.raises(ManifestError, match="train_index must count"):
        m.load_classes("s3dis", root=root)


def test_error_s3dis_overlap_and_duplicates(root):
    _edit(root / "s3dis" / "splits.yaml", "fold2_val: [2]", "fold2_val: [2, 3]")
    with pytest.raises(ManifestError, match=r"overlapping fold2_train/fold2_val: area\(s\) \[3\]"):
        m.load_split("s3dis", "train", root=root)
    m.clear_cache()
    shutil.copy(m.DEFAULT_ROOT / "s3dis" / "splits.yaml", root / "s3dis" / "splits.yaml")
    rooms = root / "s3dis" / "rooms.csv"
    rooms.write_text(rooms.read_text() + "Area_1,office_2\n")
    with pytest.raises(ManifestError, match="duplicate scene 'Area_1_office_2'"):
        m.load_split("s3dis", "train", root=root)
    m.clear_cache()
    shutil.copy(m.DEFAULT_ROOT / "s3dis" / "rooms.csv", rooms)
    rooms.write_text(rooms.read_text() + "Area_7,office_1\n")
    with pytest.raises(ManifestError, match="unknown area 'Area_7'"):
        m.load_split("s3dis", "all", root=root)


def test_error_kitti_sequence_twice(root):
    path = root / "semantickitti" / "sequences.csv"
    path.write_text(path.read_text() + "08,train,4071\n")
    with pytest.raises(ManifestError, match="duplicate sequence '08'.*overlapping"):
        m.load_split("semantickitti", "val", root=root)


def test_user_scene_list(tmp_path):
    good = tmp_path / "mine.txt"
    good.write_text("# my two rooms\nArea_1_office_2\n\nArea_5_hallway_6  # the damaged one\n")
    assert m.read_scene_list(good, "s3dis") == ["Area_1_office_2", "Area_5_hallway_6"]
    bad = tmp_path / "bad.txt"
    bad.write_text("Area_1_office_2\nArea_1_office_99\n")
    with pytest.raises(ManifestError, match="unknown scene 'Area_1_office_99'") as info:
        m.read_scene_list(bad, "s3dis")
    assert info.value.line == 2


# --- limited annotations ----------------------------------------------------------------------


def test_limited_annotation_names():
    assert [m.limited_annotation_count(n) for n in m.LIMITED_ANNOTATION_NAMES] == [20, 50, 100, 200]
    assert m.limited_annotation_count(20) == m.limited_annotation_count("20") == 20
    for bad in ("la", "lr20", "la-5", 0, True):
        with pytest.raises(ValueError):
            m.limited_annotation_count(bad)


def test_limited_annotation_mask_is_deterministic_and_exact():
    a = m.limited_annotation_mask("scene0000_00", 150_000, "la20", seed=0)
    assert a.dtype == bool and a.shape == (150_000,) and a.sum() == 20
    np.testing.assert_array_equal(a, m.limited_annotation_mask("scene0000_00", 150_000, 20, seed=0))
    assert (a != m.limited_annotation_mask("scene0000_00", 150_000, 20, seed=1)).any()
    assert (a != m.limited_annotation_mask("scene0000_01", 150_000, 20, seed=0)).any()
    for name, count in zip(m.LIMITED_ANNOTATION_NAMES, (20, 50, 100, 200)):
        assert m.limited_annotation_mask("scene0000_00", 150_000, name).sum() == count
    # a larger budget keeps the smaller one's points (one random key per point)
    big = m.limited_annotation_mask("scene0000_00", 150_000, "la200", seed=0)
    assert (big[a]).all()
    assert m.limited_annotation_mask("tiny", 7, "la20").sum() == 7  # fewer points than the budget


def test_limited_annotation_mask_respects_eligible():
    eligible = np.zeros(1000, dtype=bool)
    eligible[::7] = True
    mask = m.limited_annotation_mask("Area_1_office_2", 1000, 50, eligible=eligible)
    assert mask.sum() == 50 and not (mask & ~eligible).any()
    with pytest.raises(ValueError, match="bool"):
        m.limited_annotation_mask("x", 1000, 50, eligible=eligible.astype(int))


@pytest.mark.parametrize("as_numpy", [False, True])
def test_limited_annotation_official_file(tmp_path, as_numpy):
    idx = np.array([3, 17, 99], dtype=np.int64)
    table = {"scene0000_00": idx if as_numpy else torch.from_numpy(idx), "scene0001_00": torch.tensor([0])}
    path = tmp_path / f"points20_{as_numpy}.pth"
    torch.save(table, path)
    mask = m.limited_annotation_mask("scene0000_00", 100, "la20", official_file=path, seed=123)
    assert np.flatnonzero(mask).tolist() == [3, 17, 99]
    with pytest.raises(SceneError, match="not in the official"):
        m.limited_annotation_mask("scene0002_00", 100, "la20", official_file=path)
    with pytest.raises(SceneError, match="out of range"):
        m.limited_annotation_mask("scene0000_00", 50, "la20", official_file=path)


def test_limited_annotation_bad_official_file(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ManifestError, match="torch.load"):
        m.limited_annotation_mask("scene0000_00", 10, 5, official_file=garbage)
    with pytest.raises(ManifestError, match="not found"):
        m.limited_annotation_mask("scene0000_00", 10, 5, official_file=tmp_path / "missing.pth")


# --- check against a raw download -------------------------------------------------------------


def test_check_raw_s3dis(tmp_path):
    for area, room in (("Area_1", "office_2"), ("Area_1", "pantryX_1")):
        (tmp_path / area / room / "Annotations").mkdir(parents=True)
    missing, extra = m.check_raw("s3dis", tmp_path, "area1")
    assert "Area_1_office_2" not in missing and len(missing) == 43
    assert extra == ["Area_1_pantryX_1"]


@needs_shared
def test_check_raw_kitti_sample():
    missing, extra = m.check_raw("semantickitti", SHARED / "semantickitti", "val")
    assert len(missing) == 4070 and "08_000000" not in missing and extra == []
