"""The typed per-scene sample, the typed training batch and `collate` (samples -> one batch). No I/O.

`SceneSample` lives here rather than in ``ws3d_train.data.dataset`` (which makes samples from the store)
so that this module imports nothing of the data path: ``data`` imports ``batch``, never the reverse.

Conventions (the same everywhere in ``ws3d_train``):

- ``coords`` is int32 [Nv, 4] = (batch index, x, y, z) in voxel units: the batch index is
  column 0 (the sparse tensor's convention, see ``ws3d_train.sparse``);
- voxels of scene b are the contiguous rows ``voxel_ptr[b]:voxel_ptr[b+1]``, points of scene b
  the rows ``point_ptr[b]:point_ptr[b+1]``;
- every index stored in the batch is global over the batch: ``voxel_segment`` (offset so that
  two scenes never share a segment id), ``view_voxel`` (rows of the voxel tensors),
  ``point_to_voxel`` (rows of the voxel tensors, -1 for points cropped away);
- labels are int64 with ``IGNORE_INDEX`` for unknown.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["Batch", "SceneSample", "collate"]


@dataclass
class SceneSample:
    """One scene ready for collation (NumPy, picklable across DataLoader workers).

    Nv voxels after cropping, N points of the whole scene, S segments and V views kept, M kept
    (view, voxel) pairs, D the CLIP width (0 when the stage reads no CLIP targets).
    """

    scene_id: str
    coords: np.ndarray
    """[Nv, 3] int32 voxel coordinates (x, y, z), >= 0."""
    feats: np.ndarray
    """[Nv, C] float32 network input of each voxel's representative point."""
    voxel_semantic: np.ndarray
    """[Nv] int64 majority label of the voxel's labelled points, IGNORE_INDEX if none."""
    voxel_instance: np.ndarray
    """[Nv] int64 instance of the representative point, -1 none."""
    voxel_segment: np.ndarray
    """[Nv] int64 segment in 0..S-1 of the representative point, -1 none."""
    voxel_boundary: np.ndarray
    """[Nv] uint8 1 where any point of the voxel is a geometric boundary."""
    voxel_semantic_boundary: np.ndarray
    """[Nv] int64 1/0 from the voxel's points with known semantic boundary, -1 unknown."""
    segment_target: np.ndarray
    """[S, D] float32 CLIP embedding of each kept segment."""
    segment_seen: np.ndarray
    """[S] bool, the segment has a CLIP embedding."""
    segment_orig: np.ndarray
    """[S] int64 the segment's id in the scene's ``overseg/segment``."""
    view_ptr: np.ndarray
    """[V+1] int64 CSR offsets into ``view_voxel``."""
    view_voxel: np.ndarray
    """[M] int64 voxels shown by each view (unique per view, sorted)."""
    view_target: np.ndarray
    """[V, D] float32 CLIP embedding of each kept view."""
    view_orig: np.ndarray
    """[V] int64 the view's index in the scene's ``views/``."""
    point_xyz: np.ndarray
    """[N, 3] float32 augmented point positions (metres)."""
    point_to_voxel: np.ndarray
    """[N] int64 voxel of each point, -1 where cropped away."""
    point_semantic: np.ndarray
    """[N] int64 label, IGNORE_INDEX where unlabelled."""
    point_instance: np.ndarray
    """[N] int64 instance, -1 where none."""
    point_segment: np.ndarray
    """[N] int64 kept segment (0..S-1) of each point, -1 where its segment was dropped."""
    voxel_origin: np.ndarray = field(default_factory=lambda: np.zeros(3, np.int64))
    """[3] int64: ``coords = floor(point_xyz / voxel_size) - voxel_origin`` for kept points."""


@dataclass
class Batch:
    """A batch of B scenes. Nv voxels, Np points, S segments, V views, M (view, voxel) pairs."""

    coords: torch.Tensor
    """[Nv, 4] int32 (batch index, x, y, z) voxel coordinates."""
    feats: torch.Tensor
    """[Nv, C] float32 network input."""
    voxel_ptr: torch.Tensor
    """[B+1] int64 voxel row offsets per scene."""
    voxel_semantic: torch.Tensor
    """[Nv] int64 majority label, IGNORE_INDEX where none."""
    voxel_instance: torch.Tensor
    """[Nv] int64 per-scene instance id, -1 where none (not offset: instances are per scene)."""
    voxel_segment: torch.Tensor
    """[Nv] int64 global segment id in 0..S-1, -1 where none."""
    voxel_boundary: torch.Tensor
    """[Nv] uint8 geometric boundary (1 where any point of the voxel is one)."""
    voxel_semantic_boundary: torch.Tensor
    """[Nv] int64 1/0 semantic boundary, -1 unknown."""
    segment_target: torch.Tensor
    """[S, D] float32 CLIP embedding per segment."""
    segment_seen: torch.Tensor
    """[S] bool, the segment has a CLIP embedding."""
    segment_batch: torch.Tensor
    """[S] int64 scene of each segment."""
    segment_orig: torch.Tensor
    """[S] int64 the segment's id in its scene's ``overseg/segment`` (with ``segment_batch``
    this identifies a physical segment, e.g. across two augmented copies of a scene)."""
    view_ptr: torch.Tensor
    """[V+1] int64 CSR offsets into ``view_voxel``."""
    view_voxel: torch.Tensor
    """[M] int64 voxel rows shown by each view."""
    view_target: torch.Tensor
    """[V, D] float32 CLIP embedding per view."""
    view_batch: torch.Tensor
    """[V] int64 scene of each view."""
    point_ptr: torch.Tensor
    """[B+1] int64 point row offsets per scene."""
    point_to_voxel: torch.Tensor
    """[Np] int64 voxel row of each point, -1 where cropped away."""
    point_xyz: torch.Tensor
    """[Np, 3] float32 augmented point positions in metres."""
    point_semantic: torch.Tensor
    """[Np] int64 label, IGNORE_INDEX where unlabelled."""
    point_instance: torch.Tensor
    """[Np] int64 per-scene instance id, -1 where none."""
    point_segment: torch.Tensor
    """[Np] int64 global segment id, -1 where none or dropped."""
    voxel_origin: torch.Tensor
    """[B, 3] int64: coords[:, 1:] = floor(point_xyz / voxel_size) - voxel_origin[b] for kept points."""
    scene_ids: list[str]
    """The B scene ids, in batch-index order."""

    @property
    def num_scenes(self) -> int:
        return len(self.scene_ids)

    @property
    def num_segments(self) -> int:
        return int(self.segment_seen.shape[0])

    @property
    def voxel_batch(self) -> torch.Tensor:
        """[Nv] int64 scene of each voxel (column 0 of ``coords``)."""
        return self.coords[:, 0].long()

    def _map(self, fn) -> "Batch":
        values = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            values[f.name] = fn(value) if isinstance(value, torch.Tensor) else value
        return Batch(**values)

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Page-locked copy (called by DataLoader(pin_memory=True))."""
        return self._map(lambda t: t.pin_memory())

    def voxel_to_point(self, values: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """Per-voxel values [Nv, ...] -> per-point values [Np, ...]; cropped points get ``fill``."""
        index = self.point_to_voxel.to(values.device)
        out = values[index.clamp(min=0)]
        missing = index < 0
        if bool(missing.any()):
            out = out.clone()
            out[missing] = fill
        return out

    def split_points(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Per-point values [Np, ...] -> one tensor per scene."""
        sizes = (self.point_ptr[1:] - self.point_ptr[:-1]).tolist()
        return list(torch.split(values, sizes))

    def split_voxels(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Per-voxel values [Nv, ...] -> one tensor per scene."""
        sizes = (self.voxel_ptr[1:] - self.voxel_ptr[:-1]).tolist()
        return list(torch.split(values, sizes))


def _ptr(sizes: Sequence[int]) -> np.ndarray:
    ptr = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=ptr[1:])
    return ptr


def _cat(arrays: Sequence[np.ndarray], dtype, width: int | None = None) -> torch.Tensor:
    if width is not None:  # [*, D] blocks: empty ones may have D = 0
        arrays = [a if a.shape[0] else np.zeros((0, width), a.dtype) for a in arrays]
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(arrays).astype(dtype, copy=False)))


def collate(samples: Sequence[SceneSample]) -> Batch:
    """Concatenate per-scene samples into one :class:`Batch`, offsetting every index."""
    if not samples:
        raise ValueError("collate: no samples")
    nv = [s.coords.shape[0] for s in samples]
    npts = [s.point_to_voxel.shape[0] for s in samples]
    ns = [s.segment_seen.shape[0] for s in samples]
    nviews = [s.view_ptr.shape[0] - 1 for s in samples]
    voxel_off, point_off, seg_off = _ptr(nv), _ptr(npts), _ptr(ns)
    view_entry_off = _ptr([int(s.view_ptr[-1]) for s in samples])
    widths = {s.segment_target.shape[1] for s in samples if s.segment_target.shape[0]}
    widths |= {s.view_target.shape[1] for s in samples if s.view_target.shape[0]}
    if len(widths) > 1:
        raise ValueError(f"collate: CLIP widths differ across scenes: {sorted(widths)}")
    width = widths.pop() if widths else 0

    coords = np.concatenate(
        [np.concatenate([np.full((n, 1), b, np.int32), s.coords.astype(np.int32)], axis=1) for b, (s, n) in enumerate(zip(samples, nv))]
    )

    def offset(values: np.ndarray, off: int) -> np.ndarray:
        return np.where(values >= 0, values + off, -1)

    view_ptr = np.concatenate(
        [np.zeros(1, np.int64)] + [s.view_ptr[1:] + view_entry_off[b] for b, s in enumerate(samples)]
    )
    return Batch(
        coords=torch.from_numpy(coords),
        feats=_cat([s.feats for s in samples], np.float32),
        voxel_ptr=torch.from_numpy(voxel_off),
        voxel_semantic=_cat([s.voxel_semantic for s in samples], np.int64),
        voxel_instance=_cat([s.voxel_instance for s in samples], np.int64),
        voxel_segment=_cat([offset(s.voxel_segment, seg_off[b]) for b, s in enumerate(samples)], np.int64),
        voxel_boundary=_cat([s.voxel_boundary for s in samples], np.uint8),
        voxel_semantic_boundary=_cat([s.voxel_semantic_boundary for s in samples], np.int64),
        segment_target=_cat([s.segment_target for s in samples], np.float32, width),
        segment_seen=_cat([s.segment_seen for s in samples], bool),
        segment_batch=torch.from_numpy(np.repeat(np.arange(len(samples), dtype=np.int64), ns)),
        segment_orig=_cat([s.segment_orig for s in samples], np.int64),
        view_ptr=torch.from_numpy(view_ptr.astype(np.int64)),
        view_voxel=_cat([s.view_voxel + voxel_off[b] for b, s in enumerate(samples)], np.int64),
        view_target=_cat([s.view_target for s in samples], np.float32, width),
        view_batch=torch.from_numpy(np.repeat(np.arange(len(samples), dtype=np.int64), nviews)),
        point_ptr=torch.from_numpy(point_off),
        point_to_voxel=_cat([offset(s.point_to_voxel, voxel_off[b]) for b, s in enumerate(samples)], np.int64),
        point_xyz=_cat([s.point_xyz for s in samples], np.float32),
        point_semantic=_cat([s.point_semantic for s in samples], np.int64),
        point_instance=_cat([s.point_instance for s in samples], np.int64),
        point_segment=_cat([offset(s.point_segment, seg_off[b]) for b, s in enumerate(samples)], np.int64),
        voxel_origin=torch.from_numpy(np.stack([s.voxel_origin for s in samples]).astype(np.int64)),
        scene_ids=[s.scene_id for s in samples],
    )
