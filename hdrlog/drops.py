"""Pacing shared by the collector and the server: rate-limited drop warnings and retry backoff.

Every place that drops data counts it and says which knob to raise, on a doubling interval so a
flood of drops is one line now and then, not a line per batch (netobserv's rule). ``Every`` is
the interval; ``DropWarning`` is the line: what was dropped, how much since the last line and in
all, and what to change. ``backoff_delay`` is the one retry formula: capped, jittered
exponential backoff (the collector's reconnects, the server's INSERT retries).
"""

from __future__ import annotations

import logging
import random
import time


class Every:
    """Rate limit for a log line: due at once, then after 5 s, doubling up to 10 minutes."""

    def __init__(self, first: float = 5.0, most: float = 600.0):
        self.first, self.most = first, most
        self._every, self._next = first, 0.0
        self.held = 0  # occurrences not logged since the last line

    def due(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            self.held += 1
            return False
        self._next = now + self._every
        self._every = min(self._every * 2, self.most)
        return True

    def reset(self) -> None:
        self._every, self._next, self.held = self.first, 0.0, 0


class DropWarning:
    """One "dropped N ..., raise X" line, at most on ``Every``'s doubling interval.

    ``dropped(n, detail)`` counts ``n`` (records, keys, batches: ``unit`` says which) and, when
    due, logs ``"<what>: dropped <n since the last line> <unit> (<total> so far; <detail>) —
    <advice>"``. The counts are kept whether or not a line is written (``total``).
    """

    def __init__(self, logger: logging.Logger, what: str, advice: str, *, unit: str = "records",
                 level: int = logging.WARNING, every: Every | None = None):
        self.log, self.what, self.advice, self.unit, self.level = logger, what, advice, unit, level
        self.every = every or Every()
        self.total = 0
        self._since = 0

    def dropped(self, n: int, detail: str = "") -> bool:
        """Count ``n`` dropped; True when this call wrote the line."""
        self.total += n
        self._since += n
        if not self.every.due():
            return False
        extra = f"; {detail}" if detail else ""
        self.log.log(self.level, "%s: dropped %d %s (%d so far%s) — %s", self.what, self._since, self.unit,
                     self.total, extra, self.advice)
        self._since = 0
        return True


def backoff_delay(attempt: int, first: float, cap: float, jitter: tuple[float, float] = (0.5, 1.0)) -> float:
    """Seconds to wait before retry number ``attempt`` (1, 2, ...): ``first`` doubling per attempt,
    at most ``cap``, times a uniform draw from ``jitter`` so many clients do not retry in step."""
    return min(cap, first * 2 ** max(attempt - 1, 0)) * random.uniform(*jitter)
