"""Where torch runs and on how many threads: the one place training, inference and the viewer
take their device and thread count from."""
from __future__ import annotations

import torch

__all__ = ["resolve_device", "set_torch_threads"]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else as given (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for but CUDA is not available; use device=cpu")
    return device


def set_torch_threads(threads: int = 0) -> int:
    """Set torch's intra-op thread count for a loop and return it: `threads`, else OMP_NUM_THREADS,
    else the cores this process may use divided among the node's ranks (LOCAL_WORLD_SIZE).

    Needed because numba's OpenMP threading layer (the pipeline's parallel kernels) shares the
    OpenMP runtime with torch on Linux: the first numba parallel region in a process silently
    raises torch's thread count to numba's (e.g. 1 -> 2). On two shared cores that made the
    demo's training steps ~10x slower (31 s vs 2.7 s a step, measured) after preprocessing ran
    in the same process."""
    import os

    if threads <= 0:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
        ranks = int(local) if local.isdigit() and int(local) > 0 else 1
        threads = int(env) if env.isdigit() and int(env) > 0 else max(1, len(os.sched_getaffinity(0)) // ranks)
    torch.set_num_threads(threads)
    return threads
