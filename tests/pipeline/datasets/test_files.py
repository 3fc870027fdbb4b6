"""Plain scan files (`--dataset files`): every format round-trips through its own writer, options
(up axis, units, columns, label map, kind) apply, a malformed file fails alone naming itself, and
the warnings a new user must see reach the terminal and `ws3d validate`."""
from __future__ import annotations


import numpy as np
import pytest

from pipeline import schema
from pipeline.config import ConfigError
from pipeline.datasets import files
from pipeline.datasets.files import FilesReaderConfig, load_scan, read_scene, scan_files, scene_id_of
from pipeline.errors import SceneError, UserError
from pipeline.executor import ExecutorConfig
from pipeline.schema import IGNORE_INDEX
from pipeline.store import Store
from tests.paths import SHARED_DATA

N = 257
SYNC = ExecutorConfig(kind="sync")


def _cloud(seed: int = 0, n: int = N) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xyz = (rng.random((n, 3)) * [4.0, 3.0, 2.5]).astype(np.float32)
    rgb = rng.integers(0, 256, (n, 3)).astype(np.uint8)
    label = rng.integers(0, 20, n).astype(np.int32)
    instance = rng.integers(-1, 6, n).astype(np.int32)
    return xyz, rgb, label, instance


def _assert_scan(scan: files.Scan, xyz, rgb=None, label=None, *, atol=1e-5) -> None:
    np.testing.assert_allclose(scan.xyz, xyz, atol=atol)
    if rgb is not None:
        np.testing.assert_array_equal(scan.rgb, rgb)
    if label is not None:
        np.testing.assert_array_equal(scan.label, label)


# --- every format, written by its own writer ---------------------------------------------------


def test_ply_mesh_and_cloud_round_trip(tmp_path):
    from plyfile import PlyData, PlyElement

    xyz, rgb, label, instance = _cloud(1)
    vertex = np.empty(N, [("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"),
                          ("label", "i4"), ("instance", "i4")])
    vertex["x"], vertex["y"], vertex["z"] = xyz.T
    vertex["red"], vertex["green"], vertex["blue"] = rgb.T
    vertex["label"], vertex["instance"] = label, instance
    quads = np.array([(list(range(k, k + 4)),) for k in range(0, 200, 4)], [("vertex_indices", "i4", (4,))])
    PlyData([PlyElement.describe(vertex, "vertex"), PlyElement.describe(quads, "face")]).write(str(tmp_path / "m.ply"))
    mesh = load_scan(tmp_path / "m.ply")
    _assert_scan(mesh, xyz, rgb, label)
    np.testing.assert_array_equal(mesh.instance, instance)
    assert mesh.kind == "mesh" and mesh.faces.shape == (100, 3)  # quads fanned into two triangles each
    np.testing.assert_array_equal(mesh.faces[:2], [[0, 1, 2], [4, 5, 6]])

    # r g b as floats in 0..1, `class` as the label, an empty face element: a cloud, not a 0-face mesh
    cloud = np.empty(N, [("x", "f8"), ("y", "f8"), ("z", "f8"), ("r", "f4"), ("g", "f4"), ("b", "f4"), ("class", "u2")])
    cloud["x"], cloud["y"], cloud["z"] = xyz.T
    cloud["r"], cloud["g"], cloud["b"] = (rgb / 255.0).T
    cloud["class"] = label
    empty = np.zeros(0, [("vertex_indices", "i4", (3,))])
    PlyData([PlyElement.describe(cloud, "vertex"), PlyElement.describe(empty, "face")], text=True).write(str(tmp_path / "c.ply"))
    scan = load_scan(tmp_path / "c.ply")
    _assert_scan(scan, xyz, rgb, label)
    assert scan.kind == "points" and scan.faces is None and scan.instance is None


@pytest.mark.parametrize("ascii_", [True, False], ids=["ascii", "binary"])
def test_pcd_round_trip(tmp_path, ascii_):
    import open3d as o3d

    xyz, rgb, label, _ = _cloud(2)
    pcd = o3d.t.geometry.PointCloud()
    pcd.point.positions = o3d.core.Tensor(xyz)
    pcd.point.colors = o3d.core.Tensor(rgb)
    pcd.point.label = o3d.core.Tensor(label[:, None])
    path = tmp_path / "scan.pcd"
    assert o3d.t.io.write_point_cloud(str(path), pcd, write_ascii=ascii_)
    assert (b"DATA ascii" if ascii_ else b"DATA binary") in path.read_bytes()[:400]
    _assert_scan(load_scan(path), xyz, rgb, label)



def test_a_pcd_without_a_point_count_or_cut_short_fails_in_one_line(tmp_path):
    """Open3D reads a PCD header without POINTS as one point of uninitialised memory: the header
    count is checked first, and a file with fewer points than it declares is refused."""
    no_count = tmp_path / "no_count.pcd"
    no_count.write_bytes(b"# .PCD v0.7\nFIELDS x y z\nDATA ascii\n")
    with pytest.raises(SceneError, match=r"no_count\.pcd.*no POINTS"):
        load_scan(no_count)
    short = tmp_path / "short.pcd"
    short.write_bytes(b"VERSION .7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 3\nHEIGHT 1\n"
                      b"POINTS 3\nDATA ascii\n0 0 0\n1 1 1\n")
    with pytest.raises(SceneError, match=r"short\.pcd") as info:
        load_scan(short)
    assert "\n" not in str(info.value)
    import open3d as o3d

    pcd = o3d.t.geometry.PointCloud()
    pcd.point.positions = o3d.core.Tensor(_cloud(3)[0])
    cut = tmp_path / "cut.pcd"
    assert o3d.t.io.write_point_cloud(str(cut), pcd, write_ascii=False)
    cut.write_bytes(cut.read_bytes()[:-120])
    with pytest.raises(SceneError, match=r"cut\.pcd.*truncated"):
        load_scan(cut)

def test_npy_npz_round_trip(tmp_path):
    xyz, rgb, label, instance = _cloud(3)
    np.save(tmp_path / "six.npy", np.concatenate([xyz, rgb.astype(np.float32)], axis=1))
    scan = load_scan(tmp_path / "six.npy")
    _assert_scan(scan, xyz, rgb)
    assert scan.label is None and any("columns-guessed" in w for w in scan.warnings)

    structured = np.empty(N, [("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"),
                              ("semantic", "i2")])
    structured["x"], structured["y"], structured["z"] = xyz.T
    structured["red"], structured["green"], structured["blue"] = rgb.T
    structured["semantic"] = label
    np.save(tmp_path / "fields.npy", structured)
    _assert_scan(load_scan(tmp_path / "fields.npy"), xyz, rgb, label)

    np.savez(tmp_path / "named.npz", points=xyz, colors=rgb, labels=label, instance=instance,
             faces=np.array([[0, 1, 2]]))
    scan = load_scan(tmp_path / "named.npz")
    _assert_scan(scan, xyz, rgb, label)
    np.testing.assert_array_equal(scan.instance, instance)
    assert scan.kind == "mesh" and scan.faces.tolist() == [[0, 1, 2]]

    np.save(tmp_path / "bare.npy", xyz)  # x y z only: unlabelled and grey, said so
    scan = load_scan(tmp_path / "bare.npy")
    assert scan.label is None and (scan.rgb == files.GREY).all() and scan.colour == "none"
    assert any(w.startswith("[no-colour]") for w in scan.warnings)


def test_las_and_laz_round_trip(tmp_path):
    laspy = pytest.importorskip("laspy")
    xyz, rgb, label, _ = _cloud(4)
    for name in ("scan.las", "scan.laz"):
        header = laspy.LasHeader(point_format=3, version="1.2")
        header.scales = np.array([0.001, 0.001, 0.001])
        header.offsets = np.zeros(3)
        las = laspy.LasData(header)
        las.x, las.y, las.z = xyz[:, 0].astype(np.float64), xyz[:, 1].astype(np.float64), xyz[:, 2].astype(np.float64)
        las.red, las.green, las.blue = (rgb.astype(np.uint16) * 257).T  # LAS colour is 16-bit
        las.classification = label.astype(np.uint8)
        las.write(str(tmp_path / name))
        _assert_scan(load_scan(tmp_path / name), xyz, rgb, label, atol=1e-3)


@pytest.mark.parametrize("suffix,delimiter,count_line", [(".txt", " ", False), (".xyz", ",", False), (".pts", " ", True)])
def test_text_columns_round_trip(tmp_path, suffix, delimiter, count_line):
    xyz, rgb, label, _ = _cloud(5)
    path = tmp_path / f"scan{suffix}"
    values = np.concatenate([xyz, rgb, label[:, None]], axis=1) if suffix != ".pts" else \
        np.concatenate([xyz, np.full((N, 1), 7.0), rgb], axis=1)  # Leica: x y z intensity r g b
    np.savetxt(path, values, fmt="%.6f", delimiter=delimiter, header=str(N) if count_line else "", comments="")
    scan = load_scan(path)
    _assert_scan(scan, xyz, rgb, None if suffix == ".pts" else label)


def test_bin_records_and_an_xyz_only_bin(tmp_path):
    xyz, *_ = _cloud(6)
    intensity = np.linspace(0, 1, N, dtype=np.float32)
    np.concatenate([xyz, intensity[:, None]], axis=1).astype(np.float32).tofile(tmp_path / "kitti.bin")
    scan = load_scan(tmp_path / "kitti.bin")
    _assert_scan(scan, xyz)
    np.testing.assert_array_equal(scan.rgb[:, 0], np.rint(intensity * 255).astype(np.uint8))
    assert scan.colour == "intensity"
    # 3 floats a point read 4 at a time would be garbage: refused with the way out
    t = np.linspace(0, 20, 1200)
    sweep = np.stack([10 * np.cos(t), 10 * np.sin(t), np.full_like(t, -1.7)], axis=1).astype(np.float32)  # in scan order
    sweep.tofile(tmp_path / "xyz_only.bin")
    with pytest.raises(SceneError, match="x y z records.*reader.columns='x y z'"):
        load_scan(tmp_path / "xyz_only.bin")
    _assert_scan(load_scan(tmp_path / "xyz_only.bin", FilesReaderConfig(columns="x y z")), sweep)


# --- options ----------------------------------------------------------------------------------


def test_up_axis_units_and_columns(tmp_path):
    xyz, rgb, label, _ = _cloud(7)
    # a y-up file in millimetres with its columns in another order
    y_up_mm = np.stack([xyz[:, 0], xyz[:, 2], -xyz[:, 1]], axis=1) * 1000.0
    np.savetxt(tmp_path / "scan.txt", np.concatenate([label[:, None], y_up_mm, rgb], axis=1), fmt="%.4f")
    cfg = FilesReaderConfig(up_axis="y", units="mm", columns="label x y z red green blue")
    _assert_scan(load_scan(tmp_path / "scan.txt", cfg), xyz, rgb, label, atol=1e-4)
    for bad, message in (({"columns": "x y z r g b colour"}, "unknown column"), ({"units": "furlong"}, "units")):
        with pytest.raises(UserError, match=message):
            load_scan(tmp_path / "scan.txt", FilesReaderConfig(**{**{"columns": "label x y z r g b"}, **bad}))


def test_label_maps(tmp_path):
    xyz, rgb, _, _ = _cloud(8)
    raw = np.repeat(np.array([0, 5, 40, 99]), [57, 100, 60, 40])  # 0 unlabelled, 99 unknown to the map
    np.save(tmp_path / "room.npy", np.concatenate([xyz, rgb, raw[:, None]], axis=1))
    table = tmp_path / "map.csv"
    table.write_text("raw,class\n0,\n5,chair\n40,floor\n")
    scene = read_scene(tmp_path, "room", cfg=FilesReaderConfig(label_map=str(table), ignore_labels=(0,)))
    names = files.class_names_of(FilesReaderConfig())
    expected = np.array([IGNORE_INDEX] * 57 + [names.index("chair")] * 100 + [names.index("floor")] * 60
                        + [IGNORE_INDEX] * 40)
    np.testing.assert_array_equal(scene.semantic, expected)
    lost = [w for w in scene.warnings if "outside the map" in w]
    assert len(lost) == 1 and "40 of 200" in lost[0] and "99 x40" in lost[0] and lost[0].startswith("[labels-unknown]")

    # the NYU40 ids of ScanNet's own release through reader.label_map=dataset, another class list by file
    np.save(tmp_path / "nyu.npy", np.concatenate([xyz, rgb, np.full((N, 1), 5)], axis=1))  # NYU40 5 = chair
    nyu = read_scene(tmp_path, "nyu", cfg=FilesReaderConfig(label_map="dataset"))
    assert (nyu.semantic == names.index("chair")).all()
    classes = tmp_path / "mine.txt"
    classes.write_text("ground\nrobot\n")
    assert files.class_names_of(FilesReaderConfig(classes=str(classes))) == ("ground", "robot")
    with pytest.raises(UserError, match="unknown class 'chair'"):
        files.label_lookup(FilesReaderConfig(classes=str(classes), label_map=str(table)))


def test_labels_given_as_another_id_space_are_said_lost(tmp_path):
    xyz, rgb, _, _ = _cloud(9)
    np.save(tmp_path / "a.npy", np.concatenate([xyz, rgb, np.full((N, 1), 3)], axis=1))  # class id 3, not raw
    table = tmp_path / "map.csv"
    table.write_text("raw,class\n10,chair\n40,floor\n")
    scene = read_scene(tmp_path, "a", cfg=FilesReaderConfig(label_map=str(table)))
    warning = next(w for w in scene.warnings if w.startswith("[labels-lost]"))
    assert "100%" in warning and "leave reader.label_map empty" in warning
    assert scene.label_source == "none"


# --- the folder: ids, splits, sidecars, one bad file -------------------------------------------


def test_scene_ids_splits_and_sidecars(tmp_path):
    xyz, *_ = _cloud(10)
    for rel in ("train/site a/scan 01.npy", "train/b.npy", "val/c.npy", "c.npy", "c.ply.npy"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / rel, xyz)
    (tmp_path / "notes.md").write_text("not a scan")
    np.save(tmp_path / "d_points.npy", xyz)
    np.save(tmp_path / "d_labels.npy", np.arange(N) % 3)  # a sidecar, not a scan of its own
    ids = scan_files(tmp_path)
    assert list(ids) == sorted(["train__site_a__scan_01", "train__b", "val__c", "c", "c.ply", "d_points"])
    assert scene_id_of("a/b c/d.e.ply") == "a__b_c__d.e"
    assert files.folder_splits(list(ids)) == {"train": ("train__b", "train__site_a__scan_01"), "val": ("val__c",)}
    np.testing.assert_array_equal(load_scan(ids["d_points"]).label, np.arange(N) % 3)
    with pytest.raises(UserError, match="no such folder"):
        scan_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no scan file"):
        scan_files(tmp_path / "empty")


def test_ingest_a_folder_a_bad_file_fails_alone_and_warnings_are_printed(tmp_path):
    from plyfile import PlyData, PlyElement

    from pipeline.datasets.ingest import INGEST, IngestConfig
    from pipeline.stage import StageRun, run_stage
    from pipeline.validate import validate_store

    raw = tmp_path / "raw"
    raw.mkdir()
    xyz, rgb, label, _ = _cloud(11)
    np.save(raw / "good.npy", np.concatenate([xyz, rgb, label[:, None]], axis=1))
    np.save(raw / "grey.npy", xyz)
    vertex = np.empty(N, [("x", "f4"), ("y", "f4"), ("z", "f4")])
    vertex["x"], vertex["y"], vertex["z"] = xyz.T
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(raw / "cut.ply"))
    (raw / "cut.ply").write_bytes((raw / "cut.ply").read_bytes()[:-500])  # truncated
    lines: list[str] = []
    report = run_stage(INGEST, StageRun(store=str(tmp_path / "s.zarr"), cfg=IngestConfig(dataset="files"), raw=str(raw)),
                       executor=SYNC, echo=lines.append)
    status = {r.scene_id: r for r in report.results}
    assert status["good"].status == status["grey"].status == "done" and status["cut"].status == "failed"
    assert status["cut"].file == str(raw / "cut.ply") and "unreadable PLY" in status["cut"].error
    assert "\n" not in status["cut"].error
    text = "\n".join(lines)
    assert "ingest warnings (scenes per kind):" in text and "no-colour 1" in text
    assert " ! grey [no-colour] x1: no colour and no intensity" in text  # a line per scene and kind, suspect marked
    store = Store.open(tmp_path / "s.zarr")
    assert store.dataset == "files" and list(store.class_names) == list(files.class_names_of(FilesReaderConfig()))
    np.testing.assert_array_equal(store.read("good", schema.SEMANTIC), label)
    validation = validate_store(store)
    assert not validation.problems and not validation.ok
    assert [(f.scene_id, f.where) for f in validation.flagged] == [("grey", "ingest [no-colour]")]


def test_reader_options_are_strict(tmp_path):
    from pipeline.datasets.ingest import IngestConfig

    with pytest.raises(ConfigError, match="up_axiz"):
        IngestConfig(dataset="files", reader={"up_axiz": "y"}).reader_config()
    with pytest.raises(ConfigError, match="up_axis"):
        IngestConfig(dataset="files", reader={"up_axis": "w"}).reader_config()


def test_lidar_sweep_in_a_map_frame_is_flagged():
    rng = np.random.default_rng(12)
    angles = rng.uniform(0, 2 * np.pi, 2000)
    ring = np.stack([np.cos(angles) * 8, np.sin(angles) * 8, rng.uniform(-1.5, 1, 2000)], axis=1)
    assert files.sensor_far_warning(ring.astype(np.float32), np.zeros(3)) is None  # around its sensor
    moved = files.sensor_far_warning((ring + [350.0, -120.0, 40.0]).astype(np.float32), np.zeros(3))
    assert moved is not None and moved.startswith("[sensor-frame]") and "reader.sensor_origin" in moved


@pytest.mark.skipif(not (SHARED_DATA / "plain").is_dir(), reason="real samples absent (../shared/data/plain)")
def test_real_lidar_npy_with_labels_kept_apart(tmp_path):
    """The Open3D-ML demo scan as a user's files: x y z only (no intensity) and its labels in a
    second file (SemanticKITTI training ids 0..19, 0 unlabelled), mapped by a raw,class file."""
    raw = tmp_path / "raw"
    raw.mkdir()
    points = np.load(SHARED_DATA / "plain" / "lidar_000700_points.npy")
    labels = np.load(SHARED_DATA / "plain" / "lidar_000700_labels.npy").reshape(-1)
    np.save(raw / "sweep_points.npy", points)
    np.save(raw / "sweep_labels.npy", labels)
    kitti = files.class_names_of(FilesReaderConfig(classes="semantickitti"))
    table = tmp_path / "map.csv"
    table.write_text("raw,class\n0,\n" + "".join(f"{i + 1},{name}\n" for i, name in enumerate(kitti)))
    cfg = FilesReaderConfig(classes="semantickitti", label_map=str(table), kind="lidar")
    assert list(scan_files(raw)) == ["sweep_points"]
    scene = read_scene(raw, "sweep_points", cfg=cfg)
    assert scene.kind == "lidar" and len(scene.xyz) == len(points) == 85_962
    np.testing.assert_array_equal(scene.semantic, np.where(labels > 0, labels - 1, IGNORE_INDEX))
    kinds = {w.split("]")[0] + "]" for w in scene.warnings}
    # the sample is itself a sweep in a map frame (its nearest points 30 m from the origin)
    assert "[no-colour]" in kinds and "[sensor-frame]" in kinds
    auto = read_scene(raw, "sweep_points", cfg=FilesReaderConfig(classes="semantickitti", label_map=str(table),
                                                                 kind="lidar", sensor_origin="auto"))
    assert not any(w.startswith("[sensor-frame]") for w in auto.warnings)
    assert any(w.startswith("[sensor-estimated]") for w in auto.warnings)
    d = np.linalg.norm(auto.xyz - auto.sensor_origin, axis=1)
    assert np.percentile(d, 1) < 5.0  # the sweep surrounds the estimated sensor


@pytest.mark.skipif(not (SHARED_DATA / "semantickitti").is_dir(), reason="real samples absent (../shared/data)")
def test_sensor_estimate_on_a_real_sweep_with_a_known_sensor():
    """The real SemanticKITTI scan has its sensor at the origin: moved into a "map frame", the
    estimate finds the sensor again within 1.5 m (xy) and 0.5 m (z)."""
    points = np.fromfile(SHARED_DATA / "semantickitti/sequences/08/velodyne/000000.bin", np.float32).reshape(-1, 4)[:, :3]
    offset = np.array([350.0, -120.0, 40.0], np.float32)
    est = files.estimate_sensor_origin(points + offset)
    assert np.linalg.norm(est[:2] - offset[:2]) < 1.5 and abs(est[2] - offset[2]) < 0.5
