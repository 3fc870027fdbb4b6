"""Data-parallel training: what ``torchrun --nproc_per_node=N ws3d pretrain|finetune ...`` needs.

The loops stay single-process code; this module holds the mechanics they call:

- :func:`setup` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``/``MASTER_PORT``), joins the process group once per process (NCCL for CUDA devices,
  gloo on CPUs) and returns a :class:`DistContext` and the device of this rank (``cuda:LOCAL_RANK``
  on GPUs). Without torchrun (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) it is a no-op: one process.
- :func:`wrap_model` wraps the network in ``DistributedDataParallel`` (gradients averaged over
  ranks) with its batch norms synchronised across ranks (statistics over every rank's voxels), so
  one step on N ranks with B scenes each is the step on the N x B scenes of the global batch, up to
  how the loss averages (DDP averages the ranks' gradients; a loss that is a mean over each rank's
  items then equals the global mean when the ranks hold equal shares).
- :func:`make_loader`: a distributed sampler over scenes. Global batch k is batch k of
  :class:`ws3d_train.data.dataset.ResumableBatchSampler` with ``batch_size x world_size`` scenes; rank r takes
  its r-th slice of ``batch_size``. One rank is exactly the single-process loader.
- Only rank 0 writes (config, metrics, checkpoints): :func:`is_main_process`, :class:`NullLogger`.
  Metrics are averaged over ranks (:func:`mean_over_ranks`) and every record states the world size.
- Resume across world sizes: the checkpoint records the world size it was written with
  (``extra.world_size``); :func:`resume_start_batch` continues at the same epoch and scene offset
  (rounded up to a whole global batch of the new size). Same world size: exactly where it stopped.

Reads a checkpoint's ``extra`` when resuming; writes nothing.
"""
from __future__ import annotations

import atexit
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

__all__ = [
    "DistContext",
    "NullLogger",
    "RankBatchSampler",
    "all_reduce_sum",
    "is_main_process",
    "make_loader",
    "mean_over_ranks",
    "resume_start_batch",
    "setup",
    "unwrap",
    "world_size",
    "wrap_model",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a data-parallel run (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    """``nccl`` or ``gloo`` when a process group is up; None for one process."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from exc


def setup(device_name: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the torchrun process group (once) and pick this rank's device.

    Args:
        device_name: the loop's ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``). Under torchrun
            with CUDA, ``auto``/``cuda`` become ``cuda:LOCAL_RANK``.
    Returns:
        ``(context, device)``.
    Raises:
        RuntimeError: CUDA asked for but not available, or more ranks on a node than GPUs.
    """
    from ws3d_train.device import resolve_device

    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext(), resolve_device(device_name)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_name)
    if device.type == "cuda":
        if device.index is None or device_name in ("auto", "cuda"):
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(
                    f"rank {rank}: LOCAL_RANK {local_rank} but {torch.cuda.device_count()} GPU(s) on this node; "
                    "pass --nproc_per_node <= the GPU count"
                )
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist = torch.distributed
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        atexit.register(_destroy)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend), device


def _destroy() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def world_size() -> int:
    """Ranks of the process group (1 without one)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0, or no process group: the process that writes run files."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` with synchronised sparse batch norms; ``model``
    itself for one process. Call after loading a checkpoint (DDP broadcasts rank 0's weights).

    A loop may use only some heads (pre-training reads only the CLIP head), and DDP waits for a
    gradient of every parameter reachable from the forward's outputs: the heads' outputs are tied
    together with zero weight (:class:`_TiedHeads`), so every head gets a gradient (zero where
    unused) and plain DDP (no unused-parameter search, gradients averaged as they are ready) works
    for any loss.
    """
    if not ctx.enabled:
        return model
    from ws3d_train.sparse.nn import SparseBatchNorm

    for module in model.modules():
        if isinstance(module, SparseBatchNorm):
            module.process_group = torch.distributed.group.WORLD
    return nn.parallel.DistributedDataParallel(_TiedHeads(model), device_ids=None)


class _TiedHeads(nn.Module):
    """The network, its output fields each plus ``0 x`` the sum of the others (values unchanged)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Any) -> Any:
        out = self.net(x)
        if not dataclasses.is_dataclass(out):
            return out
        fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}

        def grads(v: Any) -> list[torch.Tensor]:  # a tensor field, or a tuple of them (per decoder stage)
            items = v if isinstance(v, tuple) else (v,)
            return [t for t in items if isinstance(t, torch.Tensor) and t.requires_grad]

        tied = {k: v for k, v in fields.items() if grads(v)}
        if sum(len(grads(v)) for v in tied.values()) < 2:
            return out
        zero = sum(t.float().sum() for v in tied.values() for t in grads(v)) * 0.0

        def tie(v: Any) -> Any:
            if isinstance(v, tuple):
                return tuple(t + zero.to(t.dtype) if isinstance(t, torch.Tensor) and t.requires_grad else t for t in v)
            return v + zero.to(v.dtype)

        return dataclasses.replace(out, **{k: tie(v) for k, v in tied.items()})


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper (what checkpoints hold)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model.net if isinstance(model, _TiedHeads) else model


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Sum plain numbers over ranks (float64 on the CPU for gloo, on the GPU for NCCL)."""
    if not ctx.enabled:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if ctx.backend == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def mean_over_ranks(metrics: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Each metric averaged over ranks (every rank gets the same dict)."""
    if not ctx.enabled:
        return dict(metrics)
    keys = list(metrics)
    sums = all_reduce_sum([float(metrics[k]) for k in keys], ctx)
    return {k: v / ctx.world_size for k, v in zip(keys, sums)}


class RankBatchSampler(Sampler[list[tuple[int, int]]]):
    """Rank ``rank``'s slice of the global batches of a :class:`ResumableBatchSampler`.

    Global batch k holds ``batch_size * world_size`` keys (fewer scenes than that: the epoch's
    scenes repeated to fill it); rank r gets keys ``[r * batch_size, (r + 1) * batch_size)``.
    """

    def __init__(self, num_items: int, batch_size: int, *, rank: int, world_size: int, seed: int,
                 shuffle: bool = True, start_batch: int = 0):
        from ws3d_train.data.dataset import ResumableBatchSampler

        self.global_sampler = ResumableBatchSampler(
            num_items, batch_size * world_size, seed=seed, shuffle=shuffle, start_batch=start_batch
        )
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def batch(self, k: int) -> list[tuple[int, int]]:
        keys = self.global_sampler.batch(k)
        wanted = self.batch_size * self.world_size
        if len(keys) < wanted:
            keys = (keys * math.ceil(wanted / len(keys)))[:wanted]
        return keys[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        k = self.global_sampler.start_batch
        while True:
            yield self.batch(k)
            k += 1


def resume_start_batch(
    checkpoint: str | Path | None, ctx: DistContext, *, num_items: int, batch_size: int, start_batch: int
) -> int:
    """The global batch to resume at with this world size.

    ``start_batch`` (step x accumulation) counts global batches of the checkpoint's world size. The
    same world size resumes exactly there; another continues at the same epoch and scene offset,
    rounded up to a whole global batch of ``batch_size x ctx.world_size`` scenes.
    """
    if checkpoint is None or start_batch == 0:
        return start_batch
    from ws3d_train.checkpoint import load_checkpoint

    old_world = int(load_checkpoint(checkpoint).get("extra", {}).get("world_size", 1))
    if old_world == ctx.world_size:
        return start_batch
    old_g, new_g = min(batch_size * old_world, num_items), min(batch_size * ctx.world_size, num_items)
    old_per_epoch, new_per_epoch = num_items // old_g, num_items // new_g
    epoch, position = divmod(start_batch, old_per_epoch)
    return epoch * new_per_epoch + math.ceil(position * old_g / new_g)


def make_loader(
    ctx: DistContext,
    dataset: Any,
    *,
    batch_size: int,
    seed: int,
    start_batch: int = 0,
    resumed_from: str | Path | None = None,
    shuffle: bool = True,
    num_workers: int = 0,
    pin_memory: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """This rank's endless loader: :func:`ws3d_train.data.dataset.make_loader` for one process, else a
    :class:`RankBatchSampler` over the same scene stream (``batch_size`` scenes per rank).

    ``resumed_from``: the checkpoint the run resumes from (its world size decides where the data
    continues, :func:`resume_start_batch`)."""
    from ws3d_train.data import dataset as data

    start_batch = resume_start_batch(resumed_from, ctx, num_items=len(dataset), batch_size=batch_size,
                                     start_batch=start_batch)
    if not ctx.enabled:
        return data.make_loader(dataset, batch_size=batch_size, seed=seed, start_batch=start_batch, shuffle=shuffle,
                                num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate_fn)
    sampler = RankBatchSampler(len(dataset), batch_size, rank=ctx.rank, world_size=ctx.world_size, seed=seed,
                               shuffle=shuffle, start_batch=start_batch)
    return data.make_loader(dataset, batch_size=batch_size, seed=seed, start_batch=start_batch, shuffle=shuffle,
                            num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate_fn,
                            batch_sampler=sampler)


class NullLogger:
    """What ranks other than 0 log with: nothing (rank 0's MetricsLogger writes the run's log)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    tensorboard_enabled = False

    def log(self, step: int, values: dict[str, Any]) -> dict[str, Any]:
        return {"step": int(step), **values}

    def advance(self, steps: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "NullLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        pass
