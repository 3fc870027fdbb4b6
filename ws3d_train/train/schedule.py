"""Learning-rate schedule: linear warm-up, then cosine decay to a floor. Pure, no I/O."""
from __future__ import annotations

import math

__all__ = ["lr_at"]


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.01) -> float:
    """Learning rate of optimiser step ``step`` (0-based).

    Warm-up: ``base_lr * (step + 1) / (warmup_steps + 1)`` for ``step < warmup_steps`` (never 0, so
    the first step already moves). Then a half cosine from ``base_lr`` at ``warmup_steps`` down to
    ``base_lr * min_lr_ratio`` at ``total_steps - 1``; constant at that floor afterwards.

    Args:
        step: optimiser step, >= 0.
        base_lr: peak learning rate.
        warmup_steps: steps of linear warm-up (0: none).
        total_steps: length of the whole schedule.
        min_lr_ratio: the floor as a fraction of ``base_lr``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return base_lr * (step + 1) / (warmup_steps + 1)
    min_lr = base_lr * min_lr_ratio
    decay_steps = total_steps - 1 - warmup_steps
    if decay_steps <= 0:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
