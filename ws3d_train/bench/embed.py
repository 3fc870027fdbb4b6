"""Throughput of the CLIP image encoder (images/s), for `make bench`.

Measures `ClipEncoder.encode_images` (torch preprocessing + forward pass) on random 240 x 320
view-sized images for two models: the offline teacher (a given folder, or a randomly initialised
model of the default `TeacherConfig` size) and a randomly initialised ViT-B/32-sized vision tower
(OpenAI CLIP ViT-B/32 shapes; its text tower is shrunk since only images are timed). Weights do
not change the speed, so no download is needed. Device and dtype follow the embed stage's
automatic choice (cuda > cpu; bf16/fp16 on GPU, fp32 on CPU).

Reads: the teacher folder if given. Writes nothing.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from pipeline.clip.defaults import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from pipeline.clip.model import ClipEncoder, Preprocess, load_encoder, pick_device, pick_dtype


def _random_encoder(vision: dict[str, int], projection_dim: int, device: str, dtype: str) -> ClipEncoder:
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        vision_config=vision,
        text_config={"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32, "bos_token_id": 0,
                     "eos_token_id": 1, "pad_token_id": 1},
        projection_dim=projection_dim,
    )
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(torch_device, dtype)
    model = CLIPModel(config).to(torch_device, torch_dtype)
    return ClipEncoder(
        model, None, Preprocess(vision["image_size"], OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        identity="random", device=torch_device, dtype=torch_dtype,
    )


def _teacher_encoder(model_dir: str | None, device: str, dtype: str) -> ClipEncoder:
    if model_dir is not None:
        return load_encoder(model_dir, device=device, dtype=dtype)
    from pipeline.teacher.config import TeacherConfig

    cfg = TeacherConfig()
    vision = {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "hidden_size": cfg.vision_width,
              "intermediate_size": 4 * cfg.vision_width, "num_hidden_layers": cfg.vision_layers,
              "num_attention_heads": cfg.vision_heads}
    return _random_encoder(vision, cfg.projection_dim, device, dtype)


VIT_B32 = {"image_size": 224, "patch_size": 32, "hidden_size": 768, "intermediate_size": 3072,
           "num_hidden_layers": 12, "num_attention_heads": 12}
"""OpenAI CLIP ViT-B/32 vision tower shapes (projection 512)."""


def _images_per_second(encoder: ClipEncoder, images: np.ndarray, batch_size: int, repeats: int) -> float:
    encoder.encode_images(images[:batch_size], batch_size=batch_size)  # warm-up (allocations, kernels)
    start = time.perf_counter()
    for _ in range(repeats):
        encoder.encode_images(images, batch_size=batch_size)  # returns NumPy: implies a device sync
    return repeats * len(images) / (time.perf_counter() - start)


def bench_embed(
    model_dir: str | None = None,
    *,
    batch_sizes: Sequence[int] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    view_hw: tuple[int, int] = (240, 320),
    verbose: bool = True,
) -> dict[str, Any]:
    """Images/s of `encode_images` for the teacher-sized and the ViT-B/32-sized model.

    Args:
        model_dir: a teacher (or any CLIP) folder; None = a random model of TeacherConfig's size.
        batch_sizes: default (8, 32) on a CPU, (128, 512) on a GPU. Each is timed on one batch
            (CPU) or four (GPU) after a warm-up batch.
    Returns:
        {"device", "dtype", "view_hw", "models": {name: {"params_m", "image_size",
         "images_per_s": {batch_size: value}}}}
    """
    torch_device = pick_device(device)
    if batch_sizes is None:
        batch_sizes = (128, 512) if torch_device.type == "cuda" else (8, 32)
    batches = 4 if torch_device.type == "cuda" else 1
    rng = np.random.default_rng(0)
    report: dict[str, Any] = {"device": str(torch_device), "view_hw": list(view_hw), "models": {}}
    builders = {
        "teacher": lambda: _teacher_encoder(model_dir, device, dtype),
        "vit_b32": lambda: _random_encoder(VIT_B32, 512, device, dtype),
    }
    for name, build in builders.items():
        encoder = build()
        report["dtype"] = str(encoder.dtype).replace("torch.", "")
        params = sum(p.numel() for p in encoder.model.vision_model.parameters()) / 1e6
        entry = {"params_m": round(params, 2), "image_size": encoder.image_size, "images_per_s": {}}
        for batch_size in batch_sizes:
            images = rng.integers(0, 256, (batch_size * batches, *view_hw, 3), dtype=np.uint8)
            ips = _images_per_second(encoder, images, batch_size, repeats=1)
            entry["images_per_s"][int(batch_size)] = round(ips, 1)
            if verbose:
                print(f"embed bench: {name} ({params:.1f}M vision params, {encoder.image_size}px) "
                      f"batch {batch_size}: {ips:.1f} images/s on {torch_device} {report['dtype']}")
        report["models"][name] = entry
        del encoder
    return report
