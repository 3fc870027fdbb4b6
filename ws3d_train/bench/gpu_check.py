"""The prepared GPU check (``make gpu-check``): one run on one GPU (<= 8 minutes), one JSON file.

``python -m ws3d_train.bench.gpu_check --out FILE [--dry-run]``. Sections, each timed and guarded (a
section that breaks is recorded with its error and the others still run):

- ``pytest_gpu``: ``pytest -m gpu`` (the sparse oracle tests of every backend on CUDA and the other
  ``gpu``-marked tests): passed / failed / skipped counts and the failing test ids.
- ``sparse``: :func:`ws3d_train.bench.sparse.bench_sparse` on the device: every backend that runs
  there, held to the dense oracle (``max_abs_diff_vs_dense``), with voxels/s of the convolution
  rows and of ``MinkUNet18``.
- ``train_step``: pre-training steps/s and peak GPU memory of ``MinkUNet18`` at 2 cm, batch 8
  (the paper-scale setting), each backend, bf16 autocast on and off
  (:func:`ws3d_train.bench.data.bench_train_step`).
- ``embed``: images/s of a ViT-B/16-sized CLIP (random weights, built locally with ``CLIPConfig``
  and saved like a hub model) in fp16 through :func:`pipeline.embed.stage.embed_scenes`, the cross-scene
  batching path, on rendered synthetic scenes. Without Open3D (the renderer) it falls back to the
  encoder's own batched forward on random crops and says so (``path``).
- ``store_read``: scenes/s through the trainer's DataLoader with 4 worker processes.
- ``goals``: the issue's targets checked against those figures (peak <= 16 GB, >= 1 step/s,
  >= 1,000 crops/s).

A section starts only while the time budget lasts (``budget_s``: 450 s on the GPU, so the whole
check stays under 8 minutes); a later one is then recorded as skipped. ``embed`` runs before
``store_read`` so the budget falls on the cheaper figure.

``--dry-run`` runs the same code on tiny sizes on the CPU (what CI exercises: the script itself,
its JSON keys). Writes the JSON file and, under a temporary folder, the scenes and the model it
builds; reads nothing else.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

__all__ = ["SIZES", "main", "run_gpu_check"]

SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "device": "cuda", "scenes": 4, "points": 300_000, "voxel_size_m": 0.02, "preset": "MinkUNet18",
        "batch_size": 8, "steps": 5, "sparse_sizes": (80_000, 300_000), "sparse_channels": (32, 64),
        "sparse_net_sizes": (80_000,), "sparse_networks": ("MinkUNet18",), "repeats": 3,
        "vit": {"image_size": 224, "patch_size": 16, "vision_width": 768, "vision_layers": 12, "vision_heads": 12,
                "projection_dim": 512, "text_width": 512, "text_layers": 2, "text_heads": 8},
        "embed_scenes": 4, "embed_batch": 512, "embed_dtype": "fp16", "read_scenes": 16, "workers": 4,
        "pytest_timeout_s": 150, "pytest_paths": (), "bf16": (False, True), "budget_s": 450,
    },
    "dry": {
        "device": "cpu", "scenes": 2, "points": 3_000, "voxel_size_m": 0.1, "preset": "tiny",
        "batch_size": 2, "steps": 1, "sparse_sizes": (2_000,), "sparse_channels": (8,),
        "sparse_net_sizes": (1_500,), "sparse_networks": ("tiny",), "repeats": 1,
        "vit": {"image_size": 32, "patch_size": 16, "vision_width": 32, "vision_layers": 1, "vision_heads": 2,
                "projection_dim": 16, "text_width": 32, "text_layers": 1, "text_heads": 2, "vocab_size": 300},
        "embed_scenes": 0, "embed_batch": 16, "embed_dtype": "fp32", "read_scenes": 4, "workers": 4,
        "pytest_timeout_s": 120, "pytest_paths": ("tests/ws3d_train/sparse/test_sparse.py",), "bf16": (False,), "budget_s": 300,
    },
}
"""Inputs of the full check (one GPU) and of the dry run (CPU, seconds). ``embed_scenes=0``: the
dry run times the encoder on random crops instead of rendering scenes (no Open3D needed), collects
the ``gpu`` tests of one module (they skip without CUDA) and leaves bf16 out (CUDA-only autocast)."""

GOALS = {"peak_memory_gb_max": 16.0, "steps_per_s_min": 1.0, "embed_images_per_s_min": 1000.0}


def _section(results: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]], echo: Callable[[str], None],
             *, deadline: float) -> None:
    if time.perf_counter() > deadline:  # keep the whole check inside its time budget
        results[name] = {"skipped": "time budget spent (size budget_s)", "seconds": 0.0}
        echo(f"gpu-check {name}: skipped (time budget)")
        return
    echo(f"gpu-check {name} ...")
    start = time.perf_counter()
    try:
        out = fn()
    except Exception as exc:  # a broken section is recorded; the others still run
        out = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=6)}
    out["seconds"] = round(time.perf_counter() - start, 2)
    results[name] = out
    echo(f"gpu-check {name}: {out['seconds']} s{' ERROR ' + out['error'] if 'error' in out else ''}")


def _pytest_gpu(size: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """``pytest -m gpu`` in a subprocess; counts from its JUnit XML."""
    report = workdir / "pytest_gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
           *size["pytest_paths"]]
    from ws3d_train.bench import ROOT as root
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=size["pytest_timeout_s"])
    except subprocess.TimeoutExpired:
        return {"error": f"pytest -m gpu ran past {size['pytest_timeout_s']} s", "command": " ".join(cmd[1:])}
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    failed: list[str] = []
    skipped: dict[str, int] = {}
    if report.is_file():
        for case in ET.parse(report).getroot().iter("testcase"):
            test_id = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None:
                counts["failed"] += 1
                failed.append(test_id)
            elif case.find("error") is not None:
                counts["errors"] += 1
                failed.append(test_id)
            elif (skip := case.find("skipped")) is not None:
                counts["skipped"] += 1
                reason = (skip.get("message") or "")[:120]
                skipped[reason] = skipped.get(reason, 0) + 1
            else:
                counts["passed"] += 1
    return {"returncode": proc.returncode, **counts, "failed_tests": failed, "skip_reasons": skipped,
            "tail": proc.stdout[-1500:]}


def _make_store(size: dict[str, Any], folder: Path) -> str:
    """Synthetic scenes with every stage the trainer reads, written without the renderer (the
    tests' hand-made rooms: floor, walls, boxes; ``points`` per scene)."""
    from ws3d_train.bench import ROOT as root
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from tests.conftest import make_tiny_store

    path = folder / "train_store"
    make_tiny_store(path, n_scenes=size["scenes"], n_points=size["points"], seed=0)
    return str(path)


def _sparse(size: dict[str, Any]) -> dict[str, Any]:
    from ws3d_train.bench.sparse import bench_sparse

    return bench_sparse(
        sizes=size["sparse_sizes"], channels=size["sparse_channels"], net_sizes=size["sparse_net_sizes"],
        networks=size["sparse_networks"], device=size["device"], repeats=size["repeats"],
        dense_grid=48 if size["device"] == "cuda" else 16,
    )


def _device_backends(device: str) -> list[str]:
    from ws3d_train.sparse import available_backends, backend_runs_on

    return [b for b in available_backends() if backend_runs_on(b, device)]


def _train_steps(size: dict[str, Any], store: str) -> dict[str, Any]:
    import torch

    from ws3d_train.bench.data import bench_train_step
    from ws3d_train.data.dataset import DataConfig
    from ws3d_train.network import NetworkConfig

    out: dict[str, Any] = {"preset": size["preset"], "voxel_size_m": size["voxel_size_m"],
                           "batch_size": size["batch_size"], "runs": {}}
    for backend in _device_backends(size["device"]):
        for bf16 in size["bf16"]:
            key = f"{backend}_{'bf16' if bf16 else 'fp32'}"
            try:
                res = bench_train_step(
                    store, network=NetworkConfig(preset=size["preset"], backend=backend),
                    data=DataConfig(voxel_size_m=size["voxel_size_m"]), batch_size=size["batch_size"],
                    steps=size["steps"], device=size["device"], bf16=bf16,
                )
                res["peak_memory_gb"] = round(res["peak_memory_mb"] / 1024, 3)
            except Exception as exc:  # e.g. out of memory, or a backend failing on this device
                res = {"error": f"{type(exc).__name__}: {exc}"}
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            out["runs"][key] = res
    return out


def _vit_folder(size: dict[str, Any], folder: Path) -> Path:
    """A ViT-B/16-sized CLIP with random weights and a locally trained tokenizer, saved like a hub
    model (``CLIPModel.save_pretrained``), so ``pipeline.clip.model.load_encoder`` reads it."""
    from pipeline.teacher.config import TeacherConfig
    from pipeline.teacher.fit import random_teacher

    class_names = ("wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door")  # caption words only

    v = size["vit"]
    cfg = TeacherConfig(image_size=v["image_size"], patch_size=v["patch_size"], vision_width=v["vision_width"],
                        vision_layers=v["vision_layers"], vision_heads=v["vision_heads"],
                        projection_dim=v["projection_dim"], text_width=v["text_width"],
                        text_layers=v["text_layers"], text_heads=v["text_heads"],
                        **({"vocab_size": v["vocab_size"]} if "vocab_size" in v else {}))
    return random_teacher(folder / "vit_b16", class_names, cfg)


def _embed(size: dict[str, Any], folder: Path) -> dict[str, Any]:
    model_dir = _vit_folder(size, folder)
    out: dict[str, Any] = {"model": "random CLIP, vision " + json.dumps(size["vit"]), "dtype": size["embed_dtype"],
                           "batch_size": size["embed_batch"]}
    rendered = None
    if size["embed_scenes"] > 0:
        try:
            import open3d  # noqa: F401  the renderer of the synthetic meshes

            rendered = _render_scenes(size["embed_scenes"], folder)
        except ImportError as exc:
            out["render_skipped"] = f"{exc}"
    if rendered is not None:
        from pipeline.embed.config import EmbedConfig
        from pipeline.embed.stage import embed_scenes
        from pipeline.store import Store

        cfg = EmbedConfig(model=str(model_dir), device=size["device"], dtype=size["embed_dtype"],
                          batch_size=size["embed_batch"], allow_download=False)
        ids = Store.open(rendered).scene_ids()
        embed_scenes(rendered, ids[:1], cfg, force=True, verbose=False)  # warm-up: kernels, allocator
        start = time.perf_counter()
        results = embed_scenes(rendered, ids, cfg, force=True, verbose=False)
        seconds = time.perf_counter() - start
        images = sum(r.stats.get("views", 0) + r.stats.get("crops", 0) for r in results if r.status == "done")
        out.update(path="pipeline.embed.stage.embed_scenes (cross-scene batches)", scenes=len(ids),
                   failed=[r.scene_id for r in results if r.status == "failed"], images=images,
                   seconds_embed=round(seconds, 3), images_per_s=round(images / seconds, 1))
        return out
    import numpy as np
    import torch

    from pipeline.clip.model import load_encoder

    encoder = load_encoder(str(model_dir), device=size["device"], dtype=size["embed_dtype"])
    batch = size["embed_batch"]
    pixels = torch.randn(batch * 4, 3, encoder.image_size, encoder.image_size, device=encoder.device)
    encoder.encode_pixels(pixels[:batch], batch_size=batch)
    start = time.perf_counter()
    emb = encoder.encode_pixels(pixels, batch_size=batch)
    _ = np.asarray(emb.float().cpu() if hasattr(emb, "cpu") else emb)  # a device sync
    seconds = time.perf_counter() - start
    out.update(path="ClipEncoder.encode_pixels on random crops (no rendered scenes)", images=len(pixels),
               seconds_embed=round(seconds, 3), images_per_s=round(len(pixels) / seconds, 1))
    return out


def _render_scenes(n_scenes: int, folder: Path) -> str:
    """Synthetic rooms through ingest, overseg and render (Open3D ray casting on the CPU)."""
    from pipeline.executor import ExecutorConfig
    from pipeline.datasets.synthetic import synthesise
    from pipeline.workflow import WorkflowConfig, run_workflow

    raw, store = folder / "raw", folder / "render_store.zarr"
    synthesise(raw, n_scenes, seed=0)
    wf = WorkflowConfig(dataset="synthetic", raw=str(raw), store=str(store),
                        executor=ExecutorConfig(kind="local", workers=min(n_scenes, os.cpu_count() or 1)),
                        stages=("ingest", "overseg", "render"))
    run_workflow(wf, echo=lambda _: None)
    return str(store)


def _store_read(size: dict[str, Any], store: str) -> dict[str, Any]:
    from ws3d_train.data.dataset import DataConfig, SceneDataset, make_loader

    dataset = SceneDataset(store, None, cfg=DataConfig(voxel_size_m=size["voxel_size_m"]), split="train", seed=0)
    loader = make_loader(dataset, batch_size=1, seed=0, num_workers=size["workers"])
    batches = iter(loader)
    next(batches)  # workers started, first scene read
    start = time.perf_counter()
    voxels = 0
    for _ in range(size["read_scenes"]):
        voxels += next(batches).coords.shape[0]
    seconds = time.perf_counter() - start
    del batches, loader  # stops the workers
    return {"workers": size["workers"], "scenes": size["read_scenes"], "scenes_per_s": round(size["read_scenes"] / seconds, 2),
            "voxels_per_scene": voxels / size["read_scenes"]}


def _goals(results: dict[str, Any]) -> dict[str, Any]:
    runs = results.get("train_step", {}).get("runs", {})
    ok_runs = {k: v for k, v in runs.items() if "error" not in v}
    embed_ips = results.get("embed", {}).get("images_per_s")
    best_steps = max((v["steps_per_s"] for v in ok_runs.values()), default=None)
    lowest_peak = min((v["peak_memory_gb"] for v in ok_runs.values()), default=None)
    return {
        **GOALS,
        "evaluated": not results.get("dry_run", False),  # a dry run's figures are CPU toy sizes
        "best_steps_per_s": best_steps,
        "lowest_peak_memory_gb": lowest_peak,
        "embed_images_per_s": embed_ips,
        "peak_memory_ok": None if lowest_peak is None else lowest_peak <= GOALS["peak_memory_gb_max"],
        "steps_per_s_ok": None if best_steps is None else best_steps >= GOALS["steps_per_s_min"],
        "embed_ok": None if embed_ips is None else embed_ips >= GOALS["embed_images_per_s_min"],
    }


def run_gpu_check(*, dry_run: bool = False, skip_pytest: bool = False, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every section (see the module docstring); returns the JSON-ready dict."""
    from ws3d_train.bench import machine

    size = SIZES["dry" if dry_run else "full"]
    if not dry_run:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("gpu-check needs a CUDA device (torch.cuda.is_available() is False); use --dry-run on a CPU")
    started = time.perf_counter()
    deadline = started + size["budget_s"]
    results: dict[str, Any] = {"machine": machine(), "dry_run": dry_run, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "size": {k: v for k, v in size.items() if k != "vit"} | {"vit": size["vit"]}}
    with tempfile.TemporaryDirectory(prefix="ws3d-gpu-check-") as tmp:
        workdir = Path(tmp)
        if not skip_pytest:
            _section(results, "pytest_gpu", lambda: _pytest_gpu(size, workdir), echo, deadline=deadline)
        results["backends_on_device"] = _device_backends(size["device"])
        _section(results, "sparse", lambda: _sparse(size), echo, deadline=deadline)
        store: dict[str, str] = {}
        _section(results, "store_build", lambda: {"path": store.setdefault("path", _make_store(size, workdir))},
                 echo, deadline=deadline)
        if "path" in store:
            _section(results, "train_step", lambda: _train_steps(size, store["path"]), echo, deadline=deadline)
        _section(results, "embed", lambda: _embed(size, workdir), echo, deadline=deadline)
        if "path" in store:
            _section(results, "store_read", lambda: _store_read(size, store["path"]), echo, deadline=deadline)
    results["goals"] = _goals(results)
    results["seconds_total"] = round(time.perf_counter() - started, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ws3d_train.bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="The JSON file to write.")
    parser.add_argument("--dry-run", action="store_true", help="Tiny sizes on the CPU (CI).")
    parser.add_argument("--skip-pytest", action="store_true", help="Leave out the `pytest -m gpu` section.")
    args = parser.parse_args(argv)
    try:
        results = run_gpu_check(dry_run=args.dry_run, skip_pytest=args.skip_pytest)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from ws3d_train.bench import write_json

    write_json(results, args.out)
    print(f"gpu-check: {results['seconds_total']} s, goals {json.dumps(results['goals'])}")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
