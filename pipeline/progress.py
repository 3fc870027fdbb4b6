"""Progress that reads well on a terminal and in a log file.

On a terminal (the stream is a TTY) :func:`progress_bar` is a tqdm bar. Anywhere else (a cluster
job's log, ``make demo > log``, a pipe) it is :class:`LineProgress`: one plain line
(``desc: 12/40 scenes (30%), 1.3 scene/s, 9 s elapsed``) every ``interval_s`` seconds and one at
the end, never carriage-return updates. Reads and writes nothing else.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

__all__ = ["LineProgress", "progress_bar", "quiet_library_bars"]

DEFAULT_INTERVAL_S = 10.0
"""Seconds between two plain progress lines (override with WS3D_PROGRESS_INTERVAL_S)."""


class LineProgress:
    """A tqdm-compatible subset (update, set_postfix, close, iteration, context manager) that
    prints a plain line at most every ``interval_s`` seconds and once when closed."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        interval_s: float | None = None,
        stream: IO[str] | None = None,
        enabled: bool = True,
    ):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = int(initial)
        self._initial = int(initial)
        self.interval_s = float(os.environ.get("WS3D_PROGRESS_INTERVAL_S", DEFAULT_INTERVAL_S)) if interval_s is None else interval_s
        self.stream = stream
        self.enabled = enabled
        self.postfix: dict[str, Any] = {}
        self._t0 = time.monotonic()
        self._last = self._t0
        self._closed = False
        self._written = -1
        self.lines = 0

    def _write(self, final: bool = False) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self._t0
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self._initial) / elapsed if elapsed > 0 else 0.0
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        word = "done" if final else "elapsed"
        stream = self.stream or sys.stderr
        stream.write(f"{self.desc}: {done} {self.unit}{pct}, {rate:.3g} {self.unit}/s, {elapsed:.0f} s {word}{extra}\n")
        stream.flush()
        self._written = self.n
        self.lines += 1

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self._write()

    def set_postfix(self, values: dict[str, Any] | None = None, refresh: bool = False, **kwargs: Any) -> None:
        self.postfix = {**(values or {}), **kwargs}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n > self._initial and self.n != self._written:  # no repeat of the last line
                self._write(final=True)

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "LineProgress: nothing to iterate"
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def quiet_library_bars(stream: IO[str] | None = None) -> bool:
    """Turn off other libraries' tqdm bars (transformers' "Loading weights", hub downloads) when
    ``stream`` (default stderr) is not a terminal, also in worker processes started later (through
    the environment); our own progress is :func:`progress_bar`'s plain lines. Returns whether it did."""
    if _is_terminal(stream or sys.stderr):
        return False
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    return True


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    enabled: bool = True,
    interval_s: float | None = None,
    stream: IO[str] | None = None,
    **tqdm_kwargs: Any,
) -> Any:
    """A tqdm bar on a terminal, :class:`LineProgress` otherwise, nothing when not ``enabled``.

    ``stream`` defaults to stderr (where tqdm writes). Extra keyword arguments go to tqdm only.
    """
    stream = stream or sys.stderr
    if enabled and _is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=stream, **tqdm_kwargs)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, interval_s=interval_s,
                        stream=stream, enabled=enabled)
