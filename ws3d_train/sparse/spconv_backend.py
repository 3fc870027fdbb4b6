"""spconv 2.x behind the ws3d sparse interface (used when ``import spconv.pytorch`` works).

spconv is on PyPI: ``pip install spconv`` is the CPU build (what ``make install`` installs, so CI
holds it against the dense oracle); GPU users install ``spconv-cu118`` / ``cu121`` / ``cu124`` /
``cu126`` instead (one of them, never two). Reads and writes nothing on disk.

Conversions between the ws3d convention (:mod:`ws3d_train.sparse.tensor`: int32 ``(b, x, y, z)``,
coordinates multiples of the tensor stride, possibly negative) and spconv's (int32
``(b, d0, d1, d2)`` indices on the grid of the current resolution, ``0 <= d < spatial_shape``):
x, y, z are shifted by a non-negative multiple of 1024 chosen at the first layer of a forward (a
multiple of every stride, so ``floor`` downsampling is unchanged) and divided by the tensor stride.
The stride-1 spatial shape is rounded up to a multiple of 1024 too, so every power-of-two
downsampling divides it exactly (spconv drops outputs beyond ``floor((in - k) / s) + 1``).

Which kernel maps spconv builds itself (``ops.get_indice_pairs``) and which come from the torch
backend's map builder (converted to spconv's ``[2, K, N]`` pair format, still computed by spconv's
gather-GEMM-scatter): spconv's semantics equal the ws3d ones (MinkowskiEngine / torchsparse) for
submanifold convolutions with an odd kernel and for strided convolutions whose kernel equals the
stride (the U-Net's kernel-2 stride-2 down- and upsampling). A strided kernel 3 / stride 2 creates
extra output voxels in spconv (``(i + p - k) / s`` for every kernel tap, not ``floor(i / s)``), and an
even submanifold kernel is centred differently; those use the torch backend's pairs. Transposed
convolutions reuse the pairs of the matching downsampling (``indice_inverse_conv``), as in spconv's
``SparseInverseConv3d``. A 1x1x1 stride-1 kernel is one matmul (what spconv's own layer does).

Weights are ``[K^3, C_in, C_out]`` in :func:`kernel_offsets` order (torchsparse's), permuted at each
call into spconv's KRSC layout ``[C_out, k, k, k, C_in]`` (axis order d0, d1, d2 = x, y, z), so a
model moves between backends unchanged. Mixed precision: under CUDA autocast the convolution runs
in float16 (the dtype spconv's own ``custom_fwd`` casts to; bf16 is not among spconv 2.3's GEMM
kernels) and its output is cast to the autocast dtype; under CPU autocast it runs in float32.
spconv's CPU build has no bias/activation fusion, so the bias is added afterwards.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ws3d_train.sparse import torch_backend
from ws3d_train.sparse.tensor import SparseTensor, check_conv_weight, check_coordinate_range, kernel_offsets

__all__ = ["NAME", "conv3d", "has_cuda", "is_available", "spconv_version"]

NAME = "spconv"
_QUANTUM = 1024  # a multiple of every tensor stride a network reaches


@functools.cache
def is_available() -> bool:
    """Whether spconv 2.x imports (its compiled core included)."""
    try:
        import spconv  # noqa: F401
        import spconv.pytorch  # noqa: F401
        from spconv.pytorch import functional, ops  # noqa: F401
    except (ImportError, OSError):  # OSError: a wheel built for another CUDA
        return False
    return spconv_version() >= (2, 0)


@functools.cache
def has_cuda() -> bool:
    """Whether the installed spconv is a CUDA build (``spconv-cu1xx``; ``spconv`` is CPU-only)."""
    if not is_available():
        return False
    from spconv.cppconstants import CPU_ONLY_BUILD

    return not CPU_ONLY_BUILD


def spconv_version() -> tuple[int, int]:
    """(major, minor) of the installed spconv."""
    import spconv

    parts = str(getattr(spconv, "__version__", "0.0")).split(".")
    digits = ["".join(ch for ch in p if ch.isdigit()) or "0" for p in parts[:2]]
    while len(digits) < 2:
        digits.append("0")
    return int(digits[0]), int(digits[1])


def _single_threaded_on_cpu(fn: Any) -> Any:
    """Run an spconv op with one intra-op thread when its tensors are on the CPU.

    spconv 2.3.8's CPU gather/scatter kernels race under torch's parallel_for: with 2 threads a
    3x3x3 submanifold conv on 20k voxels differs from the dense oracle by ~20 (exact with 1 thread).
    """

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        on_cpu = any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in args[:2])
        threads = torch.get_num_threads()
        if not on_cpu or threads == 1:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return run


@functools.cache
def _patch_cpu_ops() -> None:
    """Make spconv's CPU path correct on this torch.

    - Its CPU kernels race with more than one thread (see :func:`_single_threaded_on_cpu`); the
      forward and backward ops and the kernel-map builder are wrapped (``functional`` looks them up
      on ``ops`` at call time, so the autograd backward is covered too).
    - Its CPU backward (``ops.indice_conv_backward``) asks for the current CUDA stream
      unconditionally, which raises on a CPU-only torch build ("Torch not compiled with CUDA
      enabled"); the CPU kernels never use the stream. Without CUDA, answer 0 (a no-op with CUDA).
    """
    from spconv.pytorch import ops

    for name in ("indice_conv", "indice_conv_backward", "get_indice_pairs"):
        setattr(ops, name, _single_threaded_on_cpu(getattr(ops, name)))
    if not torch.cuda.is_available():
        ops.get_current_stream = lambda: 0


def _state(x: SparseTensor) -> dict[str, Any]:
    return x.cache.backend_state.setdefault(NAME, {"native": {}, "pairs": {}})


def _native(coords: torch.Tensor, stride: int, state: dict[str, Any]) -> torch.Tensor:
    """ws3d coords at ``stride`` -> spconv indices (shifted, divided by the stride), cached."""
    hit = state["native"].get(stride)
    if hit is not None and hit[0] is coords:
        return hit[1]
    if "shift" not in state:
        check_coordinate_range(coords)
        if coords.numel():
            lo = int(coords[:, 1:].min().item())
            hi = int(coords[:, 1:].max().item())
        else:
            lo = hi = 0
        state["shift"] = max(0, -(lo // _QUANTUM)) * _QUANTUM
        extent = hi + state["shift"] + 1
        state["shape1"] = max(1, -(-extent // _QUANTUM)) * _QUANTUM
        state["batch_size"] = int(coords[:, 0].max().item()) + 1 if coords.numel() else 1
    native = coords.clone()
    native[:, 1:] = torch.div(native[:, 1:] + state["shift"], stride, rounding_mode="floor")
    native = native.to(torch.int32).contiguous()
    state["native"][stride] = (coords, native)
    return native


def _to_ws3d(native: torch.Tensor, stride: int, state: dict[str, Any]) -> torch.Tensor:
    coords = native.to(torch.int32).clone()
    coords[:, 1:] = coords[:, 1:] * stride - state["shift"]
    coords = coords.contiguous()
    state["native"][stride] = (coords, native)
    return coords


def _shape(stride: int, state: dict[str, Any]) -> list[int]:
    return [max(1, state["shape1"] // stride)] * 3


def _krsc(weight: torch.Tensor, kernel_size: int, *, spconv_taps: bool) -> torch.Tensor:
    """[K^3, C_in, C_out] in kernel_offsets order -> spconv KRSC [C_out, k, k, k, C_in].

    ``spconv_taps``: reorder the taps into spconv's (d0 slowest, d2 fastest) for pairs spconv built;
    pairs converted from the torch backend keep the kernel_offsets order."""
    k = kernel_size
    if spconv_taps:
        idx = kernel_offsets(k, device=weight.device) + (k - 1) // 2
        flat = (idx[:, 0] * k + idx[:, 1]) * k + idx[:, 2]  # spconv's tap index over (d0, d1, d2)
        weight = weight[torch.argsort(flat)]
    c_out, c_in = weight.shape[2], weight.shape[1]
    return weight.permute(2, 0, 1).reshape(c_out, k, k, k, c_in).contiguous()


def _pairs_from_kernel_map(kmap: torch_backend.KernelMap) -> tuple[torch.Tensor, torch.Tensor]:
    """A torch-backend kernel map as spconv's (pairs int32 [2, K, P_max] with -1 fill, counts [K])."""
    counts = [kmap.bounds[k + 1] - kmap.bounds[k] for k in range(kmap.kernel_volume)]
    width = max([1, *counts])
    device = kmap.in_idx.device
    pairs = torch.full((2, kmap.kernel_volume, width), -1, dtype=torch.int32, device=device)
    for k, n in enumerate(counts):
        if n:
            in_k, out_k = kmap.pairs(k)
            pairs[0, k, :n] = in_k.to(torch.int32)
            pairs[1, k, :n] = out_k.to(torch.int32)
    return pairs, torch.tensor(counts, dtype=torch.int32, device=device)


def _forward_pairs(
    x: SparseTensor, stride_in: int, kernel_size: int, conv_stride: int, state: dict[str, Any]
) -> dict[str, Any]:
    """Pairs of the (submanifold or strided) convolution from tensor stride ``stride_in``, cached.

    Returns ``{"pairs", "counts", "n_out", "out_coords", "out_stride", "subm"}``.
    """
    from spconv.core import ConvAlgo
    from spconv.pytorch import ops

    key = (stride_in, kernel_size, conv_stride)
    hit = state["pairs"].get(key)
    if hit is not None:
        return hit
    cache = x.cache
    coords_in = cache.coords[stride_in]
    own = (conv_stride == 1 and kernel_size % 2 == 1) or (conv_stride > 1 and kernel_size == conv_stride)
    if own and (conv_stride == 1 or stride_in * conv_stride not in cache.coords):
        native = _native(coords_in, stride_in, state)
        subm = conv_stride == 1
        pad = (kernel_size - 1) // 2 if subm else 0
        outids, pairs, counts = ops.get_indice_pairs(
            native, state["batch_size"], _shape(stride_in, state), ConvAlgo.Native,
            [kernel_size] * 3, [conv_stride] * 3, [pad] * 3, [1] * 3, [0] * 3, subm, False,
        )
        out_stride = stride_in * conv_stride
        out_coords = coords_in if subm else _to_ws3d(outids, out_stride, state)
        if not subm:
            cache.coords[out_stride] = out_coords  # the coordinate set of that stride, as torch's would be
        entry = {"pairs": pairs, "counts": counts, "n_out": int(out_coords.shape[0]),
                 "out_coords": out_coords, "out_stride": out_stride, "subm": subm, "spconv_taps": True}
    else:
        # spconv's semantics differ here (or the coarse set exists already, in another row order):
        # the torch backend's pairs, computed by spconv's kernels.
        probe = SparseTensor(
            feats=torch.zeros(coords_in.shape[0], 0, device=coords_in.device), coords=coords_in,
            stride=stride_in, cache=cache,
        )
        kmap = torch_backend.get_kernel_map(probe, kernel_size=kernel_size, stride=conv_stride)
        pairs, counts = _pairs_from_kernel_map(kmap)
        entry = {"pairs": pairs, "counts": counts, "n_out": kmap.n_out, "out_coords": kmap.out_coords,
                 "out_stride": kmap.out_stride, "subm": False, "spconv_taps": False}
        if kmap.identity_offset is not None:  # odd submanifold kernel (not reached: spconv's own)
            raise AssertionError("unexpected identity offset")
    cache.n_kmap_builds += 1
    state["pairs"][key] = entry
    return entry


def conv3d(
    x: SparseTensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    kernel_size: int,
    stride: int = 1,
    transposed: bool = False,
) -> SparseTensor:
    """Sparse 3D convolution through spconv; same contract as ``torch_backend.conv3d``.

    Args:
        x: input, feats [N, C_in] at tensor stride ``x.stride``.
        weight: [kernel_size^3, C_in, C_out] in :func:`kernel_offsets` order.
        bias: optional [C_out].
        kernel_size: cube kernel edge.
        stride: convolution stride.
        transposed: upsample onto the cached coordinate set of stride ``x.stride // stride``.
    Returns:
        SparseTensor with feats [M, C_out], sharing ``x.cache``.
    """
    from spconv.core import ConvAlgo
    from spconv.pytorch import functional as Fsp

    check_conv_weight(weight, kernel_size=kernel_size, in_channels=x.num_channels)
    _patch_cpu_ops()
    if x.feats.is_cuda and not has_cuda():
        raise RuntimeError(
            "the installed spconv is the CPU build: for CUDA tensors install spconv-cu118/cu121/cu124/cu126 "
            "(matching your CUDA) instead of spconv, or use another sparse backend"
        )
    cache = x.cache
    if cache.coords.get(x.stride) is not x.coords:
        raise ValueError(
            f"sparse tensor at stride {x.stride} does not hold its cache's coordinate set for that "
            "stride; build tensors with replace_feats() or give them a fresh SparseCache"
        )
    feats = x.feats
    device_type = feats.device.type
    autocast = torch.is_autocast_enabled(device_type)
    out_dtype = torch.get_autocast_dtype(device_type) if autocast else feats.dtype
    run_dtype = (torch.float16 if device_type == "cuda" else torch.float32) if autocast else feats.dtype

    if kernel_size == 1 and stride == 1:
        with torch.autocast(device_type, enabled=False):
            out = feats.to(run_dtype) @ weight[0].to(run_dtype)
        coords_out, stride_out = x.coords, x.stride
    else:
        state = _state(x)
        if transposed:
            if x.stride % stride != 0:
                raise ValueError(f"transposed conv stride {stride} does not divide tensor stride {x.stride}")
            fine = x.stride // stride
            if fine not in cache.coords:
                raise ValueError(
                    f"transposed conv from stride {x.stride} to {fine}: no coordinate set at stride {fine} "
                    "in the cache (upsampling needs the matching encoder level)"
                )
            entry = _forward_pairs(x, fine, kernel_size, stride, state)
            if entry["out_coords"] is not x.coords:
                raise ValueError(
                    f"transposed conv from stride {x.stride}: the input is not on the voxels the matching "
                    "downsampling produced (spconv pairs are row-ordered)"
                )
            coords_out, stride_out = cache.coords[fine], fine
            n_out = int(coords_out.shape[0])
        else:
            entry = _forward_pairs(x, x.stride, kernel_size, stride, state)
            coords_out, stride_out, n_out = entry["out_coords"], entry["out_stride"], entry["n_out"]
        w = _krsc(weight, kernel_size, spconv_taps=entry["spconv_taps"])
        with torch.autocast(device_type, enabled=False):
            f, w = feats.to(run_dtype).contiguous(), w.to(run_dtype)
            if transposed:
                out = Fsp.indice_inverse_conv(f, w, entry["pairs"], entry["counts"], n_out, ConvAlgo.Native)
            elif entry["subm"]:
                out = Fsp.indice_subm_conv(f, w, entry["pairs"], entry["counts"], n_out, ConvAlgo.Native)
            else:
                out = Fsp.indice_conv(f, w, entry["pairs"], entry["counts"], n_out, ConvAlgo.Native)
    out = out.to(out_dtype)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return SparseTensor(feats=out, coords=coords_out, stride=stride_out, cache=cache)
