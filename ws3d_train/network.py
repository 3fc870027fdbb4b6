"""The 3D network: a MinkUNet-style sparse U-Net with semantic, CLIP-space and boundary heads.

Plain code, no registry: :class:`NetworkConfig` picks a preset (``MinkUNet14/18/34`` after
MinkowskiEngine's, ``tiny`` for CPU tests and the demo) and may override its widths and depths;
:class:`MinkUNet` builds it. Input and output are voxels in the convention of
:mod:`ws3d_train.sparse.tensor` (batch index in coordinate column 0). Reads and writes nothing on disk.

Topology (strides 1 -> 16 -> 1): a stem convolution at stride 1; four encoder stages, each a
kernel-2 stride-2 convolution then ``layers[i]`` residual blocks to ``planes[i]`` channels; four
decoder stages, each a kernel-2 stride-2 transposed convolution to ``planes[4 + i]`` channels,
concatenation with the encoder features of that stride, then ``layers[4 + i]`` residual blocks.

Heads:

- semantic logits and the CLIP-space projection: linear maps (1x1x1 convolutions) of the last
  decoder features;
- the boundary network (``boundary_head="multiscale"``, the default): its own decoder branch. Each
  decoder stage (strides 8, 4, 2, 1: context from about a metre down to a voxel) is reduced to a
  few channels at its own resolution, every stride-1 voxel gathers those of its ancestors, a 3x3x3
  submanifold convolution over the concatenation compares each voxel with its neighbours (a
  boundary is a change between neighbours), then a linear map gives the logit. ``"linear"`` is a linear map of the last decoder features (the
  earlier head, kept for comparison);
- region projection heads: one small MLP per decoder stage (stride 8, 4, 2, 1) applied to that
  stage's features at its own resolution, for the region-level contrast at several stages
  (:func:`ws3d_train.train.losses.stage_segment_mean` pools them per segment).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ws3d_train.sparse.nn import SparseBatchNorm, SparseConv3d, SparseReLU, sparse_add, sparse_cat
from ws3d_train.sparse.tensor import SparseTensor, coordinate_keys, spatial_sort_order

__all__ = ["DECODER_STRIDES", "PRESETS", "MinkUNet", "NetworkConfig", "NetworkOutput", "ancestor_rows", "build_network"]

DECODER_STRIDES = (8, 4, 2, 1)
"""Tensor stride of the output of each decoder stage, in order."""


@dataclass(frozen=True)
class _Preset:
    init_dim: int
    planes: tuple[int, int, int, int, int, int, int, int]
    layers: tuple[int, int, int, int, int, int, int, int]
    stem_kernel_size: int


_ME_PLANES = (32, 64, 128, 256, 256, 128, 96, 96)
PRESETS: dict[str, _Preset] = {
    # MinkowskiEngine's MinkUNet14/18/34 (BasicBlock, INIT_DIM 32, stem kernel 5).
    "MinkUNet14": _Preset(32, _ME_PLANES, (1, 1, 1, 1, 1, 1, 1, 1), 5),
    "MinkUNet18": _Preset(32, _ME_PLANES, (2, 2, 2, 2, 2, 2, 2, 2), 5),
    "MinkUNet34": _Preset(32, _ME_PLANES, (2, 3, 4, 6, 2, 2, 2, 2), 5),
    # Small enough to train a few steps on a CPU in tests and the demo.
    "tiny": _Preset(16, (16, 32, 64, 96, 64, 48, 32, 32), (1, 1, 1, 1, 1, 1, 1, 1), 3),
}


@dataclass(frozen=True)
class NetworkConfig:
    """The sparse U-Net and its heads. Unset (None) architecture fields take the preset's values."""

    preset: str = "MinkUNet18"
    """One of ``MinkUNet14``, ``MinkUNet18``, ``MinkUNet34``, ``tiny``."""
    init_dim: int | None = None
    """Channels of the stem (stride 1). None: the preset's."""
    planes: tuple[int, ...] | None = None
    """Eight widths: four encoder stages (strides 2, 4, 8, 16), four decoder stages (8, 4, 2, 1).
    None: the preset's."""
    layers: tuple[int, ...] | None = None
    """Eight residual-block counts, one per stage as in ``planes``. None: the preset's."""
    stem_kernel_size: int | None = None
    """Kernel of the stem convolution (5 in MinkowskiEngine, 3 in ``tiny``). None: the preset's."""
    in_channels: int = 6
    """Input feature channels per voxel (e.g. rgb + xyz, or rgb + normal); the caller decides."""
    num_classes: int = 20
    """Outputs of the semantic head (training classes of the benchmark)."""
    clip_dim: int = 512
    """Width of the CLIP-space head (the CLIP model's projection dim, 512 for ViT-B)."""
    backend: str = "auto"
    """Sparse backend: ``auto``, ``torch`` or ``torchsparse`` (see ``ws3d_train.sparse.get_backend``)."""
    bn_momentum: float = 0.1
    """Momentum of every batch norm."""
    boundary_head: str = "multiscale"
    """``multiscale``: the boundary network's own branch over the features of every decoder stage
    (module docstring); ``linear``: a linear map of the last decoder features."""
    boundary_channels: int = 16
    """Width of the multiscale boundary branch: each decoder stage is reduced to it before the
    3x3x3 convolution (4 x this many input channels) to this many channels."""
    region_dim: int = 64
    """Output width of each stage's region projection head."""

    def __post_init__(self) -> None:
        if self.boundary_head not in ("multiscale", "linear"):
            raise ValueError(f"NetworkConfig.boundary_head: expected 'multiscale' or 'linear', got {self.boundary_head!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"NetworkConfig.preset: unknown {self.preset!r}, expected one of {sorted(PRESETS)}")
        for name in ("planes", "layers"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(int(v) for v in value)  # YAML gives lists
                if len(value) != 8:
                    raise ValueError(f"NetworkConfig.{name}: need 8 values (4 encoder + 4 decoder stages), got {value}")
                object.__setattr__(self, name, value)
        if self.layers is not None and min(self.layers) < 1:
            raise ValueError(f"NetworkConfig.layers: every stage needs >= 1 block, got {self.layers}")
        for name in ("in_channels", "num_classes", "clip_dim", "boundary_channels", "region_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"NetworkConfig.{name} must be >= 1, got {getattr(self, name)}")

    def resolved(self) -> NetworkConfig:
        """A copy with every None architecture field filled from the preset."""
        preset = PRESETS[self.preset]
        filled = {
            name: getattr(preset, name)
            for name in ("init_dim", "planes", "layers", "stem_kernel_size")
            if getattr(self, name) is None
        }
        return replace(self, **filled)


@dataclass(frozen=True, eq=False)
class NetworkOutput:
    """Per-voxel outputs, rows in the order of the input tensor's rows."""

    semantic: torch.Tensor
    """float [N, num_classes] class logits."""
    clip: torch.Tensor
    """float [N, clip_dim] embedding in CLIP space, NOT normalised (losses and open-vocabulary
    queries normalise it; pooling over points happens before normalising)."""
    boundary: torch.Tensor
    """float [N] boundary logit (sigmoid -> probability that the voxel lies on a boundary)."""
    feats: torch.Tensor
    """float [N, C] last decoder features (C = planes[7])."""
    region: tuple[torch.Tensor, ...] = ()
    """Per decoder stage (strides :data:`DECODER_STRIDES`): float [N_s, region_dim] the stage's
    region projection head at its own voxels (N_s rows, the last stage's N_s = N in the rows of
    the input)."""
    stage_index: tuple[torch.Tensor, ...] = ()
    """Per decoder stage: int64 [N], the row of ``region[k]`` that holds each input voxel's ancestor
    at that stage's stride."""


class _ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1, *, transposed: bool = False,
                 backend: str, bn_momentum: float) -> None:
        super().__init__(
            SparseConv3d(c_in, c_out, kernel_size, stride, transposed, backend=backend),
            SparseBatchNorm(c_out, momentum=bn_momentum),
            SparseReLU(inplace=True),
        )


class _BasicBlock(nn.Module):
    """Two 3x3x3 submanifold convolutions with a residual connection (1x1x1 projection if widths differ)."""

    def __init__(self, c_in: int, c_out: int, *, backend: str, bn_momentum: float) -> None:
        super().__init__()
        self.conv1 = SparseConv3d(c_in, c_out, 3, backend=backend)
        self.bn1 = SparseBatchNorm(c_out, momentum=bn_momentum)
        self.conv2 = SparseConv3d(c_out, c_out, 3, backend=backend)
        self.bn2 = SparseBatchNorm(c_out, momentum=bn_momentum)
        self.relu = SparseReLU(inplace=True)
        self.shortcut: nn.Module | None = None
        if c_in != c_out:
            self.shortcut = nn.Sequential(
                SparseConv3d(c_in, c_out, 1, backend=backend), SparseBatchNorm(c_out, momentum=bn_momentum)
            )

    def forward(self, x: SparseTensor) -> SparseTensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(sparse_add(out, identity))


def ancestor_rows(fine: torch.Tensor, coarse: torch.Tensor, stride: int) -> torch.Tensor:
    """The row of ``coarse`` that holds each row of ``fine``'s ancestor at ``stride``.

    Args:
        fine: int [N, 4] (batch, x, y, z) voxel coordinates at stride 1.
        coarse: int [M, 4] coordinates at ``stride`` (multiples of it, the strided convolutions'
            ``floor(c / stride) * stride``), each row unique.
        stride: the coarse tensor stride.

    Returns:
        int64 [N] rows of ``coarse``.

    Raises:
        ValueError if an ancestor is missing (``coarse`` was not built from ``fine``).
    """
    up = fine.to(torch.int64).clone()
    up[:, 1:] = torch.div(up[:, 1:], stride, rounding_mode="floor") * stride
    keys = coordinate_keys(coarse)
    sorted_keys, order = torch.sort(keys)
    query = coordinate_keys(up)
    pos = torch.searchsorted(sorted_keys, query).clamp(max=max(sorted_keys.numel() - 1, 0))
    if query.numel() and not bool((sorted_keys[pos] == query).all()):
        raise ValueError(f"ancestor_rows: some voxels have no ancestor at stride {stride}")
    return order[pos]


class _Projection(nn.Sequential):
    """Linear - ReLU - linear on feature rows (a SimCLR-style projection head)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Linear(c_in, c_in), nn.ReLU(inplace=True), nn.Linear(c_in, c_out))


class _BoundaryBranch(nn.Module):
    """The boundary network: every decoder stage's features reduced to ``channels`` at the stage's
    own resolution (a linear map: cheap on coarse voxels), gathered at each voxel from its
    ancestors and concatenated, a 3x3x3 submanifold convolution (each voxel against its
    neighbours), batch norm, ReLU, linear."""

    def __init__(self, widths: tuple[int, ...], channels: int, *, backend: str, bn_momentum: float) -> None:
        super().__init__()
        self.reduce = nn.ModuleList(nn.Linear(w, channels) for w in widths)
        self.conv = _ConvBNReLU(channels * len(widths), channels, 3, backend=backend, bn_momentum=bn_momentum)
        self.out = nn.Linear(channels, 1)

    def forward(self, last: SparseTensor, stages: list[torch.Tensor], rows: list[torch.Tensor]) -> torch.Tensor:
        # index_select, not x[r]: its backward adds rows in order (x[r]'s uses parallel float
        # atomics on a CPU, whose order, and so the last bits, change from run to run)
        gathered = [reduce(feats).index_select(0, r) for reduce, feats, r in zip(self.reduce, stages, rows)]
        h = self.conv(last.replace_feats(torch.cat(gathered, dim=1)))
        return self.out(h.feats).squeeze(1)


def _stage(c_in: int, c_out: int, n_blocks: int, *, backend: str, bn_momentum: float) -> nn.Sequential:
    blocks = [_BasicBlock(c_in, c_out, backend=backend, bn_momentum=bn_momentum)]
    blocks += [_BasicBlock(c_out, c_out, backend=backend, bn_momentum=bn_momentum) for _ in range(n_blocks - 1)]
    return nn.Sequential(*blocks)


class MinkUNet(nn.Module):
    """Sparse U-Net (strides 1 to 16) with semantic, CLIP-space and boundary heads."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        cfg = config.resolved()
        self.config = cfg
        be, mom = cfg.backend, cfg.bn_momentum
        planes, layers, init_dim = cfg.planes, cfg.layers, cfg.init_dim
        assert planes is not None and layers is not None and init_dim is not None
        self.stem = _ConvBNReLU(cfg.in_channels, init_dim, cfg.stem_kernel_size, backend=be, bn_momentum=mom)

        self.down = nn.ModuleList()
        self.encoder = nn.ModuleList()
        skip_widths = [init_dim]
        width = init_dim
        for i in range(4):
            self.down.append(_ConvBNReLU(width, width, 2, 2, backend=be, bn_momentum=mom))
            self.encoder.append(_stage(width, planes[i], layers[i], backend=be, bn_momentum=mom))
            width = planes[i]
            skip_widths.append(width)

        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in range(4):
            skip = skip_widths[3 - i]  # strides 8, 4, 2, 1
            self.up.append(_ConvBNReLU(width, planes[4 + i], 2, 2, transposed=True, backend=be, bn_momentum=mom))
            self.decoder.append(_stage(planes[4 + i] + skip, planes[4 + i], layers[4 + i], backend=be, bn_momentum=mom))
            width = planes[4 + i]

        self.out_channels = width
        self.semantic_head = nn.Linear(width, cfg.num_classes)
        self.clip_head = nn.Linear(width, cfg.clip_dim)
        decoder_widths = tuple(planes[4:8])
        self.boundary_head: nn.Module
        if cfg.boundary_head == "multiscale":
            self.boundary_head = _BoundaryBranch(decoder_widths, cfg.boundary_channels, backend=be, bn_momentum=mom)
        else:
            self.boundary_head = nn.Linear(width, 1)
        self.region_head = nn.ModuleList(_Projection(w, cfg.region_dim) for w in decoder_widths)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, SparseConv3d):
                # He initialisation over the gathered fan (K^3 * C_in), as MinkowskiEngine does.
                fan = m.weight.shape[0] * m.weight.shape[1]
                nn.init.normal_(m.weight, std=(2.0 / fan) ** 0.5)
            elif isinstance(m, SparseBatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: SparseTensor) -> NetworkOutput:
        """Run the U-Net on voxels ``x`` (feats [N, in_channels], coords [N, 4], stride 1).

        Returns:
            NetworkOutput with rows in the order of ``x``'s rows.
        """
        if x.stride != 1 or x.num_channels != self.config.in_channels:
            raise ValueError(
                f"MinkUNet expects stride-1 voxels with {self.config.in_channels} feature channels, "
                f"got stride {x.stride} and {x.num_channels} channels"
            )
        # Key-sorted rows make every kernel map read memory almost sequentially (2-3x faster on a
        # CPU); the outputs are put back in the caller's row order at the end.
        order = spatial_sort_order(x.coords)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        h = self.stem(x.permute_rows(order))

        skips = [h]
        for down, stage in zip(self.down, self.encoder):
            h = stage(down(h))
            skips.append(h)
        skips.pop()  # the bottleneck is not a skip
        stages: list[SparseTensor] = []
        for up, stage in zip(self.up, self.decoder):
            h = stage(sparse_cat([up(h), skips.pop()]))
            stages.append(h)

        # ancestors of the stride-1 rows (sorted order) in each decoder stage; the last is itself
        rows = [ancestor_rows(h.coords, s.coords, s.stride) for s in stages[:-1]]
        rows.append(torch.arange(h.num_voxels, device=h.feats.device))
        if isinstance(self.boundary_head, _BoundaryBranch):
            boundary = self.boundary_head(h, [s.feats for s in stages], rows)[inverse]
        else:
            boundary = self.boundary_head(h.feats).squeeze(1)[inverse]
        region = [head(s.feats) for head, s in zip(self.region_head, stages)]
        region[-1] = region[-1][inverse]  # the last stage in the caller's rows, like every head
        stage_index = tuple(r[inverse] for r in rows[:-1]) + (torch.arange(h.num_voxels, device=h.feats.device),)
        feats = h.feats[inverse]
        return NetworkOutput(
            semantic=self.semantic_head(feats),
            clip=self.clip_head(feats),
            boundary=boundary,
            feats=feats,
            region=tuple(region),
            stage_index=stage_index,
        )


def build_network(config: NetworkConfig) -> MinkUNet:
    """The network of ``config`` with freshly initialised weights."""
    return MinkUNet(config)
