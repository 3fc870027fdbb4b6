"""Per-scene prediction and open-vocabulary queries with a trained run; PLY files to look at them.

Reads a run through :mod:`ws3d_train.run` (its checkpoint and label space: class names, split and
the text embeddings it trained with), the store (``points/xyz`` and ``rgb`` for the network input;
``overseg/segment`` and ``overseg/adjacency`` for instances and query segments; a store vocabulary
only when the run records none or one is asked for) and, for :func:`query_scene`, the CLIP model
that embedded the run's vocabulary (through :mod:`pipeline.clip.model`, never downloaded). Writes
only the PLY files it is asked for (benchmark text files: :mod:`ws3d_train.infer.export`).

Inference (:func:`infer_scene`) runs on the whole scene at full resolution: no crop, no
augmentation; every point takes the outputs of its voxel (the voxel -> point map of the batch).

Classes (:func:`predict_classes`), per ``mode``:

- ``"semantic"``: the semantic head alone, argmax over the supervised (base) classes;
- ``"clip"``: the CLIP-space head alone, argmax of the cosine to each class's text embedding;
- ``"calibrated"`` (default): :func:`ws3d_train.open_vocab.combine_heads`: the CLIP head decides
  how much probability goes to the base group, the semantic head splits it among base classes,
  novel classes keep their CLIP probability (plus an optional calibrated-stacking ``novel_bias``).
  Without an open-vocabulary split every class is base and this is the semantic head.

Classes ignored by an open-vocabulary split are never predicted. Instances are adjacent
over-segments of the same predicted class whose mean decoder features are similar
(:func:`ws3d_train.infer.instances.instances_from_segments`); wall/floor-like classes form none.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline import schema
from pipeline.config import ConfigError
from pipeline.store import Store
from ws3d_train.data.dataset import INDOOR_VOXEL_M, DataConfig, DataError, default_voxel_size, voxelise
from ws3d_train.infer.boundary import point_boundary, voxel_boundaries
from ws3d_train.infer.fusion import ensemble_features, fused_embeddings
from ws3d_train.infer.instances import instances_from_segments
from ws3d_train.open_vocab import classify_open_vocab, combine_heads
# the run folder (loading, label space, classes) lives in ws3d_train.run; re-exported here
from ws3d_train.run import ClassSetup, LoadedRun, load_run, model_source, resolve_classes
from ws3d_train.sparse import SparseTensor

__all__ = [
    "CombineMode",
    "STUFF_CLASSES",
    "ClassSetup",
    "LoadedRun",
    "QueryResult",
    "SceneOutputs",
    "ScenePrediction",
    "SegmentMatch",
    "VoxelInput",
    "class_palette",
    "class_probabilities",
    "clip_model_of_store",
    "format_query",
    "ensure_threads",
    "forward_voxels",
    "infer_points",
    "infer_scene",
    "load_run",
    "predict_classes",
    "predict_instances",
    "predict_scene",
    "query_scene",
    "rank_segments_by_similarity",
    "run_combine",
    "resolve_classes",
    "voxel_input",
    "write_heatmap_ply",
    "write_prediction_ply",
]

CombineMode = Literal["semantic", "clip", "calibrated"]

POINT_BOUNDARY_RULE = "region"
"""How ``predict_scene`` gives each point its ``boundary`` probability
(:func:`ws3d_train.infer.boundary.point_boundary`); chosen on the dev rooms of the miniature
benchmark (docs/benchmarks.md), never on validation rooms."""

STUFF_CLASSES: frozenset[str] = frozenset(
    {"wall", "floor", "ceiling", "road", "sidewalk", "parking", "other-ground", "terrain", "vegetation", "building"}
)
"""Class names that form no instances (ScanNet evaluates instances without wall and floor)."""

# ScanNet's benchmark colours for its 20 classes (in train-id order), reused as the first 20
# colours of every palette; further classes get golden-ratio hues.
_BASE_PALETTE = np.array(
    [
        [174, 199, 232], [152, 223, 138], [31, 119, 180], [255, 187, 120], [188, 189, 34],
        [140, 86, 75], [255, 152, 150], [214, 39, 40], [197, 176, 213], [148, 103, 189],
        [196, 156, 148], [23, 190, 207], [247, 182, 210], [219, 219, 141], [255, 127, 14],
        [158, 218, 229], [44, 160, 44], [112, 128, 144], [227, 119, 194], [82, 84, 163],
    ],
    np.uint8,
)
_UNKNOWN_RGB = np.array([0, 0, 0], np.uint8)


# ---------------------------------------------------------------------------------------------
# loading a run


# (LoadedRun and load_run: see ws3d_train.run)


# ---------------------------------------------------------------------------------------------
# inference


@dataclass(frozen=True, eq=False)
class SceneOutputs:
    """Network outputs of one whole scene: per voxel, with the voxel of every point."""

    scene_id: str
    xyz: np.ndarray
    """[N, 3] float32 point positions (store frame, metres)."""
    point_to_voxel: torch.Tensor
    """[N] int64 voxel row of each point (never -1: scenes are not cropped)."""
    semantic: torch.Tensor
    """[Nv, C] float32 semantic logits."""
    clip: torch.Tensor
    """[Nv, D] float32 CLIP-space head output (not normalised)."""
    boundary: torch.Tensor
    """[Nv] float32 boundary probability."""
    feats: torch.Tensor
    """[Nv, F] float32 last decoder features."""
    coords: torch.Tensor | None = None
    """[Nv, 4] int32 voxel coordinates (batch, x, y, z), for boundaries between neighbouring voxels."""

    def to_points(self, values: torch.Tensor) -> torch.Tensor:
        """Per-voxel [Nv, ...] -> per-point [N, ...]."""
        return values[self.point_to_voxel.to(values.device)]


def point_heads(outputs: SceneOutputs, setup: ClassSetup, store: Store | None = None,
                ensemble_2d: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-point semantic logits [N, C] and CLIP-space features [N, D] of a scene, and the share
    of points whose CLIP feature came from 2D fusion.

    With `ensemble_2d`, each point's CLIP feature is the 3D one or the fused 2D one of `store`
    (its scene's own images through the teacher), whichever is more confident over the
    predictable classes (OpenScene's 2D-3D ensemble, :func:`ws3d_train.infer.fusion.ensemble_features`).
    """
    semantic, clip = outputs.to_points(outputs.semantic), outputs.to_points(outputs.clip)
    if not ensemble_2d:
        return semantic, clip, 0.0
    if store is None:
        raise ValueError("ensemble_2d needs the store that holds the scene's 2D features")
    keep = torch.tensor(sorted(setup.base_ids + setup.novel_ids), dtype=torch.long)
    feat_2d = torch.from_numpy(fused_embeddings(store, outputs.scene_id)).to(clip.device)
    clip, took_2d = ensemble_features(clip, feat_2d, setup.text[keep.to(setup.text.device)])
    return semantic, clip, float(took_2d.float().mean())


@dataclass(frozen=True, eq=False)
class VoxelInput:
    """The network input of one whole scene: one voxel per occupied cell, its first point's features."""

    coords: torch.Tensor
    """[Nv, 4] int32 (batch index 0, x, y, z) voxel coordinates."""
    feats: torch.Tensor
    """[Nv, C] float32 voxel features (colour, height; see ``DataConfig``)."""
    point_to_voxel: np.ndarray
    """[N] int64 voxel row of each point."""


def voxel_input(xyz: np.ndarray, rgb: np.ndarray, data: DataConfig, voxel_size: float) -> VoxelInput:
    """Voxelise a whole scene for inference, exactly as the data path does for evaluation
    (:func:`ws3d_train.data.dataset.make_sample` without an ``rng`` and without a crop), but doing
    per-voxel work only once the voxels are known (a 1M-point scan costs its voxelisation, not
    ten per-point passes).

    Args:
        xyz: [N, 3] float32 metres. rgb: [N, 3] uint8.
    """
    coords, _, rep, p2v = voxelise(xyz, voxel_size)
    feats = [rgb[rep].astype(np.float32) / np.float32(255.0) - np.float32(0.5)]
    if data.use_height:
        feats.append(((xyz[rep, 2] - xyz[:, 2].min()) / np.float32(data.height_scale_m))[:, None])
    batch_col = np.zeros((coords.shape[0], 1), np.int32)
    return VoxelInput(coords=torch.from_numpy(np.concatenate([batch_col, coords], axis=1)),
                      feats=torch.from_numpy(np.concatenate(feats, axis=1).astype(np.float32)), point_to_voxel=p2v)


@torch.inference_mode()
def forward_voxels(run: LoadedRun, inputs: VoxelInput) -> Any:
    """The bare network forward on one scene's voxels (the run's threads and autocast)."""
    ensure_threads(run)
    use_bf16 = run.device.type == "cuda" and bool(run.config.get("bf16", True))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
        return run.model(SparseTensor(feats=inputs.feats.to(run.device), coords=inputs.coords.to(run.device)))


@torch.inference_mode()
def infer_points(run: LoadedRun, xyz: np.ndarray, rgb: np.ndarray, *, scene_id: str = "-",
                 voxel_size: float | None = None, timings: dict[str, float] | None = None) -> SceneOutputs:
    """Run the network on a whole scene given as arrays (no store, no crop, no augmentation).

    Args:
        run: the loaded run.
        xyz: [N, 3] float positions in metres (z up, as the run's training scenes).
        rgb: [N, 3] uint8 colours.
        scene_id: a name for messages.
        voxel_size: default the run's (its data config); 0.02 m for runs that record none.
        timings: filled with seconds of ``voxelise`` and ``network`` when given.
    """
    import time

    t0 = time.perf_counter()
    xyz = np.ascontiguousarray(xyz, np.float32)
    size = float(voxel_size or run.data.voxel_size_m or INDOOR_VOXEL_M)
    inputs = voxel_input(xyz, np.ascontiguousarray(rgb, np.uint8), run.data, size)
    t1 = time.perf_counter()
    out = forward_voxels(run, inputs)
    outputs = SceneOutputs(
        scene_id=scene_id,
        xyz=xyz,
        point_to_voxel=torch.from_numpy(inputs.point_to_voxel),
        semantic=out.semantic.float(),
        clip=out.clip.float(),
        boundary=torch.sigmoid(out.boundary.float()),
        feats=out.feats.float(),
        coords=inputs.coords,
    )
    if timings is not None:
        timings["voxelise"] = timings.get("voxelise", 0.0) + t1 - t0
        timings["network"] = timings.get("network", 0.0) + time.perf_counter() - t1
    return outputs


def ensure_threads(run: LoadedRun) -> None:
    """Put torch back on the run's thread count (numba's OpenMP layer raises it when the
    over-segmentation runs in the same process; see :func:`ws3d_train.device.set_torch_threads`)."""
    if run.device.type == "cpu" and run.threads > 0 and torch.get_num_threads() != run.threads:
        torch.set_num_threads(run.threads)


def infer_scene(run: LoadedRun, store: Store, scene_id: str) -> SceneOutputs:
    """Run the network on a whole scene of a store (no crop, no augmentation): :func:`infer_points`
    on its ``points/xyz`` and ``points/rgb`` with the run's voxel size (or the store's default).

    Raises:
        DataError naming the scene when it is not in the store.
    """
    if not store.has_scene(scene_id):
        raise DataError(f"{store.path}: scenes not in the store: [{scene_id!r}]")
    xyz, rgb = store.read_many(scene_id, [schema.XYZ, schema.RGB])
    size = run.data.voxel_size_m or default_voxel_size(store, [scene_id])
    return infer_points(run, xyz, rgb, scene_id=scene_id, voxel_size=size)


# (ClassSetup and resolve_classes: see ws3d_train.run)


@torch.inference_mode()
def predict_classes(
    semantic: torch.Tensor,
    clip: torch.Tensor,
    setup: ClassSetup,
    *,
    mode: CombineMode = "calibrated",
    novel_bias: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A class per row from the semantic and/or CLIP heads (see the module docstring).

    Args:
        semantic: [M, C] semantic logits.
        clip: [M, D] CLIP-space head output.
        setup: classes, text embeddings, split.
        mode: ``"semantic"``, ``"clip"`` or ``"calibrated"``.
        novel_bias: calibrated-stacking margin for novel classes (``calibrated`` and ``clip``).

    Returns:
        ``(class id [M] int64, probability of that class [M] float32)``.
    """
    base = torch.tensor(setup.base_ids, dtype=torch.long, device=semantic.device)
    if mode == "semantic":
        prob = torch.softmax(semantic.float()[:, base], dim=1)
        score, local = prob.max(dim=1)
        return base[local], score
    if mode not in ("clip", "calibrated"):
        raise ValueError(f"mode must be 'semantic', 'clip' or 'calibrated'; got {mode!r}")
    keep = sorted(setup.base_ids + setup.novel_ids)
    keep_t = torch.tensor(keep, dtype=torch.long, device=semantic.device)
    position = {c: i for i, c in enumerate(keep)}
    clip_logits = classify_open_vocab(clip.float(), setup.text[keep_t])
    log_scores = combine_heads(
        semantic.float()[:, base], clip_logits,
        [position[c] for c in setup.base_ids], [position[c] for c in setup.novel_ids],
        mode=mode, novel_bias=novel_bias,
    )
    best, local = log_scores.max(dim=1)
    return keep_t[local], best.exp().clamp(max=1.0)


@torch.inference_mode()
def class_probabilities(
    semantic: torch.Tensor,
    clip: torch.Tensor,
    setup: ClassSetup,
    *,
    mode: CombineMode = "calibrated",
    novel_bias: float = 0.0,
) -> torch.Tensor:
    """[M, C] float32 scores over every class from the heads, the distribution whose argmax
    :func:`predict_classes` takes: ``semantic``: the semantic head's softmax over the base classes;
    ``clip``/``calibrated``: :func:`ws3d_train.open_vocab.combine_heads` (a distribution over the
    base and novel classes; with ``novel_bias`` the novel columns are scaled by ``exp(novel_bias)``).
    Classes a prediction never chooses (ignored by the split; novel ones in ``semantic`` mode) are 0."""
    num = len(setup.class_names)
    out = torch.zeros((semantic.shape[0], num), dtype=torch.float32, device=semantic.device)
    base = torch.tensor(setup.base_ids, dtype=torch.long, device=semantic.device)
    if mode == "semantic":
        out[:, base] = torch.softmax(semantic.float()[:, base], dim=1)
        return out
    if mode not in ("clip", "calibrated"):
        raise ValueError(f"mode must be 'semantic', 'clip' or 'calibrated'; got {mode!r}")
    keep = sorted(setup.base_ids + setup.novel_ids)
    keep_t = torch.tensor(keep, dtype=torch.long, device=semantic.device)
    position = {c: i for i, c in enumerate(keep)}
    log_scores = combine_heads(
        semantic.float()[:, base], classify_open_vocab(clip.float(), setup.text[keep_t]),
        [position[c] for c in setup.base_ids], [position[c] for c in setup.novel_ids],
        mode=mode, novel_bias=novel_bias,
    )
    out[:, keep_t] = log_scores.exp()
    return out


def predict_instances(
    segment: np.ndarray,
    adjacency: np.ndarray,
    pred_class: np.ndarray,
    embed: np.ndarray,
    score: np.ndarray,
    class_names: Sequence[str],
    *,
    sim_threshold: float = 0.9,
    min_points: int = 1,
    ignore_classes: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Instances of one scene over its segment graph.

    Args:
        segment: [N] int over-segment id per point.
        adjacency: [P, 2] adjacent segment pairs.
        pred_class: [N] int predicted class per point.
        embed: [N, F] float per-point embedding compared across adjacent segments.
        score: [N] float per-point confidence (an instance's score is its mean).
        class_names: the C class names.
        sim_threshold: cosine above which adjacent same-class segments merge.
        min_points: smallest instance kept.
        ignore_classes: class names that form no instance (default: those in :data:`STUFF_CLASSES`).

    Returns:
        ``(instance id [N] int64 (-1 none), instance class [I], instance score [I])``.
    """
    stuff = STUFF_CLASSES if ignore_classes is None else frozenset(ignore_classes)
    ignore_ids = [i for i, n in enumerate(class_names) if n in stuff]
    return instances_from_segments(
        segment, pred_class, embed, adjacency, sim_threshold=sim_threshold, ignore_classes=ignore_ids,
        point_score=score, min_points=min_points,
    )


@dataclass(frozen=True, eq=False)
class ScenePrediction:
    """Per-point predictions of one scene."""

    scene_id: str
    xyz: np.ndarray
    """[N, 3] float32 positions."""
    pred_class: np.ndarray
    """[N] int64 predicted class id."""
    score: np.ndarray
    """[N] float32 probability of the predicted class."""
    instance: np.ndarray
    """[N] int64 instance id, -1 for none."""
    instance_class: np.ndarray
    """[I] int64 class of each instance."""
    instance_score: np.ndarray
    """[I] float64 confidence of each instance."""
    clip: np.ndarray
    """[N, D] float32 unit CLIP-space feature per point."""
    class_names: tuple[str, ...]
    """The C class names."""
    boundary: np.ndarray | None = None
    """[N] float32 probability that a semantic boundary passes through the point
    (:data:`POINT_BOUNDARY_RULE`)."""


def run_combine(run: LoadedRun) -> CombineMode:
    """The prediction rule a run was fine-tuned for (its config's ``combine``): ``calibrated`` for
    runs that predate the setting, ``clip`` for pre-training runs (their semantic head is untrained)."""
    if run.base_ids is None:
        return "clip"
    return run.config.get("combine") or "calibrated"


def _read_overseg(store: Store, scene_id: str) -> tuple[np.ndarray, np.ndarray]:
    if not store.has(scene_id, schema.SEGMENT):
        raise DataError(f"{store.path}: scene {scene_id} has no overseg/segment; run `ws3d overseg` first")
    return store.read(scene_id, schema.SEGMENT), store.read(scene_id, schema.ADJACENCY)


def predict_scene(
    run: str | Path | LoadedRun,
    store_path: str | Path,
    scene_id: str,
    *,
    vocab: str | None = None,
    ov_split: str | None = None,
    combine: CombineMode | None = None,
    novel_bias: float = 0.0,
    sim_threshold: float = 0.9,
    min_instance_points: int = 20,
    ensemble_2d: bool = False,
    device: str = "auto",
) -> ScenePrediction:
    """Classes, instances and CLIP features of every point of a scene.

    Args:
        run: a run directory, a checkpoint, or a :class:`LoadedRun`.
        store_path: the store.
        scene_id: the scene.
        vocab: None: the run's own text embeddings (else the store's ``classes``); a name: that
            store vocabulary (see :func:`ws3d_train.run.resolve_classes`).
        ov_split: see :func:`resolve_classes`.
        combine: how the heads decide (module docstring); None: the run's rule (:func:`run_combine`).
        novel_bias: calibrated-stacking margin for novel classes.
        sim_threshold: cosine threshold for merging segments into instances.
        min_instance_points: smallest instance kept.
        ensemble_2d: combine the CLIP head with the scene's fused 2D features (:func:`point_heads`).
        device: ``auto``, ``cpu``, ``cuda`` ...

    Returns:
        A :class:`ScenePrediction`.
    """
    loaded = load_run(run, device=device)
    store = Store.open(store_path)
    setup = resolve_classes(loaded, store, vocab=vocab, ov_split=ov_split)
    outputs = infer_scene(loaded, store, scene_id)
    semantic, clip_points, _ = point_heads(outputs, setup, store, ensemble_2d)
    cls_p, score_p = predict_classes(semantic, clip_points, setup, mode=combine or run_combine(loaded), novel_bias=novel_bias)
    pred = cls_p.cpu().numpy()
    score = score_p.cpu().numpy().astype(np.float32)
    segment, adjacency = _read_overseg(store, scene_id)
    instance, inst_class, inst_score = predict_instances(
        segment, adjacency, pred, outputs.to_points(outputs.feats).cpu().numpy(), score, setup.class_names,
        sim_threshold=sim_threshold, min_points=min_instance_points,
    )
    clip = torch.nn.functional.normalize(clip_points, dim=1).cpu().numpy()
    p2v, flag = outputs.point_to_voxel.cpu().numpy(), store.read(scene_id, schema.BOUNDARY)
    boundary = point_boundary(voxel_boundaries(outputs.coords, outputs.boundary, p2v, segment, flag), p2v, flag,
                              POINT_BOUNDARY_RULE)
    return ScenePrediction(
        scene_id=scene_id, xyz=outputs.xyz, pred_class=pred, score=score, instance=instance,
        instance_class=inst_class, instance_score=inst_score, clip=clip, class_names=setup.class_names,
        boundary=boundary,
    )


# ---------------------------------------------------------------------------------------------
# PLY output


def class_palette(num_classes: int) -> np.ndarray:
    """[C, 3] uint8 fixed colours: ScanNet's 20 benchmark colours, then golden-ratio hues."""
    if num_classes <= len(_BASE_PALETTE):
        return _BASE_PALETTE[:num_classes].copy()
    from matplotlib.colors import hsv_to_rgb

    extra = num_classes - len(_BASE_PALETTE)
    hue = (np.arange(extra) * 0.618033988749895) % 1.0
    hsv = np.stack([hue, np.full(extra, 0.65), np.full(extra, 0.9)], axis=1)
    rgb = np.round(hsv_to_rgb(hsv) * 255).astype(np.uint8)
    return np.concatenate([_BASE_PALETTE, rgb])


def _void_rows(a: np.ndarray) -> np.ndarray:
    """[N, K] -> [N] opaque items of K * itemsize bytes (a contiguous view, copied if needed)."""
    a = np.ascontiguousarray(a)
    return a.view(np.dtype(f"V{a.shape[1] * a.itemsize}")).reshape(-1)


def _void_column(vertex: np.ndarray, offset: int, size: int) -> np.ndarray:
    """[N] view of ``size`` bytes at ``offset`` in each row of a structured array."""
    return np.ndarray((vertex.shape[0],), np.dtype(f"V{size}"), vertex, offset, (vertex.dtype.itemsize,))


def _write_ply(path: str | Path, xyz: np.ndarray, rgb: np.ndarray, extra: dict[str, np.ndarray],
               dtypes: dict[str, str] | None = None) -> Path:
    """Binary little-endian PLY with x, y, z, red, green, blue and extra scalar vertex properties
    (each of its values' dtype, or ``dtypes[name]``). The vertex rows are filled through two
    [N, 3] views (positions, colours) and one column per extra property, casting on the way."""
    from plyfile import PlyData, PlyElement

    xyz = np.asarray(xyz).reshape(-1, 3)
    n = xyz.shape[0]
    dtypes = dtypes or {}
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
    fields += [(name, np.dtype(dtypes.get(name, np.asarray(values).dtype)).newbyteorder("<").str)
               for name, values in extra.items()]
    vertex = np.empty(n, dtype=fields)
    # positions and colours copied a row at a time (12 and 3 bytes), not a coordinate at a time
    _void_column(vertex, 0, 12)[...] = _void_rows(np.asarray(xyz, "<f4").reshape(n, 3))
    rgb = np.asarray(rgb)
    _void_column(vertex, 12, 3)[...] = rgb.reshape(-1) if rgb.dtype == np.dtype("V3") else _void_rows(
        np.asarray(rgb, np.uint8).reshape(n, 3))
    for name, values in extra.items():
        values = np.asarray(values).reshape(-1)
        if values.shape[0] != n:
            raise ValueError(f"{path}: property {name} has {values.shape[0]} values for {n} points")
        vertex[name] = values
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    PlyData([PlyElement.describe(vertex, "vertex")], text=False, byte_order="<").write(str(path))
    return path


def write_prediction_ply(
    path: str | Path,
    xyz: np.ndarray | ScenePrediction,
    pred_class: np.ndarray | None = None,
    instance: np.ndarray | None = None,
    *,
    num_classes: int | None = None,
    boundary: np.ndarray | None = None,
) -> Path:
    """Write a scene coloured by predicted class; class and instance ids as extra vertex properties.

    Args:
        path: the .ply file to write (directories created).
        xyz: [N, 3] positions, or a whole :class:`ScenePrediction` (then its classes, instances
            and class count are used and the next arguments are left out).
        pred_class: [N] int class ids (negative: unknown, drawn black).
        instance: optional [N] int instance ids (-1 none), written as property ``instance``.
        num_classes: palette size (default: max class + 1); colours come from :func:`class_palette`.
        boundary: optional [N] float boundary probability, written as property ``boundary``.

    Returns:
        The path. Any PLY viewer shows the colours; ``label``/``instance`` are int32 properties,
        ``boundary`` (given, or a :class:`ScenePrediction`'s when it has one) a float32 property.
    """
    if isinstance(xyz, ScenePrediction):
        if pred_class is not None or instance is not None or boundary is not None:
            raise TypeError("write_prediction_ply: pass either a ScenePrediction or xyz + pred_class, not both")
        prediction = xyz
        xyz, pred_class, instance = prediction.xyz, prediction.pred_class, prediction.instance
        boundary = prediction.boundary
        num_classes = num_classes or len(prediction.class_names)
    if pred_class is None:
        raise TypeError("write_prediction_ply: pred_class is required with xyz")
    pred_class = np.asarray(pred_class).reshape(-1)
    if not np.issubdtype(pred_class.dtype, np.integer):
        pred_class = pred_class.astype(np.int64)
    n = np.asarray(xyz).reshape(-1, 3).shape[0]
    if pred_class.shape[0] != n:
        raise ValueError(f"{path}: {pred_class.shape[0]} classes for {n} points")
    low, high = (int(pred_class.min()), int(pred_class.max())) if n else (0, -1)
    palette = class_palette(max(int(num_classes or 0), high + 1, 1))
    # unknown (negative) classes: the black row after the palette, reached by index -1
    colours = _void_rows(np.concatenate([palette, _UNKNOWN_RGB[None]]))  # [C + 1] 3-byte items
    rgb = colours[pred_class if low >= -1 else np.maximum(pred_class, -1)]
    extra, dtypes = {"label": pred_class}, {"label": "i4"}
    if instance is not None:
        extra["instance"], dtypes["instance"] = instance, "i4"
    if boundary is not None:
        extra["boundary"], dtypes["boundary"] = boundary, "f4"
    return _write_ply(path, xyz, rgb, extra, dtypes)


def write_heatmap_ply(path: str | Path, xyz: np.ndarray, values: np.ndarray, *, cmap: str = "turbo") -> Path:
    """Write points coloured by ``values`` [N] (min -> dark blue, max -> dark red with "turbo");
    the raw values are kept as the float property ``similarity``."""
    from matplotlib import colormaps

    values = np.asarray(values, np.float32).reshape(-1)
    lo, hi = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    unit = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    rgb = np.round(colormaps[cmap](unit)[:, :3] * 255).astype(np.uint8)
    return _write_ply(path, xyz, rgb, {"similarity": values})


# ---------------------------------------------------------------------------------------------
# open-vocabulary queries

def clip_model_of_store(store: Store, vocab: str = "classes") -> str:
    """The CLIP model (folder or hub id) that embedded a store's vocabulary.

    ``pipeline.embed.core`` records ``pipeline.clip.model.model_identity`` in the vocabulary attrs:
    ``dir:<folder>:<hashes>`` or ``hub:<id>``; a plain folder path is accepted too.

    Raises:
        ConfigError when the vocabulary is missing or names no model.
    """
    try:
        _, attrs = store.read_vocab(vocab)
    except KeyError as exc:
        raise ConfigError(str(exc)) from exc
    model = model_source(str(attrs.get("model") or ""))
    if not model:
        raise ConfigError(f"{store.path}: vocabulary {vocab!r} records no CLIP model; pass model_dir")
    return model


@dataclass(frozen=True)
class SegmentMatch:
    """One over-segment's match to a query."""

    segment: int
    """Segment id in ``overseg/segment``."""
    score: float
    """Mean cosine similarity of its points to the query."""
    centroid: tuple[float, float, float]
    """Mean position of its points (metres, store frame)."""
    points: int
    """Its number of points."""


@dataclass(frozen=True, eq=False)
class QueryResult:
    """Similarity of every point of a scene to a text query."""

    scene_id: str
    text: str
    similarity: np.ndarray
    """[N] float32 cosine between each point's CLIP-space feature and the query embedding."""
    segments: list[SegmentMatch]
    """The best-matching segments, best first."""
    model: str
    """The CLIP model that embedded the text."""
    ply: Path | None = None
    """The heatmap PLY written, if any."""


def rank_segments_by_similarity(segment: np.ndarray, similarity: np.ndarray, xyz: np.ndarray, *, top_k: int = 5,
                                min_segment_points: int = 10) -> list[SegmentMatch]:
    """The ``top_k`` over-segments of at least ``min_segment_points`` points with the highest mean
    similarity ([N] float per point; ``segment`` [N] int ids 0..S-1), best first."""
    segment = np.asarray(segment).astype(np.int64)
    num_segments = int(segment.max()) + 1 if segment.size else 0
    count = np.bincount(segment, minlength=num_segments)
    mean_sim = np.bincount(segment, weights=similarity, minlength=num_segments) / np.maximum(count, 1)
    centroid = np.stack(
        [np.bincount(segment, weights=xyz[:, k], minlength=num_segments) for k in range(3)], axis=1
    ) / np.maximum(count, 1)[:, None]
    ranked = np.flatnonzero(count >= min_segment_points)
    ranked = ranked[np.argsort(-mean_sim[ranked], kind="stable")][:top_k]
    return [SegmentMatch(int(s), float(mean_sim[s]), tuple(float(v) for v in centroid[s]), int(count[s])) for s in ranked]


def query_scene(
    run: str | Path | LoadedRun,
    store_path: str | Path,
    scene_id: str,
    text: str,
    *,
    model_dir: str | None = None,
    top_k: int = 5,
    min_segment_points: int = 10,
    out_ply: str | Path | None = None,
    use_prompts: bool = False,
    device: str = "auto",
) -> QueryResult:
    """Open-vocabulary query: how well each point of a scene matches ``text``.

    The text is embedded by the text tower of the CLIP model that embedded the run's vocabulary
    (recorded in the run folder; for older runs, in the store's ``classes`` vocabulary;
    ``model_dir`` overrides it), loaded offline with
    :func:`pipeline.clip.model.load_encoder`. With ``use_prompts`` the text is put into the
    vocabulary's prompt templates and the embeddings averaged (as class names were); otherwise it
    is embedded as written. Segments are scored by the mean similarity of their points.

    Args:
        run: a run directory, a checkpoint, or a :class:`LoadedRun`.
        store_path: the store.
        scene_id: the scene.
        text: the query, e.g. "a red chair".
        model_dir: CLIP model folder (or hub id already in the cache) to use instead of the store's.
        top_k: how many segments to return.
        min_segment_points: smaller segments are not ranked (their mean is noise).
        out_ply: write a heatmap PLY there (see :func:`write_heatmap_ply`).
        use_prompts: average over the vocabulary's prompt templates.
        device: ``auto``, ``cpu``, ``cuda`` ...

    Raises:
        ConfigError: no model recorded, or the model's width is not the run's CLIP head width.
    """
    from pipeline.clip.model import load_encoder

    if not text.strip():
        raise ValueError("query_scene: empty query text")
    loaded = load_run(run, device=device)
    store = Store.open(store_path)
    recorded = model_source(loaded.labels.text_model) if loaded.labels is not None else ""
    model = model_dir or recorded or clip_model_of_store(store)
    encoder = load_encoder(model, device=str(loaded.device), allow_download=False)
    texts = [text]
    if use_prompts:
        templates = list(loaded.labels.prompts) if loaded.labels is not None and loaded.labels.prompts else \
            list(store.read_vocab("classes")[1].get("prompts") or [])
        texts = [t.format(text) for t in templates if "{}" in t] or texts
    query = encoder.encode_texts(texts).mean(axis=0)
    query = query / max(float(np.linalg.norm(query)), 1e-12)
    if query.shape[0] != loaded.model.config.clip_dim:
        raise ConfigError(f"{model}: text embeddings are {query.shape[0]}-d, the run's CLIP head {loaded.model.config.clip_dim}-d")

    outputs = infer_scene(loaded, store, scene_id)
    q = torch.from_numpy(query.astype(np.float32)).to(loaded.device)
    sim_voxel = classify_open_vocab(outputs.clip, q[None, :])[:, 0]
    similarity = outputs.to_points(sim_voxel).cpu().numpy().astype(np.float32)

    segment, _ = _read_overseg(store, scene_id)
    matches = rank_segments_by_similarity(segment, similarity, outputs.xyz, top_k=top_k,
                                          min_segment_points=min_segment_points)
    ply = write_heatmap_ply(out_ply, outputs.xyz, similarity) if out_ply is not None else None
    return QueryResult(scene_id=scene_id, text=text, similarity=similarity, segments=matches, model=model, ply=ply)


def format_query(result: QueryResult) -> str:
    """A small terminal table of the best-matching segments of a query."""
    lines = [
        f'query "{result.text}" in {result.scene_id} '
        f"(similarity {result.similarity.min(initial=0):.3f} .. {result.similarity.max(initial=0):.3f})",
        f"{'rank':>4}  {'segment':>7}  {'score':>6}  {'points':>6}  centroid (m)",
    ]
    for rank, m in enumerate(result.segments, 1):
        x, y, z = m.centroid
        lines.append(f"{rank:>4}  {m.segment:>7}  {m.score:>6.3f}  {m.points:>6}  ({x:.2f}, {y:.2f}, {z:.2f})")
    if result.ply is not None:
        lines.append(f"heatmap: {result.ply}")
    return "\n".join(lines)
