"""Stage `embed`: CLIP embeddings of rendered views, of over-segments and of class vocabularies.

Scene level: one embedding per rendered view (the whole view, padded to a square by default).
Object level: for every over-segment, the `views_per_segment` views where it shows the most
pixels (at least `min_pixels`), square crops of its pixel box at several context `scales`,
embedded and averaged with weights (pixel counts) into one unit embedding, plus a seen flag.
Text: a vocabulary (class names or any list) x prompt templates, averaged and normalised.

Reads:  views/rgb, views/point_index (render), overseg/segment (overseg).
Writes: clip/view, clip/segment, clip/segment_seen (per scene, one atomic group),
        vocab/<name> (text embeddings, once per store, `run_vocabulary`).

`run_scene` embeds one scene (what the executor calls on CPU workers; the model is loaded once
per process). `embed_scenes` batches crops across scenes for a GPU and prints images/s.
"""
from __future__ import annotations

import json
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

from pipeline import schema
from pipeline.clip_model import DEFAULT_TEMPLATES, ClipEncoder, cached_encoder, is_local_model, model_identity
from pipeline.config import config_hash, to_dict
from pipeline.executor import SceneResult
from pipeline.readers.base import SceneError
from pipeline.store import Store

STAGE = "embed"


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


def _result_fields(cfg: EmbedConfig) -> dict[str, Any]:
    """The part of the config that changes stored embeddings (device/dtype/batching do not)."""
    keep = ("views_per_segment", "min_pixels", "scales", "min_crop_side", "weight", "view_fit", "max_supersample")
    return {name: to_dict(cfg)[name] for name in keep}


def _batch_size(cfg: EmbedConfig, encoder: ClipEncoder) -> int:
    if cfg.batch_size > 0:
        return cfg.batch_size
    return 512 if encoder.device.type == "cuda" else 64


# --- pure cores -------------------------------------------------------------------------------
@dataclass
class SegmentCrops:
    """Which crops embed which segment. K crops, S segments."""

    segment: np.ndarray
    """int64 [K] segment of each crop (crops are ordered by segment, view rank, scale)."""
    view: np.ndarray
    """int64 [K] view each crop is cut from."""
    box: np.ndarray
    """float32 [K, 4] square crop box (x0, y0, x1, y1) in continuous pixel coordinates (pixel
    (i, j) covers [j, j+1) x [i, i+1)); may reach outside the view (filled with the mean colour)."""
    weight: np.ndarray
    """float32 [K] weight of each crop in its segment's average (each seen segment's sum to 1)."""
    seen: np.ndarray
    """bool [S] segments with at least one qualifying view."""
    pixels: np.ndarray
    """int64 [V, S] pixels of each segment in each view."""


@njit(cache=True, parallel=True)
def _count_boxes(point_index, segment, counts, boxes):  # pragma: no cover - numba
    """Per (view, segment): pixel count and inclusive pixel box (x0, y0, x1, y1)."""
    V, H, W = point_index.shape
    for v in prange(V):  # one view per thread: rows of counts/boxes are private to it
        for y in range(H):
            for x in range(W):
                p = point_index[v, y, x]
                if p < 0:
                    continue
                s = segment[p]
                if s < 0:
                    continue
                counts[v, s] += 1
                if x < boxes[v, s, 0]:
                    boxes[v, s, 0] = x
                if y < boxes[v, s, 1]:
                    boxes[v, s, 1] = y
                if x > boxes[v, s, 2]:
                    boxes[v, s, 2] = x
                if y > boxes[v, s, 3]:
                    boxes[v, s, 3] = y


def segment_pixel_boxes(
    point_index: np.ndarray, segment: np.ndarray, num_segments: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel count and pixel box of every segment in every view.

    Args:
        point_index: int32 [V, H, W] point shown by each pixel, -1 = nothing.
        segment: int [N] segment id of each point, 0..S-1 (-1 = no segment, ignored).
        num_segments: S.
    Returns:
        counts int64 [V, S]; boxes int32 [V, S, 4] inclusive (x0, y0, x1, y1), where counts > 0.
    """
    point_index = np.ascontiguousarray(point_index, dtype=np.int32)
    segment = np.ascontiguousarray(segment, dtype=np.int64)
    if point_index.ndim != 3:
        raise ValueError(f"point_index must be [V, H, W], got {point_index.shape}")
    if point_index.size and point_index.max() >= len(segment):
        raise ValueError(f"point_index holds point {point_index.max()} but there are {len(segment)} points")
    if len(segment) and segment.max() >= num_segments:
        raise ValueError(f"segment ids reach {segment.max()} but num_segments is {num_segments}")
    V, H, W = point_index.shape
    counts = np.zeros((V, num_segments), np.int64)
    boxes = np.empty((V, num_segments, 4), np.int32)
    boxes[..., :2] = np.array([W, H], np.int32)
    boxes[..., 2:] = -1
    _count_boxes(point_index, segment, counts, boxes)
    return counts, boxes


def square_boxes(
    box: np.ndarray, *, scale: float, min_side: float, height: int, width: int
) -> np.ndarray:
    """Square context boxes around inclusive pixel boxes.

    Args:
        box: int [K, 4] inclusive (x0, y0, x1, y1).
    Returns:
        float32 [K, 4] (x0, y0, x1, y1) continuous: side = max(w, h) * scale (at least `min_side`),
        centred on the box but shifted to stay inside the view along each axis where it fits
        (more real context instead of padding); centred on the view along an axis it exceeds.
    """
    box = box.astype(np.float64)
    w = box[:, 2] - box[:, 0] + 1
    h = box[:, 3] - box[:, 1] + 1
    side = np.maximum(np.maximum(w, h) * scale, min_side)
    half = side / 2
    cx = (box[:, 0] + box[:, 2] + 1) / 2
    cy = (box[:, 1] + box[:, 3] + 1) / 2
    cx = np.where(side <= width, np.clip(cx, half, width - half), width / 2)
    cy = np.where(side <= height, np.clip(cy, half, height - half), height / 2)
    return np.stack([cx - half, cy - half, cx + half, cy + half], axis=1).astype(np.float32)


def segment_crops(
    point_index: np.ndarray,
    segment: np.ndarray,
    *,
    num_segments: int | None = None,
    k: int = 3,
    min_pixels: int = 16,
    scales: Sequence[float] = (1.0, 1.5, 2.0),
    min_side: float = 16.0,
    weight: Literal["pixels", "uniform"] = "pixels",
) -> SegmentCrops:
    """Choose the crops that embed each segment (no images needed, only the pixel-point map).

    Args:
        point_index: int32 [V, H, W] point shown by each pixel, -1 = nothing.
        segment: int [N] segment of each point, 0..S-1 (-1 = none).
        num_segments: S (default: max segment id + 1).
        k: views per segment (those with the most pixels of it).
        min_pixels: a view qualifies for a segment with at least this many pixels of it.
        scales: context scales; one crop per (segment, view, scale).
        min_side: smallest crop side in pixels.
        weight: "pixels" weighs a segment's views by its pixel counts, "uniform" equally.
    Returns:
        SegmentCrops with K = sum over segments of (qualifying views, at most k) * len(scales).
    """
    segment = np.asarray(segment)
    S = int(num_segments if num_segments is not None else (segment.max() + 1 if len(segment) else 0))
    V, H, W = point_index.shape
    counts, boxes = segment_pixel_boxes(point_index, segment, S)
    k = min(k, V)
    # the k best views per segment; stable so ties go to the lower view id (deterministic)
    order = np.argsort(-counts.T, axis=1, kind="stable")[:, :k]  # [S, k]
    best = np.take_along_axis(counts.T, order, axis=1)  # [S, k]
    ok = best >= max(min_pixels, 1)
    seg_ids, rank = np.nonzero(ok)  # row-major: ordered by segment then rank
    views = order[seg_ids, rank]
    view_weight = best[seg_ids, rank].astype(np.float64) if weight == "pixels" else np.ones(len(seg_ids))
    total = np.bincount(seg_ids, weights=view_weight, minlength=S)
    view_weight = view_weight / total[seg_ids] / len(scales)
    base = boxes[views, seg_ids]  # [J, 4]
    per_scale = [square_boxes(base, scale=s, min_side=min_side, height=H, width=W) for s in scales]
    n_scales = len(scales)
    # interleave scales per (segment, view): crop j*n_scales + i is view pick j at scale i
    box = np.stack(per_scale, axis=1).reshape(-1, 4)
    return SegmentCrops(
        segment=np.repeat(seg_ids, n_scales).astype(np.int64),
        view=np.repeat(views, n_scales).astype(np.int64),
        box=box.astype(np.float32),
        weight=np.repeat(view_weight, n_scales).astype(np.float32),
        seen=ok.any(axis=1),
        pixels=counts,
    )


def extract_crops(
    images: torch.Tensor,
    view: np.ndarray | torch.Tensor,
    box: np.ndarray | torch.Tensor,
    *,
    size: int,
    max_supersample: int = 4,
    fill: float | Sequence[float] = 0.0,
) -> torch.Tensor:
    """Cut square boxes out of images and resample them to `size` x `size`.

    Bilinear sampling at f x f points per output pixel, averaged (f = ceil(box side / size),
    at most `max_supersample`): an antialiasing box filter when a crop is shrunk. A box whose
    sides are whole pixels and equal to `size` reproduces the pixels exactly.

    Args:
        images: float [V, C, H, W] (any normalisation) on any device.
        view: int [K] image of each crop.
        box: float [K, 4] (x0, y0, x1, y1) continuous pixel coordinates.
        size: output side.
        fill: value (scalar or per channel) outside the image.
    Returns:
        float [K, C, size, size] on the images' device.
    """
    device = images.device
    V, C, H, W = images.shape
    view = torch.as_tensor(np.asarray(view) if not torch.is_tensor(view) else view, dtype=torch.long)
    box = torch.as_tensor(np.asarray(box) if not torch.is_tensor(box) else box, dtype=torch.float32)
    K = len(view)
    out = torch.empty(K, C, size, size, dtype=images.dtype, device=device)
    if K == 0:
        return out
    fill_t = torch.as_tensor(fill, dtype=images.dtype, device=device).reshape(-1, 1, 1)
    # sample (image - fill) with zero padding, add fill back: outside the image reads `fill`
    source = images - fill_t if bool(fill_t.any()) else images
    side = torch.maximum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1])
    factor = torch.clamp(torch.ceil(side / size - 1e-6), 1, max_supersample).long()
    # group by (view, factor): one grid_sample call per group, its crops stacked as one tall image
    key = view * (max_supersample + 1) + factor
    for group in torch.unique(key).tolist():
        idx = torch.nonzero(key == group).flatten()
        v, f = divmod(group, max_supersample + 1)
        n = size * f
        b = box[idx]
        # output sample i lands at x0 + (i + 0.5) / n * side; with align_corners=False the
        # normalised -1..1 range spans the pixel edges 0..W
        steps = (torch.arange(n, dtype=torch.float32) + 0.5) / n  # sample centres in (0, 1)
        gx = (b[:, 0:1] + steps * (b[:, 2:3] - b[:, 0:1])) * (2 / W) - 1  # [G, n]
        gy = (b[:, 1:2] + steps * (b[:, 3:4] - b[:, 1:2])) * (2 / H) - 1
        grid = torch.empty(len(idx), n, n, 2, dtype=images.dtype, device=device)
        grid[..., 0] = gx.to(device, images.dtype)[:, None, :]
        grid[..., 1] = gy.to(device, images.dtype)[:, :, None]
        sampled = F.grid_sample(
            source[v:v + 1], grid.reshape(1, len(idx) * n, n, 2),
            mode="bilinear", padding_mode="zeros", align_corners=False,
        )  # [1, C, G * n, n]
        if f > 1:  # crops are stacked at multiples of n = size * f rows: pooling never mixes two
            sampled = F.avg_pool2d(sampled, f)
        out[idx.to(device)] = sampled.reshape(C, len(idx), size, size).transpose(0, 1)
    return out + fill_t if source is not images else out


def pool_segments(
    crop_embedding: torch.Tensor, segment: np.ndarray, weight: np.ndarray, num_segments: int
) -> np.ndarray:
    """Weighted average of crop embeddings per segment, renormalised.

    Args:
        crop_embedding: float [K, D] (unit rows).
        segment: int [K]; weight: float [K].
    Returns:
        float32 [S, D]: unit rows for segments with crops, zero rows for the others.
    """
    device = crop_embedding.device
    out = torch.zeros(num_segments, crop_embedding.shape[1], dtype=torch.float32, device=device)
    w = torch.as_tensor(weight, dtype=torch.float32, device=device)[:, None]
    out.index_add_(0, torch.as_tensor(segment, dtype=torch.long, device=device), crop_embedding.float() * w)
    return F.normalize(out, dim=-1).cpu().numpy()  # normalize leaves zero rows zero


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
        encoder: a loaded CLIP model (`pipeline.clip_model.load_encoder`).
        num_segments: S (default max segment id + 1).
    Returns:
        SceneEmbedding: view [V, D], segment [S, D] (unit, zero where unseen), seen [S].
    """
    work = _prepare("scene", view_rgb, point_index, segment, encoder, cfg, num_segments)
    batch = _batch_size(cfg, encoder)
    for pixels in work.pixel_chunks(encoder, batch, cfg.max_supersample):
        work.outputs.append(encoder.encode_pixels(pixels, batch_size=batch))
    return work.finish(encoder.dim)


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


# --- store runners ----------------------------------------------------------------------------
def scene_config_hash(store: Store, scene_id: str, cfg: EmbedConfig) -> str:
    """Hash of the result-changing config, the overseg and render records and the model identity."""
    upstream = []
    for stage in ("overseg", "render"):
        record = store.stage_record(scene_id, stage)
        if record is None:
            raise SceneError(scene_id, None, f"no {stage} output; run `ws3d {stage}` before `ws3d embed`")
        upstream.append(str(record.get("config_hash")))
    if not cfg.model:
        raise ValueError("EmbedConfig.model is empty: give a CLIP folder or hub id (model=...)")
    return config_hash(_result_fields(cfg), *upstream, model_identity(cfg.model))


def _encoder(cfg: EmbedConfig) -> ClipEncoder:
    return cached_encoder(cfg.model, device=cfg.device, dtype=cfg.dtype, allow_download=cfg.allow_download)


def _read_scene(store: Store, scene_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        store.read(scene_id, schema.VIEW_RGB),
        store.read(scene_id, schema.VIEW_POINT_INDEX),
        store.read(scene_id, schema.SEGMENT),
    )


def _write(store: Store, scene_id: str, cfg: EmbedConfig, h: str, result: SceneEmbedding,
           identity: str, seconds: float) -> SceneResult:
    stats = {
        "views": int(len(result.view)), "segments": int(len(result.segment)),
        "seen": int(result.seen.sum()), "crops": int(result.crops), "dim": int(result.view.shape[1]),
        "model": identity, "seconds": round(seconds, 3),
    }
    store.write_stage(
        scene_id, STAGE,
        {
            schema.CLIP_VIEW: result.view,
            schema.CLIP_SEGMENT: result.segment,
            schema.CLIP_SEGMENT_SEEN: result.seen.astype(np.uint8),
        },
        record={"config": to_dict(cfg), "config_hash": h, "stats": stats},
    )
    return SceneResult(scene_id, "done", seconds=seconds, stats=stats)


def run_scene(store_path: str, scene_id: str, cfg: EmbedConfig, force: bool = False) -> SceneResult:
    """Embed one scene of a store and write its `clip` group (skipped if already complete)."""
    store = Store.open(store_path)
    h = scene_config_hash(store, scene_id, cfg)
    if not force and store.is_complete(scene_id, STAGE, h):
        return SceneResult(scene_id, "skipped")
    start = time.perf_counter()
    encoder = _encoder(cfg)
    try:
        view_rgb, point_index, segment = _read_scene(store, scene_id)
        result = embed_scene(view_rgb, point_index, segment, encoder, cfg)
    except (KeyError, ValueError) as exc:
        raise SceneError(scene_id, None, f"embed: {exc}") from exc
    return _write(store, scene_id, cfg, h, result, encoder.identity, time.perf_counter() - start)


def embed_scenes(
    store_path: str, scene_ids: Sequence[str], cfg: EmbedConfig, *, force: bool = False, verbose: bool = True
) -> list[SceneResult]:
    """Embed many scenes with one model, batching crops across scenes (the GPU path).

    Scenes are read one ahead in a background thread; the encoder sees full batches of
    `batch_size` images regardless of scene boundaries. Complete scenes are skipped; a scene
    that fails is reported and the others go on. Prints images/s when `verbose`.
    """
    store = Store.open(store_path)
    encoder = _encoder(cfg)
    batch = _batch_size(cfg, encoder)
    results: dict[str, SceneResult] = {}
    todo: list[tuple[str, str]] = []
    for scene_id in scene_ids:
        try:
            h = scene_config_hash(store, scene_id, cfg)
        except SceneError as exc:
            results[scene_id] = SceneResult(scene_id, "failed", error=str(exc), file=exc.file)
            continue
        if not force and store.is_complete(scene_id, STAGE, h):
            results[scene_id] = SceneResult(scene_id, "skipped")
        else:
            todo.append((scene_id, h))

    images = 0
    start = time.perf_counter()
    open_works: deque[_SceneWork] = deque()
    buffer: list[tuple[_SceneWork, torch.Tensor]] = []

    def flush() -> None:
        nonlocal images
        if buffer:
            pixels = torch.cat([p for _, p in buffer])
            emb = encoder.encode_pixels(pixels, batch_size=batch)
            images += len(pixels)
            offset = 0
            for work, p in buffer:
                work.outputs.append(emb[offset:offset + len(p)])
                offset += len(p)
            buffer.clear()
        # scenes whose images have all been cut and encoded are written, in order
        while open_works and open_works[0].produced and open_works[0].received == open_works[0].total:
            work = open_works.popleft()
            results[work.scene_id] = _write(
                store, work.scene_id, cfg, work.config_hash, work.finish(encoder.dim), encoder.identity,
                time.perf_counter() - work.start,
            )

    with ThreadPoolExecutor(max_workers=1) as pool:
        queue = iter(todo)
        reading: deque[tuple[str, str, Future]] = deque()

        def read_next() -> None:
            item = next(queue, None)
            if item is not None:
                reading.append((item[0], item[1], pool.submit(_read_scene, store, item[0])))

        read_next()
        while reading:
            scene_id, h, future = reading.popleft()
            read_next()  # the next scene decompresses while this one is encoded
            t0 = time.perf_counter()
            try:
                work = _prepare(scene_id, *future.result(), encoder, cfg, None)
            except (KeyError, ValueError) as exc:
                results[scene_id] = SceneResult(scene_id, "failed", error=f"scene {scene_id}: embed: {exc}")
                continue
            work.config_hash, work.start = h, t0
            open_works.append(work)
            for pixels in work.pixel_chunks(encoder, batch, cfg.max_supersample):
                buffer.append((work, pixels))
                if sum(len(p) for _, p in buffer) >= batch:
                    flush()
            work.produced = True
        flush()
    seconds = time.perf_counter() - start
    if verbose and todo:
        print(
            f"embed: {len(todo)} scenes, {images} images in {seconds:.1f} s "
            f"({images / max(seconds, 1e-9):.1f} images/s) on {encoder.device} {str(encoder.dtype).replace('torch.', '')}, "
            f"batch {batch}"
        )
    return [results[s] for s in scene_ids]


def model_templates(model: str | None) -> tuple[str, ...]:
    """The prompt templates a teacher folder was trained with, else `DEFAULT_TEMPLATES`."""
    if model and is_local_model(model):
        path = Path(model).expanduser() / "teacher_config.json"
        if path.is_file():
            templates = json.loads(path.read_text()).get("config", {}).get("templates")
            if templates:
                return tuple(templates)
    return DEFAULT_TEMPLATES


def teacher_corpus_record(model: str | None) -> dict[str, Any] | None:
    """A teacher folder's corpus record (`teacher_corpus.json`: store, scenes, caption vocabulary);
    None for a model without one (a real CLIP learnt from other images)."""
    if not model or not is_local_model(model):
        return None
    path = Path(model).expanduser() / "teacher_corpus.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_vocabulary(
    store_path: str,
    model: str | ClipEncoder,
    names: Sequence[str] | None = None,
    vocab_name: str = "classes",
    templates: Sequence[str] | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
) -> dict[str, Any]:
    """Embed a vocabulary (default: the store's class names) and write `vocab/<vocab_name>`.

    `templates` default: the ones a teacher folder was trained with (its teacher_config.json),
    else `DEFAULT_TEMPLATES`. The attrs hold `names`, `prompts` (the templates) and `model` (the
    model identity, so a reader can check that scene and text embeddings share one model), and for
    a teacher folder `teacher_corpus`: what it was fitted on (checked by pre-training/fine-tuning).
    """
    store = Store.open(store_path)
    encoder = model if isinstance(model, ClipEncoder) else cached_encoder(model, device=device, dtype=dtype)
    if templates is None:
        templates = model_templates(model if isinstance(model, str) else None)
    names = list(store.class_names if names is None else names)
    text = embed_vocabulary(names, templates, encoder)
    attrs = {"names": names, "prompts": list(templates), "model": encoder.identity, "dim": int(text.shape[1])}
    provenance = teacher_corpus_record(model if isinstance(model, str) else None)
    if provenance is not None:  # what the teacher was fitted on: the trainers check it against their scenes
        attrs["teacher_corpus"] = provenance
    store.write_vocab(vocab_name, text, attrs)
    return {"vocab": vocab_name, "classes": len(names), "dim": int(text.shape[1]), "model": encoder.identity}


def summarise(store: Store) -> dict[str, Any]:
    """For `ws3d info`: scenes embedded, views/segments/seen totals, models, vocabularies."""
    done, views, segments, seen, models = 0, 0, 0, 0, set()
    for scene_id in store.scene_ids():
        record = store.stage_record(scene_id, STAGE)
        if record is None:
            continue
        stats = record.get("stats", {})
        done += 1
        views += stats.get("views", 0)
        segments += stats.get("segments", 0)
        seen += stats.get("seen", 0)
        models.add(stats.get("model", "?"))
    return {
        "scenes_embedded": done, "views": views, "segments": segments,
        "segments_seen": seen, "models": sorted(models), "vocabularies": store.vocab_names(),
    }
