"""Region-aware fine-tuning with few labels: the method's second stage.

Reads the store (points, labels, over-segments and, for the alignment term, CLIP segment
embeddings through :class:`ws3d_train.data.labels.FinetuneDataset`; the text embeddings of a
vocabulary), the manifests (scene lists, limited-annotation and open-vocabulary splits, through
:mod:`pipeline.datasets`) and optionally a pre-training checkpoint. Writes a run directory laid out
like pre-training's::

    <out_dir>/config.yaml              the resolved FinetuneConfig
    <out_dir>/metrics.jsonl            one record per logged step (ws3d_train.logging)
    <out_dir>/checkpoints/step_*.pt    every `checkpoint_every` steps and at the end; `extra`
                                       holds class names and the open-vocabulary class ids

The labels the run may see are cut by :mod:`ws3d_train.data.labels` (a limited-annotation budget,
a ratio or all labels; novel and ignored classes of an open-vocabulary split removed); a limited
scene list (``lr1`` ...) restricts the scenes.

The loss of a batch (voxels; every term switchable by its weight, see :class:`FinetuneConfig`):

- ``w_ce`` cross-entropy of the semantic head on labelled voxels;
- ``w_clip_ce`` cross-entropy of the CLIP-space head's cosine logits against the text embeddings
  of the supervised classes (keeps that head a classifier in CLIP space);
- ``w_boundary`` BCE of the boundary network (its own multi-scale decoder branch, see
  :mod:`ws3d_train.network`): semantic edges between labelled voxels (dense in fully labelled
  scenes), region-level edges between labelled segments, optionally the teacher's region-level
  edges, the over-segmentation's geometric boundaries elsewhere as the weakest target
  (:func:`boundary_targets`);
- ``w_energy`` the boundary-aware energy on the prediction that is evaluated (``combine``; over the
  base classes, :func:`evaluated_log_probs`): voxel
  boundary probabilities are aggregated into region-level boundaries on the segment graph; the
  prediction is pulled to agree inside segments and across borders that are not semantic, and
  made confident (low entropy) on the voxels of boundary regions
  (:func:`ws3d_train.train.losses.energy_terms`); its share of the objective is logged;
- ``w_region`` region-level supervised InfoNCE at several decoder stages (``region_stages``): each
  stage's features pooled per segment at its own resolution through its projection head, segment
  labels from their labelled voxels or confident predictions (> ``region_gamma``), the same
  segment in the scene's two augmented copies (``two_copies``) as a positive pair, the same
  ``region_tau`` at every stage;
- ``w_align`` the pre-training object-level term (segment cosine against CLIP segment
  embeddings), so that fine-tuning does not wash out what the CLIP head knows about novel classes.

`finetune` hands its data, resolved config and :func:`finetune_losses` to the step skeleton
(:func:`ws3d_train.train.loop.train`): pre-training's conventions (AdamW, warm-up + cosine,
clipping, bf16 autocast on CUDA only, accumulation, checkpoints, exact resume, JSONL metrics).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline.config import ConfigError, from_dict
from pipeline.schema import IGNORE_INDEX
from pipeline.store import Store
from pipeline.teacher.folder import check_teacher_corpus
from ws3d_train.checkpoint import load_checkpoint
from ws3d_train.data.batch import Batch
from ws3d_train.data.dataset import DataConfig, drop_unlabelled
from ws3d_train.data.labels import FinetuneDataset, collate_copies, parse_label_budget
from ws3d_train.network import DECODER_STRIDES, NetworkConfig, NetworkOutput, build_network
from ws3d_train.open_vocab import classify_open_vocab, combine_heads
from ws3d_train.run import find_checkpoint, label_space_from_store, resolve_ov_split, resolve_scene_ids, write_label_space
from ws3d_train.train import loop
from ws3d_train.train.losses import (
    boundary_bce,
    energy_terms,
    region_boundary_targets,
    region_contrast_pooled,
    segment_cosine,
    segment_mean,
    segment_pseudo_labels,
    stage_segment_mean,
    supervised_ce,
    voxel_neighbour_edges,
)
from ws3d_train.train.pretrain import load_pretrained

__all__ = ["LOSS_KEYS", "FinetuneConfig", "boundary_targets", "evaluated_log_probs", "finetune", "finetune_losses",
           "label_boundary"]


@dataclass(frozen=True)
class FinetuneConfig(loop.LoopConfig):
    """Fine-tuning with few labels (``ws3d finetune``) on a store with ingest and overseg done (render
    and embed too for ``w_align``). Loop control (store, data, network, optimiser, schedule,
    checkpoints, device) is in :class:`ws3d_train.train.loop.LoopConfig`; the fields re-declared here
    differ from it in default or meaning. Network sizes follow the init checkpoint (or, from
    scratch, the data: see `finetune`)."""

    scenes: str | None = None
    """Training scenes: a split name of the store's dataset in data_manifests/ (e.g. ``train``)
    or a file listing scene ids; None: every scene of the store."""
    limited_scenes: str | None = None
    """Limited reconstructions: a manifest split (``lr1``, ``lr5`` ...) or a file; only scenes in
    both this list and `scenes` are used. None: no restriction."""
    init: str | None = None
    """A pre-training run directory (its latest checkpoint) or a checkpoint file to start from;
    None: train from scratch."""
    labels: str | float = "la20"
    """Label budget: ``la20``/``la50``/``la100``/``la200`` (or a count) labelled points per scene,
    a ratio of each scene's labelled points (``0.01``), or ``all``."""
    label_seed: int = 0
    """Seed of the deterministic choice of labelled points (ignored with `official_labels`)."""
    official_labels: str | None = None
    """An official limited-annotation file (torch.load-able dict scene -> point indices) used
    instead of the seeded choice."""
    ov_split: str | None = None
    """Open-vocabulary split: a manifest name (``b15n4`` ...) or ``novel=name,name[;ignored=name]``
    (every other class is base). Novel and ignored classes lose their labels. None: every class is supervised."""
    vocab: str = "classes"
    """Store vocabulary whose text embeddings the CLIP-head cross-entropy uses (row c = class c)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Voxel size (None: the init checkpoint's, else 2 cm indoor / 5 cm outdoor), crop,
    augmentation. Only ``overseg`` is read, plus ``views`` and ``clip`` when `w_align` > 0."""
    network: NetworkConfig = field(default_factory=NetworkConfig)
    """The network when training from scratch; with `init` the checkpoint's network is used."""
    steps: int = 5_000
    """Optimiser steps in all (fine-tuning is shorter than pre-training)."""
    warmup_steps: int = 200
    """Linear warm-up steps before the cosine decay."""
    two_copies: bool = True
    """Feed two differently augmented copies of every scene (a micro-batch of `batch_size` scenes
    then holds each twice); the same segment in both copies is a positive pair of the region
    contrast (and every other term sees both copies)."""
    w_ce: float = 1.0
    """Weight of the semantic-head cross-entropy on labelled voxels (0 switches it off)."""
    w_clip_ce: float = 1.0
    """Weight of the CLIP-head cross-entropy over the supervised classes' text embeddings."""
    clip_temperature: float = 0.07
    """Temperature of the CLIP-head cosine logits in `w_clip_ce`."""
    w_boundary: float = 1.0
    """Weight of the boundary network's BCE (`loss_boundary`). Its targets, strongest first: semantic
    edges between labelled voxels (6-neighbours with two labels: dense where scenes are fully
    labelled), region-level edges between labelled segments (`boundary_region_weight`), the
    teacher's region-level edges (`boundary_teacher_weight`), the over-segmentation's geometric
    boundaries elsewhere (`boundary_geometric_weight`)."""
    boundary_region_weight: float = 1.0
    """Weight of region-level targets: at the interface of two adjacent segments that both hold
    labelled voxels, 1 where their (majority) labels differ, 0 where they agree."""
    boundary_teacher_weight: float = 0.0
    """Weight of the teacher's region-level targets (needs the `clip` data group): at the interface
    of two adjacent segments seen by the teacher, the probability that their teacher class
    distributions over the run's vocabulary (base and novel names; no 3D label) differ,
    ``1 - sum_c q_a(c) q_b(c)``. 0 switches them off."""
    boundary_geometric_weight: float = 0.2
    """Weight of the geometric targets (1 on over-segment borders, 0 inside) where nothing above says."""
    boundary_pos_weight: float | None = None
    """Optional weight of positive boundary targets (boundaries are a minority); None: 1."""
    w_energy: float = 0.1
    """Weight of the boundary-aware energy (`loss_energy`, its share of the objective logged as
    `share_energy`): agreement of the evaluated prediction inside regions and across borders the
    boundary network calls non-semantic, plus `energy_confidence_weight` times its entropy on the
    voxels of boundary regions (:func:`ws3d_train.train.losses.energy_terms`)."""
    energy_confidence_weight: float = 1.0
    """Weight of the confidence (entropy at boundary regions) part inside the energy."""
    combine: Literal["calibrated", "clip"] = "calibrated"
    """The prediction that is evaluated (and that the energy acts on, over the base classes): ``calibrated`` (the CLIP head
    decides base vs novel mass, the semantic head splits the base mass) or ``clip`` (the CLIP head
    alone); without an open-vocabulary split, ``calibrated`` is the semantic head. `ws3d eval` and
    `ws3d predict` use the run's rule unless told otherwise. Chosen on a dev split of training rooms."""
    w_region: float = 0.1
    """Weight of the region-level contrastive loss."""
    region_gamma: float = 0.9
    """Confidence (mean max probability) above which an unlabelled segment takes its prediction."""
    region_tau: float = 0.1
    """InfoNCE temperature of the region contrast (the same at every stage)."""
    region_stages: tuple[int, ...] = (8, 4, 2, 1)
    """Decoder stages (by tensor stride) whose features are pooled per segment at their own
    resolution and contrasted, each through its projection head; the loss is their mean.
    ``[1]`` is the single-stage version (the last decoder stage only)."""
    region_embedding: Literal["projection", "feats", "clip"] = "projection"
    """What segments pool: each stage's projection head (``projection``), or, single-stage only,
    the last decoder features (``feats``, the earlier single-stage contrast) or the CLIP head."""
    region_max_segments: int = 2048
    """Physical segments per batch in the region contrast (O(S^2) memory); more are subsampled
    (both copies of a chosen segment are kept)."""
    w_align: float = 0.0
    """Weight of the segment-to-CLIP cosine alignment kept from pre-training (needs the `clip`
    data group); 0 switches it off."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.region_stages or not set(self.region_stages) <= set(DECODER_STRIDES):
            raise ValueError(f"FinetuneConfig.region_stages must be a non-empty subset of {DECODER_STRIDES}, got {self.region_stages}")
        object.__setattr__(self, "region_stages", tuple(int(v) for v in self.region_stages))
        if self.region_embedding != "projection" and self.region_stages != (1,):
            raise ValueError(f"FinetuneConfig.region_embedding={self.region_embedding!r} pools the last stage only: "
                             "set region_stages=[1]")
        for name in ("boundary_region_weight", "boundary_teacher_weight", "boundary_geometric_weight",
                     "energy_confidence_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"FinetuneConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.region_max_segments < 1:
            raise ValueError(f"FinetuneConfig.region_max_segments must be >= 1, got {self.region_max_segments}")
        weights = ("w_ce", "w_clip_ce", "w_boundary", "w_energy", "w_region", "w_align")
        negative = [w for w in weights if getattr(self, w) < 0]
        if negative:
            raise ValueError(f"FinetuneConfig loss weights must be >= 0: {negative}")
        if all(getattr(self, w) == 0 for w in weights):
            raise ValueError("FinetuneConfig: every loss weight is 0, nothing to train")
        if not 0.0 <= self.region_gamma <= 1.0:
            raise ValueError(f"FinetuneConfig.region_gamma must lie in [0, 1], got {self.region_gamma}")
        for name in ("region_tau", "clip_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"FinetuneConfig.{name} must be > 0, got {getattr(self, name)}")
        parse_label_budget(self.labels)  # raises on a malformed budget


# ---------------------------------------------------------------------------------------------
# losses of one batch


def label_boundary(labels: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Semantic boundaries as far as labels show them.

    Args:
        labels: [Nv] int64 voxel labels, IGNORE_INDEX where unknown.
        edges: [E, 2] int64 neighbouring voxel pairs.

    Returns:
        [Nv] int64: 1 where a labelled voxel has a labelled neighbour with another label, 0 where
        it has labelled neighbours all of its own label, -1 (unknown) elsewhere.
    """
    out = torch.full_like(labels, -1, dtype=torch.long)
    if edges.numel() == 0:
        return out
    i, j = edges[:, 0].long(), edges[:, 1].long()
    both = (labels[i] != IGNORE_INDEX) & (labels[j] != IGNORE_INDEX)
    i, j = i[both], j[both]
    out[i] = 0
    out[j] = 0
    differ = labels[i] != labels[j]
    out[i[differ]] = 1
    out[j[differ]] = 1
    return out


def _segment_keys(batch: Batch, num_scenes: int) -> torch.Tensor:
    """[S] int64 identity of each segment's physical segment: equal across copies of a scene."""
    stride = int(batch.segment_orig.max()) + 1 if batch.segment_orig.numel() else 1
    return (batch.segment_batch % num_scenes) * stride + batch.segment_orig


def _subsample_segments(
    seg: torch.Tensor, seg_label: torch.Tensor, seg_key: torch.Tensor, max_keys: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep at most ``max_keys`` physical segments (all copies of each), chosen at random."""
    keys, inverse = torch.unique(seg_key, return_inverse=True)
    if keys.numel() <= max_keys:
        return seg, seg_label, seg_key
    chosen_keys = torch.zeros(keys.numel(), dtype=torch.bool)
    chosen_keys[torch.randperm(keys.numel(), generator=generator)[:max_keys]] = True
    keep = chosen_keys.to(seg_key.device)[inverse]
    lut = torch.full((seg_key.numel() + 1,), -1, dtype=torch.long, device=seg.device)
    lut[:-1][keep] = torch.arange(int(keep.sum()), device=seg.device)
    return lut[seg], seg_label[keep], seg_key[keep]  # seg == -1 -> lut[-1] == -1


LOSS_KEYS = ("loss", "loss_ce", "loss_clip_ce", "loss_boundary", "loss_energy", "loss_energy_agreement",
             "loss_energy_confidence", "loss_region", "loss_align", "share_boundary", "share_energy", "share_region")
"""What `metrics.jsonl` logs of each fine-tuning step (``loss`` first)."""

TEACHER_TEMPERATURE = 0.01
"""Softmax temperature of class distributions over text embeddings (CLIP's logit scale of 100, as
in :func:`ws3d_train.open_vocab.combine_heads`): the teacher's boundary targets, the CLIP head's
prediction in the energy."""


def boundary_targets(
    batch: Batch,
    labels: torch.Tensor,
    edges: torch.Tensor,
    cfg: FinetuneConfig,
    *,
    text_vocab: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-voxel targets and weights of the boundary network, the strongest source winning.

    1. geometric: 1 on over-segment borders, 0 inside, weight ``boundary_geometric_weight``;
    2. the teacher's region-level edges (``boundary_teacher_weight`` > 0 and ``text_vocab`` given):
       on the interface voxels of two adjacent segments both seen by the teacher, ``1 - sum_c
       q_a(c) q_b(c)`` with q the softmax of the segments' CLIP embeddings against the vocabulary
       (temperature :data:`TEACHER_TEMPERATURE`); no 3D label is used;
    3. region-level edges of labelled segments (``boundary_region_weight``): at the interface of
       two adjacent segments that both hold labelled voxels, whether their majority labels differ;
    4. semantic edges of labelled voxels (:func:`label_boundary`), weight 1.

    Args:
        batch: the batch (``voxel_segment``, ``voxel_boundary``, ``segment_target``, ``segment_seen``).
        labels: [Nv] int64 masked voxel labels.
        edges: [E, 2] int64 neighbouring voxel pairs.
        cfg: the weights.
        text_vocab: [K, D] text embeddings of the run's vocabulary (base and novel names).

    Returns:
        ``(target [Nv] float in [0, 1], weight [Nv] float >= 0)``.
    """
    device = labels.device
    target = batch.voxel_boundary.to(device=device, dtype=torch.float32)
    weight = torch.full_like(target, float(cfg.boundary_geometric_weight))
    seg = batch.voxel_segment.long()
    num_segments = batch.num_segments
    if cfg.boundary_teacher_weight > 0 and text_vocab is not None and num_segments and edges.numel():
        seen = batch.segment_seen.bool()
        with torch.autocast(device_type=device.type, enabled=False):
            q = torch.softmax(classify_open_vocab(batch.segment_target.float(), text_vocab.float()) / TEACHER_TEMPERATURE, dim=1)
        i, j = edges[:, 0], edges[:, 1]
        si, sj = seg[i], seg[j]
        ok = (si != sj) & (si >= 0) & (sj >= 0)
        ok &= seen[si.clamp(min=0)] & seen[sj.clamp(min=0)]
        differ = 1.0 - (q[si[ok]] * q[sj[ok]]).sum(dim=1)
        teacher = torch.full_like(target, -1.0)
        for side in (i[ok], j[ok]):
            teacher = teacher.scatter_reduce(0, side, differ, reduce="amax", include_self=True)
        known = teacher >= 0
        target = torch.where(known, teacher, target)
        weight = torch.where(known, torch.full_like(weight, float(cfg.boundary_teacher_weight)), weight)
    if cfg.boundary_region_weight > 0 and num_segments:
        seg_label = _segment_majority(seg, labels, num_segments)
        region = region_boundary_targets(seg_label, seg, edges, num_segments)
        known = region >= 0
        target = torch.where(known, region.to(target.dtype), target)
        weight = torch.where(known, torch.full_like(weight, float(cfg.boundary_region_weight)), weight)
    voxel = label_boundary(labels, edges)
    known = voxel >= 0
    target = torch.where(known, voxel.to(target.dtype), target)
    weight = torch.where(known, torch.ones_like(weight), weight)
    return target, weight


def _segment_majority(seg: torch.Tensor, labels: torch.Tensor, num_segments: int) -> torch.Tensor:
    """[S] int64 majority label of each segment's labelled voxels, IGNORE_INDEX where none."""
    keep = (seg >= 0) & (labels != IGNORE_INDEX)
    if not bool(keep.any()):
        return torch.full((num_segments,), IGNORE_INDEX, dtype=torch.long, device=seg.device)
    num_classes = int(labels[keep].max()) + 1
    votes = torch.bincount(seg[keep] * num_classes + labels[keep], minlength=num_segments * num_classes)
    votes = votes.view(num_segments, num_classes)
    return torch.where(votes.sum(dim=1) > 0, votes.argmax(dim=1), torch.full((num_segments,), IGNORE_INDEX, dtype=torch.long, device=seg.device))


def evaluated_log_probs(out: NetworkOutput, text: torch.Tensor, base_ids: torch.Tensor, combine: str) -> torch.Tensor:
    """[Nv, Cb] log-probabilities over the base classes (in id order) of the prediction that is
    evaluated: how it ranks the classes labels supervise.

    ``calibrated`` (:func:`ws3d_train.open_vocab.combine_heads`): the base classes' share of the
    prediction is the CLIP head's base mass times the semantic head's softmax, so over the base
    classes it is the semantic head's softmax; ``clip``: the CLIP head's softmax over the base
    classes' text embeddings (at CLIP's logit scale, as the prediction). Where the prediction is a
    base class, it is this distribution's argmax. The novel classes are left out: no label says
    anything about them, and an entropy over them made the CLIP head confident on a novel class
    wherever it leaned that way (docs/benchmarks.md).
    """
    with torch.autocast(device_type=out.semantic.device.type, enabled=False):
        if combine == "calibrated":
            return torch.log_softmax(out.semantic.float()[:, base_ids], dim=1)
        if combine == "clip":
            clip_logits = classify_open_vocab(out.clip.float(), text[base_ids].float())
            return torch.log_softmax(clip_logits / TEACHER_TEMPERATURE, dim=1)
    raise ValueError(f"combine must be 'calibrated' or 'clip', got {combine!r}")


def finetune_losses(
    out: NetworkOutput,
    batch: Batch,
    text: torch.Tensor,
    cfg: FinetuneConfig,
    *,
    supervised_ids: torch.Tensor,
    num_scenes: int,
    novel_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The fine-tuning terms, their weighted sum and the shares of the weighted terms in it (terms
    with weight 0 are skipped and reported as 0).

    Args:
        out: network outputs per voxel (rows of ``batch.coords``), any float dtype.
        batch: the batch; ``voxel_semantic`` holds the masked labels.
        text: [C, D] text embeddings, row c for class c.
        cfg: weights, temperatures, thresholds.
        supervised_ids: [Cs] int64 classes that may carry labels (base classes; all without a split).
        num_scenes: B, distinct scenes in the batch (copies of a scene share segment keys).
        novel_ids: [Cn] int64 novel classes of the open-vocabulary split (their names, never a
            label: the teacher's boundary targets range over them).
        generator: CPU generator for subsampling segments (deterministic runs).

    Returns:
        ``{"loss", "loss_ce", "loss_clip_ce", "loss_boundary", "loss_energy",
        "loss_energy_agreement", "loss_energy_confidence", "loss_region", "loss_align",
        "share_boundary", "share_energy", "share_region"}`` scalars (a share is the weighted term
        over the total, detached).
    """
    logits = out.semantic.float()
    labels = batch.voxel_semantic
    device = logits.device
    zero = logits.sum() * 0.0
    terms: dict[str, torch.Tensor] = {}
    if novel_ids is None:
        novel_ids = torch.zeros(0, dtype=torch.long, device=device)
    vocab_ids = torch.sort(torch.cat([supervised_ids, novel_ids])).values
    need_edges = cfg.w_boundary > 0 or cfg.w_energy > 0
    edges = voxel_neighbour_edges(batch.coords) if need_edges else None

    terms["loss_ce"] = supervised_ce(logits, labels) if cfg.w_ce > 0 else zero
    if cfg.w_clip_ce > 0:
        lut = torch.full((logits.shape[1],), IGNORE_INDEX, dtype=torch.long, device=labels.device)
        lut[supervised_ids] = torch.arange(supervised_ids.numel(), device=labels.device)
        target = torch.where(labels >= 0, lut[labels.clamp(min=0)], torch.full_like(labels, IGNORE_INDEX))
        with torch.autocast(device_type=logits.device.type, enabled=False):
            clip_logits = classify_open_vocab(out.clip.float(), text[supervised_ids].float()) / cfg.clip_temperature
        terms["loss_clip_ce"] = supervised_ce(clip_logits, target)
    else:
        terms["loss_clip_ce"] = zero
    boundary_logit = out.boundary.float()
    if cfg.w_boundary > 0:
        b_target, b_weight = boundary_targets(batch, labels, edges, cfg, text_vocab=text[vocab_ids])
        terms["loss_boundary"] = boundary_bce(boundary_logit, b_target, b_weight, pos_weight=cfg.boundary_pos_weight)
    else:
        terms["loss_boundary"] = zero
    if cfg.w_energy > 0:
        prob_eval = evaluated_log_probs(out, text, supervised_ids, cfg.combine).exp()
        agreement, confidence = energy_terms(prob_eval, torch.sigmoid(boundary_logit), edges, batch.voxel_segment,
                                             batch.num_segments)
        terms["loss_energy_agreement"], terms["loss_energy_confidence"] = agreement, confidence
        terms["loss_energy"] = agreement + cfg.energy_confidence_weight * confidence
    else:
        terms["loss_energy"] = terms["loss_energy_agreement"] = terms["loss_energy_confidence"] = zero
    if cfg.w_region > 0:
        prob = torch.softmax(logits, dim=1)
        seg = batch.voxel_segment
        seg_label = segment_pseudo_labels(prob, seg, labels, cfg.region_gamma, num_segments=batch.num_segments)
        seg_key = _segment_keys(batch, num_scenes)
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        seg, seg_label, seg_key = _subsample_segments(seg, seg_label, seg_key, cfg.region_max_segments, generator)
        per_stage = []
        for stride in cfg.region_stages:
            k = DECODER_STRIDES.index(stride)
            if cfg.region_embedding == "projection":
                pooled, count = stage_segment_mean(out.region[k].float(), out.stage_index[k], seg, seg_label.shape[0])
            else:
                embed = (out.feats if cfg.region_embedding == "feats" else out.clip).float()
                pooled, count = segment_mean(embed, seg, seg_label.shape[0])
            per_stage.append(region_contrast_pooled(pooled, count > 0, seg_label, seg_key, cfg.region_tau))
        terms["loss_region"] = torch.stack(per_stage).mean()
    else:
        terms["loss_region"] = zero
    if cfg.w_align > 0:
        seg_embed, count = segment_mean(out.clip.float(), batch.voxel_segment, batch.num_segments)
        terms["loss_align"] = segment_cosine(seg_embed, batch.segment_target, batch.segment_seen & (count > 0))
    else:
        terms["loss_align"] = zero
    weighted = {
        "boundary": cfg.w_boundary * terms["loss_boundary"], "energy": cfg.w_energy * terms["loss_energy"],
        "region": cfg.w_region * terms["loss_region"],
    }
    terms["loss"] = (
        cfg.w_ce * terms["loss_ce"] + cfg.w_clip_ce * terms["loss_clip_ce"] + weighted["boundary"]
        + weighted["energy"] + weighted["region"] + cfg.w_align * terms["loss_align"]
    )
    total = terms["loss"].detach().abs().clamp(min=1e-12)
    for name, value in weighted.items():
        terms[f"share_{name}"] = value.detach() / total
    return terms


# ---------------------------------------------------------------------------------------------
# the run


def _network_and_data(cfg: FinetuneConfig, store: Store, clip_dim: int) -> tuple[NetworkConfig, DataConfig, Path | None]:
    """The network config (the init checkpoint's, else cfg.network sized by the data) and the data
    config (voxel size defaulting to the init's)."""
    num_classes = len(store.class_names)
    if cfg.init is None:
        data = cfg.data
        network = dataclasses.replace(cfg.network, in_channels=data.in_channels, num_classes=num_classes, clip_dim=clip_dim)
        return network, data, None
    init_path = find_checkpoint(cfg.init)
    ckpt = load_checkpoint(init_path)
    saved = ckpt["config"]
    network = from_dict(NetworkConfig, saved["network"], where=f"{init_path}:network")
    network = dataclasses.replace(network, num_classes=num_classes)
    data = cfg.data
    if data.voxel_size_m is None and saved.get("data", {}).get("voxel_size_m") is not None:
        data = dataclasses.replace(data, voxel_size_m=float(saved["data"]["voxel_size_m"]))
    if network.in_channels != data.in_channels:
        raise ConfigError(
            f"{init_path}: the network takes {network.in_channels} input channels but data gives "
            f"{data.in_channels} (use_height={data.use_height}); match the pre-training data config"
        )
    if network.clip_dim != clip_dim:
        raise ConfigError(f"{init_path}: CLIP head is {network.clip_dim}-d but the store's vocabulary is {clip_dim}-d")
    return network, data, init_path


def finetune(
    cfg: FinetuneConfig, out_dir: str | Path, *, resume: bool = False, stop_at: int | None = None
) -> dict[str, Any]:
    """Fine-tune a (pre-trained) network with few labels; write config, metrics and checkpoints.

    Args:
        cfg: the config (``cfg.store`` must be set).
        out_dir: the run directory (created).
        resume: continue from the latest checkpoint in ``out_dir`` (from the start when there is none).
        stop_at: stop after this step without saving, as a killed job would; None runs to ``cfg.steps``.

    Returns:
        A summary: steps, first/last losses, wall time, steps/s, last checkpoint, device, scenes,
        the open-vocabulary class ids, the init checkpoint.

    Raises:
        FileExistsError: ``out_dir`` has checkpoints and ``resume`` is False.
        ConfigError: unknown scenes/splits, a checkpoint whose network does not fit the data, or a
            resumed run whose config differs.
        FloatingPointError: a non-finite loss (naming the step and scenes).
    """
    return loop.train(cfg, out_dir, lambda ctx, device: _recipe(cfg, device), resume=resume, stop_at=stop_at)


def _recipe(cfg: FinetuneConfig, device: torch.device) -> loop.Recipe:
    """Scenes, classes, labels, the resolved config and the losses of fine-tuning."""
    store = Store.open(cfg.store)
    class_names = store.class_names
    scene_ids = resolve_scene_ids(store, cfg.scenes)
    if cfg.limited_scenes:
        limited = set(resolve_scene_ids(store, cfg.limited_scenes))
        scene_ids = [s for s in scene_ids if s in limited]
        if not scene_ids:
            raise ConfigError(f"limited_scenes {cfg.limited_scenes!r}: no scene of {cfg.scenes or 'the store'} is in it")
    # a scan without labels (e.g. a test scene) gives the label losses nothing: not trained on
    scene_ids, unlabelled = drop_unlabelled(store, scene_ids, purpose="fine-tuning's label losses")
    split = resolve_ov_split(cfg.ov_split, class_names, store.dataset)
    supervised = list(split.base) if split is not None else list(range(len(class_names)))
    removed = sorted(set(range(len(class_names))) - set(supervised))
    try:
        text_np, vocab_attrs = store.read_vocab(cfg.vocab)
    except KeyError as exc:
        raise ConfigError(str(exc)) from exc
    # a teacher fitted on these scenes would hand their labels (novel classes included) to the network
    check_teacher_corpus(vocab_attrs.get("teacher_corpus"), cfg.store, scene_ids, where="fine-tuning")
    if text_np.shape[0] != len(class_names):
        raise ConfigError(
            f"{cfg.store}: vocabulary {cfg.vocab!r} has {text_np.shape[0]} rows for {len(class_names)} classes; "
            "fine-tuning needs one text embedding per class (the `classes` vocabulary)"
        )
    network_cfg, data_cfg, init_path = _network_and_data(cfg, store, int(text_np.shape[1]))
    # read only what the enabled terms use: a store without render/embed can still be fine-tuned
    needs_clip = cfg.w_align > 0 or (cfg.w_boundary > 0 and cfg.boundary_teacher_weight > 0)
    data_cfg = dataclasses.replace(data_cfg, groups=("overseg", "views", "clip") if needs_clip else ("overseg",))
    dataset = FinetuneDataset(
        cfg.store, scene_ids, cfg=data_cfg, seed=cfg.seed, labels=cfg.labels, label_seed=cfg.label_seed,
        official_file=cfg.official_labels, removed_classes=removed, copies=2 if cfg.two_copies else 1,
    )
    data_cfg = dataclasses.replace(data_cfg, voxel_size_m=dataset.voxel_size)
    cfg = dataclasses.replace(cfg, data=data_cfg, network=network_cfg)
    text = torch.from_numpy(text_np.astype(np.float32)).to(device)
    supervised_ids = torch.tensor(supervised, dtype=torch.long, device=device)
    novel_ids = torch.tensor(list(split.novel) if split is not None else [], dtype=torch.long, device=device)
    run_info = {
        "class_names": list(class_names),
        "base_ids": supervised,
        "novel_ids": list(split.novel) if split is not None else [],
        "ignored_ids": list(split.ignored) if split is not None else [],
        "init": str(init_path) if init_path is not None else None,
    }

    def build_model() -> torch.nn.Module:
        if init_path is not None:
            return load_pretrained(init_path, num_classes=len(class_names))[0]
        return build_network(network_cfg)

    def losses(out: NetworkOutput, batch: Batch, step: int, micro: int) -> dict[str, torch.Tensor]:
        # segment subsampling depends on (seed, step, micro-batch) only: resumable
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 101 + micro)
        return finetune_losses(out, batch, text, cfg, supervised_ids=supervised_ids, novel_ids=novel_ids,
                               num_scenes=batch.num_scenes // (2 if cfg.two_copies else 1), generator=generator)

    def write_run_files(out_dir: Path) -> None:
        write_label_space(out_dir, label_space_from_store(
            store, vocab=cfg.vocab, base_ids=supervised, novel_ids=run_info["novel_ids"],
            ignored_ids=run_info["ignored_ids"], ov_split=cfg.ov_split, extra={"init": run_info["init"]},
        ))

    return loop.Recipe(
        cfg=cfg, dataset=dataset, build_model=build_model, losses=losses,
        loss_keys=LOSS_KEYS,
        write_run_files=write_run_files, description="finetune", collate_fn=collate_copies,
        counters=lambda batch: {"labelled_voxels": int((batch.voxel_semantic != IGNORE_INDEX).sum())},
        checkpoint_extra={"finetune": run_info},
        summary={"scenes": len(dataset), "unlabelled_scenes_skipped": unlabelled, "voxel_size_m": dataset.voxel_size,
                 **run_info},
    )
