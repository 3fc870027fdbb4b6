"""When the render kernels use several threads (one switch for the camera, ray-casting,
splatting and visibility modules).

Starting a numba parallel region costs ~0.05 ms on an idle machine but up to a scheduler time
slice (~10 ms) when the cores are shared, about what a serial pass over a few hundred thousand
items takes. So each per-pixel / per-point kernel comes as a serial and a parallel driver around
one inlined body, and `use_parallel` picks. (One Python function compiled both ways would share
numba's on-disk cache entry, so the drivers are separate functions.)
"""
from __future__ import annotations

import numba

PARALLEL_MIN_ITEMS = 1 << 20
"""Kernels over fewer items (pixels, point x view tests) than this run on one thread: on two
shared cores the break-even of the parallel variants is between ~0.4 and 1 million items (five
320x240 views are 384k pixels; 24 views 1.8 million). Tests and the bench set it (module attribute)."""


def use_parallel(items: int, threads: int) -> bool:
    """Whether a kernel over `items` items should run on several threads (`threads`: the config's)."""
    return threads != 1 and numba.get_num_threads() > 1 and items >= PARALLEL_MIN_ITEMS


def pin_torch_threads() -> None:
    """Give torch back the thread count OMP_NUM_THREADS asks for (Dask's worker processes set it
    to their threads), if numba's OpenMP layer changed it.

    numba's OpenMP threading layer shares the OpenMP runtime with torch on Linux: the first numba
    parallel region of a process raises torch's intra-op threads to numba's (1 -> 2 on two
    cores), so two single-threaded workers ran the CLIP encoder on four threads of two cores.
    Called before CPU work in torch that follows numba kernels (the embed stage's encoder)."""
    import os
    import sys

    torch = sys.modules.get("torch")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if torch is None or not env.isdigit() or int(env) < 1:
        return
    if torch.get_num_threads() != int(env):
        torch.set_num_threads(int(env))
