"""The offline teacher's config: architecture, training and crop collection (`teacher.*` options)."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.clip.defaults import DEFAULT_TEMPLATES


@dataclass(frozen=True)
class TeacherConfig:
    """The offline teacher: architecture, training and crop collection."""

    image_size: int = 64
    """Input side of the vision tower (pixels)."""
    patch_size: int = 16
    """ViT patch side; (image_size / patch_size)^2 patches (16 tokens at 64/16: the step cost
    grows with the token count, and a CPU has minutes, not hours)."""
    vision_width: int = 128
    """Vision transformer hidden size."""
    vision_layers: int = 4
    """Vision transformer layers."""
    vision_heads: int = 4
    """Vision attention heads."""
    text_width: int = 128
    """Text transformer hidden size."""
    text_layers: int = 3
    """Text transformer layers."""
    text_heads: int = 4
    """Text attention heads."""
    max_text_length: int = 32
    """Longest caption in tokens (the text model's max_position_embeddings)."""
    projection_dim: int = 64
    """Width D of the joint embedding space."""
    vocab_size: int = 2000
    """Target BPE vocabulary (training stops earlier when the captions have no more merges)."""
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    """Caption templates; the embed stage's vocabulary uses the same by default."""
    steps: int = 3000
    """Optimiser steps at most (fewer when `max_seconds` runs out first)."""
    max_seconds: float = 300.0
    """Wall-clock budget for training; the cosine schedule is fitted to it after a few steps."""
    batch_size: int = 128
    """Crops per step."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    warmup_steps: int = 50
    """Linear warm-up steps before the cosine decay."""
    class_balance: float = 0.5
    """Crops are drawn with probability proportional to count(class)^-class_balance: 0 = as
    collected (walls and floors dominate rooms), 1 = every class equally often."""
    crop_area: tuple[float, float] = (0.5, 1.0)
    """Random resized crop: range of the kept fraction of the crop's area."""
    flip: bool = True
    """Random horizontal flips."""
    colour_jitter: float = 0.2
    """Random brightness, contrast and saturation factors in [1 - j, 1 + j]."""
    val_fraction: float = 0.2
    """Held out for the crop-classification accuracy: this fraction of the corpus scenes
    (`run_fit`), or of crops when `fit_teacher` gets no validation set."""
    colour_weight: float = 0.5
    """Weight of the caption term (crops against their coloured captions, "a photo of a red
    chair.") next to the class term (crops against colourless class captions); 0 = class names only."""
    max_caption_pairs: int = 48
    """Most coloured captions through the text tower per step (a random subset of the batch's
    (class, colour) pairs; the crops of the others skip the caption term that step): step time."""
    min_colour_share: float = 0.5
    """An object/segment is captioned with a colour only if this fraction of its points has it."""
    seed: int = 0
    """Seed for the split, the initialisation, sampling and augmentation."""
    threads: int = 0
    """torch intra-op threads while training; 0 = torch's default (one per core). Small models
    train faster on 1-2 threads than on many, and far faster when the cores are shared."""
    crop_size: int = 80
    """Side of the collected crops (a bit larger than image_size so random crops have room)."""
    sources: tuple[str, ...] = ("instance", "segment")
    """What is cropped: ground-truth instances (whole objects) and over-segments (parts, with
    context from the larger scales); stuff classes without instances come from segments."""
    views_per_object: int = 3
    """Crops of each object/segment from its best views."""
    min_pixels: int = 100
    """Smallest object/segment pixel count in a view to be cropped from it."""
    scales: tuple[float, ...] = (1.0, 1.5, 2.0)
    """Context scales of the crops (as in the embed stage)."""
    min_purity: float = 0.6
    """An object/segment is captioned only if this fraction of its points has its majority class."""
    max_crops_per_scene: int = 800
    """Random subsample per scene above this (memory: 80x80x3 bytes per crop)."""
