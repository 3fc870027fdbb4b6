"""What the embed stage does (`embed.*` options), and which of it changes the stored embeddings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pipeline.config import to_dict


@dataclass(frozen=True)
class EmbedConfig:
    """Configuration of the `embed` stage."""

    model: str = ""
    """CLIP model: a folder written by `save_pretrained` (e.g. the offline teacher) or a hub id
    such as "openai/clip-vit-base-patch32"."""
    views_per_segment: int = 3
    """k: a segment is cropped from the k views where it shows the most pixels."""
    min_pixels: int = 16
    """A view counts for a segment only if the segment covers at least this many of its pixels;
    a segment with no such view is unseen (zero embedding, seen flag 0)."""
    scales: tuple[float, ...] = (1.0, 1.5, 2.0)
    """Context scales: the square crop's side is the segment box's longer side times each scale."""
    min_crop_side: float = 16.0
    """Smallest crop side in view pixels, so tiny segments still bring some context."""
    weight: Literal["pixels", "uniform"] = "pixels"
    """How a segment's views are weighted in the average: by the segment's pixel count in each
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


def result_fields(cfg: EmbedConfig) -> dict[str, Any]:
    """The part of the config that changes stored embeddings (device/dtype/batching do not)."""
    keep = ("views_per_segment", "min_pixels", "scales", "min_crop_side", "weight", "view_fit", "max_supersample")
    return {name: to_dict(cfg)[name] for name in keep}
