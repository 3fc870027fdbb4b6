"""Training metrics: a JSONL log (one object per logged step), TensorBoard when importable, a
progress bar (tqdm on a terminal, a plain line every few seconds in a log: `pipeline.progress`).

Writes ``<out_dir>/metrics.jsonl`` and, when ``torch.utils.tensorboard`` imports (the optional
``tensorboard`` package), event files under ``<out_dir>/tensorboard/``. A resumed run first drops
the lines of steps after the checkpoint it resumes from, so the log never holds a step twice.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from pipeline.progress import progress_bar

__all__ = ["MetricsLogger", "progress_bar", "read_metrics"]

METRICS_FILE = "metrics.jsonl"


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """All records of ``<out_dir>/metrics.jsonl`` (empty if the file does not exist)."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):  # tensors and numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than crash
    return value


class MetricsLogger:
    """JSONL + optional TensorBoard + progress. Use as a context manager or call `close()`."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
        description: str = "train",
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / METRICS_FILE
        if start_step > 0 and self.path.is_file():
            # keep what the resumed-from checkpoint had seen; later lines are redone
            kept = [r for r in read_metrics(self.out_dir) if int(r.get("step", 0)) <= start_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif start_step == 0:
            self.path.write_text("")
        self._file = self.path.open("a")
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the optional `tensorboard` package is not installed
                SummaryWriter = None
            if SummaryWriter is not None:
                self._writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=start_step or None)
        self._bar = progress_bar(total=total_steps, initial=start_step, desc=description, unit="step", enabled=progress,
                                 dynamic_ncols=True)
        self._t0 = time.time()

    @property
    def tensorboard_enabled(self) -> bool:
        return self._writer is not None

    def log(self, step: int, values: dict[str, Any]) -> dict[str, Any]:
        """Append one record ``{"step", "time_s", **values}`` and mirror it to TensorBoard."""
        record = {"step": int(step), "time_s": round(time.time() - self._t0, 4)}
        record.update({k: _plain(v) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, step)
        shown = {k: f"{v:.4g}" for k, v in record.items() if k.startswith("loss") and isinstance(v, float)}
        self._bar.set_postfix(shown, refresh=False)
        return record

    def advance(self, steps: int = 1) -> None:
        """Move the progress bar."""
        self._bar.update(steps)

    def close(self) -> None:
        self._bar.close()
        self._file.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
