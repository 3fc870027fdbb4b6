"""The sparse tensor of the project: features on integer voxel coordinates, with a batch index.

THE coordinate convention of ws3d (every module that builds or reads sparse coordinates follows it):

- ``coords`` is ``int32 [N, 4]``: column 0 is the batch index (0 .. B-1), columns 1..3 are
  ``x, y, z`` in voxel units of the finest level (``floor(xyz_m / voxel_size_m)``, possibly negative).
- ``stride`` is the tensor stride: at stride ``s`` every coordinate is a multiple of ``s`` (the
  coordinates are NOT divided by the stride; MinkowskiEngine / torchsparse <= 2.0 style). A strided
  convolution maps a voxel ``c`` to ``floor(c / s_out) * s_out``.
- The rows are a set: no two rows share the same ``(batch, x, y, z)``.

The :class:`SparseCache` travels with every tensor derived from one input along a network forward:
coordinate sets per stride, coordinate hashes and kernel maps, so that each kernel map is built once
per forward however many layers use it. Reads and writes nothing on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

__all__ = [
    "COORD_LIMIT",
    "MAX_BATCH",
    "KernelMapKey",
    "SparseCache",
    "SparseTensor",
    "check_conv_weight",
    "check_coordinate_range",
    "collate_sparse",
    "coordinate_keys",
    "decollate_sparse",
    "kernel_offsets",
    "keys_to_coordinates",
    "offset_keys",
    "spatial_sort_order",
]

KernelMapKey = tuple[int, int, int, bool]
"""(input tensor stride, kernel size, convolution stride, transposed)."""

_FIELD_BITS = 16
_BIAS = 1 << (_FIELD_BITS - 1)
COORD_LIMIT = _BIAS - (1 << 12)
"""|x|, |y|, |z| must stay below this (voxel units): 16 bits per axis in a coordinate key, with room
left for kernel offsets at coarse strides. At 2 cm that is +-573 m, at 5 cm +-1.4 km."""
MAX_BATCH = 1 << (63 - 3 * _FIELD_BITS)


def kernel_offsets(kernel_size: int, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """The canonical order of kernel offsets, i.e. of the rows of a weight ``[K^3, C_in, C_out]``.

    Offsets are ``i - (kernel_size - 1) // 2`` per axis (so ``{-1, 0, 1}`` for 3 and ``{0, 1}`` for 2),
    in units of the input tensor stride (of the output stride for a transposed convolution). Odd
    kernels run x fastest, even kernels z fastest: the order torchsparse (2.0 and 2.1) uses, so
    weights move between the two backends unchanged.

    Returns:
        int64 [kernel_size^3, 3] offsets (dx, dy, dz).
    """
    if kernel_size < 1:
        raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
    r = torch.arange(kernel_size, dtype=torch.int64, device=device) - (kernel_size - 1) // 2
    a, b, c = torch.meshgrid(r, r, r, indexing="ij")  # the last grid axis varies fastest
    if kernel_size % 2 == 1:
        return torch.stack([c, b, a], dim=-1).reshape(-1, 3)  # x fastest
    return torch.stack([a, b, c], dim=-1).reshape(-1, 3)  # z fastest


def check_conv_weight(weight: torch.Tensor, *, kernel_size: int, in_channels: int) -> None:
    """Raise unless ``weight`` is ``[kernel_size^3, in_channels, C_out]``: the convolution weight
    layout of every backend (rows in :func:`kernel_offsets` order)."""
    k3 = kernel_size**3
    if weight.dim() != 3 or weight.shape[0] != k3 or weight.shape[1] != in_channels:
        raise ValueError(
            f"conv3d: weight must be [{k3}, {in_channels}, C_out] for kernel {kernel_size} on "
            f"{in_channels} channels, got {tuple(weight.shape)}"
        )


def check_coordinate_range(coords: torch.Tensor) -> None:
    """Raise if ``coords`` int [N, 4] cannot be packed into coordinate keys."""
    if coords.numel() == 0:
        return
    lo = coords.amin(dim=0)
    hi = coords.amax(dim=0)
    if int(lo[0]) < 0 or int(hi[0]) >= MAX_BATCH:
        raise ValueError(f"batch index must lie in [0, {MAX_BATCH}), got [{int(lo[0])}, {int(hi[0])}]")
    if int(lo[1:].min()) <= -COORD_LIMIT or int(hi[1:].max()) >= COORD_LIMIT:
        raise ValueError(
            f"voxel coordinates must lie in (-{COORD_LIMIT}, {COORD_LIMIT}), got "
            f"[{int(lo[1:].min())}, {int(hi[1:].max())}]: is the voxel size in metres, or the scene "
            "not recentred?"
        )


def coordinate_keys(coords: torch.Tensor) -> torch.Tensor:
    """Pack ``(batch, x, y, z)`` into one int64 per row, monotonic in lexicographic order.

    Adding ``dx * 2**32 + dy * 2**16 + dz`` to a key gives the key of the shifted voxel (while the
    coordinates stay within :data:`COORD_LIMIT`), which is how kernel maps are queried.

    Args:
        coords: int [N, 4] (batch, x, y, z).
    Returns:
        int64 [N] keys.
    """
    c = coords.to(torch.int64)
    xyz = c[:, 1:] + _BIAS
    return (
        (c[:, 0] << (3 * _FIELD_BITS))
        | (xyz[:, 0] << (2 * _FIELD_BITS))
        | (xyz[:, 1] << _FIELD_BITS)
        | xyz[:, 2]
    )


def keys_to_coordinates(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`coordinate_keys`: int64 [N] -> int32 [N, 4]."""
    mask = (1 << _FIELD_BITS) - 1
    return torch.stack(
        [
            keys >> (3 * _FIELD_BITS),
            ((keys >> (2 * _FIELD_BITS)) & mask) - _BIAS,
            ((keys >> _FIELD_BITS) & mask) - _BIAS,
            (keys & mask) - _BIAS,
        ],
        dim=1,
    ).to(torch.int32)


def offset_keys(offsets: torch.Tensor) -> torch.Tensor:
    """Key increments of voxel offsets: int64 [K, 3] -> int64 [K]."""
    o = offsets.to(torch.int64)
    return o[:, 0] * (1 << (2 * _FIELD_BITS)) + o[:, 1] * (1 << _FIELD_BITS) + o[:, 2]


def spatial_sort_order(coords: torch.Tensor) -> torch.Tensor:
    """Row order sorting ``coords`` int [N, 4] lexicographically by (batch, x, y, z): int64 [N].

    Kernel maps of key-sorted rows read memory almost sequentially; the network sorts its input
    once with this and puts its outputs back in the caller's order.
    """
    check_coordinate_range(coords)
    return torch.argsort(coordinate_keys(coords))


@dataclass(eq=False)
class SparseCache:
    """State shared by all tensors of one network forward (never across forwards).

    The pure-PyTorch backend keeps its coordinate hashes and kernel maps here; the torchsparse
    backend keeps torchsparse's own caches in :attr:`backend_state`.
    """

    coords: dict[int, torch.Tensor] = field(default_factory=dict)
    """Coordinate set of each tensor stride met so far: stride -> int32 [N_s, 4]."""
    hashes: dict[int, Any] = field(default_factory=dict)
    """Coordinate hash of each stride (backend-specific object)."""
    kmaps: dict[KernelMapKey, Any] = field(default_factory=dict)
    """Kernel maps keyed by (stride, kernel size, conv stride, transposed)."""
    backend_state: dict[str, Any] = field(default_factory=dict)
    """Free-form per-backend state (e.g. torchsparse's native caches)."""
    n_kmap_builds: int = 0
    """How many kernel maps were computed (not fetched) with this cache; for tests and benchmarks."""


@dataclass(eq=False)
class SparseTensor:
    """Features on a sparse set of voxels. See the module docstring for the coordinate convention.

    Attributes:
        feats: float [N, C] features, one row per voxel.
        coords: int32 [N, 4] ``(batch, x, y, z)`` voxel coordinates, multiples of ``stride``.
        stride: tensor stride (1 at the input resolution, 2, 4, ... after strided convolutions).
        cache: shared kernel-map / hash cache; a fresh one per network input.
    """

    feats: torch.Tensor
    coords: torch.Tensor
    stride: int = 1
    cache: SparseCache = field(default_factory=SparseCache)

    def __post_init__(self) -> None:
        if self.coords.dim() != 2 or self.coords.shape[1] != 4:
            raise ValueError(
                f"SparseTensor: coords must be int [N, 4] (batch, x, y, z), got {tuple(self.coords.shape)}"
            )
        if self.coords.dtype != torch.int32:
            if self.coords.dtype.is_floating_point:
                raise TypeError("SparseTensor: coords must be an integer tensor (voxel units), got float")
            self.coords = self.coords.to(torch.int32)
        if self.feats.dim() != 2 or self.feats.shape[0] != self.coords.shape[0]:
            raise ValueError(
                f"SparseTensor: feats must be [N, C] with N = {self.coords.shape[0]} rows, "
                f"got {tuple(self.feats.shape)}"
            )
        if self.feats.device != self.coords.device:
            raise ValueError(
                f"SparseTensor: feats on {self.feats.device} but coords on {self.coords.device}"
            )
        self.stride = int(self.stride)
        # The first tensor seen at a stride defines that stride's coordinate set (what transposed
        # convolutions upsample back onto).
        self.cache.coords.setdefault(self.stride, self.coords)

    @property
    def num_voxels(self) -> int:
        return int(self.coords.shape[0])

    @property
    def num_channels(self) -> int:
        return int(self.feats.shape[1])

    @property
    def device(self) -> torch.device:
        return self.feats.device

    def replace_feats(self, feats: torch.Tensor) -> SparseTensor:
        """The same voxels (and cache) with new features ``feats`` [N, C']."""
        return SparseTensor(feats=feats, coords=self.coords, stride=self.stride, cache=self.cache)

    def to(self, device: torch.device | str) -> SparseTensor:
        """A copy on ``device`` with a fresh cache (kernel maps live on one device)."""
        return SparseTensor(feats=self.feats.to(device), coords=self.coords.to(device), stride=self.stride)

    def permute_rows(self, order: torch.Tensor) -> SparseTensor:
        """Rows reordered by ``order`` int64 [N] (a permutation), with a fresh cache."""
        return SparseTensor(feats=self.feats[order], coords=self.coords[order], stride=self.stride)


def collate_sparse(
    coords_xyz: Sequence[torch.Tensor],
    feats: Sequence[torch.Tensor],
) -> SparseTensor:
    """Stack per-scene voxels into one batched tensor (batch index in column 0).

    Args:
        coords_xyz: per scene, int [N_b, 3] voxel coordinates (unique within the scene).
        feats: per scene, float [N_b, C].
    Returns:
        SparseTensor with coords [sum N_b, 4] = (b, x, y, z), rows in scene order, stride 1.
    """
    if len(coords_xyz) != len(feats) or len(coords_xyz) == 0:
        raise ValueError(
            f"collate_sparse: need as many coordinate as feature tensors (>= 1), "
            f"got {len(coords_xyz)} and {len(feats)}"
        )
    rows = []
    for b, c in enumerate(coords_xyz):
        if c.dim() != 2 or c.shape[1] != 3:
            raise ValueError(f"collate_sparse: scene {b}: coords must be [N, 3], got {tuple(c.shape)}")
        batch = torch.full((c.shape[0], 1), b, dtype=torch.int32, device=c.device)
        rows.append(torch.cat([batch, c.to(torch.int32)], dim=1))
    return SparseTensor(feats=torch.cat(list(feats), dim=0), coords=torch.cat(rows, dim=0))


def decollate_sparse(x: SparseTensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split a batched tensor back into scenes: ``[(coords_xyz int32 [N_b, 3], feats [N_b, C]), ...]``.

    Scenes come out in batch-index order; within a scene rows keep their order in ``x``.
    """
    batch = x.coords[:, 0].long()
    if batch.numel() == 0:
        return []
    n_batches = int(batch.max().item()) + 1
    out = []
    for b in range(n_batches):  # loops over scenes, not points
        rows = torch.nonzero(batch == b, as_tuple=True)[0]
        out.append((x.coords[rows, 1:], x.feats[rows]))
    return out
