"""What the pre-training and fine-tuning loops share: the loop-control config and small helpers.

:class:`LoopConfig` holds the fields both loops read the same way (store, data, network,
optimiser, schedule, checkpoints, logging, device); :class:`ws3d_train.pretrain.PretrainConfig`
and :class:`ws3d_train.finetune.FinetuneConfig` derive from it and add their loss terms (and
re-declare the fields whose default or meaning differs). The helpers keep one convention for both
loops: the run directory layout, exact resume (which config fields may change), AdamW with decay on
weight matrices only, the learning rate of a step, gradient clipping.

Reads a checkpoint when resuming (:func:`resume_from`); writes checkpoints under
``<out_dir>/checkpoints/`` (:func:`log_and_checkpoint`).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import ConfigError
from ws3d_train.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    set_rng_state,
)
from ws3d_train import distributed
from ws3d_train.data import DataConfig
from ws3d_train.logging import MetricsLogger
from ws3d_train.network import NetworkConfig
# the run folder's layout (CHECKPOINT_DIR, CONFIG_FILE) is owned by ws3d_train.run
from ws3d_train.run import CHECKPOINT_DIR, CONFIG_FILE
from ws3d_train.schedule import lr_at

__all__ = [
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "RUN_CONTROL_FIELDS",
    "LoopConfig",
    "check_resume",
    "check_run_dir",
    "clip_gradients",
    "log_and_checkpoint",
    "make_optimizer",
    "param_groups",
    "resolve_device",
    "resume_from",
    "run_summary",
    "seed_everything",
    "set_lr",
]


RUN_CONTROL_FIELDS = frozenset(
    {"steps", "num_workers", "progress", "tensorboard", "log_every", "checkpoint_every", "keep_checkpoints", "device",
     "threads"}
)
"""Fields a resumed run may change; anything else must match the checkpoint's config (changing
`steps` changes the cosine schedule from there on, so the run is then no longer exact)."""


@dataclass(frozen=True)
class LoopConfig:
    """Loop control shared by pre-training and fine-tuning (not used on its own)."""

    store: str = ""
    """Path of the store (the stages each loop reads: see its config class)."""
    scenes: str | None = None
    """A file listing the training scene ids, one per line (e.g. a split in data_manifests/);
    None: every scene of the store."""
    vocab: str = "classes"
    """Store vocabulary whose text embeddings the text-space loss terms use."""
    data: DataConfig = field(default_factory=DataConfig)
    """Voxel size (None: 2 cm indoor, 5 cm outdoor), crop size, augmentation."""
    network: NetworkConfig = field(default_factory=NetworkConfig)
    """The sparse U-Net; `in_channels`, `num_classes` and `clip_dim` are set from the data."""
    batch_size: int = 4
    """Scenes per micro-batch."""
    accumulation: int = 1
    """Micro-batches per optimiser step (gradient accumulation)."""
    steps: int = 20_000
    """Optimiser steps in all."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.01
    """AdamW weight decay, on weight matrices/kernels only (not biases or norms)."""
    warmup_steps: int = 500
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = 0.01
    """Final learning rate as a fraction of `lr`."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    checkpoint_every: int = 1000
    """Save a checkpoint every this many steps (and always at the end)."""
    keep_checkpoints: int = 3
    """Keep the latest this many checkpoints (0: keep all)."""
    log_every: int = 10
    """Write a metrics record every this many steps (and at the first and last)."""
    seed: int = 0
    """Seeds the initialisation, the data order and the augmentations."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on a CPU)."""
    num_workers: int = 4
    """DataLoader worker processes (0: load in the main process)."""
    threads: int = 0
    """torch intra-op threads on a CPU; 0: OMP_NUM_THREADS when set, else the available cores
    shared among the processes of this node (LOCAL_WORLD_SIZE under torchrun).
    Set at the start of the loop (see :func:`set_torch_threads`)."""
    tensorboard: bool = True
    """Also write TensorBoard events when the `tensorboard` package is installed."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "accumulation", "steps", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be >= 1, got {getattr(self, name)}")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else as given (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for but CUDA is not available; use device=cpu")
    return device


def check_run_dir(cfg: LoopConfig, out_dir: Path, *, resume: bool) -> Path | None:
    """The latest checkpoint in run directory ``out_dir`` (None: none, start from step 0).

    Raises:
        ConfigError: ``cfg.store`` is empty.
        FileExistsError: ``out_dir`` has checkpoints and ``resume`` is False.
    """
    if not cfg.store:
        raise ConfigError(f"{type(cfg).__name__}.store is empty: pass --store PATH")
    latest = latest_checkpoint(out_dir / CHECKPOINT_DIR)
    if latest is not None and not resume:
        raise FileExistsError(f"{out_dir}: has checkpoints (latest {latest.name}); pass --resume or use another --out")
    return latest


def set_torch_threads(threads: int = 0) -> int:
    """Set torch's intra-op thread count for a loop and return it: `threads`, else OMP_NUM_THREADS,
    else the cores this process may use divided among the node's ranks (LOCAL_WORLD_SIZE).

    Needed because numba's OpenMP threading layer (the pipeline's parallel kernels) shares the
    OpenMP runtime with torch on Linux: the first numba parallel region in a process silently
    raises torch's thread count to numba's (e.g. 1 -> 2). On two shared cores that made the
    demo's training steps ~10x slower (31 s vs 2.7 s a step, measured) after preprocessing ran
    in the same process."""
    import os

    if threads <= 0:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
        ranks = int(local) if local.isdigit() and int(local) > 0 else 1
        threads = int(env) if env.isdigit() and int(env) > 0 else max(1, len(os.sched_getaffinity(0)) // ranks)
    torch.set_num_threads(threads)
    return threads


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (before building the model: its initialisation draws from them)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: ``weight_decay`` on kernels and weight matrices, none on the rest."""
    # decaying biases and norm scales just fights them
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: LoopConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` at the peak learning rate (:func:`set_lr` sets each step's)."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))


def check_resume(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Raise ConfigError naming checkpoint ``path`` when the resolved configs ``saved`` (the
    checkpoint's) and ``current`` differ outside :data:`RUN_CONTROL_FIELDS`."""
    differ = sorted(k for k in set(saved) | set(current) if k not in RUN_CONTROL_FIELDS and saved.get(k) != current.get(k))
    if differ:
        raise ConfigError(
            f"{path}: cannot resume: the config differs from the checkpoint's in {differ}; "
            "start a new run directory or restore those values"
        )


def resume_from(
    path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any],
    device: torch.device,
) -> int:
    """Load checkpoint ``path`` into ``model`` and ``optimizer`` and restore the RNG states, after
    :func:`check_resume` against the resolved ``config``. Returns the optimiser steps done."""
    ckpt = load_checkpoint(path, map_location=device)
    check_resume(ckpt["config"], config, path)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])  # after building everything: construction draws random numbers
    return int(ckpt["step"])


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: LoopConfig) -> float:
    """Set and return the learning rate of optimiser step ``step`` (0-based; warm-up + cosine)."""
    lr = lr_at(step, base_lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def clip_gradients(model: torch.nn.Module, grad_clip: float) -> torch.Tensor:
    """Clip the global gradient norm to ``grad_clip`` (0: no clipping); returns the norm before."""
    return torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)


def log_and_checkpoint(
    cfg: LoopConfig,
    done: int,
    metrics: dict[str, Any],
    *,
    start_step: int,
    logger: MetricsLogger,
    out_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: dict[str, Any],
    extra: dict[str, Any],
) -> Path | None:
    """The end of optimiser step ``done`` (1-based): log ``metrics`` when due (every `log_every`
    steps, the first step of this run and the last), advance the progress bar, and save a
    checkpoint (resolved ``config``, ``extra``) when due (every `checkpoint_every` steps and the
    last), pruning old ones. Returns the checkpoint written, or None."""
    if done % cfg.log_every == 0 or done == start_step + 1 or done == cfg.steps:
        logger.log(done, metrics)
    logger.advance()
    if not (done % cfg.checkpoint_every == 0 or done == cfg.steps):
        return None
    if not distributed.is_main_process():  # under torchrun only rank 0 writes checkpoints
        return None
    ckpt_dir = out_dir / CHECKPOINT_DIR
    saved = save_checkpoint(
        checkpoint_path(ckpt_dir, done), model=model, optimizer=optimizer, step=done,
        batches_consumed=done * cfg.accumulation, config=config, extra=extra,
    )
    prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)
    return saved


def run_summary(
    out_dir: Path,
    *,
    start_step: int,
    end_step: int,
    first_loss: float | None,
    last: dict[str, Any],
    loss_keys: tuple[str, ...],
    seconds: float,
    checkpoint: Path | None,
    device: torch.device,
) -> dict[str, Any]:
    """The head of a loop's summary: steps, first and last losses (``loss_keys`` of the last
    metrics), wall time, steps/s, the last checkpoint, the device (each loop adds its own keys)."""
    steps_run = end_step - start_step
    return {
        "out_dir": str(out_dir),
        "start_step": start_step,
        "steps": end_step,
        "loss_first": first_loss,
        **{key: last.get(key) for key in loss_keys},
        "seconds": round(seconds, 3),
        "steps_per_s": round(steps_run / seconds, 4) if seconds > 0 and steps_run else 0.0,
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "device": str(device),
    }
