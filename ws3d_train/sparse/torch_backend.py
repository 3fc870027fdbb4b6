"""PyTorch sparse convolution: coordinate hashing, cached kernel maps, gather-matmul-scatter.

Runs on any device torch runs on (CI included); the only code that is not PyTorch is two serial
numba loops used for CPU tensors (the kernel-map lookup and the scatter-add), each with a PyTorch
fallback that CUDA tensors take. Reads and writes nothing on disk.

- A coordinate hash is the sorted int64 keys of a coordinate set (:func:`coordinate_keys`) plus the
  sorting permutation. The queries of one kernel offset (sorted keys + the offset's key) are sorted
  too, so on a CPU they are matched by a merge of two sorted lists (:func:`_merge_match`, numba,
  O(N) per offset); elsewhere by one ``torch.searchsorted`` over all (offset, voxel) queries.
- A kernel map lists, per kernel offset k, the pairs (input row, output row) with
  ``out_coord + offset_k * stride == in_coord``. It is built once per
  (input stride, kernel size, conv stride, transposed) and kept in the tensor's :class:`SparseCache`.
- The convolution loops over the K kernel offsets only: gather the input rows of offset k, multiply
  by ``W[k]`` ([C_in, C_out]), add into the output rows; the backward pass does the same with the
  roles swapped. The submanifold centre offset is the identity and costs one plain matmul.
- What makes it as fast as spconv's CPU build (``ws3d bench --section sparse``): the gathered rows
  and their products go into two buffers allocated once per call and reused by every offset
  (``out=``; a fresh 20-80 MB tensor per offset pays its page faults again each time); on a CPU each
  offset is processed in chunks of about 1 MB per buffer (:data:`_CHUNK_BYTES`), so the rows stay
  in cache from the gather through the matmul to the scatter; and on a CPU the scatter-add is a
  serial numba loop (:func:`_scatter_add_rows`): ``Tensor.index_add_`` on the CPU runs one
  TensorIterator add per row, 2-3x slower at 32-64 channels and slower still with 2 threads. The
  numba loop adds in ``index_add_``'s order (bit-identical results); CUDA and dtypes numba lacks
  (bf16/f16 under autocast) keep ``index_add_``. The CPU map build, forward and backward run with
  one intra-op thread (:class:`_one_cpu_thread`), as spconv's CPU ops do.

Semantics (those of MinkowskiEngine and torchsparse; the oracle tests pin them to dense ``nn.Conv3d``):
- submanifold (stride 1): output coordinates = input coordinates; for an odd kernel this equals a
  dense ``Conv3d(padding=(k-1)//2)`` read at the active sites.
- strided (stride t): output coordinates = ``unique(floor(c / (s*t)) * (s*t))``; output voxel q sums
  input voxels ``q + offset * s``. Kernel 2 equals dense ``Conv3d(k=2, stride=2, padding=0)`` and
  kernel 3 dense ``Conv3d(k=3, stride=2, padding=1)``, read at the output sites.
- transposed (stride t): output coordinates = the cached coordinate set of the finer stride ``s/t``
  (the matching encoder level); the kernel map is the strided one with rows and columns swapped, so
  it equals dense ``ConvTranspose3d`` with the same kernel, stride and padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numba import njit

from ws3d_train.sparse.tensor import (
    SparseCache,
    SparseTensor,
    check_conv_weight,
    check_coordinate_range,
    coordinate_keys,
    kernel_offsets,
    keys_to_coordinates,
    offset_keys,
)

__all__ = ["NAME", "CoordinateHash", "KernelMap", "conv3d", "get_kernel_map", "is_available"]

NAME = "torch"


def is_available() -> bool:
    """The pure-PyTorch backend is always available."""
    return True


@dataclass(frozen=True, eq=False)
class CoordinateHash:
    """A coordinate set prepared for lookups."""

    sorted_keys: torch.Tensor
    """int64 [N] coordinate keys in increasing order."""
    order: torch.Tensor
    """int64 [N] row of each sorted key: ``keys[order] == sorted_keys``."""

    @classmethod
    def build(cls, coords: torch.Tensor) -> CoordinateHash:
        """Hash ``coords`` int32 [N, 4]."""
        check_coordinate_range(coords)
        keys = coordinate_keys(coords)
        sorted_keys, order = torch.sort(keys)
        if sorted_keys.numel() > 1 and bool((sorted_keys[1:] == sorted_keys[:-1]).any()):
            raise ValueError("sparse tensor has duplicate (batch, x, y, z) rows; voxelise with unique()")
        return cls(sorted_keys=sorted_keys, order=order)

    def lookup(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Find query keys (any shape) in the set.

        Returns:
            found: bool, shape of ``queries``.
            row: int64, shape of ``queries``: the row holding the key (meaningless where not found).
        """
        n = self.sorted_keys.numel()
        if n == 0:
            return torch.zeros_like(queries, dtype=torch.bool), torch.zeros_like(queries)
        pos = torch.searchsorted(self.sorted_keys, queries).clamp_(max=n - 1)
        found = self.sorted_keys[pos] == queries
        return found, self.order[pos]


@dataclass(frozen=True, eq=False)
class KernelMap:
    """Input/output row pairs of every kernel offset of one convolution.

    Pairs of offset k are ``in_idx[bounds[k]:bounds[k+1]]`` -> ``out_idx[bounds[k]:bounds[k+1]]``.
    ``identity_offset`` (submanifold centre) holds no pairs: it maps row i to row i.
    """

    in_idx: torch.Tensor
    """int64 [P] input rows."""
    out_idx: torch.Tensor
    """int64 [P] output rows."""
    bounds: tuple[int, ...]
    """K + 1 pair offsets, as Python ints so that slicing needs no device sync."""
    n_in: int
    n_out: int
    identity_offset: int | None
    out_coords: torch.Tensor
    """int32 [n_out, 4] output coordinates."""
    out_stride: int

    @property
    def kernel_volume(self) -> int:
        return len(self.bounds) - 1

    def pairs(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input rows, output rows) of offset ``k``."""
        a, b = self.bounds[k], self.bounds[k + 1]
        return self.in_idx[a:b], self.out_idx[a:b]

    def transposed(self, *, out_coords: torch.Tensor, out_stride: int) -> KernelMap:
        """The same pairs with inputs and outputs swapped (a transposed convolution)."""
        return KernelMap(
            in_idx=self.out_idx,
            out_idx=self.in_idx,
            bounds=self.bounds,
            n_in=self.n_out,
            n_out=self.n_in,
            identity_offset=self.identity_offset,
            out_coords=out_coords,
            out_stride=out_stride,
        )


@njit(cache=True, nogil=True)
def _merge_match(
    target: np.ndarray, base: np.ndarray, off_keys: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which ``base[j] + off_keys[k]`` are in ``target``, by merging sorted lists.

    target: int64 [T] increasing; base: int64 [B] increasing; off_keys: int64 [K].
    Returns counts int64 [K] and, grouped by k and increasing in j within a group, j int64 [P] and
    the position in ``target`` int64 [P] of every match (the order ``torch.nonzero`` gives).
    """
    nk, nb, nt = off_keys.shape[0], base.shape[0], target.shape[0]
    js = np.empty(nk * nb, np.int64)
    ps = np.empty(nk * nb, np.int64)
    counts = np.zeros(nk, np.int64)
    n = 0
    for k in range(nk):
        off = off_keys[k]
        start = n
        p = 0
        for j in range(nb):
            q = base[j] + off
            while p < nt and target[p] < q:
                p += 1
            if p == nt:
                break
            if target[p] == q:
                js[n] = j
                ps[n] = p
                n += 1
        counts[k] = n - start
    return counts, js[:n], ps[:n]


def _match_offsets(
    target: CoordinateHash, base_keys: torch.Tensor, off_keys: torch.Tensor
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Match ``base_keys[j] + off_keys[k]`` (base_keys sorted) against ``target``.

    Returns (pairs per offset, j int64 [P], target row int64 [P]), grouped by offset, j increasing.
    """
    if base_keys.device.type == "cpu":
        counts, j, pos = _merge_match(target.sorted_keys.numpy(), base_keys.numpy(), off_keys.numpy())
        j_t, pos_t = torch.from_numpy(j), torch.from_numpy(pos)
        return counts.tolist(), j_t, target.order[pos_t]
    queries = base_keys[None, :] + off_keys[:, None]
    found, rows = target.lookup(queries)
    k_idx, j = torch.nonzero(found, as_tuple=True)
    return found.sum(dim=1).tolist(), j, rows[k_idx, j]


def _hash(cache: SparseCache, stride: int) -> CoordinateHash:
    h = cache.hashes.get(stride)
    if not isinstance(h, CoordinateHash):
        h = CoordinateHash.build(cache.coords[stride])
        cache.hashes[stride] = h
    return h


def _submanifold_map(cache: SparseCache, stride: int, kernel_size: int) -> KernelMap:
    coords = cache.coords[stride]
    h = _hash(cache, stride)
    n = coords.shape[0]
    offsets = kernel_offsets(kernel_size, device=coords.device) * stride
    n_offsets = offsets.shape[0]
    if kernel_size % 2 == 1:
        # Offsets k and K-1-k are opposite: the pairs of one are the swapped pairs of the other,
        # so only the first half is looked up; the centre is the identity.
        n_query, centre = n_offsets // 2, n_offsets // 2
    else:
        n_query, centre = n_offsets, None
    counts, j, in_half = _match_offsets(h, h.sorted_keys, offset_keys(offsets[:n_query]))
    out_half = h.order[j]
    in_parts = list(torch.split(in_half, counts))
    out_parts = list(torch.split(out_half, counts))
    empty = in_half.new_zeros(0)
    if centre is not None:
        # offsets 0..c-1 as looked up, the identity centre, then c+1..K-1 mirrored (swapped pairs)
        ins = in_parts + [empty] + out_parts[::-1]
        outs = out_parts + [empty] + in_parts[::-1]
        counts = counts + [0] + counts[::-1]
    else:
        ins, outs = in_parts, out_parts
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    return KernelMap(
        in_idx=torch.cat(ins),
        out_idx=torch.cat(outs),
        bounds=tuple(bounds),
        n_in=n,
        n_out=n,
        identity_offset=centre,
        out_coords=coords,
        out_stride=stride,
    )


def _downsampled_coordinates(coords: torch.Tensor, out_stride: int) -> torch.Tensor:
    """``unique(floor(c / out_stride) * out_stride)`` over x, y, z, sorted by key: int32 [M, 4]."""
    c = coords.to(torch.int64).clone()
    c[:, 1:] = torch.div(c[:, 1:], out_stride, rounding_mode="floor") * out_stride
    return keys_to_coordinates(torch.unique(coordinate_keys(c)))


def _strided_map(cache: SparseCache, stride: int, kernel_size: int, conv_stride: int) -> KernelMap:
    out_stride = stride * conv_stride
    in_hash = _hash(cache, stride)
    if out_stride not in cache.coords:
        cache.coords[out_stride] = _downsampled_coordinates(cache.coords[stride], out_stride)
    out_coords = cache.coords[out_stride]
    out_hash = _hash(cache, out_stride)
    offsets = kernel_offsets(kernel_size, device=out_coords.device) * stride
    counts, j, in_rows = _match_offsets(in_hash, out_hash.sorted_keys, offset_keys(offsets))
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    return KernelMap(
        in_idx=in_rows,
        out_idx=out_hash.order[j],
        bounds=tuple(bounds),
        n_in=cache.coords[stride].shape[0],
        n_out=out_coords.shape[0],
        identity_offset=None,
        out_coords=out_coords,
        out_stride=out_stride,
    )


def get_kernel_map(
    x: SparseTensor, *, kernel_size: int, stride: int = 1, transposed: bool = False
) -> KernelMap:
    """The kernel map of a convolution applied to ``x``, from ``x.cache`` or built and cached.

    Key: (x.stride, kernel_size, stride, transposed). A transposed map is the strided map of the
    finer level (x.stride // stride) with rows and columns swapped; that finer coordinate set must
    be in the cache (the encoder made it).
    """
    cache = x.cache
    key = (x.stride, kernel_size, stride, transposed)
    kmap = cache.kmaps.get(key)
    if kmap is not None:
        return kmap
    if cache.coords.get(x.stride) is not x.coords:
        raise ValueError(
            f"sparse tensor at stride {x.stride} does not hold its cache's coordinate set for that "
            "stride; build tensors with replace_feats() or give them a fresh SparseCache"
        )
    if transposed:
        if x.stride % stride != 0:
            raise ValueError(f"transposed conv stride {stride} does not divide tensor stride {x.stride}")
        fine = x.stride // stride
        if fine not in cache.coords:
            raise ValueError(
                f"transposed conv from stride {x.stride} to {fine}: no coordinate set at stride {fine} "
                "in the cache (upsampling needs the matching encoder level)"
            )
        forward_map = cache.kmaps.get((fine, kernel_size, stride, False))
        if forward_map is None:
            forward_map = _build(cache, fine, kernel_size, stride)
            cache.kmaps[(fine, kernel_size, stride, False)] = forward_map
        kmap = forward_map.transposed(out_coords=cache.coords[fine], out_stride=fine)
    else:
        kmap = _build(cache, x.stride, kernel_size, stride)
    cache.kmaps[key] = kmap
    return kmap


def _build(cache: SparseCache, stride: int, kernel_size: int, conv_stride: int) -> KernelMap:
    cache.n_kmap_builds += 1
    with _one_cpu_thread(cache.coords[stride].device.type == "cpu"):
        if conv_stride == 1:
            return _submanifold_map(cache, stride, kernel_size)
        return _strided_map(cache, stride, kernel_size, conv_stride)


@njit(cache=True, nogil=True)
def _scatter_add_rows(out: np.ndarray, rows: np.ndarray, src: np.ndarray) -> None:
    """``out[rows[r]] += src[r]`` for r = 0, 1, ... in order (rows may repeat).

    out: float [M, C] (C-contiguous), rows: int64 [P], src: float [P, C] of out's dtype. Serial on
    purpose: numba's thread pool would spin beside torch's OpenMP threads, and within one kernel
    offset the scatter is memory-bound (one pass over src).
    """
    c = out.shape[1]
    for r in range(rows.shape[0]):
        o = rows[r]
        for j in range(c):
            out[o, j] += src[r, j]


_NUMBA_DTYPES = (torch.float32, torch.float64)


def _scatter_add(out: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> None:
    """``out.index_add_(0, rows, src)``: the numba loop for CPU float32/float64, else torch's."""
    if (
        out.device.type == "cpu"
        and out.dtype in _NUMBA_DTYPES
        and src.dtype == out.dtype
        and rows.dtype == torch.int64
        and out.is_contiguous()
        and src.is_contiguous()
        and rows.is_contiguous()
    ):
        _scatter_add_rows(out.detach().numpy(), rows.numpy(), src.detach().numpy())
    else:
        out.index_add_(0, rows, src)


_CHUNK_BYTES = 1 << 20
"""CPU: rows of one kernel offset are processed in chunks of about this many bytes per buffer, so
that the gathered rows and their products stay in cache between the gather, the matmul and the
scatter (20-40% faster at 300k voxels than whole offsets; measured with ``ws3d bench``)."""


def _chunk_rows(feats: torch.Tensor, weight: torch.Tensor) -> int:
    """Rows per chunk: whole offsets on CUDA (one launch each), about ``_CHUNK_BYTES`` on a CPU."""
    if feats.device.type != "cpu":
        return 1 << 62
    return max(64, _CHUNK_BYTES // (feats.element_size() * max(weight.shape[1], weight.shape[2])))


def _pair_chunks(kmap: KernelMap, chunk: int):
    """(k, input rows, output rows) of every non-empty kernel offset, ``chunk`` pairs at most each."""
    for k in range(kmap.kernel_volume):
        a, b = kmap.bounds[k], kmap.bounds[k + 1]
        for s in range(a, b, chunk):
            e = min(b, s + chunk)
            yield k, kmap.in_idx[s:e], kmap.out_idx[s:e]


def _buffer_rows(kmap: KernelMap, chunk: int) -> int:
    widest = max([0] + [kmap.bounds[k + 1] - kmap.bounds[k] for k in range(kmap.kernel_volume)])
    return min(widest, chunk)


class _one_cpu_thread:
    """Run the block with one torch intra-op thread when ``on_cpu`` (and restore the count).

    The CPU loops issue hundreds of short ops per convolution (27 offsets x chunks x gather, matmul,
    scatter); with 2 threads on 2 cores shared with other jobs every op waits at an OpenMP barrier
    for a descheduled thread: the 300k-voxel submanifold row took 16 s with 2 threads and 0.74 s with
    1 (``ws3d bench --section sparse``, same process). spconv's CPU ops run on one thread as well.
    """

    def __init__(self, on_cpu: bool) -> None:
        self.threads = torch.get_num_threads() if on_cpu else 1

    def __enter__(self) -> None:
        if self.threads > 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        if self.threads > 1:
            torch.set_num_threads(self.threads)


class _GatherMatmulScatter(torch.autograd.Function):
    """out[o] = sum_k sum_{(i, o) in pairs_k} feats[i] @ W[k]. Saves only feats and W."""

    @staticmethod
    def forward(ctx, feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
        ctx.kmap = kmap
        ctx.save_for_backward(feats, weight)
        with _one_cpu_thread(feats.device.type == "cpu"):
            return _GatherMatmulScatter._forward(feats, weight, kmap)

    @staticmethod
    def _forward(feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
        feats = feats.contiguous()
        c = kmap.identity_offset
        if c is not None:
            out = feats @ weight[c]
        else:
            out = feats.new_zeros(kmap.n_out, weight.shape[2])
        chunk = _chunk_rows(feats, weight)
        width = _buffer_rows(kmap, chunk)
        gathered = feats.new_empty(width, weight.shape[1])  # reused by every chunk (see module doc)
        products = feats.new_empty(width, weight.shape[2])
        for k, in_k, out_k in _pair_chunks(kmap, chunk):
            m = in_k.numel()
            f = torch.index_select(feats, 0, in_k, out=gathered[:m])
            _scatter_add(out, out_k, torch.mm(f, weight[k], out=products[:m]))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        feats, weight = ctx.saved_tensors
        with _one_cpu_thread(feats.device.type == "cpu"):
            return _GatherMatmulScatter._backward(ctx, feats, weight, grad_out)

    @staticmethod
    def _backward(ctx, feats: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor):
        kmap: KernelMap = ctx.kmap
        need_feats, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        feats = feats.contiguous()
        grad_out = grad_out.contiguous()
        grad_feats = grad_weight = None
        c = kmap.identity_offset
        if need_feats:
            grad_feats = grad_out @ weight[c].T if c is not None else torch.zeros_like(feats)
        if need_weight:
            grad_weight = torch.zeros_like(weight)
            if c is not None:
                grad_weight[c] = feats.T @ grad_out
        chunk = _chunk_rows(feats, weight)
        width = _buffer_rows(kmap, chunk)
        grads = grad_out.new_empty(width, weight.shape[2])
        rows_in = feats.new_empty(width, weight.shape[1])  # gathered feats, then g @ W[k].T
        for k, in_k, out_k in _pair_chunks(kmap, chunk):
            m = in_k.numel()
            g = torch.index_select(grad_out, 0, out_k, out=grads[:m])
            if need_weight:
                grad_weight[k].addmm_(torch.index_select(feats, 0, in_k, out=rows_in[:m]).T, g)
            if need_feats:
                _scatter_add(grad_feats, in_k, torch.mm(g, weight[k].T, out=rows_in[:m]))
        return grad_feats, grad_weight, None


def conv3d(
    x: SparseTensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    kernel_size: int,
    stride: int = 1,
    transposed: bool = False,
) -> SparseTensor:
    """Sparse 3D convolution (submanifold, strided or transposed; see the module docstring).

    Args:
        x: input, feats [N, C_in] at tensor stride ``x.stride``.
        weight: [kernel_size^3, C_in, C_out] in :func:`kernel_offsets` order.
        bias: optional [C_out].
        kernel_size: cube kernel edge (voxels of the input stride).
        stride: convolution stride (1: submanifold; t: output stride x.stride * t, or x.stride / t
            when ``transposed``).
        transposed: upsample onto the cached coordinate set of stride ``x.stride // stride``.
    Returns:
        SparseTensor with feats [M, C_out], sharing ``x.cache``.
    """
    check_conv_weight(weight, kernel_size=kernel_size, in_channels=x.num_channels)
    kmap = get_kernel_map(x, kernel_size=kernel_size, stride=stride, transposed=transposed)
    feats = x.feats
    device_type = feats.device.type
    if torch.is_autocast_enabled(device_type):
        # index_add_ needs one dtype throughout: run the whole op in the autocast dtype.
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            out = _GatherMatmulScatter.apply(feats.to(dtype), weight.to(dtype), kmap)
    else:
        out = _GatherMatmulScatter.apply(feats, weight.to(feats.dtype), kmap)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return SparseTensor(feats=out, coords=kmap.out_coords, stride=kmap.out_stride, cache=x.cache)
