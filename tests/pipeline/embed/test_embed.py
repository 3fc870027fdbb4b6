"""CLIP embedding stage: crops against brute force, embeddings against direct CLIPModel calls, store round trip."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import schema
from pipeline.clip.defaults import DEFAULT_TEMPLATES, is_local_model
from pipeline.clip.model import load_encoder, model_identity
from pipeline.embed.config import EmbedConfig
from pipeline.embed.core import embed_scene
from pipeline.embed.stage import embed_scenes, run_vocabulary, summarise
from pipeline.clip.model import embed_vocabulary
from pipeline.clip.crops import extract_crops, segment_crops, segment_pixel_boxes
from pipeline.embed.stage import EMBED
from pipeline.store import Store
from pipeline.teacher.config import TeacherConfig
from pipeline.teacher.fit import _clip_config
from pipeline.teacher.captions import train_tokenizer

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)
IMAGE = 32  # model input side; the views below are 24 x 32 so that "pad" needs no resampling


def _tiny_model(folder, seed: int = 0):
    from transformers import CLIPModel

    cfg = TeacherConfig(image_size=IMAGE, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2,
                        text_width=32, text_layers=2, text_heads=2, projection_dim=16, max_text_length=24)
    tokenizer = train_tokenizer(["a photo of a chair.", "a table in a room."], folder, vocab_size=300)
    torch.manual_seed(seed)
    CLIPModel(_clip_config(cfg, tokenizer)).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN, "image_std": STD}))
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _tiny_model(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def encoder(model_dir):
    return load_encoder(str(model_dir), device="cpu")


def _scene(seed: int = 0, V: int = 3, H: int = 24, W: int = 32, N: int = 400, S: int = 12):
    rng = np.random.default_rng(seed)
    segment = rng.integers(0, S, N).astype(np.int32)
    segment[:S] = np.arange(S)  # every id exists
    point_index = np.full((V, H, W), -1, np.int32)
    # blocky layout: each view shows rectangles of random segments (+ some holes)
    for v in range(V):
        for _ in range(6):
            y0, x0 = rng.integers(0, H - 4), rng.integers(0, W - 4)
            h, w = rng.integers(3, H - y0 + 1), rng.integers(3, W - x0 + 1)
            s = rng.integers(0, S - 2)  # the last two segments are never shown
            pts = np.flatnonzero(segment == s)
            point_index[v, y0:y0 + h, x0:x0 + w] = rng.choice(pts, (h, w))
    rgb = rng.integers(0, 256, (V, H, W, 3)).astype(np.uint8)
    return rgb, point_index, segment, S


# --- pure cores against brute force ------------------------------------------------------------
def test_segment_pixel_boxes_brute_force():
    _, point_index, segment, S = _scene(1)
    counts, boxes = segment_pixel_boxes(point_index, segment, S)
    V = point_index.shape[0]
    for v in range(V):
        seg_img = np.where(point_index[v] >= 0, segment[np.maximum(point_index[v], 0)], -1)
        for s in range(S):
            ys, xs = np.nonzero(seg_img == s)
            assert counts[v, s] == len(ys)
            if len(ys):
                assert boxes[v, s].tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]


def test_segment_crops_brute_force():
    _, point_index, segment, S = _scene(2)
    V, H, W = point_index.shape
    k, min_pixels, scales = 2, 10, (1.0, 2.0)
    crops = segment_crops(point_index, segment, num_segments=S, k=k, min_pixels=min_pixels, scales=scales, min_side=4)
    counts, boxes = segment_pixel_boxes(point_index, segment, S)
    expected = []
    for s in range(S):
        views = sorted(range(V), key=lambda v: (-counts[v, s], v))[:k]
        views = [v for v in views if counts[v, s] >= min_pixels]
        total = sum(counts[v, s] for v in views)
        for v in views:
            x0, y0, x1, y1 = boxes[v, s]
            for scale in scales:
                side = max(x1 - x0 + 1, y1 - y0 + 1, 4 / scale) * scale
                cx, cy = (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2
                cx = min(max(cx, side / 2), W - side / 2) if side <= W else W / 2
                cy = min(max(cy, side / 2), H - side / 2) if side <= H else H / 2
                expected.append((s, v, counts[v, s] / total / len(scales), cx - side / 2, cy - side / 2, side))
        assert crops.seen[s] == bool(views)
    assert len(crops.segment) == len(expected) > 0
    for i, (s, v, w, bx, by, side) in enumerate(expected):
        assert (crops.segment[i], crops.view[i]) == (s, v)
        assert crops.weight[i] == pytest.approx(w, rel=1e-6)
        assert crops.box[i].tolist() == pytest.approx([bx, by, bx + side, by + side], abs=1e-4)
    assert not crops.seen[-2:].any()  # never shown


def test_extract_crops_exact_cases():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.random((2, 3, 20, 30)).astype(np.float32))
    # whole-pixel box of the output size: the pixels themselves
    got = extract_crops(images, np.array([1]), np.array([[4.0, 3.0, 12.0, 11.0]]), size=8)
    assert torch.allclose(got[0], images[1, :, 3:11, 4:12], atol=1e-6)
    # twice the output size: 2x2 supersampling hits pixel centres -> a 2x2 box filter
    got = extract_crops(images, np.array([0]), np.array([[2.0, 0.0, 18.0, 16.0]]), size=8)
    assert torch.allclose(got[0], F.avg_pool2d(images[0:1, :, 0:16, 2:18], 2)[0], atol=1e-6)
    # outside the image: the fill value
    got = extract_crops(images, np.array([0, 1]), np.array([[-8.0, 0, 0, 8], [30.0, 0, 38, 8]]), size=8,
                        fill=(0.1, 0.2, 0.3))
    assert torch.allclose(got[:, :, :, :], torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1).expand(2, 3, 8, 8), atol=1e-6)
    # crops of several views and factors in one call land in their own slots
    boxes = np.array([[4.0, 3.0, 12.0, 11.0], [2.0, 0.0, 18.0, 16.0], [4.0, 3.0, 12.0, 11.0]])
    got = extract_crops(images, np.array([1, 0, 0]), boxes, size=8)
    assert torch.allclose(got[2], images[0, :, 3:11, 4:12], atol=1e-6)


# --- the model ---------------------------------------------------------------------------------
def test_pooler_output_is_projected_embedding(encoder):
    model = encoder.model
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        got = model.get_image_features(pixel_values=pixels).pooler_output
        want = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        assert torch.allclose(got, want, atol=1e-6) and got.shape == (2, 16)
        tokens = encoder.tokenizer(["a chair"], return_tensors="pt")
        got = model.get_text_features(**tokens).pooler_output
        want = model.text_projection(model.text_model(**tokens).pooler_output)
        assert torch.allclose(got, want, atol=1e-6)


def test_encoder_loads_folder_offline(model_dir, encoder):
    assert encoder.device.type in ("cpu", "cuda") and encoder.image_size == IMAGE and encoder.dim == 16
    assert encoder.preprocess_cfg.mean == pytest.approx(MEAN) and encoder.preprocess_cfg.std == pytest.approx(STD)
    assert encoder.dtype == (torch.float32 if encoder.device.type == "cpu" else encoder.dtype)
    assert is_local_model(str(model_dir)) and not is_local_model("openai/clip-vit-base-patch32")
    assert model_identity(str(model_dir)).startswith("dir:")


def test_preprocess_pad_and_crop(encoder):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1, 24, 32, 3)).astype(np.uint8)
    x = torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255
    norm = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    padded = encoder.preprocess(image, fit="pad")
    assert padded.shape == (1, 3, 32, 32)
    assert torch.allclose(padded[:, :, 4:28], norm, atol=1e-5)
    assert float(padded[:, :, :4].abs().max()) < 1e-6  # mean colour
    square = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    xs = torch.from_numpy(square).permute(0, 3, 1, 2).float() / 255
    want = (xs - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(encoder.preprocess(square, fit="crop"), want, atol=1e-5)
    big = rng.integers(0, 256, (1, 48, 80, 3)).astype(np.uint8)
    assert encoder.preprocess(big, fit="crop").shape == (1, 3, 32, 32)


def test_text_embeddings_unit_and_template_average(encoder):
    names = ["chair", "table", "xylophone"]
    templates = DEFAULT_TEMPLATES[:3]
    text = embed_vocabulary(names, templates, encoder)
    assert text.shape == (3, 16) and text.dtype == np.float32
    assert np.allclose(np.linalg.norm(text, axis=1), 1, atol=1e-5)
    model, tok = encoder.model, encoder.tokenizer
    with torch.no_grad():
        tokens = tok([t.format("table") for t in templates], padding=True, return_tensors="pt")
        direct = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1).mean(0)
    assert np.allclose(text[1], F.normalize(direct, dim=0).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="template"):
        embed_vocabulary(names, ["no placeholder"], encoder)


# --- the oracle: stored embeddings equal direct CLIPModel calls ---------------------------------
def _direct_image(model, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)


def _oracle(encoder, rgb, point_index, segment, S, cfg):
    """Views: padded by hand; segments: brute-force views and weights, crops cut by
    `extract_crops` (tested exactly above), embedded by direct CLIPModel calls."""
    model = encoder.model
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255
    norm = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    view = _direct_image(model, F.pad(norm, (0, 0, 4, 4))).numpy()
    counts, _ = segment_pixel_boxes(point_index, segment, S)
    crops = segment_crops(point_index, segment, num_segments=S, k=cfg.views_per_segment,
                          min_pixels=cfg.min_pixels, scales=cfg.scales, min_side=cfg.min_crop_side)
    out = np.zeros((S, view.shape[1]), np.float32)
    for s in range(S):
        views = sorted(range(len(rgb)), key=lambda v: (-counts[v, s], v))[:cfg.views_per_segment]
        views = [v for v in views if counts[v, s] >= cfg.min_pixels]
        acc = torch.zeros(view.shape[1])
        for v in views:
            idx = np.flatnonzero((crops.segment == s) & (crops.view == v))
            assert len(idx) == len(cfg.scales)
            emb = _direct_image(model, extract_crops(norm, crops.view[idx], crops.box[idx], size=IMAGE))
            acc += emb.sum(0) * counts[v, s] / sum(counts[u, s] for u in views) / len(cfg.scales)
        if views:
            out[s] = F.normalize(acc, dim=0).numpy()
    return view, out


def test_embed_scene_matches_direct_clip_calls(encoder, model_dir):
    rgb, point_index, segment, S = _scene(3)
    cfg = EmbedConfig(model=str(model_dir), mode="crops", views_per_segment=2, min_pixels=8, scales=(1.0, 1.5, 2.0),
                      batch_size=7)
    got = embed_scene(rgb, point_index, segment, encoder, cfg, num_segments=S)
    view, seg = _oracle(encoder, rgb, point_index, segment, S, cfg)
    assert got.view.shape == (3, 16) and got.segment.shape == (S, 16) and got.seen.dtype == bool
    assert np.allclose(got.view, view, atol=1e-5)
    assert np.allclose(got.segment, seg, atol=1e-5)
    assert np.array_equal(got.seen, np.linalg.norm(seg, axis=1) > 0)
    assert got.seen.sum() >= 5 and not got.seen[-2:].any()
    assert np.allclose(np.linalg.norm(got.segment[got.seen], axis=1), 1, atol=1e-5)


# --- the store ---------------------------------------------------------------------------------
def _write_scene(store: Store, scene_id: str, seed: int, render_hash: str = "r"):
    rgb, point_index, segment, S = _scene(seed)
    n = len(segment)
    V, H, W = point_index.shape
    store.write_stage(scene_id, "ingest", {
        schema.XYZ: np.zeros((n, 3)), schema.RGB: np.zeros((n, 3)),
        schema.SEMANTIC: np.zeros(n), schema.INSTANCE: np.full(n, -1),
    }, record={"config_hash": "a", "stats": {"kind": "mesh"}})
    store.write_stage(scene_id, "overseg", {
        schema.NORMAL: np.zeros((n, 3)), schema.CURVATURE: np.zeros(n), schema.SEGMENT: segment,
        schema.BOUNDARY: np.zeros(n), schema.SEMANTIC_BOUNDARY: np.zeros(n),
        schema.ADJACENCY: np.zeros((0, 2)), schema.ADJACENCY_BORDER: np.zeros(0),
    }, record={"config_hash": "o", "stats": {}})
    store.write_stage(scene_id, "render", {
        schema.VIEW_RGB: rgb, schema.VIEW_DEPTH: np.ones((V, H, W)), schema.VIEW_POINT_INDEX: point_index,
        schema.VIEW_K: np.tile(np.eye(3), (V, 1, 1)), schema.VIEW_POSE: np.tile(np.eye(4), (V, 1, 1)),
        schema.VISIBLE_PTR: np.zeros(V + 1), schema.VISIBLE_IDS: np.zeros(0), schema.VIEW_COUNT: np.zeros(n),
    }, record={"config_hash": render_hash, "stats": {}})
    return rgb, point_index, segment, S


def test_run_scene_round_trip_and_skip(tmp_path, encoder, model_dir):
    store = Store.create(tmp_path / "store", dataset="synthetic", class_names=["chair", "table"])
    rgb, point_index, segment, S = _write_scene(store, "scene0", seed=4)
    cfg = EmbedConfig(model=str(model_dir), mode="crops", min_pixels=8)
    result = EMBED.run_scene(str(store.path), "scene0", cfg)
    assert result.status == "done" and result.stats["segments"] == S
    view = store.read("scene0", schema.CLIP_VIEW)
    seg = store.read("scene0", schema.CLIP_SEGMENT)
    seen = store.read("scene0", schema.CLIP_SEGMENT_SEEN)
    for spec, array in ((schema.CLIP_VIEW, view), (schema.CLIP_SEGMENT, seg), (schema.CLIP_SEGMENT_SEEN, seen)):
        assert array.dtype == np.dtype(spec.dtype) and array.ndim == len(spec.dims)
    assert view.shape == (3, 16) and seg.shape == (S, 16) and seen.shape == (S,)
    want_view, want_seg = _oracle(encoder, rgb, point_index, segment, S, cfg)
    assert np.allclose(view.astype(np.float32), want_view, atol=2e-3)  # float16 storage
    assert np.allclose(seg.astype(np.float32), want_seg, atol=2e-3)
    assert np.array_equal(seen.astype(bool), np.linalg.norm(want_seg, axis=1) > 0)
    record = store.stage_record("scene0", "embed")
    assert record["stats"]["model"] == model_identity(str(model_dir))
    # rerun: skipped; batch size/device do not invalidate; a result-changing field does
    assert EMBED.run_scene(str(store.path), "scene0", cfg).status == "skipped"
    assert EMBED.run_scene(str(store.path), "scene0", dataclasses.replace(cfg, batch_size=5)).status == "skipped"
    assert EMBED.run_scene(str(store.path), "scene0", cfg, force=True).status == "done"
    assert EMBED.run_scene(str(store.path), "scene0", dataclasses.replace(cfg, scales=(1.0,))).status == "done"
    # an upstream change (re-rendered views) invalidates too
    _write_scene(store, "scene0", seed=4, render_hash="r2")
    assert EMBED.run_scene(str(store.path), "scene0", dataclasses.replace(cfg, scales=(1.0,))).status == "done"
    assert summarise(store)["scenes_embedded"] == 1


def test_model_change_invalidates(tmp_path, model_dir):
    store = Store.create(tmp_path / "store", dataset="synthetic", class_names=["chair"])
    _write_scene(store, "scene0", seed=5)
    other = _tiny_model(tmp_path / "other", seed=1)
    cfg = EmbedConfig(model=str(model_dir), min_pixels=8)
    assert EMBED.run_scene(str(store.path), "scene0", cfg).status == "done"
    first = store.read("scene0", schema.CLIP_VIEW)
    assert EMBED.run_scene(str(store.path), "scene0", dataclasses.replace(cfg, model=str(other))).status == "done"
    assert not np.allclose(first, store.read("scene0", schema.CLIP_VIEW))


@pytest.mark.parametrize("mode,batch", [("packed", 3), ("crops", 13)])
def test_embed_scenes_batches_across_scenes_like_run_scene(tmp_path, model_dir, capsys, mode, batch):
    a = Store.create(tmp_path / "a", dataset="synthetic", class_names=["chair"])
    b = Store.create(tmp_path / "b", dataset="synthetic", class_names=["chair"])
    for i in range(3):
        _write_scene(a, f"s{i}", seed=10 + i)
        _write_scene(b, f"s{i}", seed=10 + i)
    cfg = EmbedConfig(model=str(model_dir), mode=mode, min_pixels=8, batch_size=batch)  # batches straddle scenes
    results = embed_scenes(str(a.path), ["s0", "s1", "s2", "missing"], cfg)
    assert [r.status for r in results] == ["done", "done", "done", "failed"]
    assert "images/s" in capsys.readouterr().out
    for i in range(3):
        assert EMBED.run_scene(str(b.path), f"s{i}", cfg).status == "done"
        for spec in (schema.CLIP_VIEW, schema.CLIP_SEGMENT, schema.CLIP_SEGMENT_SEEN):
            assert np.allclose(a.read(f"s{i}", spec).astype(float), b.read(f"s{i}", spec).astype(float), atol=1e-3)
    assert [r.status for r in embed_scenes(str(a.path), ["s0", "s1"], cfg)] == ["skipped", "skipped"]


def test_run_vocabulary(tmp_path, encoder, model_dir):
    store = Store.create(tmp_path / "store", dataset="synthetic", class_names=["chair", "table", "shower curtain"])
    stats = run_vocabulary(str(store.path), str(model_dir))
    text, attrs = store.read_vocab("classes")
    assert stats["classes"] == 3 and text.shape == (3, 16) and text.dtype == np.float16
    assert attrs["names"] == ["chair", "table", "shower curtain"] and attrs["prompts"] == list(DEFAULT_TEMPLATES)
    assert attrs["model"] == model_identity(str(model_dir))
    assert np.allclose(np.linalg.norm(text.astype(np.float32), axis=1), 1, atol=2e-3)
    want = embed_vocabulary(["chair", "table", "shower curtain"], DEFAULT_TEMPLATES, encoder)
    assert np.allclose(text.astype(np.float32), want, atol=2e-3)
    run_vocabulary(str(store.path), encoder, names=["lamp"], vocab_name="custom", templates=("a {}.",))
    assert store.read_vocab("custom")[0].shape == (1, 16)
    # a teacher folder's own templates are the default
    (model_dir / "teacher_config.json").write_text(json.dumps({"config": {"templates": ["a {} here."]}}))
    try:
        run_vocabulary(str(store.path), str(model_dir), vocab_name="teacher")
        assert store.read_vocab("teacher")[1]["prompts"] == ["a {} here."]
    finally:
        (model_dir / "teacher_config.json").unlink()


def test_hub_id_without_download_fails_clearly(tmp_path):
    from pipeline.clip.model import ModelLoadError

    with pytest.raises(ModelLoadError, match="cached"):
        load_encoder("nobody-here/no-such-clip", allow_download=False)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_encoder(str(tmp_path / "missing" / "folder"))


def test_missing_upstream_is_a_scene_error(tmp_path, model_dir):
    from pipeline.errors import SceneError

    store = Store.create(tmp_path / "store", dataset="synthetic", class_names=["chair"])
    store.write_stage("bare", "ingest", {
        schema.XYZ: np.zeros((3, 3)), schema.RGB: np.zeros((3, 3)), schema.SEMANTIC: np.zeros(3),
        schema.INSTANCE: np.zeros(3),
    }, record={"config_hash": "a", "stats": {"kind": "mesh"}})
    with pytest.raises(SceneError, match="overseg"):
        EMBED.run_scene(str(store.path), "bare", EmbedConfig(model=str(model_dir)))


@pytest.mark.slow
def test_bench_embed_reports_images_per_second(model_dir):
    from ws3d_train.bench.embed import bench_embed

    report = bench_embed(str(model_dir), batch_sizes=(4,), verbose=False)
    assert set(report["models"]) == {"teacher", "vit_b32"}
    assert report["models"]["vit_b32"]["params_m"] > 80
    for entry in report["models"].values():
        assert entry["images_per_s"][4] > 0


def test_scene_with_nothing_seen(encoder, model_dir):
    rgb, point_index, segment, S = _scene(6)
    got = embed_scene(rgb, np.full_like(point_index, -1), segment, encoder, EmbedConfig(model=str(model_dir)))
    assert got.crops == 0 and not got.seen.any()
    assert got.segment.shape == (S, 16) and not got.segment.any()
    assert np.allclose(np.linalg.norm(got.view, axis=1), 1, atol=1e-5)
