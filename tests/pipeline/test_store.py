"""A store you can trust, on a disk and on a real S3 server on 127.0.0.1: checksummed chunks
checked on every read, damage found by `validate` (structure) and `validate --deep` (every chunk)
and repaired, commits a kill cannot break (leftovers never read as data, cleaned by the next run),
deleted zarr.json files found and restored, store URLs and their drivers."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from cli import app
from pipeline import schema
from pipeline.datasets import scannet
from pipeline.datasets.ingest import IngestConfig
from pipeline.executor import ExecutorConfig
from pipeline.overseg.config import OversegConfig
from pipeline.render.config import RenderConfig
from pipeline.stage import StageRun, run_stage
from pipeline.stages import BY_NAME
from pipeline.storage import StorageError, open_location
from pipeline.store import DamagedDataError, Store, StoreError
from pipeline.validate import validate_store
from tests.conftest import make_tiny_store
from tests.paths import ROOT
from tests.synthdata import small_raw

RENDER = ["max_views=3", "width=48", "height=36"]
"""A small render: these tests are about the store, not the pictures."""


def _damage(url: str, key: str, how: str) -> None:
    """Flip 16 bytes in the middle of an object, cut it in half, or delete it, behind the store's back."""
    location = open_location(url)
    data = location.get(key)
    assert data is not None, key
    if how == "flip":
        buf = bytearray(data)
        mid = len(buf) // 2
        buf[mid:mid + 16] = bytes(b ^ 0xFF for b in buf[mid:mid + 16])
        location.put(key, bytes(buf))
    elif how == "truncate":
        location.put(key, data[: len(data) // 2])
    else:
        location.delete(key)


def _arrays(url: str, stages=("ingest", "overseg", "render")) -> dict:
    store = Store.open(url)
    return {(s, spec.group, spec.name): store.read(s, spec) for s in store.scene_ids()
            for stage in stages for spec in schema.arrays_of_stage(stage) if store.has(s, spec)}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def _preprocess(url: str, raw: Path, stages=("ingest", "overseg", "render")) -> None:
    for stage in stages:
        extra = {"ingest": ["-d", "synthetic", "-r", str(raw)], "render": RENDER}.get(stage, [])
        code, out = _cli(stage, "-s", url, "-x", "sync", *extra)
        assert code == 0, out


def test_flipped_truncated_and_deleted_chunks_are_errors_naming_scene_array_and_chunk(store_url):
    make_tiny_store(store_url, n_scenes=4, n_points=500)
    store = Store.open(store_url)
    damage = {"scene0001_00": "flip", "scene0002_00": "truncate", "scene0003_00": "delete"}
    fine = store.read("scene0000_00", schema.XYZ)
    for scene, how in damage.items():
        _damage(store_url, f"scenes/{scene}/points/xyz/c/0/0", how)
    for scene in damage:
        for read in (lambda: store.read(scene, schema.XYZ), lambda: store.read_many(scene, [schema.RGB, schema.XYZ])):
            with pytest.raises(DamagedDataError) as info:
                read()
            assert all(word in str(info.value) for word in (scene, "points/xyz", "chunk c/0/0")), info.value
    assert np.array_equal(store.read("scene0000_00", schema.XYZ), fine)  # the rest of the store reads as before

    structure = validate_store(store)  # one listing per scene: a changed size or a missing file shows
    assert {p.scene_id for p in structure.problems} == {"scene0002_00", "scene0003_00"}
    assert [store.stage_state(s, "ingest") for s in sorted(damage)] == ["complete", "damaged", "damaged"]
    deep = validate_store(store, deep=True)  # every chunk read: the flipped bytes too
    assert {(p.scene_id, p.where) for p in deep.problems if p.where == "points/xyz"} == {(s, "points/xyz") for s in damage}
    assert all(p.scene_id in damage and p.stage == "ingest" for p in deep.problems)
    lines = [str(p) for p in deep.problems]
    assert "scene0001_00: points/xyz: chunk c/0/0 fails its crc32c checksum" in lines, lines
    assert "scene0003_00: points/xyz: chunk c/0/0 is missing" in lines, lines


def _legacy_store(path: Path, n: int = 300_000) -> np.ndarray:
    """A store as ws3d wrote it before checksums: blosc only, all-zero chunks not written, no manifest."""
    from zarr.codecs import BloscCodec, BloscShuffle
    from zarr.storage import LocalStore

    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(n, 3)).astype(np.float32)
    root = zarr.open_group(LocalStore(path), mode="w", attributes={
        "format": "ws3d-store", "schema_version": schema.SCHEMA_VERSION, "dataset": "synthetic",
        "class_names": ["a", "b"], "ignore_index": schema.IGNORE_INDEX, "created": "2025-01-01T00:00:00+00:00"})
    root.require_group("vocab")
    scene = root.require_group("scenes").create_group("scene0000_00", attributes={"ws3d_stage": {
        "stage": "ingest", "config_hash": "old", "config": {"dataset": "synthetic"}, "stats": {"kind": "cloud", "points": n}}})
    points = scene.create_group("points")
    arrays = {schema.XYZ: xyz, schema.RGB: rng.integers(0, 255, (n, 3)).astype(np.uint8),
              schema.SEMANTIC: np.zeros(n, np.int16), schema.INSTANCE: np.full(n, -1, np.int32)}
    for spec, data in arrays.items():
        points.create_array(spec.name, data=data, chunks=spec.chunks(data.shape), fill_value=0,
                            compressors=[BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle)])
    return xyz


def test_a_store_written_before_checksums_opens_its_arrays_unchecked_and_a_truncated_chunk_never_crashes(tmp_path):
    path = tmp_path / "old.zarr"
    xyz = _legacy_store(path)
    store = Store.open(path)
    assert store.scene_ids() == ["scene0000_00"]
    assert np.array_equal(store.read("scene0000_00", schema.XYZ), xyz)
    assert not store.read("scene0000_00", schema.SEMANTIC).any()  # chunks of zeros were never written
    report = validate_store(store, deep=True)
    assert report.ok and report.unchecked == {"scene0000_00": 4}
    assert any("no checksums" in line for line in report.lines())
    chunk = path / "scenes/scene0000_00/points/xyz/c/1/0"
    chunk.write_bytes(chunk.read_bytes()[:-100])  # numcodecs segfaults decoding this (exit 139, no message)
    code = ("import sys; from pipeline.store import Store, DamagedDataError; from pipeline import schema\n"
            "try:\n    Store.open(sys.argv[1]).read('scene0000_00', schema.XYZ)\n"
            "except DamagedDataError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "points/xyz: chunk c/1/0 truncated" in done.stdout
    deep = validate_store(store, deep=True)
    assert [(p.where, p.stage) for p in deep.problems] == [("points/xyz", "ingest")]


@pytest.mark.parametrize("store_url", ["local", pytest.param("s3", marks=pytest.mark.slow)], indirect=True)
def test_deleted_zarr_json_files_are_found_and_a_rerun_restores_them(store_url, tmp_path):
    raw = small_raw(tmp_path / "raw", 2)
    _preprocess(store_url, raw, ("ingest", "overseg"))
    clean = _arrays(store_url, ("ingest", "overseg"))
    location = open_location(store_url)
    location.delete("scenes/scene0000_00/points/rgb/zarr.json")  # an array's
    location.delete("scenes/scene0001_00/overseg/zarr.json")  # a stage's marker: its data is there, unmarked
    report = validate_store(Store.open(store_url))
    assert {(p.scene_id, p.stage) for p in report.problems} == {("scene0000_00", "ingest"), ("scene0001_00", "overseg")}
    assert Store.open(store_url).stage_record("scene0001_00", "overseg") is None  # never read as data
    location.delete("zarr.json")  # the root's
    code, out = _cli("info", "-s", store_url)
    assert code == 2 and "root zarr.json is missing" in out and len(out.strip().splitlines()) == 1

    with pytest.warns(UserWarning, match="restored"):
        code, out = _cli("ingest", "-s", store_url, "-d", "synthetic", "-r", str(raw), "-x", "sync")
    assert code == 0 and "1 done, 1 skipped" in out, out  # the damaged scene recomputed, its overseg kept
    code, out = _cli("overseg", "-s", store_url, "-x", "sync")
    assert code == 0 and "1 done, 1 skipped" in out, out
    assert validate_store(Store.open(store_url), deep=True).ok
    assert _same(_arrays(store_url, ("ingest", "overseg")), clean)


@pytest.mark.parametrize("store_url", ["local", pytest.param("s3", marks=pytest.mark.slow)], indirect=True)
def test_validate_deep_names_the_damage_and_repair_recomputes_exactly_it(store_url, tmp_path):
    raw = small_raw(tmp_path / "raw", 2)
    _preprocess(store_url, raw)
    clean = _arrays(store_url)
    before = {(s, st): Store.open(store_url).stage_record(s, st)["written"] for s in ("scene0000_00", "scene0001_00")
              for st in ("ingest", "overseg", "render")}
    _damage(store_url, "scenes/scene0000_00/points/xyz/c/0/0", "flip")
    _damage(store_url, "scenes/scene0001_00/overseg/segment/c/0", "delete")
    _damage(store_url, "scenes/scene0001_00/views/K/c/0/0/0", "truncate")

    code, out = _cli("validate", "-s", store_url)  # the structure: a listing shows the deleted and cut files
    assert code == 1 and "scene0001_00: overseg/segment/c/0: missing" in out and "scene0001_00: views/K/c/0/0/0" in out
    assert "scene0000_00" not in out
    code, out = _cli("validate", "-s", store_url, "--deep")
    assert code == 1 and "scene0000_00: points/xyz: chunk c/0/0 fails its crc32c checksum" in out, out
    code, out = _cli("validate", "-s", store_url, "--deep", "--repair")
    assert code == 0, out
    assert "repair ingest: 1 done" in out and "repair overseg: 1 done" in out and "repair render: 1 done" in out
    assert _same(_arrays(store_url), clean)
    store = Store.open(store_url)
    rewritten = {k for k, written in before.items() if store.stage_record(*k)["written"] != written}
    assert rewritten <= {("scene0000_00", "ingest"), ("scene0001_00", "overseg"), ("scene0001_00", "render")}
    assert store.stage_record("scene0000_00", "overseg") is not None  # kept: ingest came back with the same hash
    code, out = _cli("validate", "-s", store_url, "--deep")
    assert code == 0 and "0 problem(s)" in out


def test_force_replaces_what_it_recomputes(tmp_path):
    raw = small_raw(tmp_path / "raw", 1)
    url = str(tmp_path / "s.zarr")
    _preprocess(url, raw, ("ingest",))
    clean = _arrays(url, ("ingest",))
    _damage(url, "scenes/scene0000_00/points/rgb/c/0/0", "flip")  # same size: a rerun cannot see it
    code, out = _cli("ingest", "-s", url, "-d", "synthetic", "-r", str(raw), "-x", "sync")
    assert code == 0 and "1 skipped" in out
    code, out = _cli("ingest", "-s", url, "-d", "synthetic", "-r", str(raw), "-x", "sync", "--force")
    assert code == 0 and "1 done" in out
    assert _same(_arrays(url, ("ingest",)), clean)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_runs_are_never_scenes_and_the_next_run_removes_them(tmp_path):
    from pipeline.store import _host

    raw = small_raw(tmp_path / "raw", 1)
    path = tmp_path / "s.zarr"
    _preprocess(str(path), raw, ("ingest",))
    tmp = path / ".tmp"
    dead = tmp / f"{_host()}-{_dead_pid()}-0123abcd"
    shutil.copytree(path / "scenes" / "scene0000_00", dead)  # a node written, never renamed in
    (tmp / "0a1b2c3d4e5f60718293a4b5c6d7e8f9").mkdir()  # an older ws3d's temporary folder
    live = tmp / f"{_host()}-{os.getpid()}-fedc3210"
    live.mkdir()  # a writer at work: never touched
    shutil.copytree(path / "scenes" / "scene0000_00", path / "scenes" / ".trash-scene0000_00-1a2b3c4d")  # older ws3d
    store = Store.open(path)
    assert store.scene_ids() == ["scene0000_00"]
    code, out = _cli("validate", "-s", str(path))
    assert code == 0 and "4 leftover(s)" in out, out
    code, out = _cli("info", "-s", str(path))
    assert code == 0 and "1 scenes" in out, out
    code, out = _cli("overseg", "-s", str(path), "-x", "sync")
    assert code == 0 and "removed 3 leftover(s)" in out, out
    assert os.listdir(tmp) == [live.name]
    assert sorted(os.listdir(path / "scenes")) == ["scene0000_00", "zarr.json"]


def test_an_unfinished_write_on_object_storage_is_never_read_and_the_next_write_clears_it(s3_store_url):
    make_tiny_store(s3_store_url, n_scenes=2, n_points=400)
    store = Store.open(s3_store_url)
    clean = {spec: store.read("scene0001_00", spec) for spec in schema.arrays_of_stage("ingest") if store.has("scene0001_00", spec)}
    record = store.stage_record("scene0001_00", "ingest")
    location = open_location(s3_store_url)
    # a re-ingest killed mid-upload: its marker deleted first, part of the new keys there
    location.delete("scenes/scene0001_00/zarr.json")
    location.put("scenes/scene0001_00/points/stray/c/0", b"half an upload")
    assert store.scene_ids() == ["scene0000_00"] and not store.has_scene("scene0001_00")
    assert store.stage_record("scene0001_00", "ingest") is None and store.stage_state("scene0001_00", "ingest") == "absent"
    problems = validate_store(store).problems
    assert [(p.scene_id, p.stage) for p in problems] == [("scene0001_00", "ingest")], problems
    assert store.write_stage("scene0001_00", "ingest", clean, {k: record[k] for k in ("config", "config_hash", "stats")})
    assert not any("stray" in k for k in location.list_sizes("scenes/scene0001_00"))  # cleared by the next write
    assert store.scene_ids() == ["scene0000_00", "scene0001_00"] and validate_store(store, deep=True).ok


def test_store_urls_name_their_driver_and_never_become_local_folders(tmp_path, monkeypatch, s3_store_url):
    monkeypatch.chdir(tmp_path)
    raw = small_raw(tmp_path / "raw", 1)
    for url, words in [("nope://bucket/x.zarr", "unknown store protocol"),
                       ("s3://just-a-bucket", "expected s3://BUCKET/NAME")]:
        code, out = _cli("ingest", "-s", url, "-d", "synthetic", "-r", str(raw), "-x", "sync")
        assert code == 2 and out.startswith("error:") and words in out and len(out.strip().splitlines()) == 1, out
    import importlib.util

    missing = next((p for p, pkg in (("gs", "gcsfs"), ("az", "adlfs")) if importlib.util.find_spec(pkg) is None), None)
    if missing is not None:  # a driver that is not installed here: one line naming the package
        code, out = _cli("ingest", "-s", f"{missing}://bucket/x.zarr", "-d", "synthetic", "-r", str(raw), "-x", "sync")
        assert code == 2 and f"{missing}:// driver is not installed: pip install" in out, out
        assert len(out.strip().splitlines()) == 1, out
    code, out = _cli("ingest", "-s", s3_store_url, "-d", "synthetic", "-r", str(raw), "-x", "sync")
    assert code == 0, out
    assert sorted(os.listdir(tmp_path)) == ["raw"]  # nothing local: no `s3:` folder
    assert Store.open(s3_store_url).scene_ids() == ["scene0000_00"]
    with pytest.raises(StoreError, match="not a ws3d store"):
        Store.open(s3_store_url.replace("store.zarr", "other.zarr"))


def test_a_bucket_that_does_not_exist_is_one_line(s3_server, tmp_path):
    raw = small_raw(tmp_path / "raw", 1)
    for args in (["info"], ["ingest", "-d", "synthetic", "-r", str(raw), "-x", "sync"]):
        code, out = _cli(*args, "-s", "s3://no-such-bucket-here/x.zarr")
        assert code == 2 and out.startswith("error: s3://no-such-bucket-here/x.zarr") and "Traceback" not in out, out
        assert len(out.strip().splitlines()) == 1, out
