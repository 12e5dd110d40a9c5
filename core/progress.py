"""Progress lines for long stages: counts done, rate, time left.

Each worker process logs its own share; with the DirectRunner that is the whole job.
"""
from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("synpref.core.progress")

_lock = threading.Lock()
_trackers: dict[str, "Progress"] = {}


class Progress:
    def __init__(self, stage: str, total: int | None, unit: str, every_s: float = 5.0):
        self.stage, self.total, self.unit, self.every_s = stage, total, unit, every_s
        self.done = 0
        self.start = time.monotonic()
        self._last = self.start  # first line after ``every_s``: early rates are meaningless

    def update(self, n: int = 1) -> None:
        with _lock:
            self.done += n
            now = time.monotonic()
            finished = self.total is not None and self.done >= self.total
            if finished or now - self._last >= self.every_s:
                self._last = now
                log.info(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        rate = self.done / elapsed
        if self.total:
            left = max(self.total - self.done, 0)
            eta = f", ~{left / rate:.0f}s left" if rate > 0 and left else ""
            pct = 100.0 * self.done / self.total
            return f"[{self.stage}] {self.done}/{self.total} {self.unit} ({pct:.0f}%), {rate:.2f} {self.unit}/s{eta}"
        return f"[{self.stage}] {self.done} {self.unit}, {rate:.2f} {self.unit}/s"


def progress(stage: str, total: int | None, unit: str) -> Progress:
    """The process-wide tracker for ``stage`` (created on first use)."""
    with _lock:
        if stage not in _trackers:
            _trackers[stage] = Progress(stage, total, unit)
        return _trackers[stage]


def reset() -> None:
    with _lock:
        _trackers.clear()
