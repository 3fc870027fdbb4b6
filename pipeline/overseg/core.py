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

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from pipeline import parallel, schema
from pipeline.overseg.config import OversegConfig
from pipeline.overseg.features import (
    edge_affinity,
    mesh_vertex_normals_areas,
    orient_normals,
    SPAN,
    pca_normals_curvature,
    pfh_counts,
    smooth_colours,
    surface_variation_along,
)
from pipeline.overseg.neighbours import hash_keys, hash_slot, knn, lower_corner, mesh_neighbours
from pipeline.overseg.regions import (
    grow_regions,
    merge_small_segments,
    segment_graph,
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


@njit(cache=True)
def _voxel_kernel(xyz, normal, voxel_m, level):  # pragma: no cover - compiled
    n = xyz.shape[0]
    lo = lower_corner(xyz)
    cell = np.empty((n, 3), np.int64)
    dims = np.zeros(3, np.int64)
    for i in range(n):
        side = voxel_m * (1 << level[i])  # level 0 everywhere but on range-adaptive grids
        for d in range(3):
            c = np.int64(np.floor((xyz[i, d] - lo[d]) / side))
            cell[i, d] = c
            dims[d] = max(dims[d], c + 1)
    table_key, mask = hash_keys(n)
    table_val = np.empty(len(table_key), np.int64)
    inverse = np.empty(n, np.int64)
    first = np.empty(n, np.int64)
    n_vox = 0
    for i in range(n):
        ax, best = 0, abs(normal[i, 0])
        for d in (1, 2):
            if abs(normal[i, d]) > best:
                ax, best = d, abs(normal[i, d])
        side = 1 if normal[i, ax] < 0 else 0
        key = (((cell[i, 0] * dims[1] + cell[i, 1]) * dims[2] + cell[i, 2]) * 6 + ax * 2 + side) * 16 + level[i]
        h = hash_slot(table_key, key, mask)
        if table_key[h] == -1:  # a new voxel: numbered in the order of first points
            table_key[h] = key
            table_val[h] = n_vox
            first[n_vox] = i
            n_vox += 1
        inverse[i] = table_val[h]
    return inverse, first[:n_vox].copy()


def surface_voxels(xyz: np.ndarray, normal: np.ndarray, voxel_m: float,
                   level: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pool points into surface voxels: a `voxel_m` cell and the normal's dominant signed axis.

    Args:
        xyz: float [N, 3]. normal: float [N, 3] unit (oriented), or zero rows (then plain
            cells: every zero normal counts as +x). voxel_m: metres.
        level: int [N] in 0..15 (None: 0): a point at level L falls into a cell of side
            `voxel_m * 2**L` of that level's grid (range-adaptive grids, `range_levels`).

    Returns:
        inverse: int64 [N] voxel of each point, voxels numbered by their first point;
        first: int64 [V] that first point of each voxel.
    """
    level = np.zeros(len(xyz), np.int64) if level is None else np.ascontiguousarray(level, np.int64)
    if len(level) and (level.min() < 0 or level.max() > 15):
        raise ValueError("surface_voxels: levels must be in 0..15")
    return _voxel_kernel(np.ascontiguousarray(xyz, np.float64), np.ascontiguousarray(normal, np.float64),
                         float(voxel_m), level)


def range_levels(xyz: np.ndarray, sensor: np.ndarray, voxel_m: float, per_m: float) -> np.ndarray:
    """Range-adaptive voxel levels: int64 [N], the smallest L with `voxel_m * 2**L` at least
    `per_m` times the point's distance from the sensor (0 near it, at most 15)."""
    reach = per_m * np.linalg.norm(np.asarray(xyz, np.float64) - np.asarray(sensor, np.float64)[None, :], axis=1)
    with np.errstate(divide="ignore"):
        level = np.ceil(np.log2(np.maximum(reach, 1e-12) / voxel_m))
    return np.clip(level, 0, 15).astype(np.int64)


@njit(cache=True)
def _pool_kernel(inverse, n_items, xyz, rgb, normal, area):  # pragma: no cover - compiled
    count = np.zeros(n_items, np.int64)
    p = np.zeros((n_items, 3), np.float64)
    c = np.zeros((n_items, 3), np.float64)
    m = np.zeros((n_items, 3), np.float64)
    a = np.zeros(n_items, np.float64)
    has = np.zeros(n_items, np.bool_)
    for i in range(inverse.shape[0]):
        v = inverse[i]
        count[v] += 1
        a[v] += area[i]
        for d in range(3):
            p[v, d] += xyz[i, d]
            c[v, d] += rgb[i, d]
            m[v, d] += normal[i, d]
    for v in range(n_items):
        for d in range(3):
            p[v, d] /= count[v]
            c[v, d] /= count[v]
        length = np.sqrt(m[v, 0] ** 2 + m[v, 1] ** 2 + m[v, 2] ** 2)
        has[v] = length > 1e-9
        for d in range(3):
            m[v, d] = m[v, d] / length if has[v] else 0.0
    return count, p, c, m, a, has


@njit(cache=True)
def _centre(xyz):  # pragma: no cover - compiled
    """[3] float64 centre of the bounds of [N, 3] points (N >= 1), in one pass (numpy's axis-0
    min and max over [N, 3] cost a millisecond each on a room)."""
    lo = np.empty(3, np.float64)
    hi = np.empty(3, np.float64)
    for d in range(3):
        lo[d] = hi[d] = xyz[0, d]
    for i in range(xyz.shape[0]):
        for d in range(3):
            lo[d] = min(lo[d], xyz[i, d])
            hi[d] = max(hi[d], xyz[i, d])
    return 0.5 * (lo + hi)


@njit(cache=True)
def _nonzero_rows(a):  # pragma: no cover - compiled
    """bool [N]: rows of [N, 3] with a nonzero entry (np.any(a != 0, axis=1), without temporaries)."""
    out = np.empty(a.shape[0], np.bool_)
    for i in range(a.shape[0]):
        out[i] = a[i, 0] != 0 or a[i, 1] != 0 or a[i, 2] != 0
    return out


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
        faces: int [F, 3] triangles (meshes): normals from the mesh, and (`cfg.mesh_edges`)
            neighbours from its edges; PCA normals otherwise (and for vertices on no
            non-degenerate face).
        semantic: int [N] labels with `schema.IGNORE_INDEX`, for the semantic boundary (None: 255).
        viewpoint: float [3] that PCA normals are turned towards; None = the centre of the bounds
            (inside a room). LiDAR: the sensor; a cloud with a viewpoint is taken as seen from
            that sensor: its cells and thresholds grow with the range (`cfg.range_scale`).
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
    sensor = viewpoint is not None
    viewpoint = _centre(xyz) if viewpoint is None else np.asarray(viewpoint, np.float64)
    band = cfg.max_plane_offset_m
    has_faces = faces is not None and len(faces) > 0
    if has_faces:
        faces = np.ascontiguousarray(faces, np.int64).reshape(-1, 3)
        mesh_n, mesh_area = mesh_vertex_normals_areas(xyz, faces)
    else:
        mesh_n, mesh_area = np.zeros((n, 3)), np.zeros(n)
    # items: surface voxels (a cell and, on meshes, the normal's signed axis) or the points;
    # clouds seen from a sensor: cells and thresholds that grow with the range (`range_scale`)
    ranged = cfg.voxel_m > 0 and sensor and not has_faces and cfg.range_scale > 0
    level = range_levels(xyz, viewpoint, cfg.voxel_m, 4 * cfg.range_scale) if ranged else None
    if cfg.voxel_m > 0:
        inverse, _ = surface_voxels(xyz, mesh_n, cfg.voxel_m, level)
    else:
        inverse = np.arange(n, dtype=np.int64)
    n_items = int(inverse.max()) + 1
    count, i_xyz, i_colour, i_mesh, i_area, has_mesh = _pool_kernel(
        inverse, n_items, xyz, np.ascontiguousarray(rgb, np.float64).reshape(n, 3), mesh_n, mesh_area)
    # per item: the factor its metric thresholds grow by (1 but far from a sensor)
    scale = np.ones(n_items)
    if ranged:
        scale = np.maximum(1.0, cfg.range_scale * np.linalg.norm(i_xyz - viewpoint[None, :], axis=1) / cfg.voxel_m)
    band_i = band * scale
    lap("voxels")
    k = cfg.k_neighbours
    if has_faces and cfg.mesh_edges:
        nbr, dist = mesh_neighbours(faces, inverse, i_xyz, k, contact_m=_contact_m(xyz, faces, cfg))
        if not has_mesh.all():  # items of vertices on no face: their nearest items instead
            rows = np.flatnonzero(~has_mesh)
            nbr[rows], dist[rows] = knn(i_xyz, k, radius=cfg.radius_m if cfg.radius_m > 0 else None, rows=rows)
    else:
        nbr, dist = knn(i_xyz, k, radius=cfg.radius_m if cfg.radius_m > 0 else None)
    band_nbr = nbr  # the metric neighbourhood of boundaries and the graph
    if not (has_faces and cfg.mesh_edges) and cfg.voxel_m > 0 and cfg.voxel_radius_factor > 0:
        far = dist > cfg.voxel_radius_factor * cfg.voxel_m * scale[:, None]
        far[:, :4] = False
        if far.any():
            band_nbr = np.where(far, -1, nbr).astype(np.int32)  # distances ascend: -1 stays at the end
    lap("neighbours")
    if has_mesh.all():
        curvature = surface_variation_along(i_xyz, nbr, i_mesh, band_m=band)
        i_normal = i_mesh
    else:
        pca, _ = pca_normals_curvature(i_xyz, nbr, ref_normal=i_mesh, band_m=band_i if has_mesh.any() else 0.0)
        # a second pass inside the tangent band: better normals and curvature at thin slabs
        pca, curvature = pca_normals_curvature(i_xyz, nbr, ref_normal=np.where(has_mesh[:, None], i_mesh, pca),
                                               band_m=band_i)
        i_normal = np.where(has_mesh[:, None], i_mesh, orient_normals(pca, i_xyz, viewpoint))
    if has_faces:
        point_has_mesh = _nonzero_rows(mesh_n)
        normal = mesh_n if point_has_mesh.all() else np.where(
            point_has_mesh[:, None], mesh_n, orient_normals(i_normal[inverse], xyz, viewpoint))
    else:
        normal = orient_normals(i_normal[inverse], xyz, viewpoint)
    if cfg.voxel_m > 0:  # sizes in square metres: the surface each item stands for
        # the smallest segment's area grows by scale**2: weigh each item's area down by it
        weight = item_areas(i_area, dist, has_mesh, cfg.voxel_m * scale) / scale ** 2
        min_weight, min_items = cfg.min_segment_area_m2, 1
    else:
        weight, min_weight, min_items = count.astype(np.float64), float(cfg.min_segment_points), 1
    lap("normals")
    grow_cfg = cfg
    if has_mesh.all() and not cfg.mesh_pfh and cfg.min_pfh_affinity > 0:
        grow_cfg = dataclasses.replace(cfg, min_pfh_affinity=0.0)  # no PFH test on meshes
    i_seg = _grow_and_merge(nbr, i_xyz, i_normal, i_colour.astype(np.float32), curvature, weight, min_items,
                            min_weight, grow_cfg, lap, scale)
    # items are numbered by their first point, and segments by their first item (the merge's
    # numbering): so segments are numbered by their first point too
    segment = i_seg[inverse]
    i_boundary, pairs, border = segment_graph(i_seg, band_nbr, weight=count)
    sem_boundary = _voxel_semantic_boundary(semantic, inverse, n_items, band_nbr)
    lap("graph")
    return OversegResult(
        normal=normal.astype(np.float32), curvature=curvature[inverse].astype(np.float32), segment=segment,
        boundary=i_boundary[inverse], semantic_boundary=sem_boundary, adjacency=pairs,
        adjacency_border=border, timings=timings,
    )


def item_areas(mesh_area: np.ndarray, dist: np.ndarray, has_mesh: np.ndarray, voxel_m: float | np.ndarray) -> np.ndarray:
    """The surface (square metres) each item stands for: float64 [V].

    Items pooled from mesh vertices: the vertices' share of the mesh's area. Items of a cloud:
    a disc through its nearest neighbours, pi r^2 / 7 with r the distance to the 6th nearest
    (about the spacing squared; at least `voxel_m` squared, at most 16 times that; `voxel_m` may
    be per item, the side of its cell on a range-adaptive grid), so that a
    sparse scan's far field (one point per cell) weighs by the area it samples, not by 1 voxel.
    """
    use_mesh = has_mesh & (mesh_area > 0)
    if use_mesh.all():  # a mesh's items (the common case): no disc to work out
        return np.array(mesh_area, np.float64)
    k = min(6, dist.shape[1])
    r = dist[:, k - 1].astype(np.float64)
    r = np.where(np.isfinite(r), r, 0.0)
    cloud = np.clip(np.pi * r * r / (k + 1), voxel_m ** 2, 16 * voxel_m ** 2)
    return np.where(use_mesh, mesh_area, cloud)


def _contact_m(xyz: np.ndarray, faces: np.ndarray, cfg: OversegConfig) -> float:
    """How close two pieces of a mesh must come to be linked: the boundaries' band
    (`voxel_radius_factor` voxels; on points, that many median edge lengths)."""
    if cfg.voxel_m > 0:
        return cfg.voxel_radius_factor * cfg.voxel_m
    sample = faces[:: max(1, len(faces) // 4096)]
    edge = np.linalg.norm(xyz[sample[:, 0]] - xyz[sample[:, 1]], axis=1)
    return cfg.voxel_radius_factor * float(np.median(edge)) if len(edge) else 0.0


def _grow_and_merge(nbr, xyz, normal, colour, curvature, weight, min_items: int, min_weight: float,
                    cfg: OversegConfig, lap, scale: np.ndarray) -> np.ndarray:
    """(PFH affinities,) colour smoothing, region growing and small-segment merging over a
    neighbour graph (of points or of surface voxels): int32 segment ids per item."""
    affinity = None
    if cfg.min_pfh_affinity > 0:
        counts, totals = pfh_counts(xyz, normal, nbr, k_pfh=min(cfg.k_pfh, nbr.shape[1]), bins=cfg.pfh_bins)
        affinity = edge_affinity(counts, totals, nbr)
        del counts, totals
        lap("pfh")
    if cfg.colour_smoothing:
        colour = smooth_colours(xyz, normal, colour, nbr, band_m=cfg.max_plane_offset_m * scale,
                                cutoff=cfg.max_colour_dist)
    segment = grow_regions(nbr, xyz, normal, colour, curvature, affinity, cfg=cfg, scale=scale)
    lap("grow")
    segment = merge_small_segments(segment, nbr, normal, colour, min_points=min_items,
                                   colour_scale=cfg.merge_colour_scale, weight=weight, min_weight=min_weight)
    lap("merge")
    return segment


@njit(inline="always")
def _item_semantic_span(lo, hi, sem, inverse, lo_label, hi_label, nbr, ignore, out):  # pragma: no cover - compiled
    for i in range(lo, hi):
        a = sem[i]
        if a == ignore:
            out[i] = 255
            continue
        v = inverse[i]
        if lo_label[v] != a or hi_label[v] != a:
            out[i] = 1
            continue
        for t in range(nbr.shape[1]):
            w = nbr[v, t]
            if w < 0:
                break
            if lo_label[w] <= hi_label[w] and (lo_label[w] != a or hi_label[w] != a):
                out[i] = 1
                break


@njit(cache=True)
def _item_semantic_ser(sem, inverse, lo_label, hi_label, nbr, ignore, out):  # pragma: no cover - compiled
    _item_semantic_span(0, sem.shape[0], sem, inverse, lo_label, hi_label, nbr, ignore, out)


@njit(parallel=True, cache=True)
def _item_semantic_par(sem, inverse, lo_label, hi_label, nbr, ignore, out):  # pragma: no cover - compiled
    n = sem.shape[0]
    for c in prange((n + SPAN - 1) // SPAN):
        _item_semantic_span(c * SPAN, min(n, (c + 1) * SPAN), sem, inverse, lo_label, hi_label, nbr, ignore, out)


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
    out = np.zeros(n, np.uint8)
    v_nbr = np.ascontiguousarray(v_nbr, np.int32)
    kernel = _item_semantic_par if parallel.use_parallel(n, 0) else _item_semantic_ser
    kernel(sem, inverse.astype(np.int64), lo, hi, v_nbr, schema.IGNORE_INDEX, out)
    return out
