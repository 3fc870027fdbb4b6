"""torchsparse behind the ws3d sparse interface (used when ``import torchsparse`` works).

torchsparse is not on PyPI; users install it from its own wheels or from source. Supported:
torchsparse 2.0 and 2.1. Reads and writes nothing on disk.

Conversions between the ws3d convention (:mod:`ws3d_train.sparse.tensor`: int32 ``(b, x, y, z)``,
coordinates multiples of the tensor stride) and torchsparse's:
- 2.1: batch index first, but coordinates DIVIDED by the tensor stride and expected non-negative.
  ws3d shifts x, y, z by a non-negative multiple of 1024 chosen at the first layer of a forward
  (a multiple of every stride, so ``floor`` downsampling is unchanged) and divides by the stride.
- 2.0: batch index LAST (``x, y, z, b``), coordinates kept as multiples of the stride.

Weights are ``[K^3, C_in, C_out]`` in the same offset order as the torch backend (torchsparse's own:
odd kernels x fastest, even kernels z fastest), so a model moves between backends unchanged.
With 2.1, every layer runs with ``kmap_mode="hashmap"`` and ``downsample_mode="minkowski"``
(output voxels ``floor(c / s)``): the semantics of the torch backend and of 2.0. 2.1's defaults
("hashmap_on_the_fly", "spconv") create other output voxels for kernel 3 / stride 2 (kernel 2 /
stride 2, what the U-Net uses, agrees either way). torchsparse's kernel-map caches live in
``SparseCache.backend_state``.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch

from ws3d_train.sparse.tensor import SparseTensor, check_conv_weight

__all__ = ["NAME", "conv3d", "is_available", "torchsparse_version"]

NAME = "torchsparse"
_SHIFT_QUANTUM = 1024  # a multiple of every tensor stride a network reaches


@functools.cache
def is_available() -> bool:
    """Whether torchsparse (>= 2.0) imports (its compiled extension included)."""
    try:
        import torchsparse  # noqa: F401
        import torchsparse.nn.functional  # noqa: F401
    except (ImportError, OSError):  # OSError: a wheel built for another CUDA/torch
        return False
    return torchsparse_version() >= (2, 0)


def torchsparse_version() -> tuple[int, int]:
    """(major, minor) of the installed torchsparse."""
    import torchsparse

    parts = str(getattr(torchsparse, "__version__", "0.0")).split(".")
    digits = ["".join(ch for ch in p if ch.isdigit()) or "0" for p in parts[:2]]
    while len(digits) < 2:
        digits.append("0")
    return int(digits[0]), int(digits[1])


def _state(x: SparseTensor) -> dict[str, Any]:
    return x.cache.backend_state.setdefault(NAME, {"to_native": {}, "to_ws3d": {}})


def _to_native_coords(coords: torch.Tensor, stride: int, state: dict[str, Any], v21: bool) -> torch.Tensor:
    hit = state["to_native"].get(stride)
    if hit is not None and hit[0] is coords:
        return hit[1]
    if v21:
        if "shift" not in state:
            lowest = int(coords[:, 1:].min().item()) if coords.numel() else 0
            state["shift"] = max(0, -(lowest // _SHIFT_QUANTUM)) * _SHIFT_QUANTUM
        native = coords.clone()
        native[:, 1:] = torch.div(native[:, 1:] + state["shift"], stride, rounding_mode="floor")
    else:
        native = coords[:, [1, 2, 3, 0]]
    native = native.to(torch.int32).contiguous()
    state["to_native"][stride] = (coords, native)
    return native


def _to_ws3d_coords(native: torch.Tensor, stride: int, state: dict[str, Any], v21: bool) -> torch.Tensor:
    hit = state["to_ws3d"].get(stride)
    if hit is not None and hit[0] is native:
        return hit[1]
    if v21:
        coords = native.clone()
        coords[:, 1:] = coords[:, 1:] * stride - state["shift"]
    else:
        coords = native[:, [3, 0, 1, 2]]
    coords = coords.to(torch.int32).contiguous()
    state["to_ws3d"][stride] = (native, coords)
    # The same voxels seen from the ws3d side map back to the same native tensor.
    state["to_native"][stride] = (coords, native)
    return coords


def conv3d(
    x: SparseTensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    kernel_size: int,
    stride: int = 1,
    transposed: bool = False,
) -> SparseTensor:
    """Sparse 3D convolution through torchsparse; same contract as ``torch_backend.conv3d``.

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
    import torchsparse
    import torchsparse.nn.functional as F

    version = torchsparse_version()
    if version < (2, 0):
        raise RuntimeError(f"torchsparse {torchsparse.__version__} is too old: ws3d supports 2.0 and 2.1")
    v21 = version >= (2, 1)
    if v21 and not x.feats.is_cuda:
        raise RuntimeError(
            "torchsparse 2.1 runs on CUDA only; use the 'torch' sparse backend on the CPU "
            "(WS3D_SPARSE_BACKEND=torch)"
        )
    check_conv_weight(weight, kernel_size=kernel_size, in_channels=x.num_channels)
    k3 = kernel_size**3
    state = _state(x)
    native = torchsparse.SparseTensor(
        feats=x.feats, coords=_to_native_coords(x.coords, x.stride, state, v21), stride=x.stride
    )
    stride3 = (x.stride,) * 3
    if v21:
        if "caches" in state:
            native._caches = state["caches"]
        else:
            state["caches"] = native._caches
        native._caches.cmaps.setdefault(stride3, (native.coords, native.spatial_range))
    else:
        native.cmaps = state.setdefault("cmaps", {})
        native.kmaps = state.setdefault("kmaps", {})
        native.cmaps.setdefault(stride3, native.coords)
    # torchsparse stores a 1x1x1 stride-1 kernel as [C_in, C_out]
    w = weight[0] if (k3 == 1 and stride == 1) else weight

    if v21:
        config = F.conv_config.get_global_conv_config()
        if config is None:
            config = F.conv_config.get_default_conv_config(conv_mode=F.get_conv_mode(), training=True)
        config = copy.copy(config)  # the default config is a shared module-level object
        # "hashmap" kernel maps honour downsample_mode; 2.1's default "hashmap_on_the_fly" always
        # downsamples spconv-style. One mode for every layer, as modes share the hash-table cache.
        config["kmap_mode"] = "hashmap"
        config["downsample_mode"] = "minkowski"
        padding = (kernel_size - 1) // 2 if (stride == 1 and kernel_size % 2 == 1) else 0
        out = F.conv3d(
            native,
            w,
            kernel_size=kernel_size,
            bias=bias,
            stride=stride,
            padding=padding,
            config=config,
            transposed=transposed,
            # Kernel maps are cached across layers: build the backward maps whenever grad is on,
            # even for a layer that needs none (a frozen stem), so later layers can reuse them.
            training=torch.is_grad_enabled(),
        )
    else:
        out = F.conv3d(native, w, kernel_size=kernel_size, bias=bias, stride=stride, transposed=transposed)
    out_stride = int(out.stride[0])
    coords = _to_ws3d_coords(out.coords, out_stride, state, v21)
    return SparseTensor(feats=out.feats, coords=coords, stride=out_stride, cache=x.cache)
