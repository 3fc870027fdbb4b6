"""Hierarchical vision-language pre-training: the 3D network learns to see what CLIP sees.

Reads the store (points, over-segments, visible lists and CLIP embeddings through
:class:`ws3d_train.data.dataset.SceneDataset`, and the text embeddings of a vocabulary) and writes a run
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

`pretrain` hands its data, resolved config and losses to the step skeleton
(:func:`ws3d_train.train.loop.train`). Resuming is exact: model, optimiser, RNG states and the data
position (batches consumed) come back from the checkpoint, and the data order and augmentation are
functions of (seed, epoch, scene), so 2 steps + resume + 2 steps equal 4 steps bit for bit on a CPU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import schema
from pipeline.config import ConfigError, from_dict
from pipeline.store import Store
from pipeline.teacher.folder import check_teacher_corpus
from ws3d_train.checkpoint import load_checkpoint
from ws3d_train.data.batch import Batch
from ws3d_train.data.dataset import SceneDataset
from ws3d_train.network import MinkUNet, NetworkConfig, build_network
from ws3d_train.run import label_space_from_store, resolve_scene_ids, write_label_space
from ws3d_train.train import loop
from ws3d_train.train.losses import distill_kl, segment_cosine, segment_mean, view_infonce

__all__ = [
    "PretrainConfig",
    "load_pretrained",
    "pretrain",
    "pretrain_losses",
]


@dataclass(frozen=True)
class PretrainConfig(loop.LoopConfig):
    """Pre-training (``ws3d pretrain``) on a store with ingest, overseg, render and embed done; the
    vocabulary's text embeddings are what the KL term distils over. Loop control (store, scenes,
    data, network, optimiser, schedule, checkpoints, device) is in :class:`ws3d_train.train.loop.LoopConfig`.
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
    return loop.train(cfg, out_dir, lambda ctx, device: _recipe(cfg, device), resume=resume, stop_at=stop_at)


def _recipe(cfg: PretrainConfig, device: torch.device) -> loop.Recipe:
    """The data, the resolved config and the losses of pre-training."""
    store = Store.open(cfg.store)
    scene_ids = resolve_scene_ids(store, cfg.scenes)  # a split name (train, ...) or a file, as fine-tuning takes
    dataset = SceneDataset(cfg.store, scene_ids, cfg=cfg.data, split="train", seed=cfg.seed)
    try:
        text_np, vocab_attrs = store.read_vocab(cfg.vocab)
    except KeyError as exc:
        raise ConfigError(str(exc)) from exc
    # a teacher fitted on these scenes would hand their labels (novel classes included) to the network
    check_teacher_corpus(vocab_attrs.get("teacher_corpus"), cfg.store, scene_ids, where="pre-training")
    cfg = _resolve_config(cfg, store, dataset, text_np)
    text = torch.from_numpy(text_np.astype(np.float32)).to(device)

    def losses(out: Any, batch: Batch, step: int, micro: int) -> dict[str, torch.Tensor]:
        # the losses normalise and exponentiate: keep them in float32 whatever autocast did
        return pretrain_losses(out.clip.float(), batch, text, cfg)

    return loop.Recipe(
        cfg=cfg, dataset=dataset, build_model=lambda: build_network(cfg.network), losses=losses,
        loss_keys=("loss", "loss_view", "loss_segment", "loss_kl"),
        # the vocabulary travels with the run (semantic head untrained: no supervised classes)
        write_run_files=lambda out_dir: write_label_space(out_dir, label_space_from_store(store, vocab=cfg.vocab, base_ids=None)),
        description="pretrain", deterministic=cfg.deterministic,
        summary={"scenes": len(dataset), "voxel_size_m": dataset.voxel_size},
    )


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
