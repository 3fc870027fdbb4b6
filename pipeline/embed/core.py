"""The embed stage's pure core: CLIP embeddings of one scene's rendered views and over-segments.

Scene level: one embedding per rendered view (the whole view, padded to a square by default).
Object level: for every over-segment, the `views_per_segment` views where it shows the most
pixels (at least `min_pixels`), square crops of its pixel box at several context `scales`,
embedded and averaged with weights (pixel counts) into one unit embedding, plus a seen flag
(`pipeline.clip.crops`). `embed_scene` does one scene with a loaded encoder; `_SceneWork` lets
the stage's cross-scene path (`pipeline.embed.stage.embed_scenes`) share encoder batches between
scenes. No I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from pipeline.clip.crops import SegmentCrops, extract_crops, pool_segments, segment_crops
from pipeline.clip.model import ClipEncoder
from pipeline.embed.config import EmbedConfig


def batch_size(cfg: EmbedConfig, encoder: ClipEncoder) -> int:
    """Images per forward pass: the config's, else 512 on a GPU and 64 on a CPU."""
    if cfg.batch_size > 0:
        return cfg.batch_size
    return 512 if encoder.device.type == "cuda" else 64


@dataclass
class SceneEmbedding:
    """What `embed_scene` computes for one scene."""

    view: np.ndarray
    """float32 [V, D] unit embedding per view."""
    segment: np.ndarray
    """float32 [S, D] unit embedding per segment (zero where unseen)."""
    seen: np.ndarray
    """bool [S]."""
    crops: int
    """Number of crops embedded."""


@dataclass
class _SceneWork:
    """One scene's images on their way through a (possibly shared) encoder batch."""

    scene_id: str
    views: torch.Tensor  # [V, 3, H, W] normalised, on the encoder's device
    view_pixels: torch.Tensor  # [V, 3, S, S] model input of the whole views
    crops: SegmentCrops
    num_segments: int
    outputs: list[torch.Tensor] = field(default_factory=list)
    config_hash: str = ""
    start: float = 0.0
    produced: bool = False  # all of its images have been handed to the encoder

    @property
    def total(self) -> int:
        return len(self.view_pixels) + len(self.crops.segment)

    @property
    def received(self) -> int:
        return sum(len(o) for o in self.outputs)

    def pixel_chunks(self, encoder: ClipEncoder, chunk: int, max_supersample: int) -> Iterator[torch.Tensor]:
        """Model inputs in order: whole views, then crops; crops are cut lazily (memory)."""
        for start in range(0, len(self.view_pixels), chunk):
            yield self.view_pixels[start:start + chunk]
        for start in range(0, len(self.crops.segment), chunk):
            sl = slice(start, start + chunk)
            yield extract_crops(
                self.views, self.crops.view[sl], self.crops.box[sl],
                size=encoder.image_size, max_supersample=max_supersample,
            )

    def finish(self, dim: int) -> SceneEmbedding:
        emb = torch.cat(self.outputs) if self.outputs else torch.zeros(0, dim)
        n_views = len(self.view_pixels)
        segment = pool_segments(emb[n_views:], self.crops.segment, self.crops.weight, self.num_segments)
        return SceneEmbedding(
            view=emb[:n_views].cpu().numpy(), segment=segment, seen=self.crops.seen, crops=len(self.crops.segment)
        )


def _prepare(
    scene_id: str, view_rgb: np.ndarray, point_index: np.ndarray, segment: np.ndarray,
    encoder: ClipEncoder, cfg: EmbedConfig, num_segments: int | None,
) -> _SceneWork:
    if view_rgb.ndim != 4 or view_rgb.shape[-1] != 3 or view_rgb.shape[:3] != point_index.shape:
        raise ValueError(f"view rgb {view_rgb.shape} and point_index {point_index.shape} disagree")
    if num_segments is None:
        num_segments = int(segment.max()) + 1 if len(segment) else 0
    crops = segment_crops(
        point_index, segment, num_segments=num_segments, k=cfg.views_per_segment, min_pixels=cfg.min_pixels,
        scales=cfg.scales, min_side=cfg.min_crop_side, weight=cfg.weight,
    )
    views = encoder.to_normalised(view_rgb)
    view_pixels = encoder.fit_square(views, fit=cfg.view_fit)
    return _SceneWork(scene_id, views, view_pixels, crops, num_segments)


def embed_scene(
    view_rgb: np.ndarray,
    point_index: np.ndarray,
    segment: np.ndarray,
    encoder: ClipEncoder,
    cfg: EmbedConfig,
    *,
    num_segments: int | None = None,
) -> SceneEmbedding:
    """Embed one scene's views and segments.

    Args:
        view_rgb: uint8 [V, H, W, 3] rendered views.
        point_index: int32 [V, H, W] point shown by each pixel, -1 = nothing.
        segment: int [N] over-segment of each point, 0..S-1.
        encoder: a loaded CLIP model (`pipeline.clip.model.load_encoder`).
        num_segments: S (default max segment id + 1).
    Returns:
        SceneEmbedding: view [V, D], segment [S, D] (unit, zero where unseen), seen [S].
    """
    work = _prepare("scene", view_rgb, point_index, segment, encoder, cfg, num_segments)
    batch = batch_size(cfg, encoder)
    for pixels in work.pixel_chunks(encoder, batch, cfg.max_supersample):
        work.outputs.append(encoder.encode_pixels(pixels, batch_size=batch))
    return work.finish(encoder.dim)
