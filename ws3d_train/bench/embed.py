"""The CLIP side of `make bench`: encoder throughput, and what each embed mode costs and gives.

- `bench_embed`: `ClipEncoder.encode_images` (torch preprocessing + forward pass) on random
  240 x 320 view-sized images for two models: the offline teacher (a given folder, or a randomly
  initialised model of the default `TeacherConfig` size) and a randomly initialised ViT-B/32-sized
  vision tower (OpenAI CLIP ViT-B/32 shapes; its text tower is shrunk since only images are timed).
- `bench_embed_modes`: crops and seconds per scan of every `EmbedConfig.mode` side by side, in one
  process, on one scene (the real ScanNet sample when `../shared/data` has it, else a synthetic
  room) with a ViT-B/16-sized model: the issue-26 comparison of "packed" against "crops".
- `segment_accuracy`: the quality side: each seen segment's stored-style embedding classified by
  its nearest class prompt against the segment's majority class (a teacher or any CLIP folder;
  evaluation only, nothing is chosen on the scenes it is given). `python -m ws3d_train.bench.embed`
  runs it for several configs on a demo store.

Weights do not change the speed, so no download is needed. Device and dtype follow the embed
stage's automatic choice (cuda > cpu; bf16/fp16 on GPU, fp32 on CPU).

Reads: the teacher folder if given; the real ScanNet sample if present; a store for
`segment_accuracy`. Writes nothing but a temporary store of the scan it times.
"""
from __future__ import annotations

import time
from pathlib import Path
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


VIT_B16 = {"image_size": 224, "patch_size": 16, "hidden_size": 768, "intermediate_size": 3072,
           "num_hidden_layers": 12, "num_attention_heads": 12}
"""OpenAI CLIP ViT-B/16 vision tower shapes (projection 512): the issue's reference encoder."""


def _bench_scene(folder: Path) -> tuple[str, str]:
    """(store, scene): the real ScanNet sample ingested, over-segmented and rendered, when present;
    else one synthetic room."""
    from pipeline.datasets.ingest import INGEST, IngestConfig
    from pipeline.overseg.config import OversegConfig
    from pipeline.overseg.stage import OVERSEG
    from pipeline.render.config import RenderConfig
    from pipeline.render.stage import RENDER
    from pipeline.stage import StageRun, run_scene
    from pipeline.store import Store
    from ws3d_train.bench import SHARED_DATA

    raw = SHARED_DATA / "scannet"
    if (raw / "scans" / "scene0470_00").is_dir():
        from pipeline.datasets import scannet

        dataset, scene_id, names = "scannet", "scene0470_00", list(scannet.CLASS_NAMES)
    else:
        from pipeline.datasets.synthetic import CLASS_NAMES, synthesise

        raw = folder / "raw"
        dataset, scene_id, names = "synthetic", synthesise(raw, 1, seed=0)[0], list(CLASS_NAMES)
    store = Store.create(folder / "scan.zarr", dataset=dataset, class_names=names)
    for stage, cfg, raw_dir in ((INGEST, IngestConfig(dataset=dataset), str(raw)), (OVERSEG, OversegConfig(), None),
                                (RENDER, RenderConfig(), None)):
        result = run_scene(stage, StageRun(str(store.path), cfg, raw=raw_dir), scene_id)
        if result.status != "done":
            raise RuntimeError(f"bench scene {scene_id}: {stage.name} {result.status}: {result.error}")
    return str(store.path), scene_id


def _time_mode(encoder: ClipEncoder, arrays: tuple[np.ndarray, np.ndarray, np.ndarray], cfg: Any,
               crops_sample: int | None, rng: np.random.Generator) -> dict[str, Any]:
    """Wall and CPU seconds of one scene through the embed core: `_prepare`, then every chunk cut
    and through the encoder. All of it, or for mode "crops" above `crops_sample` crops the views
    and a random sample of the crops, the rest extrapolated at the sample's seconds per crop (each
    crop is one encoder image of the same size, so its cost is linear in crops). CPU seconds are
    the steadier figure on shared cores (a busy machine stretches wall time, not work)."""
    import torch

    from pipeline.embed.core import _prepare, batch_size, encode_chunk

    def clocks() -> np.ndarray:
        return np.array([time.perf_counter(), time.process_time()])

    batch = batch_size(cfg, encoder)
    t0 = clocks()
    work = _prepare("bench", *arrays, encoder, cfg, None)
    phase = {"prepare": clocks() - t0, "views": np.zeros(2), "crops": np.zeros(2)}
    crops = len(work.crop_view)
    sampled = not work.packed and crops_sample is not None and crops > crops_sample  # packed: always whole
    if sampled:
        keep = np.sort(rng.choice(crops, crops_sample, replace=False))
        work.crop_view, work.crop_box = work.crop_view[keep], work.crop_box[keep]
    view_chunks = -(-len(work.view_pixels) // batch)  # `chunks` yields the views first
    chunks = work.chunks(encoder, batch, cfg.max_supersample)
    for i in range(view_chunks + -(-len(work.crop_view) // batch)):
        t0 = clocks()
        encode_chunk(encoder, next(chunks), cfg, batch)  # cutting the crops counts too
        if encoder.device.type == "cuda":
            torch.cuda.synchronize()
        phase["views" if i < view_chunks else "crops"] += clocks() - t0
    per_crop = phase["crops"] / max(1, len(work.crop_view))
    total = phase["prepare"] + phase["views"] + per_crop * crops
    return {"crops": crops, "views": int(len(work.view_pixels)), "images": crops + int(len(work.view_pixels)),
            "regions": int(len(work.region_crop)) if work.packed else crops,
            "segments_seen": int(work.seen.sum()), "seconds": round(float(total[0]), 4),
            "cpu_seconds": round(float(total[1]), 4), "seconds_per_crop": round(float(per_crop[0]), 4),
            "cpu_seconds_per_crop": round(float(per_crop[1]), 4), "prepare_seconds": round(float(phase["prepare"][0]), 4),
            "crops_timed": int(len(work.crop_view)), "extrapolated": sampled}


def _warm_up(encoder: ClipEncoder, arrays: tuple[np.ndarray, np.ndarray, np.ndarray], cfgs: Sequence[Any]) -> None:
    """First calls compile or load kernels (numba, torch): made before anything is timed."""
    from pipeline.embed.core import _prepare, encode_chunk

    for cfg in cfgs:
        chunk = next(iter(_prepare("warm-up", *arrays, encoder, cfg, None).chunks(encoder, 2, cfg.max_supersample)))
        encode_chunk(encoder, chunk, cfg, 2)
        encoder.encode_regions(chunk.pixels, np.zeros(1, np.int64), np.ones((1, encoder.patch_grid ** 2), np.float32))


def bench_embed_modes(
    store_path: str | None = None,
    scene_id: str | None = None,
    *,
    model_dir: str | None = None,
    vision: dict[str, int] | None = None,
    modes: Sequence[str] = ("packed", "crops"),
    crops_sample: int | None = 192,
    device: str = "auto",
    dtype: str = "auto",
    verbose: bool = True,
) -> dict[str, Any]:
    """Crops and seconds per scan of each embed mode, side by side in one process on one scene.

    Args:
        store_path, scene_id: a rendered and over-segmented scene; None: the real ScanNet sample
            (else a synthetic room) preprocessed into a temporary store.
        model_dir: a CLIP folder; None: a randomly initialised model with `vision` shapes
            (default ViT-B/16: weights do not change the time).
        crops_sample: time at most this many crops per mode and extrapolate the rest (None: all;
            a ViT-B/16 encodes ~4 crops/s on two CPU cores, today's crops mode ~4,000 a scan).
    Returns:
        {"scene", "segments", "model", "device", "modes": {mode: {"crops", "images", "regions",
         "seconds", "cpu_seconds", ...}}, "ratios": {"crops_over_<mode>", "images_crops_over_<mode>",
         "seconds_crops_over_<mode>", "cpu_seconds_crops_over_<mode>"}}
    """
    import tempfile

    from pipeline import schema
    from pipeline.embed.config import EmbedConfig
    from pipeline.store import Store

    folder = None
    if store_path is None:
        folder = Path(tempfile.mkdtemp(prefix="ws3d-bench-embed-"))
        store_path, scene_id = _bench_scene(folder)
    store = Store.open(store_path)
    scene_id = scene_id or store.scene_ids()[0]
    arrays = (store.read(scene_id, schema.VIEW_RGB), store.read(scene_id, schema.VIEW_POINT_INDEX),
              store.read(scene_id, schema.SEGMENT).astype(np.int64))
    encoder = (load_encoder(model_dir, device=device, dtype=dtype) if model_dir is not None
               else _random_encoder(vision or VIT_B16, 512, device, dtype))
    report: dict[str, Any] = {"scene": scene_id, "segments": int(arrays[2].max()) + 1, "points": int(len(arrays[2])),
                              "model": model_dir or f"random {encoder.image_size}px/{encoder.patch_grid}x{encoder.patch_grid} patches",
                              "device": str(encoder.device), "modes": {}}
    rng = np.random.default_rng(0)
    _warm_up(encoder, arrays, [EmbedConfig(model="bench", mode=mode) for mode in modes])
    for mode in modes:
        entry = _time_mode(encoder, arrays, EmbedConfig(model="bench", mode=mode), crops_sample, rng)
        report["modes"][mode] = entry
        if verbose:
            print(f"embed modes: {mode}: {entry['crops']} crops + {entry['views']} views for {entry['segments_seen']} "
                  f"segments, {entry['seconds']:.1f} s ({entry['cpu_seconds']:.1f} CPU s)"
                  f"{' (extrapolated)' if entry['extrapolated'] else ''} on {encoder.device}")
    if "crops" in report["modes"]:
        ref = report["modes"]["crops"]
        for mode, entry in report["modes"].items():
            if mode != "crops":
                report.setdefault("ratios", {})[f"crops_over_{mode}"] = round(ref["crops"] / max(1, entry["crops"]), 2)
                report["ratios"][f"images_crops_over_{mode}"] = round(ref["images"] / max(1, entry["images"]), 2)
                report["ratios"][f"seconds_crops_over_{mode}"] = round(ref["seconds"] / max(1e-9, entry["seconds"]), 2)
                report["ratios"][f"cpu_seconds_crops_over_{mode}"] = round(ref["cpu_seconds"] / max(1e-9, entry["cpu_seconds"]), 2)
    return report


def segment_accuracy(
    store_path: str,
    scene_ids: Sequence[str],
    model_dir: str,
    configs: dict[str, Any],
    *,
    ov_split: str | None = None,
    min_purity: float = 0.6,
    verbose: bool = True,
) -> dict[str, Any]:
    """How well each embed config's segment embeddings name their segments' classes.

    Every segment with a majority class (>= `min_purity` of its points; ignored classes left out) is
    classified by its nearest class prompt (the model's templates, as the stage's vocabulary);
    an unseen segment counts as wrong. Embeddings are computed in memory (`embed_scene`), the
    store is not written. Evaluation only: the labels of these scenes decide nothing.

    Args:
        configs: name -> `EmbedConfig` (its `model` is replaced by `model_dir`).
        ov_split: a split of the store's dataset (e.g. "b15n4") for base/novel figures.
    Returns:
        {name: {"segment_accuracy", "point_accuracy" (segments weighted by their points),
         "class_accuracy" (mean over classes), "*_base", "*_novel", "segments", "crops",
         "images", "seconds", "per_scene": {scene: segment accuracy}}}
    """
    import dataclasses

    from pipeline import schema
    from pipeline.clip.model import embed_vocabulary
    from pipeline.embed.core import embed_scene
    from pipeline.store import Store
    from pipeline.teacher.crops import unit_classes
    from pipeline.teacher.folder import model_templates
    from ws3d_train.run import resolve_ov_split

    store = Store.open(store_path)
    names = store.class_names
    split = resolve_ov_split(ov_split, names, store.dataset) if ov_split else None
    ignored = set(split.ignored) if split else set()
    candidates = np.array([c for c in range(len(names)) if c not in ignored])
    encoder = load_encoder(model_dir, device="cpu", dtype="fp32")
    text = embed_vocabulary([names[c] for c in candidates], model_templates(model_dir), encoder)
    out: dict[str, Any] = {}
    for name, cfg in configs.items():
        cfg = dataclasses.replace(cfg, model=model_dir)
        hit, cls, size, crops, images, seconds, per_scene = [], [], [], 0, 0, 0.0, {}
        for scene_id in scene_ids:
            segment = store.read(scene_id, schema.SEGMENT).astype(np.int64)
            semantic = store.read(scene_id, schema.SEMANTIC).astype(np.int64)
            S = int(segment.max()) + 1
            t0 = time.perf_counter()
            emb = embed_scene(store.read(scene_id, schema.VIEW_RGB), store.read(scene_id, schema.VIEW_POINT_INDEX),
                              segment, encoder, cfg, num_segments=S)
            seconds += time.perf_counter() - t0
            crops += emb.crops
            images += emb.crops + len(emb.view)
            majority = unit_classes(segment, semantic, len(names), min_purity)
            keep = (majority >= 0) & ~np.isin(majority, list(ignored))
            pred = candidates[(emb.segment @ text.T).argmax(axis=1)]
            hit.append(((pred == majority) & emb.seen)[keep])
            per_scene[scene_id] = float(hit[-1].mean()) if keep.any() else float("nan")
            cls.append(majority[keep])
            size.append(np.bincount(segment, minlength=S)[keep])
        h, c, w = np.concatenate(hit), np.concatenate(cls), np.concatenate(size).astype(np.float64)
        entry: dict[str, Any] = {"segments": int(len(h)), "crops": crops, "images": images, "seconds": round(seconds, 1),
                                 "per_scene": per_scene}
        groups = {"": np.ones(len(c), bool)}
        if split:
            groups.update({"_base": np.isin(c, split.base), "_novel": np.isin(c, split.novel)})
        for suffix, m in groups.items():
            entry[f"segment_accuracy{suffix}"] = float(h[m].mean()) if m.any() else float("nan")
            entry[f"point_accuracy{suffix}"] = float((h * w)[m].sum() / w[m].sum()) if m.any() else float("nan")
            entry[f"class_accuracy{suffix}"] = (float(np.mean([h[m & (c == k)].mean() for k in np.unique(c[m])]))
                                                if m.any() else float("nan"))
        out[name] = entry
        if verbose:
            print(f"segment accuracy [{name}]: segments {entry['segment_accuracy']:.3f}, points "
                  f"{entry['point_accuracy']:.3f}, classes {entry['class_accuracy']:.3f}"
                  + (f", novel {entry['segment_accuracy_novel']:.3f}/{entry['point_accuracy_novel']:.3f}" if split else "")
                  + f"; {crops} crops, {seconds:.0f} s", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import json

    from pipeline.config import from_dict
    from pipeline.embed.config import EmbedConfig

    parser = argparse.ArgumentParser(prog="python -m ws3d_train.bench.embed",
                                     description="Segment accuracy of embed configs on a store (see segment_accuracy).")
    parser.add_argument("--store", required=True)
    parser.add_argument("--model", required=True, help="CLIP or teacher folder")
    parser.add_argument("--scenes", required=True, help="a file with one scene id per line")
    parser.add_argument("--ov-split", default=None)
    parser.add_argument("--configs", required=True,
                        help='JSON: name -> EmbedConfig fields, e.g. {"crops": {"mode": "crops"}, "packed": {}}')
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    scenes = [line.strip() for line in Path(args.scenes).read_text().splitlines() if line.strip()]
    configs = {name: from_dict(EmbedConfig, fields, where=f"configs.{name}")
               for name, fields in json.loads(args.configs).items()}
    result = segment_accuracy(args.store, scenes, args.model, configs, ov_split=args.ov_split)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
