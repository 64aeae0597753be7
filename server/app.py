"""The server: components started in order and stopped in reverse.

``Server(config)`` is inert. ``start()`` opens the store, applies the schema,
loads the exactly-once watermarks, starts the writer, the gRPC ingest service,
the SQL endpoint and the metrics endpoint, and logs one status line to stderr
every ``status_interval`` seconds. ``stop(grace)`` stops accepting streams,
flushes what is pending and answers it, and closes the store.

``serve(config)`` is the one entry point of ``hdrlog server run``: it runs until
SIGINT/SIGTERM and returns the exit code.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
from typing import Callable

# gRPC's C core logs one line per failed TLS handshake at its default verbosity: a client opening
# connections with a broken ClientHello would write the log full. Errors only, unless the operator
# asks for more (GRPC_VERBOSITY=INFO/DEBUG). It is read once, when grpc is first imported: here.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # noqa: E402 - after GRPC_VERBOSITY

from hdrlog.collector import fdstore  # systemd's notify protocol (a no-op outside systemd)
from hdrlog.config import parse_hostport
from hdrlog.proto import ingest_pb2_grpc
from hdrlog.server.config import ServerConfig
from hdrlog.server.ingest import IngestServicer
from hdrlog.server.metrics import ServerMetrics
from hdrlog.report.connection import Connection
from hdrlog.report.scheduler import ReportScheduler
from hdrlog.report.config import ReportConfig
from hdrlog.server.sql import Limits, SqlEndpoint
from hdrlog.server.sql.http import QUERY_MARKER
from hdrlog.server.sql.insert import InsertEndpoint
from hdrlog.server.store import Store, StoreError
from hdrlog.clickhouse import redact
from hdrlog.server.writer import Writer

log = logging.getLogger("hdrlog.server")


class StartError(RuntimeError):
    """A component could not start; the message is one line for the operator."""


class Server:
    def __init__(self, config: ServerConfig, report: "ReportConfig | None" = None):
        self.config = config
        self.report_config = report
        self.reports: ReportScheduler | None = None
        self.metrics = ServerMetrics()
        self.sql_limits = sql_limits(config)
        self.store = Store(config.clickhouse, server_memory_bytes=config.server_memory_bytes(),
                           sql_settings=self.sql_limits.defaults(), cluster=config.cluster)
        self.writer: Writer | None = None
        self.grpc_port: int | None = None
        self.sql_port: int | None = None
        self.metrics_port: int | None = None
        self.max_connections = 0
        self._grpc: grpc.aio.Server | None = None
        self._sql: SqlEndpoint | None = None
        self._status_task: asyncio.Task | None = None
        self._store_open = False
        self._started = False

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        try:
            await self._start(cfg)
        except BaseException:
            await self.stop(grace=0)
            raise
        self._started = True
        if cfg.insecure:
            log.warning("server: --insecure: no TLS and no client authentication; collectors' host names are trusted")
        if self.sql_port and not cfg.sql_user:
            log.warning("server: the SQL endpoint on port %d asks for no credentials (--insecure without --sql-user)",
                        self.sql_port)
        if self.store.embedded:
            running = await asyncio.to_thread(self.store.server_setting, "max_server_memory_usage")
            self.metrics.engine_memory_limit.set(int(running or 0))
            log.info("server: store memory limit %d MiB (max_server_memory_usage); SQL queries: %d MiB, %g s, "
                     "%d at once", self.store.server_memory_bytes >> 20, cfg.sql_max_memory_usage >> 20,
                     cfg.sql_max_execution_time, cfg.sql_max_concurrent_queries)
        if cfg.sql_write_user:
            log.info("server: the SQL endpoint takes INSERTs into hdrlog tables from user %r (sql_write_user)",
                     cfg.sql_write_user)
        if self.writer is not None and self.writer.shared:
            log.info("server: the store is shared with other servers: one insert token per batch (dedup_scope=%s), "
                     "stored seqs read from ClickHouse on each stream's first batch", cfg.dedup_scope)
        log.info("server: listening gRPC %s:%d (at most %d connections), SQL %s, metrics %s, store %s",
                 parse_hostport("listen", cfg.listen)[0], self.grpc_port, self.max_connections,
                 f"port {self.sql_port}" if self.sql_port else "off",
                 f"port {self.metrics_port}" if self.metrics_port else "off", redact(cfg.clickhouse))

    async def _start(self, cfg: ServerConfig) -> None:
        nofile = raise_nofile_limit()
        self.max_connections = cfg.connection_cap(nofile)
        if cfg.max_connections and self.max_connections < cfg.max_connections:
            log.warning("server: max_connections=%d does not fit the open-file limit %d less fd_reserve; "
                        "using %d (raise LimitNOFILE / ulimit -n)", cfg.max_connections, nofile, self.max_connections)
        try:
            await asyncio.to_thread(self.store.open)
            self._store_open = True
            await asyncio.to_thread(self.store.migrate)
            await asyncio.to_thread(self.store.apply_ttl, cfg.ttl_days())
        except StoreError as exc:
            raise StartError(f"unable to initialize the store: {exc}") from None
        self.writer = Writer(self.store, cfg, self.metrics)
        try:
            await self.writer.start()
        except StoreError as exc:
            self.writer = None
            raise StartError(f"unable to initialize the writer: {exc}") from None

        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", 4 * 1024 * 1024),
            # Long idle links (a quiet host sends a batch a minute, NAT and firewalls drop silent
            # flows): ping every 30 s, give up after 20 s without an answer, and accept the
            # collectors' own pings (every 20 s, also between streams) without calling them abuse.
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", cfg.max_streams_per_connection),
            # Connections that never finish a handshake cannot hold file descriptors: a cap below the
            # open-file limit (the rest is kept for the store, SQL and metrics) and a handshake deadline.
            ("grpc.max_allowed_incoming_connections", self.max_connections),
            ("grpc.server_handshake_timeout_ms", int(cfg.handshake_timeout * 1000)),
            # ... and connections that finish the handshake but never open a stream (they answer pings).
            *([("grpc.max_connection_idle_ms", int(cfg.connection_idle_timeout * 1000))]
              if cfg.connection_idle_timeout else []),
        ]
        self._grpc = grpc.aio.server(options=options)
        self.ingest = IngestServicer(self.writer, self.metrics, insecure=cfg.insecure, max_streams=cfg.max_streams,
                                     max_streams_per_host=cfg.max_streams_per_host)
        ingest_pb2_grpc.add_IngestServicer_to_server(self.ingest, self._grpc)
        host, port = parse_hostport("listen", cfg.listen)  # type: ignore[misc]
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            if cfg.insecure:
                self.grpc_port = self._grpc.add_insecure_port(address)
            else:
                self.grpc_port = self._grpc.add_secure_port(address, _server_credentials(cfg))
        except (RuntimeError, OSError) as exc:
            raise StartError(f"unable to listen for gRPC on {cfg.listen}: {exc}") from None
        if not self.grpc_port:
            raise StartError(f"unable to listen for gRPC on {cfg.listen}: address in use or not available")
        await self._grpc.start()

        sql = parse_hostport("sql_listen", cfg.sql_listen, allow_empty=True)
        if sql is not None:
            try:
                credentials = cfg.sql_credentials()
            except OSError as exc:
                raise StartError(f"unable to read sql_password_file {cfg.sql_password_file}: {exc.strerror}") from None
            try:
                write_credentials = cfg.sql_write_credentials()
            except OSError as exc:
                raise StartError(f"unable to read sql_write_password_file {cfg.sql_write_password_file}: "
                                 f"{exc.strerror}") from None
            inserts = InsertEndpoint(self.store, self.metrics, write_credentials) if write_credentials else None
            self._sql = SqlEndpoint(self.store, self.metrics, sql[0], sql[1], credentials=credentials,
                                    limits=self.sql_limits, inserts=inserts)
            try:
                self.sql_port = await self._sql.start()
            except OSError as exc:
                self._sql = None
                raise StartError(f"unable to listen for SQL on {cfg.sql_listen}: {exc.strerror or exc}") from None
            self.metrics.sql_engine_queries.set_function(lambda: self.store.running(QUERY_MARKER))

        metrics = parse_hostport("metrics_listen", cfg.metrics_listen, allow_empty=True)
        if metrics is not None:
            try:
                self.metrics_port = await asyncio.to_thread(self.metrics.start_http, metrics[0], metrics[1])
            except OSError as exc:
                raise StartError(f"unable to listen for metrics on {cfg.metrics_listen}: {exc.strerror or exc}") from None

        if cfg.report_every:
            self.reports = ReportScheduler(self._report_connection, self.report_config or ReportConfig(),
                                           cfg.report_every_seconds)
            self.reports.start()
            log.info("server: anomaly report every %s, findings recorded in hdrlog.anomalies", cfg.report_every)

        if cfg.status_interval > 0:
            self._status_task = asyncio.create_task(self._status_loop(), name="hdrlog-status")

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, flush and answer what is pending, close everything. Idempotent."""
        if self.reports is not None:
            await self.reports.stop()
            self.reports = None
        if self._sql is not None:
            # First: running SQL queries are killed, so they neither delay the stop nor slow the last flush.
            await self._sql.stop()
            self._sql = None
        if self._status_task is not None:
            self._status_task.cancel()
            await asyncio.gather(self._status_task, return_exceptions=True)
            self._status_task = None
        if self._grpc is not None:
            # Open streams get `grace` seconds to half-close; the writer keeps flushing meanwhile.
            # Meanwhile the writer flushes at once (no waiting for flush_rows / flush_interval) so
            # streams get their acks; anything cut off by the grace is resent and deduplicated.
            if self.writer is not None:
                self.writer.flush_now()
            await self._grpc.stop(grace)
            self._grpc = None
        if self.writer is not None:
            await self.writer.stop()
        self.writer = None
        await asyncio.to_thread(self.metrics.stop_http)
        if self._store_open:
            await asyncio.to_thread(self.store.close)
            self._store_open = False
        if self._started:
            self._started = False
            log.info("server: stopped; %s", self.status_line())

    async def run_until_signal(self, on_started: Callable[["Server"], None] | None = None) -> int:
        """start(), wait for SIGINT/SIGTERM, stop(); returns the exit code."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
            if on_started is not None:
                on_started(self)
            # systemd (Type=notify): `systemctl start` returns once the schema is applied and every port listens.
            fdstore.notify("READY=1")
            await stop.wait()
            log.info("server: signal received, stopping")
            fdstore.notify("STOPPING=1")
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self.stop()
        return 0

    def _report_connection(self) -> Connection:
        return Connection(self.store.new_client(), writable=True, label="the server's store")

    # -- status ------------------------------------------------------------

    def status_line(self) -> str:
        m = self.metrics
        pending = self.writer.pending_rows if self.writer is not None else 0
        return (f"streams={m.open_streams} batches={m.total_batches} rows={m.total_rows} "
                f"dup={m.total_dup} rejected={m.total_rejected} pending={pending} bytes={m.total_bytes}")

    async def _status_loop(self) -> None:
        from hdrlog.logs import StatusLines

        lines = StatusLines(self.config.status_interval)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.status_interval)
            line = self.status_line()
            if lines.due(line, loop.time()):
                log.info("server: %s", line)


def sql_limits(cfg: ServerConfig) -> Limits:
    return Limits(max_concurrent=cfg.sql_max_concurrent_queries, max_queued=cfg.sql_max_queued_queries,
                  max_connections=cfg.sql_max_connections,
                  max_connections_per_address=cfg.sql_max_connections_per_address,
                  request_timeout=cfg.sql_request_timeout,
                  queue_timeout=cfg.sql_queue_timeout, max_memory_usage=cfg.sql_max_memory_usage,
                  max_execution_time=cfg.sql_max_execution_time, max_rows_to_read=cfg.sql_max_rows_to_read,
                  max_result_rows=cfg.sql_max_result_rows, max_result_bytes=cfg.sql_max_result_bytes,
                  default_result_bytes=cfg.sql_default_result_bytes,
                  auth_failure_burst=cfg.sql_auth_failure_burst,
                  auth_failures_per_minute=cfg.sql_auth_failures_per_minute)


def raise_nofile_limit() -> int:
    """Raise the soft open-file limit to the hard one; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:
            log.warning("server: cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def _server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials:
    def read(path: str) -> bytes:
        with open(path, "rb") as fh:
            return fh.read()
    return grpc.ssl_server_credentials([(read(cfg.tls_key), read(cfg.tls_cert))],
                                       root_certificates=read(cfg.tls_ca), require_client_auth=True)


def _ensure_logging() -> None:
    """Status lines go to stderr even when the caller configured no logging."""
    if not logging.getLogger().handlers and not log.handlers:
        from hdrlog import logs

        logs.configure("info")
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)


async def serve(config: ServerConfig, on_started: Callable[[Server], None] | None = None,
                report: ReportConfig | None = None) -> int:
    """Run the server until SIGINT/SIGTERM. Returns 0 after a clean stop, 1 when it cannot start."""
    _ensure_logging()
    server = Server(config, report)
    try:
        return await server.run_until_signal(on_started)
    except StartError as exc:
        log.error("server: %s", exc)
        return 1
