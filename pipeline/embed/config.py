"""What the embed stage does (`embed.*` options), and which of it changes the stored embeddings."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Any, Literal

from pipeline.config import ConfigError, to_dict


@dataclass(frozen=True)
class EmbedConfig:
    """Configuration of the `embed` stage."""

    model: str = ""
    """CLIP model: a folder written by `save_pretrained` (e.g. the offline teacher) or a hub id
    such as "openai/clip-vit-base-patch32"."""
    mode: Literal["packed", "crops"] = "packed"
    """How segments are embedded. "packed": each segment from the view that shows it best,
    several segments sharing a crop, each read out of it by a class token that attends only to
    its own patches (`pack_*`, `mask_*`): about 1 encoder image for 2-3 segments. "crops": each
    segment cropped from its `views_per_segment` best views at every one of `scales`, the crop
    embeddings averaged: about 8 images a segment (the former default: 11-15x the crops, at the
    same segment accuracy on the measured rooms; its stored embeddings keep their former config
    hash). docs/benchmarks.md compares the two."""
    pack_views: int = 1
    """packed: a segment is read out of this many of its best views (most pixels), averaged with
    pixel weights."""
    pack_scale: float = 1.0
    """packed: a segment's own context side is its pixel box's longer side times this (its crop
    adds context: it is 1 to `pack_zoom` times that side)."""
    pack_zoom: float = 2.0
    """packed: a crop's side is at most this many times the own context side of each segment it
    hosts (>= 1; 1 = one crop per segment; larger = fewer crops, smaller segments in them)."""
    mask_layers: int = 0
    """packed: the last transformer layers in which a segment's class token attends through its
    mask (0 = every layer: the token sees only its segment's patches from the first layer on,
    those patches having seen the whole crop)."""
    mask_context: tuple[float, ...] = (0.0, 1.0)
    """packed: a segment's embedding is the mean of its class token read out at each of these
    attention weights (0..1) of the crop's patches outside the segment: 0 = its own patches only,
    1 = the whole crop (the crop's own embedding, no extra cost). The mean of a tight and a whole
    view of the segment is what several crops at several context scales gave mode "crops"."""
    views_per_segment: int = 3
    """crops: k: a segment is cropped from the k views where it shows the most pixels."""
    min_pixels: int = 16
    """A view counts for a segment only if the segment covers at least this many of its pixels;
    a segment with no such view is unseen (zero embedding, seen flag 0)."""
    scales: tuple[float, ...] = (1.0, 1.5, 2.0)
    """crops: context scales: the square crop's side is the segment box's longer side times each scale."""
    min_crop_side: float = 16.0
    """Smallest crop side in view pixels, so tiny segments still bring some context."""
    weight: Literal["pixels", "uniform"] = "pixels"
    """crops: how a segment's views are weighted in the average: by the segment's pixel count in each
    view, or equally. Scales are always weighted equally."""
    view_fit: Literal["pad", "crop"] = "pad"
    """Whole views: "pad" to a square with the mean colour so every visible point is in the image
    (the trainer aligns a view with all the points it shows); "crop" = CLIP's centre crop."""
    max_supersample: int = 4
    """Crops are sampled at up to this many times the model resolution and average-pooled down,
    an antialiasing filter for crops much larger than the model's input."""
    device: str = "auto"
    """"auto" (cuda > cpu), "cpu", "cuda", "cuda:1", ... (does not change the config hash)."""
    dtype: str = "auto"
    """"auto" (bf16/fp16 on GPU, fp32 on CPU), "fp32", "fp16", "bf16" (not hashed)."""
    batch_size: int = 0
    """Images per forward pass; 0 = 512 on a GPU, 64 on a CPU (not hashed)."""
    allow_download: bool = True
    """Hub ids only: fetch the model into the HF cache if it is not there (HF_HUB_OFFLINE=1
    also forbids it). Folders never touch the network."""

    def __post_init__(self) -> None:
        if self.mode not in ("packed", "crops"):
            raise ConfigError(f"embed: mode must be 'packed' or 'crops', got {self.mode!r}")
        if not self.pack_zoom >= 1.0 or not self.pack_scale > 0:
            raise ConfigError(f"embed: need pack_zoom >= 1 and pack_scale > 0, got {self.pack_zoom}, {self.pack_scale}")
        if self.mask_layers < 0 or self.pack_views < 1:
            raise ConfigError(f"embed: need mask_layers >= 0 and pack_views >= 1, got {self.mask_layers}, {self.pack_views}")
        if not self.mask_context or not all(0.0 <= c <= 1.0 for c in self.mask_context):
            raise ConfigError(f"embed: mask_context must be one or more values in 0..1, got {self.mask_context}")
        other, name = (CROPS_ONLY, "crops") if self.mode == "packed" else (PACKED_ONLY, "packed")
        ignored = [f.name for f in fields(self) if f.name in other and getattr(self, f.name) != f.default]
        if ignored:  # set by the user, and without effect: say so
            warnings.warn(f"embed: {', '.join(ignored)} apply to mode={name} only; with mode={self.mode} they are "
                          "ignored", UserWarning, stacklevel=3)


CROPS_ONLY = ("views_per_segment", "scales", "weight")
"""Fields that only mode "crops" reads."""
PACKED_ONLY = ("pack_views", "pack_scale", "pack_zoom", "mask_layers", "mask_context")
"""Fields that only mode "packed" reads."""
CROPS_FIELDS = ("views_per_segment", "min_pixels", "scales", "min_crop_side", "weight", "view_fit", "max_supersample")
"""What changes the embeddings of mode "crops" (exactly the fields hashed before modes existed, so
a store embedded then is not embedded again with `mode=crops`)."""
PACKED_FIELDS = ("mode", "min_pixels", "min_crop_side", "view_fit", "max_supersample", "pack_views", "pack_scale",
                 "pack_zoom", "mask_layers", "mask_context")
"""What changes the embeddings of mode "packed"."""


def result_fields(cfg: EmbedConfig) -> dict[str, Any]:
    """The part of the config that changes stored embeddings (device/dtype/batching do not, nor the
    fields of the other mode)."""
    values = to_dict(cfg)
    return {name: values[name] for name in (CROPS_FIELDS if cfg.mode == "crops" else PACKED_FIELDS)}
