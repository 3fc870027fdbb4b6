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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from pipeline import schema
from pipeline.config import ConfigError, from_dict, to_dict
from pipeline.store import Store
from pipeline.teacher import check_teacher_corpus
from ws3d_train.batch import Batch
from ws3d_train import distributed, loop
from ws3d_train.checkpoint import load_checkpoint
from ws3d_train.data import SceneDataset
from ws3d_train.logging import MetricsLogger
# defined here before ws3d_train.loop held them: still importable from here (predict, bench_data)
from ws3d_train.loop import CHECKPOINT_DIR, CONFIG_FILE, RUN_CONTROL_FIELDS, resolve_device  # noqa: F401
from ws3d_train.losses import distill_kl, segment_cosine, segment_mean, view_infonce
from ws3d_train.network import MinkUNet, NetworkConfig, build_network
from ws3d_train.run import label_space_from_store, write_label_space
from ws3d_train.sparse import SparseTensor

__all__ = [
    "PretrainConfig",
    "load_pretrained",
    "pretrain",
    "pretrain_losses",
    "resolve_device",
]


@dataclass(frozen=True)
class PretrainConfig(loop.LoopConfig):
    """Pre-training (``ws3d pretrain``) on a store with ingest, overseg, render and embed done; the
    vocabulary's text embeddings are what the KL term distils over. Loop control (store, scenes,
    data, network, optimiser, schedule, checkpoints, device) is in :class:`ws3d_train.loop.LoopConfig`.
    Network width/in/out sizes follow the data (see `pretrain`)."""

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
    deterministic: bool = True
    """Deterministic kernels on a CPU (multi-threaded scatter-adds otherwise round differently from
    run to run, and a resumed run could not be bitwise exact). On CUDA the fast kernels are kept:
    a resumed GPU run matches an uninterrupted one up to rounding."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.w_view, self.w_segment, self.w_kl) < 0:
            raise ValueError("PretrainConfig loss weights must be >= 0")
        if not set(self.data.groups) >= {"overseg", "views", "clip"}:
            raise ValueError("PretrainConfig.data.groups must include overseg, views and clip (the targets)")


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
    latest = loop.check_run_dir(cfg, out_dir, resume=resume)
    ctx, device = distributed.setup(cfg.device)  # one process, or this rank's under torchrun

    # --- data and the config it resolves ------------------------------------------------------
    store = Store.open(cfg.store)
    from ws3d_train.run import resolve_scene_ids  # a split name (train, ...) or a file, as fine-tuning takes

    scene_ids = resolve_scene_ids(store, cfg.scenes)
    dataset = SceneDataset(cfg.store, scene_ids, cfg=cfg.data, split="train", seed=cfg.seed)
    try:
        text_np, vocab_attrs = store.read_vocab(cfg.vocab)
    except KeyError as exc:
        raise ConfigError(str(exc)) from exc
    # a teacher fitted on these scenes would hand their labels (novel classes included) to the network
    check_teacher_corpus(vocab_attrs.get("teacher_corpus"), cfg.store, scene_ids, where="pre-training")
    cfg = _resolve_config(cfg, store, dataset, text_np)
    resolved = to_dict(cfg)
    text = torch.from_numpy(text_np.astype(np.float32)).to(device)

    # --- model, optimiser, and where we start -------------------------------------------------
    loop.seed_everything(cfg.seed)
    loop.set_torch_threads(cfg.threads)
    model = build_network(cfg.network).to(device)
    optimizer = loop.make_optimizer(model, cfg)
    start_step = 0
    if resume and latest is not None:
        start_step = loop.resume_from(latest, model=model, optimizer=optimizer, config=resolved, device=device)
    out_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:  # under torchrun, rank 0 writes the run folder
        (out_dir / CONFIG_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False))
        # the vocabulary travels with the run (semantic head untrained: no supervised classes)
        write_label_space(out_dir, label_space_from_store(store, vocab=cfg.vocab, base_ids=None))

    loader = distributed.make_loader(  # this rank's share of each global batch
        ctx,
        dataset,
        resumed_from=latest if start_step else None,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        start_batch=start_step * cfg.accumulation,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
    )
    batches = iter(loader)
    use_bf16 = cfg.bf16 and device.type == "cuda"
    end_step = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    logger = (MetricsLogger if ctx.is_main else distributed.NullLogger)(  # rank 0 writes the log
        out_dir, total_steps=cfg.steps, start_step=start_step, tensorboard=cfg.tensorboard, progress=cfg.progress,
        description="pretrain",
    )
    ddp_model = distributed.wrap_model(model, ctx)  # `model` itself for one process
    model.train()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if cfg.deterministic and device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    t_start = time.time()
    last: dict[str, Any] = {}
    first_loss: float | None = None
    saved: Path | None = latest if resume else None
    keys = ("loss", "loss_view", "loss_segment", "loss_kl")

    # --- the loop -----------------------------------------------------------------------------
    with logger, _restore_determinism(was_deterministic, was_warn_only):
        for step in range(start_step, end_step):
            t_step = time.time()
            lr = loop.set_lr(optimizer, step, cfg)
            optimizer.zero_grad(set_to_none=True)
            sums = dict.fromkeys(keys, 0.0)
            data_s, voxels = 0.0, 0
            for _ in range(cfg.accumulation):
                t_data = time.time()
                batch = next(batches).to(device, non_blocking=True)
                data_s += time.time() - t_data
                voxels += batch.coords.shape[0]
                autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
                with autocast:
                    out = ddp_model(SparseTensor(feats=batch.feats, coords=batch.coords))
                # the losses normalise and exponentiate: keep them in float32 whatever autocast did
                terms = pretrain_losses(out.clip.float(), batch, text, cfg)
                if not torch.isfinite(terms["loss"]):
                    raise FloatingPointError(f"step {step + 1}: non-finite loss {terms} on scenes {batch.scene_ids}")
                (terms["loss"] / cfg.accumulation).backward()
                for key in sums:
                    sums[key] += float(terms[key].detach()) / cfg.accumulation
            grad_norm = loop.clip_gradients(model, cfg.grad_clip)
            optimizer.step()

            done = step + 1
            sums, voxels = distributed.mean_over_ranks(sums, ctx), int(distributed.all_reduce_sum([voxels], ctx)[0])
            first_loss = sums["loss"] if first_loss is None else first_loss
            last = {"lr": lr, **sums, "grad_norm": float(grad_norm), "voxels": voxels,
                    "data_s": round(data_s, 4), "step_s": round(time.time() - t_step, 4), "world_size": ctx.world_size}
            saved = loop.log_and_checkpoint(
                cfg, done, last, start_step=start_step, logger=logger, out_dir=out_dir, model=model,
                optimizer=optimizer, config=resolved, extra={"metrics": last, "world_size": ctx.world_size},
            ) or saved

    return {
        **loop.run_summary(
            out_dir, start_step=start_step, end_step=end_step, first_loss=first_loss, last=last,
            loss_keys=keys, seconds=time.time() - t_start, checkpoint=saved, device=device,
        ),
        "parameters": sum(p.numel() for p in model.parameters()),
        "scenes": len(dataset),
        "voxel_size_m": dataset.voxel_size,
        "world_size": ctx.world_size,
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
