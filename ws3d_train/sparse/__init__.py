"""Sparse convolution behind one small interface, with three backends.

- ``torch``: PyTorch (coordinate hashing, cached kernel maps, gather-matmul-scatter; on a CPU the
  kernel-map lookup and the scatter-add are numba loops); always available, CPU or GPU.
- ``spconv``: spconv 2.x when it imports (``pip install spconv`` is the CPU build that ``make
  install`` installs; ``spconv-cu12x`` wheels for GPUs).
- ``torchsparse``: torchsparse 2.0 / 2.1 when it imports (installed by the user from its wheels).

The coordinate convention (batch index in column 0, voxel units, multiples of the tensor stride) is
documented in :mod:`ws3d_train.sparse.tensor`; layers are in :mod:`ws3d_train.sparse.nn`.

Backend selection (:func:`get_backend`): an explicit name wins; ``"auto"`` reads the environment
variable ``WS3D_SPARSE_BACKEND`` (``auto``/``torch``/``spconv``/``torchsparse``) and otherwise picks,
for CUDA data, the first importable of :data:`AUTO_ORDER_CUDA` (torchsparse, spconv, torch) and, for
CPU data, the first importable of :data:`AUTO_ORDER_CPU`: the order measured by ``ws3d bench
--section sparse`` on this project's CPU machine (see that constant). Batch norm and activations act
on the feature rows alone and are the same for every backend. Reads and writes nothing on disk.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch

from ws3d_train.sparse import spconv_backend, torch_backend, torchsparse_backend
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
    "AUTO_ORDER_CPU",
    "AUTO_ORDER_CUDA",
    "BACKEND_ENV",
    "BACKEND_NAMES",
    "SparseBackend",
    "SparseCache",
    "SparseTensor",
    "available_backends",
    "backend_runs_on",
    "collate_sparse",
    "coordinate_keys",
    "decollate_sparse",
    "get_backend",
    "kernel_offsets",
    "spatial_sort_order",
]

BACKEND_ENV = "WS3D_SPARSE_BACKEND"
BACKEND_NAMES = ("auto", "torch", "spconv", "torchsparse")
AUTO_ORDER_CUDA = ("torchsparse", "spconv", "torch")
"""``auto`` on CUDA: torchsparse (fastest published kernels), then spconv, then pure PyTorch."""
AUTO_ORDER_CPU = ("torch", "spconv")
"""``auto`` on a CPU: the faster first, as measured (``ws3d bench --section sparse``, same process,
same inputs, rows interleaved, 5 repetitions, README "Sparse backends"): with 1 thread the torch
backend is at least as fast as spconv's CPU build on every row (spconv/torch CPU time, medians:
1.05-1.55 on the single convolutions at 80k and 300k voxels, 1.63-2.10 on kernel-map builds, 1.16
``tiny`` and 1.44 ``MinkUNet18``; with 2 threads 1.07-2.44 over all rows), and the bench's
``auto_slower_rows`` (rows where ``auto`` lost in every repetition) is empty in both runs.
Re-measure with that bench after changing either backend."""


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
    "spconv": spconv_backend,  # type: ignore[dict-item]
    "torchsparse": torchsparse_backend,  # type: ignore[dict-item]
}

_INSTALL_HINT = {
    "torchsparse": "install torchsparse (>= 2.0) from its own wheels or source",
    "spconv": "pip install spconv (CPU) or spconv-cu12x (CUDA 12.x)",
}


def available_backends() -> list[str]:
    """Names of the backends that import here (see :func:`backend_runs_on` for a device)."""
    return [name for name, module in _BACKENDS.items() if module.is_available()]


def backend_runs_on(name: str, device: torch.device | str) -> bool:
    """Whether backend ``name`` imports and runs on ``device``'s type: torchsparse 2.1 and a CUDA
    spconv build need CUDA; spconv's CPU build (``pip install spconv``) runs on the CPU only."""
    if name not in _BACKENDS or not _BACKENDS[name].is_available():
        return False
    on_cuda = torch.device(device).type == "cuda"
    if name == "spconv":
        return spconv_backend.has_cuda() if on_cuda else True
    if name == "torchsparse":
        return on_cuda  # 2.0's CPU path is not supported here; 2.1 is CUDA-only
    return True


def get_backend(name: str = "auto", *, device: torch.device | str | None = None) -> SparseBackend:
    """The backend module to run sparse convolutions with.

    Args:
        name: ``"auto"``, ``"torch"``, ``"spconv"`` or ``"torchsparse"``.
        device: where the data lives; ``"auto"`` follows :data:`AUTO_ORDER_CUDA` for CUDA data and
            :data:`AUTO_ORDER_CPU` otherwise (default: whether CUDA is available).
    Raises:
        ValueError: unknown name (in the argument or in ``WS3D_SPARSE_BACKEND``).
        ImportError: spconv or torchsparse asked for but not importable.
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
        order = AUTO_ORDER_CUDA if on_cuda else AUTO_ORDER_CPU
        name = next((n for n in order if backend_runs_on(n, "cuda" if on_cuda else "cpu")), "torch")
    backend = _BACKENDS[name]
    if not backend.is_available():
        raise ImportError(
            f"sparse backend {name!r} (from the {source}) is not importable: {_INSTALL_HINT[name]}, "
            "or use the 'torch' backend"
        )
    return backend
