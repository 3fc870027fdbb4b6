"""Benchmark of the sparse convolution (``make bench``): reads and writes nothing, returns numbers.

Measures forward + backward throughput (voxels/s) of one 3x3x3 submanifold convolution and of the
``tiny`` U-Net on a ScanNet-sized input (surface voxels of a 6 x 6 x 3 m room with furniture at
2 cm, cropped to ``n_voxels`` around a point, like the trainer's crop), and compares the sparse
convolution with a dense ``nn.Conv3d`` holding the same weights on a scene small enough for a dense
grid (48^3). Run ``python -m ws3d_train.bench_sparse`` for a JSON line.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ws3d_train.network import NetworkConfig, build_network
from ws3d_train.sparse import SparseTensor, collate_sparse, get_backend, kernel_offsets

__all__ = ["bench_sparse", "room_voxels"]


def room_voxels(
    n_voxels: int,
    *,
    voxel_size_m: float = 0.02,
    room_m: tuple[float, float, float] = (6.0, 6.0, 3.0),
    seed: int = 0,
) -> torch.Tensor:
    """Surface voxels of a box room (floor, ceiling, walls, a few furniture boxes), cropped.

    Returns:
        int32 [min(n_voxels, all), 3] voxel coordinates (>= 0), the ``n_voxels`` nearest to a random
        point on the floor, in lexicographic row order.
    """
    g = torch.Generator().manual_seed(seed)
    size = [round(r / voxel_size_m) for r in room_m]
    boxes = [((0.0, 0.0, 0.0), room_m)]  # the room itself, then furniture
    for _ in range(6):
        lo = torch.rand(3, generator=g) * torch.tensor([room_m[0] - 1.5, room_m[1] - 1.5, 0.0])
        ext = torch.tensor([0.4, 0.4, 0.4]) + torch.rand(3, generator=g) * torch.tensor([1.0, 1.0, 0.6])
        boxes.append((tuple(lo.tolist()), tuple((lo + ext).tolist())))
    faces = []
    for lo_m, hi_m in boxes:
        lo = [round(v / voxel_size_m) for v in lo_m]
        hi = [min(round(v / voxel_size_m), s - 1) for v, s in zip(hi_m, size)]
        for axis in range(3):
            u, v = [a for a in range(3) if a != axis]
            gu = torch.arange(lo[u], hi[u] + 1)
            gv = torch.arange(lo[v], hi[v] + 1)
            uu, vv = torch.meshgrid(gu, gv, indexing="ij")
            for side in (lo[axis], hi[axis]):
                face = torch.empty(uu.numel(), 3, dtype=torch.int64)
                face[:, axis] = side
                face[:, u] = uu.reshape(-1)
                face[:, v] = vv.reshape(-1)
                faces.append(face)
    all_faces = torch.cat(faces)
    keys = torch.unique((all_faces[:, 0] * size[1] + all_faces[:, 1]) * size[2] + all_faces[:, 2])
    voxels = torch.stack([keys // (size[1] * size[2]), (keys // size[2]) % size[1], keys % size[2]], dim=1)
    centre = torch.tensor([size[0] * 0.5, size[1] * 0.5, 0.0]) + (torch.rand(3, generator=g) - 0.5) * torch.tensor(
        [size[0] * 0.5, size[1] * 0.5, 0.0]
    )
    dist = (voxels.float() - centre).square().sum(1)
    keep = torch.argsort(dist)[:n_voxels].sort().values  # lexicographic, as unique() voxelisation gives
    return voxels[keep].to(torch.int32)


def _time(fn: Callable[[], None], *, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median wall seconds and median process CPU seconds (all threads) of ``fn`` after a warm-up.

    The CPU time stays meaningful on a machine shared with other jobs, where wall time is not.
    """
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def _dense_weight(w: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """[K^3, C_in, C_out] -> Conv3d weight [C_out, C_in, k, k, k]."""
    idx = kernel_offsets(kernel_size, device=w.device) + (kernel_size - 1) // 2
    cube = w.new_zeros(kernel_size, kernel_size, kernel_size, w.shape[1], w.shape[2])
    cube[idx[:, 0], idx[:, 1], idx[:, 2]] = w
    return cube.permute(4, 3, 0, 1, 2).contiguous()


def bench_sparse(
    n_voxels: int = 80_000,
    channels: int = 32,
    device: str = "cpu",
    *,
    backend: str = "torch",
    dense_grid: int = 48,
    repeats: int = 3,
    threads: int | None = None,
) -> dict[str, float | int | str]:
    """Time the sparse convolution and the tiny U-Net, forward + backward.

    Args:
        n_voxels: voxels of the ScanNet-sized input (one scene at 2 cm).
        channels: input and output channels of the single convolution.
        device: where to run.
        backend: sparse backend name (``torch`` by default: the number the issue asks for).
        dense_grid: edge of the dense comparison grid (voxels).
        repeats: timed repetitions (median reported) after one warm-up.
        threads: CPU threads for the run (restored afterwards); None keeps torch's setting. On a
            machine shared with other jobs, 1 thread avoids OpenMP oversubscription stalls.
    Returns:
        Plain numbers: wall seconds (``*_s``), process CPU seconds over all threads (``*_cpu_s``),
        voxels/s (wall), the dense/sparse wall-time ratio and the largest difference between the
        sparse and dense outputs.
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _bench(n_voxels, channels, torch.device(device), backend, dense_grid, repeats)
    finally:
        torch.set_num_threads(previous_threads)


def _bench(
    n_voxels: int, channels: int, dev: torch.device, backend: str, dense_grid: int, repeats: int
) -> dict[str, float | int | str]:
    be = get_backend(backend, device=dev)
    g = torch.Generator().manual_seed(0)

    # One submanifold convolution on the ScanNet-sized scene.
    xyz = room_voxels(n_voxels, seed=0).to(dev)
    n = xyz.shape[0]
    feats = torch.randn(n, channels, generator=g).to(dev).requires_grad_(True)
    weight = (torch.randn(27, channels, channels, generator=g) / (27 * channels) ** 0.5).to(dev).requires_grad_(True)
    x = collate_sparse([xyz], [feats])

    def build_map() -> None:
        fresh = SparseTensor(x.feats.detach(), x.coords)
        be.conv3d(fresh, weight.detach(), kernel_size=3)

    def conv_step() -> None:
        out = be.conv3d(x, weight, kernel_size=3)  # kernel map cached in x.cache after the warm-up
        out.feats.sum().backward()

    t_map = _time(build_map, device=dev, repeats=repeats)
    t_conv = _time(conv_step, device=dev, repeats=repeats)

    # The tiny network on the same scene (one fresh cache per step, as in training).
    net = build_network(NetworkConfig(preset="tiny", in_channels=6, num_classes=20, clip_dim=512, backend=backend))
    net = net.to(dev)
    net_feats = torch.randn(n, 6, generator=g).to(dev)

    def net_step() -> None:
        out = net(collate_sparse([xyz], [net_feats]))
        (out.semantic.mean() + out.clip.mean() + out.boundary.mean()).backward()

    t_net = _time(net_step, device=dev, repeats=repeats)

    # Sparse vs dense on a scene that fits a dense grid: the dense_grid^3 corner of a room.
    small = room_voxels(10**9, seed=1)
    small = small[(small < dense_grid).all(dim=1)].to(dev)
    sf = torch.randn(small.shape[0], channels, generator=g).to(dev).requires_grad_(True)
    xs = collate_sparse([small], [sf])
    dense_in = torch.zeros(1, dense_grid, dense_grid, dense_grid, channels, device=dev)
    dense_in[0, small[:, 0].long(), small[:, 1].long(), small[:, 2].long()] = sf.detach()
    dense_in = dense_in.permute(0, 4, 1, 2, 3).contiguous().requires_grad_(True)
    dense_w = _dense_weight(weight.detach(), 3).requires_grad_(True)

    def sparse_small_step() -> None:
        be.conv3d(xs, weight, kernel_size=3).feats.sum().backward()

    def dense_step() -> None:
        F.conv3d(dense_in, dense_w, padding=1).sum().backward()

    t_sparse_small = _time(sparse_small_step, device=dev, repeats=repeats)
    t_dense = _time(dense_step, device=dev, repeats=repeats)
    with torch.no_grad():
        sparse_out = be.conv3d(xs, weight, kernel_size=3).feats
        dense_out = F.conv3d(dense_in, dense_w, padding=1)[0].permute(1, 2, 3, 0)
        dense_at = dense_out[small[:, 0].long(), small[:, 1].long(), small[:, 2].long()]
        max_diff = float((sparse_out - dense_at).abs().max())

    return {
        "backend": be.NAME,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "n_voxels": n,
        "channels": channels,
        "kmap_build_s": t_map[0],
        "kmap_build_cpu_s": t_map[1],
        "subm_conv_fwd_bwd_s": t_conv[0],
        "subm_conv_fwd_bwd_cpu_s": t_conv[1],
        "subm_conv_voxels_per_s": n / t_conv[0],
        "tiny_net_fwd_bwd_s": t_net[0],
        "tiny_net_fwd_bwd_cpu_s": t_net[1],
        "tiny_net_voxels_per_s": n / t_net[0],
        "dense_grid": dense_grid,
        "dense_n_active": int(small.shape[0]),
        "dense_conv_fwd_bwd_s": t_dense[0],
        "dense_conv_fwd_bwd_cpu_s": t_dense[1],
        "sparse_conv_small_fwd_bwd_s": t_sparse_small[0],
        "sparse_conv_small_fwd_bwd_cpu_s": t_sparse_small[1],
        "dense_over_sparse_time": t_dense[0] / t_sparse_small[0],
        "sparse_dense_max_abs_diff": max_diff,
    }


if __name__ == "__main__":
    import sys

    print(json.dumps(bench_sparse(threads=int(sys.argv[1]) if len(sys.argv) > 1 else None)))
