"""The server's scheduled reports (``--report-every``): one report per period, on the clock."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from hdrlog.report.build import Report, run
from hdrlog.report.config import ReportConfig
from hdrlog.report.connection import Connection

log = logging.getLogger("hdrlog.report")


class ReportScheduler:
    """Runs a report every ``every`` seconds inside the server, on its own store connection."""

    def __init__(self, connect_fn: Callable[[], Connection], cfg: ReportConfig, every: float):
        self.connect_fn, self.cfg, self.every = connect_fn, cfg, every
        self._task: asyncio.Task | None = None
        self.reports = 0
        self.failures = 0
        self.last: Report | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="hdrlog-report")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            now = time.time()
            await asyncio.sleep(self.every - (now % self.every) + 0.5)
            try:
                self.last = await asyncio.to_thread(self.run_once)
                self.reports += 1
                log.info("report: %s", self.last.summary())
            except Exception as exc:  # noqa: BLE001 - the next period tries again
                self.failures += 1
                log.error("report: failed, next try in %.0fs: %s", self.every, exc)

    def run_once(self, now: float | None = None) -> Report:
        from dataclasses import replace
        cfg = replace(self.cfg, since=f"{self.every}s", until="")
        conn = self.connect_fn()
        try:
            return run(cfg, conn, now=now)
        finally:
            conn.close()
