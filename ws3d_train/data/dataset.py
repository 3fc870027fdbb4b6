"""The trainer's data path: scenes of a store -> augmented, voxelised, cropped per-scene samples.

Reads (through `pipeline.store.Store.read_many`, never by path; a store in a folder or at a URL)
only what the losses need:
``points/`` xyz, rgb, semantic, instance; ``overseg/`` segment, boundary, semantic_boundary;
``views/`` visible_ptr, visible_ids (the CSR of point ids per view; never the images);
``clip/`` view, segment, segment_seen. Writes nothing.

Per scene (:func:`make_sample`, a pure function of the arrays and a random generator):

1. augment (train only): rotation about z (up), random flips of x and y, isotropic scaling,
   point jitter, colour shift and noise;
2. voxelise on a grid of ``voxel_size_m``: one representative point per voxel gives the network
   input (random on train, the first point otherwise), ``point_to_voxel`` [N] maps every point
   to its voxel so that per-voxel outputs come back to points; voxel labels are the majority of
   the voxel's labelled points, boundaries the "any" of its points;
3. crop to at most ``max_voxels``: the voxels nearest (in the xy max-norm, i.e. a full-height
   box) to a random centre voxel; points of dropped voxels get ``point_to_voxel = -1``;
4. remap consistently: views keep the *voxels* of their visible points (unique, cropped ones
   gone; views left with fewer than ``min_view_voxels`` are dropped), segments are renumbered
   0..S'-1 over those present in the kept voxels with their CLIP targets sliced to match.

Determinism: a sample is a function of ``(seed, epoch, scene index)`` only (its generator is
``np.random.default_rng([seed, epoch, index])``), whatever worker loads it; the batch order is a
function of ``(seed, epoch)`` (:class:`ResumableBatchSampler`), and a resumed run skips the
batches it already consumed. This is what makes ``--resume`` exact.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline import schema
from pipeline.errors import UserError
from pipeline.schema import IGNORE_INDEX
from pipeline.store import DamagedDataError, Store
from ws3d_train.data.batch import SceneSample, collate

__all__ = [
    "DataConfig",
    "DataError",
    "ResumableBatchSampler",
    "SceneArrays",
    "SceneDataset",
    "SceneSample",
    "crop_box_xy",
    "default_voxel_size",
    "drop_unlabelled",
    "is_unlabelled",
    "make_loader",
    "make_sample",
    "read_scene_list",
    "remap_view_csr",
    "voxel_any",
    "voxel_majority",
    "voxelise",
    "worker_init_fn",
]

INDOOR_VOXEL_M = 0.02
"""Default voxel edge for indoor scans (meshes, coloured point clouds)."""
OUTDOOR_VOXEL_M = 0.05
"""Default voxel edge for outdoor LiDAR scans."""

GROUP_STAGE: dict[str, str] = {g: stage for stage, groups in schema.STAGE_GROUPS.items() for g in groups}
"""Which stage writes each group (for "run `ws3d <stage>` first" errors)."""

POINT_ARRAYS = (schema.XYZ, schema.RGB, schema.SEMANTIC, schema.INSTANCE)
GROUP_ARRAYS: dict[str, tuple[schema.ArraySpec, ...]] = {
    "overseg": (schema.SEGMENT, schema.BOUNDARY, schema.SEMANTIC_BOUNDARY),
    "views": (schema.VISIBLE_PTR, schema.VISIBLE_IDS),
    "clip": (schema.CLIP_VIEW, schema.CLIP_SEGMENT, schema.CLIP_SEGMENT_SEEN),
}
"""The only arrays the trainer reads, per optional group (points are always read)."""

SEMANTIC_BOUNDARY_UNKNOWN = 255
"""`overseg/semantic_boundary` value for "no labels around this point"."""


class DataError(UserError, ValueError):
    """A scene or store that cannot feed the trainer (missing stage, inconsistent arrays)."""


@dataclass(frozen=True)
class DataConfig:
    """How scenes become network inputs (shared by pre-training, fine-tuning and evaluation)."""

    voxel_size_m: float | None = None
    """Voxel edge in metres; None: 0.02 for indoor stores, 0.05 for outdoor LiDAR stores."""
    max_voxels: int | None = 100_000
    """Crop a scene to at most this many voxels (a full-height box around a random centre on
    train, around the scene centre otherwise); None keeps whole scenes."""
    groups: tuple[str, ...] = ("overseg", "views", "clip")
    """Store groups the stage needs besides ``points`` (any of "overseg", "views", "clip"); a
    scene without one of them is an error naming the stage to run."""
    augment: bool = True
    """Augment training samples (never other splits)."""
    rotate_z: bool = True
    """Random rotation about the up axis."""
    flip_xy: bool = True
    """Random flips of x and y, each with probability 1/2."""
    scale_range: tuple[float, float] = (0.9, 1.1)
    """Uniform isotropic scaling range."""
    jitter_std_m: float = 0.005
    """Std of per-point Gaussian jitter in metres (clipped at 2 std); 0 disables."""
    colour_shift_std: float = 0.05
    """Std of a per-scene, per-channel colour offset (features are rgb/255 - 0.5)."""
    colour_noise_std: float = 0.01
    """Std of per-point colour noise."""
    use_height: bool = True
    """Append the height above the scene's lowest point, divided by ``height_scale_m``."""
    height_scale_m: float = 3.0
    """Height normalisation (about a storey)."""
    min_view_voxels: int = 8
    """Views that show fewer voxels after cropping are dropped (their mean would be noise)."""

    @property
    def in_channels(self) -> int:
        """Width of the voxel features: rgb (3) plus height when used."""
        return 3 + int(self.use_height)

    def __post_init__(self) -> None:
        unknown = set(self.groups) - set(GROUP_ARRAYS)
        if unknown:
            raise ValueError(f"DataConfig.groups: unknown {sorted(unknown)}; known {sorted(GROUP_ARRAYS)}")
        if "clip" in self.groups and not {"overseg", "views"} <= set(self.groups):
            raise ValueError("DataConfig.groups: 'clip' targets need 'overseg' and 'views' too")
        if self.max_voxels is not None and self.max_voxels < 1:
            raise ValueError(f"DataConfig.max_voxels must be >= 1 or None, got {self.max_voxels}")


@dataclass
class SceneArrays:
    """The raw arrays of one scene as read from the store (absent groups are None)."""

    xyz: np.ndarray
    """[N, 3] float32 metres."""
    rgb: np.ndarray
    """[N, 3] uint8."""
    semantic: np.ndarray
    """[N] int, IGNORE_INDEX where unlabelled."""
    instance: np.ndarray
    """[N] int, -1 where none."""
    segment: np.ndarray | None = None
    """[N] int32 over-segment id in 0..S-1."""
    boundary: np.ndarray | None = None
    """[N] uint8 geometric boundary."""
    semantic_boundary: np.ndarray | None = None
    """[N] uint8 0/1, 255 unknown."""
    visible_ptr: np.ndarray | None = None
    """[V+1] int64 CSR offsets."""
    visible_ids: np.ndarray | None = None
    """[M] int32 point ids per view."""
    clip_view: np.ndarray | None = None
    """[V, D] view embeddings."""
    clip_segment: np.ndarray | None = None
    """[S, D] segment embeddings."""
    clip_segment_seen: np.ndarray | None = None
    """[S] uint8."""


# ---------------------------------------------------------------------------------------------
# pure kernels (vectorised numpy)


def _unique_sorted(values: np.ndarray) -> np.ndarray:
    """Sorted unique values of a 1-D integer array.

    A sort and a neighbour comparison: NumPy >= 2.3's ``np.unique`` takes a hash-table path for
    plain calls that is several times slower on the ~10^5-10^6 int64 keys seen here.
    """
    out = np.sort(values, kind="stable")
    if out.shape[0] == 0:
        return out
    keep = np.empty(out.shape[0], bool)
    keep[0] = True
    np.not_equal(out[1:], out[:-1], out=keep[1:])
    return out[keep]


def voxelise(
    xyz: np.ndarray, voxel_size: float, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Quantise points to a grid, one representative point per occupied voxel.

    Args:
        xyz: [N, 3] float positions in metres.
        voxel_size: grid edge in metres.
        rng: picks a random representative per voxel when given, else the lowest point index.

    Returns:
        ``(coords [Nv,3] int32 >= 0, origin [3] int64, rep [Nv] int64, point_to_voxel [N] int64)``
        with voxels sorted by (x, y, z), ``coords = floor(xyz / voxel_size)[rep] - origin`` and
        ``point_to_voxel[rep] == arange(Nv)``.
    """
    if xyz.shape[0] == 0:
        raise DataError("voxelise: empty point cloud")
    if rng is None:  # inference and evaluation: one pass through a table (numba), then sort the voxels
        return _voxelise_first(xyz, voxel_size)
    q = np.floor(xyz / voxel_size).astype(np.int64)
    origin = q.min(axis=0)
    q -= origin
    extent = q.max(axis=0) + 1
    key = (q[:, 0] * extent[1] + q[:, 1]) * extent[2] + q[:, 2]
    if rng is None:
        _, rep, inverse = np.unique(key, return_index=True, return_inverse=True)
        point_to_voxel = inverse.reshape(-1).astype(np.int64)
    else:
        order = rng.permutation(key.shape[0])
        _, first, inverse = np.unique(key[order], return_index=True, return_inverse=True)
        rep = order[first]
        point_to_voxel = np.empty(key.shape[0], np.int64)
        point_to_voxel[order] = inverse.reshape(-1)
    return q[rep].astype(np.int32), origin, rep.astype(np.int64), point_to_voxel


@numba.njit(cache=True)
def _extent(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Smallest and largest coordinate per axis (xyz's dtype) over the finite points, and how many
    points have a NaN or infinite coordinate. One read of the points, no division."""
    lx = ly = lz = np.inf
    hx = hy = hz = -np.inf
    bad = 0
    for i in range(xyz.shape[0]):
        x, y, z = xyz[i, 0], xyz[i, 1], xyz[i, 2]
        s = x + y + z  # NaN or infinite when a coordinate is
        if not s - s == 0:
            bad += 1
            continue
        lx, hx = min(lx, x), max(hx, x)
        ly, hy = min(ly, y), max(hy, y)
        lz, hz = min(lz, z), max(hz, z)
    lo = np.empty(3, xyz.dtype)
    hi = np.empty(3, xyz.dtype)
    lo[0], lo[1], lo[2] = lx, ly, lz
    hi[0], hi[1], hi[2] = hx, hy, hz
    return lo, hi, bad


def _grid_bounds(xyz: np.ndarray, voxel_size: Any) -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest floor(xyz / voxel_size) per axis (int64 [3] each). ``voxel_size`` is
    a scalar of xyz's dtype, so that the division rounds as NumPy's does; floor(min / s) is
    min(floor(x / s)) since a rounded division is monotone, so the points are read once without
    dividing (2.5x faster at 10^6 points than dividing every coordinate).

    Raises:
        DataError when a point has a NaN or infinite coordinate.
    """
    lo, hi, bad = _extent(xyz)
    if bad:
        raise DataError(f"voxelise: {bad} points with NaN or infinite coordinates")
    return np.floor(lo / voxel_size).astype(np.int64), np.floor(hi / voxel_size).astype(np.int64)


DENSE_VOXEL_TABLE_CELLS = (1 << 21, 4, 1 << 25)
"""When :func:`voxelise` without ``rng`` looks voxels up in a dense table of the grid's cells
(one int32 per cell between the scan's lowest and highest voxel) rather than a hash table:
at most ``a + b * N`` cells and never more than ``c`` (128 MiB). Filling a cell costs ~1/5 of
what hashing a point costs over a direct lookup, so the table pays up to ~4 cells a point; a room
at 2-8 cm has 10^4-10^6 cells, a LiDAR sweep's grid is far larger (hash table)."""


def _dense_table_fits(cells: int, n_points: int) -> bool:
    first, per_point, cap = DENSE_VOXEL_TABLE_CELLS
    return 0 < cells <= min(cap, first + per_point * n_points)


@numba.njit(cache=True)
def _point_key(xyz: np.ndarray, i: int, voxel_size: Any, lo: np.ndarray, ey: int, ez: int) -> int:
    """The grid key of point ``i``: x-major, then y, then z, over the grid from ``lo``."""
    qx = np.int64(np.floor(xyz[i, 0] / voxel_size)) - lo[0]
    qy = np.int64(np.floor(xyz[i, 1] / voxel_size)) - lo[1]
    qz = np.int64(np.floor(xyz[i, 2] / voxel_size)) - lo[2]
    return (qx * ey + qy) * ez + qz


@numba.njit(cache=True)
def _first_point_per_cell(xyz: np.ndarray, voxel_size: Any, lo: np.ndarray, hi: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_first_point_per_voxel` through a dense table of the grid's cells (see
    :data:`DENSE_VOXEL_TABLE_CELLS`): the same keys, first points and indices, one lookup a point."""
    n = xyz.shape[0]
    ey, ez = hi[1] - lo[1] + 1, hi[2] - lo[2] + 1
    cell = np.full((hi[0] - lo[0] + 1) * ey * ez, -1, np.int32)
    uniq = np.empty(n, np.int64)  # at most n voxels; untouched pages cost nothing
    first = np.empty(n, np.int64)
    inverse = np.empty(n, np.int64)
    count = 0
    for i in range(n):
        k = _point_key(xyz, i, voxel_size, lo, ey, ez)
        v = np.int64(cell[k])
        if v < 0:
            v = count
            cell[k] = count
            uniq[count] = k
            first[count] = i
            count += 1
        inverse[i] = v
    return uniq[:count].copy(), first[:count].copy(), inverse


@numba.njit(cache=True)
def _first_point_per_voxel(xyz: np.ndarray, voxel_size: Any, lo: np.ndarray, hi: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each point's voxel key (x-major, then y, then z, over the grid from ``lo``), found in an
    open-addressing hash table that grows with the voxels (not the points: a dense scan's voxels
    stay in cache). Returns the distinct keys in order of first appearance, the first point of
    each, and each point's distinct-key index."""
    n = xyz.shape[0]
    ey, ez = hi[1] - lo[1] + 1, hi[2] - lo[2] + 1
    cap = 1024
    slot_key = np.full(cap, -1, np.int64)
    slot_id = np.empty(cap, np.int64)
    # sized for every point (pages never written cost nothing): arrays regrown inside the loop
    # made it 2x slower
    uniq = np.empty(n, np.int64)
    first = np.empty(n, np.int64)
    inverse = np.empty(n, np.int64)
    count = 0
    for i in range(n):
        k = _point_key(xyz, i, voxel_size, lo, ey, ez)
        mask = cap - 1
        h = (k * np.int64(-7046029254386353131)) & mask  # multiplicative (Fibonacci) hashing
        h = (h ^ (h >> 17)) & mask
        while slot_key[h] != -1 and slot_key[h] != k:
            h = (h + 1) & mask
        if slot_key[h] == k:
            inverse[i] = slot_id[h]
            continue
        slot_key[h] = k
        slot_id[h] = count
        uniq[count] = k
        first[count] = i
        inverse[i] = count
        count += 1
        if 2 * count > cap:  # keep the table at most half full: rehash into twice the slots
            cap *= 2
            mask = cap - 1
            slot_key = np.full(cap, -1, np.int64)
            slot_id = np.empty(cap, np.int64)
            for j in range(count):
                kk = uniq[j]
                hh = (kk * np.int64(-7046029254386353131)) & mask
                hh = (hh ^ (hh >> 17)) & mask
                while slot_key[hh] != -1:
                    hh = (hh + 1) & mask
                slot_key[hh] = kk
                slot_id[hh] = j
    return uniq[:count].copy(), first[:count].copy(), inverse


@numba.njit(cache=True)
def _renumber_in_place(index: np.ndarray, new_id: np.ndarray) -> None:
    """``index[i] = new_id[index[i]]`` without a second [N] array."""
    for i in range(index.shape[0]):
        index[i] = new_id[index[i]]


def _voxelise_first(xyz: np.ndarray, voxel_size: float, *, dense: bool | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`voxelise` without ``rng``: the same result (lowest point index per voxel, voxels
    sorted by key) from a read of the points for the grid's bounds, one pass through a table of
    the voxels (a dense table of the grid's cells where it fits, :data:`DENSE_VOXEL_TABLE_CELLS`,
    else a hash table; ``dense`` forces one) and a sort over the voxels only (Nv << N). On the
    real scan at 8 cm, 1M points: ~2x the former hash-table-only path, which was 10x ``np.unique``
    (docs/benchmarks.md); where nearly every point is its own voxel the hash table is 0.7x
    ``np.unique``."""
    xyz = np.ascontiguousarray(xyz)
    if xyz.dtype not in (np.float32, np.float64):
        xyz = xyz.astype(np.float64)
    size = xyz.dtype.type(voxel_size)
    lo, hi = _grid_bounds(xyz, size)
    extent = [int(h) - int(l) + 1 for l, h in zip(lo, hi)]  # Python ints: no overflow
    if dense is None:
        dense = _dense_table_fits(extent[0] * extent[1] * extent[2], xyz.shape[0])
    kernel = _first_point_per_cell if dense else _first_point_per_voxel
    uniq, first, inverse = kernel(xyz, size, lo, hi)
    order = np.argsort(uniq, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.shape[0])
    rep = first[order]
    coords = (np.floor(xyz[rep] / size).astype(np.int64) - lo).astype(np.int32)
    _renumber_in_place(inverse, rank)
    return coords, lo, rep.astype(np.int64), inverse


def voxel_majority(
    point_to_voxel: np.ndarray, labels: np.ndarray, num_voxels: int, *, ignore: int = IGNORE_INDEX
) -> np.ndarray:
    """Majority label per voxel over its labelled points (ties: the smallest label).

    Args:
        point_to_voxel: [N] int64 voxel per point, -1 for none.
        labels: [N] int labels, ``ignore`` where unknown.
        num_voxels: Nv.

    Returns:
        [Nv] int64, ``ignore`` for voxels without a labelled point.
    """
    out = np.full(num_voxels, ignore, np.int64)
    keep = (point_to_voxel >= 0) & (labels != ignore)
    if not keep.any():
        return out
    vox = point_to_voxel[keep]
    lab = labels[keep].astype(np.int64)
    low = lab.min()
    span = int(lab.max() - low) + 1
    pairs, counts = np.unique(vox * span + (lab - low), return_counts=True)
    pv, pl = pairs // span, pairs % span + low
    order = np.lexsort((pl, -counts, pv))  # per voxel: most votes first, then smallest label
    pv, pl = pv[order], pl[order]
    first = np.ones(pv.shape[0], bool)
    first[1:] = pv[1:] != pv[:-1]
    out[pv[first]] = pl[first]
    return out


def voxel_any(point_to_voxel: np.ndarray, flag: np.ndarray, num_voxels: int) -> np.ndarray:
    """[Nv] bool: any point of the voxel has ``flag`` set ([N] bool), ignoring p2v == -1."""
    keep = point_to_voxel >= 0
    hits = np.bincount(point_to_voxel[keep], weights=flag[keep].astype(np.float64), minlength=num_voxels)
    return hits > 0


def crop_box_xy(coords: np.ndarray, max_voxels: int, centre: np.ndarray) -> np.ndarray:
    """The ``max_voxels`` voxels nearest to ``centre`` in the xy max-norm (a full-height box).

    Args:
        coords: [Nv, 3] int voxel coordinates.
        max_voxels: how many to keep.
        centre: [3] (only x, y used).

    Returns:
        [K] int64 sorted indices of kept voxels, K = min(Nv, max_voxels). Ties at the box edge
        are broken by voxel order (a stable sort), so the crop is deterministic.
    """
    if coords.shape[0] <= max_voxels:
        return np.arange(coords.shape[0], dtype=np.int64)
    dist = np.abs(coords[:, :2].astype(np.int64) - np.asarray(centre[:2], np.int64)).max(axis=1)
    kept = np.argsort(dist, kind="stable")[:max_voxels]
    return np.sort(kept).astype(np.int64)


def remap_view_csr(
    visible_ptr: np.ndarray,
    visible_ids: np.ndarray,
    point_to_voxel: np.ndarray,
    num_voxels: int,
    *,
    min_voxels: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn the per-view CSR of visible points into a CSR of visible voxels.

    A view's voxels are the unique voxels of its visible points (points with
    ``point_to_voxel == -1`` are dropped); views with fewer than ``min_voxels`` voxels are
    dropped entirely.

    Args:
        visible_ptr: [V+1] int64 offsets into ``visible_ids``.
        visible_ids: [M] int point ids.
        point_to_voxel: [N] int64 voxel per point, -1 for cropped points.
        num_voxels: Nv.
        min_voxels: views with fewer voxels are left out.

    Returns:
        ``(ptr [V'+1] int64, voxel [M'] int64 sorted within each view, kept_views [V'] int64)``.
    """
    lengths = np.diff(visible_ptr.astype(np.int64))
    num_views = lengths.shape[0]
    view_of = np.repeat(np.arange(num_views, dtype=np.int64), lengths)
    vox = point_to_voxel[visible_ids.astype(np.int64)]
    seen = vox >= 0
    key = _unique_sorted(view_of[seen] * max(num_voxels, 1) + vox[seen])
    view, voxel = key // max(num_voxels, 1), key % max(num_voxels, 1)
    counts = np.bincount(view, minlength=num_views)
    keep_view = counts >= max(min_voxels, 1)
    keep_entry = keep_view[view]
    ptr = np.zeros(int(keep_view.sum()) + 1, np.int64)
    np.cumsum(counts[keep_view], out=ptr[1:])
    return ptr, voxel[keep_entry], np.flatnonzero(keep_view).astype(np.int64)


def _augment(
    xyz: np.ndarray, colour: np.ndarray, cfg: DataConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate about z, flip, scale, jitter positions; shift and noise colours (features units)."""
    # the generator is always advanced the same way, whatever is switched off, so that one
    # option does not change the random stream of the others
    angle = rng.uniform(0.0, 2.0 * math.pi)
    flips = rng.random(2) < 0.5
    scale = rng.uniform(*cfg.scale_range)
    jitter = rng.standard_normal(xyz.shape).astype(np.float32)
    shift = rng.standard_normal(3).astype(np.float32)
    noise = rng.standard_normal(colour.shape).astype(np.float32)

    centre = xyz.mean(axis=0)
    centre[2] = 0.0  # rotate and scale about the vertical axis through the centroid
    out = xyz - centre
    if cfg.rotate_z:
        c, s = math.cos(angle), math.sin(angle)
        rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], np.float32)
        out = out @ rot.T
    if cfg.flip_xy:
        out[:, :2] *= np.where(flips, -1.0, 1.0).astype(np.float32)
    out *= np.float32(scale)
    if cfg.jitter_std_m > 0:
        out += np.clip(jitter, -2.0, 2.0) * np.float32(cfg.jitter_std_m)
    colour = colour + shift * np.float32(cfg.colour_shift_std) + noise * np.float32(cfg.colour_noise_std)
    return (out + centre).astype(np.float32), np.clip(colour, -0.5, 0.5)


def make_sample(
    scene_id: str,
    arrays: SceneArrays,
    *,
    cfg: DataConfig,
    voxel_size: float,
    rng: np.random.Generator | None,
) -> SceneSample:
    """Augment (when ``rng`` is given and ``cfg.augment``), voxelise, crop and remap one scene.

    Pure: no I/O. ``rng`` None means evaluation: no augmentation, first point per voxel, crop
    (if needed) around the centre of the scene's xy bounding box.

    Raises:
        DataError naming the scene when the arrays disagree (ids out of range, sizes differ).
    """
    xyz = np.asarray(arrays.xyz, np.float32)
    n = xyz.shape[0]
    if n == 0:
        raise DataError(f"scene {scene_id}: no points")
    for name in ("rgb", "semantic", "instance", "segment", "boundary", "semantic_boundary"):
        value = getattr(arrays, name)
        if value is not None and value.shape[0] != n:
            raise DataError(f"scene {scene_id}: {name} has {value.shape[0]} rows, xyz has {n}")
    colour = arrays.rgb.astype(np.float32) / 255.0 - 0.5
    if rng is not None and cfg.augment:
        xyz, colour = _augment(xyz, colour, cfg, rng)

    coords, origin, rep, p2v = voxelise(xyz, voxel_size, rng)
    if cfg.max_voxels is not None and coords.shape[0] > cfg.max_voxels:
        if rng is not None:
            centre = coords[rng.integers(coords.shape[0])]
        else:
            centre = (coords.min(axis=0) + coords.max(axis=0)) // 2
        kept = crop_box_xy(coords, cfg.max_voxels, centre)
        new_id = np.full(coords.shape[0], -1, np.int64)
        new_id[kept] = np.arange(kept.shape[0])
        coords, rep, p2v = coords[kept], rep[kept], new_id[p2v]
        # re-anchor so that coordinates of the crop start at zero again
        shift = coords.min(axis=0).astype(np.int64)
        coords = (coords - shift).astype(np.int32)
        origin = origin + shift
    nv = coords.shape[0]

    feats = [colour[rep]]
    if cfg.use_height:
        height = (xyz[rep, 2] - xyz[:, 2].min()) / np.float32(cfg.height_scale_m)
        feats.append(height[:, None])
    feats = np.concatenate(feats, axis=1).astype(np.float32)

    semantic = arrays.semantic.astype(np.int64)
    instance = arrays.instance.astype(np.int64)
    sample = SceneSample(
        scene_id=scene_id,
        coords=coords,
        feats=feats,
        voxel_semantic=voxel_majority(p2v, semantic, nv),
        voxel_instance=instance[rep],
        voxel_segment=np.full(nv, -1, np.int64),
        voxel_boundary=np.zeros(nv, np.uint8),
        voxel_semantic_boundary=np.full(nv, -1, np.int64),
        segment_target=np.zeros((0, 0), np.float32),
        segment_seen=np.zeros(0, bool),
        segment_orig=np.zeros(0, np.int64),
        view_ptr=np.zeros(1, np.int64),
        view_voxel=np.zeros(0, np.int64),
        view_target=np.zeros((0, 0), np.float32),
        view_orig=np.zeros(0, np.int64),
        point_xyz=xyz,
        point_to_voxel=p2v,
        point_semantic=semantic,
        point_instance=instance,
        point_segment=np.full(n, -1, np.int64),
        voxel_origin=origin.astype(np.int64),
    )

    if arrays.segment is not None:
        _add_segments(scene_id, arrays, sample, rep)
    if arrays.visible_ptr is not None:
        _add_views(scene_id, arrays, sample, cfg)
    return sample


def _add_segments(scene_id: str, arrays: SceneArrays, sample: SceneSample, rep: np.ndarray) -> None:
    segment = arrays.segment.astype(np.int64)
    p2v = sample.point_to_voxel
    nv = sample.coords.shape[0]
    num_segments = int(segment.max()) + 1 if segment.size else 0
    if segment.size and segment.min() < 0:
        raise DataError(f"scene {scene_id}: overseg/segment has negative ids")
    if arrays.clip_segment is not None:
        if arrays.clip_segment.shape[0] < num_segments:
            raise DataError(
                f"scene {scene_id}: overseg/segment has ids up to {num_segments - 1} but clip/segment "
                f"has {arrays.clip_segment.shape[0]} rows; re-run `ws3d embed` after `ws3d overseg`"
            )
        num_segments = arrays.clip_segment.shape[0]
    voxel_segment_orig = segment[rep]
    present = _unique_sorted(voxel_segment_orig)
    lut = np.full(max(num_segments, 1), -1, np.int64)
    lut[present] = np.arange(present.shape[0])
    sample.voxel_segment = lut[voxel_segment_orig]
    sample.point_segment = lut[segment]
    sample.segment_orig = present
    if arrays.clip_segment is not None:
        sample.segment_target = arrays.clip_segment[present].astype(np.float32)
        sample.segment_seen = arrays.clip_segment_seen[present].astype(bool)
    else:
        sample.segment_target = np.zeros((present.shape[0], 0), np.float32)
        sample.segment_seen = np.zeros(present.shape[0], bool)
    sample.voxel_boundary = voxel_any(p2v, arrays.boundary > 0, nv).astype(np.uint8)
    sb = arrays.semantic_boundary
    known = sb != SEMANTIC_BOUNDARY_UNKNOWN
    p2v_known = np.where(known, p2v, -1)
    any_known = voxel_any(p2v_known, np.ones_like(known), nv)
    any_edge = voxel_any(p2v_known, sb == 1, nv)
    sample.voxel_semantic_boundary = np.where(any_known, any_edge.astype(np.int64), -1)


def _add_views(scene_id: str, arrays: SceneArrays, sample: SceneSample, cfg: DataConfig) -> None:
    ptr, ids = arrays.visible_ptr.astype(np.int64), arrays.visible_ids
    n = sample.point_to_voxel.shape[0]
    if ptr.ndim != 1 or ptr.shape[0] < 1 or ptr[0] != 0 or ptr[-1] != ids.shape[0] or np.any(np.diff(ptr) < 0):
        raise DataError(f"scene {scene_id}: views/visible_ptr is not a CSR over visible_ids ({ids.shape[0]} ids)")
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise DataError(f"scene {scene_id}: views/visible_ids has ids outside 0..{n - 1}")
    if arrays.clip_view is not None and arrays.clip_view.shape[0] != ptr.shape[0] - 1:
        raise DataError(
            f"scene {scene_id}: clip/view has {arrays.clip_view.shape[0]} rows for {ptr.shape[0] - 1} views; "
            "re-run `ws3d embed` after `ws3d render`"
        )
    sample.view_ptr, sample.view_voxel, sample.view_orig = remap_view_csr(
        ptr, ids, sample.point_to_voxel, sample.coords.shape[0], min_voxels=cfg.min_view_voxels
    )
    if arrays.clip_view is not None:
        sample.view_target = arrays.clip_view[sample.view_orig].astype(np.float32)
    else:
        sample.view_target = np.zeros((sample.view_orig.shape[0], 0), np.float32)


# ---------------------------------------------------------------------------------------------
# the store side


def default_voxel_size(store: Store, scene_ids: Sequence[str] = ()) -> float:
    """0.05 m for outdoor LiDAR stores (ingest kind "lidar" or a KITTI dataset), else 0.02 m."""
    if "kitti" in store.dataset.lower():
        return OUTDOOR_VOXEL_M
    ids = list(scene_ids) or store.scene_ids()[:1]
    for scene_id in ids[:1]:
        record = store.stage_record(scene_id, "ingest") or {}
        if (record.get("stats") or {}).get("kind") == "lidar":
            return OUTDOOR_VOXEL_M
    return INDOOR_VOXEL_M


def is_unlabelled(store: Store, scene_id: str) -> bool:
    """True for a scene ingested without labels (e.g. a ScanNet test scan): its ingest record's
    ``label_source`` is ``"none"``, or (older stores) none of its points has a label."""
    record = store.stage_record(scene_id, "ingest") or {}
    source = record.get("label_source") or (record.get("stats") or {}).get("label_source")
    if source is not None:
        return source == "none"
    stats = record.get("stats") or {}
    if "labelled_fraction" in stats:
        return float(stats["labelled_fraction"]) == 0.0
    return not bool((store.read(scene_id, schema.SEMANTIC) != IGNORE_INDEX).any())


def drop_unlabelled(store: Store, scene_ids: Sequence[str], *, purpose: str = "label losses") -> tuple[list[str], list[str]]:
    """``(labelled, unlabelled)`` scene ids, in order; warns naming the unlabelled ones.

    Raises:
        DataError when every scene is unlabelled.
    """
    import warnings

    labelled = [s for s in scene_ids if not is_unlabelled(store, s)]
    unlabelled = [s for s in scene_ids if s not in set(labelled)]
    if unlabelled and not labelled:
        raise DataError(f"{store.path}: all {len(unlabelled)} scene(s) are unlabelled (e.g. {unlabelled[0]}); "
                        f"{purpose} need labelled scenes")
    if unlabelled:
        warnings.warn(f"{store.path}: {len(unlabelled)} unlabelled scene(s) skipped for {purpose} "
                      f"(e.g. {unlabelled[:3]})", stacklevel=2)
    return labelled, unlabelled


def read_scene_list(path: str | Path) -> list[str]:
    """Scene ids from a text file, one per line (blank lines and ``#`` comments skipped)."""
    lines = Path(path).read_text().splitlines()
    ids = [line.split("#", 1)[0].strip() for line in lines]
    return [schema.check_scene_id(i) for i in ids if i]


class SceneDataset(Dataset):
    """Scenes of one store as :class:`SceneSample` items.

    Indexed by ``i`` (epoch 0) or by ``(epoch, i)`` keys from :class:`ResumableBatchSampler`;
    a training sample's randomness depends only on ``(seed, epoch, i)``.
    """

    def __init__(
        self,
        store_path: str | Path,
        scene_ids: Sequence[str] | None,
        *,
        cfg: DataConfig,
        split: str = "train",
        seed: int = 0,
    ):
        store = Store.open(store_path)
        self.store_path = str(store_path)
        self.scene_ids = list(scene_ids) if scene_ids is not None else store.scene_ids()
        if not self.scene_ids:
            raise DataError(f"{store_path}: no scenes to load (empty list or no ingested scene)")
        known = set(store.scene_ids())
        unknown = [s for s in self.scene_ids if s not in known]
        if unknown:
            raise DataError(f"{store_path}: scenes not in the store: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        for group in cfg.groups:
            missing = [s for s in self.scene_ids if not store.has_group(s, group)]
            if missing:
                stage = GROUP_STAGE[group]
                raise DataError(
                    f"{store_path}: {len(missing)} scene(s) have no {group}/ (e.g. {missing[:3]}); "
                    f"run `ws3d {stage}` first"
                )
        self.cfg = cfg
        self.split = split
        self.seed = int(seed)
        self.voxel_size = float(cfg.voxel_size_m or default_voxel_size(store, self.scene_ids))
        self.class_names = store.class_names
        self._store: Store | None = store

    @property
    def store(self) -> Store:
        # opened lazily again in each worker process (a Store is cheap: a location and attrs; an
        # object store's driver is made again in a forked worker, see pipeline.storage)
        if self._store is None:
            self._store = Store.open(self.store_path)
        return self._store

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_store"] = None
        return state

    def __len__(self) -> int:
        return len(self.scene_ids)

    def read_arrays(self, scene_id: str) -> SceneArrays:
        """Read exactly the arrays listed in ``POINT_ARRAYS`` and ``GROUP_ARRAYS`` for cfg.groups,
        in one call (concurrent reads: one round trip to an object store, not one an array).

        Raises:
            KeyError for an absent array; DataError naming the scene, array and chunk for one
            that fails its checksum (a damaged store: ``ws3d validate --deep --repair``).
        """
        groups = [g for g in ("overseg", "views", "clip") if g in set(self.cfg.groups)]
        specs = [*POINT_ARRAYS, *(spec for g in groups for spec in GROUP_ARRAYS[g])]
        try:
            values = iter(self.store.read_many(scene_id, specs))
        except DamagedDataError as exc:
            raise DataError(f"{self.store_path}: {exc}") from None
        out = SceneArrays(*(next(values) for _ in POINT_ARRAYS))
        if "overseg" in groups:
            out.segment, out.boundary, out.semantic_boundary = (next(values) for _ in GROUP_ARRAYS["overseg"])
        if "views" in groups:
            out.visible_ptr, out.visible_ids = (next(values) for _ in GROUP_ARRAYS["views"])
        if "clip" in groups:
            out.clip_view, out.clip_segment, out.clip_segment_seen = (next(values) for _ in GROUP_ARRAYS["clip"])
        return out

    def __getitem__(self, key: int | tuple[int, int]) -> SceneSample:
        epoch, index = (0, key) if isinstance(key, (int, np.integer)) else (int(key[0]), int(key[1]))
        scene_id = self.scene_ids[index]
        train = self.split == "train"
        rng = np.random.default_rng([self.seed, epoch, index]) if train else None
        try:
            arrays = self.read_arrays(scene_id)
        except KeyError as exc:
            raise DataError(f"{self.store_path}: scene {scene_id}: {exc}") from exc
        return make_sample(scene_id, arrays, cfg=self.cfg, voxel_size=self.voxel_size, rng=rng)


# ---------------------------------------------------------------------------------------------
# loading order


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """An endless stream of batches of ``(epoch, index)`` keys, resumable at any batch.

    Epoch e visits the n items in the order ``default_rng([seed, e]).permutation(n)`` (or
    ``arange`` when not shuffling) cut into ``batches_per_epoch`` batches of ``batch_size``; the
    incomplete tail is dropped, except when n < batch_size (then one batch of all items). Batch k
    of the stream is batch ``k % batches_per_epoch`` of epoch ``k // batches_per_epoch``, so a
    run resumed with ``start_batch=k`` sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, num_items: int, batch_size: int, *, seed: int, shuffle: bool = True, start_batch: int = 0):
        if num_items < 1 or batch_size < 1:
            raise ValueError(f"need items and batch_size >= 1, got {num_items}, {batch_size}")
        self.num_items = num_items
        self.batch_size = min(batch_size, num_items)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.start_batch = int(start_batch)
        self.batches_per_epoch = num_items // self.batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """[n] int64 item order of one epoch."""
        if not self.shuffle:
            return np.arange(self.num_items, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def batch(self, k: int) -> list[tuple[int, int]]:
        """The k-th batch of the stream."""
        epoch, position = divmod(k, self.batches_per_epoch)
        order = self.epoch_order(epoch)[position * self.batch_size : (position + 1) * self.batch_size]
        return [(epoch, int(i)) for i in order]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        k = self.start_batch
        while True:
            yield self.batch(k)
            k += 1


def worker_init_fn(worker_id: int) -> None:
    """Seed python/numpy in a worker from torch's per-worker seed (derived from the loader's
    generator), for any incidental randomness; samples themselves use their own keyed rng."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(
    dataset: SceneDataset,
    *,
    batch_size: int,
    seed: int,
    start_batch: int = 0,
    shuffle: bool = True,
    num_workers: int = 0,
    pin_memory: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    batch_sampler: Any | None = None,
) -> DataLoader:
    """An endless DataLoader of :class:`ws3d_train.data.batch.Batch` from ``start_batch`` on.

    Deterministic per seed whatever ``num_workers`` is (batches come back in sampler order). The
    loader has its own torch.Generator, so creating it never draws from the global torch RNG
    (which would make a resumed run diverge from an uninterrupted one). ``collate_fn`` turns the
    dataset's items into a batch (default :func:`ws3d_train.data.batch.collate`); ``batch_sampler``
    replaces the single-process sampler (a rank's share under data-parallel training).
    """
    sampler = batch_sampler if batch_sampler is not None else ResumableBatchSampler(
        len(dataset), batch_size, seed=seed, shuffle=shuffle, start_batch=start_batch)
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate if collate_fn is None else collate_fn,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        worker_init_fn=worker_init_fn if num_workers > 0 else None,
        generator=generator,
        prefetch_factor=2 if num_workers > 0 else None,
    )
