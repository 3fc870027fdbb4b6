"""Sparse layers (``torch.nn.Module``) over :class:`~ws3d_train.sparse.tensor.SparseTensor`.

Convolutions dispatch to the backend chosen by :func:`ws3d_train.sparse.get_backend` at each call
(so a model moved to CUDA can switch to torchsparse); batch norm and activations act on the feature
rows and are the same for every backend. Reads and writes nothing on disk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
    """``BatchNorm1d`` over the feature rows (statistics over all voxels of the batch)."""

    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace_feats(super().forward(x.feats))


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
