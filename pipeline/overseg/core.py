"""Over-segmentation's pure core: normals, curvature, Point Feature Histograms, region growing,
segment graph, on arrays (no I/O; the stage in `pipeline.overseg.stage` reads and writes the store).

The pure core `overseg_points` runs, on arrays:
1. k nearest neighbours (`pipeline.overseg.neighbours.knn`, optionally radius-bounded);
2. normals (area-weighted mesh vertex normals, or PCA oriented towards a viewpoint);
   then, so that segments follow the surface and not its sampling (`voxel_m` > 0): the points
   are pooled into surface voxels (a `voxel_m` cell and one of six normal directions, so the
   two sides of a thin slab stay apart) and everything below runs on the voxels (centroid,
   mean colour, mean normal), with neighbourhoods, thresholds and the smallest segment size in
   metres; each point takes its voxel's segment. The same surface sampled 1x or 12x as densely
   gives about the same segments (and a dense cloud costs little more than its neighbour search);
   the surface variation l0 / (l0 + l1 + l2) as curvature, over the neighbours within the tangent
   band (so the far side of a thin slab, or a picture on a wall, does not look like curvature);
3. Rusu's Point Feature Histograms: the Darboux-frame angles (alpha, phi, theta) of every point
   pair of a small neighbourhood, binned bins**3 and normalised;
4. region growing in order of increasing curvature: a neighbour joins when the normal angle, its
   offset from the current point's tangent plane, the PFH affinity (histogram intersection) and
   the colour distance (to the neighbour and to the segment's mean) pass; points above the seed
   curvature join but do not spread; an optional radius cap keeps segments region-sized;
5. small segments merged into their most similar adjacent segment (normal and colour);
6. boundary flags, semantic-boundary flags and the segment adjacency graph with border sizes.

Every kernel is numba (`cache=True`, no fastmath: fastmath changes floor() at PFH bin edges).
Parallel kernels write one row per point; the growing and merging are sequential; so results do
not depend on the thread count.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from numba import njit

from pipeline import schema
from pipeline.overseg.config import OversegConfig
from pipeline.overseg.features import (
    edge_affinity,
    mesh_vertex_normals,
    orient_normals,
    pca_normals_curvature,
    pfh_counts,
    smooth_colours,
)
from pipeline.overseg.neighbours import knn
from pipeline.overseg.regions import (
    _boundary_kernel,
    grow_regions,
    merge_small_segments,
    relabel_by_first_point,
    segment_graph,
    semantic_boundary,
)


@dataclass
class OversegResult:
    """The over-segmentation of one scene (all arrays per point unless said otherwise)."""

    normal: np.ndarray
    """float32 [N, 3] unit normals."""
    curvature: np.ndarray
    """float32 [N] surface variation l0 / (l0 + l1 + l2), 0 (plane) .. 1/3 (isotropic)."""
    segment: np.ndarray
    """int32 [N] segment id in 0..S-1."""
    boundary: np.ndarray
    """uint8 [N] 1 where a neighbour is in another segment."""
    semantic_boundary: np.ndarray
    """uint8 [N] 1 where a labelled neighbour has another label, 0 where not, 255 where unknown."""
    adjacency: np.ndarray
    """int32 [P, 2] adjacent segment pairs, a < b, sorted."""
    adjacency_border: np.ndarray
    """int32 [P] points (of either segment) that have a neighbour in the other segment."""
    timings: dict[str, float]
    """Seconds per step."""

    @property
    def n_segments(self) -> int:
        return int(self.segment.max()) + 1 if len(self.segment) else 0


def surface_voxels(xyz: np.ndarray, normal: np.ndarray, voxel_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Pool points into surface voxels: a `voxel_m` cell and the normal's dominant signed axis.

    Args:
        xyz: float [N, 3]. normal: float [N, 3] unit (oriented). voxel_m: metres.

    Returns:
        inverse: int64 [N] voxel of each point, voxels numbered by their first point;
        first: int64 [V] that first point of each voxel.
    """
    cell = np.floor((xyz - xyz.min(axis=0)) / voxel_m).astype(np.int64)
    dims = cell.max(axis=0) + 1
    axis = np.argmax(np.abs(normal), axis=1)
    side = np.take_along_axis(normal, axis[:, None], axis=1)[:, 0] < 0
    key = ((cell[:, 0] * dims[1] + cell[:, 1]) * dims[2] + cell[:, 2]) * 6 + axis * 2 + side
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    order = np.argsort(first, kind="stable")
    rank[order] = np.arange(len(first))
    return rank[inverse.ravel()], first[order]


def _pool(values: np.ndarray, inverse: np.ndarray, n_voxels: int) -> np.ndarray:
    """Mean of float [N, d] values per voxel, float64 [V, d]."""
    out = np.zeros((n_voxels, values.shape[1]), np.float64)
    count = np.bincount(inverse, minlength=n_voxels).astype(np.float64)
    for d in range(values.shape[1]):
        out[:, d] = np.bincount(inverse, weights=values[:, d], minlength=n_voxels)
    return out / np.maximum(count, 1.0)[:, None]


# --------------------------------------------------------------------------------------------
# the pure core
# --------------------------------------------------------------------------------------------
def overseg_points(
    xyz: np.ndarray,
    rgb: np.ndarray,
    *,
    faces: np.ndarray | None = None,
    semantic: np.ndarray | None = None,
    viewpoint: np.ndarray | None = None,
    cfg: OversegConfig = OversegConfig(),
) -> OversegResult:
    """Over-segment one scene (pure: arrays in, arrays out).

    Args:
        xyz: float [N, 3] metres. rgb: uint8 [N, 3].
        faces: int [F, 3] triangles (meshes): normals from the mesh; PCA normals otherwise (and
            for vertices on no non-degenerate face).
        semantic: int [N] labels with `schema.IGNORE_INDEX`, for the semantic boundary (None: 255).
        viewpoint: float [3] that PCA normals are turned towards; None = the centre of the bounds
            (inside a room). LiDAR: the sensor.
        cfg: thresholds.

    Returns:
        An `OversegResult`.
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    xyz = np.ascontiguousarray(xyz, np.float64)
    n = len(xyz)
    if n == 0:
        raise ValueError("overseg: the scene has no points")
    if viewpoint is None:
        viewpoint = 0.5 * (xyz.min(axis=0) + xyz.max(axis=0))
    band = cfg.max_plane_offset_m
    has_faces = faces is not None and len(faces) > 0
    if cfg.voxel_m > 0:
        return _overseg_voxels(xyz, rgb, faces if has_faces else None, semantic, viewpoint, cfg, timings, lap)
    nbr, _ = knn(xyz, cfg.k_neighbours, radius=cfg.radius_m if cfg.radius_m > 0 else None)
    lap("neighbours")
    if has_faces:
        mesh_n = mesh_vertex_normals(xyz, faces)
        has_mesh = np.any(mesh_n != 0, axis=1)
        pca_n, curvature = pca_normals_curvature(xyz, nbr, ref_normal=mesh_n, band_m=band)
        normal = np.where(has_mesh[:, None], mesh_n, orient_normals(pca_n, xyz, viewpoint))
    else:
        pca_n, _ = pca_normals_curvature(xyz, nbr)
        # a second pass inside the tangent band: better normals and curvature at thin slabs
        pca_n, curvature = pca_normals_curvature(xyz, nbr, ref_normal=pca_n, band_m=band)
        normal = orient_normals(pca_n, xyz, viewpoint)
    lap("normals")
    colour = np.asarray(rgb, np.float32)
    segment = _grow_and_merge(nbr, xyz, normal, colour, curvature, cfg.min_segment_points, cfg, lap)
    boundary, pairs, border = segment_graph(segment, nbr)
    sem_boundary = semantic_boundary(semantic, nbr)
    lap("graph")
    return OversegResult(
        normal=normal.astype(np.float32), curvature=curvature.astype(np.float32), segment=segment,
        boundary=boundary, semantic_boundary=sem_boundary, adjacency=pairs, adjacency_border=border,
        timings=timings,
    )


def _grow_and_merge(nbr, xyz, normal, colour, curvature, min_size: int, cfg: OversegConfig, lap) -> np.ndarray:
    """PFH affinities, colour smoothing, region growing and small-segment merging over a
    neighbour graph (of points or of surface voxels): int32 segment ids per item."""
    counts, totals = pfh_counts(xyz, normal, nbr, k_pfh=cfg.k_pfh, bins=cfg.pfh_bins)
    affinity = edge_affinity(counts, totals, nbr)
    del counts, totals
    lap("pfh")
    if cfg.colour_smoothing:
        colour = smooth_colours(xyz, normal, colour, nbr, band_m=cfg.max_plane_offset_m, cutoff=cfg.max_colour_dist)
    segment = grow_regions(nbr, xyz, normal, colour, curvature, affinity, cfg=cfg)
    lap("grow")
    segment = merge_small_segments(segment, nbr, normal, colour, min_points=min_size,
                                   colour_scale=cfg.merge_colour_scale)
    lap("merge")
    return segment


def _overseg_voxels(xyz, rgb, faces, semantic, viewpoint, cfg: OversegConfig, timings, lap) -> OversegResult:
    """`overseg_points` on surface voxels (cfg.voxel_m > 0): no per-point neighbour search at all.

    Meshes: voxels are split by the vertices' mesh normals (six signed axes), so the two sides
    of a thin slab stay apart. Clouds: plain cells (a slab thinner than a voxel is one surface
    at this resolution); voxel normals by PCA, oriented towards `viewpoint`. Boundaries, the
    segment graph and semantic boundaries are computed between neighbouring voxels (a band
    about `voxel_radius_factor * voxel_m` wide at any density); every point takes its voxel's
    segment, curvature, boundary flags and (clouds, or vertices on no face) normal.
    """
    band = cfg.max_plane_offset_m
    n = len(xyz)
    mesh_n = mesh_vertex_normals(xyz, faces) if faces is not None else np.zeros((n, 3))
    inverse, _ = surface_voxels(xyz, mesh_n, cfg.voxel_m)
    n_vox = int(inverse.max()) + 1
    weight = np.bincount(inverse, minlength=n_vox)
    v_xyz = _pool(xyz, inverse, n_vox)
    v_colour = _pool(np.asarray(rgb, np.float64), inverse, n_vox).astype(np.float32)
    v_mesh = _pool(mesh_n, inverse, n_vox)
    length = np.linalg.norm(v_mesh, axis=1, keepdims=True)
    has_mesh = length[:, 0] > 1e-9
    v_mesh = np.where(has_mesh[:, None], v_mesh / np.maximum(length, 1e-12), 0.0)
    v_nbr, v_dist = knn(v_xyz, cfg.k_neighbours, radius=cfg.radius_m if cfg.radius_m > 0 else None)
    band_nbr = v_nbr.copy()  # the metric neighbourhood of boundaries and the graph
    if cfg.voxel_radius_factor > 0:
        far = v_dist > cfg.voxel_radius_factor * cfg.voxel_m
        far[:, :4] = False
        band_nbr[far] = -1  # distances ascend along a row: -1 stays at the end
    lap("neighbours")
    if has_mesh.all():
        _, v_curv = pca_normals_curvature(v_xyz, v_nbr, ref_normal=v_mesh, band_m=band)
        v_normal = v_mesh
    else:
        v_pca, _ = pca_normals_curvature(v_xyz, v_nbr, ref_normal=v_mesh, band_m=band if has_mesh.any() else 0.0)
        v_pca, v_curv = pca_normals_curvature(v_xyz, v_nbr, ref_normal=np.where(has_mesh[:, None], v_mesh, v_pca),
                                              band_m=band)
        v_normal = np.where(has_mesh[:, None], v_mesh, orient_normals(v_pca, v_xyz, viewpoint))
    point_has_mesh = np.any(mesh_n != 0, axis=1)
    normal = np.where(point_has_mesh[:, None], mesh_n, orient_normals(v_normal[inverse], xyz, viewpoint))
    lap("normals")
    min_size = max(1, int(round(cfg.min_segment_area_m2 / cfg.voxel_m ** 2)))
    v_seg = _grow_and_merge(v_nbr, v_xyz, v_normal, v_colour, v_curv, min_size, cfg, lap)
    segment = relabel_by_first_point(v_seg[inverse])
    v_seg = np.zeros(n_vox, np.int32)
    v_seg[inverse] = segment  # voxel segments in the points' numbering
    nseg = int(segment.max()) + 1
    v_boundary, keys = _boundary_kernel(v_seg.astype(np.int64), band_nbr, nseg)
    owner = np.broadcast_to(np.arange(n_vox)[:, None], keys.shape)[keys >= 0]
    keys = keys[keys >= 0]
    uniq, slot = np.unique(keys, return_inverse=True)
    border = np.bincount(slot.ravel(), weights=weight[owner], minlength=len(uniq)).astype(np.int32)
    pairs = np.stack([uniq // nseg, uniq % nseg], axis=1).astype(np.int32).reshape(-1, 2)
    sem_boundary = _voxel_semantic_boundary(semantic, inverse, n_vox, band_nbr)
    lap("graph")
    return OversegResult(
        normal=normal.astype(np.float32), curvature=v_curv[inverse].astype(np.float32), segment=segment,
        boundary=v_boundary[inverse], semantic_boundary=sem_boundary, adjacency=pairs,
        adjacency_border=border, timings=timings,
    )


@njit(cache=True)
def _voxel_semantic_boundary_kernel(sem, inverse, lo, hi, v_nbr, ignore):  # pragma: no cover - compiled
    out = np.zeros(sem.shape[0], np.uint8)
    for i in range(sem.shape[0]):
        a = sem[i]
        if a == ignore:
            out[i] = 255
            continue
        v = inverse[i]
        if lo[v] != a or hi[v] != a:
            out[i] = 1
            continue
        for t in range(v_nbr.shape[1]):
            w = v_nbr[v, t]
            if w < 0:
                break
            if lo[w] <= hi[w] and (lo[w] != a or hi[w] != a):
                out[i] = 1
                break
    return out


def _voxel_semantic_boundary(semantic, inverse: np.ndarray, n_vox: int, v_nbr: np.ndarray) -> np.ndarray:
    """1 where a labelled point of the point's voxel or a neighbouring voxel has another label,
    0 where none has, 255 where unknown (unlabelled point, or no labels): uint8 [N]."""
    n = len(inverse)
    if semantic is None or not np.any(np.asarray(semantic) != schema.IGNORE_INDEX):
        return np.full(n, 255, np.uint8)
    sem = np.asarray(semantic, np.int64)
    labelled = sem != schema.IGNORE_INDEX
    big = np.iinfo(np.int64).max
    lo = np.full(n_vox, big, np.int64)
    hi = np.full(n_vox, -big, np.int64)
    np.minimum.at(lo, inverse[labelled], sem[labelled])
    np.maximum.at(hi, inverse[labelled], sem[labelled])
    return _voxel_semantic_boundary_kernel(sem, inverse.astype(np.int64), lo, hi,
                                           np.ascontiguousarray(v_nbr, np.int32), schema.IGNORE_INDEX)
