"""Benchmarks of the trainer's data path and of one pre-training step (``make bench``).

Reads a store (any with ingest, overseg, render and embed done); writes nothing. Numbers are
measured, not asserted: the caller prints or records the returned dicts.

- :func:`bench_store_read`: scenes/s of :class:`ws3d_train.data.dataset.SceneDataset` (store reads,
  augmentation, voxelisation, crop and remap), with the share spent reading the store.
- :func:`bench_train_step`: steps/s and peak memory of pre-training steps (forward, the three
  losses, backward, AdamW). Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on a CPU the
  process's peak resident set (``VmHWM``), reset before the measured steps through
  ``/proc/self/clear_refs`` where Linux allows it (otherwise the lifetime peak of ``ru_maxrss``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.store import Store
from ws3d_train.data.batch import collate
from ws3d_train.data.dataset import DataConfig, SceneDataset
from ws3d_train.network import NetworkConfig, build_network
from ws3d_train.device import resolve_device
from ws3d_train.train.pretrain import PretrainConfig, pretrain_losses
from ws3d_train.sparse import SparseTensor

__all__ = ["bench_store_read", "bench_train_step", "peak_rss_mb"]


def _read_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:  # not Linux
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (VmHWM, else ru_maxrss)."""
    hwm = _read_status_kb("VmHWM")
    if hwm is not None:
        return hwm / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_store_read(
    store_path: str | Path,
    *,
    scene_ids: Sequence[str] | None = None,
    cfg: DataConfig = DataConfig(),
    split: str = "train",
    repeats: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Samples per second of the dataset, in the calling process (one worker's rate).

    Args:
        store_path: the store.
        scene_ids: scenes to load (default: all).
        cfg: data config (voxel size, crop, augmentation).
        split: ``train`` (augmented) or another split.
        repeats: passes over the scenes (epochs 0..repeats-1).

    Returns:
        ``{"scenes", "seconds", "scenes_per_s", "read_share", "points_per_scene",
        "voxels_per_scene", "voxel_size_m"}``; ``read_share`` is the fraction of the time spent in
        store reads (the rest is augmentation, voxelisation, crop and remap).
    """
    dataset = SceneDataset(store_path, scene_ids, cfg=cfg, split=split, seed=seed)
    read_time = 0.0
    original = dataset.read_arrays

    def timed_read(scene_id: str):
        nonlocal read_time
        t = time.perf_counter()
        out = original(scene_id)
        read_time += time.perf_counter() - t
        return out

    dataset.read_arrays = timed_read  # type: ignore[method-assign]
    points, voxels = [], []
    t0 = time.perf_counter()
    for epoch in range(repeats):
        for index in range(len(dataset)):
            sample = dataset[(epoch, index)]
            points.append(sample.point_to_voxel.shape[0])
            voxels.append(sample.coords.shape[0])
    seconds = time.perf_counter() - t0
    n = len(points)
    return {
        "scenes": n,
        "seconds": round(seconds, 4),
        "scenes_per_s": round(n / seconds, 3) if seconds > 0 else float("inf"),
        "read_share": round(read_time / seconds, 3) if seconds > 0 else 0.0,
        "points_per_scene": float(np.mean(points)),
        "voxels_per_scene": float(np.mean(voxels)),
        "voxel_size_m": dataset.voxel_size,
    }


def bench_train_step(
    store_path: str | Path,
    *,
    network: NetworkConfig = NetworkConfig(preset="tiny"),
    data: DataConfig = DataConfig(),
    batch_size: int = 2,
    steps: int = 3,
    device: str = "auto",
    bf16: bool = True,
    vocab: str = "classes",
    seed: int = 0,
) -> dict[str, Any]:
    """Steps/s and peak memory of pre-training steps on batches of the store.

    Batches are built once beforehand (the data path is measured by :func:`bench_store_read`);
    one unmeasured step warms up allocators and caches, then ``steps`` steps are timed.

    Returns:
        ``{"device", "steps", "voxels_per_batch", "steps_per_s", "voxels_per_s", "peak_memory_mb",
        "memory_kind", "parameters"}``; ``memory_kind`` is ``cuda_max_allocated``,
        ``cpu_peak_rss`` (reset before the steps) or ``cpu_peak_rss_lifetime``.
    """
    dev = resolve_device(device)
    store = Store.open(store_path)
    dataset = SceneDataset(store_path, None, cfg=data, split="train", seed=seed)
    text_np, _ = store.read_vocab(vocab)
    cfg = PretrainConfig(store=str(store_path), data=data, network=network, batch_size=batch_size, bf16=bf16)
    net_cfg = dataclasses.replace(
        network, in_channels=data.in_channels, num_classes=len(store.class_names), clip_dim=int(text_np.shape[1])
    )
    torch.manual_seed(seed)
    model = build_network(net_cfg).to(dev).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    text = torch.from_numpy(text_np.astype(np.float32)).to(dev)
    n = len(dataset)
    batches = [
        collate([dataset[(k, (k * batch_size + j) % n)] for j in range(min(batch_size, n))]).to(dev)
        for k in range(steps + 1)
    ]
    use_bf16 = bf16 and dev.type == "cuda"

    def step(batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        with autocast:
            out = model(SparseTensor(feats=batch.feats, coords=batch.coords))
        pretrain_losses(out.clip.float(), batch, text, cfg)["loss"].backward()
        optimizer.step()

    step(batches[0])
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        memory_kind = "cuda_max_allocated"
    else:
        memory_kind = "cpu_peak_rss" if _reset_peak_rss() else "cpu_peak_rss_lifetime"
    t0 = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else peak_rss_mb()
    voxels = float(np.mean([b.coords.shape[0] for b in batches[1:]]))
    return {
        "device": str(dev),
        "steps": steps,
        "voxels_per_batch": voxels,
        "steps_per_s": round(steps / seconds, 4),
        "voxels_per_s": round(steps * voxels / seconds, 1),
        "peak_memory_mb": round(peak, 1),
        "memory_kind": memory_kind,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
