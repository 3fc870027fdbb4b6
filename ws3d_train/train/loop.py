"""The one training loop of pre-training and fine-tuning, and what both share.

:class:`LoopConfig` holds the fields both loops read the same way (store, data, network,
optimiser, schedule, checkpoints, logging, device); :class:`ws3d_train.train.pretrain.PretrainConfig`
and :class:`ws3d_train.train.finetune.FinetuneConfig` derive from it and add their loss terms (and
re-declare the fields whose default or meaning differs).

:func:`train` is the step skeleton, readable top to bottom: the run folder, data-parallel setup,
seeding, the model, AdamW with decay on weight matrices only, exact resume (which config fields
may change), the loader at the right batch, then every optimiser step: learning rate, micro-batches
(gradient accumulation, bf16 autocast on CUDA), losses, a check that they are finite, backward,
clipping, the step, metrics averaged over ranks, logging and checkpoints. A loop hands it a
:class:`Recipe`: its resolved config, dataset, model builder, loss function and run files. A new
loss term therefore touches its function (`ws3d_train.train.losses`) and one loop's loss wiring.

Reads a checkpoint when resuming (:func:`resume_from`); writes ``<out_dir>/config.yaml``,
``metrics.jsonl`` and checkpoints under ``<out_dir>/checkpoints/`` (:func:`log_and_checkpoint`).
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from pipeline.config import ConfigError, to_dict
from ws3d_train.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    set_rng_state,
)
from ws3d_train.data.dataset import DataConfig
from ws3d_train.device import set_torch_threads
from ws3d_train.logging import MetricsLogger
from ws3d_train.network import NetworkConfig
from ws3d_train.sparse import SparseTensor
# the run folder's layout (CHECKPOINT_DIR, CONFIG_FILE) is owned by ws3d_train.run
from ws3d_train.run import CHECKPOINT_DIR, CONFIG_FILE
from ws3d_train.train import distributed
from ws3d_train.train.schedule import lr_at

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
    "Recipe",
    "resume_from",
    "run_summary",
    "seed_everything",
    "set_lr",
    "train",
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


@dataclass
class Recipe:
    """What a loop hands the step skeleton (:func:`train`)."""

    cfg: LoopConfig
    """The resolved config (voxel size and network widths filled in from the data): written to
    ``config.yaml`` and into every checkpoint."""
    dataset: Any
    """The training dataset (a :class:`ws3d_train.data.dataset.SceneDataset`)."""
    build_model: Callable[[], torch.nn.Module]
    """Builds the network (called after seeding, so its initialisation is reproducible)."""
    losses: Callable[[Any, Any, int, int], dict[str, torch.Tensor]]
    """``losses(output, batch, step, micro)``: the loss terms of one micro-batch, ``loss`` their
    weighted sum (``step`` is 0-based, ``micro`` the micro-batch within it)."""
    loss_keys: tuple[str, ...]
    """The terms logged (and averaged over micro-batches and ranks), ``loss`` first."""
    write_run_files: Callable[[Path], None]
    """Writes what the run folder holds beside the config (the label space), on rank 0."""
    description: str
    """Name of the progress bar."""
    collate_fn: Callable[..., Any] | None = None
    """The loader's collate function (None: the dataset's default)."""
    counters: Callable[[Any], dict[str, int]] | None = None
    """Counts per micro-batch summed over the step and the ranks (e.g. labelled voxels)."""
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)
    """Kept in every checkpoint's ``extra`` beside the metrics and the world size."""
    summary: dict[str, Any] = field(default_factory=dict)
    """Added to the loop's summary."""
    deterministic: bool = False
    """Deterministic kernels on a CPU (bitwise exact resume; see PretrainConfig.deterministic)."""


@contextlib.contextmanager
def _deterministic(enabled: bool, device: torch.device):
    """Deterministic algorithms on a CPU for the loop; the process-global setting is put back as
    the caller had it."""
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled and device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def train(
    cfg: LoopConfig, out_dir: str | Path, prepare: Callable[[distributed.DistContext, torch.device], Recipe], *,
    resume: bool = False, stop_at: int | None = None,
) -> dict[str, Any]:
    """The step skeleton of both loops: run folder, model, optimiser, resume, and the steps.

    Args:
        cfg: the loop's config as given (``cfg.store`` must be set).
        out_dir: the run directory (created).
        prepare: ``prepare(ctx, device) -> Recipe``: reads the data and resolves the config
            (this rank's context and device).
        resume: continue from the latest checkpoint in ``out_dir`` (from scratch when there is
            none, so a re-queued cluster job can always pass it).
        stop_at: stop after this step without saving, as a killed job would (for tests and
            time-limited jobs); None runs to ``cfg.steps``.

    Returns:
        A summary: steps done, first and last losses, wall time, steps/s, the last checkpoint,
        the device, the world size, and the recipe's own keys.

    Raises:
        FileExistsError: ``out_dir`` has checkpoints and ``resume`` is False.
        ConfigError: a resumed run whose config differs from its checkpoint's.
        FloatingPointError: a non-finite loss (naming the step and scenes).
    """
    out_dir = Path(out_dir)
    latest = check_run_dir(cfg, out_dir, resume=resume)
    ctx, device = distributed.setup(cfg.device)  # one process, or this rank's under torchrun
    recipe = prepare(ctx, device)
    cfg = recipe.cfg
    resolved = to_dict(cfg)

    # --- model, optimiser, and where we start -------------------------------------------------
    seed_everything(cfg.seed)
    set_torch_threads(cfg.threads)
    model = recipe.build_model().to(device)
    optimizer = make_optimizer(model, cfg)
    start_step = 0
    if resume and latest is not None:
        start_step = resume_from(latest, model=model, optimizer=optimizer, config=resolved, device=device)
    out_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:  # under torchrun, rank 0 writes the run folder
        (out_dir / CONFIG_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False))
        recipe.write_run_files(out_dir)

    loader = distributed.make_loader(  # this rank's share of each global batch
        ctx, recipe.dataset, resumed_from=latest if start_step else None, batch_size=cfg.batch_size, seed=cfg.seed,
        start_batch=start_step * cfg.accumulation, num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
        collate_fn=recipe.collate_fn,
    )
    batches = iter(loader)
    use_bf16 = cfg.bf16 and device.type == "cuda"
    end_step = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    logger = (MetricsLogger if ctx.is_main else distributed.NullLogger)(  # rank 0 writes the log
        out_dir, total_steps=cfg.steps, start_step=start_step, tensorboard=cfg.tensorboard, progress=cfg.progress,
        description=recipe.description,
    )
    ddp_model = distributed.wrap_model(model, ctx)  # `model` itself for one process
    model.train()
    t_start = time.time()
    last: dict[str, Any] = {}
    first_loss: float | None = None
    saved: Path | None = latest if resume else None
    keys = recipe.loss_keys

    # --- the steps ----------------------------------------------------------------------------
    with logger, _deterministic(recipe.deterministic, device):
        for step in range(start_step, end_step):
            t_step = time.time()
            lr = set_lr(optimizer, step, cfg)
            optimizer.zero_grad(set_to_none=True)
            sums = dict.fromkeys(keys, 0.0)
            counts: dict[str, int] = {"voxels": 0}
            data_s = 0.0
            for micro in range(cfg.accumulation):
                t_data = time.time()
                batch = next(batches).to(device, non_blocking=True)
                data_s += time.time() - t_data
                counts["voxels"] += batch.coords.shape[0]
                for key, value in (recipe.counters(batch) if recipe.counters else {}).items():
                    counts[key] = counts.get(key, 0) + value
                autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
                with autocast:
                    out = ddp_model(SparseTensor(feats=batch.feats, coords=batch.coords))
                terms = recipe.losses(out, batch, step, micro)
                if not torch.isfinite(terms["loss"]):
                    raise FloatingPointError(
                        f"step {step + 1}: non-finite loss { {k: float(v) for k, v in terms.items()} } on scenes {batch.scene_ids}"
                    )
                (terms["loss"] / cfg.accumulation).backward()
                for key in keys:
                    sums[key] += float(terms[key].detach()) / cfg.accumulation
            grad_norm = clip_gradients(model, cfg.grad_clip)
            optimizer.step()

            done = step + 1
            sums = distributed.mean_over_ranks(sums, ctx)  # every rank's batch, averaged
            counts = dict(zip(counts, (int(v) for v in distributed.all_reduce_sum(list(counts.values()), ctx))))
            first_loss = sums["loss"] if first_loss is None else first_loss
            last = {"lr": lr, **sums, "grad_norm": float(grad_norm), **counts,
                    "data_s": round(data_s, 4), "step_s": round(time.time() - t_step, 4), "world_size": ctx.world_size}
            saved = log_and_checkpoint(
                cfg, done, last, start_step=start_step, logger=logger, out_dir=out_dir, model=model,
                optimizer=optimizer, config=resolved,
                extra={"metrics": last, **recipe.checkpoint_extra, "world_size": ctx.world_size},
            ) or saved

    return {
        **run_summary(
            out_dir, start_step=start_step, end_step=end_step, first_loss=first_loss, last=last,
            loss_keys=keys, seconds=time.time() - t_start, checkpoint=saved, device=device,
        ),
        "parameters": sum(p.numel() for p in model.parameters()),
        **recipe.summary,
        "world_size": ctx.world_size,
    }

