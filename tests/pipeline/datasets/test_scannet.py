"""ScanNet reader: where labels come from (aggregation, labels PLY, none) and the real sample."""
from __future__ import annotations

import numpy as np
import pytest
from plyfile import PlyData, PlyElement

from pipeline import schema
from pipeline.datasets.ingest import INGEST, IngestConfig
from pipeline.datasets import scannet
from pipeline.errors import SceneError
from pipeline.store import Store
from pipeline.summary import format_summary, summarise_store
from pipeline.datasets.synthetic import make_room, write_label_table, write_scannet_layout
from tests.synthdata import SHARED_DATA, SMALL

REAL_SCANS = SHARED_DATA / "scannet"
REAL_SCENE = "scene0470_00"


def _strip_annotations(folder, scene_id: str) -> None:
    for name in (f"{scene_id}.aggregation.json", f"{scene_id}_vh_clean.aggregation.json",
                 f"{scene_id}_vh_clean_2.0.010000.segs.json"):
        (folder / name).unlink(missing_ok=True)


def _write_labels_ply(folder, scene_id: str, nyu: np.ndarray) -> None:
    """The labels PLY as ScanNet ships it: the mesh's vertices plus a ushort `label` (NYU40 id)."""
    mesh = PlyData.read(str(folder / f"{scene_id}_vh_clean_2.ply"))
    v = mesh["vertex"].data
    out = np.empty(len(v), dtype=v.dtype.descr + [("label", "u2")])
    for name in v.dtype.names:
        out[name] = v[name]
    out["label"] = nyu
    PlyData([PlyElement.describe(out, "vertex"), mesh["face"]], byte_order="<").write(
        str(folder / f"{scene_id}_vh_clean_2.labels.ply"))


def _room_without_aggregation(tmp_path, with_labels_ply: bool):
    room = make_room(0, 1, SMALL)
    write_label_table(tmp_path)
    folder = write_scannet_layout(room, tmp_path, variant="v2")
    _strip_annotations(folder, room.scene_id)
    nyu = np.asarray(scannet.NYU40_IDS)[room.semantic]
    nyu[::7] = 0       # unannotated vertices
    nyu[3::11] = 13    # pillow: NYU40 class outside the 20
    if with_labels_ply:
        _write_labels_ply(folder, room.scene_id, nyu)
    return room, folder, nyu


def test_labels_ply_gives_semantics_without_instances(tmp_path):
    room, _, nyu = _room_without_aggregation(tmp_path, with_labels_ply=True)
    scene = scannet.read_scene(tmp_path, room.scene_id)
    assert scene.label_source == "labels-ply"
    expected = room.semantic.copy()
    expected[(nyu == 0) | (nyu == 13)] = schema.IGNORE_INDEX
    assert np.array_equal(scene.semantic, expected)
    assert (scene.instance == -1).all()
    assert np.allclose(scene.xyz, room.xyz, atol=1e-4)  # axis alignment still applied


def test_no_annotations_ingest_as_unlabelled_and_info_says_so(tmp_path):
    room, _, _ = _room_without_aggregation(tmp_path / "raw", with_labels_ply=False)
    scene = scannet.read_scene(tmp_path / "raw", room.scene_id)
    assert scene.label_source == "none"
    assert (scene.semantic == schema.IGNORE_INDEX).all() and (scene.instance == -1).all()
    store = Store.create(tmp_path / "s.zarr", dataset="synthetic", class_names=list(scannet.CLASS_NAMES))
    assert INGEST.run_scene(str(store.path), room.scene_id, IngestConfig(dataset="synthetic"), raw=str(tmp_path / "raw")).status == "done"
    record = store.stage_record(room.scene_id, "ingest")
    assert record["label_source"] == "none"
    assert record["stats"]["labels"] == "none (unlabelled)" and record["stats"]["labelled_fraction"] == 0.0
    text = format_summary(summarise_store(store))
    assert "none (unlabelled)" in text


def test_a_ply_without_faces_is_a_cloud_not_a_mesh_of_0_faces(tmp_path):
    room = make_room(0, 1, SMALL)
    write_label_table(tmp_path)
    folder = write_scannet_layout(room, tmp_path, variant="v2")
    path = folder / f"{room.scene_id}_vh_clean_2.ply"
    PlyData([PlyData.read(str(path))["vertex"]], byte_order="<").write(str(tmp_path / "v.ply"))  # vertices only
    (tmp_path / "v.ply").replace(path)
    scene = scannet.read_scene(tmp_path, room.scene_id)
    assert scene.kind == "points" and scene.faces is None and len(scene.xyz) == len(room.xyz)
    assert any(w.startswith("[no-faces]") for w in scene.warnings)


def test_labels_ply_count_mismatch_names_the_file(tmp_path):
    room, folder, nyu = _room_without_aggregation(tmp_path, with_labels_ply=False)
    mesh = PlyData.read(str(folder / f"{room.scene_id}_vh_clean_2.ply"))
    v = mesh["vertex"].data[:-5]
    out = np.empty(len(v), dtype=v.dtype.descr + [("label", "u2")])
    for name in v.dtype.names:
        out[name] = v[name]
    out["label"] = nyu[:-5]
    path = folder / f"{room.scene_id}_vh_clean_2.labels.ply"
    PlyData([PlyElement.describe(out, "vertex")], byte_order="<").write(str(path))
    with pytest.raises(SceneError, match="count mismatch") as info:
        scannet.read_scene(tmp_path, room.scene_id)
    assert info.value.file == str(path)


@pytest.mark.skipif(not (REAL_SCANS / "scans" / REAL_SCENE).is_dir(),
                    reason=f"real ScanNet sample absent ({REAL_SCANS}/scans/{REAL_SCENE})")
def test_real_scan_reads_semantics_from_labels_ply():
    scene = scannet.read_scene(REAL_SCANS, REAL_SCENE)
    assert scene.label_source == "labels-ply"
    assert len(scene.xyz) > 10_000 and scene.faces is not None and len(scene.faces) > 10_000
    labelled = scene.semantic[scene.semantic != schema.IGNORE_INDEX]
    assert len(labelled) > 0.5 * len(scene.xyz)
    assert {0, 1} <= set(np.unique(labelled).tolist())  # wall and floor present
    assert (scene.instance == -1).all()
