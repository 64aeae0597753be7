"""The collector: capture -> decode -> batch -> send, started in order and stopped in reverse.

The capture thread polls the BPF ring buffer and hands decoded column chunks
to the asyncio loop, where the batcher closes batches, the spool writes each one
to disk (``--spool``, on by default) and the sender streams them. On
SIGINT/SIGTERM the collector closes the open batch, waits up to
``shutdown_timeout`` for acks (what is still unacked stays in the spool for the
next start), detaches its classifier and exits 0. Under systemd the classifier
stays attached through the fd store for the next collector instead
(collector/handover.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
import uuid

import numpy as np

from hdrlog.collector.batcher import Batcher
from hdrlog.collector.capture import Capture, CaptureConfig
from hdrlog.collector.config import CollectorConfig
from hdrlog.collector.metrics import CollectorMetrics
from hdrlog.collector.sender import Sender
from hdrlog.collector.spool import Outbox, Spool, SpoolError
from hdrlog.collector import fdstore, tls
from hdrlog.config import parse_hostport
from hdrlog.drops import DropWarning
from hdrlog.metrics_http import MetricsHttp

log = logging.getLogger("hdrlog.collector")

STATS_INTERVAL = 10.0  # seconds between collector_stats rows
POLL_MS = 100
# Capture counters that mean a record was not kept (each becomes drop_<name>).
CAPTURE_DROP_REASONS = ("ringbuf_full", "filtered", "sampled_out")
# Of those, the ones the configuration asks for (filters, sampling): not losses.
DELIBERATE_DROPS = ("drop_filtered", "drop_sampled_out")
# Capture counters about what was kept, reported as they are. The TLS reassembly's are about
# decoding, not records: an evicted or mismatched first segment loses a hello's columns, no row.
CAPTURE_KEPT = ("flowed", "flow_map_full", "payload", "conn_tracked", "conn_map_full", "tls_reassembled",
                "tls_reassembly_evicted", "tls_reassembly_mismatched",
                # names (collector/names.py): DNS matching, passive DNS and connection names, QUIC hellos
                "dns_rtt_matched", "dns_queries_evicted", "dns_names_evicted", "dns_hosts_evicted",
                "conn_names_evicted", "quic_reassembled", "quic_reassembly_evicted")
CAPTURE_DROP_REASONS += ("dns_names_dropped",)  # passive DNS rows over the per-interval cap
IFACE_RESCAN_S = 2.0  # seconds between looks for new interfaces matching an --iface glob
CONN_POLL_S = 1.0  # seconds between reads of the kernel's connection map (auto mode)


class Collector:
    def __init__(self, config: CollectorConfig):
        self.config = config
        # Without a spool: a fresh id per incarnation (seqs restart at 1, so the server's dedup must not
        # confuse runs). With one, the spool's persistent id and seqs (set in start()).
        self.collector_id = f"{config.host_id}/{uuid.uuid4().hex[:12]}"
        self.spool: Spool | None = None
        self._filter_mtime: float | None = None
        self.capture = Capture(CaptureConfig.from_config(config, self._filter_rules()))
        self.outbox: Outbox | None = None
        self._warn_unacked = DropWarning(
            log, f"unacked buffer full (max_unacked_rows={config.max_unacked_rows})",
            "the server is not keeping up or unreachable: raise max_unacked_rows or check it")
        self.sender: Sender | None = None
        self.batcher: Batcher | None = None
        self.records_captured = 0
        self.flows_captured = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._thread_stop = threading.Event()
        self._capture_error: BaseException | None = None
        self._stats_sent: dict[str, int] = {}
        # collector_stats deltas not yet in a batch, and those in each unacked batch: when a full
        # spool drops a batch, its deltas are reported again in the next row instead of vanishing.
        self._stats_pending: dict[str, int] = {}
        self._stats_by_seq: dict[int, dict[str, int]] = {}
        self._stats_at = time.monotonic()
        self._next_filter_check = 0.0
        self._next_iface_check = time.monotonic() + IFACE_RESCAN_S
        self.metrics = CollectorMetrics(self.counters, self._sending, self.capture.map_fill)
        self._metrics_http: MetricsHttp | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        credentials = tls.channel_credentials(self.config)
        problem = await asyncio.to_thread(tls.check_server, self.config)
        if problem:
            # Keep capturing (into the spool) while someone fixes the server: but say why nothing gets through.
            log.error("collector: %s", problem)
        self.capture.start()
        try:
            self.start_pipeline(credentials)
            self._thread = threading.Thread(target=self._capture_loop, name="hdrlog-capture", daemon=True)
            self._thread.start()
        except BaseException:
            if self._metrics_http:
                self._metrics_http.stop()
            self.capture.stop()
            if self.spool is not None:
                self.spool.close()
            raise
        where = ", ".join(f"{i}/{d}" for i, d in self.capture.attachments)
        log.info("collector %s capturing on %s, sending to %s", self.collector_id, where, ", ".join(self.config.server))
        fdstore.notify("READY=1")  # systemd (Type=notify): a restart returns once we capture

    def start_pipeline(self, credentials, start_sender: bool = True) -> None:
        """Everything after capture: spool, outbox, batcher, metrics, sender (tests drive it alone)."""
        self._open_spool()
        self.outbox = Outbox(self.config.max_unacked_rows, self.spool)
        if self.spool is not None:
            self.outbox.restore(list(self.spool.items.values()))
        self.sender = Sender(self.config.server, self.outbox, credentials=credentials,
                             on_connected=self._on_connected)
        self.batcher = Batcher(collector_id=self.collector_id, host=self.config.host_id,
                               batch_rows=self.config.batch_rows, batch_interval=self.config.batch_interval,
                               compress_level=self.config.batch_compression, emit=self._emit, seq_source=self.spool.next_seq if self.spool is not None else None,
                               id_source=(lambda: self.spool.collector_id) if self.spool is not None else None,
                               on_records=self.spool.count_read if self.spool is not None else None)
        listen = parse_hostport("metrics_listen", self.config.metrics_listen, allow_empty=True)
        if listen:
            self._metrics_http = MetricsHttp(self.metrics.registry, *listen)
            log.info("collector metrics on %s:%d/metrics", listen[0], self._metrics_http.start())
        if start_sender:
            self.sender.start()

    async def stop(self) -> None:
        """Flush, wait briefly for acks, detach. Safe to call twice."""
        self._thread_stop.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None
        await asyncio.sleep(0)  # let chunks queued by the capture thread land in the batcher
        if self.batcher is not None and self.sender is not None:
            # Detach now, so the last packets and the final flow maps make it into the last batch.
            chunk = self.capture.poll(0) if self.capture.attachments else None
            if chunk:
                self._on_packets(chunk)
            self.capture.stop()
            flows = self.capture.drain_flows()
            if flows:
                self._on_flows(flows)
            conns = self.capture.drain_connections()
            if conns:
                self._on_connections(conns)
            self._on_dns_names(self.capture.drain_dns_names())
            self._add_stats()
            self.batcher.flush()
            # A refused sender sends nothing more: do not wait for acks that cannot come.
            wait = 0 if self.sender.refused else self.config.shutdown_timeout
            drained = await self.sender.wait_drained(wait)
            if not drained and self.spool is not None:
                memory = self.outbox.memory_rows if self.outbox else 0
                log.warning("stopping with %d batches (%d records) unacked by the server: they stay in the "
                            "spool %s and are sent when the collector starts again",
                            len(self.outbox or ()), (self.outbox.rows if self.outbox else 0) - memory, self.spool.dir)
                if memory:  # the disk refused them
                    log.error("stopping with %d records held in memory only (the spool's disk refused them): lost; "
                              "%s", memory, "the next start counts them as drop_lost_at_crash"
                              if self.spool.tally is not None else "uncounted (no tally on this disk)")
            elif not drained:
                log.error("stopping with %d batches (%d records) unacked by the server and no spool: they are lost",
                          len(self.outbox or ()), self.outbox.rows if self.outbox else 0)
            await self.sender.stop()
        if self._metrics_http is not None:
            self._metrics_http.stop()
            self._metrics_http = None
        self.capture.stop()
        if self.spool is not None:
            self.spool.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set or capture fails."""
        from hdrlog.logs import StatusLines

        next_status = time.monotonic() + self.config.status_interval
        status = StatusLines(self.config.status_interval)
        while not stop.is_set():
            assert self.batcher is not None
            timeout = min(self.batcher.seconds_until_due(), 0.5)
            try:
                await asyncio.wait_for(stop.wait(), max(timeout, 0.01))
            except asyncio.TimeoutError:
                pass
            if self._capture_error is not None:
                raise RuntimeError(f"capture failed: {self._capture_error}") from self._capture_error
            if self.sender is not None and self.sender.refused:
                raise RuntimeError(self.sender.refused)
            self.batcher.flush_if_due()
            now = time.monotonic()
            if self.config.filter_file and now >= self._next_filter_check:
                self._next_filter_check = now + 1.0
                await asyncio.get_running_loop().run_in_executor(None, self.reload_filters)
            if now >= self._next_iface_check:
                self._next_iface_check = now + IFACE_RESCAN_S
                await asyncio.get_running_loop().run_in_executor(None, self._follow_interfaces)
            if now - self._stats_at >= STATS_INTERVAL:
                self._add_stats()
            if self.config.status_interval and now >= next_status:
                line = self.status_line()
                if status.due(line, now):
                    log.info("collector: %s", line)
                next_status = now + self.config.status_interval

    def _follow_interfaces(self) -> None:
        try:
            self.capture.attach_new_interfaces()
        except Exception as e:  # noqa: BLE001 - a netlink hiccup must not stop the capture
            log.warning("capture: looking for new interfaces failed: %s", e)

    # -- filters -----------------------------------------------------------------------------
    def _filter_rules(self) -> list[str]:
        """--filter rules plus the filter file's, remembering the file's mtime."""
        rules = list(self.config.filter)
        if self.config.filter_file:
            self._filter_mtime = os.stat(self.config.filter_file).st_mtime
            with open(self.config.filter_file) as f:
                rules += f.read().splitlines()
        return rules

    def reload_filters(self, force: bool = False) -> None:
        """Re-read the filter file when it changed (or when forced, on SIGHUP); keep the old rules on error."""
        if not self.config.filter_file:
            return
        try:
            if not force and os.stat(self.config.filter_file).st_mtime == self._filter_mtime:
                return
            self.capture.set_filters(self._filter_rules())
        except (OSError, ValueError) as e:
            log.error("filter_file %s: %s; keeping the previous filters", self.config.filter_file, e)

    def _open_spool(self) -> None:
        """Open the spool (unless --spool ''): identity, seqs and the batches an earlier run left."""
        if not self.config.spool:
            log.warning("no spool: unacked batches live in memory only (at most max_unacked_rows=%d records) "
                        "and are lost if the collector stops before the server acks them",
                        self.config.max_unacked_rows)
            return
        spool = Spool(self.config.spool, self.config.spool_max_bytes, self.config.host_id)
        try:
            left = spool.open()
        except SpoolError:
            raise
        except OSError as exc:
            spool.close()
            raise SpoolError(f"spool {self.config.spool}: {exc}") from None
        self.spool = spool
        self.collector_id = spool.collector_id
        if left:
            log.info("spool %s: %d batches (%d records) left by an earlier run, sending them first",
                     spool.dir, len(left), sum(b.rows for b in left))

    # -- the record path -------------------------------------------------------------------
    def _capture_loop(self) -> None:
        assert self._loop is not None
        next_drain = time.monotonic() + self.config.flow_interval
        next_conns = time.monotonic() + CONN_POLL_S
        try:
            while not self._thread_stop.is_set():
                chunk = self.capture.poll(POLL_MS)
                if chunk:
                    self._loop.call_soon_threadsafe(self._on_packets, chunk)
                if time.monotonic() >= next_drain:
                    next_drain += self.config.flow_interval
                    flows = self.capture.drain_flows()
                    if flows:
                        self._loop.call_soon_threadsafe(self._on_flows, flows)
                if time.monotonic() >= next_conns:
                    next_conns = time.monotonic() + CONN_POLL_S
                    conns = self.capture.drain_connections()
                    if conns:
                        self._loop.call_soon_threadsafe(self._on_connections, conns)
                    dns_names = self.capture.drain_dns_names()
                    if dns_names:
                        self._loop.call_soon_threadsafe(self._on_dns_names, dns_names)
        except BaseException as exc:  # surfaced by run(); the collector must not hang silently
            self._capture_error = exc

    def _on_flows(self, chunk: dict[str, object]) -> None:
        assert self.batcher is not None
        self.flows_captured += len(chunk["packets"])  # type: ignore[arg-type]
        self.batcher.add("flows", chunk)

    def _on_connections(self, chunk: dict[str, object]) -> None:
        assert self.batcher is not None
        self.batcher.add("connections", chunk)

    def _on_dns_names(self, chunk: dict[str, object] | None) -> None:
        if chunk:
            assert self.batcher is not None
            self.batcher.add("dns_names", chunk)

    def _on_packets(self, chunk: dict[str, object]) -> None:
        assert self.batcher is not None
        self.records_captured += len(chunk["ts"])  # type: ignore[arg-type]
        self.batcher.add("packets", chunk)

    def _emit(self, batch, rows: int) -> None:
        assert self.outbox is not None and self.sender is not None
        dropped = self.outbox.put(batch, rows)
        self._track_stats(batch)
        if dropped and self.spool is None:  # (with a spool, the spool and the outbox say what was dropped)
            self._warn_unacked.dropped(dropped, "the oldest, counted as drop_unacked_full")

    def _track_stats(self, batch) -> None:
        """Remember which counter deltas rode in this batch; re-report those of dropped batches."""
        assert self.outbox is not None
        lost = set(self.outbox.last_dropped) | set(self.outbox.discarded)
        self.outbox.discarded.clear()
        for seq in [s for s in self._stats_by_seq if s not in self.outbox]:
            deltas = self._stats_by_seq.pop(seq)
            if seq in lost:
                for name, value in deltas.items():
                    self._stats_sent[name] = self._stats_sent.get(name, 0) - value
        if self._stats_pending and any(t.name == "collector_stats" for t in batch.tables):
            if batch.seq in self.outbox:
                self._stats_by_seq[batch.seq] = self._stats_pending
            self._stats_pending = {}

    def _on_connected(self, up: bool) -> None:
        log.info("server %s %s", self.sender.target if self.sender else "?", "connected" if up else "disconnected")

    # -- accounting ------------------------------------------------------------------------
    def counters(self, reported: bool = False) -> dict[str, int]:
        """Cumulative counts: packets seen, records logged, truncated headers, and every
        record not kept by reason (drop_<reason>). ``reported``: for a collector_stats row."""
        capture = self.capture.counters(reported=reported)
        out = {"seen": capture.get("seen", 0), "logged": self.records_captured,
               "truncated": capture.get("truncated", 0)}
        out["flows"] = self.flows_captured
        out["connection_rows_interim"], out["connection_rows_final"] = self.capture.connection_rows
        for name in CAPTURE_KEPT:
            out[name] = capture.get(name, 0)
        for reason in CAPTURE_DROP_REASONS:
            out[f"drop_{reason}"] = capture.get(reason, 0)
        if self.sender is not None:
            c = self.sender.counters
            out["drop_rejected_by_server"] = c.rows_rejected
        if self.outbox is not None:
            # without a spool, or with one whose disk refuses: memory was full
            out["drop_unacked_full"] = self.outbox.memory_dropped_rows
        if self.spool is not None:
            # Cumulative per run; a crash's loss is counted once, by the run that found it.
            out["drop_spool_full"] = self.spool.dropped_rows
            out["drop_lost_at_crash"] = self.spool.lost_at_crash
            out["drop_spool_unreadable"] = self.outbox.unreadable_rows if self.outbox else 0
            out["drop_spool_corrupt"] = self.spool.corrupt_rows  # failed the checksum or did not parse
            out["spool_corrupt_files"] = self.spool.corrupt_files
            out["spool_write_errors"] = self.spool.write_errors  # each such batch was kept in memory
        return out

    def _sending(self) -> dict[str, float]:
        if self.sender is None or self.outbox is None:
            return {}
        c = self.sender.counters
        return {"sent_rows": c.rows_sent, "acked_rows": c.rows_acked, "reconnects": c.reconnects,
                "server_switches": c.switches,
                "unacked_rows": self.outbox.rows, "connected": float(self.sender.connected),
                "spool_degraded": float(bool(self.spool is not None and self.spool.degraded))}

    def _add_stats(self) -> None:
        """Queue one collector_stats row per counter with its change since the last row."""
        now = time.monotonic()
        current = self.counters(reported=True)
        names = sorted(current)
        deltas = [current[n] - self._stats_sent.get(n, 0) for n in names]
        interval_ms = int((now - self._stats_at) * 1000)
        self._stats_sent, self._stats_at = current, now
        for name, delta in zip(names, deltas):
            if delta:
                self._stats_pending[name] = self._stats_pending.get(name, 0) + delta
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
        # Lost: records that should have been kept and were not. Filtered and sampled-out
        # packets are left out on purpose, and shown on their own.
        lost = sum(v for k, v in c.items() if k.startswith("drop_") and k not in DELIBERATE_DROPS)
        return (f"seen={c['seen']} captured={c['logged']} flows={c['flows']} "
                f"filtered={c['drop_filtered']} sampled_out={c['drop_sampled_out']} "
                f"ringbuf_full={c['drop_ringbuf_full']} flow_map_full={c['flow_map_full']} "
                f"sent={s.rows_sent if s else 0} "
                f"acked={s.rows_acked if s else 0} lost={lost} "
                f"unacked={self.outbox.rows if self.outbox else 0} "
                f"server={'up' if self.sender and self.sender.connected else 'down'} "
                f"spool={self._spool_state()}")

    def _spool_state(self) -> str:
        if self.spool is None:
            return "off"
        return "memory-only" if self.spool.degraded else "ok"


async def serve(config: CollectorConfig) -> int:
    """Entry point of `hdrlog collector run`: run until SIGINT/SIGTERM, then stop cleanly."""
    collector = Collector(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, collector.reload_filters, True))
    try:
        await collector.start()
    except Exception as exc:  # a bad interface, a spool in use, BCC refusing to load without CAP_BPF, ...
        log.debug("collector start failed", exc_info=True)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        log.error("collector: unable to start: %s", reason[:500])
        return 1
    code = 0
    try:
        await collector.run(stop)
    except RuntimeError as exc:  # capture failed, or the server refuses this collector's identity
        log.error("collector: stopping: %s", " ".join(str(exc).split())[:500])
        code = 1
    finally:
        fdstore.notify("STOPPING=1")
        await collector.stop()
        log.info("collector: stopped; %s", collector.status_line())
    return code
