"""The embed benchmark: crops and seconds per scan of each mode, and segment accuracy against a hand count."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline import schema
from pipeline.clip.model import embed_vocabulary, load_encoder
from pipeline.embed.config import EmbedConfig
from pipeline.embed.core import embed_scene
from pipeline.store import Store
from pipeline.teacher.folder import model_templates
from tests.pipeline.embed.test_embed import _tiny_model, _write_scene
from ws3d_train.bench.embed import bench_embed_modes, segment_accuracy

NAMES = ["chair", "table", "lamp"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _tiny_model(tmp_path_factory.mktemp("clip"))


@pytest.fixture()
def labelled_store(tmp_path):
    store = Store.create(tmp_path / "store", dataset="synthetic", class_names=NAMES)
    rng = np.random.default_rng(0)
    for i in range(2):
        _write_scene(store, f"s{i}", seed=20 + i)
        segment = store.read(f"s{i}", schema.SEGMENT).astype(np.int64)
        semantic = rng.integers(0, 3, segment.max() + 1)[segment]  # one class per segment (pure)
        semantic[segment == 0] = -1  # an unlabelled segment: left out
        arrays = {spec: store.read(f"s{i}", spec) for spec in (schema.XYZ, schema.RGB, schema.INSTANCE)}
        store.write_stage(f"s{i}", "ingest", {**arrays, schema.SEMANTIC: semantic},
                          record={"config_hash": "a", "stats": {"kind": "mesh"}})
    return store


def test_segment_accuracy_matches_a_hand_count(labelled_store, model_dir):
    configs = {"packed": EmbedConfig(min_pixels=8), "crops": EmbedConfig(mode="crops", min_pixels=8)}
    got = segment_accuracy(str(labelled_store.path), ["s0", "s1"], str(model_dir), configs, verbose=False)
    encoder = load_encoder(str(model_dir), device="cpu")
    text = embed_vocabulary(NAMES, model_templates(str(model_dir)), encoder)
    for name, cfg in configs.items():
        hits, total, crops = 0, 0, 0
        for scene in ("s0", "s1"):
            segment = labelled_store.read(scene, schema.SEGMENT).astype(np.int64)
            semantic = labelled_store.read(scene, schema.SEMANTIC).astype(np.int64)
            emb = embed_scene(labelled_store.read(scene, schema.VIEW_RGB), labelled_store.read(scene, schema.VIEW_POINT_INDEX),
                              segment, encoder, dataclasses.replace(cfg, model=str(model_dir)),
                              num_segments=segment.max() + 1)
            crops += emb.crops
            for s in range(segment.max() + 1):
                cls = semantic[segment == s]
                if len(cls) == 0 or cls[0] < 0:
                    continue
                total += 1
                hits += bool(emb.seen[s]) and int(np.argmax(text @ emb.segment[s])) == cls[0]
        assert got[name]["segments"] == total and got[name]["crops"] == crops
        assert got[name]["segment_accuracy"] == pytest.approx(hits / total)
        assert set(got[name]["per_scene"]) == {"s0", "s1"}
    assert got["packed"]["crops"] < got["crops"]["crops"]


def test_bench_embed_modes_side_by_side(labelled_store, model_dir):
    report = bench_embed_modes(str(labelled_store.path), "s0", model_dir=str(model_dir), crops_sample=5, verbose=False)
    packed, crops = report["modes"]["packed"], report["modes"]["crops"]
    assert crops["crops"] > 5 and crops["crops_timed"] == 5 and crops["extrapolated"]  # sampled, extrapolated
    assert not packed["extrapolated"] and packed["crops_timed"] == packed["crops"]
    assert packed["regions"] == packed["segments_seen"] == crops["segments_seen"] > packed["crops"]
    assert report["ratios"]["crops_over_packed"] == pytest.approx(crops["crops"] / packed["crops"], abs=0.01)
    assert all(entry["seconds"] > 0 and entry["cpu_seconds"] > 0 for entry in report["modes"].values())
    assert report["ratios"]["cpu_seconds_crops_over_packed"] > 0
