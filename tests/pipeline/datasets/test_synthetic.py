"""Scanner-like synthetic rooms: the effects are there, switchable, and keep the ground truth."""
from __future__ import annotations

import dataclasses

import numpy as np

from pipeline.overseg.scan_stats import dihedral_angles_deg, mesh_statistics
from pipeline.datasets.synthetic import make_room
from tests.synthdata import SMALL


def test_scanner_effects_make_noisy_uneven_meshes_with_holes():
    clean = make_room(0, 2, dataclasses.replace(SMALL, scanner_effects=False))
    scan = make_room(0, 2, SMALL)
    assert np.median(dihedral_angles_deg(clean.xyz, clean.faces)) < 0.01  # exactly planar
    stats_clean, stats_scan = mesh_statistics(clean.xyz, clean.faces), mesh_statistics(scan.xyz, scan.faces)
    assert stats_scan["dihedral_deg_p50"] > 1.0
    assert stats_scan["edge_cv"] > stats_clean["edge_cv"] + 0.05  # decimated: uneven triangles
    assert stats_scan["area_m2"] < stats_clean["area_m2"]          # holes, floor under furniture
    # the layout is the same room: the same objects (a few thin ones may be lost entirely)
    assert set(scan.instance_labels) <= set(clean.instance_labels)
    assert len(scan.instance_labels) >= len(clean.instance_labels) - 2
    # ground truth stays consistent: every face within one instance, colours vary (shading)
    assert (scan.instance[scan.faces] == scan.instance[scan.faces[:, :1]]).all()
    assert scan.faces.max() < len(scan.xyz) and len(scan.seg) == len(scan.xyz)
    assert float(scan.rgb.astype(float).std()) > 1.0


def test_floor_under_furniture_is_missing():
    cfg = dataclasses.replace(SMALL, hole_rate_per_m2=0.0, thin_part_drop=0.0)
    with_floor = make_room(0, 0, dataclasses.replace(cfg, floor_under_furniture=False))
    without = make_room(0, 0, cfg)
    floor_a = (np.asarray(with_floor.instance_labels)[with_floor.instance] == "floor").sum()
    floor_b = (np.asarray(without.instance_labels)[without.instance] == "floor").sum()
    assert floor_b < floor_a  # (most of it is already unseen by the simulated scanner)


def test_rooms_are_deterministic():
    a, b = make_room(5, 1, SMALL), make_room(5, 1, SMALL)
    assert np.array_equal(a.xyz, b.xyz) and np.array_equal(a.faces, b.faces) and np.array_equal(a.rgb, b.rgb)


def test_synthesise_keeps_rooms_generated_with_the_same_record(tmp_path):
    from pipeline.datasets.synthetic import SYNTH_RECORD, synthesise
    from tests.synthdata import SMALL

    ids = synthesise(tmp_path, 2, seed=3, cfg=SMALL)
    ply = tmp_path / "scans" / ids[0] / f"{ids[0]}_vh_clean_2.ply"
    first = ply.stat().st_mtime_ns
    assert synthesise(tmp_path, 2, seed=3, cfg=SMALL) == ids
    assert ply.stat().st_mtime_ns == first  # kept, not generated again
    (tmp_path / "scans" / ids[0] / SYNTH_RECORD).write_text("{}")  # another record: generated again
    synthesise(tmp_path, 2, seed=3, cfg=SMALL)
    assert ply.stat().st_mtime_ns != first
