"""The viewer's pure core: what `ws3d view` shows, computed from a store and a run without a server.

Reads (through :class:`pipeline.store.Store` and :mod:`ws3d_train.infer.predict`): a scene's
``points/`` (xyz, rgb, semantic, instance), ``mesh/faces`` where present, ``overseg/`` (segment,
boundary), ``views/`` (K, pose, rgb); with a run, its predictions and per-point CLIP-space
features, and the text tower of the CLIP model that embedded the store's vocabulary. Writes nothing.

Everything here returns NumPy arrays (colours ``[N, 3] uint8``, legends as lists of
:class:`LegendEntry`); :mod:`ws3d_train.viewer.server` only hands them to viser. The one stateful
object, :class:`ViewerState`, is the page's model: the current scene, colour mode, query and
threshold, and the (possibly subsampled) arrays on screen. Tests drive it directly.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import schema
from pipeline.errors import UserError
from pipeline.store import Store

__all__ = [
    "DEFAULT_POINT_BUDGET",
    "ViewerError",
    "MODES",
    "RUN_MODES",
    "SCENE_MODES",
    "CameraView",
    "LegendEntry",
    "RunModel",
    "RunScene",
    "ScanFiles",
    "SceneData",
    "ViewerState",
    "base_novel_colours",
    "boundary_colours",
    "boundary_probability_colours",
    "camera_views",
    "check_scene",
    "class_colours",
    "class_legend",
    "frame_camera",
    "heatmap_colours",
    "id_colours",
    "legend_markdown",
    "load_scene",
    "mesh_glb",
    "point_size_m",
    "rank_segments",
    "rotation_to_wxyz",
    "subsample_indices",
    "view_image",
]

DEFAULT_POINT_BUDGET = 400_000
"""Points drawn at most; larger scenes are shown as a uniform random subset (the page says so)."""

SCENE_MODES: tuple[str, ...] = ("rgb", "gt class", "gt instance", "segments", "boundaries")
"""Colour modes that need only the store."""
RUN_MODES: tuple[str, ...] = ("predicted class", "predicted instance", "predicted boundaries", "base/novel", "query")
"""Colour modes that need a run (``query`` after a query was made)."""
MODES: tuple[str, ...] = SCENE_MODES + RUN_MODES

UNKNOWN_RGB = np.array([60, 60, 60], np.uint8)
"""Ignored labels, points in no instance or segment."""
BOUNDARY_RGB = np.array([230, 40, 40], np.uint8)
INTERIOR_RGB = np.array([200, 200, 200], np.uint8)
BASE_RGB = np.array([70, 130, 220], np.uint8)
NOVEL_RGB = np.array([250, 150, 30], np.uint8)
BELOW_THRESHOLD_RGB = np.array([110, 110, 110], np.uint8)




class ViewerError(UserError, ValueError):
    """A choice that does not apply: an unknown scene, a mode without its data, a query without a run."""


# ---------------------------------------------------------------------------------------------
# colours


def class_colours(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[N] class ids -> [N, 3] uint8 colours of :func:`ws3d_train.infer.predict.class_palette`
    (the colours of ``ws3d predict``'s PLY files); negative / out-of-range ids get :data:`UNKNOWN_RGB`."""
    from ws3d_train.infer.predict import class_palette

    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    palette = class_palette(max(num_classes, 1))
    valid = (labels >= 0) & (labels < len(palette))
    return np.where(valid[:, None], palette[np.where(valid, labels, 0)], UNKNOWN_RGB).astype(np.uint8)


def id_colours(ids: np.ndarray) -> np.ndarray:
    """[N] instance or segment ids -> [N, 3] uint8, a fixed bright colour per id (golden-ratio
    hues, so neighbouring ids differ); negative ids get :data:`UNKNOWN_RGB`."""
    from matplotlib.colors import hsv_to_rgb

    ids = np.asarray(ids).reshape(-1).astype(np.int64)
    unique, inverse = np.unique(np.where(ids >= 0, ids, 0), return_inverse=True)
    hue = (unique * 0.618033988749895) % 1.0
    sat = 0.55 + 0.35 * ((unique * 7) % 3) / 2.0  # vary saturation/value too: more distinct ids
    val = 0.95 - 0.2 * ((unique * 5) % 2)
    rgb = np.round(hsv_to_rgb(np.stack([hue, sat, val], axis=1)) * 255).astype(np.uint8)
    return np.where((ids >= 0)[:, None], rgb[inverse.reshape(-1)], UNKNOWN_RGB).astype(np.uint8)


def boundary_colours(boundary: np.ndarray) -> np.ndarray:
    """[N] 0/1 boundary flags -> [N, 3] uint8: boundary points red, the rest light grey."""
    flag = np.asarray(boundary).reshape(-1) == 1
    return np.where(flag[:, None], BOUNDARY_RGB, INTERIOR_RGB).astype(np.uint8)


def boundary_probability_colours(prob: np.ndarray) -> np.ndarray:
    """[N] boundary probabilities in [0, 1] -> [N, 3] uint8, from :data:`INTERIOR_RGB` (0) to
    :data:`BOUNDARY_RGB` (1), as the ``boundaries`` mode draws over-segment borders."""
    p = np.clip(np.asarray(prob, np.float32).reshape(-1), 0.0, 1.0)[:, None]
    return np.round(INTERIOR_RGB * (1.0 - p) + BOUNDARY_RGB * p).astype(np.uint8)


def base_novel_colours(pred_class: np.ndarray, base_ids: Sequence[int], novel_ids: Sequence[int]) -> np.ndarray:
    """[N] predicted classes -> [N, 3] uint8: base classes blue, novel classes orange, others grey."""
    pred = np.asarray(pred_class).reshape(-1).astype(np.int64)
    out = np.tile(UNKNOWN_RGB, (pred.shape[0], 1))
    out[np.isin(pred, np.asarray(base_ids, np.int64))] = BASE_RGB
    out[np.isin(pred, np.asarray(novel_ids, np.int64))] = NOVEL_RGB
    return out


def heatmap_colours(similarity: np.ndarray, threshold: float | None = None, *, cmap: str = "turbo") -> np.ndarray:
    """[N] query similarity -> [N, 3] uint8 colours, min -> dark blue, max -> dark red (as
    :func:`ws3d_train.infer.predict.write_heatmap_ply`); points below ``threshold`` are drawn grey."""
    from matplotlib import colormaps

    values = np.asarray(similarity, np.float32).reshape(-1)
    lo, hi = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    unit = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    rgb = np.round(colormaps[cmap](unit)[:, :3] * 255).astype(np.uint8)
    if threshold is not None:
        rgb[values < threshold] = BELOW_THRESHOLD_RGB
    return rgb


# ---------------------------------------------------------------------------------------------
# legend


@dataclass(frozen=True)
class LegendEntry:
    """One row of the page's legend."""

    name: str
    rgb: tuple[int, int, int]
    points: int | None
    """Points of the whole scene with this entry (not only those drawn); None: not a count."""


def class_legend(labels: np.ndarray, class_names: Sequence[str], *, unknown: str = "ignored") -> list[LegendEntry]:
    """Legend rows for classes present in ``labels`` [N], most frequent first."""
    from ws3d_train.infer.predict import class_palette

    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    palette = class_palette(max(len(class_names), 1))
    valid = (labels >= 0) & (labels < len(class_names))
    counts = np.bincount(labels[valid], minlength=len(class_names))
    rows = [
        LegendEntry(str(class_names[c]), tuple(int(v) for v in palette[c]), int(counts[c]))
        for c in np.argsort(-counts, kind="stable") if counts[c]
    ]
    if (~valid).any():
        rows.append(LegendEntry(unknown, tuple(int(v) for v in UNKNOWN_RGB), int((~valid).sum())))
    return rows


def legend_markdown(entries: Sequence[LegendEntry], *, max_rows: int = 40) -> str:
    """The legend as HTML for the page (a coloured swatch, the name, the point count)."""
    rows = []
    for entry in entries[:max_rows]:
        r, g, b = entry.rgb
        rows.append(
            f'<div style="font-size:0.85em"><span style="display:inline-block;width:0.9em;height:0.9em;'
            f'background:rgb({r},{g},{b});margin-right:0.4em;border:1px solid #444"></span>'
            f"{_escape(entry.name)} <span style=\"color:#888\">{'' if entry.points is None else entry.points}</span></div>"
        )
    if len(entries) > max_rows:
        rows.append(f'<div style="font-size:0.85em;color:#888">... {len(entries) - max_rows} more</div>')
    return "\n".join(rows)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ---------------------------------------------------------------------------------------------
# subsampling, cameras, segments


def subsample_indices(num_points: int, budget: int, *, seed: int = 0) -> np.ndarray | None:
    """Sorted indices of a uniform random subset of ``budget`` points, or None when all fit."""
    if budget <= 0 or num_points <= budget:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_points, size=budget, replace=False))


def point_size_m(xyz: np.ndarray, *, sample: int = 2000, seed: int = 0) -> float:
    """A display point size (metres) near the sample spacing of ``xyz`` [N, 3]: 1.5 x the median
    distance from a random sample of points to their nearest neighbour, clipped to 3 mm .. 20 cm."""
    from scipy.spatial import cKDTree

    xyz = np.asarray(xyz, np.float32).reshape(-1, 3)
    if xyz.shape[0] < 2:
        return 0.02
    rng = np.random.default_rng(seed)
    probe = xyz[rng.choice(xyz.shape[0], size=min(sample, xyz.shape[0]), replace=False)]
    dist, _ = cKDTree(xyz).query(probe, k=2)
    return float(np.clip(1.5 * np.median(dist[:, 1]), 0.003, 0.2))


def rotation_to_wxyz(rot: np.ndarray) -> np.ndarray:
    """[3, 3] rotation matrix -> [4] unit quaternion (w, x, y, z), w >= 0 (Shepperd's method)."""
    m = np.asarray(rot, np.float64)
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    q = np.asarray(q)
    q /= np.linalg.norm(q)
    return q if q[0] >= 0 else -q


@dataclass(frozen=True)
class CameraView:
    """One rendered view as a frustum (viser's convention: OpenCV axes, camera -> world)."""

    index: int
    fov_y_rad: float
    """Vertical field of view, 2 atan(H / 2 fy)."""
    aspect: float
    """Width over height."""
    wxyz: np.ndarray
    """[4] camera -> world rotation."""
    position: np.ndarray
    """[3] camera centre in the world, metres."""


def camera_views(K: np.ndarray, pose_world_to_cam: np.ndarray, image_hw: tuple[int, int]) -> list[CameraView]:
    """Frusta of a scene's views from ``views/K`` [V, 3, 3] and ``views/pose`` [V, 4, 4]
    (world -> camera, OpenCV) and the image size (H, W)."""
    h, w = image_hw
    out = []
    for v in range(np.asarray(K).shape[0]):
        rot, t = np.asarray(pose_world_to_cam[v][:3, :3], np.float64), np.asarray(pose_world_to_cam[v][:3, 3], np.float64)
        fy = float(K[v][1, 1])
        out.append(CameraView(
            index=v, fov_y_rad=float(2 * np.arctan2(h / 2.0, fy)), aspect=float(w) / float(h),
            wxyz=rotation_to_wxyz(rot.T), position=-rot.T @ t,
        ))
    return out


def frame_camera(xyz: np.ndarray, *, fov_y_rad: float = 1.3, aspect: float = 1.5,
                 direction: Sequence[float] = (-0.55, -1.0, 0.75), margin: float = 1.05) -> tuple[np.ndarray, np.ndarray]:
    """A camera that frames a scene: ``(position, look_at)`` on ``direction`` from the centre of its
    bounding box, at the distance where the box's bounding sphere fits the narrower field of view
    (times ``margin``), so the scene fills the page when it opens (z up)."""
    lo, hi = xyz.min(axis=0).astype(np.float64), xyz.max(axis=0).astype(np.float64)
    centre = (lo + hi) / 2.0
    radius = max(float(np.linalg.norm(hi - lo)) / 2.0, 1e-3)
    fov = min(fov_y_rad, 2.0 * np.arctan(np.tan(fov_y_rad / 2.0) * aspect))
    distance = margin * radius / np.sin(fov / 2.0)
    unit = np.asarray(direction, np.float64)
    unit = unit / np.linalg.norm(unit)
    return centre + distance * unit, centre


def rank_segments(
    similarity: np.ndarray, segment: np.ndarray, xyz: np.ndarray, *, top_k: int = 5, min_segment_points: int = 10
) -> list[Any]:
    """The best segments for a query, ranked exactly as ``ws3d query`` ranks them
    (:func:`ws3d_train.infer.predict.query_scene`): mean similarity of a segment's points, segments
    under ``min_segment_points`` left out. Returns :class:`ws3d_train.infer.predict.SegmentMatch` rows."""
    from ws3d_train.infer.predict import rank_segments_by_similarity

    return rank_segments_by_similarity(segment, similarity, xyz, top_k=top_k, min_segment_points=min_segment_points)


def mesh_glb(vertices: np.ndarray, faces: np.ndarray, colours: np.ndarray) -> bytes:
    """A binary glTF 2.0 (GLB) of one triangle mesh with per-vertex colours.

    Args:
        vertices: [V, 3] positions, metres.
        faces: [F, 3] vertex ids.
        colours: [V, 3] uint8 sRGB colours (stored linear, as glTF's COLOR_0 requires, so that a
            viewer shows the same colours as the point cloud).

    Viser draws simple meshes in one colour only; a GLB carries vertex colours.
    """
    import json
    import struct

    pos = np.ascontiguousarray(vertices, np.float32).reshape(-1, 3)
    idx = np.ascontiguousarray(faces, np.uint32).reshape(-1)
    srgb = np.asarray(colours, np.float32).reshape(-1, 3) / 255.0
    linear = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4).astype(np.float32)
    blobs = [pos.tobytes(), linear.tobytes(), idx.tobytes()]  # each a multiple of 4 bytes
    offsets = np.cumsum([0] + [len(b) for b in blobs]).tolist()
    gltf = {
        "asset": {"version": "2.0", "generator": "ws3d view"},
        "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0}],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0, "COLOR_0": 1}, "indices": 2, "mode": 4, "material": 0}]}],
        "materials": [{"pbrMetallicRoughness": {"baseColorFactor": [1, 1, 1, 1], "metallicFactor": 0.0,
                                                "roughnessFactor": 1.0}, "doubleSided": False}],
        "buffers": [{"byteLength": offsets[-1]}],
        "bufferViews": [
            {"buffer": 0, "byteOffset": offsets[0], "byteLength": len(blobs[0]), "target": 34962},
            {"buffer": 0, "byteOffset": offsets[1], "byteLength": len(blobs[1]), "target": 34962},
            {"buffer": 0, "byteOffset": offsets[2], "byteLength": len(blobs[2]), "target": 34963},
        ],
        "accessors": [
            {"bufferView": 0, "componentType": 5126, "count": int(pos.shape[0]), "type": "VEC3",
             "min": pos.min(axis=0).tolist() if pos.size else [0, 0, 0],
             "max": pos.max(axis=0).tolist() if pos.size else [0, 0, 0]},
            {"bufferView": 1, "componentType": 5126, "count": int(pos.shape[0]), "type": "VEC3"},
            {"bufferView": 2, "componentType": 5125, "count": int(idx.shape[0]), "type": "SCALAR"},
        ],
    }
    text = json.dumps(gltf, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)
    binary = b"".join(blobs)
    total = 12 + 8 + len(text) + 8 + len(binary)
    return (struct.pack("<III", 0x46546C67, 2, total) + struct.pack("<II", len(text), 0x4E4F534A) + text
            + struct.pack("<II", len(binary), 0x004E4942) + binary)


# ---------------------------------------------------------------------------------------------
# scene and run data


@dataclass(frozen=True, eq=False)
class SceneData:
    """What the store holds about one scene, for display."""

    scene_id: str
    xyz: np.ndarray
    """[N, 3] float32 metres, store frame (z up)."""
    rgb: np.ndarray
    """[N, 3] uint8."""
    class_names: tuple[str, ...]
    semantic: np.ndarray | None = None
    """[N] ground-truth class id (IGNORE_INDEX unlabelled); None when the store has none."""
    instance: np.ndarray | None = None
    """[N] ground-truth instance id, -1 none."""
    segment: np.ndarray | None = None
    """[N] over-segment id (None before ``ws3d overseg``)."""
    boundary: np.ndarray | None = None
    """[N] 1 on segment boundaries."""
    faces: np.ndarray | None = None
    """[F, 3] triangles over the points (mesh scans)."""
    cameras: list[CameraView] = field(default_factory=list)
    """The rendered views (empty before ``ws3d render``)."""

    @property
    def num_points(self) -> int:
        return int(self.xyz.shape[0])


class ScanFiles:
    """Scans read from files (one file, or every scan of a folder), shown without a store
    (`ws3d view --input`): read with the reader of `ws3d ingest --dataset files`."""

    def __init__(self, path: str | Path, reader: Any = None):
        from pipeline.datasets.files import FilesReaderConfig, scan_files, scene_id_of

        self.path = Path(path)
        if self.path.is_dir():
            self.files = scan_files(self.path)
        elif self.path.is_file():
            self.files = {scene_id_of(self.path.name): self.path}
        else:
            raise ViewerError(f"{self.path}: no such file or folder")
        self.reader = reader or FilesReaderConfig()
        self._cache: dict[str, SceneData] = {}

    def scene_ids(self) -> list[str]:
        return list(self.files)

    def has_scene(self, scene_id: str) -> bool:
        return scene_id in self.files

    def load_scene(self, scene_id: str) -> SceneData:
        """A scan's display arrays (labels mapped to the reader's class list when it has labels)."""
        if scene_id in self._cache:
            return self._cache[scene_id]
        from pipeline.datasets.files import class_names_of, label_lookup, load_scan, map_labels

        check_scene(self, scene_id)
        scan = load_scan(self.files[scene_id], self.reader)
        names = class_names_of(self.reader)
        semantic = None
        if scan.label is not None:
            semantic = map_labels(scan.label, label_lookup(self.reader), len(names), tuple(self.reader.ignore_labels))[0]
        data = SceneData(scene_id=scene_id, xyz=scan.xyz, rgb=scan.rgb, class_names=names, semantic=semantic,
                         instance=scan.instance, faces=scan.faces)
        self._cache = {scene_id: data}  # one scan at a time in memory
        return data


def check_scene(store: Store | ScanFiles, scene_id: str) -> str:
    """``scene_id`` if the store has it, else ViewerError naming the store and a few of its scenes."""
    if not store.has_scene(scene_id):
        listed = store.scene_ids()
        raise ViewerError(f"{store.path}: no scene {scene_id!r} (it has {len(listed)}: "
                          f"{', '.join(listed[:4])}{' ...' if len(listed) > 4 else ''})")
    return scene_id


def load_scene(store: Store | ScanFiles, scene_id: str) -> SceneData:
    """Read a scene's display arrays; stages not run yet leave their fields None/empty.

    Raises:
        ViewerError naming the store and scene when the scene is not there.
    """
    if isinstance(store, ScanFiles):
        return store.load_scene(scene_id)
    check_scene(store, scene_id)

    def optional(spec: schema.ArraySpec) -> np.ndarray | None:
        return store.read(scene_id, spec) if store.has(scene_id, spec) else None

    cameras: list[CameraView] = []
    if store.has(scene_id, schema.VIEW_K) and store.has(scene_id, schema.VIEW_POSE):
        hw = store.shape(scene_id, schema.VIEW_RGB)[1:3] if store.has(scene_id, schema.VIEW_RGB) else None
        K = store.read(scene_id, schema.VIEW_K)
        if hw is None:  # no images: take the size the principal point implies
            hw = (int(round(2 * K[0, 1, 2])), int(round(2 * K[0, 0, 2])))
        cameras = camera_views(K, store.read(scene_id, schema.VIEW_POSE), tuple(hw))
    return SceneData(
        scene_id=scene_id,
        xyz=store.read(scene_id, schema.XYZ).astype(np.float32),
        rgb=store.read(scene_id, schema.RGB).astype(np.uint8),
        class_names=tuple(store.class_names),
        semantic=optional(schema.SEMANTIC),
        instance=optional(schema.INSTANCE),
        segment=optional(schema.SEGMENT),
        boundary=optional(schema.BOUNDARY),
        faces=optional(schema.FACES),
        cameras=cameras,
    )


def view_image(store: Store | ScanFiles, scene_id: str, index: int) -> np.ndarray | None:
    """[H, W, 3] uint8 rendered image of one view (None before ``ws3d render``, or for files)."""
    if isinstance(store, ScanFiles) or not store.has(scene_id, schema.VIEW_RGB):
        return None
    return np.asarray(store.read_rows(scene_id, schema.VIEW_RGB, int(index)), np.uint8)


@dataclass(frozen=True, eq=False)
class RunScene:
    """A run's predictions on one scene."""

    pred_class: np.ndarray
    """[N] int64 predicted class."""
    instance: np.ndarray
    """[N] int64 predicted instance (-1 none)."""
    clip: np.ndarray
    """[N, D] float32 unit CLIP-space feature per point."""
    base_ids: tuple[int, ...]
    novel_ids: tuple[int, ...]
    segment: np.ndarray | None = None
    """[N] over-segments computed for the instances (scans without a store), else None."""
    boundary: np.ndarray | None = None
    """[N] float32 predicted semantic-boundary probability (``ws3d predict``'s ``boundary``)."""


class RunModel:
    """A loaded run (through :mod:`ws3d_train.run`, the one reader of run folders) and the text
    encoder of the CLIP model its vocabulary was embedded with, loaded once and reused. On scans
    from files (:class:`ScanFiles`) it predicts through :class:`ws3d_train.infer.model.Model`."""

    def __init__(self, run: str | Path, store: Store | ScanFiles, *, device: str = "auto", model_dir: str | None = None):
        from ws3d_train.run import load_run, resolve_classes

        self.store = store
        self.model_dir = model_dir
        self._encoder: Any = None
        self.model: Any = None
        if isinstance(store, ScanFiles):
            from ws3d_train.infer.model import Model

            self.model = Model.load(run, device=device)
            self.loaded, self.setup = self.model.run, self.model.classes
            return
        self.loaded = load_run(run, device=device)
        self.setup = resolve_classes(self.loaded, store)

    def predict(self, scene_id: str, *, min_instance_points: int = 20) -> RunScene:
        """Classes, instances and CLIP features of every point (:func:`ws3d_train.infer.predict.predict_scene`)."""
        from ws3d_train.infer.predict import predict_scene

        if self.model is not None:
            scene = load_scene(self.store, scene_id)
            out = self.model.predict(scene.xyz, scene.rgb, scene.faces, min_instance_points=min_instance_points)
            return RunScene(out.labels, out.instance, out.clip, self.setup.base_ids, self.setup.novel_ids,
                            segment=out.segment)

        # a pre-training run's semantic head is untrained: its classes come from the CLIP head alone
        combine = "clip" if self.loaded.base_ids is None else "calibrated"
        pred = predict_scene(self.loaded, self.store.path, scene_id, combine=combine,
                             min_instance_points=min_instance_points)
        return RunScene(pred.pred_class, pred.instance, pred.clip, self.setup.base_ids, self.setup.novel_ids,
                        boundary=pred.boundary)

    def encode_text(self, text: str) -> np.ndarray:
        """[D] unit text embedding of ``text`` by the text tower of the CLIP model that embedded
        the run's vocabulary (recorded in the run folder; for older runs, in the store's
        ``classes`` vocabulary), chosen and used as ``ws3d query`` does without prompts; loaded
        offline, once."""
        if self.model is not None and self.model_dir is None:
            return self.model.encode_text(text)
        if self._encoder is None:
            from pipeline.clip.model import load_encoder
            from ws3d_train.infer.predict import clip_model_of_store
            from ws3d_train.run import model_source

            labels = self.loaded.labels
            recorded = model_source(labels.text_model) if labels is not None and labels.text_model else ""
            model = self.model_dir or recorded or clip_model_of_store(self.store)
            self.model_name = model
            self._encoder = load_encoder(model, device=str(self.loaded.device), allow_download=False)
        query = self._encoder.encode_texts([text]).mean(axis=0)
        return (query / max(float(np.linalg.norm(query)), 1e-12)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# the page's state


class ViewerState:
    """What the page shows: the scene, the colour mode, the query, and the arrays drawn.

    ``points``/``colours`` are the drawn arrays (a subset when the scene has more than
    ``point_budget`` points: ``display_index`` says which); ``legend`` and ``notice`` are the texts
    beside them. Every setter recomputes them; the server layer just copies them to viser.
    """

    def __init__(
        self,
        store: Store | str | Path,
        scene_id: str | None = None,
        *,
        run: RunModel | str | Path | None = None,
        point_budget: int = DEFAULT_POINT_BUDGET,
        device: str = "auto",
        top_k: int = 5,
    ):
        self.store = store if isinstance(store, (Store, ScanFiles)) else Store.open(store)
        self.scene_ids = self.store.scene_ids()
        if not self.scene_ids:
            raise ViewerError(f"{self.store.path}: the store has no scenes; run `ws3d ingest` first")
        if run is not None and not isinstance(run, RunModel):
            run = RunModel(run, self.store, device=device)
        self.run: RunModel | None = run
        self.point_budget = int(point_budget)
        self.top_k = top_k
        self.mode = "rgb"
        self.threshold: float | None = None
        self.query_text: str | None = None
        self.similarity: np.ndarray | None = None
        self.matches: list[Any] = []
        self.set_scene(scene_id or self.scene_ids[0])

    # -- what can be shown -------------------------------------------------------------------
    def available_modes(self) -> list[str]:
        s, modes = self.scene, ["rgb"]
        if s.semantic is not None:
            modes.append("gt class")
        if s.instance is not None:
            modes.append("gt instance")
        if s.segment is not None:
            modes.append("segments")
        if s.boundary is not None:
            modes.append("boundaries")
        if self.prediction is not None:
            modes += ["predicted class", "predicted instance"]
            if self.prediction.boundary is not None:
                modes.append("predicted boundaries")
            if self.prediction.novel_ids:
                modes.append("base/novel")
        if self.similarity is not None:
            modes.append("query")
        return modes

    # -- setters -----------------------------------------------------------------------------
    def set_scene(self, scene_id: str) -> None:
        """Load a scene (and the run's predictions on it); keeps the mode when it still applies.
        On an error (UserError: no such scene, no over-segments for the run's instances) the
        state stays on the previous scene."""
        scene = load_scene(self.store, scene_id)
        prediction = self.run.predict(scene_id) if self.run is not None else None
        if scene.segment is None and prediction is not None and prediction.segment is not None:
            scene = replace(scene, segment=prediction.segment)  # computed on the fly for a scan from a file
        self.scene, self.prediction = scene, prediction
        self.similarity, self.query_text, self.matches, self.threshold = None, None, [], None
        self.display_index = subsample_indices(self.scene.num_points, self.point_budget)
        xyz = self.scene.xyz
        self.points = xyz if self.display_index is None else xyz[self.display_index]
        if self.mode not in self.available_modes():
            self.mode = "rgb"
        self._recolour()

    def set_mode(self, mode: str) -> None:
        if mode not in self.available_modes():
            raise ViewerError(f"colour mode {mode!r} is not available here; one of {self.available_modes()}")
        self.mode = mode
        self._recolour()

    def query(self, text: str) -> list[Any]:
        """Similarity of every point to ``text`` (cosine of the run's CLIP-space head and the text
        embedding); switches to the ``query`` mode; returns the best segments."""
        if self.run is None or self.prediction is None:
            raise ViewerError("queries need a run: start the viewer with --run")
        if not text.strip():
            raise ViewerError("empty query")
        q = self.run.encode_text(text)
        if q.shape[0] != self.prediction.clip.shape[1]:
            raise ViewerError(f"text embeddings are {q.shape[0]}-d, the run's CLIP head {self.prediction.clip.shape[1]}-d")
        self.similarity = (self.prediction.clip @ q).astype(np.float32)
        self.query_text = text
        self.matches = (
            rank_segments(self.similarity, self.scene.segment, self.scene.xyz, top_k=self.top_k)
            if self.scene.segment is not None else []
        )
        self.mode = "query"
        self._recolour()
        return self.matches

    def set_threshold(self, threshold: float | None) -> None:
        """Grey out points whose query similarity is below ``threshold`` (None: show all)."""
        self.threshold = threshold
        self._recolour()

    # -- derived -----------------------------------------------------------------------------
    def similarity_range(self) -> tuple[float, float]:
        if self.similarity is None or not self.similarity.size:
            return (-1.0, 1.0)
        return float(self.similarity.min()), float(self.similarity.max())

    @property
    def notice(self) -> str:
        """A line for the page: the scene size and whether it is subsampled."""
        n = self.scene.num_points
        if self.display_index is None:
            return f"{self.scene.scene_id}: {n:,} points"
        return (f"{self.scene.scene_id}: showing {len(self.display_index):,} of {n:,} points "
                f"(random subset; point budget {self.point_budget:,})")

    def _recolour(self) -> None:
        colours, legend = self.full_colours(self.mode)
        self.colours_full = colours
        self.colours = colours if self.display_index is None else colours[self.display_index]
        self.legend = legend

    def full_colours(self, mode: str) -> tuple[np.ndarray, list[LegendEntry]]:
        """[N, 3] uint8 colours of every point in ``mode`` and its legend."""
        s, p = self.scene, self.prediction
        names = s.class_names
        if mode == "rgb":
            return s.rgb, []
        if mode == "gt class":
            return class_colours(s.semantic, len(names)), class_legend(s.semantic, names)
        if mode == "gt instance":
            return id_colours(s.instance), _count_legend(s.instance, "instances")
        if mode == "segments":
            return id_colours(s.segment), _count_legend(s.segment, "segments")
        if mode == "boundaries":
            count = int((np.asarray(s.boundary) == 1).sum())
            return boundary_colours(s.boundary), [
                LegendEntry("boundary", tuple(int(v) for v in BOUNDARY_RGB), count),
                LegendEntry("interior", tuple(int(v) for v in INTERIOR_RGB), s.num_points - count),
            ]
        if mode == "predicted class":
            return class_colours(p.pred_class, len(names)), class_legend(p.pred_class, names)
        if mode == "predicted instance":
            return id_colours(p.instance), _count_legend(p.instance, "instances")
        if mode == "predicted boundaries":
            high = int((p.boundary >= 0.5).sum())
            return boundary_probability_colours(p.boundary), [
                LegendEntry("semantic boundary (p = 1)", tuple(int(v) for v in BOUNDARY_RGB), high),
                LegendEntry("no boundary (p = 0); count: p < 0.5", tuple(int(v) for v in INTERIOR_RGB), s.num_points - high),
            ]
        if mode == "base/novel":
            base = int(np.isin(p.pred_class, p.base_ids).sum())
            novel = int(np.isin(p.pred_class, p.novel_ids).sum())
            novel_names = ", ".join(names[c] for c in p.novel_ids)
            return base_novel_colours(p.pred_class, p.base_ids, p.novel_ids), [
                LegendEntry("base (supervised in 3D)", tuple(int(v) for v in BASE_RGB), base),
                LegendEntry(f"novel ({novel_names})", tuple(int(v) for v in NOVEL_RGB), novel),
            ]
        if mode == "query":
            lo, hi = self.similarity_range()
            rows = [LegendEntry(f"high: cosine {hi:.3f}", (122, 4, 3), None),
                    LegendEntry(f"low: cosine {lo:.3f}", (48, 18, 59), None)]
            if self.threshold is not None:
                below = int((self.similarity < self.threshold).sum())
                rows.append(LegendEntry(f"below {self.threshold:.3f} (greyed)", tuple(int(v) for v in BELOW_THRESHOLD_RGB), below))
            return heatmap_colours(self.similarity, self.threshold), rows
        raise ValueError(f"unknown colour mode {mode!r}; one of {MODES}")


def _count_legend(ids: np.ndarray, what: str) -> list[LegendEntry]:
    ids = np.asarray(ids)
    n = int(np.unique(ids[ids >= 0]).size)
    none = int((ids < 0).sum())
    rows = [LegendEntry(f"{n} {what} (one colour each)", (200, 160, 60), int((ids >= 0).sum()))]
    if none:
        rows.append(LegendEntry("none", tuple(int(v) for v in UNKNOWN_RGB), none))
    return rows
