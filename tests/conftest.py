"""Shared test fixtures: a tiny, realistic ws3d store with every stage written by hand.

`make_tiny_store(path)` writes (through `pipeline.store.Store` only) scenes made of a floor, a
wall and a few boxes: points sampled on their surfaces, labels and instances, over-segments =
floor tiles / wall halves / box faces with their boundaries and adjacency, a handful of fake views
(4x4 images) with CSR visible-point lists from cameras around the room, and CLIP-like
embeddings correlated with the classes (segments: their class's text embedding plus noise;
views: the class mix they show plus noise), so that pre-training has something to learn.

`make_tiny_clip(folder)` saves a randomly initialised tiny CLIP folder (tokenizer included).
`s3_server` starts a real S3-compatible server on 127.0.0.1 for the session (moto's, its own
process; ``AWS_ENDPOINT_URL`` and test credentials set), `s3_store_url` is a store URL in a fresh
bucket, and `store_url` is parametrised over both backends (a folder, then ``s3://``).
`tiny_run_config(cls, store, ...)` is a training config for a few CPU steps on such a store; the
`one_torch_thread` fixture (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``) keeps a
test module's torch on one thread.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from scipy.spatial import cKDTree

from pipeline import schema
from pipeline.schema import IGNORE_INDEX
from pipeline.store import Store

TINY_CLASSES = ["floor", "wall", "chair", "table", "cabinet"]
"""Class names of the tiny store (ids 0..4)."""
TINY_CLIP_DIM = 32
"""Width of the tiny store's CLIP embeddings."""
TINY_VIEWS = 6
"""Views per tiny scene."""

C = TypeVar("C")

_CLASS_RGB = np.array([[120, 100, 80], [200, 200, 190], [180, 40, 40], [40, 140, 60], [50, 60, 170]], float)


def _surfaces(rng: np.random.Generator) -> list[dict]:
    """Rectangles (origin, u, v, normal, class, instance) of one room: floor tiles, wall halves, box faces."""
    rects = []
    for i in range(2):  # floor: 2x2 tiles, each an over-segment
        for j in range(2):
            rects.append(dict(o=[i * 2.0, j * 2.0, 0.0], u=[2.0, 0, 0], v=[0, 2.0, 0], n=[0, 0, 1], c=0, inst=-1))
    for j in range(2):  # wall at x = 0, two segments
        rects.append(dict(o=[0.0, j * 2.0, 0.0], u=[0, 2.0, 0], v=[0, 0, 2.5], n=[1, 0, 0], c=1, inst=-1))
    cells = rng.permutation([(0.7, 0.7), (2.4, 0.7), (0.7, 2.4), (2.4, 2.4)])[:3]
    for k, (cx, cy) in enumerate(cells):
        cls = int(rng.integers(2, 5))
        sx, sy = rng.uniform(0.4, 0.9, 2)
        sz = rng.uniform(0.4, 1.1)
        x0, y0 = cx + rng.uniform(0, 0.5), cy + rng.uniform(0, 0.5)
        box = dict(c=cls, inst=k, footprint=(x0, y0, x0 + sx, y0 + sy))
        faces = [
            ([x0, y0, sz], [sx, 0, 0], [0, sy, 0], [0, 0, 1]),  # top
            ([x0, y0, 0], [sx, 0, 0], [0, 0, sz], [0, -1, 0]),
            ([x0, y0 + sy, 0], [sx, 0, 0], [0, 0, sz], [0, 1, 0]),
            ([x0, y0, 0], [0, sy, 0], [0, 0, sz], [-1, 0, 0]),
            ([x0 + sx, y0, 0], [0, sy, 0], [0, 0, sz], [1, 0, 0]),
        ]
        for o, u, v, n in faces:
            rects.append(dict(o=o, u=u, v=v, n=n, **box))
    return rects


def _look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """World->camera 4x4 (OpenCV: x right, y down, z forward)."""
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    rot = np.stack([x, y, z])
    pose = np.eye(4, dtype=np.float32)
    pose[:3, :3] = rot
    pose[:3, 3] = -rot @ eye
    return pose


def make_tiny_scene(n_points: int, rng: np.random.Generator, text: np.ndarray) -> dict:
    """The arrays of one tiny scene: ``{stage: {ArraySpec: array}}`` for ingest, overseg, render, embed."""
    rects = _surfaces(rng)
    area = np.array([np.linalg.norm(np.cross(r["u"], r["v"])) for r in rects])
    origin = np.array([r["o"] for r in rects], float)
    u = np.array([r["u"] for r in rects], float)
    v = np.array([r["v"] for r in rects], float)
    normal = np.array([r["n"] for r in rects], float)
    rect_class = np.array([r["c"] for r in rects])
    rect_inst = np.array([r["inst"] for r in rects])

    m = int(n_points * 1.6)  # oversample, then drop floor points under boxes
    which = rng.choice(len(rects), size=m, p=area / area.sum())
    ab = rng.random((m, 2))
    xyz = origin[which] + ab[:, :1] * u[which] + ab[:, 1:] * v[which]
    under = np.zeros(m, bool)
    for r in rects:  # a few boxes, not a loop over points
        if "footprint" in r:
            x0, y0, x1, y1 = r["footprint"]
            under |= (rect_class[which] == 0) & (xyz[:, 0] > x0) & (xyz[:, 0] < x1) & (xyz[:, 1] > y0) & (xyz[:, 1] < y1)
    keep = np.flatnonzero(~under)[:n_points]
    which, xyz = which[keep], xyz[keep].astype(np.float32)
    n = xyz.shape[0]

    semantic = rect_class[which].astype(np.int16)
    true_class = semantic.copy()
    semantic[rng.random(n) < 0.05] = IGNORE_INDEX
    instance = rect_inst[which].astype(np.int32)
    rgb = np.clip(_CLASS_RGB[true_class] + rng.normal(0, 12, (n, 3)), 0, 255).astype(np.uint8)
    segment = which.astype(np.int32)  # one over-segment per rectangle
    num_segments = len(rects)

    # boundaries: a neighbour within 8 cm (about the point spacing) in another segment / with
    # another known label
    pairs = cKDTree(xyz).query_pairs(0.08, output_type="ndarray")
    i, j = pairs[:, 0], pairs[:, 1]
    cross = segment[i] != segment[j]
    boundary = np.zeros(n, np.uint8)
    boundary[i[cross]] = 1
    boundary[j[cross]] = 1
    labelled = semantic != IGNORE_INDEX
    edge = labelled[i] & labelled[j] & (semantic[i] != semantic[j])
    semantic_boundary = np.where(labelled, 0, 255).astype(np.uint8)
    semantic_boundary[i[edge]] = 1
    semantic_boundary[j[edge]] = 1
    seg_pairs = np.sort(np.stack([segment[i[cross]], segment[j[cross]]], 1), axis=1).astype(np.int64)
    adjacency, inverse = np.unique(seg_pairs, axis=0, return_inverse=True)
    border_points = np.unique(
        np.concatenate([inverse.reshape(-1) * n + i[cross], inverse.reshape(-1) * n + j[cross]])
    )
    adjacency_border = np.bincount(border_points // n, minlength=adjacency.shape[0])

    # views: cameras on a circle around the room looking at its centre; a point is visible when
    # it lies in the view cone and its surface faces the camera
    centre = np.array([2.0, 2.0, 0.5])
    ptr, ids, poses, view_emb = [0], [], [], []
    for k in range(TINY_VIEWS):  # a handful of views, not a loop over points
        angle = 2 * np.pi * k / TINY_VIEWS + rng.uniform(-0.2, 0.2)
        eye = centre + np.array([3.0 * np.cos(angle), 3.0 * np.sin(angle), 1.1])
        target = np.array([*rng.uniform(1.0, 3.0, 2), 0.3])
        to_point = xyz - eye
        dist = np.linalg.norm(to_point, axis=1)
        axis = (target - eye) / np.linalg.norm(target - eye)
        in_cone = (to_point @ axis) / dist > np.cos(np.radians(35))
        facing = np.einsum("ij,ij->i", normal[which], -to_point) > 0
        visible = np.flatnonzero(in_cone & facing).astype(np.int32)
        ids.append(visible)
        ptr.append(ptr[-1] + visible.shape[0])
        poses.append(_look_at(eye, target))
        mix = np.bincount(true_class[visible], minlength=len(TINY_CLASSES)).astype(float)
        emb = mix @ text / max(mix.sum(), 1.0) + 0.05 * rng.standard_normal(text.shape[1])
        view_emb.append(emb / np.linalg.norm(emb))
    visible_ids = np.concatenate(ids)
    view_count = np.bincount(visible_ids, minlength=n).astype(np.uint16)
    point_index = np.full((TINY_VIEWS, 4, 4), -1, np.int32)
    for k in range(TINY_VIEWS):
        if ids[k].size:
            point_index[k] = rng.choice(ids[k], 16).reshape(4, 4)
    intrinsics = np.tile(np.array([[2.0, 0, 2.0], [0, 2.0, 2.0], [0, 0, 1]], np.float32), (TINY_VIEWS, 1, 1))

    seg_class = np.array([r["c"] for r in rects])
    seen = np.bincount(segment[visible_ids], minlength=num_segments) > 0
    seg_emb = text[seg_class] + 0.1 * rng.standard_normal((num_segments, text.shape[1]))
    seg_emb /= np.linalg.norm(seg_emb, axis=1, keepdims=True)
    seg_emb[~seen] = 0.0

    return {
        "ingest": {schema.XYZ: xyz, schema.RGB: rgb, schema.SEMANTIC: semantic, schema.INSTANCE: instance},
        "overseg": {
            schema.NORMAL: normal[which].astype(np.float16),
            schema.CURVATURE: np.zeros(n, np.float16),
            schema.SEGMENT: segment,
            schema.BOUNDARY: boundary,
            schema.SEMANTIC_BOUNDARY: semantic_boundary,
            schema.ADJACENCY: adjacency.astype(np.int32).reshape(-1, 2),
            schema.ADJACENCY_BORDER: adjacency_border.astype(np.int32),
        },
        "render": {
            schema.VIEW_RGB: np.zeros((TINY_VIEWS, 4, 4, 3), np.uint8),
            schema.VIEW_DEPTH: np.zeros((TINY_VIEWS, 4, 4), np.float16),
            schema.VIEW_POINT_INDEX: point_index,
            schema.VIEW_K: intrinsics,
            schema.VIEW_POSE: np.stack(poses),
            schema.VISIBLE_PTR: np.array(ptr, np.int64),
            schema.VISIBLE_IDS: visible_ids,
            schema.VIEW_COUNT: view_count,
        },
        "embed": {
            schema.CLIP_VIEW: np.stack(view_emb).astype(np.float16),
            schema.CLIP_SEGMENT: seg_emb.astype(np.float16),
            schema.CLIP_SEGMENT_SEEN: seen.astype(np.uint8),
        },
    }


def make_tiny_store(path: str | Path, n_scenes: int = 2, n_points: int = 3000, seed: int = 0) -> Path | str:
    """Write a tiny synthetic store with ingest, overseg, render and embed for every scene.

    Scenes are ``scene0000_00``, ``scene0001_00``, ...; classes :data:`TINY_CLASSES`; the
    vocabulary ``classes`` holds unit text embeddings [5, 32] that the segment and view
    embeddings are built from. Deterministic in ``seed``. Returns ``Path(path)`` (a URL such as
    ``s3://bucket/store.zarr`` is returned as given).
    """
    path = path if isinstance(path, str) and "://" in path else Path(path)
    rng = np.random.default_rng(seed)
    store = Store.create(path, dataset="synthetic", class_names=TINY_CLASSES)
    text = rng.standard_normal((len(TINY_CLASSES), TINY_CLIP_DIM))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    for k in range(n_scenes):
        scene_id = f"scene{k:04d}_00"
        arrays = make_tiny_scene(n_points, rng, text)
        n = arrays["ingest"][schema.XYZ].shape[0]
        for stage in ("ingest", "overseg", "render", "embed"):
            store.write_stage(
                scene_id, stage, arrays[stage],
                {"config": {}, "config_hash": "a", "stats": {"kind": "mesh", "points": n}},
            )
    store.write_vocab(
        "classes", text.astype(np.float16),
        {"names": TINY_CLASSES, "prompts": [f"a {c} in a scene" for c in TINY_CLASSES], "model": "tiny-test"},
    )
    return path


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide tiny store (2 scenes x 3000 points); treat it as read-only."""
    return make_tiny_store(tmp_path_factory.mktemp("tiny") / "store")


def tiny_run_config(cls: type[C], store: str | Path, **overrides: Any) -> C:
    """A training config ``cls`` (PretrainConfig or FinetuneConfig) for a few CPU steps on a tiny
    store: the tiny network on the torch backend, 10 cm voxels (at most 2000 a scene), data loaded in
    the main process, no progress bar or TensorBoard; ``overrides`` set any other field."""
    from ws3d_train.data.dataset import DataConfig  # imported here: most test modules need no torch
    from ws3d_train.network import NetworkConfig

    values: dict[str, Any] = dict(
        store=str(store), data=DataConfig(voxel_size_m=0.1, max_voxels=2000),
        network=NetworkConfig(preset="tiny", backend="torch"), num_workers=0, progress=False, tensorboard=False,
    )
    return cls(**{**values, **overrides})


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one intra-op thread for a test module (restored after it): on a shared, loaded CPU
    the OpenMP threads of tiny ops spin against each other and other processes (10-50x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_tiny_clip(out_dir, *, projection_dim: int = TINY_CLIP_DIM, seed: int = 0):
    """A randomly initialised CLIPModel + BPE tokenizer saved like a real model folder (no download)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from pipeline.teacher.captions import train_tokenizer

    texts = [f"a {c} in a scene" for c in TINY_CLASSES] + ["a red chair", "a photo of a table."]
    tok = train_tokenizer(texts, out_dir, vocab_size=300, max_length=16)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "image_size": 32, "patch_size": 16, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2,
        },
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint of a real S3-compatible server on 127.0.0.1, started once per session."""
    from ws3d_train.bench.s3server import local_s3_server

    with local_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_store_url(s3_server) -> str:
    """``s3://<a fresh bucket>/store.zarr`` on the session's server."""
    import uuid

    from ws3d_train.bench.s3server import make_bucket

    return make_bucket(f"t-{uuid.uuid4().hex[:16]}", s3_server) + "/store.zarr"


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path) -> str:
    """A store location on each backend: a folder, then an ``s3://`` URL."""
    if request.param == "local":
        return str(tmp_path / "store.zarr")
    return request.getfixturevalue("s3_store_url")
