"""Sparse convolution behind one small interface, with two backends.

- ``torch``: pure PyTorch (coordinate hashing, cached kernel maps, gather-matmul-scatter); always
  available, CPU or GPU.
- ``torchsparse``: torchsparse 2.0 / 2.1 when it imports (installed by the user from its wheels).

The coordinate convention (batch index in column 0, voxel units, multiples of the tensor stride) is
documented in :mod:`ws3d_train.sparse.tensor`; layers are in :mod:`ws3d_train.sparse.nn`.

Backend selection (:func:`get_backend`): an explicit name wins; ``"auto"`` reads the environment
variable ``WS3D_SPARSE_BACKEND`` (``auto``/``torch``/``torchsparse``) and otherwise picks torchsparse
when it imports and the data is on CUDA, else torch. Batch norm and activations act on the feature
rows alone and are the same for every backend. Reads and writes nothing on disk.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch

from ws3d_train.sparse import torch_backend, torchsparse_backend
from ws3d_train.sparse.tensor import (
    SparseCache,
    SparseTensor,
    collate_sparse,
    coordinate_keys,
    decollate_sparse,
    kernel_offsets,
    spatial_sort_order,
)

__all__ = [
    "BACKEND_ENV",
    "BACKEND_NAMES",
    "SparseBackend",
    "SparseCache",
    "SparseTensor",
    "available_backends",
    "collate_sparse",
    "coordinate_keys",
    "decollate_sparse",
    "get_backend",
    "kernel_offsets",
    "spatial_sort_order",
]

BACKEND_ENV = "WS3D_SPARSE_BACKEND"
BACKEND_NAMES = ("auto", "torch", "torchsparse")


class SparseBackend(Protocol):
    """What a backend module provides."""

    NAME: str

    def is_available(self) -> bool: ...

    def conv3d(
        self,
        x: SparseTensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        kernel_size: int,
        stride: int = 1,
        transposed: bool = False,
    ) -> SparseTensor: ...


_BACKENDS: dict[str, SparseBackend] = {
    "torch": torch_backend,  # type: ignore[dict-item]
    "torchsparse": torchsparse_backend,  # type: ignore[dict-item]
}


def available_backends() -> list[str]:
    """Names of the backends that can run here."""
    return [name for name, module in _BACKENDS.items() if module.is_available()]


def get_backend(name: str = "auto", *, device: torch.device | str | None = None) -> SparseBackend:
    """The backend module to run sparse convolutions with.

    Args:
        name: ``"auto"``, ``"torch"`` or ``"torchsparse"``.
        device: where the data lives; ``"auto"`` only picks torchsparse for CUDA data (default:
            whether CUDA is available).
    Raises:
        ValueError: unknown name (in the argument or in ``WS3D_SPARSE_BACKEND``).
        ImportError: torchsparse asked for but not importable.
    """
    if name == "auto":
        name = os.environ.get(BACKEND_ENV, "").strip() or "auto"
        source = f"environment variable {BACKEND_ENV}"
    else:
        source = "argument"
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown sparse backend {name!r} (from the {source}); expected one of {BACKEND_NAMES}")
    if name == "auto":
        on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        name = "torchsparse" if on_cuda and torchsparse_backend.is_available() else "torch"
    backend = _BACKENDS[name]
    if not backend.is_available():
        raise ImportError(
            f"sparse backend {name!r} (from the {source}) is not importable: install torchsparse "
            "(>= 2.0) from its own wheels or source, or use the 'torch' backend"
        )
    return backend
