"""`ws3d bench --section predict`: a trained run on a robot's scan, end to end, against the bare
network forward on the same voxels in the same process.

For each scan size (default 100k and 1M points sampled on a real ScanNet mesh when the shared
samples are there, else on a synthetic room): the scan is written as a binary PLY, then
:meth:`ws3d_train.infer.model.Model.predict_file` reads it, voxelises, runs the network, picks
classes (and, with instances, over-segments and groups instances), and the prediction PLY is
written; each step is timed (medians over repeats, warm: the first call, which compiles numba
kernels, is not counted). The reference is ``forward_voxels`` on the same voxels, timed right
after each prediction. Ratios are rates, ``forward / predict`` per pair, median and range over the
pairs (1.0 = no overhead; the goal is >= 0.5 without instances).
The ``cli`` rows time `ws3d predict --input` in a fresh process on one scan and on a folder of
four (start-up, imports included, paid once per folder), with and without instances.

The run: ``data/demo/finetune`` when the demo has been run, else a run of the demo's shape (its
network preset, voxel size, 20 classes, 64-d CLIP head, its training thread count) with random
weights, which costs the same time.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ws3d_train.bench import ROOT, SHARED_DATA

SHARED_MESH = SHARED_DATA / "scannet" / "scans" / "scene0470_00" / "scene0470_00_vh_clean_2.ply"
"""The real ScanNet mesh the scans are sampled on, where the shared samples are."""


def demo_shaped_run(folder: str | Path) -> Path:
    """A run folder with the demo's network and data config and random weights (see the module docstring)."""
    import torch

    from pipeline.config import to_dict
    from pipeline.datasets.scannet import CLASS_NAMES
    from ws3d_train.checkpoint import checkpoint_path, save_checkpoint
    from ws3d_train.data.dataset import DataConfig
    from ws3d_train.demo import DemoConfig
    from ws3d_train.network import NetworkConfig, build_network
    from ws3d_train.run import CHECKPOINT_DIR, LabelSpace, write_label_space

    demo = DemoConfig()
    data = DataConfig(voxel_size_m=demo.voxel_size_m, max_voxels=demo.max_voxels)
    network = NetworkConfig(preset=demo.network_preset).resolved()
    from dataclasses import replace

    network = replace(network, in_channels=data.in_channels, num_classes=len(CLASS_NAMES), clip_dim=64)
    torch.manual_seed(0)
    model = build_network(network)
    folder = Path(folder)
    save_checkpoint(checkpoint_path(folder / CHECKPOINT_DIR, 1), model=model, optimizer=None, step=1,
                    batches_consumed=0, config={"data": to_dict(data), "network": to_dict(network),
                                                "threads": demo.train_threads})
    text = np.random.default_rng(0).standard_normal((len(CLASS_NAMES), 64)).astype(np.float32)
    novel = tuple(CLASS_NAMES.index(n) for n in ("sofa", "bookshelf", "desk", "toilet"))
    write_label_space(folder, LabelSpace(
        class_names=tuple(CLASS_NAMES), dataset="scannet", base_ids=tuple(i for i in range(20) if i not in novel),
        novel_ids=novel, text=text / np.linalg.norm(text, axis=1, keepdims=True)))
    return folder


def sample_scan(n_points: int, *, seed: int = 0, mesh_path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(xyz float32 [n, 3], rgb uint8 [n, 3], source): points sampled uniformly on a mesh file
    (default the real ScanNet mesh where the shared samples are), else on a synthetic room's mesh."""
    import open3d as o3d

    mesh_path = Path(mesh_path) if mesh_path else SHARED_MESH
    if mesh_path.is_file():
        mesh = o3d.io.read_triangle_mesh(str(mesh_path))
        source = mesh_path.name
    else:
        from pipeline.datasets.synthetic import SynthConfig, make_room

        room = make_room(seed, 0, SynthConfig())
        mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(room.xyz.astype(np.float64)),
                                         o3d.utility.Vector3iVector(room.faces.astype(np.int32)))
        mesh.vertex_colors = o3d.utility.Vector3dVector(room.rgb.astype(np.float64) / 255.0)
        source = "synthetic room (shared samples absent)"
    o3d.utility.random.seed(seed)
    cloud = mesh.sample_points_uniformly(number_of_points=int(n_points))
    xyz = np.asarray(cloud.points, np.float32)
    rgb = np.clip(np.rint(np.asarray(cloud.colors) * 255.0), 0, 255).astype(np.uint8)
    return xyz, rgb, source


def _write_ply(path: Path, xyz: np.ndarray, rgb: np.ndarray) -> None:
    from plyfile import PlyData, PlyElement

    vertex = np.empty(len(xyz), [("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    vertex["x"], vertex["y"], vertex["z"] = xyz.T
    vertex["red"], vertex["green"], vertex["blue"] = rgb.T
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(path))


def _median(rows: list[dict[str, float]], key: str) -> float:
    return float(statistics.median(r.get(key, 0.0) for r in rows))


def bench_size(model: Any, scan: Path, *, repeats: int, repeats_instances: int = 2) -> dict[str, Any]:
    """One scan: the timed steps (medians), the bare forward on the same voxels timed right after
    each prediction (pairs, so that a noisy machine slows both sides alike), and the ratios: the
    median of the pairs' ratios, with their range."""
    from pipeline.datasets.files import load_scan
    from ws3d_train.infer.predict import forward_voxels, voxel_input, write_prediction_ply

    out_ply = scan.with_name(scan.stem + "_pred.ply")
    loaded = load_scan(scan)
    inputs = voxel_input(loaded.xyz, loaded.rgb, model.run.data, model.voxel_size_m)

    def forward() -> float:
        t0 = time.perf_counter()
        forward_voxels(model.run, inputs)
        return time.perf_counter() - t0

    def once(instances: bool) -> dict[str, float]:
        t0 = time.perf_counter()
        pred = model.predict_file(scan, instances=instances)
        t1 = time.perf_counter()
        write_prediction_ply(out_ply, pred.xyz, pred.labels, pred.instance, num_classes=len(pred.class_names))
        t2 = time.perf_counter()
        row = dict(pred.timings)
        row.update(write=t2 - t1, predict=(t1 - t0) - pred.timings["read"], end_to_end=t2 - t0, forward=forward())
        return row

    once(True)  # warm-up: numba kernels compiled, caches filled
    plain = [once(False) for _ in range(repeats)]
    full = [once(True) for _ in range(repeats_instances)]

    def ratio(rows: list[dict[str, float]], key: str) -> dict[str, float]:
        values = [r["forward"] / r[key] for r in rows]
        return {"median": round(float(statistics.median(values)), 3), "min": round(min(values), 3),
                "max": round(max(values), 3)}

    steps = {k: _median(plain, k) for k in ("read", "voxelise", "network", "classify", "write")}
    steps.update({k: _median(full, k) for k in ("overseg", "instances")})
    return {
        "points": int(len(loaded.xyz)), "voxels": int(len(inputs.coords)), "repeats": repeats,
        "repeats_with_instances": repeats_instances,
        "seconds": {k: round(v, 4) for k, v in steps.items()},
        "forward_s": round(_median(plain, "forward"), 4),
        "predict_s": round(_median(plain, "predict"), 4),
        "predict_with_instances_s": round(_median(full, "predict"), 4),
        "file_to_file_s": round(_median(plain, "end_to_end"), 4),
        "file_to_file_with_instances_s": round(_median(full, "end_to_end"), 4),
        # rates against the bare forward (1.0: no overhead); the goal is >= 0.5 without instances
        "rate_ratio_predict": ratio(plain, "predict"),
        "rate_ratio_predict_with_instances": ratio(full, "predict"),
        "rate_ratio_file_to_file": ratio(plain, "end_to_end"),
        "rate_ratio_file_to_file_with_instances": ratio(full, "end_to_end"),
    }


def bench_cli(run: Path, scan: Path, folder: Path) -> dict[str, Any]:
    """`ws3d predict --input` in a fresh process: one scan, then a folder of four copies of it,
    with and without instances. ``per_scan_s``: the seconds the CLI prints for each scan of the
    folder after the first (read, predict, write; the first pays the kernels' first calls), the
    median; ``per_extra_scan_s`` is (folder - one) / 3 from the wall clock, which also carries
    the noise of two process starts."""
    import re
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    for k in range(4):
        shutil.copy(scan, folder / f"scan_{k}.ply")

    def timed(args: list[str]) -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "cli", "predict", "--run", str(run), *args], check=True, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        return time.perf_counter() - t0, [float(v) for v in re.findall(r" in ([0-9.]+) s;", done.stdout)]

    t_import = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import cli, ws3d_train.infer.model"], check=True, cwd=ROOT, timeout=300)
    imports = time.perf_counter() - t_import
    one, _ = timed(["--input", str(scan), "--out", str(folder / "one.ply")])
    four, each = timed(["--input", str(folder), "--out", str(folder / "pred")])
    four_fast, each_fast = timed(["--input", str(folder), "--out", str(folder / "fast"), "--no-instances"])
    return {"imports_s": round(imports, 3), "one_scan_s": round(one, 3), "folder_of_4_s": round(four, 3),
            "per_extra_scan_s": round((four - one) / 3, 3),
            "per_scan_s": round(statistics.median(each[1:]), 3) if len(each) > 1 else None,
            "first_scan_s": each[0] if each else None,
            "folder_of_4_no_instances_s": round(four_fast, 3),
            "per_scan_no_instances_s": round(statistics.median(each_fast[1:]), 3) if len(each_fast) > 1 else None}


def bench_predict(sizes: tuple[int, ...] = (100_000, 1_000_000), *, repeats: int = 7, run: str | None = None,
                  cli: bool = True, device: str = "cpu", mesh: str | None = None) -> dict[str, Any]:
    """The section's figures (see the module docstring)."""
    import torch

    from ws3d_train.infer.model import Model

    work = Path(tempfile.mkdtemp(prefix="ws3d-bench-predict-"))
    demo_run = ROOT / "data" / "demo" / "finetune"
    run_dir = Path(run) if run else (demo_run if (demo_run / "labels.json").is_file() else demo_shaped_run(work / "run"))
    t0 = time.perf_counter()
    model = Model.load(run_dir, device=device)
    out: dict[str, Any] = {"run": str(run_dir), "load_s": round(time.perf_counter() - t0, 3),
                           "threads": torch.get_num_threads() if model.device.type == "cpu" else None,
                           "voxel_size_m": model.voxel_size_m, "device": str(model.device)}
    for n in sizes:
        xyz, rgb, source = sample_scan(n, mesh_path=mesh)
        scan = work / f"scan_{n}.ply"
        _write_ply(scan, xyz, rgb)
        out["source"] = source
        out[f"points_{n}"] = bench_size(model, scan, repeats=repeats if n <= 200_000 else max(1, repeats - 2),
                                        repeats_instances=min(2, repeats))
    if cli:
        out["cli"] = bench_cli(run_dir, work / f"scan_{sizes[0]}.ply", work / "cli")
    return out
