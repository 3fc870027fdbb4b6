"""Sparse layers (``torch.nn.Module``) over :class:`~ws3d_train.sparse.tensor.SparseTensor`.

Convolutions dispatch to the backend chosen by :func:`ws3d_train.sparse.get_backend` at each call
(so a model moved to CUDA can switch to torchsparse); batch norm and activations act on the feature
rows and are the same for every backend. Reads and writes nothing on disk.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ws3d_train.sparse import get_backend
from ws3d_train.sparse.tensor import SparseTensor

__all__ = ["SparseBatchNorm", "SparseConv3d", "SparseReLU", "sparse_add", "sparse_cat"]


class SparseConv3d(nn.Module):
    """Sparse 3D convolution with a cube kernel.

    ``stride == 1`` is submanifold (outputs on the input voxels); ``stride > 1`` downsamples to
    ``floor(c / (s * stride)) * (s * stride)``; ``transposed=True`` upsamples back onto the encoder's
    coordinate set of the finer stride. Weight ``[kernel_size^3, in_channels, out_channels]`` in
    :func:`~ws3d_train.sparse.tensor.kernel_offsets` order (torchsparse's layout).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        transposed: bool = False,
        *,
        bias: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = int(kernel_size)
        self.stride = int(stride)
        self.transposed = bool(transposed)
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(self.kernel_size**3, in_channels, out_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # torchsparse's initialisation: uniform with the fan of the gathered rows.
        fan = (self.out_channels if self.transposed else self.in_channels) * self.kernel_size**3
        bound = 1.0 / math.sqrt(fan)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        if self.stride != 1:
            s += f", stride={self.stride}"
        if self.transposed:
            s += ", transposed=True"
        if self.bias is None:
            s += ", bias=False"
        return s

    def forward(self, x: SparseTensor) -> SparseTensor:
        backend = get_backend(self.backend, device=x.device)
        return backend.conv3d(
            x,
            self.weight,
            self.bias,
            kernel_size=self.kernel_size,
            stride=self.stride,
            transposed=self.transposed,
        )


class SparseBatchNorm(nn.BatchNorm1d):
    """``BatchNorm1d`` over the feature rows (statistics over all voxels of the batch).

    With :attr:`process_group` set (``ws3d_train.train.distributed.wrap_model`` does it under torchrun),
    training-mode statistics are over the voxels of every rank (sums all-reduced, gradients
    flowing back through the all-reduce), so a data-parallel step normalises like one process on
    the global batch. ``torch.nn.SyncBatchNorm`` is not used: it runs on GPUs only and takes
    ``[N, C, ...]`` tensors, not sparse rows.
    """

    process_group: Any = None

    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        if self.training and self.process_group is not None:
            return x.replace_feats(self._synced(x.feats))
        return x.replace_feats(super().forward(x.feats))

    def _synced(self, feats: torch.Tensor) -> torch.Tensor:
        import torch.distributed.nn.functional as dist_fn

        x = feats.float() if feats.dtype in (torch.float16, torch.bfloat16) else feats
        c = x.shape[1]
        local = torch.cat([x.sum(0), (x * x).sum(0), x.new_full((1,), float(x.shape[0]))])
        with warnings.catch_warnings():  # deprecated for _functional_collectives, which has no autograd
            warnings.simplefilter("ignore", FutureWarning)
            total = dist_fn.all_reduce(local, group=self.process_group)  # backward: all-reduce of grads
        count = total[2 * c]
        mean = total[:c] / count
        var = (total[c : 2 * c] / count - mean * mean).clamp_min(0.0)  # biased, as BatchNorm normalises
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (count / (count - 1).clamp_min(1.0))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(feats.dtype)


class SparseReLU(nn.Module):
    """ReLU on the feature rows."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace_feats(torch.relu_(x.feats) if self.inplace else torch.relu(x.feats))


def _check_same_voxels(xs: Sequence[SparseTensor], what: str) -> None:
    first = xs[0]
    for other in xs[1:]:
        if other.stride != first.stride or other.coords.shape != first.coords.shape:
            raise ValueError(
                f"{what}: tensors on different voxels (strides {first.stride} and {other.stride}, "
                f"{first.num_voxels} and {other.num_voxels} rows)"
            )
        if other.coords is not first.coords and not torch.equal(other.coords, first.coords):
            raise ValueError(f"{what}: tensors at stride {first.stride} with different coordinates/row order")


def sparse_cat(xs: Sequence[SparseTensor]) -> SparseTensor:
    """Concatenate features of tensors on the same voxels (U-Net skip connections)."""
    _check_same_voxels(xs, "sparse_cat")
    return xs[0].replace_feats(torch.cat([x.feats for x in xs], dim=1))


def sparse_add(a: SparseTensor, b: SparseTensor) -> SparseTensor:
    """Sum of features of two tensors on the same voxels (residual connections)."""
    _check_same_voxels([a, b], "sparse_add")
    return a.replace_feats(a.feats + b.feats)
