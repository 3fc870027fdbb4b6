"""A CLIP model behind two calls: `encode_images` and `encode_texts`.

Loads a transformers `CLIPModel` and its tokenizer from a local folder (never touches the
network) or a hub id (fetched once into the Hugging Face cache unless `HF_HUB_OFFLINE=1`;
`allow_download=False` forbids it). Image preprocessing is done in torch, not with
`CLIPImageProcessor`, which needs torchvision: resize (bicubic, antialiased) and centre crop or
pad to the model's `image_size`, then normalise with the mean/std of the folder's
`preprocessor_config.json` (CLIP's defaults when the file is absent).

In transformers 5, `get_image_features`/`get_text_features` return a `BaseModelOutputWithPooling`
whose `pooler_output` is the *projected* embedding (`visual_projection(vision_model(x).pooler_output)`;
checked in tests/pipeline/embed/test_embed.py), which is what CLIP compares across modalities.

Reads: a model folder or the hub cache. Writes nothing.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.clip.defaults import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, is_local_model
from pipeline.errors import UserError
from pipeline.parallel import pin_torch_threads

class ModelLoadError(UserError, RuntimeError):
    """A model folder or hub id that cannot be loaded (names what was tried and why)."""


@dataclass(frozen=True)
class Preprocess:
    """How images become `pixel_values` for this model."""

    image_size: int
    """Side of the square input (the vision config's `image_size`)."""
    mean: tuple[float, float, float]
    """Per-channel mean, RGB, 0..1."""
    std: tuple[float, float, float]
    """Per-channel standard deviation, RGB, 0..1."""


def _file_digest(path: Path, *, edge_bytes: int = 1 << 20) -> str:
    """A cheap identity of a (possibly huge) weights file: size plus hashes of its first/last MiB."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(edge_bytes))
        if size > edge_bytes:
            f.seek(max(edge_bytes, size - edge_bytes))
            h.update(f.read(edge_bytes))
    return h.hexdigest()[:16]


def model_identity(model: str) -> str:
    """A string that changes when the model changes, for stage config hashes.

    A folder: its resolved path, a hash of its config.json and a digest of each weights file
    (so a retrained teacher written to the same folder invalidates earlier embeddings).
    A hub id: the id itself.
    """
    if not is_local_model(model):
        return f"hub:{model}"
    folder = Path(model).expanduser().resolve()
    config = folder / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{folder}: not a CLIP model folder (no config.json)")
    parts = [hashlib.sha256(config.read_bytes()).hexdigest()[:16]]
    for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        parts.append(f"{weights.name}:{_file_digest(weights)}")
    return f"dir:{folder}:{'/'.join(parts)}"


def pick_device(device: str = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """"auto": bf16 on GPUs that support it, else fp16 on GPU; always fp32 on CPU (half is slow there)."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def _read_preprocess(folder: Path | None, image_size: int) -> Preprocess:
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    if folder is not None and (folder / "preprocessor_config.json").is_file():
        path = folder / "preprocessor_config.json"
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{path}: not valid JSON: {exc}") from exc
        mean = tuple(float(v) for v in data.get("image_mean", mean))
        std = tuple(float(v) for v in data.get("image_std", std))
        if len(mean) != 3 or len(std) != 3:
            raise ModelLoadError(f"{path}: image_mean/image_std must have 3 values, got {mean}, {std}")
    return Preprocess(image_size=int(image_size), mean=mean, std=std)  # type: ignore[arg-type]


class ClipEncoder:
    """A loaded CLIP model with torch preprocessing. Build with `load_encoder`."""

    def __init__(self, model: Any, tokenizer: Any, preprocess: Preprocess, *, identity: str,
                 device: torch.device, dtype: torch.dtype):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.preprocess_cfg = preprocess
        self.identity = identity
        self.device = device
        self.dtype = dtype
        self.max_text_length = int(model.config.text_config.max_position_embeddings)
        self._mean = torch.tensor(preprocess.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(preprocess.std, device=device).view(1, 3, 1, 1)

    @property
    def image_size(self) -> int:
        return self.preprocess_cfg.image_size

    @property
    def dim(self) -> int:
        """Width D of the joint embedding space (`projection_dim`)."""
        return int(self.model.config.projection_dim)

    # -- images -----------------------------------------------------------------------------
    def to_normalised(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] normalised with the model's mean/std, on the
        encoder's device (one conversion and two in-place ops: full-size views are big)."""
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.device).permute(0, 3, 1, 2).float()
        return x.mul_(1.0 / (255.0 * self._std)).sub_(self._mean / self._std)

    def fit_square(self, x: torch.Tensor, *, fit: Literal["crop", "pad"] = "crop") -> torch.Tensor:
        """Normalised float [B, 3, H, W] -> [B, 3, S, S] model input (S = image_size).

        fit="crop": shorter side to S, centre crop (CLIP's own preprocessing).
        fit="pad": pad the shorter side to a square with the mean colour (zero after
        normalisation), resize to S, so the whole image is seen (what a view embedding covers).
        """
        size = self.image_size
        _, _, h, w = x.shape
        if fit == "pad":
            side = max(h, w)
            top, left = (side - h) // 2, (side - w) // 2
            x = F.pad(x, (left, side - w - left, top, side - h - top))
            return _resize(x, size, size)
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = _resize(x, nh, nw)
        top, left = (nh - size) // 2, (nw - size) // 2
        return x[:, :, top:top + size, left:left + size]

    def preprocess(self, images: np.ndarray | torch.Tensor, *, fit: Literal["crop", "pad"] = "crop") -> torch.Tensor:
        """uint8 [B, H, W, 3] -> pixel_values float32 [B, 3, S, S], normalised (see `fit_square`)."""
        return self.fit_square(self.to_normalised(images), fit=fit)

    @torch.inference_mode()
    def encode_pixels(self, pixel_values: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
        """pixel_values float [B, 3, S, S] (normalised) -> float32 [B, D] unit embeddings (device)."""
        if self.device.type == "cpu":
            pin_torch_threads()  # numba kernels before this may have raised torch's thread count
        out = []
        for start in range(0, len(pixel_values), batch_size):
            chunk = pixel_values[start:start + batch_size].to(self.device, self.dtype)
            feats = self.model.get_image_features(pixel_values=chunk).pooler_output
            out.append(F.normalize(feats.float(), dim=-1))
        if not out:
            return torch.zeros(0, self.dim, device=self.device)
        return torch.cat(out)

    def encode_images(
        self, images: np.ndarray | torch.Tensor, *, batch_size: int = 256, fit: Literal["crop", "pad"] = "crop"
    ) -> np.ndarray:
        """uint8 [B, H, W, 3] -> float32 [B, D] unit embeddings (NumPy)."""
        out = []
        for start in range(0, len(images), batch_size):
            pixels = self.preprocess(images[start:start + batch_size], fit=fit)
            out.append(self.encode_pixels(pixels, batch_size=batch_size))
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return torch.cat(out).cpu().numpy()

    # -- texts ------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], *, batch_size: int = 256) -> np.ndarray:
        """list of T strings -> float32 [T, D] unit embeddings (NumPy)."""
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(
                list(texts[start:start + batch_size]), padding=True, truncation=True,
                max_length=self.max_text_length, return_tensors="pt",
            ).to(self.device)
            feats = self.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            ).pooler_output
            out.append(F.normalize(feats.float(), dim=-1))
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return torch.cat(out).cpu().numpy()


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if x.shape[-2:] == (h, w):
        return x
    # antialias: views are often downscaled 2-5x; without it thin structures alias
    return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)


def load_encoder(
    model: str, *, device: str = "auto", dtype: str = "auto", allow_download: bool = True
) -> ClipEncoder:
    """Load a CLIP model + tokenizer from a folder or a hub id.

    Args:
        model: a folder written by `save_pretrained` (config.json, weights, tokenizer files,
            optionally preprocessor_config.json) or a hub id such as "openai/clip-vit-base-patch32".
        device: "auto" (cuda > cpu), "cpu", "cuda", "cuda:1", ...
        dtype: "auto" (bf16/fp16 on GPU, fp32 on CPU), "fp32", "fp16" or "bf16".
        allow_download: for hub ids only: fetch into the HF cache if missing. Folders never
            touch the network.
    """
    from transformers import AutoTokenizer, CLIPModel  # heavy import, only when a model is used

    local = is_local_model(model)
    source: str | Path = Path(model).expanduser() if local else model
    if local and not Path(source).is_dir():
        raise ModelLoadError(f"model folder {source} does not exist")
    local_only = local or not allow_download or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(torch_device, dtype)
    try:
        clip = CLIPModel.from_pretrained(source, local_files_only=local_only, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        hint = "" if local else " (hub id: is it cached? set allow_download / unset HF_HUB_OFFLINE to fetch it)"
        raise ModelLoadError(f"cannot load CLIP model {model!r}{hint}: {exc}") from exc
    folder: Path | None = Path(source) if local else _cached_folder(model)
    preprocess = _read_preprocess(folder, clip.config.vision_config.image_size)
    return ClipEncoder(
        clip.to(torch_device), tokenizer, preprocess, identity=model_identity(model),
        device=torch_device, dtype=torch_dtype,
    )


def _cached_folder(model: str) -> Path | None:
    """The HF cache snapshot folder of a hub id (for its preprocessor_config.json), if any."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(model, "preprocessor_config.json")
    except (ImportError, ValueError):
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def cached_encoder(model: str, *, device: str = "auto", dtype: str = "auto", allow_download: bool = True) -> ClipEncoder:
    """`load_encoder`, once per worker process and model version (a Dask worker runs many scenes
    with one model; a folder rewritten in between, e.g. a retrained teacher, is loaded again)."""
    return _cached_encoder(model, model_identity(model), device, dtype, allow_download)


@functools.lru_cache(maxsize=2)
def _cached_encoder(model: str, identity: str, device: str, dtype: str, allow_download: bool) -> ClipEncoder:
    del identity  # part of the cache key only
    return load_encoder(model, device=device, dtype=dtype, allow_download=allow_download)


def embed_vocabulary(names: Sequence[str], templates: Sequence[str], encoder: ClipEncoder) -> np.ndarray:
    """Text embeddings of a vocabulary: every name in every template, averaged, normalised.

    Returns:
        float32 [C, D] unit rows, C = len(names).
    """
    if not names or not templates:
        raise ValueError("embed_vocabulary needs at least one name and one template")
    for template in templates:
        if "{}" not in template:
            raise ValueError(f"prompt template {template!r} has no '{{}}' for the class name")
    texts = [template.format(name) for name in names for template in templates]
    emb = encoder.encode_texts(texts).reshape(len(names), len(templates), -1).mean(axis=1)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)
