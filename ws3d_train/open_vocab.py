"""Open-vocabulary classification with the CLIP-space head, and its combination with the semantic head.

Pure torch, no I/O: the evaluation, ``ws3d predict`` and ``ws3d query`` pass per-point head
outputs and the text embeddings of a vocabulary (read from the store's ``vocab/`` group).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["classify_open_vocab", "combine_heads"]


def classify_open_vocab(clip_feat: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between each point's CLIP-space feature and each class's text embedding.

    Args:
        clip_feat: [N, D] CLIP-space head output.
        text: [C, D] text embeddings of any vocabulary.

    Returns:
        [N, C] cosine logits in [-1, 1] (divide by a temperature before a softmax; see
        :func:`combine_heads`).
    """
    if clip_feat.shape[-1] != text.shape[-1]:
        raise ValueError(f"feature width {clip_feat.shape[-1]} != text width {text.shape[-1]}")
    text = text.to(device=clip_feat.device, dtype=clip_feat.dtype)
    return F.normalize(clip_feat, dim=-1) @ F.normalize(text, dim=-1).T


def combine_heads(
    semantic_logits: torch.Tensor,
    clip_logits: torch.Tensor,
    base_ids: Sequence[int],
    novel_ids: Sequence[int],
    *,
    mode: Literal["calibrated", "clip"] = "calibrated",
    novel_bias: float = 0.0,
    clip_temperature: float = 0.01,
) -> torch.Tensor:
    """Scores over the whole vocabulary from the semantic head (base) and the CLIP head (all).

    The CLIP head ranks every class but was never told the base classes apart as sharply as the
    semantic head, which knows only the base classes. With ``q = softmax(clip_logits /
    clip_temperature)`` over all C classes (0.01 is CLIP's own logit scale of 100):

    - ``mode="calibrated"`` (default): the CLIP head decides how much probability goes to the base
      group, ``m = sum_{c in base} q_c``, and the semantic head splits that mass among the base
      classes: ``s_c = m * softmax(semantic_logits)_c`` for base c, ``s_c = q_c`` for novel c. The
      scores stay a distribution over all C classes.
    - ``mode="clip"``: ``s = q``, the CLIP head alone (the semantic head is unused).

    Then calibrated stacking (Chao et al., ECCV 2016): the returned log-scores are
    ``log s_c + novel_bias`` for novel classes and ``log s_c`` for base ones, i.e. a margin is
    subtracted from the base scores. Fine-tuning on base classes biases both heads towards them;
    a positive ``novel_bias`` (chosen on validation data) counteracts that, 0 leaves it.
    The prediction is ``argmax`` over the last dimension.

    Args:
        semantic_logits: [N, Cb] logits of the semantic head, column k for class ``base_ids[k]``;
            or [N, C] over the whole vocabulary, in which case the base columns are selected.
        clip_logits: [N, C] cosine logits of the CLIP head (:func:`classify_open_vocab`).
        base_ids: class ids (columns of ``clip_logits``) with labels during fine-tuning.
        novel_ids: the other class ids; base and novel must partition ``range(C)``.
        mode: ``"calibrated"`` or ``"clip"``.
        novel_bias: calibrated-stacking margin added to novel log-scores.
        clip_temperature: temperature of the CLIP softmax.

    Returns:
        [N, C] log-scores.
    """
    num_classes = clip_logits.shape[1]
    base = torch.as_tensor(list(base_ids), dtype=torch.long, device=clip_logits.device)
    novel = torch.as_tensor(list(novel_ids), dtype=torch.long, device=clip_logits.device)
    both = torch.cat([base, novel])
    if both.numel() != num_classes or not torch.equal(torch.sort(both).values, torch.arange(num_classes, device=both.device)):
        raise ValueError(f"base_ids and novel_ids must partition range({num_classes})")
    log_q = F.log_softmax(clip_logits.float() / clip_temperature, dim=1)
    if mode == "clip":
        out = log_q
    elif mode == "calibrated":
        sem = semantic_logits.float()
        if sem.shape[1] == num_classes and num_classes != base.numel():
            sem = sem[:, base]
        if sem.shape != (clip_logits.shape[0], base.numel()):
            raise ValueError(
                f"semantic_logits must be [N, {base.numel()}] (base) or [N, {num_classes}]; got {tuple(semantic_logits.shape)}"
            )
        log_base_mass = torch.logsumexp(log_q[:, base], dim=1, keepdim=True)
        out = log_q.clone()
        out[:, base] = log_base_mass + F.log_softmax(sem, dim=1)
    else:
        raise ValueError(f"mode must be 'calibrated' or 'clip'; got {mode!r}")
    if novel_bias != 0.0 and novel.numel():
        out[:, novel] = out[:, novel] + novel_bias
    return out
