"""Benchmark of the sparse backends side by side (``ws3d bench --section sparse``): reads and writes
nothing, returns numbers.

Every installed backend (:func:`ws3d_train.sparse.available_backends`) runs in one process on the
same inputs: ScanNet-sized scenes (surface voxels of a 6 x 6 x 3 m room with furniture at 2 cm,
cropped to ``n`` voxels around a point, like the trainer's crop). Rows, each forward + backward
with its kernel map cached (the map build is its own row), median of ``repeats`` after a warm-up:

- ``subm3_c{C}_n{N}``: one 3x3x3 submanifold convolution, C -> C channels, N voxels;
- ``kmap_subm3_n{N}``: building that kernel map (a fresh cache each time);
- ``stride2_c{C}_n{N}`` / ``transposed_c{C}_n{N}``: a kernel-2 stride-2 convolution and its
  transposed convolution back onto the N voxels (the U-Net's down/upsampling);
- ``net_{preset}_n{N}``: the whole U-Net (``tiny``, ``MinkUNet18``), forward + backward of a
  loss on its three heads, a fresh cache per step as in training.

Each backend is also held to the dense oracle (``nn.Conv3d`` / ``ConvTranspose3d`` with the same
weights, on the corner of a room that fits a ``dense_grid^3`` grid): submanifold 3x3x3, stride-2 and
transposed; ``max_abs_diff_vs_dense`` is the largest of the three. Networks are compared with the
torch backend on the same weights and input (``max_abs_diff_vs_torch``). ``ratios`` holds, per
other backend and row, its wall time and its process CPU time over the torch backend's (< 1: faster
than torch; the CPU time stays meaningful on a machine shared with other jobs, wall time less so).
Run ``python -m ws3d_train.bench_sparse [threads]`` for a JSON line.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ws3d_train.network import NetworkConfig, build_network
from ws3d_train.sparse import available_backends, backend_runs_on, collate_sparse, get_backend, kernel_offsets

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
    n_voxels: int | None = None,
    *,
    sizes: Sequence[int] = (80_000, 300_000),
    channels: Sequence[int] = (32, 64),
    net_sizes: Sequence[int] = (80_000,),
    networks: Sequence[str] = ("tiny", "MinkUNet18"),
    backends: Sequence[str] | None = None,
    device: str = "cpu",
    dense_grid: int = 48,
    repeats: int = 3,
    threads: int | None = None,
) -> dict[str, Any]:
    """Time every installed sparse backend side by side and hold each to the dense oracle.

    Args:
        n_voxels: shorthand for ``sizes=(n_voxels,)`` and ``net_sizes=(n_voxels,)`` (quick runs).
        sizes: scene sizes (voxels) of the convolution rows.
        channels: channel counts of the submanifold rows (the stride-2/transposed rows use the first).
        net_sizes: scene sizes of the network rows.
        networks: U-Net presets to time.
        backends: backend names (default: every one that runs on ``device``).
        device: where to run.
        dense_grid: edge of the dense oracle grid (voxels).
        repeats: timed repetitions (median reported) after one warm-up.
        threads: CPU threads for the run (restored afterwards); None keeps torch's setting.
    Returns:
        ``{"device", "threads", "sizes", "channels", "repeats", "auto_backend", "backends": {name:
        {"max_abs_diff_vs_dense", "oracle": {...}, "rows": {row: {"fwd_bwd_s", "fwd_bwd_cpu_s",
        "voxels_per_s"}}, ...}}, "ratios": {name: {row: time over torch}}}``. A backend that fails
        is reported as ``{"error": ...}`` and the others still run.
    """
    if n_voxels is not None:
        sizes, net_sizes = (int(n_voxels),), (int(n_voxels),)
    dev = torch.device(device)
    if backends is None:
        backends = [b for b in available_backends() if backend_runs_on(b, dev)]
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        result: dict[str, Any] = {
            "device": str(dev), "threads": torch.get_num_threads(), "sizes": list(sizes),
            "channels": list(channels), "net_sizes": list(net_sizes), "repeats": repeats,
            "auto_backend": get_backend("auto", device=dev).NAME, "backends": {},
        }
        inputs = _Inputs(sizes, channels, net_sizes, networks, dev, dense_grid)
        for name in backends:
            try:
                result["backends"][name] = _bench_backend(name, inputs, repeats)
            except Exception as exc:  # one broken backend is reported; the others still run
                result["backends"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        result["ratios"] = _ratios(result["backends"])
        return result
    finally:
        torch.set_num_threads(previous_threads)


class _Inputs:
    """The same scenes, weights and network weights for every backend."""

    def __init__(self, sizes, channels, net_sizes, networks, dev: torch.device, dense_grid: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.dev = dev
        self.sizes, self.channels, self.net_sizes, self.networks = list(sizes), list(channels), list(net_sizes), list(networks)
        self.scenes = {n: room_voxels(n, seed=0).to(dev) for n in sorted(set(self.sizes) | set(self.net_sizes))}
        c_max = max(self.channels)
        n_max = max(s.shape[0] for s in self.scenes.values())
        self.feats = torch.randn(n_max, c_max, generator=g).to(dev)
        self.weights = {
            (k, c): (torch.randn(k**3, c, c, generator=g) / (k**3 * c) ** 0.5).to(dev)
            for k in (2, 3) for c in self.channels
        }
        self.net_feats = torch.randn(n_max, 6, generator=g).to(dev)
        self.net_states: dict[str, dict[str, torch.Tensor]] = {}
        for preset in self.networks:
            torch.manual_seed(0)
            net = build_network(NetworkConfig(preset=preset, in_channels=6, num_classes=20, clip_dim=512, backend="torch"))
            self.net_states[preset] = {k: v.to(dev) for k, v in net.state_dict().items()}
        self.net_reference: dict[tuple[str, int], torch.Tensor] = {}
        # the dense oracle: the dense_grid^3 corner of a room
        small = room_voxels(10**9, seed=1)
        self.small = small[(small < dense_grid).all(dim=1)].to(dev)
        self.dense_grid = dense_grid
        self.small_feats = torch.randn(self.small.shape[0], self.channels[0], generator=g).to(dev)
        self.coarse_feats_seed = 5


def _bench_backend(name: str, inp: _Inputs, repeats: int) -> dict[str, Any]:
    be = get_backend(name, device=inp.dev)
    dev = inp.dev
    rows: dict[str, dict[str, float]] = {}

    def row(key: str, fn: Callable[[], None], n: int) -> None:
        wall, cpu = _time(fn, device=dev, repeats=repeats)
        rows[key] = {"fwd_bwd_s": wall, "fwd_bwd_cpu_s": cpu, "voxels_per_s": n / wall}

    for n_req in inp.sizes:
        xyz = inp.scenes[n_req]
        n = xyz.shape[0]
        for c in inp.channels:
            feats = inp.feats[:n, :c].clone().requires_grad_(True)
            w3 = inp.weights[(3, c)].clone().requires_grad_(True)
            x = collate_sparse([xyz], [feats])

            def subm_step(x=x, w3=w3) -> None:
                be.conv3d(x, w3, kernel_size=3).feats.sum().backward()

            row(f"subm3_c{c}_n{n_req}", subm_step, n)
        c = inp.channels[0]
        w3 = inp.weights[(3, c)]

        def build_map(xyz=xyz, c=c, w3=w3) -> None:
            fresh = collate_sparse([xyz], [inp.feats[: xyz.shape[0], :c]])
            be.conv3d(fresh, w3, kernel_size=3)

        t_map = _time(build_map, device=dev, repeats=repeats)
        rows[f"kmap_subm3_n{n_req}"] = {"fwd_bwd_s": t_map[0], "fwd_bwd_cpu_s": t_map[1], "voxels_per_s": n / t_map[0]}

        feats = inp.feats[:n, :c].clone().requires_grad_(True)
        w2 = inp.weights[(2, c)].clone().requires_grad_(True)
        x = collate_sparse([xyz], [feats])

        def down_step(x=x, w2=w2) -> None:
            be.conv3d(x, w2, kernel_size=2, stride=2).feats.sum().backward()

        row(f"stride2_c{c}_n{n_req}", down_step, n)
        with torch.no_grad():
            coarse = be.conv3d(x, w2.detach(), kernel_size=2, stride=2)
        coarse_feats = torch.randn(coarse.num_voxels, c, generator=torch.Generator().manual_seed(inp.coarse_feats_seed))
        coarse_feats = coarse_feats.to(dev).requires_grad_(True)
        coarse_x = coarse.replace_feats(coarse_feats)
        wt = inp.weights[(2, c)].clone().requires_grad_(True)

        def up_step(coarse_x=coarse_x, wt=wt) -> None:
            be.conv3d(coarse_x, wt, kernel_size=2, stride=2, transposed=True).feats.sum().backward()

        row(f"transposed_c{c}_n{n_req}", up_step, n)

    net_diffs: dict[str, float] = {}
    for preset in inp.networks:
        net = build_network(NetworkConfig(preset=preset, in_channels=6, num_classes=20, clip_dim=512, backend=name))
        net.load_state_dict(inp.net_states[preset])
        net = net.to(dev)
        for n_req in inp.net_sizes:
            xyz = inp.scenes[n_req]
            n = xyz.shape[0]
            nf = inp.net_feats[:n]

            def net_step(net=net, xyz=xyz, nf=nf) -> None:
                out = net(collate_sparse([xyz], [nf]))
                (out.semantic.mean() + out.clip.mean() + out.boundary.mean()).backward()

            row(f"net_{preset}_n{n_req}", net_step, n)
            net.eval()  # running statistics moved during timing: compare in eval mode
            with torch.no_grad():
                clip_out = net(collate_sparse([xyz], [nf])).clip
            net.train()
            # the reference: the torch backend's output with the same weights, after the same
            # training-mode passes on the same input (so the running statistics agree too)
            key = (preset, n_req)
            if name == "torch":
                inp.net_reference[key] = clip_out
            elif key in inp.net_reference:
                net_diffs[f"net_{preset}_n{n_req}"] = float((clip_out - inp.net_reference[key]).abs().max())

    oracle = _oracle_diffs(be, inp)
    out: dict[str, Any] = {
        "max_abs_diff_vs_dense": max(oracle.values()),
        "oracle": oracle,
        "rows": rows,
    }
    if net_diffs:
        out["max_abs_diff_vs_torch"] = net_diffs
    return out


def _oracle_diffs(be: Any, inp: _Inputs) -> dict[str, float]:
    """Largest |sparse - dense| of a 3x3x3 submanifold, a kernel-2 stride-2 and its transposed
    convolution on the small scene (float32, the same weights)."""
    dev, small, grid = inp.dev, inp.small, inp.dense_grid
    c = inp.channels[0]
    sf = inp.small_feats
    xs = collate_sparse([small], [sf])
    dense_in = torch.zeros(1, grid, grid, grid, c, device=dev)
    dense_in[0, small[:, 0].long(), small[:, 1].long(), small[:, 2].long()] = sf
    dense_in = dense_in.permute(0, 4, 1, 2, 3).contiguous()
    w3, w2 = inp.weights[(3, c)], inp.weights[(2, c)]
    with torch.no_grad():
        sub = be.conv3d(xs, w3, kernel_size=3).feats
        dense = F.conv3d(dense_in, _dense_weight(w3, 3), padding=1)[0].permute(1, 2, 3, 0)
        d_sub = float((sub - dense[small[:, 0].long(), small[:, 1].long(), small[:, 2].long()]).abs().max())

        down = be.conv3d(xs, w2, kernel_size=2, stride=2)
        dense_down = F.conv3d(dense_in, _dense_weight(w2, 2), stride=2)[0].permute(1, 2, 3, 0)
        q = torch.div(down.coords[:, 1:].long(), 2, rounding_mode="floor")
        d_down = float((down.feats - dense_down[q[:, 0], q[:, 1], q[:, 2]]).abs().max())

        up = be.conv3d(down, w2, kernel_size=2, stride=2, transposed=True)
        coarse = torch.zeros(1, grid // 2, grid // 2, grid // 2, c, device=dev)
        coarse[0, q[:, 0], q[:, 1], q[:, 2]] = down.feats
        dense_up = F.conv_transpose3d(
            coarse.permute(0, 4, 1, 2, 3), _dense_weight(w2, 2).transpose(0, 1), stride=2
        )[0].permute(1, 2, 3, 0)
        p = up.coords[:, 1:].long()
        d_up = float((up.feats - dense_up[p[:, 0], p[:, 1], p[:, 2]]).abs().max())
    return {"subm3": d_sub, "stride2": d_down, "transposed": d_up}


def _ratios(backends: dict[str, Any]) -> dict[str, dict[str, float]]:
    ref = backends.get("torch", {}).get("rows")
    if not ref:
        return {}
    out: dict[str, dict[str, float]] = {}
    for name, res in backends.items():
        if name == "torch" or "rows" not in res:
            continue
        for suffix, field in (("time", "fwd_bwd_s"), ("cpu_time", "fwd_bwd_cpu_s")):
            out[f"{name}_over_torch_{suffix}"] = {
                row: res["rows"][row][field] / ref[row][field] for row in res["rows"] if row in ref
            }
    return out


if __name__ == "__main__":
    import sys

    print(json.dumps(bench_sparse(threads=int(sys.argv[1]) if len(sys.argv) > 1 else None)))
