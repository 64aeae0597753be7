"""Logging set up once for every command: stderr, one line per record.

Under journald (stderr is the journal stream systemd names in JOURNAL_STREAM) a line
carries no timestamp of its own (the journal adds one) but a syslog priority prefix
(``<4>`` for a warning), so ``journalctl -p warning`` finds what it should. Anywhere
else a line starts with an RFC 3339 timestamp with its zone, then the level.
"""

from __future__ import annotations

import logging
import os
import sys
import time

# syslog priorities (RFC 5424) by logging level
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def under_journald(stream=None) -> bool:
    """True when ``stream`` (stderr) is the journal stream systemd connected us to."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return f"<{priority}>{super().format(record)}"


class Rfc3339Formatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        t = time.localtime(record.created)
        zone = time.strftime("%z", t)
        return (time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}"
                + (zone[:3] + ":" + zone[3:] if zone else "Z"))


def formatter(stream=None) -> logging.Formatter:
    if under_journald(stream):
        return JournalFormatter("%(message)s")
    return Rfc3339Formatter("%(asctime)s %(levelname)-7s %(message)s")


def configure(level: str | int = "info") -> None:
    """Send every logger's records to stderr in the format above (idempotent)."""
    root = logging.getLogger()
    if isinstance(level, str):
        level = getattr(logging, level.upper(), logging.INFO)
    root.setLevel(level)
    if not any(getattr(h, "_hdrlog", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(formatter(sys.stderr))
        handler._hdrlog = True  # type: ignore[attr-defined]
        root.addHandler(handler)


class StatusLines:
    """Periodic status lines that grow rarer while nothing changes.

    ``due(line, now)`` is True when ``line`` differs from the last one logged, or when the
    same line has not been logged for a gap that doubles each time (interval, 2x, 4x, ...
    at most ``max_gap`` seconds): an idle process says it is alive without filling the log."""

    def __init__(self, interval: float, max_gap: float = 600.0):
        self.interval, self.max_gap = interval, max(max_gap, interval)
        self._last = ""
        self._at = float("-inf")
        self._gap = interval

    def due(self, line: str, now: float) -> bool:
        if line != self._last:
            self._last, self._at, self._gap = line, now, self.interval
            return True
        if now - self._at >= self._gap:
            self._at, self._gap = now, min(self._gap * 2, self.max_gap)
            return True
        return False
