"""Training checkpoints: save, load (``weights_only=True``), find the latest, prune old ones.

Writes ``<dir>/step_<step:08d>.pt`` atomically (a temporary file renamed into place, so a killed
run never leaves a truncated checkpoint). A checkpoint holds only tensors and plain containers
(dicts, lists, str, int, float, bool, None), so ``torch.load(path, weights_only=True)`` reads it:

- ``format``: :data:`CHECKPOINT_FORMAT`; ``schema_version``: the store schema it was trained on;
  ``ws3d_version``: the package version;
- ``step``: optimiser steps done; ``batches_consumed``: loader batches consumed (= step x
  accumulation), the data position to resume from;
- ``model`` and ``optimizer`` state dicts; ``rng``: python, numpy, torch and CUDA generator states;
- ``config``: the resolved config as a plain dict (``pipeline.config.to_dict``);
- ``extra``: anything else plain (e.g. the last metrics).
"""
from __future__ import annotations

import importlib.metadata
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import schema
from pipeline.errors import UserError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "checkpoint_path",
    "get_rng_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
    "set_rng_state",
    "ws3d_version",
]

CHECKPOINT_FORMAT = 1
"""Bumped when the layout of a checkpoint changes."""

_NAME = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unreadable, or from an incompatible format/schema."""


def ws3d_version() -> str:
    try:
        return importlib.metadata.version("ws3d")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree, not installed
        return "unknown"


def get_rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as tensors and plain values."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"])
    )
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def checkpoint_path(directory: str | Path, step: int) -> Path:
    """``<directory>/step_<step:08d>.pt``."""
    return Path(directory) / f"step_{step:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint in ``directory``, by step."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def prune_checkpoints(directory: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` latest checkpoints (keep <= 0 keeps all); return the deleted."""
    if keep <= 0:
        return []
    doomed = [p for _, p in list_checkpoints(directory)[:-keep]]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def save_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    batches_consumed: int,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (see the module docstring for its content); return its path.

    Args:
        path: the file to write (its directory is created).
        model: its ``state_dict()`` is saved.
        optimizer: its ``state_dict()`` is saved (None: not saved, e.g. an export).
        step: optimiser steps done.
        batches_consumed: loader batches consumed so far.
        config: the resolved config as a plain dict.
        extra: more plain values (must load under ``weights_only=True``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "schema_version": schema.SCHEMA_VERSION,
        "ws3d_version": ws3d_version(),
        "step": int(step),
        "batches_consumed": int(batches_consumed),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": get_rng_state(),
        "config": config,
        "extra": extra or {},
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and check its format and schema version.

    Raises:
        CheckpointError naming the file: missing, unreadable, or of another format/schema.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises pickle/zip/runtime errors alike for a bad file
        raise CheckpointError(f"{path}: unreadable checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a ws3d checkpoint of format {CHECKPOINT_FORMAT}")
    if ckpt.get("schema_version") != schema.SCHEMA_VERSION:
        raise CheckpointError(
            f"{path}: trained on store schema {ckpt.get('schema_version')}, this ws3d reads "
            f"{schema.SCHEMA_VERSION}"
        )
    return ckpt
