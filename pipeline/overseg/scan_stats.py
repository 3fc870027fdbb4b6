"""Statistics that tell a scanned mesh from a clean one: edge lengths, normal noise, curvature.

Pure functions over arrays (no I/O). `make bench` compares a synthetic room with the real ScanNet
sample through `mesh_statistics`, so that the generator's scanner effects (`pipeline.datasets.synthetic`) can
be checked against what a real scan has.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit
from scipy.spatial import cKDTree


def face_normals(xyz: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit normals float64 [F, 3] and areas float64 [F] of triangles (zero normal if degenerate)."""
    v = np.asarray(xyz, np.float64)
    f = np.asarray(faces, np.int64)
    cross = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    norm = np.linalg.norm(cross, axis=1)
    return cross / np.maximum(norm, 1e-18)[:, None], 0.5 * norm


def dihedral_angles_deg(xyz: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Angle (degrees) between the normals of every pair of triangles sharing an edge, float [E].

    On a flat surface it is 0 for a clean mesh; a scan's noise makes it a few degrees, so its
    median over a room (mostly flat) measures the normal noise.
    """
    f = np.asarray(faces, np.int64)
    n_faces = len(f)
    if n_faces < 2:
        return np.zeros(0)
    a = np.concatenate([f[:, 0], f[:, 1], f[:, 2]])
    b = np.concatenate([f[:, 1], f[:, 2], f[:, 0]])
    key = np.minimum(a, b) * (int(f.max()) + 1) + np.maximum(a, b)
    owner = np.tile(np.arange(n_faces), 3)
    order = np.argsort(key, kind="stable")
    key, owner = key[order], owner[order]
    same = np.flatnonzero(key[1:] == key[:-1])  # consecutive equal keys: faces sharing the edge
    normal, _ = face_normals(xyz, faces)
    cos = np.einsum("ij,ij->i", normal[owner[same]], normal[owner[same + 1]])
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def surface_variation(xyz: np.ndarray, radius_m: float = 0.05, *, sample: int = 20_000,
                      seed: int = 0) -> np.ndarray:
    """PCA surface variation l0 / (l0 + l1 + l2) within `radius_m` of sampled points, float [S].

    A metric neighbourhood, so that meshes of different densities compare; points with fewer
    than 4 neighbours are skipped.
    """
    xyz = np.asarray(xyz, np.float64)
    rng = np.random.default_rng(seed)
    ids = rng.choice(len(xyz), size=min(sample, len(xyz)), replace=False)
    tree = cKDTree(xyz)
    out = []
    for nbrs in tree.query_ball_point(xyz[ids], r=radius_m, workers=-1):
        if len(nbrs) < 4:
            continue
        p = xyz[nbrs]
        p = p - p.mean(0)
        ev = np.linalg.eigvalsh(p.T @ p)
        total = float(ev.sum())
        out.append(ev[0] / total if total > 0 else 0.0)
    return np.asarray(out)


def mesh_statistics(xyz: np.ndarray, faces: np.ndarray, *, curvature_radius_m: float = 0.05) -> dict[str, Any]:
    """Edge-length, normal-noise and curvature figures of a triangle mesh (JSON-safe dict).

    Keys: vertices, triangles, area_m2, vertices_per_m2; edge_m_{p10,p50,p90} and edge_cv
    (std / mean: uneven triangles of a decimated mesh make it large); dihedral_deg_{p50,p90}
    (normal noise); curvature_{p50,p90} and curvature_above_0.02 (share of points, radius
    `curvature_radius_m`).
    """
    xyz = np.asarray(xyz, np.float64)
    f = np.asarray(faces, np.int64)
    edges = np.concatenate([np.linalg.norm(xyz[f[:, i]] - xyz[f[:, (i + 1) % 3]], axis=1) for i in range(3)])
    _, area = face_normals(xyz, f)
    dihedral = dihedral_angles_deg(xyz, f)
    curv = surface_variation(xyz, curvature_radius_m)
    total_area = float(area.sum())

    def pct(a: np.ndarray, q: float) -> float:
        return round(float(np.percentile(a, q)), 5) if len(a) else float("nan")

    return {
        "vertices": int(len(xyz)), "triangles": int(len(f)), "area_m2": round(total_area, 2),
        "vertices_per_m2": round(len(xyz) / max(total_area, 1e-9), 1),
        "edge_m_p10": pct(edges, 10), "edge_m_p50": pct(edges, 50), "edge_m_p90": pct(edges, 90),
        "edge_cv": round(float(edges.std() / max(edges.mean(), 1e-12)), 4),
        "dihedral_deg_p50": pct(dihedral, 50), "dihedral_deg_p90": pct(dihedral, 90),
        "curvature_p50": pct(curv, 50), "curvature_p90": pct(curv, 90),
        "curvature_above_0.02": round(float((curv > 0.02).mean()), 4) if len(curv) else float("nan"),
    }


def sample_mesh_surface(xyz: np.ndarray, rgb: np.ndarray, faces: np.ndarray, n_points: int, *,
                        labels: tuple[np.ndarray, ...] = (), seed: int = 0) -> tuple[np.ndarray, np.ndarray, tuple]:
    """A point cloud of the mesh's surface: `n_points` uniform (area-weighted) samples.

    What a denser scanner (S3DIS density) records of the same surface; the density sweep of
    `make bench` and the tests over-segment it. Colours are the barycentric blend of the hit
    triangle's vertex colours; each of `labels` (per-vertex int arrays) is taken from the
    triangle's corner nearest to the sample.

    Returns:
        xyz float32 [n, 3], rgb uint8 [n, 3], and the labels per sample (a tuple like `labels`).
    """
    v = np.asarray(xyz, np.float64)
    f = np.asarray(faces, np.int64)
    _, area = face_normals(v, f)
    rng = np.random.default_rng(seed)
    tri = rng.choice(len(f), size=n_points, p=area / area.sum())
    r1, r2 = rng.random(n_points), rng.random(n_points)
    s = np.sqrt(r1)
    bary = np.stack([1 - s, s * (1 - r2), s * r2], axis=1)  # uniform on the triangle
    corners = f[tri]
    pts = np.einsum("nk,nkd->nd", bary, v[corners])
    col = np.einsum("nk,nkd->nd", bary, np.asarray(rgb, np.float64)[corners])
    # the corner nearest in space (the largest barycentric weight is not, on uneven triangles)
    dist = np.linalg.norm(v[corners] - pts[:, None, :], axis=2)
    nearest = corners[np.arange(n_points), np.argmin(dist, axis=1)]
    return (pts.astype(np.float32), np.clip(col + 0.5, 0, 255).astype(np.uint8),
            tuple(np.asarray(lab)[nearest] for lab in labels))


@njit(cache=True)
def _fh_find(parent, a):  # pragma: no cover - compiled
    root = a
    while parent[root] != root:
        root = parent[root]
    while parent[a] != root:
        nxt = parent[a]
        parent[a] = root
        a = nxt
    return root


@njit(cache=True)
def _fh_kernel(n, ea, eb, w, k_thresh, min_verts):  # pragma: no cover - compiled
    parent = np.arange(n)
    size = np.ones(n, np.int64)
    thresh = np.full(n, k_thresh)
    for e in range(ea.shape[0]):  # edges in ascending weight
        a = _fh_find(parent, ea[e])
        b = _fh_find(parent, eb[e])
        if a != b and w[e] <= thresh[a] and w[e] <= thresh[b]:
            if size[a] < size[b]:
                a, b = b, a
            parent[b] = a
            size[a] += size[b]
            thresh[a] = w[e] + k_thresh / size[a]
    for e in range(ea.shape[0]):  # then small components join a neighbour
        a = _fh_find(parent, ea[e])
        b = _fh_find(parent, eb[e])
        if a != b and (size[a] < min_verts or size[b] < min_verts):
            if size[a] < size[b]:
                a, b = b, a
            parent[b] = a
            size[a] += size[b]
    out = np.empty(n, np.int64)
    for i in range(n):
        out[i] = _fh_find(parent, i)
    return out


def felzenszwalb_mesh_segments(xyz: np.ndarray, faces: np.ndarray, *, k_thresh: float = 0.01,
                               min_verts: int = 20) -> np.ndarray:
    """Graph-based mesh over-segmentation in the manner of ScanNet's Segmentator (the tool that
    made the `_vh_clean_2.0.010000.segs.json` files: Felzenszwalb-Huttenlocher on the mesh's
    edges, weight 1 - n_a . n_b, squared on convex edges, kThresh 0.01, segMinVerts 20).

    A re-implementation from the published description, used as the reference segment count
    where a scan ships no segs.json (the real sample here). Returns int64 [N] ids 0..S-1.
    """
    v = np.asarray(xyz, np.float64)
    f = np.asarray(faces, np.int64)
    fn, area = face_normals(v, f)
    vn = np.zeros_like(v)
    for k in range(3):
        np.add.at(vn, f[:, k], fn * area[:, None])
    vn /= np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-12)
    a = np.concatenate([f[:, 0], f[:, 1], f[:, 2]])
    b = np.concatenate([f[:, 1], f[:, 2], f[:, 0]])
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    key = np.unique(lo * len(v) + hi)
    ea, eb = key // len(v), key % len(v)
    w = 1.0 - np.einsum("ij,ij->i", vn[ea], vn[eb])
    convex = np.einsum("ij,ij->i", vn[ea], v[eb] - v[ea]) < 0  # b lies below a's tangent plane
    w = np.where(convex, w * w, w)
    order = np.argsort(w, kind="stable")
    root = _fh_kernel(len(v), ea[order], eb[order], w[order], float(k_thresh), int(min_verts))
    _, ids = np.unique(root, return_inverse=True)
    return ids.astype(np.int64)


def synthetic_lidar_sweep(seed: int = 0, *, rings: int = 64, columns: int = 2048, height_m: float = 1.73,
                          noise_m: float = 0.01, max_range_m: float = 80.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A spinning-LiDAR sweep of a street-like scene, ray-cast analytically (no mesh, no I/O).

    The sensor (at the origin, `height_m` above a flat ground) has `rings` beams from -24.9 to
    +2 degrees of elevation (an HDL-64's span) and `columns` azimuth steps; the scene is the
    ground, parked cars (boxes), two building rows (long boxes) and poles (vertical cylinders),
    placed from `seed`. Each beam keeps its nearest hit within `max_range_m`, with Gaussian range
    noise `noise_m`. What the LiDAR density sweeps of the tests and `ws3d bench overseg` cut.

    Returns:
        xyz float32 [N, 3] (sensor at the origin), intensity-like grey rgb uint8 [N, 3]
        (per object), instance int64 [N] (0 = ground, one id per object).
    """
    rng = np.random.default_rng(seed)
    ground = -height_m
    boxes = []  # (lo, hi)
    for side in (-1, 1):  # building rows along x, set back from the street
        y0 = side * rng.uniform(9.0, 14.0)
        x = -70.0
        while x < 70.0:
            w = rng.uniform(8.0, 25.0)
            depth, h = rng.uniform(6.0, 12.0), rng.uniform(5.0, 15.0)
            lo = (x, y0 if side > 0 else y0 - depth, ground)
            boxes.append((lo, (x + w, lo[1] + depth, ground + h)))
            x += w + rng.uniform(1.0, 6.0)
    for _ in range(int(rng.integers(10, 18))):  # cars along the kerbs
        side = rng.choice([-1, 1])
        cx, cy = rng.uniform(-45.0, 45.0), side * rng.uniform(3.5, 6.0)
        if abs(cx) < 3.0 and abs(cy) < 3.0:
            continue
        length, width, h = rng.uniform(3.8, 4.8), rng.uniform(1.6, 1.9), rng.uniform(1.3, 1.7)
        boxes.append(((cx - length / 2, cy - width / 2, ground + 0.15), (cx + length / 2, cy + width / 2, ground + 0.15 + h)))
    poles = [(rng.uniform(-50.0, 50.0), rng.choice([-1, 1]) * rng.uniform(6.5, 8.0), rng.uniform(0.08, 0.3),
              rng.uniform(3.0, 7.0)) for _ in range(int(rng.integers(6, 12)))]
    elev = np.deg2rad(np.linspace(-24.9, 2.0, rings))
    azim = np.arange(columns) * (2 * np.pi / columns) + rng.uniform(0, 2 * np.pi / columns)
    el, az = np.meshgrid(elev, azim, indexing="ij")
    d = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1).reshape(-1, 3)
    best = np.full(len(d), np.inf)
    owner = np.full(len(d), -1, np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(d[:, 2] < 0, ground / d[:, 2], np.inf)  # the ground plane
        hit = t < best
        best[hit], owner[hit] = t[hit], 0
        inv = 1.0 / d
        for b, (lo, hi) in enumerate(boxes):  # slab method
            t0, t1 = np.asarray(lo) * inv, np.asarray(hi) * inv
            near = np.minimum(t0, t1).max(axis=1)
            far = np.maximum(t0, t1).min(axis=1)
            hit = (near <= far) & (near > 0) & (near < best)
            best[hit], owner[hit] = near[hit], 1 + b
        for p, (px, py, radius, h) in enumerate(poles):  # |o + t d - c|_xy = r
            a = d[:, 0] ** 2 + d[:, 1] ** 2
            bq = -2 * (d[:, 0] * px + d[:, 1] * py)
            c = px * px + py * py - radius * radius
            disc = bq * bq - 4 * a * c
            t = (-bq - np.sqrt(np.maximum(disc, 0))) / (2 * a)
            z = t * d[:, 2]
            hit = (disc > 0) & (t > 0) & (t < best) & (z >= ground) & (z <= ground + h)
            best[hit], owner[hit] = t[hit], 1 + len(boxes) + p
    keep = np.isfinite(best) & (best <= max_range_m)
    r = best[keep] + rng.normal(0.0, noise_m, int(keep.sum()))
    xyz = (d[keep] * r[:, None]).astype(np.float32)
    inst = owner[keep]
    grey = rng.integers(40, 220, 2 + len(boxes) + len(poles)).astype(np.float64)
    rgb = np.repeat(np.clip(grey[inst] + rng.normal(0.0, 8.0, len(inst)), 0, 255)[:, None], 3, axis=1).astype(np.uint8)
    return xyz, rgb, inst
