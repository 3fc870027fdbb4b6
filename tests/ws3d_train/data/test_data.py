"""The trainer's data path: voxelisation, crop/remap consistency, the batch convention, store reads
and the deterministic, resumable loading order."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import schema
from pipeline.schema import IGNORE_INDEX
from pipeline.store import Store
from tests.conftest import TINY_CLIP_DIM, make_tiny_store
from ws3d_train.data.batch import Batch, collate
from ws3d_train.data.dataset import (
    DataConfig,
    DataError,
    ResumableBatchSampler,
    SceneDataset,
    crop_box_xy,
    make_loader,
    remap_view_csr,
    voxel_majority,
    voxelise,
)

# --- pure kernels ----------------------------------------------------------------------------


@pytest.mark.parametrize("use_rng", [False, True])
def test_voxelise_maps_every_point_to_its_voxel(use_rng: bool) -> None:
    rng = np.random.default_rng(0)
    xyz = rng.uniform(-1, 1, (2000, 3)).astype(np.float32)
    coords, origin, rep, p2v = voxelise(xyz, 0.2, np.random.default_rng(1) if use_rng else None)
    q = np.floor(xyz / 0.2).astype(np.int64) - origin
    np.testing.assert_array_equal(coords[p2v], q)
    np.testing.assert_array_equal(p2v[rep], np.arange(coords.shape[0]))
    assert coords.min() == 0
    assert len({tuple(c) for c in coords.tolist()}) == coords.shape[0]  # unique voxels
    assert [tuple(c) for c in coords.tolist()] == sorted(tuple(c) for c in coords.tolist())  # sorted by (x, y, z)
    if not use_rng:  # the representative is the first point of its voxel
        first = np.full(coords.shape[0], xyz.shape[0])
        np.minimum.at(first, p2v, np.arange(xyz.shape[0]))
        np.testing.assert_array_equal(rep, first)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_voxelise_dense_table_and_hash_table_agree_with_unique(dtype) -> None:
    """Inference's voxelisation (a dense table of the grid's cells, or a hash table where the grid
    is too large for one) gives np.unique's voxels, first points and point -> voxel map on a scan
    with many points a voxel, points exactly on voxel edges and negative coordinates."""
    from ws3d_train.data.dataset import _dense_table_fits, _voxelise_first

    rng = np.random.default_rng(4)
    size = 0.25
    on_edges = rng.integers(-8, 6, (3000, 3)) * size  # multiples of the voxel size
    xyz = np.concatenate([rng.uniform(-2, 1.5, (20000, 3)), on_edges, on_edges[:50]]).astype(dtype)
    xyz = xyz[rng.permutation(len(xyz))]
    q = np.floor(xyz / dtype(size)).astype(np.int64)
    _, rep, inverse = np.unique(q - q.min(axis=0), axis=0, return_index=True, return_inverse=True)
    assert len(rep) < len(xyz) / 3  # several points share voxels
    assert _dense_table_fits(15 * 15 * 15, len(xyz)) and not _dense_table_fits(10**9, len(xyz))
    for dense in (True, False):
        coords, origin, got_rep, p2v = _voxelise_first(xyz, size, dense=dense)
        np.testing.assert_array_equal(origin, q.min(axis=0))
        np.testing.assert_array_equal(got_rep, rep)
        np.testing.assert_array_equal(p2v, inverse.reshape(-1))
        np.testing.assert_array_equal(coords, (q - origin)[rep])
        assert p2v.dtype == np.int64 and coords.dtype == np.int32
    with pytest.raises(DataError, match="1 points with NaN"):
        voxelise(np.where(np.arange(len(xyz))[:, None] == 7, np.nan, xyz), size)
    with pytest.raises(DataError, match="2 points with NaN or infinite"):
        voxelise(np.where(np.isin(np.arange(len(xyz)), [3, 9003])[:, None], np.inf, xyz), size)


def test_voxel_majority_matches_a_loop() -> None:
    rng = np.random.default_rng(2)
    p2v = rng.integers(-1, 30, 500)
    labels = rng.choice([IGNORE_INDEX, 0, 1, 2, 5], 500)
    got = voxel_majority(p2v, labels, 31)
    for v in range(31):
        lab = labels[(p2v == v) & (labels != IGNORE_INDEX)]
        if lab.size == 0:
            assert got[v] == IGNORE_INDEX
        else:
            values, counts = np.unique(lab, return_counts=True)
            assert got[v] == values[np.argmax(counts)]  # argmax: first max = smallest label


def test_remap_view_csr_matches_sets() -> None:
    rng = np.random.default_rng(3)
    n, nv = 300, 80
    p2v = rng.integers(-1, nv, n)
    lengths = [0, 5, 120, 40, 3]
    ptr = np.concatenate([[0], np.cumsum(lengths)])
    ids = rng.integers(0, n, ptr[-1]).astype(np.int32)
    new_ptr, voxel, kept = remap_view_csr(ptr, ids, p2v, nv, min_voxels=4)
    expected = []
    for v in range(len(lengths)):
        s = sorted({int(p2v[i]) for i in ids[ptr[v] : ptr[v + 1]]} - {-1})
        if len(s) >= 4:
            expected.append((v, s))
    assert kept.tolist() == [v for v, _ in expected]
    for k, (_, s) in enumerate(expected):
        assert voxel[new_ptr[k] : new_ptr[k + 1]].tolist() == s


def test_crop_box_keeps_the_nearest_voxels() -> None:
    rng = np.random.default_rng(4)
    coords = np.unique(rng.integers(0, 60, (3000, 3)), axis=0).astype(np.int32)
    centre = np.array([20, 30, 5])
    kept = crop_box_xy(coords, 700, centre)
    assert kept.shape == (700,) and np.all(np.diff(kept) > 0)
    dist = np.abs(coords[:, :2] - centre[:2]).max(axis=1)
    dropped = np.setdiff1d(np.arange(coords.shape[0]), kept)
    assert dist[kept].max() <= dist[dropped].min()  # a box: nothing outside is nearer
    np.testing.assert_array_equal(crop_box_xy(coords, 10_000, centre), np.arange(coords.shape[0]))


# --- samples from the store --------------------------------------------------------------------


def _check_sample(sample, store: Store, voxel_size: float, min_view_voxels: int) -> None:
    scene = sample.scene_id
    segment = store.read(scene, schema.SEGMENT).astype(np.int64)
    ptr = store.read(scene, schema.VISIBLE_PTR)
    ids = store.read(scene, schema.VISIBLE_IDS)
    clip_segment = store.read(scene, schema.CLIP_SEGMENT).astype(np.float32)
    clip_view = store.read(scene, schema.CLIP_VIEW).astype(np.float32)
    nv = sample.coords.shape[0]
    p2v = sample.point_to_voxel
    kept = p2v >= 0
    # every voxel holds its points, every kept point sits in its voxel
    assert p2v.min() >= -1 and p2v.max() == nv - 1
    assert np.bincount(p2v[kept], minlength=nv).min() >= 1
    q = np.floor(sample.point_xyz / voxel_size).astype(np.int64) - sample.voxel_origin
    np.testing.assert_array_equal(sample.coords[p2v[kept]], q[kept])
    # views: the unique kept voxels of their visible points, small views dropped
    for k, v in enumerate(sample.view_orig.tolist()):
        expected = sorted(set(p2v[ids[ptr[v] : ptr[v + 1]]].tolist()) - {-1})
        assert sample.view_voxel[sample.view_ptr[k] : sample.view_ptr[k + 1]].tolist() == expected
    for v in sorted(set(range(ptr.shape[0] - 1)) - set(sample.view_orig.tolist())):
        assert len(set(p2v[ids[ptr[v] : ptr[v + 1]]].tolist()) - {-1}) < min_view_voxels
    np.testing.assert_array_equal(sample.view_target, clip_view[sample.view_orig])
    # segments: renumbered, each voxel's segment is a segment of one of its points
    assert sample.voxel_segment.min() >= 0
    voxel_seg_orig = sample.segment_orig[sample.voxel_segment]
    pairs = set(zip(p2v[kept].tolist(), segment[kept].tolist()))
    assert all((v, s) in pairs for v, s in enumerate(voxel_seg_orig.tolist()))
    np.testing.assert_array_equal(np.unique(sample.voxel_segment), np.arange(sample.segment_orig.shape[0]))
    np.testing.assert_array_equal(sample.segment_target, clip_segment[sample.segment_orig])
    has = sample.point_segment >= 0
    np.testing.assert_array_equal(sample.segment_orig[sample.point_segment[has]], segment[has])
    assert sample.feats.shape == (nv, 4) and np.abs(sample.feats[:, :3]).max() <= 0.5


@pytest.mark.parametrize("split", ["train", "val"])
def test_crop_and_remap_are_consistent(tiny_store: Path, split: str) -> None:
    cfg = DataConfig(max_voxels=900, min_view_voxels=20)
    ds = SceneDataset(tiny_store, None, cfg=cfg, split=split, seed=5)
    store = Store.open(tiny_store)
    for index in range(len(ds)):
        sample = ds[(1, index)]
        assert sample.coords.shape[0] == 900  # the tiny scenes have ~3000 voxels
        assert 0 < (sample.point_to_voxel >= 0).sum() < sample.point_to_voxel.shape[0]
        _check_sample(sample, store, ds.voxel_size, cfg.min_view_voxels)
        if split == "val":  # no augmentation outside training
            np.testing.assert_array_equal(sample.point_xyz, store.read(sample.scene_id, schema.XYZ))


def test_samples_are_a_function_of_seed_epoch_and_index(tiny_store: Path) -> None:
    ds = SceneDataset(tiny_store, None, cfg=DataConfig(max_voxels=900), seed=1)
    a, b, c = ds[(0, 1)], ds[(0, 1)], ds[(1, 1)]
    np.testing.assert_array_equal(a.point_xyz, b.point_xyz)
    np.testing.assert_array_equal(a.feats, b.feats)
    assert not np.array_equal(a.point_xyz, c.point_xyz)
    assert ds.voxel_size == pytest.approx(0.02)  # indoor default from the store


def test_batch_convention_round_trip(tiny_store: Path) -> None:
    ds = SceneDataset(tiny_store, None, cfg=DataConfig(max_voxels=700), seed=2)
    samples = [ds[(0, 0)], ds[(0, 1)]]
    batch = collate(samples).to("cpu")
    assert isinstance(batch, Batch) and batch.scene_ids == [s.scene_id for s in samples]
    assert batch.coords.dtype == torch.int32 and batch.coords.shape[1] == 4
    # column 0 is the batch index; per-scene rows split back into the samples
    for b, (coords, sample) in enumerate(zip(batch.split_voxels(batch.coords), samples)):
        assert torch.all(coords[:, 0] == b)
        np.testing.assert_array_equal(coords[:, 1:].numpy(), sample.coords)
    for values, sample in zip(batch.split_points(batch.point_semantic), samples):
        np.testing.assert_array_equal(values.numpy(), sample.point_semantic)
    # voxel -> point: each kept point lands on its voxel of its own scene
    point_batch = torch.repeat_interleave(torch.arange(2), batch.point_ptr.diff())
    voxel_coords = batch.voxel_to_point(batch.coords, fill=-1)
    kept = batch.point_to_voxel >= 0
    q = torch.floor(batch.point_xyz / ds.voxel_size).long() - batch.voxel_origin[point_batch]
    assert torch.equal(voxel_coords[kept, 0].long(), point_batch[kept])
    assert torch.equal(voxel_coords[kept, 1:].long(), q[kept])
    assert torch.all(voxel_coords[~kept] == -1)
    # global indices stay inside their scene
    entry_view = torch.repeat_interleave(torch.arange(batch.view_ptr.numel() - 1), batch.view_ptr.diff())
    assert torch.equal(batch.voxel_batch[batch.view_voxel], batch.view_batch[entry_view])
    assert torch.equal(batch.voxel_batch, batch.segment_batch[batch.voxel_segment])
    assert batch.segment_target.shape == (batch.num_segments, TINY_CLIP_DIM)
    assert batch.view_target.shape == (batch.view_ptr.numel() - 1, TINY_CLIP_DIM)
    n0 = samples[0].segment_orig.shape[0]
    np.testing.assert_array_equal(batch.segment_orig[n0:].numpy(), samples[1].segment_orig)


def test_reads_only_what_the_losses_need(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_tiny_store(tmp_path / "store", n_scenes=1, n_points=600)
    store = Store.open(path)
    scene = store.scene_ids()[0]
    # images and unused arrays gone: the trainer must not notice
    for spec in (schema.VIEW_RGB, schema.VIEW_DEPTH, schema.VIEW_POINT_INDEX, schema.NORMAL, schema.ADJACENCY):
        shutil.rmtree(store.scene_dir(scene) / spec.group / spec.name)
    seen: list[schema.ArraySpec] = []
    original = Store.read_many

    def spy(self: Store, scene_id: str, specs: list[schema.ArraySpec]) -> list[np.ndarray]:
        seen.extend(specs)
        return original(self, scene_id, specs)

    monkeypatch.setattr(Store, "read_many", spy)  # one call a scene: concurrent reads
    monkeypatch.setattr(Store, "read", lambda *a: pytest.fail("the dataset reads a scene in one read_many call"))
    ds = SceneDataset(path, None, cfg=DataConfig())
    sample = ds[0]
    assert sample.view_ptr.shape[0] > 1
    assert set(seen) == {
        schema.XYZ, schema.RGB, schema.SEMANTIC, schema.INSTANCE,
        schema.SEGMENT, schema.BOUNDARY, schema.SEMANTIC_BOUNDARY,
        schema.VISIBLE_PTR, schema.VISIBLE_IDS,
        schema.CLIP_VIEW, schema.CLIP_SEGMENT, schema.CLIP_SEGMENT_SEEN,
    }
    seen.clear()
    SceneDataset(path, None, cfg=DataConfig(groups=("overseg",)))[0]
    assert {s.group for s in seen} == {"points", "overseg"}


def test_a_damaged_store_is_a_clear_error_never_wrong_data(tmp_path: Path) -> None:
    path = make_tiny_store(tmp_path / "store", n_scenes=2, n_points=400)
    chunk = path / "scenes" / "scene0001_00" / "clip" / "segment" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: before checksums, wrong embeddings were trained on
    chunk.write_bytes(bytes(data))
    dataset = SceneDataset(path, None, cfg=DataConfig())
    assert dataset[0].segment_target.shape[0] > 0  # the sound scene loads
    with pytest.raises(DataError, match="scene0001_00.*clip/segment: chunk c/0/0 fails its crc32c checksum"):
        dataset[1]


def test_missing_stage_names_the_command(tmp_path: Path) -> None:
    path = make_tiny_store(tmp_path / "store", n_scenes=2, n_points=400)
    store = Store.open(path)
    shutil.rmtree(store.scene_dir("scene0001_00") / "clip")
    with pytest.raises(DataError, match="ws3d embed"):
        SceneDataset(path, None, cfg=DataConfig())
    # a stage that does not need CLIP targets still loads the scene
    assert SceneDataset(path, None, cfg=DataConfig(groups=("overseg", "views")))[1].view_target.shape[1] == 0
    with pytest.raises(DataError, match="not in the store"):
        SceneDataset(path, ["scene9999_00"], cfg=DataConfig())


# --- loading order --------------------------------------------------------------------------------


def test_batch_sampler_is_resumable_and_seeded() -> None:
    full = ResumableBatchSampler(7, 3, seed=4)
    stream = iter(full)
    first = [next(stream) for _ in range(6)]
    resumed = iter(ResumableBatchSampler(7, 3, seed=4, start_batch=4))
    assert [next(resumed) for _ in range(2)] == first[4:6]
    assert full.batches_per_epoch == 2
    for epoch in range(3):  # each epoch visits distinct items in its own order
        items = [i for k in (2 * epoch, 2 * epoch + 1) for e, i in full.batch(k)]
        assert len(set(items)) == 6 and {e for k in (2 * epoch, 2 * epoch + 1) for e, _ in full.batch(k)} == {epoch}
    assert full.batch(0) != full.batch(2) or full.batch(1) != full.batch(3)
    assert ResumableBatchSampler(7, 3, seed=5).batch(0) != full.batch(0) or ResumableBatchSampler(7, 3, seed=5).batch(1) != full.batch(1)
    assert ResumableBatchSampler(2, 4, seed=0).batch(0)  # fewer scenes than a batch: one batch


def test_loader_is_deterministic_across_workers(tiny_store: Path) -> None:
    ds = SceneDataset(tiny_store, None, cfg=DataConfig(max_voxels=500), seed=3)

    def take(num_workers: int, start: int) -> list[Batch]:
        it = iter(make_loader(ds, batch_size=1, seed=3, start_batch=start, num_workers=num_workers))
        return [next(it) for _ in range(3)]

    serial, parallel, resumed = take(0, 0), take(1, 0), take(0, 1)
    for a, b in zip(serial, parallel):
        assert a.scene_ids == b.scene_ids and torch.equal(a.feats, b.feats) and torch.equal(a.coords, b.coords)
    for a, b in zip(serial[1:], resumed):
        assert a.scene_ids == b.scene_ids and torch.equal(a.feats, b.feats)


def test_bench_store_read_reports_rates(tiny_store: Path) -> None:
    from ws3d_train.bench.data import bench_store_read

    result = bench_store_read(tiny_store, cfg=DataConfig(max_voxels=900))
    assert result["scenes"] == 2 and result["scenes_per_s"] > 0
    assert 0 < result["read_share"] < 1 and result["voxels_per_scene"] == 900
