"""`ws3d bench` overseg section: the mesh-edge path against the kNN path, an external Segmentator
binary when the user names one, and the LiDAR density sweep."""
from __future__ import annotations

import stat
import sys

import pytest

from pipeline.datasets.synthetic import SynthConfig, make_room
from pipeline.overseg.config import OversegConfig
from ws3d_train.bench.overseg import lidar_sweep, mesh_paths

# A stand-in for a user's Segmentator build, run for real as a separate process: it reads the
# PLY it is given and writes `<name>.<kthr>.segs.json` beside it, as the binary does, with one
# segment per 100 vertices, and prints `compute_s` on stderr like a timed build.
_FAKE = """#!{python}
import json, sys, time
from plyfile import PlyData
t = time.perf_counter()
path = sys.argv[1]
n = PlyData.read(path)["vertex"].count
json.dump({{"segIndices": [i // 100 for i in range(n)]}}, open(path[:-4] + "." + "%f" % float(sys.argv[2]) + ".segs.json", "w"))
print("compute_s %.6f" % (time.perf_counter() - t), file=sys.stderr)
"""


def _small_room():
    return make_room(2, 0, SynthConfig(room_size_m=(2.0, 2.5), min_objects=4, max_objects=5,
                                       room_edge_m=0.05, object_edge_m=0.04))


def test_mesh_paths_time_both_paths_and_a_users_segmentator(tmp_path):
    fake = tmp_path / "segmentator"
    fake.write_text(_FAKE.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    room = _small_room()
    row = mesh_paths(room.xyz, room.rgb, room.faces, room.instance, cfg=OversegConfig(), repeats=1,
                     segmentator=str(fake), truth="instances")
    for path in ("mesh_edges", "knn"):
        assert row[path]["seconds"] > 0 and row[path]["segments"] >= 2 and row[path]["purity_vs_instances"] >= 0.9
    assert row["knn_over_mesh_edges"] == pytest.approx(row["knn"]["seconds"] / row["mesh_edges"]["seconds"], rel=1e-2)
    ext = row["segmentator"]
    assert ext["segments"] == -(-len(room.xyz) // 100)  # what the stand-in wrote, read back
    assert 0 <= ext["compute_s"] <= ext["process_s"] and row["segmentator_reference"] == "compute_s"
    assert row["segments_over_segmentator"] == pytest.approx(row["mesh_edges"]["segments"] / ext["segments"], rel=1e-2)


def test_mesh_paths_report_a_broken_segmentator_without_failing(tmp_path):
    room = _small_room()
    row = mesh_paths(room.xyz, room.rgb, room.faces, room.instance, cfg=OversegConfig(), repeats=1,
                     segmentator=str(tmp_path / "missing"), truth="instances")
    assert "missing" in row["segmentator"]["error"] and "mesh_edges_over_segmentator" not in row


def test_lidar_sweep_rows():
    out = lidar_sweep(tiny=True, cfg=OversegConfig())
    rows = out["synthetic_street"]
    for label in ("range_adaptive", "fixed_voxels"):
        counts = [rows[label][f"1/{f}"]["segments"] for f in (1, 2, 4)]
        assert rows[label]["count_max_over_min"] == pytest.approx(max(counts) / min(counts), rel=1e-2)
        assert rows[label]["1/2"]["points"] == rows["points"] // 2
