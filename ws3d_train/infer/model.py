"""A trained run as a model to call on arrays: ``Model.load(run).predict(xyz, rgb)``, no store.

    from ws3d_train import Model
    m = Model.load("runs/ft", device="auto")
    out = m.predict(xyz, rgb)            # out.labels [N], out.class_names, out.scores [N, C], out.instance [N]
    sim = m.query(xyz, "a red chair", rgb=rgb)   # [N] float32 cosine similarity

Reads the run folder (through :func:`ws3d_train.run.load_run`: checkpoint, label space and text
embeddings), the CLIP text tower that embedded the run's vocabulary for queries (offline,
:func:`pipeline.clip.model.load_encoder`), and for :meth:`Model.predict_file` one scan file
(:func:`pipeline.datasets.files.load_scan`, the reader of `ws3d ingest --dataset files`). Writes
nothing (the CLI writes the PLY files).

Every point takes the outputs of its voxel at the run's voxel size, as in `ws3d eval` (the same
function, :func:`ws3d_train.infer.predict.infer_points`); classes are chosen per voxel and
handed to the points. Over-segments (for instances and for ranking segments of a query) are
computed on the fly by the over-segmentation's pure function with its default config; a scene
whose store holds another over-segmentation may group instances differently.

Predictions are in the run's own label space (its class names and text embeddings), whatever a
store of the same scans says. Threads: the run's own thread count, put back before every forward
(see :func:`ws3d_train.run.load_run`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import ConfigError
from ws3d_train.infer.predict import (
    CombineMode,
    QueryResult,
    SceneOutputs,
    class_probabilities,
    infer_points,
    predict_instances,
    rank_segments_by_similarity,
)
from ws3d_train.open_vocab import classify_open_vocab
from ws3d_train.run import ClassSetup, LoadedRun, load_run, model_source, run_classes

__all__ = ["Model", "Prediction"]

GREY = 128
"""Colour given to points when ``rgb`` is None (as the plain-files reader does)."""


@dataclass(frozen=True, eq=False)
class Prediction:
    """Per-point predictions of one scan (N points, C classes, I instances)."""

    labels: np.ndarray
    """[N] int64 class id of each point (an index of ``class_names``)."""
    class_names: tuple[str, ...]
    """The C class names of the run's label space."""
    instance: np.ndarray
    """[N] int64 instance id, -1 for none (and everywhere when instances were not asked for)."""
    instance_class: np.ndarray
    """[I] int64 class of each instance."""
    instance_score: np.ndarray
    """[I] float64 confidence of each instance (the mean confidence of its points)."""
    point_to_voxel: np.ndarray
    """[N] int64 voxel of each point (rows of the ``voxel_*`` arrays)."""
    voxel_scores: np.ndarray
    """[Nv, C] float32 class probabilities per voxel (see :attr:`scores`)."""
    voxel_confidence: np.ndarray
    """[Nv] float32 score of each voxel's class (see :attr:`confidence`)."""
    voxel_boundary: np.ndarray
    """[Nv] float32 boundary probability of each voxel (see :attr:`boundary`)."""
    xyz: np.ndarray
    """[N, 3] float32 the positions predicted on (metres)."""
    voxel_clip: np.ndarray | None = None
    """[Nv, D] float32 unit CLIP-space feature per voxel (see :attr:`clip`)."""
    segment: np.ndarray | None = None
    """[N] int32 over-segment of each point, when instances were computed."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per step: voxelise, network, classify, overseg, instances (and read for a file)."""

    # Every point takes its voxel's outputs, so the per-point arrays below are the per-voxel ones
    # gathered through point_to_voxel: built on first access (a robot that wants only labels does
    # not pay for them) and then kept; exactly what the per-point heads give (tests).

    @cached_property
    def confidence(self) -> np.ndarray:
        """[N] float32 score of each point's class (its row's maximum of :attr:`scores`); built
        on first access from :attr:`voxel_confidence`, then kept."""
        return self.voxel_confidence[self.point_to_voxel]

    @cached_property
    def boundary(self) -> np.ndarray:
        """[N] float32 boundary probability of the boundary head (0..1) of each point's voxel;
        built on first access from :attr:`voxel_boundary`, then kept."""
        return self.voxel_boundary[self.point_to_voxel]

    @property
    def scores(self) -> np.ndarray:
        """[N, C] float32 class probabilities of each point: with the default ``calibrated``
        combination the CLIP head's share of the base classes split by the semantic head, novel
        classes at their CLIP probability (rows sum to 1 over the classes a prediction can choose;
        0 for classes the run's open-vocabulary split ignores); ``semantic``: the semantic head's
        softmax over the base classes; ``clip``: the CLIP head's softmax (temperature 0.01).
        Gathered from :attr:`voxel_scores` on every access, not kept (4 N C bytes)."""
        return self.voxel_scores[self.point_to_voxel]

    @property
    def clip(self) -> np.ndarray:
        """[N, D] float32 unit CLIP-space feature of each point (its voxel's); a text embedding's
        dot product with it is :meth:`Model.query`'s similarity. Built on access."""
        if self.voxel_clip is None:
            raise ValueError("this prediction kept no CLIP features")
        return self.voxel_clip[self.point_to_voxel]

    @property
    def num_points(self) -> int:
        return int(self.labels.shape[0])


def _as_arrays(xyz: Any, rgb: Any, faces: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Checked inputs: xyz float32 [N, 3] (NaN and infinities: the voxelisation raises); rgb uint8 [N, 3] (floats in 0..1 scaled; None: grey);
    faces int32 [F, 3] with indices in range, or None."""
    from pipeline.datasets.files import colour_u8

    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3 or xyz.shape[0] == 0:
        raise ValueError(f"xyz must be a non-empty [N, 3] array, got shape {xyz.shape}")
    xyz = np.ascontiguousarray(xyz, np.float32)
    # finite coordinates: checked by the voxelisation's first read of the points (a ValueError)
    n = xyz.shape[0]
    if rgb is None:
        rgb = np.full((n, 3), GREY, np.uint8)
    else:
        rgb = np.asarray(rgb)
        if rgb.shape != (n, 3):
            raise ValueError(f"rgb must be [N, 3] = [{n}, 3], got shape {rgb.shape}")
        rgb = np.ascontiguousarray(colour_u8(rgb))
    if faces is not None:
        faces = np.asarray(faces)
        if faces.ndim != 2 or faces.shape[1] != 3:
            raise ValueError(f"faces must be [F, 3] triangles, got shape {faces.shape}")
        faces = np.ascontiguousarray(faces, np.int32)
        if faces.size and (faces.min() < 0 or faces.max() >= n):
            raise ValueError("faces index vertices outside 0..N-1")
        if not faces.size:
            faces = None
    return xyz, rgb, faces


class Model:
    """A trained run ready to predict and answer queries on arrays (see the module docstring)."""

    def __init__(self, run: LoadedRun, classes: ClassSetup, *, combine: CombineMode | None = None,
                 text_model: str | None = None):
        self.run = run
        self.text_model = text_model
        """The CLIP model (folder or cached hub id) embedding query texts; None: the run's."""
        self.classes = classes
        supervised = run.base_ids is not None
        self.combine: CombineMode = combine or ("calibrated" if supervised else "clip")
        """How the heads decide: ``calibrated`` for a fine-tuned run, ``clip`` for a pre-training
        run (its semantic head was never trained)."""
        self._encoder: Any = None

    @classmethod
    def load(cls, run: str | Path, device: str = "auto", *, threads: int | None = None, ov_split: str | None = None,
             combine: CombineMode | None = None, text_model: str | None = None) -> "Model":
        """Load a run folder (its latest checkpoint) or a checkpoint file.

        Args:
            run: the run folder or a checkpoint.
            device: ``auto`` (a GPU when there is one), ``cpu``, ``cuda`` ...
            threads: torch threads on a CPU (default: the run's own, as it trained).
            ov_split: the open-vocabulary split (default the run's; ``none``: every class base).
            combine: ``calibrated`` | ``clip`` | ``semantic`` (default: calibrated, or clip for a
                pre-training run).
            text_model: the CLIP model for query texts (default: the one recorded with the run's
                text embeddings; it must have the CLIP head's width).

        Raises:
            CheckpointError / ConfigError naming the run when it cannot predict without a store.
        """
        loaded = load_run(run, device=device, threads=threads)
        return cls(loaded, run_classes(loaded, ov_split=ov_split), combine=combine, text_model=text_model)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.classes.class_names

    @property
    def device(self) -> torch.device:
        return self.run.device

    @property
    def voxel_size_m(self) -> float:
        from ws3d_train.data.dataset import INDOOR_VOXEL_M

        return float(self.run.data.voxel_size_m or INDOOR_VOXEL_M)

    def forward(self, xyz: Any, rgb: Any = None, *, timings: dict[str, float] | None = None) -> SceneOutputs:
        """The network's outputs on a scan (per voxel, with each point's voxel)."""
        xyz, rgb, _ = _as_arrays(xyz, rgb, None)
        return infer_points(self.run, xyz, rgb, voxel_size=self.voxel_size_m, timings=timings)

    @torch.inference_mode()
    def predict(self, xyz: Any, rgb: Any = None, faces: Any = None, *, instances: bool = True,
                novel_bias: float = 0.0, min_instance_points: int = 20, sim_threshold: float = 0.9,
                overseg: Any = None, viewpoint: Any = None) -> Prediction:
        """Classes, class scores, boundaries and instances of every point of a scan.

        Args:
            xyz: [N, 3] positions in metres, z up (as the run's training scans).
            rgb: [N, 3] colours (uint8, or floats in 0..1); None: grey.
            faces: [F, 3] triangles of a mesh (better over-segments), or None for a cloud.
            instances: group over-segments into instances (computes the over-segmentation).
            novel_bias: calibrated-stacking margin for novel classes.
            min_instance_points: smallest instance kept.
            sim_threshold: cosine of mean decoder features above which adjacent segments of one
                class merge.
            overseg: a `pipeline.overseg.config.OversegConfig` (default: its defaults).
            viewpoint: [3] point that PCA normals face (a LiDAR's sensor); None: the scan's centre.

        Returns:
            A :class:`Prediction`.

        Raises:
            ValueError for arrays of the wrong shape or with non-finite positions.
        """
        xyz, rgb, faces = _as_arrays(xyz, rgb, faces)
        timings: dict[str, float] = {}
        outputs = infer_points(self.run, xyz, rgb, voxel_size=self.voxel_size_m, timings=timings)
        t0 = time.perf_counter()
        probs = class_probabilities(outputs.semantic, outputs.clip, self.classes, mode=self.combine,
                                    novel_bias=novel_bias)
        score_v, class_v = probs.max(dim=1)
        p2v = outputs.point_to_voxel.numpy()
        voxel_confidence = score_v.cpu().numpy()
        labels = class_v.cpu().numpy()[p2v]  # classes per voxel, handed to the points
        timings["classify"] = time.perf_counter() - t0
        n = xyz.shape[0]
        instance = np.full(n, -1, np.int64)
        inst_class, inst_score = np.zeros(0, np.int64), np.zeros(0, np.float64)
        segment = None
        if instances:
            t1 = time.perf_counter()
            seg = self.oversegment(xyz, rgb, faces, cfg=overseg, viewpoint=viewpoint)
            t2 = time.perf_counter()
            feats = outputs.feats.cpu().numpy()[p2v]
            instance, inst_class, inst_score = predict_instances(
                seg.segment, seg.adjacency, labels, feats, voxel_confidence[p2v], self.class_names,
                sim_threshold=sim_threshold, min_points=min_instance_points)
            segment = seg.segment
            timings["overseg"] = t2 - t1
            timings["instances"] = time.perf_counter() - t2
        return Prediction(labels=labels, class_names=self.class_names, instance=instance, instance_class=inst_class,
                          instance_score=inst_score, point_to_voxel=p2v, voxel_scores=probs.cpu().numpy(),
                          voxel_confidence=voxel_confidence, voxel_boundary=outputs.boundary.cpu().numpy(), xyz=xyz,
                          segment=segment, timings=timings,
                          voxel_clip=torch.nn.functional.normalize(outputs.clip, dim=1).cpu().numpy())

    def oversegment(self, xyz: np.ndarray, rgb: np.ndarray, faces: np.ndarray | None = None, *, cfg: Any = None,
                    viewpoint: Any = None) -> Any:
        """The over-segmentation of a scan (`pipeline.overseg.core.overseg_points`), default config."""
        from pipeline.overseg.config import OversegConfig
        from pipeline.overseg.core import overseg_points

        return overseg_points(xyz, rgb, faces=faces, cfg=cfg or OversegConfig(),
                              viewpoint=None if viewpoint is None else np.asarray(viewpoint, np.float64))

    def predict_file(self, path: str | Path, *, reader: Any = None, **kwargs: Any) -> Prediction:
        """:meth:`predict` on a scan file (any format of `ws3d ingest --dataset files`, read with
        ``reader``, a `pipeline.datasets.files.FilesReaderConfig`); ``timings["read"]`` says how
        long reading took. A LiDAR scan (``reader.kind=lidar``) is over-segmented from its sensor."""
        from pipeline.datasets.files import FilesReaderConfig, load_scan

        t0 = time.perf_counter()
        scan = load_scan(path, reader or FilesReaderConfig())
        read = time.perf_counter() - t0
        if scan.sensor_origin is not None:
            kwargs.setdefault("viewpoint", scan.sensor_origin)
        out = self.predict(scan.xyz, scan.rgb, scan.faces, **kwargs)
        out.timings["read"] = read
        return out

    # --- queries --------------------------------------------------------------------------

    def encode_text(self, text: str) -> np.ndarray:
        """[D] unit float32 embedding of a text by the CLIP model that embedded the run's classes.

        Raises:
            ConfigError: the run records no model, or the model is not there offline.
        """
        if not text.strip():
            raise ValueError("empty query text")
        if self._encoder is None:
            from pipeline.clip.model import load_encoder

            labels = self.run.labels
            model = self.text_model or (model_source(labels.text_model) if labels is not None else "")
            if not model:
                raise ConfigError(f"{self.run.path}: the run records no CLIP model for its text embeddings")
            self._encoder = load_encoder(model, device=str(self.device), allow_download=False)
        query = np.asarray(self._encoder.encode_texts([text]), np.float32).mean(axis=0)
        if query.shape[0] != self.run.model.config.clip_dim:
            raise ConfigError(f"text embeddings are {query.shape[0]}-d, the run's CLIP head {self.run.model.config.clip_dim}-d")
        return query / max(float(np.linalg.norm(query)), 1e-12)

    @torch.inference_mode()
    def query(self, xyz: Any, text: str, rgb: Any = None, *, outputs: SceneOutputs | None = None) -> np.ndarray:
        """[N] float32 cosine similarity of every point's CLIP-space feature to ``text``
        (-1..1; higher = a better match). ``outputs`` reuses a :meth:`forward` of the same scan."""
        query = torch.from_numpy(self.encode_text(text)).to(self.device)
        if outputs is None:
            outputs = self.forward(xyz, rgb)
        sim = classify_open_vocab(outputs.clip, query[None, :])[:, 0]
        return outputs.to_points(sim).cpu().numpy().astype(np.float32)

    def query_segments(self, xyz: Any, text: str, rgb: Any = None, faces: Any = None, *, top_k: int = 5,
                       min_segment_points: int = 10, overseg: Any = None, viewpoint: Any = None,
                       scene_id: str = "-") -> QueryResult:
        """:meth:`query` and the over-segments (computed here) that match best, best first."""
        xyz, rgb, faces = _as_arrays(xyz, rgb, faces)
        outputs = self.forward(xyz, rgb)
        similarity = self.query(xyz, text, outputs=outputs)
        seg = self.oversegment(xyz, rgb, faces, cfg=overseg, viewpoint=viewpoint)
        matches = rank_segments_by_similarity(seg.segment, similarity, xyz, top_k=top_k,
                                              min_segment_points=min_segment_points)
        model = self.text_model or (model_source(self.run.labels.text_model) if self.run.labels is not None else "")
        return QueryResult(scene_id=scene_id, text=text, similarity=similarity, segments=matches, model=model)
