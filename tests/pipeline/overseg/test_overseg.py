"""Over-segmentation: numba kernels against slow obvious versions, geometry cases, targets, store round trip."""
from __future__ import annotations

import functools
import itertools

import numba
import numpy as np
import pytest

from pipeline import schema
from pipeline.executor import ExecutorConfig, run_scenes
from pipeline.overseg.neighbours import knn, radius_csr
from pipeline.overseg.config import OversegConfig
from pipeline.overseg.features import edge_affinity, mesh_vertex_normals, pca_normals_curvature, pfh_counts, pfh_histograms
from pipeline.overseg.regions import merge_small_segments, purity, segment_graph, semantic_boundary
from pipeline.overseg.core import overseg_points
from pipeline.overseg.stage import OVERSEG
from pipeline.overseg.stage import summarise
from pipeline.store import Store
from tests.paths import SHARED_DATA



# --------------------------------------------------------------------------------------------
# scene builders
# --------------------------------------------------------------------------------------------
def _quad(origin, u, v, spacing: float, cell: float = 0.5):
    """A planar grid mesh origin + s*u + t*v; also its ScanNet-like `cell`-sized patch ids."""
    origin, u, v = (np.asarray(a, np.float64) for a in (origin, u, v))
    lu, lv = np.linalg.norm(u), np.linalg.norm(v)
    nu, nv = max(1, int(np.ceil(lu / spacing))), max(1, int(np.ceil(lv / spacing)))
    s, t = np.meshgrid(np.linspace(0, 1, nu + 1), np.linspace(0, 1, nv + 1), indexing="ij")
    xyz = origin + s.reshape(-1, 1) * u + t.reshape(-1, 1) * v
    idx = np.arange((nu + 1) * (nv + 1)).reshape(nu + 1, nv + 1)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
    cells = np.unique(np.floor(s.ravel() * lu / cell) * 1000 + np.floor(t.ravel() * lv / cell), return_inverse=True)[1]
    return xyz, faces, cells


def _assemble(parts):
    """parts: list of (xyz, faces, cells, colour, instance) -> one mesh scene with reference segments."""
    xyz, faces, rgb, inst, ref = [], [], [], [], []
    offset, ref_offset = 0, 0
    rng = np.random.default_rng(7)
    for p_xyz, p_faces, p_cells, colour, instance in parts:
        xyz.append(p_xyz)
        faces.append(p_faces + offset)
        noise = rng.normal(0, 8.0, size=(len(p_xyz), 3))
        rgb.append(np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8))
        inst.append(np.full(len(p_xyz), instance, np.int32))
        ref.append(p_cells + ref_offset)
        offset += len(p_xyz)
        ref_offset += int(p_cells.max()) + 1
    return (np.concatenate(xyz).astype(np.float32), np.concatenate(rgb), np.concatenate(faces).astype(np.int32),
            np.concatenate(inst), np.concatenate(ref))


def _box(lo, hi, spacing):
    """Five faces of an axis-aligned box (no bottom: it stands on the floor)."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    dx, dy, dz = hi - lo
    x, y, z = np.eye(3)
    return [
        _quad(lo + z * dz, x * dx, y * dy, spacing), _quad(lo, x * dx, z * dz, spacing),
        _quad(lo + y * dy, x * dx, z * dz, spacing), _quad(lo, y * dy, z * dz, spacing),
        _quad(lo + x * dx, y * dy, z * dz, spacing),
    ]


@functools.lru_cache(maxsize=None)
def _toy_scene(spacing: float = 0.02):
    """A 2 m x 2 m floor with three boxes of different colours on it (2 cm mesh, colour noise).

    Returns xyz f32 [N,3], rgb u8, faces i32, instance i32 (floor 0, boxes 1..3), semantic i16,
    reference over-segment per point (0.5 m patches of every face, like the synthetic segs.json).
    """
    parts = [(*_quad((0, 0, 0), (2, 0, 0), (0, 2, 0), spacing), (140, 140, 140), 0)]
    boxes = [((0.2, 0.2, 0), (0.7, 0.6, 0.6), (200, 60, 50)), ((1.0, 0.3, 0), (1.6, 0.9, 0.4), (50, 90, 200)),
             ((0.4, 1.2, 0), (0.7, 1.5, 0.8), (60, 170, 80))]
    for k, (lo, hi, colour) in enumerate(boxes, 1):
        parts += [(*q, colour, k) for q in _box(lo, hi, spacing)]
    xyz, rgb, faces, inst, ref = _assemble(parts)
    semantic = np.where(inst == 0, 1, 2).astype(np.int16)
    return xyz, rgb, faces, inst, semantic, ref


def _validate(result, n: int) -> None:
    """What a written overseg group must satisfy."""
    s = result.n_segments
    assert result.normal.shape == (n, 3) and np.allclose(np.linalg.norm(result.normal, axis=1), 1, atol=1e-3)
    assert result.curvature.shape == (n,) and np.all((result.curvature >= 0) & (result.curvature <= 1))
    assert result.segment.dtype == np.int32 and result.segment.shape == (n,)
    assert set(np.unique(result.segment)) == set(range(s))
    assert result.boundary.shape == (n,) and set(np.unique(result.boundary)) <= {0, 1}
    assert result.semantic_boundary.shape == (n,) and set(np.unique(result.semantic_boundary)) <= {0, 1, 255}
    pairs = result.adjacency
    assert pairs.ndim == 2 and pairs.shape[1] == 2 and len(pairs) == len(result.adjacency_border)
    if len(pairs):
        assert np.all(pairs[:, 0] < pairs[:, 1]) and pairs.min() >= 0 and pairs.max() < s
        assert len(np.unique(pairs, axis=0)) == len(pairs)
        assert np.all(result.adjacency_border >= 1)


# --------------------------------------------------------------------------------------------
# neighbours
# --------------------------------------------------------------------------------------------
def _brute_knn(xyz, k, radius=None):
    d = np.sqrt(((xyz[:, None, :] - xyz[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    if radius is not None:
        d[d > radius] = np.inf
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    dist = np.take_along_axis(d, order, axis=1)
    return np.where(np.isfinite(dist), order, -1), dist


@pytest.mark.parametrize("radius", [None, 0.15])
def test_knn_equals_brute_force(radius):
    rng = np.random.default_rng(0)
    xyz = rng.uniform(0, 1, size=(400, 3))
    index, dist = knn(xyz, 8, radius=radius)
    ref_index, ref_dist = _brute_knn(xyz, 8, radius)
    np.testing.assert_allclose(dist, ref_dist.astype(np.float32), rtol=1e-6)
    np.testing.assert_array_equal(index, ref_index)  # random data: no ties
    if radius is not None:
        assert (index == -1).any(), "the radius bound should cut some neighbourhoods short"


def test_knn_chunked_query_is_the_same():
    xyz = np.random.default_rng(6).uniform(0, 1, size=(500, 3))
    whole, chunked = knn(xyz, 7, radius=0.2), knn(xyz, 7, radius=0.2, chunk=37)
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_array_equal(whole[1], chunked[1])


def test_knn_duplicates_are_neighbours_never_self():
    rng = np.random.default_rng(1)
    xyz = rng.uniform(0, 1, size=(50, 3))
    xyz[10:14] = xyz[10]  # four copies: each has the three others at distance 0
    index, dist = knn(xyz, 5)
    assert np.all(index != np.arange(len(xyz))[:, None])
    for i in range(10, 14):
        assert set(index[i, :3]) == set(range(10, 14)) - {i} and np.all(dist[i, :3] == 0)


def test_knn_fewer_points_than_k():
    xyz = np.array([[0, 0, 0], [1, 0, 0], [0, 2, 0]], np.float32)
    index, dist = knn(xyz, 5)
    assert index.shape == (3, 5)
    np.testing.assert_array_equal(index[0], [1, 2, -1, -1, -1])
    assert np.isinf(dist[0, 2:]).all()


def test_radius_csr_equals_brute_force():
    rng = np.random.default_rng(1)
    xyz = rng.uniform(0, 1, size=(300, 3))
    ptr, ids = radius_csr(xyz, 0.12)
    d = np.sqrt(((xyz[:, None] - xyz[None]) ** 2).sum(-1))
    for i in range(len(xyz)):
        expected = np.flatnonzero((d[i] <= 0.12) & (np.arange(len(xyz)) != i))
        np.testing.assert_array_equal(ids[ptr[i]:ptr[i + 1]], expected)


# --------------------------------------------------------------------------------------------
# normals, curvature, PFH against slow versions
# --------------------------------------------------------------------------------------------
def test_mesh_normals_equal_per_face_loop():
    xyz, faces, _ = _quad((0, 0, 0), (1, 0, 0), (0, 1, 0), 0.25)
    rng = np.random.default_rng(2)
    xyz = xyz + rng.normal(0, 0.03, xyz.shape)
    slow = np.zeros_like(xyz)
    for f in faces:  # the obvious version: add each face's area-weighted normal to its corners
        n = np.cross(xyz[f[1]] - xyz[f[0]], xyz[f[2]] - xyz[f[0]])
        for v in f:
            slow[v] += n
    slow /= np.linalg.norm(slow, axis=1, keepdims=True)
    np.testing.assert_allclose(mesh_vertex_normals(xyz, faces), slow, atol=1e-12)
    assert np.all(slow[:, 2] > 0.8)  # counter-clockwise grid: normals up


def test_pca_equals_numpy_eigh():
    rng = np.random.default_rng(3)
    xyz = rng.normal(size=(300, 3)) * [1.0, 0.6, 0.05]
    nbr, _ = knn(xyz, 12)
    normal, curvature = pca_normals_curvature(xyz, nbr)
    for i in range(0, 300, 7):
        pts = xyz[np.concatenate([[i], nbr[i]])]
        w, v = np.linalg.eigh(np.cov(pts.T, bias=True))
        assert curvature[i] == pytest.approx(w[0] / w.sum(), abs=1e-9)
        if w[1] - w[0] > 1e-3 * w[2]:
            assert abs(normal[i] @ v[:, 0]) == pytest.approx(1.0, abs=1e-9)


def _pfh_slow(xyz, normal, nbr, k_pfh, bins):
    """Rusu's PFH as PCL writes it (computePairFeatures + computePFHSignature), one pair at a time."""
    out = np.zeros((len(xyz), bins ** 3), np.float32)
    for i in range(len(xyz)):
        ids = [i] + [int(j) for j in nbr[i, :k_pfh] if j >= 0]
        hist = np.zeros(bins ** 3)
        total = 0
        for a, b in itertools.combinations(range(len(ids)), 2):
            p1, n1, p2, n2 = xyz[ids[a]], normal[ids[a]], xyz[ids[b]], normal[ids[b]]
            d = p2 - p1
            f4 = np.sqrt(d @ d)
            if f4 == 0:
                continue
            angle1, angle2 = (n1 @ d) / f4, (n2 @ d) / f4
            if np.arccos(abs(angle1)) > np.arccos(abs(angle2)):  # the source is the other point
                n1, n2, d, phi = n2, n1, -d, -angle2
            else:
                phi = angle1
            v = np.cross(d, n1)
            if np.sqrt(v @ v) == 0:
                continue
            v = v / np.sqrt(v @ v)
            w = np.cross(n1, v)
            alpha = v @ n2
            theta = np.arctan2(w @ n2, n1 @ n2)
            idx = [int(np.floor(bins * ((theta + np.pi) / (2 * np.pi)))), int(np.floor(bins * ((alpha + 1) * 0.5))),
                   int(np.floor(bins * ((phi + 1) * 0.5)))]
            idx = [min(max(x, 0), bins - 1) for x in idx]
            hist[idx[0] + idx[1] * bins + idx[2] * bins * bins] += 1
            total += 1
        if total:
            out[i] = hist / total
    return out


def test_pfh_equals_slow_numpy_version():
    rng = np.random.default_rng(4)
    xyz = rng.uniform(-0.1, 0.1, size=(120, 3))
    xyz[5] = xyz[6]  # coincident pair: skipped
    normal = rng.normal(size=(120, 3))
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    xyz[8] = xyz[7] + 0.01 * normal[7]  # joining line along the source normal: degenerate frame
    normal[8] = normal[7]
    nbr, _ = knn(xyz, 10)
    fast = pfh_histograms(xyz, normal, nbr, k_pfh=6, bins=5)
    slow = _pfh_slow(xyz, normal, nbr, 6, 5)
    assert fast.shape == (120, 125) and fast.dtype == np.float32
    np.testing.assert_array_equal(fast, slow)
    np.testing.assert_allclose(fast.sum(1), 1.0, rtol=1e-6)
    # histogram intersection per edge against the obvious formula
    counts, totals = pfh_counts(xyz, normal, nbr, k_pfh=6, bins=5)
    np.testing.assert_array_equal(counts.sum(1), totals)
    aff = edge_affinity(counts, totals, nbr)
    for i in range(0, 120, 11):
        for t, j in enumerate(nbr[i]):
            assert aff[i, t] == pytest.approx(np.minimum(fast[i], fast[j]).sum(), abs=1e-6)


def test_pfh_of_a_plane_is_one_bin():
    xyz, faces, _ = _quad((0, 0, 0), (0.3, 0, 0), (0, 0.3, 0), 0.02)
    normal = np.tile([0.0, 0.0, 1.0], (len(xyz), 1))
    nbr, _ = knn(xyz, 8)
    hist = pfh_histograms(xyz, normal, nbr, k_pfh=8)
    assert np.all(hist.max(axis=1) == 1.0)  # alpha = phi = theta = 0: the centre bin
    assert np.all(hist.argmax(axis=1) == 2 + 2 * 5 + 2 * 25)


# --------------------------------------------------------------------------------------------
# growing, merging, graph
# --------------------------------------------------------------------------------------------
def _two_faces(spacing=0.02, size=0.6):
    """Two square faces meeting at a right angle along the y axis (a box edge)."""
    a = _quad((0, 0, 0), (size, 0, 0), (0, size, 0), spacing)      # floor-like, z = 0
    b = _quad((0, 0, 0), (0, size, 0), (0, 0, size), spacing)      # wall-like, x = 0
    return _assemble([(*a, (150, 150, 150), 0), (*b, (150, 150, 150), 1)])


def test_right_angle_splits_and_keeps_each_face_whole_mesh():
    xyz, rgb, faces, inst, _ = _two_faces()
    cfg = OversegConfig(max_segment_radius_m=0.0, min_segment_points=10)
    result = overseg_points(xyz, rgb, faces=faces, cfg=cfg)
    assert result.n_segments == 2
    # each face is exactly one segment, and the two differ (same colour: geometry alone splits)
    assert len(np.unique(result.segment[inst == 0])) == 1 and len(np.unique(result.segment[inst == 1])) == 1
    assert result.segment[inst == 0][0] != result.segment[inst == 1][0]
    np.testing.assert_array_equal(result.adjacency, [[0, 1]])
    assert result.boundary[inst == 0].mean() < 0.15  # only a thin band along the edge


def test_right_angle_splits_point_cloud_pca_normals():
    xyz, rgb, _, inst, _ = _two_faces()
    keep = np.ones(len(xyz), bool)
    keep[np.flatnonzero((inst == 1) & (xyz[:, 2] == 0))] = False  # the shared edge once, as a scan has it
    xyz, rgb, inst = xyz[keep], rgb[keep], inst[keep]
    cfg = OversegConfig(max_segment_radius_m=0.0, min_segment_points=10)
    result = overseg_points(xyz, rgb, cfg=cfg)
    main = [np.bincount(result.segment[inst == f]).argmax() for f in (0, 1)]
    assert main[0] != main[1]
    for f in (0, 1):
        assert np.mean(result.segment[inst == f] == main[f]) > 0.95
    assert purity(result.segment, inst) > 0.97


def test_merge_small_segment_goes_to_most_similar_neighbour():
    xyz, _, _ = _quad((0, 0, 0), (0.4, 0, 0), (0, 0.2, 0), 0.02)
    normal = np.tile([0.0, 0.0, 1.0], (len(xyz), 1))
    colour = np.where((xyz[:, 0] < 0.2)[:, None], [[200.0, 0, 0]], [[0.0, 0, 200]])
    segment = (xyz[:, 0] >= 0.2).astype(np.int64)
    small = (np.abs(xyz[:, 0] - 0.2) < 0.011) & (xyz[:, 1] < 0.05)  # straddles both sides
    segment[small] = 2
    colour[small] = [190.0, 10, 10]  # reddish: belongs with segment 0
    nbr, _ = knn(xyz, 8)
    merged = merge_small_segments(segment, nbr, normal, colour, min_points=20, colour_scale=100.0)
    assert merged.max() == 1
    assert np.all(merged[small] == merged[segment == 0][0])
    # nothing small: unchanged up to numbering
    same = merge_small_segments(segment, nbr, normal, colour, min_points=1, colour_scale=100.0)
    assert same.max() == 2


def test_segment_graph_equals_brute_force():
    rng = np.random.default_rng(5)
    xyz = rng.uniform(0, 1, (250, 3))
    segment = (xyz[:, 0] * 3).astype(np.int32) + 3 * (xyz[:, 1] > 0.5)
    nbr, _ = knn(xyz, 6)
    boundary, pairs, border = segment_graph(segment, nbr)
    expected_points: dict[tuple[int, int], set[int]] = {}
    for i in range(len(xyz)):
        for j in nbr[i]:
            a, b = int(segment[i]), int(segment[j])
            if a != b:
                expected_points.setdefault((min(a, b), max(a, b)), set()).add(i)
    assert [tuple(p) for p in pairs] == sorted(expected_points)
    assert list(border) == [len(expected_points[tuple(p)]) for p in pairs]
    slow_boundary = np.array([any(segment[j] != segment[i] for j in nbr[i]) for i in range(len(xyz))])
    np.testing.assert_array_equal(boundary.astype(bool), slow_boundary)


def test_semantic_boundary():
    xyz = np.stack([np.arange(10) * 0.1, np.zeros(10), np.zeros(10)], 1)
    nbr, _ = knn(xyz, 2)
    ign = schema.IGNORE_INDEX
    sem = np.array([0, 0, 0, 0, 1, 1, ign, 1, 1, 1])
    out = semantic_boundary(sem, nbr)
    np.testing.assert_array_equal(out, [0, 0, 0, 1, 1, 0, 255, 0, 0, 0])
    assert np.all(semantic_boundary(np.full(10, ign), nbr) == 255)
    assert np.all(semantic_boundary(None, nbr) == 255)


def test_purity():
    seg = np.array([0, 0, 0, 1, 1, 2])
    inst = np.array([5, 5, 6, 6, 6, -1])
    assert purity(seg, inst) == pytest.approx(4 / 5)
    assert np.isnan(purity(seg, np.full(6, -1)))


@pytest.mark.parametrize("n", [1, 2, 5])
def test_tiny_clouds(n):
    xyz = np.random.default_rng(n).uniform(0, 1, (n, 3)).astype(np.float32)
    result = overseg_points(xyz, np.zeros((n, 3), np.uint8))
    _validate(result, n)  # the full output contract, asserted there
    assert 1 <= result.n_segments <= n
    assert (result.semantic_boundary == 255).all()  # no labels given: unknown everywhere


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="k_pfh"):
        OversegConfig(k_neighbours=8, k_pfh=10)
    with pytest.raises(ValueError, match="max_colour_dist"):
        OversegConfig(max_colour_dist=-1.0)


# --------------------------------------------------------------------------------------------
# whole core: targets, determinism
# --------------------------------------------------------------------------------------------
def test_toy_scene_purity_and_count_within_targets():
    xyz, rgb, faces, inst, semantic, ref = _toy_scene()
    result = overseg_points(xyz, rgb, faces=faces, semantic=semantic)
    _validate(result, len(xyz))
    assert purity(result.segment, inst) >= 0.95
    ratio = result.n_segments / len(np.unique(ref))
    assert 0.5 <= ratio <= 2.0, f"{result.n_segments} segments vs {len(np.unique(ref))} reference"
    # box tops: a few segments at most (the radius cap may cut a face), none shared with the floor
    for box in (1, 2, 3):
        pts = xyz[inst == box]
        lo, hi = pts.min(axis=0) + 1e-4, pts.max(axis=0) - 1e-4  # side faces' top rows excluded
        top = ((inst == box) & (xyz[:, 2] > hi[2]) & np.all(xyz[:, :2] > lo[:2], axis=1)
               & np.all(xyz[:, :2] < hi[:2], axis=1))
        assert top.sum() > 100
        assert len(np.unique(result.segment[top])) <= 3
        assert not np.isin(result.segment[top], result.segment[inst == 0]).any()
    # the semantic boundary runs where boxes meet the floor, and only there
    sb = result.semantic_boundary
    assert set(np.unique(sb)) == {0, 1}
    assert np.all(xyz[sb == 1, 2] < 0.05)


def test_synthetic_room_within_targets():
    from pipeline.datasets.synthetic import SynthConfig, make_room

    room = make_room(3, 0, SynthConfig(room_size_m=(2.5, 3.0), min_objects=6, max_objects=7,
                                        room_edge_m=0.04, object_edge_m=0.03))
    result = overseg_points(room.xyz, room.rgb, faces=room.faces, semantic=room.semantic)
    _validate(result, len(room.xyz))
    assert purity(result.segment, room.instance) >= 0.95
    ratio = result.n_segments / len(np.unique(room.seg))
    assert 0.5 <= ratio <= 2.0, f"{result.n_segments} segments vs {len(np.unique(room.seg))} shipped"


def test_deterministic_across_runs_and_thread_counts():
    xyz, rgb, faces, inst, semantic, _ = _toy_scene(0.03)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = overseg_points(xyz, rgb, faces=faces, semantic=semantic)
        pca_one = overseg_points(xyz, rgb, semantic=semantic)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = overseg_points(xyz, rgb, faces=faces, semantic=semantic)
        pca_two = overseg_points(xyz, rgb, semantic=semantic)
        again = overseg_points(xyz, rgb, faces=faces, semantic=semantic)
    finally:
        numba.set_num_threads(before)
    for a, b in ((one, two), (two, again), (pca_one, pca_two)):
        for name in ("normal", "curvature", "segment", "boundary", "semantic_boundary", "adjacency",
                     "adjacency_border"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


# --------------------------------------------------------------------------------------------
# the runner and the store
# --------------------------------------------------------------------------------------------
def _ingested_store(tmp_path, scene_id="scene0000_00"):
    xyz, rgb, faces, inst, semantic, _ = _toy_scene(0.04)
    store = Store.create(tmp_path / "store", dataset="synthetic", class_names=["wall", "floor", "box"])
    arrays = {schema.XYZ: xyz, schema.RGB: rgb, schema.SEMANTIC: semantic, schema.INSTANCE: inst,
              schema.FACES: faces}
    store.write_stage(scene_id, "ingest", arrays,
                      {"config": {}, "config_hash": "ingest-hash-1", "stats": {"kind": "mesh"}})
    return store, xyz


def test_run_scene_round_trip_and_skip(tmp_path):
    store, xyz = _ingested_store(tmp_path)
    scene = "scene0000_00"
    cfg = OversegConfig()
    done = OVERSEG.run_scene(str(store.path), scene, cfg)
    assert done.status == "done" and done.stats["segments"] > 1 and done.stats["purity"] >= 0.95
    n = len(xyz)
    segment = store.read(scene, schema.SEGMENT)
    assert segment.dtype == np.int32 and segment.shape == (n,)
    s = int(segment.max()) + 1
    assert set(np.unique(segment)) == set(range(s))
    assert store.read(scene, schema.NORMAL).dtype == np.float16
    assert store.read(scene, schema.CURVATURE).shape == (n,)
    boundary = store.read(scene, schema.BOUNDARY)
    assert boundary.dtype == np.uint8 and 0 < boundary.mean() < 1
    assert set(np.unique(store.read(scene, schema.SEMANTIC_BOUNDARY))) <= {0, 1, 255}
    pairs, border = store.read(scene, schema.ADJACENCY), store.read(scene, schema.ADJACENCY_BORDER)
    assert pairs.shape[1] == 2 and np.all(pairs[:, 0] < pairs[:, 1]) and pairs.max() < s
    assert len(border) == len(pairs) and border.min() >= 1
    record = store.stage_record(scene, "overseg")
    assert record["stats"]["segments"] == s and record["config"]["k_neighbours"] == cfg.k_neighbours

    assert OVERSEG.run_scene(str(store.path), scene, cfg).status == "skipped"
    assert OVERSEG.run_scene(str(store.path), scene, cfg, force=True).status == "done"
    changed = OversegConfig(min_segment_points=60)
    assert OVERSEG.run_scene(str(store.path), scene, changed).status == "done"
    assert OVERSEG.run_scene(str(store.path), scene, changed).status == "skipped"

    info = summarise(Store.open(store.path))
    assert info["scenes"] == 1 and info["segments_total"] == store.stage_record(scene, "overseg")["stats"]["segments"]
    assert info["purity_mean"] >= 0.95


def test_run_scene_through_executor_and_missing_scene(tmp_path):
    store, _ = _ingested_store(tmp_path)
    fn = functools.partial(OVERSEG.run_scene, str(store.path), cfg=OversegConfig())
    report = run_scenes("overseg", fn, ["scene0000_00", "scene9999_00"],
                        ExecutorConfig(kind="sync"), progress=False)
    status = {r.scene_id: r for r in report.results}
    assert status["scene0000_00"].status == "done"
    assert status["scene9999_00"].status == "failed" and "not ingested" in status["scene9999_00"].error


def test_lidar_scene_normals_face_the_sensor(tmp_path):
    # a ground plane and a wall seen from a sensor at the origin: PCA normals must face it
    ground, _, _ = _quad((-2, -2, -1.5), (4, 0, 0), (0, 4, 0), 0.05)
    wall, _, _ = _quad((3, -2, -1.5), (0, 4, 0), (0, 0, 3), 0.05)
    xyz = np.concatenate([ground, wall]).astype(np.float32)
    n = len(xyz)
    store = Store.create(tmp_path / "store", dataset="semantickitti", class_names=["road", "building"])
    store.write_stage("seq08_000000", "ingest", {
        schema.XYZ: xyz, schema.RGB: np.full((n, 3), 90, np.uint8),
        schema.SEMANTIC: np.full(n, schema.IGNORE_INDEX, np.int16), schema.INSTANCE: np.full(n, -1, np.int32),
    }, {"config": {}, "config_hash": "h", "stats": {"kind": "lidar", "sensor_origin": [0.0, 0.0, 0.0]}})
    result = OVERSEG.run_scene(str(store.path), "seq08_000000", OversegConfig())
    assert result.status == "done" and result.stats["normals"] == "pca" and "purity" not in result.stats
    normal = store.read("seq08_000000", schema.NORMAL).astype(np.float64)
    assert np.all(np.einsum("ij,ij->i", normal, -xyz) > 0)
    assert np.all(store.read("seq08_000000", schema.SEMANTIC_BOUNDARY) == 255)


def test_real_s3dis_sample_runs_and_validates():
    room = SHARED_DATA / "s3dis" / "Area_1" / "office_2" / "office_2.txt"
    if not room.is_file():
        pytest.skip(f"real S3DIS sample not found at {room} (../shared/data absent on this machine)")
    data = np.loadtxt(room, dtype=np.float64)
    xyz, rgb = data[:, :3].astype(np.float32), data[:, 3:6].astype(np.uint8)
    result = overseg_points(xyz, rgb, cfg=OversegConfig(min_segment_points=5))
    _validate(result, len(xyz))
    assert np.all(result.semantic_boundary == 255)  # no labels given
    assert 1 <= result.n_segments <= len(xyz)


# --------------------------------------------------------------------------------------------
# density invariance and the real sample
# --------------------------------------------------------------------------------------------
def test_density_sweep_gives_about_the_same_segments():
    """The same surface as a mesh and as 4x / 12x denser clouds: counts within 1.5x, pure."""
    from pipeline.overseg.scan_stats import sample_mesh_surface
    from pipeline.datasets.synthetic import SynthConfig, make_room

    room = make_room(3, 0, SynthConfig(room_size_m=(2.0, 2.5), min_objects=5, max_objects=6,
                                        room_edge_m=0.04, object_edge_m=0.03))
    counts, purities = [], []
    for mult in (1, 4, 12):
        if mult == 1:
            xyz, rgb, inst, faces = room.xyz, room.rgb, room.instance, room.faces
        else:
            xyz, rgb, (inst,) = sample_mesh_surface(room.xyz, room.rgb, room.faces, mult * len(room.xyz),
                                                    labels=(room.instance,), seed=mult)
            faces = None
        result = overseg_points(xyz, rgb, faces=faces)
        counts.append(result.n_segments)
        purities.append(purity(result.segment, inst))
    assert max(counts) <= 1.5 * min(counts), counts
    assert min(purities) >= 0.96, purities


def test_surface_voxels_keep_the_two_sides_of_a_thin_slab_apart():
    from pipeline.overseg.core import surface_voxels

    top = np.stack(np.meshgrid(np.arange(0, 0.2, 0.01), np.arange(0, 0.2, 0.01), [0.015]), -1).reshape(-1, 3)
    bottom = top - [0, 0, 0.01]  # 1 cm below: the same 2 cm cells
    xyz = np.concatenate([top, bottom])
    normal = np.concatenate([np.tile([0, 0, 1.0], (len(top), 1)), np.tile([0, 0, -1.0], (len(top), 1))])
    inverse, first = surface_voxels(xyz, normal, 0.02)
    assert not np.isin(inverse[: len(top)], inverse[len(top):]).any()
    assert len(first) == inverse.max() + 1 and (inverse[first] == np.arange(len(first))).all()


REAL_SCAN = SHARED_DATA / "scannet"


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_SCAN / "scans" / "scene0470_00").is_dir(),
                    reason=f"real ScanNet sample absent ({REAL_SCAN}/scans/scene0470_00)")
def test_real_scan_purity_and_density_sweep():
    """The real sample has semantics only (labels PLY): purity is measured against them."""
    from pipeline.datasets import scannet
    from pipeline.overseg.scan_stats import felzenszwalb_mesh_segments, sample_mesh_surface

    scene = scannet.read_scene(REAL_SCAN, "scene0470_00")
    sem = np.where(scene.semantic >= 0, scene.semantic, -1)
    reference = int(felzenszwalb_mesh_segments(scene.xyz, scene.faces).max()) + 1
    mesh = overseg_points(scene.xyz, scene.rgb, faces=scene.faces)
    assert purity(mesh.segment, sem) >= 0.96
    assert 0.5 <= mesh.n_segments / reference <= 1.5, (mesh.n_segments, reference)
    xyz, rgb, (sem12,) = sample_mesh_surface(scene.xyz, scene.rgb, scene.faces, 12 * len(scene.xyz), labels=(sem,))
    dense = overseg_points(xyz, rgb)
    assert dense.n_segments <= 1.5 * mesh.n_segments and purity(dense.segment, sem12) >= 0.96


# --------------------------------------------------------------------------------------------
# mesh-edge neighbourhoods (issue 24, item 4) against obvious versions and the kNN path
# --------------------------------------------------------------------------------------------
def _edge_oracle(faces, item):
    """Each item's set of items that a face edge links (pure Python)."""
    links = {}
    for f in np.asarray(faces):
        a, b, c = (int(item[v]) for v in f)
        for p, q in ((a, b), (b, c), (c, a)):
            if p != q:
                links.setdefault(p, set()).add(q)
                links.setdefault(q, set()).add(p)
    return links


@pytest.mark.parametrize("voxel_m", [0.0, 0.05])
def test_mesh_neighbours_are_the_face_edges(voxel_m):
    from pipeline.overseg.core import surface_voxels
    from pipeline.overseg.neighbours import mesh_neighbours

    xyz, faces, _ = _quad((0, 0, 0), (1, 0, 0), (0, 0.6, 0), 0.02)
    xyz = xyz + np.random.default_rng(5).normal(0, 0.002, xyz.shape)
    if voxel_m:
        item, _ = surface_voxels(xyz, mesh_vertex_normals(xyz, faces), voxel_m)
    else:
        item = np.arange(len(xyz))
    n_items = int(item.max()) + 1
    pos = np.stack([np.bincount(item, weights=xyz[:, d]) for d in range(3)], 1) / np.bincount(item)[:, None]
    k = 12
    index, dist = mesh_neighbours(faces, item, pos, k)
    oracle = _edge_oracle(faces, item)
    for v in range(n_items):
        row = index[v][index[v] >= 0]
        assert np.all(index[v][len(row):] == -1) and np.all(np.isinf(dist[v][len(row):]))
        want = oracle.get(v, set())
        if len(want) <= k:
            assert set(row.tolist()) == want
        else:  # the k nearest of the linked items
            near = sorted(want, key=lambda j: (np.linalg.norm(pos[j] - pos[v]), j))[:k]
            assert set(row.tolist()) == set(near)
        np.testing.assert_allclose(dist[v][: len(row)], np.linalg.norm(pos[row] - pos[v], axis=1), rtol=1e-6)
    # on a mesh the edge neighbours are among the nearest items: the kNN search is an oracle for them
    knn_index, _ = knn(pos, 16)
    inside = [np.isin(index[v][index[v] >= 0], knn_index[v]).mean() for v in range(n_items)]
    assert np.mean(inside) > 0.97


@pytest.mark.parametrize("side", [1.0, 3.0])
def test_mesh_neighbours_link_separate_pieces_within_contact(side):
    """Against a k-d tree per piece; a 3 m floor also has stretches far from the lid, where the
    search skips whole blocks of cells (its coarse grid) and must add nothing."""
    from pipeline.overseg.neighbours import CONTACTS, mesh_neighbours
    from scipy.spatial import cKDTree

    floor = _quad((0, 0, 0), (side, 0, 0), (0, side, 0), 0.05)
    lid = _quad((0.3, 0.3, 0.03), (0.4, 0, 0), (0, 0.4, 0), 0.05)  # a separate piece 3 cm above
    xyz = np.concatenate([floor[0], lid[0]])
    xyz = xyz + np.random.default_rng(6).normal(0, 0.003, xyz.shape)  # no ties in distance
    faces = np.concatenate([floor[1], lid[1] + len(floor[0])])
    piece = np.repeat([0, 1], [len(floor[0]), len(lid[0])])
    k, contact = 16, 0.06
    plain, _ = mesh_neighbours(faces, np.arange(len(xyz)), xyz, k)
    index, dist = mesh_neighbours(faces, np.arange(len(xyz)), xyz, k, contact_m=contact)
    trees = [cKDTree(xyz[piece == p]) for p in (0, 1)]
    ids = [np.flatnonzero(piece == p) for p in (0, 1)]
    added = 0
    for v in range(len(xyz)):
        edges = plain[v][plain[v] >= 0]
        np.testing.assert_array_equal(index[v][: len(edges)], edges)  # mesh links first, unchanged
        extra = index[v][len(edges):]
        extra = extra[extra >= 0]
        assert np.all(piece[extra] != piece[v])
        other = 1 - piece[v]
        d, j = trees[other].query(xyz[v], k=CONTACTS, distance_upper_bound=contact)
        want = ids[other][j[np.isfinite(d)]][: k - len(edges)]
        assert set(extra.tolist()) == set(want.tolist())
        added += len(extra)
    assert added > 0


def test_mesh_edges_match_the_knn_path_on_the_toy_scene():
    """The mesh-edge graph (no search) against the k-nearest graph of the same mesh (the oracle):
    about as many segments, as pure."""
    xyz, rgb, faces, inst, semantic, _ = _toy_scene()
    edges = overseg_points(xyz, rgb, faces=faces, semantic=semantic)
    near = overseg_points(xyz, rgb, faces=faces, semantic=semantic, cfg=OversegConfig(mesh_edges=False))
    _validate(edges, len(xyz))
    assert purity(edges.segment, inst) >= 0.95 and purity(near.segment, inst) >= 0.95
    assert 0.67 <= edges.n_segments / near.n_segments <= 1.5, (edges.n_segments, near.n_segments)
    np.testing.assert_array_equal(edges.normal, near.normal)  # both take the mesh's normals


def test_surface_variation_along_the_pca_normal_is_the_pca_curvature():
    from pipeline.overseg.features import surface_variation_along

    rng = np.random.default_rng(8)
    xyz = rng.normal(size=(400, 3)) * [1.0, 0.7, 0.04]
    nbr, _ = knn(xyz, 12)
    normal, curvature = pca_normals_curvature(xyz, nbr)
    np.testing.assert_allclose(surface_variation_along(xyz, nbr, normal, band_m=0.0), curvature, atol=1e-9)
    # any other direction gives at least the smallest eigenvalue's share
    tilted = normal + rng.normal(0, 0.2, normal.shape)
    tilted /= np.linalg.norm(tilted, axis=1, keepdims=True)
    assert np.all(surface_variation_along(xyz, nbr, tilted, band_m=0.0) >= curvature - 1e-9)


def test_parallel_kernels_equal_serial_ones(monkeypatch):
    """The parallel drivers (rooms of a million items and more) give the serial drivers' results."""
    from pipeline import parallel

    xyz, rgb, faces, inst, semantic, _ = _toy_scene(0.03)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        serial = [overseg_points(xyz, rgb, faces=faces, semantic=semantic), overseg_points(xyz, rgb, semantic=semantic)]
        monkeypatch.setattr(parallel, "PARALLEL_MIN_ITEMS", 0)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        par = [overseg_points(xyz, rgb, faces=faces, semantic=semantic), overseg_points(xyz, rgb, semantic=semantic)]
    finally:
        numba.set_num_threads(before)
    for a, b in zip(serial, par):
        for name in ("normal", "curvature", "segment", "boundary", "semantic_boundary", "adjacency",
                     "adjacency_border"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_density_sweep_on_several_synthetic_rooms(seed):
    """Full-size synthetic rooms with scanner effects as a mesh and as 1x/4x/12x clouds: every
    cloud within 2x of the mesh's count, purity >= 0.95 against the instances."""
    from pipeline.datasets.synthetic import SynthConfig, make_room
    from pipeline.overseg.scan_stats import sample_mesh_surface

    room = make_room(seed, 0, SynthConfig())
    mesh = overseg_points(room.xyz, room.rgb, faces=room.faces)
    assert purity(mesh.segment, room.instance) >= 0.95
    for mult in (1, 4, 12):
        xyz, rgb, (inst,) = sample_mesh_surface(room.xyz, room.rgb, room.faces, mult * len(room.xyz),
                                                labels=(room.instance,), seed=mult)
        cloud = overseg_points(xyz, rgb)
        assert 0.5 <= cloud.n_segments / mesh.n_segments <= 2.0, (mult, cloud.n_segments, mesh.n_segments)
        assert purity(cloud.segment, inst) >= 0.95, mult


# --------------------------------------------------------------------------------------------
# LiDAR: cells and thresholds that grow with the range from the sensor
# --------------------------------------------------------------------------------------------
def test_range_levels_grow_with_the_distance_from_the_sensor():
    from pipeline.overseg.core import range_levels, surface_voxels

    xyz = np.array([[0.5, 0, 0], [3.0, 0, 0], [10.0, 0, 0], [40.0, 0, 0], [1e6, 0, 0]])
    level = range_levels(xyz, np.zeros(3), 0.02, 0.012)
    # the first 0.02 * 2**L >= 0.012 r: r=0.5 -> 0, 3 -> 1 (0.04 >= 0.036), 10 -> 3, 40 -> 5; capped at 15
    np.testing.assert_array_equal(level, [0, 1, 3, 5, 15])
    # a point pooled at level L shares a cell with a point 2**L * 0.02 * 0.9 away on that level only
    pts = np.array([[10.0, 0.01, 0.01], [10.0, 0.01 + 0.9 * 0.16, 0.01]])
    same, _ = surface_voxels(pts, np.zeros_like(pts), 0.02, np.array([3, 3]))
    apart, _ = surface_voxels(pts, np.zeros_like(pts), 0.02, np.array([0, 0]))
    mixed, _ = surface_voxels(pts, np.zeros_like(pts), 0.02, np.array([3, 2]))
    assert same[0] == same[1] and apart[0] != apart[1] and mixed[0] != mixed[1]


def test_range_scale_leaves_rooms_and_meshes_alone():
    """Without a viewpoint (rooms) and on meshes, `range_scale` changes nothing."""
    xyz, rgb, faces, _, _, _ = _toy_scene()
    for f in (faces, None):
        base = overseg_points(xyz, rgb, faces=f, cfg=OversegConfig(range_scale=0.0))
        ranged = overseg_points(xyz, rgb, faces=f, cfg=OversegConfig(range_scale=0.05))
        np.testing.assert_array_equal(base.segment, ranged.segment)
    viewpoint = xyz.mean(axis=0)
    base = overseg_points(xyz, rgb, faces=faces, viewpoint=viewpoint, cfg=OversegConfig(range_scale=0.0))
    ranged = overseg_points(xyz, rgb, faces=faces, viewpoint=viewpoint, cfg=OversegConfig(range_scale=0.05))
    np.testing.assert_array_equal(base.segment, ranged.segment)


def _lidar_density_sweep(xyz, rgb, truth, viewpoint, cfg=None):
    cfg = cfg or OversegConfig()
    counts, purities = [], []
    for frac in (1, 2, 4):
        keep = np.sort(np.random.default_rng(frac).permutation(len(xyz))[: len(xyz) // frac])
        result = overseg_points(xyz[keep], rgb[keep], viewpoint=viewpoint, cfg=cfg)
        counts.append(result.n_segments)
        purities.append(purity(result.segment, truth[keep]))
    return counts, purities


def test_lidar_density_sweep_keeps_counts_and_purity():
    """A ray-cast street sweep and its half and quarter: counts within 1.5x, purity within 0.02
    of the full sweep's; without range-adaptive cells the far field splits with the density."""
    from pipeline.overseg.scan_stats import synthetic_lidar_sweep

    xyz, rgb, inst = synthetic_lidar_sweep(3, columns=1024)
    counts, purities = _lidar_density_sweep(xyz, rgb, inst, np.zeros(3))
    assert max(counts) <= 1.5 * min(counts), counts
    assert min(purities) >= purities[0] - 0.02 and purities[0] >= 0.98, purities
    plain, _ = _lidar_density_sweep(xyz, rgb, inst, np.zeros(3), OversegConfig(range_scale=0.0))
    assert plain[0] / plain[2] > counts[0] / counts[2], (plain, counts)


REAL_LIDAR = SHARED_DATA / "semantickitti" / "sequences" / "08"


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_LIDAR / "velodyne" / "000000.bin").is_file(),
                    reason=f"real SemanticKITTI sample absent ({REAL_LIDAR})")
def test_real_lidar_density_sweep():
    """The real SemanticKITTI sweep (sensor at the origin): all / half / quarter of its points
    within 2x of each other at purity within 0.02 of the full sweep's (against instances)."""
    pts = np.fromfile(REAL_LIDAR / "velodyne" / "000000.bin", np.float32).reshape(-1, 4)
    lab = np.fromfile(REAL_LIDAR / "labels" / "000000.label", np.uint32)
    sem, ins = (lab & 0xFFFF).astype(np.int64), (lab >> 16).astype(np.int64)
    truth = np.where(sem == 0, -1, sem * 100000 + ins)
    rgb = np.repeat(np.clip(pts[:, 3:4] * 255, 0, 255).astype(np.uint8), 3, axis=1)
    counts, purities = _lidar_density_sweep(pts[:, :3], rgb, truth, np.zeros(3))
    assert max(counts) <= 2.0 * min(counts), counts
    assert min(purities) >= purities[0] - 0.02 and purities[0] >= 0.93, purities
