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

    @property
    def patch_grid(self) -> int:
        """Patches per side of the model's input (image_size / patch_size)."""
        return self.image_size // int(self.model.config.vision_config.patch_size)

    @torch.inference_mode()
    def encode_regions(
        self,
        pixel_values: torch.Tensor,
        region_image: np.ndarray | torch.Tensor,
        region_mask: np.ndarray | torch.Tensor,
        *,
        mask_layers: int = 0,
        context: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image embeddings and, from the same forward pass, an embedding per region of an image.

        A region is read out by a masked class token: a copy of the image's class token enters
        the last `mask_layers` transformer layers beside it, attends to itself and to the image's
        patches with each patch's attention weight multiplied by `mask + context * (1 - mask)`
        (a log-bias on the logits), and never changes the image's own tokens. The image's other
        tokens are computed once and shared by all its regions, so a region costs about one
        token, not one image. With `context=1` every region equals its image's embedding (the
        oracle the tests hold this to); with `context=0` a region sees only its patches. This is
        MaskCLIP's idea (dense CLIP features restricted to a mask, arXiv 2112.01071, 2208.08984)
        in the form that keeps CLIP's own pooled output, which a region token is trained for.

        Args:
            pixel_values: float [B, 3, S, S] normalised model input.
            region_image: int [R] image of each region, 0..B-1.
            region_mask: float [R, G * G] weight 0..1 of each patch (row-major) for the region, e.g.
                its share inside it (`pipeline.clip.crops.region_patch_masks`), G = `patch_grid`.
            mask_layers: how many of the last layers the region tokens go through (0 = all).
            context: weight of the patches outside the region, 0..1.
        Returns:
            float32 unit embeddings on the encoder's device: images [B, D], regions [R, D].
        """
        if self.device.type == "cpu":
            pin_torch_threads()
        vision = self.model.vision_model
        layers = vision.encoder.layers
        x = pixel_values.to(self.device, self.dtype)
        B = len(x)
        region_image = torch.as_tensor(np.asarray(region_image) if not torch.is_tensor(region_image) else region_image,
                                       dtype=torch.long).to(self.device)
        mask = torch.as_tensor(np.asarray(region_mask) if not torch.is_tensor(region_mask) else region_mask,
                               dtype=torch.float32).to(self.device)
        R, G2 = len(region_image), self.patch_grid ** 2
        if mask.shape != (R, G2):
            raise ValueError(f"region_mask must be [{R}, {G2}], got {tuple(mask.shape)}")
        if R and (int(region_image.min()) < 0 or int(region_image.max()) >= B):
            raise ValueError(f"region_image must be in 0..{B - 1}")
        m = len(layers) if mask_layers <= 0 else min(int(mask_layers), len(layers))
        h = vision.pre_layrnorm(vision.embeddings(x))
        for layer in layers[:len(layers) - m]:
            h = layer(h, None)
        # regions as padded slots per image: [B, M] (M = most regions of one image)
        per_image = torch.bincount(region_image, minlength=B)
        M = int(per_image.max()) if R else 0
        order = torch.argsort(region_image, stable=True)
        first = torch.cumsum(per_image, 0) - per_image
        slot = torch.empty(R, dtype=torch.long, device=self.device)
        slot[order] = torch.arange(R, device=self.device) - first[region_image[order]]
        tokens = h.new_zeros(B, M, h.shape[-1])
        tokens[region_image, slot] = h[region_image, 0]
        weight = mask.new_ones(B, M, G2)  # padding slots: any finite bias (their output is dropped)
        weight[region_image, slot] = mask + float(context) * (1 - mask)
        bias = torch.log(weight.clamp_min(1e-12)).where(weight > 0, torch.finfo(torch.float32).min / 4)
        for layer in layers[len(layers) - m:]:
            h, tokens = _layer_with_regions(layer, h, tokens, bias)
        images = F.normalize(self.model.visual_projection(vision.post_layernorm(h[:, 0])).float(), dim=-1)
        regions = F.normalize(self.model.visual_projection(vision.post_layernorm(tokens[region_image, slot])).float(), dim=-1)
        return images, regions

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


def _layer_with_regions(
    layer: Any, h: torch.Tensor, tokens: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One CLIP encoder layer (pre-norm attention + MLP, as `CLIPEncoderLayer`) over the image
    tokens h [B, T, E], plus region tokens [B, M, E] that attend to themselves and to their
    image's patches (keys and values of this layer) with a log-weight bias [B, M, T - 1]."""
    attn = layer.self_attn
    B, T, E = h.shape
    M = tokens.shape[1]
    heads, dim = attn.num_heads, attn.head_dim

    def split(t: torch.Tensor) -> torch.Tensor:  # [B, n, E] -> [B, heads, n, dim]
        return t.view(B, -1, heads, dim).transpose(1, 2)

    y = layer.layer_norm1(h)
    q, k, v = split(attn.q_proj(y)), split(attn.k_proj(y)), split(attn.v_proj(y))
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    h = h + attn.out_proj(out.transpose(1, 2).reshape(B, T, E))
    h = h + layer.mlp(layer.layer_norm2(h))
    if M == 0:
        return h, tokens
    yr = layer.layer_norm1(tokens)
    qr, kr, vr = split(attn.q_proj(yr)), split(attn.k_proj(yr)), split(attn.v_proj(yr))
    own = (qr * kr).sum(-1, keepdim=True).float() * attn.scale  # [B, heads, M, 1]
    patches = (qr @ k[:, :, 1:].transpose(-1, -2)).float() * attn.scale + bias[:, None]  # [B, heads, M, T-1]
    weights = torch.softmax(torch.cat([own, patches], dim=-1), dim=-1).to(h.dtype)
    mixed = weights[..., :1] * vr + weights[..., 1:] @ v[:, :, 1:]
    tokens = tokens + attn.out_proj(mixed.transpose(1, 2).reshape(B, M, E))
    tokens = tokens + layer.mlp(layer.layer_norm2(tokens))
    return h, tokens


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
