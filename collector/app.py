"""The collector: capture -> decode -> batch -> send, started in order and stopped in reverse.

The capture thread polls the BPF ring buffer and hands decoded column chunks
to the asyncio loop, where the batcher closes batches and the sender streams
them. On SIGINT/SIGTERM the collector closes the open batch, waits up to
``shutdown_timeout`` for acks, detaches its own TC filters and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
import uuid

import numpy as np

from hdrlog.collector.batcher import Batcher
from hdrlog.collector.capture import Capture, CaptureConfig
from hdrlog.collector.config import CollectorConfig
from hdrlog.collector.metrics import CollectorMetrics
from hdrlog.collector.sender import Outbox, Sender
from hdrlog.collector import tls
from hdrlog.config import parse_hostport
from hdrlog.metrics_http import MetricsHttp

log = logging.getLogger("hdrlog.collector")

STATS_INTERVAL = 10.0  # seconds between collector_stats rows
POLL_MS = 100
# Capture counters that mean a record was not kept (each becomes drop_<name>).
CAPTURE_DROP_REASONS = ("ringbuf_full",)


class Collector:
    def __init__(self, config: CollectorConfig):
        self.config = config
        # A fresh id per incarnation: seqs restart at 1, so the server's dedup must not confuse runs.
        self.collector_id = f"{config.host_id}/{uuid.uuid4().hex[:12]}"
        self.capture = Capture(CaptureConfig(ifaces=list(config.iface), ringbuf_bytes=config.ringbuf_bytes,
                                             sample_rate=config.sample, dns_ports=list(config.dns_ports)))
        self.outbox: Outbox | None = None
        self.sender: Sender | None = None
        self.batcher: Batcher | None = None
        self.records_captured = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._thread_stop = threading.Event()
        self._capture_error: BaseException | None = None
        self._stats_sent: dict[str, int] = {}
        self._stats_at = time.monotonic()
        self.metrics = CollectorMetrics(self.counters, self._sending)
        self._metrics_http: MetricsHttp | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.outbox = Outbox(self.config.max_unacked_rows)
        self.sender = Sender(self.config.server, self.outbox,
                             credentials=tls.channel_credentials(self.config),
                             on_connected=self._on_connected)
        self.batcher = Batcher(collector_id=self.collector_id, host=self.config.host_id,
                               batch_rows=self.config.batch_rows, batch_interval=self.config.batch_interval,
                               emit=self._emit)
        self.capture.start()
        try:
            listen = parse_hostport("metrics_listen", self.config.metrics_listen, allow_empty=True)
            if listen:
                self._metrics_http = MetricsHttp(self.metrics.registry, *listen)
                log.info("collector metrics on %s:%d/metrics", listen[0], self._metrics_http.port)
            self.sender.start()
            self._thread = threading.Thread(target=self._capture_loop, name="hdrlog-capture", daemon=True)
            self._thread.start()
        except BaseException:
            if self._metrics_http:
                self._metrics_http.stop()
            self.capture.stop()
            raise
        where = ", ".join(f"{i}/{d}" for i, d in self.capture.attachments)
        log.info("collector %s capturing on %s, sending to %s", self.collector_id, where, self.config.server)

    async def stop(self) -> None:
        """Flush, wait briefly for acks, detach. Safe to call twice."""
        self._thread_stop.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None
        await asyncio.sleep(0)  # let chunks queued by the capture thread land in the batcher
        if self.batcher is not None and self.sender is not None:
            self._add_stats()
            self.batcher.flush()
            drained = await self.sender.wait_drained(self.config.shutdown_timeout)
            if not drained:
                log.error("stopping with %d batches (%d records) unacked by the server: they are lost",
                          len(self.outbox or ()), self.outbox.rows if self.outbox else 0)
            await self.sender.stop()
        if self._metrics_http is not None:
            self._metrics_http.stop()
            self._metrics_http = None
        self.capture.stop()

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set or capture fails."""
        next_status = time.monotonic() + self.config.status_interval
        while not stop.is_set():
            assert self.batcher is not None
            timeout = min(self.batcher.seconds_until_due(), 0.5)
            try:
                await asyncio.wait_for(stop.wait(), max(timeout, 0.01))
            except asyncio.TimeoutError:
                pass
            if self._capture_error is not None:
                raise RuntimeError(f"capture failed: {self._capture_error}") from self._capture_error
            self.batcher.flush_if_due()
            now = time.monotonic()
            if now - self._stats_at >= STATS_INTERVAL:
                self._add_stats()
            if self.config.status_interval and now >= next_status:
                log.info("%s", self.status_line())
                next_status = now + self.config.status_interval

    # -- the record path -------------------------------------------------------------------
    def _capture_loop(self) -> None:
        assert self._loop is not None
        try:
            while not self._thread_stop.is_set():
                chunk = self.capture.poll(POLL_MS)
                if chunk:
                    self._loop.call_soon_threadsafe(self._on_packets, chunk)
        except BaseException as exc:  # surfaced by run(); the collector must not hang silently
            self._capture_error = exc

    def _on_packets(self, chunk: dict[str, object]) -> None:
        assert self.batcher is not None
        self.records_captured += len(chunk["ts"])  # type: ignore[arg-type]
        self.batcher.add("packets", chunk)

    def _emit(self, batch, rows: int) -> None:
        assert self.outbox is not None and self.sender is not None
        dropped = self.outbox.put(batch, rows)
        if dropped:
            self.sender.counters.rows_dropped_unacked_full += dropped
            log.warning("unacked buffer full (max_unacked_rows=%d): dropped %d oldest records; "
                        "the server is not keeping up or unreachable — raise max_unacked_rows or check it",
                        self.config.max_unacked_rows, dropped)

    def _on_connected(self, up: bool) -> None:
        log.info("server %s %s", self.config.server, "connected" if up else "disconnected")

    # -- accounting ------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """Cumulative counts: packets seen, records logged, truncated headers, and every
        record not kept by reason (drop_<reason>)."""
        capture = self.capture.counters()
        out = {"seen": capture.get("seen", 0), "logged": self.records_captured,
               "truncated": capture.get("truncated", 0)}
        for reason in CAPTURE_DROP_REASONS:
            out[f"drop_{reason}"] = capture.get(reason, 0)
        if self.sender is not None:
            c = self.sender.counters
            out["drop_unacked_full"] = c.rows_dropped_unacked_full
            out["drop_rejected_by_server"] = c.rows_rejected
        return out

    def _sending(self) -> dict[str, float]:
        if self.sender is None or self.outbox is None:
            return {}
        c = self.sender.counters
        return {"sent_rows": c.rows_sent, "acked_rows": c.rows_acked, "reconnects": c.reconnects,
                "unacked_rows": self.outbox.rows, "connected": float(self.sender.connected)}

    def _add_stats(self) -> None:
        """Queue one collector_stats row per counter with its change since the last row."""
        now = time.monotonic()
        current = self.counters()
        names = sorted(current)
        deltas = [current[n] - self._stats_sent.get(n, 0) for n in names]
        interval_ms = int((now - self._stats_at) * 1000)
        self._stats_sent, self._stats_at = current, now
        assert self.batcher is not None
        n = len(names)
        self.batcher.add("collector_stats", {
            "ts": np.full(n, time.time_ns(), dtype="<i8"),
            "interval_ms": np.full(n, interval_ms, dtype="<u4"),
            "counter": names,
            "value": np.array(deltas, dtype="<u8"),
        })

    def status_line(self) -> str:
        c = self.counters()
        s = self.sender.counters if self.sender else None
        dropped = sum(v for k, v in c.items() if k.startswith("drop_"))
        return (f"collector: captured={c['logged']} sent={s.rows_sent if s else 0} "
                f"acked={s.rows_acked if s else 0} dropped={dropped} "
                f"unacked={self.outbox.rows if self.outbox else 0} "
                f"server={'up' if self.sender and self.sender.connected else 'down'}")


async def serve(config: CollectorConfig) -> int:
    """Entry point of `hdrlog collector run`: run until SIGINT/SIGTERM, then stop cleanly."""
    collector = Collector(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await collector.start()
    except (ValueError, OSError) as exc:  # a bad interface, no permission to load BPF, ...
        log.error("collector: unable to start: %s", exc)
        return 1
    try:
        await collector.run(stop)
    finally:
        await collector.stop()
        log.info("%s", collector.status_line())
    return 0
