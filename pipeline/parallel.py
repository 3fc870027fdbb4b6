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
