"""Benchmark of the sparse backends side by side (``ws3d bench --section sparse``): reads and writes
nothing, returns numbers.

Every installed backend (:func:`ws3d_train.sparse.available_backends`) runs in one process on the
same inputs: ScanNet-sized scenes (surface voxels of a 6 x 6 x 3 m room with furniture at 2 cm,
cropped to ``n`` voxels around a point, like the trainer's crop). Rows, each forward + backward
with its kernel map cached (the map build is its own row), median of ``repeats`` after a warm-up,
the backends interleaved row by row (order AB, BA, AB, ...) so that a load that comes and goes on a shared
machine falls on all of them alike:

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
than torch; the CPU time stays meaningful on a machine shared with other jobs, wall time less so):
medians, bests, and the range of the per-repetition ratios (the noise of the run).
``auto_slower_rows`` lists the rows where the backend ``auto`` picks was slower than another in
every repetition (empty: the choice is no slower anywhere, within the noise of the run).
Run ``python -m ws3d_train.bench.sparse [threads]`` for a JSON line.
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


def _time_once(fn: Callable[[], None], *, device: torch.device) -> tuple[float, float]:
    """Wall seconds and process CPU seconds (all threads) of one call of ``fn``.

    The CPU time stays meaningful on a machine shared with other jobs, where wall time is not.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - w0, time.process_time() - c0


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

    Rows are timed interleaved: for each row every backend is warmed up, then the repetitions
    alternate between backends (AB, BA, AB, ...), so load that comes and goes on a shared
    machine falls on all of them alike.

    Args:
        n_voxels: shorthand for ``sizes=(n_voxels,)`` and ``net_sizes=(n_voxels,)`` (quick runs).
        sizes: scene sizes (voxels) of the convolution rows.
        channels: channel counts of the submanifold rows (the stride-2/transposed rows use the first).
        net_sizes: scene sizes of the network rows.
        networks: U-Net presets to time.
        backends: backend names (default: every one that runs on ``device``).
        device: where to run.
        dense_grid: edge of the dense oracle grid (voxels).
        repeats: timed repetitions per backend and row (median reported) after one warm-up.
        threads: CPU threads for the run (restored afterwards); None keeps torch's setting.
    Returns:
        ``{"device", "threads", "sizes", "channels", "repeats", "auto_backend", "backends": {name:
        {"max_abs_diff_vs_dense", "oracle": {...}, "rows": {row: {"fwd_bwd_s", "fwd_bwd_cpu_s",
        "voxels_per_s", "fwd_bwd_best_s", "fwd_bwd_cpu_best_s"}}, ...}}, "ratios": {...},
        "auto_slower_rows": {"time": [...], "cpu_time": [...]}}``. A backend that fails is reported
        as ``{"error": ...}`` and the others still run.
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
            "auto_backend": get_backend("auto", device=dev).NAME, "timing": "interleaved",
        }
        inp = _Inputs(sizes, channels, net_sizes, networks, dev, dense_grid)
        out: dict[str, dict[str, Any]] = {name: {"rows": {}} for name in backends}
        timed: dict[str, dict[str, list[tuple[float, float]]]] = {name: {} for name in backends}

        def fail(name: str, exc: Exception) -> None:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}

        for name in backends:
            try:
                oracle = _oracle_diffs(get_backend(name, device=dev), inp)
                out[name].update(max_abs_diff_vs_dense=max(oracle.values()), oracle=oracle)
            except Exception as exc:  # one broken backend is reported; the others still run
                fail(name, exc)
        for key, n, make in _rows(inp):
            fns: dict[str, Callable[[], None]] = {}
            for name in backends:
                if "error" in out[name]:
                    continue
                try:
                    fns[name] = make(get_backend(name, device=dev), name)
                    fns[name]()  # warm-up (and the kernel-map cache where the row keeps one)
                except Exception as exc:
                    fns.pop(name, None)
                    fail(name, exc)
            samples: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
            for r in range(repeats):
                for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                    samples[name].append(_time_once(fns[name], device=dev))
            for name, got in samples.items():
                timed[name][key] = got
                wall = statistics.median(w for w, _ in got)
                cpu = statistics.median(c for _, c in got)
                out[name]["rows"][key] = {
                    "fwd_bwd_s": wall, "fwd_bwd_cpu_s": cpu, "voxels_per_s": n / wall,
                    "fwd_bwd_best_s": min(w for w, _ in got), "fwd_bwd_cpu_best_s": min(c for _, c in got),
                }
        for name in backends:  # networks on the same weights and input give the same outputs
            if "error" in out[name] or name == "torch" or "torch" not in backends:
                continue
            out[name]["max_abs_diff_vs_torch"] = {
                f"net_{preset}_n{n_req}": _net_diff(inp, preset, n_req, name) for preset in inp.networks
                for n_req in inp.net_sizes
            }
        result["backends"] = out
        result["ratios"] = _ratios(out, timed)
        result["auto_slower_rows"] = _auto_slower_rows(result["auto_backend"], timed)
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
        # the dense oracle: the dense_grid^3 corner of a room
        small = room_voxels(10**9, seed=1)
        self.small = small[(small < dense_grid).all(dim=1)].to(dev)
        self.dense_grid = dense_grid
        self.small_feats = torch.randn(self.small.shape[0], self.channels[0], generator=g).to(dev)

    def network(self, preset: str, backend: str) -> torch.nn.Module:
        net = build_network(NetworkConfig(preset=preset, in_channels=6, num_classes=20, clip_dim=512, backend=backend))
        net.load_state_dict(self.net_states[preset])
        return net.to(self.dev)


def _rows(inp: _Inputs) -> list[tuple[str, int, Callable[[Any, str], Callable[[], None]]]]:
    """(row key, voxels, make(backend module, backend name) -> the timed step) for every row."""
    rows: list[tuple[str, int, Callable[[Any, str], Callable[[], None]]]] = []
    c0 = inp.channels[0]
    for n_req in inp.sizes:
        xyz = inp.scenes[n_req]
        n = xyz.shape[0]
        for c in inp.channels:
            def subm(be, _name, xyz=xyz, n=n, c=c):
                x = collate_sparse([xyz], [inp.feats[:n, :c].clone().requires_grad_(True)])
                w3 = inp.weights[(3, c)].clone().requires_grad_(True)
                return lambda: be.conv3d(x, w3, kernel_size=3).feats.sum().backward()  # map cached

            rows.append((f"subm3_c{c}_n{n_req}", n, subm))

        def kmap(be, _name, xyz=xyz, n=n):
            w3 = inp.weights[(3, c0)]
            return lambda: be.conv3d(collate_sparse([xyz], [inp.feats[:n, :c0]]), w3, kernel_size=3)  # fresh cache

        rows.append((f"kmap_subm3_n{n_req}", n, kmap))

        def down(be, _name, xyz=xyz, n=n):
            x = collate_sparse([xyz], [inp.feats[:n, :c0].clone().requires_grad_(True)])
            w2 = inp.weights[(2, c0)].clone().requires_grad_(True)
            return lambda: be.conv3d(x, w2, kernel_size=2, stride=2).feats.sum().backward()

        rows.append((f"stride2_c{c0}_n{n_req}", n, down))

        def up(be, _name, xyz=xyz, n=n):
            x = collate_sparse([xyz], [inp.feats[:n, :c0]])
            with torch.no_grad():
                coarse = be.conv3d(x, inp.weights[(2, c0)], kernel_size=2, stride=2)
            g = torch.Generator().manual_seed(5)
            cf = torch.randn(coarse.num_voxels, c0, generator=g).to(inp.dev).requires_grad_(True)
            coarse_x = coarse.replace_feats(cf)
            wt = inp.weights[(2, c0)].clone().requires_grad_(True)
            return lambda: be.conv3d(coarse_x, wt, kernel_size=2, stride=2, transposed=True).feats.sum().backward()

        rows.append((f"transposed_c{c0}_n{n_req}", n, up))
    for preset in inp.networks:
        for n_req in inp.net_sizes:
            xyz = inp.scenes[n_req]
            n = xyz.shape[0]

            def net_row(_be, name, preset=preset, xyz=xyz, n=n):
                net = inp.network(preset, name)
                nf = inp.net_feats[:n]

                def step() -> None:  # a fresh cache per step, as in training
                    out = net(collate_sparse([xyz], [nf]))
                    (out.semantic.mean() + out.clip.mean() + out.boundary.mean()).backward()

                return step

            rows.append((f"net_{preset}_n{n_req}", n, net_row))
    return rows


def _net_diff(inp: _Inputs, preset: str, n_req: int, name: str) -> float:
    """Largest |CLIP head of backend ``name`` - the torch backend's| on the same weights and input
    (eval mode: the stored running statistics)."""
    xyz = inp.scenes[n_req]
    nf = inp.net_feats[: xyz.shape[0]]
    with torch.no_grad():
        ref = inp.network(preset, "torch").eval()(collate_sparse([xyz], [nf])).clip
        other = inp.network(preset, name).eval()(collate_sparse([xyz], [nf])).clip
    return float((other - ref).abs().max())


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


def _ratios(backends: dict[str, Any], timed: dict[str, dict[str, list[tuple[float, float]]]]) -> dict[str, Any]:
    """Per other backend and row, its time over the torch backend's: ratio of the medians
    (``_time``, ``_cpu_time``), of the bests (``_best_time``, ``_best_cpu_time``), and the [lowest,
    highest] ratio of one repetition's two timings (``_time_range``, ``_cpu_time_range``: the
    repetitions are interleaved, so this is the spread that load coming and going leaves)."""
    ref = backends.get("torch", {}).get("rows")
    if not ref:
        return {}
    out: dict[str, Any] = {}
    for name, res in backends.items():
        if name == "torch" or "rows" not in res:
            continue
        rows = [row for row in res["rows"] if row in ref]
        for suffix, field in (("time", "fwd_bwd_s"), ("cpu_time", "fwd_bwd_cpu_s"),
                              ("best_time", "fwd_bwd_best_s"), ("best_cpu_time", "fwd_bwd_cpu_best_s")):
            out[f"{name}_over_torch_{suffix}"] = {row: res["rows"][row][field] / ref[row][field] for row in rows}
        for suffix, col in (("time_range", 0), ("cpu_time_range", 1)):
            out[f"{name}_over_torch_{suffix}"] = {row: _ratio_range(timed[name][row], timed["torch"][row], col)
                                                  for row in rows}
    return out


def _ratio_range(a: list[tuple[float, float]], b: list[tuple[float, float]], col: int) -> list[float]:
    """[min, max] over repetitions r of a[r][col] / b[r][col]."""
    per_repeat = [x[col] / max(y[col], 1e-12) for x, y in zip(a, b)]
    return [min(per_repeat), max(per_repeat)]


def _auto_slower_rows(auto: str, timed: dict[str, dict[str, list[tuple[float, float]]]]) -> dict[str, list[str]]:
    """Rows where the ``auto`` backend was slower than another backend in EVERY interleaved
    repetition (wall time under ``time``, process CPU time under ``cpu_time``): the bench's test of
    the CPU choice. A tie within the noise leaves some repetitions on each side and is not listed."""
    found: dict[str, list[str]] = {"time": [], "cpu_time": []}
    if auto not in timed:
        return found
    for name, rows in timed.items():
        if name == auto:
            continue
        for row, got in rows.items():
            if row not in timed[auto]:
                continue
            for label, col in (("time", 0), ("cpu_time", 1)):
                if _ratio_range(timed[auto][row], got, col)[0] > 1.0:
                    found[label].append(f"{row} (vs {name})")
    return found


if __name__ == "__main__":
    import sys

    print(json.dumps(bench_sparse(threads=int(sys.argv[1]) if len(sys.argv) > 1 else None)))
