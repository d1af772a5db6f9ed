"""Progress reporting for slow launcher steps (download, extraction, hashing, conversion).

The model store reports progress through a plain callable so that the launcher can
route it wherever its logs go; `LogProgress` is the default, which writes short
human-readable lines to stderr and throttles them so a 500 MB hash does not print
thousands of lines.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

ProgressFn = Callable[[str, float, "float | None"], None]
"""`progress(stage, done, total)`: `total` is None when the size is not known yet."""

BYTE_STAGES = frozenset({"download", "extract", "hash"})
"""Stages whose `done`/`total` count bytes; every other stage counts steps."""


def _amount(stage: str, value: float) -> str:
    """Bytes as MB for byte stages, plain step counts otherwise."""
    if stage in BYTE_STAGES:
        return f"{value / 1e6:.1f} MB"
    return f"{value:g}"


class LogProgress:
    """Writes one line per stage start, per `every` fraction of progress and per stage end.

    Stages with an unknown total print at most once per `interval_s` seconds, so a
    long step still shows it is alive without flooding the log.
    """

    def __init__(self, stream: TextIO | None = None, every: float = 0.25, interval_s: float = 2.0) -> None:
        self._stream = stream
        self._every = every
        self._interval_s = interval_s
        self._stage: str | None = None
        self._next_fraction = 0.0
        self._last_print = 0.0

    def __call__(self, stage: str, done: float, total: float | None) -> None:
        if stage != self._stage:
            self._stage, self._next_fraction, self._last_print = stage, 0.0, 0.0
        if not self._due(done, total):
            return
        if total:
            text = f"{_amount(stage, done)} / {_amount(stage, total)} ({100 * done / total:.0f}%)"
        else:
            text = _amount(stage, done)
        stream = self._stream or sys.stderr
        print(f"ember: {stage}: {text}", file=stream, flush=True)

    def _due(self, done: float, total: float | None) -> bool:
        """Whether this update crosses the next reporting threshold."""
        now = time.monotonic()
        if total:
            fraction = done / total
            if fraction < self._next_fraction and fraction < 1.0:
                return False
            while self._next_fraction <= fraction:
                self._next_fraction += self._every
            return True
        if self._last_print and now - self._last_print < self._interval_s:
            return False
        self._last_print = now
        return True
