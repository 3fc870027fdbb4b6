"""Crops of over-segments out of rendered views, and pooling their embeddings per segment.

Pure (arrays in, arrays out): which views show each segment best (`segment_crops`, from the
pixel->point map only), cutting square context boxes out of images with antialiasing
(`extract_crops`, torch on any device), and the weighted average of crop embeddings per segment
(`pool_segments`). The embed stage and the teacher's training crops both use them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange


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
    box: np.ndarray, *, scale: float, min_side: float, height: int, width: int, dtype: type = np.float32
) -> np.ndarray:
    """Square context boxes around inclusive pixel boxes.

    Args:
        box: int [K, 4] inclusive (x0, y0, x1, y1).
    Returns:
        [K, 4] (x0, y0, x1, y1) continuous (`dtype`, float32 by default): side = max(w, h) * scale (at least `min_side`),
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
    return np.stack([cx - half, cy - half, cx + half, cy + half], axis=1).astype(dtype)


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
class PackedCrops:
    """Crops shared by several segments (`pack_crops`). K crops, R regions, S segments.

    A region is one segment read out of one crop (by a masked class token,
    `pipeline.clip.model.ClipEncoder.encode_regions`); each seen segment has one region in each
    of its `views` best views.
    """

    view: np.ndarray
    """int64 [K] view each crop is cut from."""
    box: np.ndarray
    """float32 [K, 4] square crop box (x0, y0, x1, y1), continuous pixel coordinates (as `SegmentCrops.box`)."""
    region_crop: np.ndarray
    """int64 [R] crop of each region (regions are ordered by crop, then segment)."""
    region_segment: np.ndarray
    """int64 [R] segment of each region."""
    region_weight: np.ndarray
    """float32 [R] weight of each region in its segment's average (each seen segment's sum to 1)."""
    seen: np.ndarray
    """bool [S] segments with a qualifying view (exactly those with a region)."""
    pixels: np.ndarray
    """int64 [V, S] pixels of each segment in each view."""


def _cover(member: np.ndarray) -> np.ndarray:
    """Greedy set cover: rows are candidate crops, columns the segments they can host (the diagonal
    is True: every segment can go in its own candidate). Returns int64 [n] the chosen rows, each
    taking the most segments not yet covered (ties: the lowest row)."""
    left = np.ones(member.shape[1], bool)
    gain = member.sum(axis=1)
    chosen = []
    while left.any():
        a = int(gain.argmax())
        chosen.append(a)
        newly = member[a] & left
        left &= ~newly
        gain -= member[:, newly].sum(axis=1)
    return np.asarray(chosen, np.int64)


def pack_crops(
    point_index: np.ndarray,
    segment: np.ndarray,
    *,
    num_segments: int | None = None,
    views: int = 1,
    min_pixels: int = 16,
    scale: float = 1.5,
    zoom: float = 2.0,
    min_side: float = 16.0,
) -> PackedCrops:
    """Crops that each host several segments, every segment in the views that show it best.

    A segment's own context side in a view is c = max(box side x `scale`, `min_side`).
    Candidate crops are centred on each segment of a view with sides 1, sqrt(zoom) and zoom
    times its c (shifted to stay in the view, as `square_boxes`); a candidate hosts every segment
    of that view whose pixel box lies inside it and whose c is between side / zoom and side (so no
    segment is shrunk more than `zoom` times below its own context crop). A greedy set cover per
    view keeps the candidates that host the most segments not yet hosted (ties: the smaller
    side, then the lower segment id); each segment is then read out of the first chosen crop that
    hosts it.

    Args:
        point_index: int32 [V, H, W] point shown by each pixel, -1 = nothing.
        segment: int [N] segment of each point, 0..S-1 (-1 = none).
        num_segments: S (default: max segment id + 1).
        views: a segment is read out of its `views` best views (most pixels, each with at least
            `min_pixels`; ties: the lower view id), weighted by its pixels in each.
        min_pixels: a view qualifies for a segment with at least this many of its pixels.
        scale: context scale of a segment's own box.
        zoom: >= 1; 1 = about one crop per segment and view (its own context box).
        min_side: smallest context side in pixels.
    Returns:
        PackedCrops (K <= R = the qualifying (segment, view) pairs).
    """
    if zoom < 1:
        raise ValueError(f"zoom must be >= 1, got {zoom}")
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    segment = np.asarray(segment)
    S = int(num_segments if num_segments is not None else (segment.max() + 1 if len(segment) else 0))
    V, H, W = point_index.shape
    counts, boxes = segment_pixel_boxes(point_index, segment, S)
    if V == 0 or S == 0:
        empty = np.zeros(0, np.int64)
        return PackedCrops(empty, np.zeros((0, 4), np.float32), empty, empty, np.zeros(0, np.float32),
                           np.zeros(S, bool), counts)
    k = min(views, V)
    order = np.argsort(-counts.T, axis=1, kind="stable")[:, :k]  # [S, k] best views, ties: lower id
    best = np.take_along_axis(counts.T, order, axis=1)
    ok = best >= max(min_pixels, 1)
    seg_ids, rank = np.nonzero(ok)
    item_view = order[seg_ids, rank]
    weight = best[seg_ids, rank].astype(np.float64)
    weight /= np.bincount(seg_ids, weights=weight, minlength=S)[seg_ids]
    box = boxes[item_view, seg_ids].astype(np.float64)  # inclusive pixel boxes
    context = np.maximum(np.maximum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]) + 1, 0) * scale
    context = np.maximum(context, min_side)
    # candidate sides: the segment's own context, sqrt(zoom) and zoom times it (the middle one
    # always hosts its own segment, so the cover exists)
    grows = (1.0,) if zoom == 1 else (1.0, float(np.sqrt(zoom)), float(zoom))
    crop_view, crop_box = [], []
    region_items = [np.zeros(0, np.int64)]
    eps = 1e-6
    for v in np.unique(item_view):
        rows = np.flatnonzero(item_view == v)  # this view's segments, by segment id
        b, c = box[rows], context[rows]
        t = np.concatenate([square_boxes(boxes[v, seg_ids[rows]], scale=scale * g, min_side=min_side * g,
                                         height=H, width=W, dtype=np.float64) for g in grows])
        T = t[:, 2] - t[:, 0]
        member = ((b[None, :, 0] >= t[:, None, 0] - eps) & (b[None, :, 1] >= t[:, None, 1] - eps)
                  & (b[None, :, 2] + 1 <= t[:, None, 2] + eps) & (b[None, :, 3] + 1 <= t[:, None, 3] + eps)
                  & (c[None, :] <= T[:, None] * (1 + eps)) & (T[:, None] <= zoom * c[None, :] * (1 + eps)))
        own = len(rows) * (len(grows) // 2) + np.arange(len(rows))
        member[own, np.arange(len(rows))] = True
        chosen = _cover(member)
        host = member[chosen].argmax(axis=0)  # first chosen crop that hosts each segment
        for j, a in enumerate(chosen):
            crop_view.append(v)
            crop_box.append(t[a])
            region_items.append(rows[host == j])
    region_count = [len(r) for r in region_items[1:]]
    items = np.concatenate(region_items)
    return PackedCrops(
        view=np.asarray(crop_view, np.int64), box=np.asarray(crop_box, np.float32).reshape(-1, 4),
        region_crop=np.repeat(np.arange(len(crop_view)), region_count).astype(np.int64),
        region_segment=seg_ids[items].astype(np.int64), region_weight=weight[items].astype(np.float32),
        seen=ok.any(axis=1), pixels=counts,
    )


def region_patch_masks(
    point_index: np.ndarray,
    segment: np.ndarray,
    view: np.ndarray,
    box: np.ndarray,
    region_crop: np.ndarray,
    region_segment: np.ndarray,
    *,
    grid: int,
    samples: int = 4,
) -> np.ndarray:
    """The share of each model patch of a crop that shows a region's segment.

    Each crop is divided into grid x grid patches (the vision transformer's patches once the crop
    is resampled to the model's input, as `extract_crops` does); each patch is sampled at
    samples x samples points (nearest pixel), outside the view counting as no segment.

    Args:
        point_index: int32 [V, H, W]; segment: int [N] (-1 = none).
        view, box: the crops (int [K], float [K, 4] continuous pixel coordinates).
        region_crop, region_segment: int [R] each.
    Returns:
        float32 [R, grid * grid] in 0..1, row-major patches.
    """
    _, H, W = point_index.shape
    R = len(region_crop)
    if R == 0:
        return np.zeros((0, grid * grid), np.float32)
    segment = np.asarray(segment, np.int64)
    n = grid * samples
    t = (np.arange(n) + 0.5) / n  # sample centres across the crop, 0..1
    box = np.asarray(box, np.float64)
    xs = np.floor(box[:, 0:1] + t * (box[:, 2:3] - box[:, 0:1])).astype(np.int64)  # [K, n]
    ys = np.floor(box[:, 1:2] + t * (box[:, 3:4] - box[:, 1:2])).astype(np.int64)
    inside = (xs >= 0) & (xs < W), (ys >= 0) & (ys < H)
    xs, ys = np.clip(xs, 0, W - 1), np.clip(ys, 0, H - 1)
    out = np.empty((R, grid * grid), np.float32)
    step = max(1, (1 << 22) // (n * n))  # regions per block: ~4M samples at a time (memory)
    for start in range(0, R, step):
        k = np.asarray(region_crop[start:start + step], np.int64)
        pts = point_index[np.asarray(view, np.int64)[k][:, None, None], ys[k][:, :, None], xs[k][:, None, :]]
        ids = np.where(pts >= 0, segment[np.maximum(pts, 0)], -1)
        ids = np.where(inside[1][k][:, :, None] & inside[0][k][:, None, :], ids, -1)
        hit = ids == np.asarray(region_segment[start:start + step], np.int64)[:, None, None]
        out[start:start + step] = hit.reshape(-1, grid, samples, grid, samples).mean(axis=(2, 4)).reshape(-1, grid * grid)
    return out
