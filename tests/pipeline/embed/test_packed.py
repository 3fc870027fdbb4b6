"""The packed embed mode: crops shared by segments against a brute-force packing, patch masks against
a per-patch count, masked class tokens against CLIP's own layers, the stage's record and `ws3d info`."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.clip.crops import extract_crops, pack_crops, region_patch_masks, segment_pixel_boxes
from pipeline.config import ConfigError, from_dict
from pipeline.embed.config import EmbedConfig, result_fields
from pipeline.embed.core import embed_scene
from pipeline.embed.stage import EMBED
from pipeline.store import Store
from pipeline.clip.model import load_encoder
from tests.pipeline.embed.test_embed import IMAGE, MEAN, STD, _scene, _tiny_model, _write_scene


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _tiny_model(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def encoder(model_dir):
    return load_encoder(str(model_dir), device="cpu")


# --- packing against brute force ---------------------------------------------------------------
def _brute_pack(point_index, segment, S, *, views, min_pixels, scale, zoom, min_side):
    """Loops: best views per segment, candidate crops, greedy cover, first chosen host."""
    V, H, W = point_index.shape
    counts, boxes = segment_pixel_boxes(point_index, segment, S)
    crops = []  # (view, box, [segments])
    grows = [1.0] if zoom == 1 else [1.0, zoom ** 0.5, zoom]
    best = {s: [u for u in sorted(range(V), key=lambda u: (-counts[u, s], u))[:views] if counts[u, s] >= min_pixels]
            for s in range(S)}
    for v in range(V):
        segs = [s for s in range(S) if v in best[s]]
        cand, ctx = [], {}  # candidates in order: every segment at the first size, then the next size ...
        for g in grows:
            for s in segs:
                x0, y0, x1, y1 = (float(t) for t in boxes[v, s])
                side = max(x1 - x0 + 1, y1 - y0 + 1)
                ctx[s] = max(side * scale, min_side)
                t = max(side * scale * g, min_side * g)
                cx, cy = (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2
                cx = min(max(cx, t / 2), W - t / 2) if t <= W else W / 2
                cy = min(max(cy, t / 2), H - t / 2) if t <= H else H / 2
                cand.append((s, g, (cx - t / 2, cy - t / 2, cx + t / 2, cy + t / 2)))

        def hosts(i, s, v=v, cand=cand, ctx=ctx):
            a, g, (tx0, ty0, tx1, ty1) = cand[i]
            x0, y0, x1, y1 = boxes[v, s]
            T = tx1 - tx0
            fits = x0 >= tx0 - 1e-4 and y0 >= ty0 - 1e-4 and x1 + 1 <= tx1 + 1e-4 and y1 + 1 <= ty1 + 1e-4
            own = a == s and g == grows[len(grows) // 2]
            return own or (fits and ctx[s] <= T * (1 + 1e-6) and T <= zoom * ctx[s] * (1 + 1e-6))

        left, chosen = set(segs), []
        while left:
            i = max(range(len(cand)), key=lambda i: (sum(hosts(i, s) for s in left), -i))
            chosen.append(i)
            left -= {s for s in segs if hosts(i, s)}
        for i in chosen:
            mine = [s for s in segs if hosts(i, s) and next(j for j in chosen if hosts(j, s)) == i]
            crops.append((v, cand[i][2], mine))
    return crops, counts, best


@pytest.mark.parametrize("zoom,views", [(1.0, 1), (2.0, 1), (4.0, 1), (2.0, 2)])
def test_pack_crops_brute_force(zoom, views):
    for seed in (0, 7):
        _, point_index, segment, S = _scene(seed, V=4, N=600, S=20)
        got = pack_crops(point_index, segment, num_segments=S, views=views, min_pixels=6, scale=1.5, zoom=zoom,
                         min_side=4.0)
        want, counts, best = _brute_pack(point_index, segment, S, views=views, min_pixels=6, scale=1.5, zoom=zoom,
                                         min_side=4.0)
        assert len(got.view) == len(want) > 0
        for k, (v, box, segs) in enumerate(want):
            assert got.view[k] == v
            assert got.box[k].tolist() == pytest.approx(list(box), abs=1e-3)
            assert got.region_segment[got.region_crop == k].tolist() == sorted(segs)
        # every seen segment once in each of its best views, weighted by its pixels there; unseen never
        assert sorted(got.region_segment.tolist()) == sorted(s for s in range(S) for _ in best[s])
        assert np.array_equal(got.seen, counts.max(axis=0) >= 6)
        for r, s in enumerate(got.region_segment):
            v = got.view[got.region_crop[r]]
            assert v in best[s]
            assert got.region_weight[r] == pytest.approx(counts[v, s] / sum(counts[u, s] for u in best[s]), rel=1e-6)
        assert np.all(np.diff(got.region_crop) >= 0)  # ordered by crop
    # packing pays: fewer crops than segments once a crop may be twice a segment's own context
    if zoom >= 2:
        assert len(got.view) < len(got.region_segment)


def test_pack_crops_empty_and_bad_zoom():
    _, point_index, segment, S = _scene(1)
    got = pack_crops(np.full_like(point_index, -1), segment, num_segments=S)
    assert len(got.view) == len(got.region_segment) == 0 and not got.seen.any()
    with pytest.raises(ValueError, match="zoom"):
        pack_crops(point_index, segment, zoom=0.5)
    with pytest.raises(ValueError, match="views"):
        pack_crops(point_index, segment, views=0)


def test_region_patch_masks_brute_force():
    _, point_index, segment, S = _scene(2)
    _, H, W = point_index.shape
    view = np.array([0, 1, 2, 0])
    box = np.array([[0, 0, 24, 24], [4.5, -3, 20.5, 13], [10, 2, 34, 26], [-10, -10, 40, 40]], np.float32)
    region_crop = np.array([0, 0, 1, 2, 3, 3])
    seg_img = np.where(point_index >= 0, segment[np.maximum(point_index, 0)], -1)
    # per crop: the segments its view shows most, and one it does not show (all-zero mask)
    shown = [np.bincount(seg_img[v][seg_img[v] >= 0], minlength=S).argsort()[::-1] for v in view]
    region_segment = np.array([shown[0][0], shown[0][1], shown[1][0], shown[2][0], shown[3][0], S - 1])
    grid, samples = 4, 3
    got = region_patch_masks(point_index, segment, view, box, region_crop, region_segment, grid=grid, samples=samples)
    n = grid * samples
    for r, (k, s) in enumerate(zip(region_crop, region_segment)):
        x0, y0, x1, y1 = box[k].astype(np.float64)
        for i in range(grid):
            for j in range(grid):
                hit = 0
                for a in range(samples):
                    for b in range(samples):
                        y = y0 + (i * samples + a + 0.5) / n * (y1 - y0)
                        x = x0 + (j * samples + b + 0.5) / n * (x1 - x0)
                        py, px = int(np.floor(y)), int(np.floor(x))
                        if 0 <= py < H and 0 <= px < W and point_index[view[k], py, px] >= 0:
                            hit += segment[point_index[view[k], py, px]] == s
                assert got[r, i * grid + j] == pytest.approx(hit / samples ** 2)
    assert got.max() > 0.5 and got.min() == 0


# --- masked class tokens against CLIP's own layers -------------------------------------------------
def _brute_regions(encoder, pixels, region_image, mask, mask_layers, context):
    """One region at a time through transformers' own layers: [image tokens, region token] with a
    4D additive mask (image tokens never see the region token, the region token sees itself and
    the patches with log-weights)."""
    vision = encoder.model.vision_model
    layers = vision.encoder.layers
    out = []
    with torch.no_grad():
        for r, b in enumerate(region_image):
            h = vision.pre_layrnorm(vision.embeddings(pixels[b:b + 1]))
            for layer in layers[:len(layers) - mask_layers]:
                h = layer(h, None)
            T = h.shape[1]
            seq = torch.cat([h, h[:, :1]], dim=1)
            am = torch.zeros(1, 1, T + 1, T + 1)
            am[0, 0, :T, T] = float("-inf")
            w = torch.as_tensor(mask[r]) + context * (1 - torch.as_tensor(mask[r]))
            am[0, 0, T, 0] = float("-inf")
            am[0, 0, T, 1:T] = torch.where(w > 0, torch.log(w.clamp_min(1e-12)), torch.tensor(float("-inf")))
            for layer in layers[len(layers) - mask_layers:]:
                seq = layer(seq, am)
            out.append(F.normalize(encoder.model.visual_projection(vision.post_layernorm(seq[:, T])), dim=-1)[0])
    return torch.stack(out)


def test_encode_regions_against_clip_layers(encoder):
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, IMAGE, IMAGE)
    G2 = encoder.patch_grid ** 2
    rng = np.random.default_rng(0)
    region_image = np.array([2, 0, 0, 2, 2])  # unordered, one image without regions
    mask = (rng.random((5, G2)) > 0.5).astype(np.float32)
    mask[1] = 0
    mask[1, 3] = 0.25  # one partial patch only
    with torch.no_grad():
        direct = F.normalize(encoder.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    for layers in (1, 2):  # the tiny model has 2 layers: 2 = all of them, as 0 says
        images, regions = encoder.encode_regions(pixels, region_image, mask, mask_layers=layers, context=1.0)
        assert torch.allclose(images, direct, atol=1e-5)  # the images' own embeddings are untouched
        assert torch.allclose(regions, direct[region_image], atol=1e-5)  # no mask: the image itself
        for context in (0.0, 0.3):
            images, regions = encoder.encode_regions(pixels, region_image, mask, mask_layers=layers, context=context)
            want = _brute_regions(encoder, pixels, region_image, mask, layers, context)
            assert torch.allclose(regions, want, atol=1e-5)
            assert torch.allclose(images, direct, atol=1e-5)
            assert not torch.allclose(regions, direct[region_image], atol=1e-2)  # the mask matters
            if layers == 2:
                assert torch.allclose(encoder.encode_regions(pixels, region_image, mask, mask_layers=0,
                                                             context=context)[1], regions, atol=1e-6)
    with pytest.raises(ValueError, match="region_mask"):
        encoder.encode_regions(pixels, region_image, mask[:, :3])


def test_embed_scene_packed_matches_direct_calls(encoder, model_dir):
    rgb, point_index, segment, S = _scene(3)
    cfg = EmbedConfig(model=str(model_dir), mode="packed", min_pixels=8, min_crop_side=6.0, pack_zoom=3.0,
                      pack_views=2, mask_layers=2, mask_context=(0.0, 0.1, 1.0), batch_size=2)
    got = embed_scene(rgb, point_index, segment, encoder, cfg, num_segments=S)
    packed = pack_crops(point_index, segment, num_segments=S, views=2, min_pixels=8, scale=cfg.pack_scale, zoom=3.0,
                        min_side=6.0)
    assert got.crops == len(packed.view) and np.array_equal(got.seen, packed.seen)
    assert got.crops < len(packed.region_segment)  # several segments share a crop here
    assert len(packed.region_segment) > packed.seen.sum()  # and some are read out of two views
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255
    norm = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    pixels = extract_crops(norm, packed.view, packed.box, size=IMAGE)
    mask = region_patch_masks(point_index, segment, packed.view, packed.box, packed.region_crop,
                              packed.region_segment, grid=encoder.patch_grid)
    mask /= mask.max(axis=1, keepdims=True)  # the best patch weighs as the token itself
    with torch.no_grad():
        crop = F.normalize(encoder.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    regions = (_brute_regions(encoder, pixels, packed.region_crop, mask, 2, 0.0)
               + _brute_regions(encoder, pixels, packed.region_crop, mask, 2, 0.1) + crop[packed.region_crop])
    regions = F.normalize(regions, dim=-1).numpy()
    want = np.zeros((S, 16), np.float32)
    np.add.at(want, packed.region_segment, regions * packed.region_weight[:, None])
    want /= np.maximum(np.linalg.norm(want, axis=1, keepdims=True), 1e-12)
    assert np.allclose(got.segment, want, atol=1e-5)
    assert not got.segment[~got.seen].any()
    with torch.no_grad():
        view = F.normalize(encoder.model.get_image_features(pixel_values=F.pad(norm, (0, 0, 4, 4))).pooler_output, dim=-1)
    assert np.allclose(got.view, view.numpy(), atol=1e-5)


# --- config, record, `ws3d info` -------------------------------------------------------------------
def test_result_fields_per_mode():
    crops = EmbedConfig(mode="crops")
    # the fields hashed before modes existed, unchanged: stores embedded then are not embedded again
    assert result_fields(crops) == {"views_per_segment": 3, "min_pixels": 16, "scales": [1.0, 1.5, 2.0],
                                    "min_crop_side": 16.0, "weight": "pixels", "view_fit": "pad", "max_supersample": 4}
    with pytest.warns(UserWarning, match="ignored"):  # and said to be
        assert result_fields(dataclasses.replace(crops, pack_zoom=3.0)) == result_fields(crops)
    packed = EmbedConfig()
    assert packed.mode == "packed" and result_fields(packed)["mode"] == "packed"
    with pytest.warns(UserWarning, match="ignored"):
        assert result_fields(dataclasses.replace(packed, scales=(1.0,), views_per_segment=1)) == result_fields(packed)
    assert result_fields(dataclasses.replace(packed, pack_zoom=3.0)) != result_fields(packed)
    with pytest.warns(UserWarning, match="scales apply to mode=crops only"):
        from_dict(EmbedConfig, {"scales": [1.0]}, where="embed")
    with pytest.warns(UserWarning, match="pack_zoom apply to mode=packed only"):
        from_dict(EmbedConfig, {"mode": "crops", "pack_zoom": 3.0}, where="embed")
    for bad in ({"mode": "dense"}, {"pack_zoom": 0.5}, {"mask_layers": -1}, {"pack_views": 0}, {"mask_context": [2.0]},
                {"mask_context": []}):
        with pytest.raises(ConfigError):
            from_dict(EmbedConfig, bad, where="embed")


def test_record_states_crops_and_info_json_shows_them(tmp_path, model_dir):
    from typer.testing import CliRunner

    from cli import app

    store = Store.create(tmp_path / "store", dataset="synthetic", class_names=["chair"])
    for i, seed in enumerate((4, 5)):
        _write_scene(store, f"s{i}", seed=seed)
    cfg = EmbedConfig(model=str(model_dir), min_pixels=8)
    counts = {}
    for i, mode in enumerate(("packed", "crops")):
        result = EMBED.run_scene(str(store.path), f"s{i}", dataclasses.replace(cfg, mode=mode))
        record = store.stage_record(f"s{i}", "embed")["stats"]
        assert result.status == "done" and record["mode"] == mode and record["crops"] > 0
        counts[f"s{i}"] = record["crops"]
    assert counts["s0"] < counts["s1"]  # packed: fewer crops than one per segment, view and scale
    out = CliRunner().invoke(app, ["info", "-s", str(store.path), "--json"])
    assert out.exit_code == 0, out.output
    info = json.loads(out.output)
    assert {row["scene"]: row["crops"] for row in info["per_scene"]} == counts
    embed = info["stage_summaries"]["embed"]
    assert embed["crops"] == sum(counts.values()) and embed["modes"] == ["crops", "packed"]


def test_packed_whole_crop_context_and_batch_size(encoder, model_dir):
    """mask_context (1,) is each segment's crop embedding; batch size changes nothing (batches
    without regions included)."""
    rgb, point_index, segment, S = _scene(4)
    cfg = EmbedConfig(model=str(model_dir), min_pixels=8, mask_context=(1.0,), batch_size=1)
    got = embed_scene(rgb, point_index, segment, encoder, cfg, num_segments=S)
    packed = pack_crops(point_index, segment, num_segments=S, min_pixels=8, scale=cfg.pack_scale, zoom=cfg.pack_zoom)
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255
    norm = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        crop = F.normalize(encoder.model.get_image_features(
            pixel_values=extract_crops(norm, packed.view, packed.box, size=IMAGE)).pooler_output, dim=-1).numpy()
    want = np.zeros((S, 16), np.float32)
    np.add.at(want, packed.region_segment, crop[packed.region_crop] * packed.region_weight[:, None])
    want /= np.maximum(np.linalg.norm(want, axis=1, keepdims=True), 1e-12)
    assert np.allclose(got.segment, want, atol=1e-5)
    tight = dataclasses.replace(cfg, mask_context=(0.0, 1.0))
    one, many = (embed_scene(rgb, point_index, segment, encoder, dataclasses.replace(tight, batch_size=b), num_segments=S)
                 for b in (1, 64))
    assert np.allclose(one.segment, many.segment, atol=1e-5) and np.allclose(one.view, many.view, atol=1e-5)
    assert not np.allclose(one.segment, got.segment, atol=1e-3)
