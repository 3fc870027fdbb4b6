"""Hierarchical vision-language pre-training: the 3D network learns to see what CLIP sees.

Reads the store (points, over-segments, visible lists and CLIP embeddings through
:class:`ws3d_train.data.SceneDataset`, and the text embeddings of a vocabulary) and writes a run
directory::

    <out_dir>/config.yaml              the resolved PretrainConfig (load_config reads it back)
    <out_dir>/metrics.jsonl            one record per logged step (ws3d_train.logging)
    <out_dir>/checkpoints/step_*.pt    every `checkpoint_every` steps and at the end

The loss of a batch (all terms on the CLIP-space head, per voxel):

- scene level ``w_view * view_infonce``: each view's mean 3D embedding over the voxels it shows
  against the view's CLIP embedding, contrastive across the views of the batch;
- object level ``w_segment * segment_cosine``: each segment's mean 3D embedding against its CLIP
  segment embedding;
- ``w_kl * distill_kl``: the teacher's class distribution over the vocabulary's text embeddings
  (segment embedding . text) distilled into the student's (pooled 3D . text).

`pretrain` is the one loop, readable top to bottom. Resuming is exact: model, optimiser, RNG
states and the data position (batches consumed) come back from the checkpoint, and the data
order and augmentation are functions of (seed, epoch, scene), so 2 steps + resume + 2 steps
equal 4 steps bit for bit on a CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from pipeline import schema
from pipeline.config import ConfigError, from_dict, to_dict
from pipeline.store import Store
from ws3d_train.batch import Batch
from ws3d_train.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    set_rng_state,
)
from ws3d_train.data import DataConfig, SceneDataset, make_loader, read_scene_list
from ws3d_train.logging import MetricsLogger
from ws3d_train.losses import distill_kl, segment_cosine, segment_mean, view_infonce
from ws3d_train.network import MinkUNet, NetworkConfig, build_network
from ws3d_train.schedule import lr_at
from ws3d_train.sparse import SparseTensor

__all__ = [
    "PretrainConfig",
    "load_pretrained",
    "pretrain",
    "pretrain_losses",
    "resolve_device",
]

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.yaml"

RUN_CONTROL_FIELDS = frozenset(
    {"steps", "num_workers", "progress", "tensorboard", "log_every", "checkpoint_every", "keep_checkpoints", "device"}
)
"""Fields a resumed run may change; anything else must match the checkpoint's config (changing
`steps` changes the cosine schedule from there on, so the run is then no longer exact)."""


@dataclass(frozen=True)
class PretrainConfig:
    """Pre-training (``ws3d pretrain``). Network width/in/out sizes follow the data (see `pretrain`)."""

    store: str = ""
    """Path of the store (with ingest, overseg, render and embed done)."""
    scenes: str | None = None
    """A file listing the training scene ids, one per line (e.g. a split in data_manifests/);
    None: every scene of the store."""
    vocab: str = "classes"
    """Store vocabulary whose text embeddings the KL term distils over."""
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
    w_view: float = 1.0
    """Weight of the scene-level view InfoNCE."""
    w_segment: float = 1.0
    """Weight of the object-level segment cosine loss."""
    w_kl: float = 1.0
    """Weight of the class-distribution distillation (KL)."""
    view_temperature: float = 0.07
    """InfoNCE temperature across views."""
    kl_temperature: float = 0.07
    """Softmax temperature of the teacher and student class distributions."""
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
    deterministic: bool = True
    """Deterministic kernels on a CPU (multi-threaded scatter-adds otherwise round differently from
    run to run, and a resumed run could not be bitwise exact). On CUDA the fast kernels are kept:
    a resumed GPU run matches an uninterrupted one up to rounding."""
    num_workers: int = 4
    """DataLoader worker processes (0: load in the main process)."""
    tensorboard: bool = True
    """Also write TensorBoard events when the `tensorboard` package is installed."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "accumulation", "steps", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if min(self.w_view, self.w_segment, self.w_kl) < 0:
            raise ValueError("PretrainConfig loss weights must be >= 0")
        if not set(self.data.groups) >= {"overseg", "views", "clip"}:
            raise ValueError("PretrainConfig.data.groups must include overseg, views and clip (the targets)")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else as given (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for but CUDA is not available; use device=cpu")
    return device


def pretrain_losses(
    point_clip: torch.Tensor, batch: Batch, text: torch.Tensor, cfg: PretrainConfig
) -> dict[str, torch.Tensor]:
    """The three pre-training terms and their weighted sum for one batch.

    Args:
        point_clip: [Nv, D] float32 CLIP-head output per voxel (rows of ``batch.coords``).
        batch: the batch (on the same device).
        text: [C, D] text embeddings of the vocabulary.
        cfg: weights and temperatures.

    Returns:
        ``{"loss", "loss_view", "loss_segment", "loss_kl"}`` scalars (``loss`` is the weighted sum).
    """
    seg_embed, count = segment_mean(point_clip, batch.voxel_segment, batch.num_segments)
    seen = batch.segment_seen & (count > 0)
    terms = {
        "loss_view": view_infonce(
            point_clip, batch.view_ptr, batch.view_voxel, batch.view_target, cfg.view_temperature
        ),
        "loss_segment": segment_cosine(seg_embed, batch.segment_target, seen),
        "loss_kl": distill_kl(seg_embed, batch.segment_target, text, seen, cfg.kl_temperature),
    }
    terms["loss"] = cfg.w_view * terms["loss_view"] + cfg.w_segment * terms["loss_segment"] + cfg.w_kl * terms["loss_kl"]
    return terms


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # decay kernels and weight matrices only: decaying biases and norm scales just fights them
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _resolve_config(cfg: PretrainConfig, store: Store, dataset: SceneDataset, text: np.ndarray) -> PretrainConfig:
    """Fill what the data decides: voxel size, network input/output widths."""
    clip_dim = store.shape(dataset.scene_ids[0], schema.CLIP_SEGMENT)[1]
    if clip_dim != text.shape[1]:
        raise ConfigError(
            f"{cfg.store}: CLIP embeddings are {clip_dim}-d but vocabulary {cfg.vocab!r} is {text.shape[1]}-d; "
            "re-run `ws3d embed` with one model"
        )
    data = dataclasses.replace(cfg.data, voxel_size_m=dataset.voxel_size)
    network = dataclasses.replace(  # preset filled in, so the checkpoint rebuilds without presets
        cfg.network.resolved(), in_channels=data.in_channels, num_classes=len(store.class_names), clip_dim=int(clip_dim)
    )
    return dataclasses.replace(cfg, data=data, network=network)


def _check_resume(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    differ = sorted(k for k in set(saved) | set(current) if k not in RUN_CONTROL_FIELDS and saved.get(k) != current.get(k))
    if differ:
        raise ConfigError(
            f"{path}: cannot resume: the config differs from the checkpoint's in {differ}; "
            "start a new run directory or restore those values"
        )


@contextlib.contextmanager
def _restore_determinism(enabled: bool, warn_only: bool):
    # the setting is process-global: leave it as the caller had it
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def pretrain(cfg: PretrainConfig, out_dir: str | Path, *, resume: bool = False, stop_at: int | None = None) -> dict[str, Any]:
    """Pre-train a network on a store; write config, metrics and checkpoints under ``out_dir``.

    Args:
        cfg: the config (``cfg.store`` must be set).
        out_dir: the run directory (created).
        resume: continue from the latest checkpoint in ``out_dir`` (from scratch when there is
            none, so a re-queued cluster job can always pass it).
        stop_at: stop after this step without saving, as a killed job would (for tests and
            time-limited jobs); None runs to ``cfg.steps``.

    Returns:
        A summary: steps done, last losses, wall time, steps/s, the last checkpoint, the device.

    Raises:
        FileExistsError: ``out_dir`` has checkpoints and ``resume`` is False.
        FloatingPointError: a non-finite loss (naming the step and scenes).
    """
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    if not cfg.store:
        raise ConfigError("PretrainConfig.store is empty: pass --store PATH")
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None and not resume:
        raise FileExistsError(f"{out_dir}: has checkpoints (latest {latest.name}); pass --resume or use another --out")
    device = resolve_device(cfg.device)

    # --- data and the config it resolves ------------------------------------------------------
    store = Store.open(cfg.store)
    scene_ids = read_scene_list(cfg.scenes) if cfg.scenes else store.scene_ids()
    dataset = SceneDataset(cfg.store, scene_ids, cfg=cfg.data, split="train", seed=cfg.seed)
    try:
        text_np, _ = store.read_vocab(cfg.vocab)
    except KeyError as exc:
        raise ConfigError(str(exc)) from exc
    cfg = _resolve_config(cfg, store, dataset, text_np)
    resolved = to_dict(cfg)
    text = torch.from_numpy(text_np.astype(np.float32)).to(device)

    # --- model, optimiser, and where we start -------------------------------------------------
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_network(cfg.network).to(device)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    start_step = 0
    if resume and latest is not None:
        ckpt = load_checkpoint(latest, map_location=device)
        _check_resume(ckpt["config"], resolved, latest)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])  # after building everything: construction draws random numbers
        start_step = int(ckpt["step"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False))

    loader = make_loader(
        dataset,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        start_batch=start_step * cfg.accumulation,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
    )
    batches = iter(loader)
    use_bf16 = cfg.bf16 and device.type == "cuda"
    end_step = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    logger = MetricsLogger(
        out_dir, total_steps=cfg.steps, start_step=start_step, tensorboard=cfg.tensorboard, progress=cfg.progress,
        description="pretrain",
    )
    model.train()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if cfg.deterministic and device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    t_start = time.time()
    last: dict[str, Any] = {}
    first_loss: float | None = None
    saved: Path | None = latest if resume else None

    # --- the loop -----------------------------------------------------------------------------
    with logger, _restore_determinism(was_deterministic, was_warn_only):
        for step in range(start_step, end_step):
            t_step = time.time()
            lr = lr_at(step, base_lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            sums = {"loss": 0.0, "loss_view": 0.0, "loss_segment": 0.0, "loss_kl": 0.0}
            data_s, voxels = 0.0, 0
            for _ in range(cfg.accumulation):
                t_data = time.time()
                batch = next(batches).to(device, non_blocking=True)
                data_s += time.time() - t_data
                voxels += batch.coords.shape[0]
                autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
                with autocast:
                    out = model(SparseTensor(feats=batch.feats, coords=batch.coords))
                # the losses normalise and exponentiate: keep them in float32 whatever autocast did
                terms = pretrain_losses(out.clip.float(), batch, text, cfg)
                if not torch.isfinite(terms["loss"]):
                    raise FloatingPointError(f"step {step + 1}: non-finite loss {terms} on scenes {batch.scene_ids}")
                (terms["loss"] / cfg.accumulation).backward()
                for key in sums:
                    sums[key] += float(terms[key].detach()) / cfg.accumulation
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            optimizer.step()

            done = step + 1
            first_loss = sums["loss"] if first_loss is None else first_loss
            last = {"lr": lr, **sums, "grad_norm": float(grad_norm), "voxels": voxels,
                    "data_s": round(data_s, 4), "step_s": round(time.time() - t_step, 4)}
            if done % cfg.log_every == 0 or done == start_step + 1 or done == cfg.steps:
                logger.log(done, last)
            logger.advance()
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                saved = save_checkpoint(
                    checkpoint_path(ckpt_dir, done), model=model, optimizer=optimizer, step=done,
                    batches_consumed=done * cfg.accumulation, config=resolved, extra={"metrics": last},
                )
                prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)

    seconds = time.time() - t_start
    steps_run = end_step - start_step
    return {
        "out_dir": str(out_dir),
        "start_step": start_step,
        "steps": end_step,
        "loss_first": first_loss,
        "loss": last.get("loss"),
        "loss_view": last.get("loss_view"),
        "loss_segment": last.get("loss_segment"),
        "loss_kl": last.get("loss_kl"),
        "seconds": round(seconds, 3),
        "steps_per_s": round(steps_run / seconds, 4) if seconds > 0 and steps_run else 0.0,
        "checkpoint": str(saved) if saved is not None else None,
        "device": str(device),
        "parameters": sum(p.numel() for p in model.parameters()),
        "scenes": len(dataset),
        "voxel_size_m": dataset.voxel_size,
    }


def load_pretrained(
    path: str | Path, *, map_location: str | torch.device = "cpu", **network_overrides: Any
) -> tuple[MinkUNet, dict[str, Any]]:
    """Rebuild the network of a pre-training checkpoint and load its weights.

    Args:
        path: a checkpoint written by `pretrain`.
        map_location: where to load tensors.
        network_overrides: NetworkConfig fields to change (e.g. ``num_classes`` of another
            benchmark: heads whose shapes then differ keep their fresh initialisation).

    Returns:
        ``(model, checkpoint dict)``; weights loaded with ``strict`` matching except for heads
        whose shape changed.
    """
    ckpt = load_checkpoint(path, map_location=map_location)
    net_cfg = from_dict(NetworkConfig, ckpt["config"]["network"], where=f"{path}:network")
    net_cfg = dataclasses.replace(net_cfg, **network_overrides)
    model = build_network(net_cfg)
    own = model.state_dict()
    state = {k: v for k, v in ckpt["model"].items() if k in own and own[k].shape == v.shape}
    dropped = sorted(set(ckpt["model"]) - set(state))
    unexpected_missing = [k for k in own if k not in state and not k.split(".")[0].endswith("_head")]
    if unexpected_missing:
        raise RuntimeError(f"{path}: checkpoint lacks backbone weights {unexpected_missing[:5]} for this network")
    model.load_state_dict(state, strict=False)
    ckpt["dropped_keys"] = dropped
    return model.to(map_location), ckpt
