"""2D fusion: the teacher's image features projected onto points, with no 3D training.

What OpenScene calls 2D fusion, with the features this project stores: every over-segment's
CLIP embedding (`clip/segment`, cut from the views where the pixel->point maps show it best) is
compared with the text embedding of each class, and its points take the nearest class. Points of
segments no view showed take the mean embedding of the views whose visible lists hold them (and a
point no view shows, the scene's mean view embedding). Nothing is learnt: the row says what the
2D teacher alone knows. Two users:

- the 2D-fusion baseline (:func:`ws3d_train.infer.evaluate.evaluate_fusion`): these features alone;
- the 2D-3D ensemble (OpenScene, Peng et al. CVPR 2023, sec. 3.3): per point, the 3D network's
  CLIP-space feature or the fused 2D one, whichever is more confident (higher best cosine to the
  vocabulary) -- :func:`ensemble_features`. It reads the scene's own images at inference time
  (as CLIP would), never a label.

Reads: overseg/segment, views/visible_ptr, views/visible_ids, clip/view, clip/segment,
clip/segment_seen. Writes nothing.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline import schema
from pipeline.config import ConfigError
from pipeline.store import Store
import torch

__all__ = ["ensemble_features", "fuse_point_embeddings", "fuse_scene", "fused_embeddings"]


def fuse_point_embeddings(
    segment: np.ndarray, segment_embed: np.ndarray, segment_seen: np.ndarray,
    visible_ptr: np.ndarray, visible_ids: np.ndarray, view_embed: np.ndarray,
) -> np.ndarray:
    """A unit CLIP embedding per point from the 2D features (pure core).

    Args:
        segment: int [N] segment per point (-1 = none); segment_embed: [S, D]; segment_seen: [S] bool.
        visible_ptr: int [V+1], visible_ids: int [M] (CSR of the points each view shows).
        view_embed: [V, D] view embeddings.
    Returns:
        float32 [N, D] unit embeddings.
    """
    N, D = len(segment), segment_embed.shape[1]
    view_embed = view_embed.astype(np.float32)
    out = np.zeros((N, D), np.float32)
    counts = np.zeros(N, np.float32)
    # the views showing each point (fallback for points of unseen segments)
    view_of = np.repeat(np.arange(len(visible_ptr) - 1), np.diff(visible_ptr))
    np.add.at(out, visible_ids, view_embed[view_of])
    np.add.at(counts, visible_ids, 1.0)
    scene_mean = view_embed.mean(axis=0) if len(view_embed) else np.zeros(D, np.float32)
    out[counts == 0] = scene_mean
    seen = (segment >= 0) & segment_seen[np.clip(segment, 0, None)].astype(bool)
    out[seen] = segment_embed[segment[seen]].astype(np.float32)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norm, 1e-8)


def fused_embeddings(store: Store, scene_id: str) -> np.ndarray:
    """float32 [N, D] unit 2D-fusion embedding of every point of a scene (see the module docstring).

    Raises:
        ConfigError naming the scene and the missing arrays (run overseg, render and embed first).
    """
    missing = [spec.name for spec in (schema.CLIP_SEGMENT, schema.CLIP_VIEW, schema.VISIBLE_PTR, schema.SEGMENT)
               if not store.has(scene_id, spec)]
    if missing:
        raise ConfigError(f"{store.path}: scene {scene_id} lacks {missing}; run overseg, render and embed first")
    return fuse_point_embeddings(
        store.read(scene_id, schema.SEGMENT).astype(np.int64), store.read(scene_id, schema.CLIP_SEGMENT),
        store.read(scene_id, schema.CLIP_SEGMENT_SEEN).astype(bool), store.read(scene_id, schema.VISIBLE_PTR),
        store.read(scene_id, schema.VISIBLE_IDS).astype(np.int64), store.read(scene_id, schema.CLIP_VIEW),
    )


def fuse_scene(store: Store, scene_id: str, text: np.ndarray, candidates: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class [N], score [N] (softmax at CLIP's 100x logit scale), embedding [N, D]) of one scene."""
    embed = fused_embeddings(store, scene_id)
    keep = np.asarray(sorted(candidates), np.int64)
    logits = 100.0 * embed @ text[keep].astype(np.float32).T
    logits -= logits.max(axis=1, keepdims=True)
    prob = np.exp(logits)
    prob /= prob.sum(axis=1, keepdims=True)
    local = prob.argmax(axis=1)
    return keep[local], prob[np.arange(len(local)), local], embed


def ensemble_features(feat_3d: torch.Tensor, feat_2d: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenScene's 2D-3D ensemble: per row, the unit feature whose best cosine to `text` is higher.

    Args:
        feat_3d: [N, D] the 3D network's CLIP-space output (any norm).
        feat_2d: [N, D] fused 2D embeddings (any norm).
        text: [C, D] text embeddings of the classes that may be predicted.
    Returns:
        ([N, D] unit features, [N] bool: True where the 2D feature was taken).
    """
    if feat_2d.shape[1] != feat_3d.shape[1] or text.shape[1] != feat_3d.shape[1]:
        raise ConfigError(f"the store's 2D features are {feat_2d.shape[1]}-d but the run's CLIP head is "
                          f"{feat_3d.shape[1]}-d: the store was embedded by another CLIP model than the run "
                          "(re-run `ws3d embed` with the run's model, or leave out --ensemble-2d)")
    a = torch.nn.functional.normalize(feat_3d.float(), dim=1)
    b = torch.nn.functional.normalize(feat_2d.to(a.device).float(), dim=1)
    t = torch.nn.functional.normalize(text.to(a.device).float(), dim=1)
    take_2d = (b @ t.T).max(dim=1).values > (a @ t.T).max(dim=1).values
    return torch.where(take_2d[:, None], b, a), take_2d
