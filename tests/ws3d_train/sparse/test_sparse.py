"""Oracle tests of the sparse backends against dense ``nn.Conv3d`` / ``nn.ConvTranspose3d``.

Every backend that can run here gets the same random sparse inputs on a small grid; the dense
convolution holds the same weights; forward values and gradients (features and weights) must agree
at the active sites. torch and spconv (its CPU build, installed by ``make install``) run on the CPU
in the default run; the CUDA cases (torch, spconv, torchsparse) carry the ``gpu`` marker and skip
without CUDA or without the library (``pytest -m gpu``; ``make gpu-check`` runs them).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ws3d_train.sparse import AUTO_ORDER_CPU, BACKEND_ENV, SparseCache, SparseTensor, collate_sparse, decollate_sparse, get_backend, kernel_offsets, spatial_sort_order
from ws3d_train.sparse import spconv_backend, torch_backend, torchsparse_backend
from ws3d_train.sparse.nn import SparseBatchNorm, SparseConv3d, SparseReLU, sparse_cat

GRID = 8
BATCHES = 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small tensors gain nothing from threads

_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
_NO_SPCONV = pytest.mark.skipif(
    not spconv_backend.is_available(), reason="spconv backend needs `import spconv.pytorch` (pip install spconv)"
)
_NO_TS = pytest.mark.skipif(
    not torchsparse_backend.is_available(),
    reason="torchsparse backend needs `import torchsparse` (installed from its own wheels)",
)
BACKENDS = [
    pytest.param("torch", "cpu", id="torch"),
    pytest.param("spconv", "cpu", id="spconv", marks=_NO_SPCONV),
    pytest.param("torch", "cuda", id="torch-cuda", marks=[pytest.mark.gpu, _NO_CUDA]),
    pytest.param("spconv", "cuda", id="spconv-cuda", marks=[pytest.mark.gpu, _NO_CUDA, pytest.mark.skipif(
        not spconv_backend.has_cuda(), reason="needs a CUDA build of spconv (spconv-cu12x), not the CPU one")]),
    pytest.param("torchsparse", "cuda", id="torchsparse", marks=[pytest.mark.gpu, _NO_CUDA, _NO_TS]),
]


def _random_sparse(
    *, seed: int, channels: int, device: str, density: float = 0.35, grid: int = GRID, batches: int = BATCHES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random voxels of a ``grid^3`` box per batch: coords int32 [N, 4], feats float64 [N, C] leaf."""
    g = torch.Generator().manual_seed(seed)
    occupied = torch.rand(batches, grid, grid, grid, generator=g) < density
    coords = torch.nonzero(occupied).to(torch.int32)
    coords = coords[torch.randperm(coords.shape[0], generator=g)]  # rows in no particular order
    feats = torch.randn(coords.shape[0], channels, generator=g, dtype=torch.float64)
    dtype = torch.float64 if device == "cpu" else torch.float32
    return coords.to(device), feats.to(device=device, dtype=dtype).requires_grad_(True)


def _random_weight(*, seed: int, kernel_size: int, c_in: int, c_out: int, like: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(kernel_size**3, c_in, c_out, generator=g, dtype=torch.float64) / (c_in * kernel_size**3) ** 0.5
    return w.to(device=like.device, dtype=like.dtype).requires_grad_(True)


def _to_dense(coords: torch.Tensor, feats: torch.Tensor, *, stride: int, grid: int) -> torch.Tensor:
    """Differentiable scatter of sparse rows into [B, C, G, G, G] (coordinates divided by the stride)."""
    b = coords[:, 0].long()
    xyz = torch.div(coords[:, 1:].long(), stride, rounding_mode="floor")
    dense = feats.new_zeros(BATCHES, grid, grid, grid, feats.shape[1])
    dense = dense.index_put((b, xyz[:, 0], xyz[:, 1], xyz[:, 2]), feats)
    return dense.permute(0, 4, 1, 2, 3)


def _read_dense(dense: torch.Tensor, coords: torch.Tensor, *, stride: int) -> torch.Tensor:
    """Rows of dense [B, C, X, Y, Z] at sparse coords (divided by the stride): [N, C]."""
    b = coords[:, 0].long()
    xyz = torch.div(coords[:, 1:].long(), stride, rounding_mode="floor")
    return dense.permute(0, 2, 3, 4, 1)[b, xyz[:, 0], xyz[:, 1], xyz[:, 2]]


def _dense_weight(w: torch.Tensor, kernel_size: int, *, transposed: bool) -> torch.Tensor:
    """Sparse [K^3, C_in, C_out] -> Conv3d [C_out, C_in, k, k, k] or ConvTranspose3d [C_in, C_out, k, k, k]."""
    idx = kernel_offsets(kernel_size, device=w.device) + (kernel_size - 1) // 2
    cube = w.new_zeros(kernel_size, kernel_size, kernel_size, w.shape[1], w.shape[2])
    cube = cube.index_put((idx[:, 0], idx[:, 1], idx[:, 2]), w)
    return cube.permute(3, 4, 0, 1, 2) if transposed else cube.permute(4, 3, 0, 1, 2)


def _compare(sparse_out, dense_out, leaves, *, seed: int, atol: float) -> None:
    """Forward values, then gradients of a random linear functional w.r.t. the shared leaves."""
    assert sparse_out.shape == dense_out.shape
    torch.testing.assert_close(sparse_out, dense_out, atol=atol, rtol=atol)
    g = torch.Generator().manual_seed(seed + 1)
    probe = torch.randn(sparse_out.shape, generator=g, dtype=torch.float64).to(sparse_out)
    grads_sparse = torch.autograd.grad((sparse_out * probe).sum(), leaves, retain_graph=True)
    grads_dense = torch.autograd.grad((dense_out * probe).sum(), leaves)
    for gs, gd in zip(grads_sparse, grads_dense):
        assert gs.abs().sum() > 0
        torch.testing.assert_close(gs, gd, atol=atol, rtol=atol)


def _atol(device: str) -> float:
    return 1e-10 if device == "cpu" else 2e-4


def test_kernel_offsets_follow_the_torchsparse_order() -> None:
    o3 = kernel_offsets(3)
    assert o3.shape == (27, 3)
    assert o3[0].tolist() == [-1, -1, -1] and o3[1].tolist() == [0, -1, -1]  # x fastest
    assert o3[13].tolist() == [0, 0, 0]
    torch.testing.assert_close(o3.flip(0), -o3)  # k and K-1-k are opposite
    o2 = kernel_offsets(2)
    assert o2[0].tolist() == [0, 0, 0] and o2[1].tolist() == [0, 0, 1]  # z fastest
    assert o2.min() == 0 and o2.max() == 1
    assert kernel_offsets(1).tolist() == [[0, 0, 0]]


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_submanifold_conv_matches_dense(backend: str, device: str, kernel_size: int) -> None:
    coords, feats = _random_sparse(seed=kernel_size, channels=4, device=device)
    w = _random_weight(seed=10 + kernel_size, kernel_size=kernel_size, c_in=4, c_out=5, like=feats)
    out = get_backend(backend).conv3d(SparseTensor(feats, coords), w, kernel_size=kernel_size)
    assert out.coords is coords and out.stride == 1
    dense = F.conv3d(
        _to_dense(coords, feats, stride=1, grid=GRID),
        _dense_weight(w, kernel_size, transposed=False),
        padding=(kernel_size - 1) // 2,
    )
    _compare(out.feats, _read_dense(dense, coords, stride=1), [feats, w], seed=kernel_size, atol=_atol(device))


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("kernel_size, padding", [(2, 0), (3, 1)])
def test_strided_conv_matches_dense(backend: str, device: str, kernel_size: int, padding: int) -> None:
    """Output voxels unique(floor(c/2)*2); kernel 2 = Conv3d(k2, s2, p0), kernel 3 = Conv3d(k3, s2, p1)."""
    coords, feats = _random_sparse(seed=20 + kernel_size, channels=3, device=device, density=0.2)
    w = _random_weight(seed=30 + kernel_size, kernel_size=kernel_size, c_in=3, c_out=4, like=feats)
    out = get_backend(backend).conv3d(SparseTensor(feats, coords), w, kernel_size=kernel_size, stride=2)
    assert out.stride == 2
    expected = coords.clone()
    expected[:, 1:] = torch.div(expected[:, 1:], 2, rounding_mode="floor") * 2
    expected = torch.unique(expected, dim=0)
    got = torch.unique(out.coords, dim=0)
    assert got.shape[0] == out.num_voxels  # no duplicate outputs
    assert torch.equal(got.cpu(), expected.cpu())
    dense = F.conv3d(
        _to_dense(coords, feats, stride=1, grid=GRID),
        _dense_weight(w, kernel_size, transposed=False),
        stride=2,
        padding=padding,
    )
    _compare(out.feats, _read_dense(dense, out.coords, stride=2), [feats, w], seed=kernel_size, atol=_atol(device))


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("kernel_size, padding, output_padding", [(2, 0, 0), (3, 1, 1)])
def test_transposed_conv_matches_dense(
    backend: str, device: str, kernel_size: int, padding: int, output_padding: int
) -> None:
    """Upsampling onto the encoder's fine voxels = ConvTranspose3d read at those voxels."""
    coords, feats = _random_sparse(seed=40 + kernel_size, channels=3, device=device)
    be = get_backend(backend)
    x = SparseTensor(feats.detach(), coords)
    down_w = _random_weight(seed=1, kernel_size=kernel_size, c_in=3, c_out=3, like=feats)
    coarse = be.conv3d(x, down_w.detach(), kernel_size=kernel_size, stride=2)
    g = torch.Generator().manual_seed(7)
    coarse_feats = torch.randn(coarse.num_voxels, 4, generator=g, dtype=torch.float64)
    coarse_feats = coarse_feats.to(feats).requires_grad_(True)
    w = _random_weight(seed=50 + kernel_size, kernel_size=kernel_size, c_in=4, c_out=2, like=feats)
    up = be.conv3d(coarse.replace_feats(coarse_feats), w, kernel_size=kernel_size, stride=2, transposed=True)
    assert up.stride == 1 and up.num_voxels == coords.shape[0]
    assert torch.equal(
        torch.unique(up.coords, dim=0).cpu(), torch.unique(coords, dim=0).cpu()
    )  # the encoder's voxels again
    dense = F.conv_transpose3d(
        _to_dense(coarse.coords, coarse_feats, stride=2, grid=GRID // 2),
        _dense_weight(w, kernel_size, transposed=True),
        stride=2,
        padding=padding,
        output_padding=output_padding,
    )
    assert dense.shape[-1] == GRID
    _compare(up.feats, _read_dense(dense, up.coords, stride=1), [coarse_feats, w], seed=3, atol=_atol(device))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_submanifold_conv_at_stride_2_matches_dense(backend: str, device: str) -> None:
    """At tensor stride 2 the kernel steps by 2 voxels: a dense conv on the coarse grid."""
    coords, feats = _random_sparse(seed=60, channels=3, device=device, density=0.5)
    be = get_backend(backend)
    coarse = be.conv3d(SparseTensor(feats.detach(), coords), _random_weight(
        seed=2, kernel_size=2, c_in=3, c_out=3, like=feats).detach(), kernel_size=2, stride=2)
    g = torch.Generator().manual_seed(8)
    cf = torch.randn(coarse.num_voxels, 3, generator=g, dtype=torch.float64).to(feats).requires_grad_(True)
    w = _random_weight(seed=61, kernel_size=3, c_in=3, c_out=2, like=feats)
    out = be.conv3d(coarse.replace_feats(cf), w, kernel_size=3)
    assert out.stride == 2
    dense = F.conv3d(
        _to_dense(coarse.coords, cf, stride=2, grid=GRID // 2), _dense_weight(w, 3, transposed=False), padding=1
    )
    _compare(out.feats, _read_dense(dense, out.coords, stride=2), [cf, w], seed=4, atol=_atol(device))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_negative_coordinates_follow_floor_semantics(backend: str, device: str) -> None:
    """Shifting a scene by an even vector shifts a stride-2 conv's output: floor, not truncation."""
    coords, feats = _random_sparse(seed=70, channels=2, device=device)
    w = _random_weight(seed=71, kernel_size=2, c_in=2, c_out=3, like=feats)
    shifted = coords.clone()
    shifted[:, 1:] -= 6  # coordinates from -6 to 1
    be = get_backend(backend)
    a = be.conv3d(SparseTensor(feats, coords), w, kernel_size=2, stride=2)
    b = be.conv3d(SparseTensor(feats, shifted), w, kernel_size=2, stride=2)
    assert int(b.coords[:, 1:].min()) == -6
    back = b.coords.clone()
    back[:, 1:] += 6
    ia, ib = spatial_sort_order(a.coords), spatial_sort_order(back)
    assert torch.equal(a.coords[ia], back[ib])
    torch.testing.assert_close(a.feats[ia], b.feats[ib])


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_batches_do_not_interact(backend: str, device: str) -> None:
    """Two scenes on the same voxels, collated: each one's output equals its output alone."""
    coords, feats = _random_sparse(seed=80, channels=3, device=device, batches=1)
    xyz = coords[:, 1:]
    feats_b = torch.randn_like(feats)
    conv = SparseConv3d(3, 4, 3, backend=backend).to(device=device, dtype=feats.dtype)
    batched = conv(collate_sparse([xyz, xyz], [feats, feats_b]))
    alone_a = conv(collate_sparse([xyz], [feats]))
    alone_b = conv(collate_sparse([xyz], [feats_b]))
    (ca, fa), (cb, fb) = decollate_sparse(batched)
    assert torch.equal(ca, xyz) and torch.equal(cb, xyz)
    torch.testing.assert_close(fa, alone_a.feats)
    torch.testing.assert_close(fb, alone_b.feats)
    assert not torch.allclose(fa, fb)


def test_collate_round_trip_puts_the_batch_index_in_column_0() -> None:
    g = torch.Generator().manual_seed(0)
    scenes = [torch.randint(-50, 50, (n, 3), generator=g) for n in (5, 9, 1)]
    feats = [torch.randn(s.shape[0], 2, generator=g) for s in scenes]
    x = collate_sparse(scenes, feats)
    assert x.coords.dtype == torch.int32 and x.coords.shape == (15, 4)
    assert x.coords[:, 0].tolist() == [0] * 5 + [1] * 9 + [2]
    back = decollate_sparse(x)
    assert len(back) == 3
    for (c, f), c0, f0 in zip(back, scenes, feats):
        assert torch.equal(c, c0.to(torch.int32)) and torch.equal(f, f0)


def test_kernel_maps_are_built_once_per_key() -> None:
    coords, feats = _random_sparse(seed=90, channels=3, device="cpu")
    x = SparseTensor(feats.detach(), coords)
    w3 = torch.randn(27, 3, 3, dtype=torch.float64)
    a = torch_backend.conv3d(x, w3, kernel_size=3)
    assert x.cache.n_kmap_builds == 1
    kmap = x.cache.kmaps[(1, 3, 1, False)]
    b = torch_backend.conv3d(a, w3, kernel_size=3)  # a shares x's cache
    assert x.cache.n_kmap_builds == 1 and x.cache.kmaps[(1, 3, 1, False)] is kmap
    assert b.cache is x.cache
    down = torch_backend.conv3d(b, torch.randn(8, 3, 3, dtype=torch.float64), kernel_size=2, stride=2)
    assert x.cache.n_kmap_builds == 2
    up = torch_backend.conv3d(down, torch.randn(8, 3, 3, dtype=torch.float64), kernel_size=2, stride=2, transposed=True)
    assert x.cache.n_kmap_builds == 2  # the transposed map reuses the downsampling one
    assert (2, 2, 2, True) in x.cache.kmaps and up.coords is coords
    # A new forward (fresh cache) recomputes.
    y = SparseTensor(feats.detach(), coords)
    torch_backend.conv3d(y, w3, kernel_size=3)
    assert y.cache.n_kmap_builds == 1 and y.cache is not x.cache


def test_kernel_map_pairs_match_brute_force() -> None:
    """Every (in, out, k) pair of the cached map is a true neighbour, and none is missing."""
    coords, _ = _random_sparse(seed=91, channels=1, device="cpu", grid=5)
    x = SparseTensor(torch.zeros(coords.shape[0], 1), coords)
    kmap = torch_backend.get_kernel_map(x, kernel_size=3)
    offsets = kernel_offsets(3)
    c = coords.long()
    diff = c[None, :, :] - c[:, None, :]  # [out, in, 4]: in - out
    same_batch = diff[..., 0] == 0
    brute = 0
    for k in range(27):
        in_k, out_k = kmap.pairs(k) if k != kmap.identity_offset else (torch.arange(len(c)), torch.arange(len(c)))
        assert torch.equal(c[in_k, 1:] - c[out_k, 1:], offsets[k].expand(len(in_k), 3))
        assert torch.equal(c[in_k, 0], c[out_k, 0])
        brute_k = (same_batch & (diff[..., 1:] == offsets[k]).all(-1)).sum()
        assert int(brute_k) == len(in_k)
        brute += len(in_k)
    assert brute > len(c)


def test_merge_match_equals_searchsorted() -> None:
    """The CPU kernel-map lookup (a merge of sorted lists) finds what ``torch.searchsorted`` finds
    (the lookup CUDA tensors use), in the same order."""
    g = torch.Generator().manual_seed(92)
    target = torch_backend.CoordinateHash.build(_random_sparse(seed=92, channels=1, device="cpu", grid=12)[0])
    keys = target.sorted_keys
    noise = torch.randint(-5, int(keys.max()) + 5, (300,), generator=g)
    base = torch.unique(torch.cat([keys[::2], keys[1::3] - 65536, noise]))
    off = torch.tensor([-70000, -1, 0, 1, 65536, 70000, 1 << 40], dtype=torch.int64)
    counts, j, pos = torch_backend._merge_match(target.sorted_keys.numpy(), base.numpy(), off.numpy())
    found, rows = target.lookup(base[None, :] + off[:, None])
    k_idx, j_ref = torch.nonzero(found, as_tuple=True)
    assert counts.tolist() == found.sum(dim=1).tolist() and sum(counts) > 50
    assert torch.equal(torch.from_numpy(j), j_ref)
    assert torch.equal(target.order[torch.from_numpy(pos)], rows[k_idx, j_ref])


def test_invalid_inputs_raise() -> None:
    coords = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]], dtype=torch.int32)
    with pytest.raises(ValueError, match="duplicate"):
        torch_backend.conv3d(SparseTensor(torch.zeros(2, 1), coords), torch.zeros(27, 1, 1), kernel_size=3)
    far = torch.tensor([[0, 40000, 0, 0]], dtype=torch.int32)
    with pytest.raises(ValueError, match="voxel coordinates"):
        torch_backend.conv3d(SparseTensor(torch.zeros(1, 1), far), torch.zeros(27, 1, 1), kernel_size=3)
    ok = torch.tensor([[0, 0, 0, 0]], dtype=torch.int32)
    with pytest.raises(ValueError, match="weight must be"):
        torch_backend.conv3d(SparseTensor(torch.zeros(1, 2), ok), torch.zeros(27, 1, 1), kernel_size=3)
    with pytest.raises(ValueError, match="no coordinate set at stride 1"):
        lone = SparseTensor(torch.zeros(1, 1), ok, stride=2)
        torch_backend.conv3d(lone, torch.zeros(8, 1, 1), kernel_size=2, stride=2, transposed=True)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        SparseTensor(torch.zeros(1, 1), torch.zeros(1, 3, dtype=torch.int32))


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert get_backend("torch").NAME == "torch"
    expected_cpu = next(n for n in AUTO_ORDER_CPU if n == "torch" or spconv_backend.is_available())
    assert get_backend("auto", device="cpu").NAME == expected_cpu  # torchsparse is never auto on the CPU
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert get_backend().NAME == "torch"
    monkeypatch.setenv(BACKEND_ENV, "bogus")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        get_backend()
    assert get_backend("torch").NAME == "torch"  # an explicit name beats the environment
    with pytest.raises(ValueError, match="unknown sparse backend"):
        get_backend("mink")
    if not torchsparse_backend.is_available():
        with pytest.raises(ImportError, match="torchsparse"):
            get_backend("torchsparse")
    if spconv_backend.is_available():
        assert get_backend("spconv").NAME == "spconv"
        monkeypatch.setenv(BACKEND_ENV, "spconv")
        assert get_backend().NAME == "spconv"
    else:
        with pytest.raises(ImportError, match="pip install spconv"):
            get_backend("spconv")


@pytest.mark.parametrize("v21", [True, False])
def test_torchsparse_coordinate_conversion_round_trips(v21: bool) -> None:
    """The ws3d <-> torchsparse coordinate conversions (pure code, runs without torchsparse)."""
    coords = torch.tensor([[0, -3, 4, 5], [1, 2, -2048, 7], [1, 0, 0, 0]], dtype=torch.int32)
    state: dict = {"to_native": {}, "to_ws3d": {}}
    native = torchsparse_backend._to_native_coords(coords, 1, state, v21)
    if v21:
        assert state["shift"] % 1024 == 0 and int(native[:, 1:].min()) >= 0
        assert torch.equal(native[:, 0], coords[:, 0])  # batch first
    else:
        assert torch.equal(native[:, 3], coords[:, 0])  # batch last
    fresh: dict = {"to_native": {}, "to_ws3d": {}, **({"shift": state["shift"]} if v21 else {})}
    assert torch.equal(torchsparse_backend._to_ws3d_coords(native, 1, fresh, v21), coords)
    coarse = coords.clone()
    coarse[:, 1:] = torch.div(coarse[:, 1:], 4, rounding_mode="floor") * 4
    native4 = torchsparse_backend._to_native_coords(coarse, 4, state, v21)
    assert torch.equal(torchsparse_backend._to_ws3d_coords(native4, 4, fresh, v21), coarse)


def test_layers_run_under_cpu_bf16_autocast() -> None:
    coords, feats = _random_sparse(seed=95, channels=4, device="cpu")
    feats = feats.detach().float().requires_grad_(True)
    conv = SparseConv3d(4, 8, 3, backend="torch")
    ref = conv(SparseTensor(feats, coords)).feats
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(SparseTensor(feats, coords)).feats
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert feats.grad is not None and conv.weight.grad is not None


def test_layer_stack_runs_and_backpropagates() -> None:
    coords, feats = _random_sparse(seed=96, channels=4, device="cpu")
    feats = feats.detach().float()
    x = SparseTensor(feats, coords)
    down = SparseConv3d(4, 8, 2, stride=2)
    up = SparseConv3d(8, 4, 2, stride=2, transposed=True)
    bn, relu = SparseBatchNorm(8), SparseReLU()
    y = relu(bn(down(x)))
    z = sparse_cat([x, up(y)])
    assert z.feats.shape == (coords.shape[0], 8) and z.coords is coords
    z.feats.square().mean().backward()
    assert down.weight.grad.abs().sum() > 0 and up.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="different"):
        sparse_cat([x, y])


def test_fresh_cache_per_input() -> None:
    a = SparseTensor(torch.zeros(1, 1), torch.zeros(1, 4, dtype=torch.int32))
    b = SparseTensor(torch.zeros(1, 1), torch.zeros(1, 4, dtype=torch.int32))
    assert isinstance(a.cache, SparseCache) and a.cache is not b.cache


def test_bench_sparse_returns_plain_numbers() -> None:
    from ws3d_train.bench.sparse import bench_sparse, room_voxels

    voxels = room_voxels(3000, seed=3)
    assert voxels.shape == (3000, 3) and voxels.dtype == torch.int32 and int(voxels.min()) >= 0
    assert torch.unique(voxels, dim=0).shape[0] == 3000
    result = bench_sparse(1500, channels=(8,), networks=("tiny",), backends=["torch"], dense_grid=16, repeats=1,
                          threads=1)
    assert result["sizes"] == [1500] and list(result["backends"]) == ["torch"]
    res = result["backends"]["torch"]
    rows = res["rows"]
    assert rows["subm3_c8_n1500"]["voxels_per_s"] > 0 and rows["net_tiny_n1500"]["voxels_per_s"] > 0
    assert all(isinstance(v, float) for row in rows.values() for v in row.values())
    assert res["max_abs_diff_vs_dense"] < 1e-4  # the bench's sparse and dense convs agree
    assert result["ratios"] == {}  # no other backend asked for


@pytest.mark.parametrize("kind", ["submanifold", "stride2", "transposed"])
def test_torch_backend_offsets_in_chunks_match_whole_offsets(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """The CPU path splits every kernel offset into cache-sized chunks (64 pairs here): values and
    gradients equal the whole-offset computation (the one the dense-oracle tests hold)."""
    coords, feats = _random_sparse(seed=97, channels=8, device="cpu", grid=16, density=0.4)
    w = _random_weight(seed=98, kernel_size=3 if kind == "submanifold" else 2, c_in=8, c_out=6, like=feats)
    down = _random_weight(seed=99, kernel_size=2, c_in=8, c_out=8, like=feats).detach()

    def run() -> tuple[torch.Tensor, ...]:
        x = SparseTensor(feats, coords)
        if kind == "submanifold":
            out = torch_backend.conv3d(x, w, kernel_size=3)
        elif kind == "stride2":
            out = torch_backend.conv3d(x, w, kernel_size=2, stride=2)
        else:
            coarse = torch_backend.conv3d(x, down, kernel_size=2, stride=2)
            out = torch_backend.conv3d(coarse, w, kernel_size=2, stride=2, transposed=True)
        probe = torch.linspace(-1, 1, out.feats.numel(), dtype=out.feats.dtype).reshape(out.feats.shape)
        return (out.feats, *torch.autograd.grad((out.feats * probe).sum(), [feats, w]))

    whole = run()
    monkeypatch.setattr(torch_backend, "_CHUNK_BYTES", 1)  # 64-pair chunks
    subm = kind == "submanifold"
    kmap = torch_backend.get_kernel_map(
        SparseTensor(feats.detach(), coords), kernel_size=3 if subm else 2, stride=1 if subm else 2
    )
    assert torch_backend._buffer_rows(kmap, torch_backend._chunk_rows(feats, w)) == 64
    assert max(b - a for a, b in zip(kmap.bounds, kmap.bounds[1:])) > 3 * 64  # several chunks per offset
    chunked = run()
    for a, b in zip(whole, chunked):
        assert a.abs().sum() > 0
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-12)


def test_auto_slower_rows_needs_every_repetition_slower() -> None:
    from ws3d_train.bench.sparse import _auto_slower_rows, _ratio_range

    timed = {  # (wall, cpu) per repetition
        "torch": {"a": [(2.0, 2.0), (2.1, 2.0), (2.2, 2.1)], "b": [(1.0, 1.0), (1.2, 0.9), (1.0, 1.0)]},
        "spconv": {"a": [(1.0, 1.0), (1.0, 1.0), (1.0, 1.0)], "b": [(1.1, 1.1), (1.1, 1.1), (1.1, 1.1)]},
    }
    assert _auto_slower_rows("torch", timed) == {"time": ["a (vs spconv)"], "cpu_time": ["a (vs spconv)"]}
    assert _auto_slower_rows("spconv", timed) == {"time": [], "cpu_time": ["b (vs torch)"]}  # wall: a tie
    assert _ratio_range(timed["spconv"]["b"], timed["torch"]["b"], 0) == pytest.approx([1.1 / 1.2, 1.1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_scatter_add_equals_index_add_bit_for_bit(dtype: torch.dtype) -> None:
    """The numba scatter of the torch backend adds in index_add_'s order (rows repeat here)."""
    g = torch.Generator().manual_seed(7)
    out = torch.randn(50, 33, generator=g, dtype=torch.float64).to(dtype)
    rows = torch.randint(0, 50, (400,), generator=g)
    src = torch.randn(400, 33, generator=g, dtype=torch.float64).to(dtype)
    ref = out.clone().index_add_(0, rows, src)
    torch_backend._scatter_add(out, rows, src)
    assert torch.equal(out, ref)


def test_torch_backend_cpu_loops_run_on_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU loops run with one intra-op thread (OpenMP barriers on shared cores, see
    ``torch_backend._one_cpu_thread``) and leave the caller's thread count as it was."""
    coords, feats = _random_sparse(seed=99, channels=4, device="cpu")
    w = _random_weight(seed=100, kernel_size=3, c_in=4, c_out=4, like=feats)
    seen: list[int] = []
    scatter = torch_backend._scatter_add
    monkeypatch.setattr(
        torch_backend, "_scatter_add", lambda *a: (seen.append(torch.get_num_threads()), scatter(*a))
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch_backend.conv3d(SparseTensor(feats, coords), w, kernel_size=3).feats.sum().backward()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen and set(seen) == {1}  # forward and backward scatters
    assert feats.grad is not None and w.grad is not None


@_NO_SPCONV
def test_spconv_cpu_is_exact_with_several_threads():
    """spconv 2.3.8's CPU kernels race under torch's parallel_for; the backend must pin one thread."""
    g = torch.Generator().manual_seed(0)
    xyz = torch.unique(torch.randint(0, 60, (20_000, 3), generator=g), dim=0)
    coords = torch.cat([torch.zeros(len(xyz), 1, dtype=xyz.dtype), xyz], 1).int()
    feats = torch.randn(len(xyz), 32, generator=g)
    weight = torch.randn(27, 32, 32, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        outs = [
            backend.conv3d(SparseTensor(feats=feats, coords=coords, stride=1, cache=SparseCache()), weight, kernel_size=3)
            for backend in (spconv_backend, torch_backend)
        ]
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    assert (outs[0].feats - outs[1].feats).abs().max().item() < 1e-4
