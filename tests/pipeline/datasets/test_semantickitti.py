"""SemanticKITTI reader: the real scan against the yaml map, labels, missing labels, scan merging."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.datasets import load_label_map
from pipeline.datasets import semantickitti as kitti
from pipeline.errors import SceneError
from pipeline.schema import IGNORE_INDEX
from tests.paths import SHARED_DATA

SHARED = SHARED_DATA
KITTI_SAMPLE = SHARED / "semantickitti"
needs_sample = pytest.mark.skipif(
    not (KITTI_SAMPLE / "sequences" / "08" / "velodyne" / "000000.bin").exists(),
    reason=f"real SemanticKITTI sample not found at {KITTI_SAMPLE} (../shared/data is absent on this machine)",
)


def _expected_histogram(label_path: Path, yaml_path: Path) -> np.ndarray:
    """Independent of the reader: raw ids -> learning_map (0..19) -> counts per learning id."""
    config = yaml.safe_load(yaml_path.read_text())
    raw = np.fromfile(label_path, dtype=np.uint32) & 0xFFFF
    ids, counts = np.unique(raw, return_counts=True)
    hist = np.zeros(20, dtype=np.int64)
    for raw_id, count in zip(ids.tolist(), counts.tolist()):
        hist[config["learning_map"][raw_id]] += count
    return hist


@needs_sample
def test_real_scan_ingests_all_points_with_the_yaml_map():
    scene = kitti.read_scene(KITTI_SAMPLE, "08_000000")
    scene.validate()
    assert len(scene.xyz) == 123_389
    assert scene.kind == "lidar" and scene.warnings == []
    np.testing.assert_array_equal(scene.sensor_origin, np.zeros(3))
    expected = _expected_histogram(
        KITTI_SAMPLE / "sequences" / "08" / "labels" / "000000.label", KITTI_SAMPLE / "semantic-kitti.yaml"
    )
    assert int((scene.semantic == IGNORE_INDEX).sum()) == expected[0]
    got = np.bincount(scene.semantic[scene.semantic != IGNORE_INDEX], minlength=19)
    np.testing.assert_array_equal(got, expected[1:])
    assert set(np.unique(scene.semantic)) <= set(range(19)) | {IGNORE_INDEX}
    # instances: one per distinct full label with a non-zero instance id
    labels = np.fromfile(KITTI_SAMPLE / "sequences" / "08" / "labels" / "000000.label", dtype=np.uint32)
    assert scene.instance.max() + 1 == len(np.unique(labels[(labels >> 16) > 0]))
    np.testing.assert_array_equal(scene.instance == -1, (labels >> 16) == 0)
    # geometry and intensity as stored
    raw = np.fromfile(KITTI_SAMPLE / "sequences" / "08" / "velodyne" / "000000.bin", dtype=np.float32).reshape(-1, 4)
    np.testing.assert_array_equal(scene.xyz, raw[:, :3])
    np.testing.assert_array_equal(scene.rgb[:, 0], np.clip(np.rint(raw[:, 3].astype(np.float64) * 255), 0, 255))
    assert (scene.rgb == scene.rgb[:, :1]).all()
    assert kitti.list_scenes(KITTI_SAMPLE) == ["08_000000"]


@needs_sample
def test_bundled_map_equals_the_official_yaml(tmp_path):
    assert kitti.load_learning_map(KITTI_SAMPLE / "semantic-kitti.yaml") == load_label_map("semantickitti")
    seq = tmp_path / "sequences" / "08"
    shutil.copytree(KITTI_SAMPLE / "sequences" / "08", seq)  # no yaml beside it
    without_yaml = kitti.read_scene(tmp_path, "08_000000")
    with_yaml = kitti.read_scene(KITTI_SAMPLE, "08_000000")
    np.testing.assert_array_equal(without_yaml.semantic, with_yaml.semantic)
    assert not any(f.endswith(".yaml") for f in without_yaml.source_files)


@needs_sample
def test_yaml_with_other_classes_is_refused(tmp_path):
    config = yaml.safe_load((KITTI_SAMPLE / "semantic-kitti.yaml").read_text())
    config["labels"][10] = "automobile"
    bad = tmp_path / "other.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(SceneError, match="expected"):
        kitti.read_scene(KITTI_SAMPLE, "08_000000", cfg=kitti.SemanticKITTIReaderConfig(label_yaml=str(bad)))


def test_decode_labels_moving_classes_and_instances():
    lut = kitti.lookup_table(load_label_map("semantickitti"))
    car, moving_car, road, person = 10, 252, 40, 30
    labels = np.array(
        [car | 5 << 16, moving_car | 5 << 16, road, person | 5 << 16, car | 5 << 16, 0, 1, 77], dtype=np.uint32
    )
    semantic, instance, unknown = kitti.decode_labels(labels, lut)
    names = kitti.CLASS_NAMES
    assert semantic[:5].tolist() == [names.index(n) for n in ("car", "car", "road", "person", "car")]
    assert semantic[5:].tolist() == [IGNORE_INDEX] * 3  # unlabeled, outlier, unknown raw id 77
    assert unknown.tolist() == [77]
    # instance id 5 under three different raw classes: three instances; the same full label: one
    assert instance[2] == -1 and instance[5] == -1
    assert instance[0] == instance[4]
    assert len({instance[0], instance[1], instance[3]}) == 3
    assert sorted(set(instance[instance >= 0].tolist())) == [0, 1, 2]


def _write_scan(seq: Path, frame: int, points: np.ndarray, labels: np.ndarray | None) -> None:
    (seq / "velodyne").mkdir(parents=True, exist_ok=True)
    points.astype(np.float32).tofile(seq / "velodyne" / f"{frame:06d}.bin")
    if labels is not None:
        (seq / "labels").mkdir(parents=True, exist_ok=True)
        labels.astype(np.uint32).tofile(seq / "labels" / f"{frame:06d}.label")


def _random_rigid(rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    t = np.eye(4)
    t[:3, :3], t[:3, 3] = q, rng.normal(0, 5, 3)
    return t


def test_scan_without_labels_is_all_ignored(tmp_path):
    pts = np.random.default_rng(0).normal(size=(50, 4))
    _write_scan(tmp_path / "sequences" / "11", 3, pts, None)
    scene = kitti.read_scene(tmp_path, "11_000003")
    assert (scene.semantic == IGNORE_INDEX).all() and (scene.instance == -1).all()
    assert any("no label file" in w for w in scene.warnings)
    assert kitti.list_scenes(tmp_path) == ["11_000003"]


def test_malformed_files_raise(tmp_path):
    seq = tmp_path / "sequences" / "00"
    _write_scan(seq, 0, np.zeros((10, 4)), np.zeros(9))
    with pytest.raises(SceneError, match="count mismatch") as info:
        kitti.read_scene(tmp_path, "00_000000")
    assert info.value.file.endswith("000000.label")
    (seq / "velodyne" / "000001.bin").write_bytes(b"\0" * 20)
    with pytest.raises(SceneError, match="16 bytes"):
        kitti.read_scene(tmp_path, "00_000001")
    with pytest.raises(SceneError, match="scan not found"):
        kitti.read_scene(tmp_path, "00_000009")
    with pytest.raises(SceneError, match="08_000000"):
        kitti.read_scene(tmp_path, "seq08_0")


def test_merge_scans_into_the_current_frame(tmp_path):
    rng = np.random.default_rng(3)
    seq = tmp_path / "sequences" / "04"
    tr = _random_rigid(rng)  # velodyne -> camera
    velo = [_random_rigid(rng) for _ in range(3)]  # velodyne i -> world
    cam = [tr @ v @ np.linalg.inv(tr) for v in velo]  # what poses.txt stores
    world = [rng.uniform(-20, 20, (30 + 10 * i, 3)) for i in range(3)]
    car = 10 | (7 << 16)
    for i in range(3):
        local = (np.linalg.inv(velo[i])[:3, :3] @ world[i].T).T + np.linalg.inv(velo[i])[:3, 3]
        pts = np.concatenate([local, np.full((len(local), 1), 0.5)], axis=1)
        _write_scan(seq, i, pts, np.full(len(local), car))
    np.savetxt(seq / "poses.txt", np.stack([c[:3, :4].ravel() for c in cam]))
    (seq / "calib.txt").write_text(
        "P0: " + " ".join(["0"] * 12) + "\nTr: " + " ".join(f"{v:.17g}" for v in tr[:3, :4].ravel()) + "\n"
    )
    scene = kitti.read_scene(tmp_path, "04_000002", cfg=kitti.SemanticKITTIReaderConfig(merge_scans=3))
    assert len(scene.xyz) == 30 + 40 + 50 and scene.warnings == []
    to_k = np.linalg.inv(velo[2])
    expected = np.concatenate([(to_k[:3, :3] @ w.T).T + to_k[:3, 3] for w in world])
    np.testing.assert_allclose(scene.xyz, expected, atol=2e-3)
    assert (scene.instance == 0).all()  # the same car through the three scans: one instance
    assert (scene.semantic == kitti.CLASS_NAMES.index("car")).all()
    # at the start of a sequence fewer scans exist: merged anyway, with a warning
    first = kitti.read_scene(tmp_path, "04_000001", cfg=kitti.SemanticKITTIReaderConfig(merge_scans=3))
    assert len(first.xyz) == 70 and any("merged 2 scan(s)" in w for w in first.warnings)
    # merging needs the poses
    (seq / "poses.txt").unlink()
    with pytest.raises(SceneError, match="poses.txt"):
        kitti.read_scene(tmp_path, "04_000002", cfg=kitti.SemanticKITTIReaderConfig(merge_scans=2))
    single = kitti.read_scene(tmp_path, "04_000002")  # one scan needs no poses
    assert len(single.xyz) == 50


def test_velodyne_poses_identity_calibration():
    poses = np.stack([np.eye(4), _random_rigid(np.random.default_rng(1))])
    np.testing.assert_allclose(kitti.velodyne_poses(poses, np.eye(4)), poses)


def test_what_a_new_user_gets_wrong_is_said(tmp_path):
    """Labels given as training ids (0..19) lose most of them through the raw-id map; a sweep
    without intensity renders black; an x y z-only file read as x y z intensity is garbage."""
    from pipeline.errors import is_suspect

    rng = np.random.default_rng(1)
    t = np.linspace(0, 30, 3000)  # a sweep in scan order: consecutive points are neighbours
    xyz = np.stack([12 * np.cos(t), 12 * np.sin(t), rng.uniform(-1.7, 1.0, t.size)], axis=1)
    seq = tmp_path / "sequences" / "00"
    train_ids = rng.integers(1, 20, t.size)  # what a converted dataset hands over
    _write_scan(seq, 0, np.concatenate([xyz, np.zeros((t.size, 1))], axis=1), train_ids)
    scene = kitti.read_scene(tmp_path, "00_000000")
    lost = [w for w in scene.warnings if w.startswith("[labels-lost]")]
    assert len(lost) == 1 and "training ids" in lost[0] and is_suspect(lost[0])
    assert any(w.startswith("[no-colour]") and "black" in w for w in scene.warnings)
    raw_ids = np.asarray([40, 48, 50, 70, 10])[rng.integers(0, 5, t.size)]  # raw ids, intensity present
    _write_scan(seq, 1, np.concatenate([xyz, rng.random((t.size, 1))], axis=1), raw_ids)
    assert kitti.read_scene(tmp_path, "00_000001").warnings == []
    xyz.astype(np.float32).tofile(seq / "velodyne" / "000002.bin")  # 3000 x 3 floats: also a whole number of 16 bytes
    with pytest.raises(SceneError, match="x y z records"):
        kitti.read_scene(tmp_path, "00_000002")


@needs_sample
def test_the_real_scan_as_x_y_z_only_is_refused(tmp_path):
    raw = np.fromfile(KITTI_SAMPLE / "sequences" / "08" / "velodyne" / "000000.bin", np.float32).reshape(-1, 4)
    assert not kitti.looks_like_xyz_records(raw.reshape(-1))
    xyz = np.ascontiguousarray(raw[:123_388, :3]).reshape(-1)  # 123,388 x 3 floats: a multiple of 4 as well
    assert xyz.size % 4 == 0 and kitti.looks_like_xyz_records(xyz)
