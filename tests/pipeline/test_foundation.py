"""Foundation: configs, scene ids, the store round trip, validation, the ScanNet reader, ingest."""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass

import numpy as np
import pytest
import zarr

from pipeline import schema
from pipeline.config import ConfigError, config_hash, load_config
from pipeline.datasets.ingest import INGEST, IngestConfig, hashed_fields
from pipeline.datasets import scannet
from pipeline.errors import SceneError
from pipeline.store import Store, StoreError
from pipeline.datasets.synthetic import make_room, write_label_table, write_scannet_layout
from pipeline.validate import validate_store
from tests.synthdata import SHARED_DATA, SMALL, small_raw


@dataclass(frozen=True)
class _Inner:
    k: int = 3
    """an int"""


@dataclass(frozen=True)
class _Cfg:
    lr: float = 0.1
    """a float"""
    name: str = "a"
    """a string"""
    sizes: tuple[int, ...] = (1, 2)
    """ints"""
    inner: _Inner = _Inner()
    """nested"""


def test_config_strict_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1\nsizes: [4, 5]\ninner: {k: 7}\n")
    cfg = load_config(_Cfg, path, ["name=b", "inner.k=9"])
    assert cfg == _Cfg(lr=1.0, name="b", sizes=(4, 5), inner=_Inner(k=9))
    assert isinstance(cfg.lr, float)
    path.write_text("lr: 1\nbogus: 2\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_config(_Cfg, path)
    with pytest.raises(ConfigError, match="lr"):
        load_config(_Cfg, None, ["lr=fast"])
    with pytest.raises(ConfigError, match="integer"):
        load_config(_Cfg, None, ["inner.k=1.5"])
    assert config_hash(_Cfg()) == config_hash(_Cfg()) != config_hash(_Cfg(lr=0.2))


@pytest.mark.parametrize("bad", ["../etc", "a/b", ".hidden", "", "x" * 200, "a\\b"])
def test_scene_ids_reject_paths(bad):
    with pytest.raises(ValueError):
        schema.check_scene_id(bad)


def _ingested(tmp_path, n=2):
    raw = small_raw(tmp_path / "raw", n)
    store = Store.create(tmp_path / "s.zarr", dataset="synthetic", class_names=list(scannet.CLASS_NAMES))
    cfg = IngestConfig(dataset="synthetic")
    for scene_id in scannet.list_scenes(raw):
        assert INGEST.run_scene(str(store.path), scene_id, cfg, raw=str(raw)).status == "done"
    return raw, store, cfg


def test_store_round_trip_and_reader_truth(tmp_path):
    raw, store, _ = _ingested(tmp_path, 2)
    for index, scene_id in enumerate(store.scene_ids()):
        truth = make_room(0, index, SMALL)
        assert np.allclose(store.read(scene_id, schema.XYZ), truth.xyz, atol=1e-4)  # alignment undone
        assert np.array_equal(store.read(scene_id, schema.RGB), truth.rgb)
        assert np.array_equal(store.read(scene_id, schema.SEMANTIC), truth.semantic)
        assert np.array_equal(store.read(scene_id, schema.INSTANCE), truth.instance)
        assert np.array_equal(store.read(scene_id, schema.FACES), truth.faces)
        record = store.stage_record(scene_id, "ingest")
        assert record["stats"]["points"] == len(truth.xyz)
        assert record["stats"]["instances"] == len(truth.instance_labels)
        assert record["config"]["dataset"] == "synthetic"
    assert validate_store(Store.open(store.path)).ok
    assert not (store.path / ".tmp").exists()  # no temporary debris after complete writes


@pytest.mark.parametrize("batch_bytes", [1, 256 << 20])
def test_store_write_matches_zarr_local_store_file_for_file(tmp_path, monkeypatch, batch_bytes):
    """The store encodes a stage in memory and writes the files itself: the directory it leaves is
    what zarr's own LocalStore writes (checksummed chunks, every chunk written), file for file and
    byte for byte, also when the arrays go in several memory batches (batch_bytes=1: one array a
    batch); each node's zarr.json adds a manifest of the node's other files and their sizes."""
    from pathlib import Path

    from pipeline import store as store_module
    from zarr.storage import LocalStore

    monkeypatch.setattr(store_module, "_BATCH_BYTES", batch_bytes)
    rng = np.random.default_rng(0)
    n = 5000
    arrays = {schema.XYZ: rng.normal(size=(n, 3)).astype(np.float32), schema.RGB: rng.integers(0, 255, (n, 3)).astype(np.uint8),
              schema.SEMANTIC: np.zeros(n, np.int16), schema.INSTANCE: rng.integers(-1, 9, n).astype(np.int32),
              schema.FACES: rng.integers(0, n, (2 * n, 3)).astype(np.int32)}
    store = Store.create(tmp_path / "s", dataset="d", class_names=["a"])
    store.write_stage("scene0000_00", "ingest", arrays, {"config_hash": "h", "stats": {"kind": "mesh"}})
    views = {schema.VIEW_K: np.eye(3, dtype=np.float32)[None].repeat(2, 0),
             schema.VIEW_POSE: np.eye(4, dtype=np.float32)[None].repeat(2, 0),
             schema.VIEW_RGB: rng.integers(0, 255, (2, 6, 8, 3)).astype(np.uint8),
             schema.VIEW_DEPTH: rng.uniform(0, 4, (2, 6, 8)).astype(np.float16),
             schema.VIEW_POINT_INDEX: rng.integers(-1, n, (2, 6, 8)).astype(np.int32),
             schema.VISIBLE_PTR: np.array([0, 3, 5]), schema.VISIBLE_IDS: np.array([1, 2, 3, 0, 4], np.int32),
             schema.VIEW_COUNT: np.zeros(n, np.uint16)}
    store.write_stage("scene0000_00", "render", views, {"config_hash": "r", "stats": {}})
    scene = store.scene_dir("scene0000_00")
    ingest_record = {"ws3d_stage": store.stage_record("scene0000_00", "ingest")}
    render_record = {"ws3d_stage": store.stage_record("scene0000_00", "render")}
    assert ingest_record["ws3d_stage"]["stats"] == {"kind": "mesh"} and render_record["ws3d_stage"]["config_hash"] == "r"
    # the reference: the same hierarchy through zarr's LocalStore
    ref = tmp_path / "ref"
    root = zarr.open_group(LocalStore(ref), mode="w", attributes=ingest_record)
    for spec, data in [*arrays.items(), *views.items()]:
        group = root.require_group(spec.group)
        if spec.group == "views":
            group.attrs.update(render_record)
        group.create_array(spec.name, data=schema.coerce(spec, data), chunks=tuple(max(1, c) for c in spec.chunks(data.shape)),
                           compressors=store_module._compressors(spec), fill_value=0, dimension_names=[str(d) for d in spec.dims],
                           config={"write_empty_chunks": True})

    def files(top: Path) -> dict[str, bytes]:
        return {str(p.relative_to(top)): p.read_bytes() for p in sorted(top.rglob("*")) if p.is_file()}

    ours, theirs = files(scene), files(ref)
    assert sorted(ours) == sorted(theirs)
    manifests = {}
    for name in ours:
        if name.endswith("zarr.json"):  # same JSON (key order may differ) but for the manifest
            mine = json.loads(ours[name])
            manifest = mine["attributes"].pop(store_module.MANIFEST, None)
            if manifest is not None:
                manifests[name] = manifest
                arrays_metadata = mine["attributes"].pop(store_module.ARRAYS)  # each array's zarr.json, once more
                prefix = name[: -len("zarr.json")]
                assert {prefix + k + "/zarr.json" for k in arrays_metadata} <= set(ours), name
                assert all(json.loads(ours[prefix + k + "/zarr.json"]) == v for k, v in arrays_metadata.items())
            assert mine == json.loads(theirs[name]), name
        else:
            assert ours[name] == theirs[name], name
    assert sorted(manifests) == ["views/zarr.json", "zarr.json"]  # the two nodes: the scene and the stage group
    assert manifests["views/zarr.json"] == {k[6:]: len(v) for k, v in ours.items() if k.startswith("views/") and k != "views/zarr.json"}
    assert manifests["zarr.json"] == {k: len(v) for k, v in ours.items() if k.startswith(("points/", "mesh/"))}
    assert all(store_module.Store.is_checked(json.loads(v)) for k, v in ours.items() if k.count("/") == 2 and k.endswith("zarr.json"))
    specs = [*arrays, *views]
    for spec, got in zip(specs, store.read_many("scene0000_00", specs)):
        data = schema.coerce(spec, {**arrays, **views}[spec])
        assert got.dtype == data.dtype and np.array_equal(got, data), spec.name
        assert np.array_equal(store.read("scene0000_00", spec), data), spec.name
    with pytest.raises(KeyError, match="overseg/segment"):
        store.read_many("scene0000_00", [schema.XYZ, schema.SEGMENT])


def test_annotation_release_variants(tmp_path):
    write_label_table(tmp_path)
    room = make_room(3, 1, SMALL)
    for variant in ("v1", "v2"):
        out = tmp_path / variant
        write_label_table(out)
        folder = write_scannet_layout(room, out, variant=variant)
        agg = next(folder.glob("*aggregation.json"))
        assert agg.name.endswith("_vh_clean.aggregation.json") == (variant == "v1")
        assert json.loads(agg.read_text())["appId"] == f"Aggregator.{variant}"
        scene = scannet.read_scene(out, room.scene_id)
        assert np.allclose(scene.xyz, room.xyz, atol=1e-4)
        assert np.array_equal(scene.semantic, room.semantic)
        assert np.array_equal(scene.instance, room.instance)


def test_labels_missing_from_table_are_counted(tmp_path):
    raw = small_raw(tmp_path, 1)
    scene_id = "scene0000_00"
    agg_path = raw / "scans" / scene_id / f"{scene_id}.aggregation.json"
    agg = json.loads(agg_path.read_text())
    agg["segGroups"][-1]["label"] = "flux capacitor"
    agg_path.write_text(json.dumps(agg))
    scene = scannet.read_scene(raw, scene_id)
    assert any("flux capacitor" in w and "x1" in w for w in scene.warnings)
    last = agg["segGroups"][-1]["objectId"]
    assert (scene.semantic[scene.instance == last] == schema.IGNORE_INDEX).all()


def test_validator_catches_broken_scene(tmp_path):
    _, store, _ = _ingested(tmp_path, 2)
    broken = store.scene_ids()[1]
    # write semantic labels out of range and drop an array behind the store's back
    sem = zarr.open_array(str(store.scene_dir(broken) / "points" / "semantic"), mode="r+")
    sem[:5] = 99
    shutil.rmtree(store.scene_dir(broken) / "points" / "rgb")
    report = validate_store(store)  # the structure: the manifest sees both, no chunk is read
    wheres = {(p.scene_id, p.where) for p in report.problems}
    assert {(broken, "points/rgb"), (broken, "points/rgb/zarr.json"), (broken, "points/semantic/c/0")} <= wheres
    assert all(p.scene_id == broken and p.stage == "ingest" for p in report.problems)
    deep = validate_store(store, deep=True)  # values too: the labels out of range
    assert any(p.where == "points/semantic" and "outside" in p.message for p in deep.problems)
    assert all(p.scene_id == broken for p in deep.problems)


def test_foreign_and_missing_stores_are_refused(tmp_path):
    with pytest.raises(StoreError, match="not a ws3d store"):
        Store.open(tmp_path / "nothing")
    zarr.open_group(str(tmp_path / "foreign"), mode="w", attributes={"hello": 1})
    with pytest.raises(StoreError, match="not a ws3d store"):
        Store.open(tmp_path / "foreign")
    Store.create(tmp_path / "s", dataset="synthetic", class_names=["a"])
    with pytest.raises(StoreError, match="refusing to mix"):
        Store.create(tmp_path / "s", dataset="s3dis", class_names=["a"])


def test_rerun_skips_and_changed_config_recomputes(tmp_path):
    raw, store, cfg = _ingested(tmp_path, 1)
    scene_id = store.scene_ids()[0]
    before = store.stage_record(scene_id, "ingest")["written"]
    assert INGEST.run_scene(str(store.path), scene_id, cfg, raw=str(raw)).status == "skipped"
    changed = IngestConfig(dataset="synthetic", reader={"apply_axis_alignment": False})
    assert INGEST.run_scene(str(store.path), scene_id, changed, raw=str(raw)).status == "done"
    record = store.stage_record(scene_id, "ingest")
    assert record["config_hash"] == config_hash(hashed_fields(changed), str(raw.resolve()))
    assert before <= record["written"]
    # the limits that only accept or refuse a scene are not in the hash (a store written before them stays complete)
    looser = dataclasses.replace(changed, min_label_coverage=0.0, max_coordinate_step_m=1.0)
    assert INGEST.run_scene(str(store.path), scene_id, looser, raw=str(raw)).status == "skipped"
    assert hashed_fields(IngestConfig()) == {"dataset": "scannet", "reader": {}, "dedupe_points": True}


def test_truncated_ply_names_the_file(tmp_path):
    raw = small_raw(tmp_path, 1)
    ply = raw / "scans" / "scene0000_00" / "scene0000_00_vh_clean_2.ply"
    ply.write_bytes(ply.read_bytes()[: ply.stat().st_size // 2])
    with pytest.raises(SceneError) as info:
        scannet.read_scene(raw, "scene0000_00")
    assert info.value.file == str(ply)


def test_real_label_table_maps_nyu40(tmp_path):
    table_path = SHARED_DATA / "scannet" / "scannetv2-labels.combined.tsv"
    if not table_path.exists():
        pytest.skip(f"real ScanNet label table not found at {table_path}")
    table = scannet.load_label_table(str(table_path))
    assert len(table) > 500
    assert table["chair"] == scannet.CLASS_NAMES.index("chair")
    assert table["wall"] == 0 and table["floor"] == 1
    assert table["kitchen cabinets"] == scannet.CLASS_NAMES.index("cabinet")
    assert table["ceiling"] == schema.IGNORE_INDEX  # NYU40 class outside the benchmark 20


def test_set_torch_threads_undoes_numba_openmp_raising_torch_threads(monkeypatch):
    import numba
    import numpy as np
    import torch

    from ws3d_train.device import set_torch_threads

    @numba.njit(parallel=True)
    def total(x):
        s = 0.0
        for i in numba.prange(x.shape[0]):
            s += x[i]
        return s

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        total(np.ones(1000))  # may raise torch's count to numba's (shared OpenMP runtime)
        assert set_torch_threads(0) == 1 and torch.get_num_threads() == 1
        assert set_torch_threads(2) == 2 and torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        import os

        assert set_torch_threads(0) == len(os.sched_getaffinity(0))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * len(os.sched_getaffinity(0))))
        assert set_torch_threads(0) == 1  # torchrun ranks of one node share its cores, at least one each
    finally:
        torch.set_num_threads(before)


def test_pin_torch_threads_follows_omp_num_threads(monkeypatch):
    import torch

    from pipeline.parallel import pin_torch_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        pin_torch_threads()
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        torch.set_num_threads(2)
        pin_torch_threads()  # nothing asked: left alone
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
