"""The embed stage's pure core: CLIP embeddings of one scene's rendered views and over-segments.

Scene level: one embedding per rendered view (the whole view, padded to a square by default).
Object level, two ways (`EmbedConfig.mode`):

- "packed" (the default): every over-segment is read out of the view that shows it best, several
  segments sharing one square crop (`pipeline.clip.crops.pack_crops`), each by a class token
  whose attention is restricted to its own pixels (`ClipEncoder.encode_regions`): one encoder
  image for several segments;
- "crops": for every over-segment the `views_per_segment` views where it shows the most pixels
  (at least `min_pixels`), square crops of its pixel box at several context `scales`, embedded
  and averaged with weights (pixel counts) into one unit embedding (`pipeline.clip.crops.segment_crops`):
  several encoder images for each segment.

Either way a seen flag per segment. `embed_scene` does one scene with a loaded encoder;
`_SceneWork` lets the stage's cross-scene path (`pipeline.embed.stage.embed_scenes`) share
encoder batches between scenes. No I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.clip.crops import extract_crops, pack_crops, pool_segments, region_patch_masks, segment_crops
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
    """Number of segment crops embedded (encoder images besides the V whole views)."""


@dataclass
class Chunk:
    """Encoder input of one batch piece: images and the regions to read out of them."""

    pixels: torch.Tensor
    """float [B, 3, S, S] normalised model input."""
    region_image: np.ndarray
    """int64 [R] image (0..B-1) of each region; empty: the images' own embeddings only."""
    region_mask: np.ndarray
    """float32 [R, G * G] patch shares of each region."""


@dataclass
class _SceneWork:
    """One scene's images on their way through a (possibly shared) encoder batch."""

    scene_id: str
    views: torch.Tensor  # [V, 3, H, W] normalised, on the encoder's device
    view_pixels: torch.Tensor  # [V, 3, S, S] model input of the whole views
    crop_view: np.ndarray  # [K]
    crop_box: np.ndarray  # [K, 4]
    seen: np.ndarray  # [S] bool
    num_segments: int
    # "crops": each crop's own embedding, pooled per segment with weights
    crop_segment: np.ndarray | None = None  # [K]
    crop_weight: np.ndarray | None = None  # [K]
    # "packed": regions read out of crops by masked class tokens, pooled per segment with weights
    region_crop: np.ndarray | None = None  # [R], ordered by crop
    region_segment: np.ndarray | None = None  # [R]
    region_weight: np.ndarray | None = None  # [R]
    region_mask: np.ndarray | None = None  # [R, G * G]
    images_out: list[torch.Tensor] = field(default_factory=list)
    regions_out: list[torch.Tensor] = field(default_factory=list)
    config_hash: str = ""
    start: float = 0.0
    produced: bool = False  # all of its images have been handed to the encoder

    @property
    def packed(self) -> bool:
        return self.region_crop is not None

    @property
    def total(self) -> int:
        return len(self.view_pixels) + len(self.crop_view)

    @property
    def received(self) -> int:
        return sum(len(o) for o in self.images_out)

    def chunks(self, encoder: ClipEncoder, chunk: int, max_supersample: int) -> Iterator[Chunk]:
        """Model inputs in order: whole views, then crops (with their regions); crops are cut
        lazily (memory)."""
        grid = encoder.patch_grid
        none = np.zeros(0, np.int64), np.zeros((0, grid * grid), np.float32)
        for start in range(0, len(self.view_pixels), chunk):
            yield Chunk(self.view_pixels[start:start + chunk], *none)
        for start in range(0, len(self.crop_view), chunk):
            sl = slice(start, start + chunk)
            pixels = extract_crops(
                self.views, self.crop_view[sl], self.crop_box[sl],
                size=encoder.image_size, max_supersample=max_supersample,
            )
            if not self.packed:
                yield Chunk(pixels, *none)
                continue
            lo, hi = np.searchsorted(self.region_crop, [start, start + len(pixels)])
            yield Chunk(pixels, self.region_crop[lo:hi] - start, self.region_mask[lo:hi])

    def finish(self, dim: int) -> SceneEmbedding:
        images = torch.cat(self.images_out) if self.images_out else torch.zeros(0, dim)
        n_views = len(self.view_pixels)
        if self.packed:
            regions = torch.cat(self.regions_out) if self.regions_out else torch.zeros(0, dim)
            segment = pool_segments(regions, self.region_segment, self.region_weight, self.num_segments)
        else:
            segment = pool_segments(images[n_views:], self.crop_segment, self.crop_weight, self.num_segments)
        return SceneEmbedding(view=images[:n_views].cpu().numpy(), segment=segment, seen=self.seen,
                              crops=len(self.crop_view))


def encode_chunk(encoder: ClipEncoder, chunk: Chunk, cfg: EmbedConfig, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embeddings [B, D], region embeddings [R, D]) of one chunk, `batch` images at a time.

    A region's embedding is the renormalised mean of its class token read out at each of
    `cfg.mask_context` (all of them in one forward pass; context 1 is its image's embedding)."""
    if len(chunk.region_image) == 0:
        return encoder.encode_pixels(chunk.pixels, batch_size=batch), torch.zeros(0, encoder.dim, device=encoder.device)
    contexts = [c for c in cfg.mask_context if c < 1.0]
    whole = sum(c >= 1.0 for c in cfg.mask_context)
    images = torch.empty(len(chunk.pixels), encoder.dim, device=encoder.device)
    regions = torch.empty(len(chunk.region_image), encoder.dim, device=encoder.device)
    for lo in range(0, len(chunk.pixels), batch):
        rows = np.flatnonzero((chunk.region_image >= lo) & (chunk.region_image < lo + batch))
        local, mask = chunk.region_image[rows] - lo, chunk.region_mask[rows]
        weights = [mask + c * (1.0 - mask) for c in contexts]
        emb, tokens = encoder.encode_regions(
            chunk.pixels[lo:lo + batch], np.tile(local, len(contexts)),
            np.concatenate(weights) if weights else np.zeros((0, mask.shape[1]), np.float32),
            mask_layers=cfg.mask_layers)
        parts = list(tokens.reshape(len(contexts), len(rows), encoder.dim)) + [emb[torch.as_tensor(local, device=emb.device)]] * whole
        images[lo:lo + len(emb)] = emb
        regions[torch.as_tensor(rows, device=regions.device)] = F.normalize(torch.stack(parts).mean(0), dim=-1)
    return images, regions


def _prepare(
    scene_id: str, view_rgb: np.ndarray, point_index: np.ndarray, segment: np.ndarray,
    encoder: ClipEncoder, cfg: EmbedConfig, num_segments: int | None,
) -> _SceneWork:
    if view_rgb.ndim != 4 or view_rgb.shape[-1] != 3 or view_rgb.shape[:3] != point_index.shape:
        raise ValueError(f"view rgb {view_rgb.shape} and point_index {point_index.shape} disagree")
    if num_segments is None:
        num_segments = int(segment.max()) + 1 if len(segment) else 0
    views = encoder.to_normalised(view_rgb)
    view_pixels = encoder.fit_square(views, fit=cfg.view_fit)
    if cfg.mode == "crops":
        crops = segment_crops(
            point_index, segment, num_segments=num_segments, k=cfg.views_per_segment, min_pixels=cfg.min_pixels,
            scales=cfg.scales, min_side=cfg.min_crop_side, weight=cfg.weight,
        )
        return _SceneWork(scene_id, views, view_pixels, crops.view, crops.box, crops.seen, num_segments,
                          crop_segment=crops.segment, crop_weight=crops.weight)
    packed = pack_crops(point_index, segment, num_segments=num_segments, views=cfg.pack_views,
                        min_pixels=cfg.min_pixels, scale=cfg.pack_scale, zoom=cfg.pack_zoom, min_side=cfg.min_crop_side)
    mask = region_patch_masks(point_index, segment, packed.view, packed.box, packed.region_crop,
                              packed.region_segment, grid=encoder.patch_grid)
    # the patch most inside its segment weighs as much as the token itself (a small segment covers
    # only parts of patches: unscaled, its token would mostly attend to itself)
    mask /= np.maximum(mask.max(axis=1, keepdims=True), 1e-6)
    return _SceneWork(scene_id, views, view_pixels, packed.view, packed.box, packed.seen, num_segments,
                      region_crop=packed.region_crop, region_segment=packed.region_segment,
                      region_weight=packed.region_weight, region_mask=mask)


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
        SceneEmbedding: view [V, D], segment [S, D] (unit, zero where unseen), seen [S], crops.
    """
    work = _prepare("scene", view_rgb, point_index, segment, encoder, cfg, num_segments)
    batch = batch_size(cfg, encoder)
    for chunk in work.chunks(encoder, batch, cfg.max_supersample):
        images, regions = encode_chunk(encoder, chunk, cfg, batch)
        work.images_out.append(images)
        work.regions_out.append(regions)
    return work.finish(encoder.dim)
