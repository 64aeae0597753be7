"""Server configuration: one dataclass, each field with its default and doc.

``hdrlog.config`` derives the flag (``--sql-listen``), the environment variable
(``HDRLOG_SQL_LISTEN``) and the config-file key (``server.sql_listen``) from each
field, and calls ``validate()``, which raises one ``ConfigError`` line naming the
key, the value and what is allowed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from hdrlog.config import ConfigError, doc_field, parse_hostport

DEFAULT_LISTEN = "0.0.0.0:7600"
DEFAULT_SQL_LISTEN = "127.0.0.1:7623"
DEFAULT_FLUSH_ROWS = 50_000
DEFAULT_FLUSH_INTERVAL = 0.5
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_ROLLUP_MAX_KEYS = 5_000
DEFAULT_STATUS_INTERVAL = 5.0
DEFAULT_PENDING_FACTOR = 4
# Age limits per table, in days. 0 = forever by default: a TTL deletes rows as they are inserted when
# they are already older (replayed captures, backfills), so the operator chooses it (ttl_*_days).
DEFAULT_TTL_DAYS = {"packets": 0, "flows": 0, "connections": 0, "collector_stats": 0, "rollups": 0, "anomalies": 0}
DEFAULT_MAX_STREAMS = 4096
DEFAULT_STREAMS_PER_CONNECTION = 8
DEFAULT_STREAMS_PER_HOST = 16
# SQL endpoint limits (docs/security.md "Limits"): caps a client may lower per query, never raise.
DEFAULT_SQL_MAX_CONCURRENT = 4
DEFAULT_SQL_MAX_QUEUED = 16
DEFAULT_SQL_MAX_CONNECTIONS = 256
DEFAULT_SQL_CONNECTIONS_PER_ADDRESS = 64
DEFAULT_SQL_REQUEST_TIMEOUT = 30.0
DEFAULT_SQL_QUEUE_TIMEOUT = 10.0
DEFAULT_SQL_MAX_MEMORY = 1 << 30            # per query, bytes
DEFAULT_SQL_MAX_EXECUTION_TIME = 60.0       # seconds
DEFAULT_SQL_MAX_ROWS_TO_READ = 5_000_000_000
DEFAULT_SQL_MAX_RESULT_ROWS = 10_000_000
DEFAULT_SQL_MAX_RESULT_BYTES = 256 << 20
DEFAULT_SQL_DEFAULT_RESULT_BYTES = 64 << 20
DEFAULT_SQL_AUTH_BURST = 10
DEFAULT_SQL_AUTH_PER_MINUTE = 6.0
DEFAULT_SERVER_MEMORY_FRACTION = 0.6        # of the lower of RAM and the cgroup's memory limit
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_CONNECTION_IDLE_TIMEOUT = 120.0
DEFAULT_FD_RESERVE = 1024


def default_clickhouse() -> str:
    """chdb:///var/lib/hdrlog/clickhouse as root, else a store under the working directory."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return "chdb:///var/lib/hdrlog/clickhouse"
    return "chdb://" + str(Path.cwd() / "var" / "clickhouse")


def memory_available() -> int:
    """Bytes this process may use: the lower of physical RAM and its cgroup's memory limit (v2 or v1)."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/self/cgroup", encoding="ascii") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return limit
    candidates = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            candidates.append(f"/sys/fs/cgroup{path}/memory.max")
        elif "memory" in controllers.split(","):
            candidates.append(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
    for name in candidates:
        try:
            with open(name, encoding="ascii") as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if text.isdigit():
            limit = min(limit, int(text))
    return limit


@dataclass
class ServerConfig:
    listen: str = doc_field(DEFAULT_LISTEN, "gRPC ingest address HOST:PORT (port 0 picks a free one)")
    clickhouse: str = doc_field(
        default_clickhouse(),
        "where rows go: chdb:///PATH (embedded store, owned by this process) or "
        "http(s)://USER:PASSWORD@HOST:PORT (a ClickHouse server)")
    sql_listen: str = doc_field(
        DEFAULT_SQL_LISTEN, "read-only ClickHouse-compatible HTTP SQL endpoint HOST:PORT; '' disables it")
    metrics_listen: str = doc_field("", "Prometheus metrics HOST:PORT (text at /metrics); '' disables it")
    insecure: bool = doc_field(False, "no TLS and no client authentication (labs and demos only)")
    tls_cert: str = doc_field("", "server certificate (PEM) for mTLS")
    tls_key: str = doc_field("", "server private key (PEM) for mTLS")
    tls_ca: str = doc_field("", "CA certificate (PEM) that signed the collectors' certificates")
    sql_user: str = doc_field("", "user name the SQL endpoint asks for (HTTP basic auth, X-ClickHouse-User/Key "
                                  "headers or user/password URL parameters); required unless --insecure")
    sql_password_file: str = doc_field("", "file whose first line is the SQL endpoint's password "
                                           "(or set HDRLOG_SQL_PASSWORD; there is no password flag)")
    sql_password: str = doc_field("", "the SQL endpoint's password, from the environment or the config file "
                                      "only (never a flag: command lines are visible to every user)", flag=False)
    sql_write_user: str = doc_field("", "a second SQL endpoint user that may also INSERT INTO hdrlog tables "
                                        "(FORMAT Arrow or Native; what other hdrlog servers send with "
                                        "--clickhouse http://USER:PASSWORD@THIS:PORT, docs/scale.md); '' = off. "
                                        "Needs an embedded store and a password (HDRLOG_SQL_WRITE_PASSWORD or "
                                        "--sql-write-password-file) and must differ from sql_user")
    sql_write_password_file: str = doc_field("", "file whose first line is the write user's password "
                                                 "(or set HDRLOG_SQL_WRITE_PASSWORD)")
    sql_write_password: str = doc_field("", "the write user's password, from the environment or the config file "
                                            "only (never a flag)", flag=False)
    dedup_scope: str = doc_field("auto", "what one insert_deduplication_token covers: flush (one INSERT per "
                                         "table per flush: cheapest, right when one server owns the store), "
                                         "batch (one INSERT per batch, table and day: deduplicable whichever "
                                         "server sends it; several servers in front of one ClickHouse) or auto "
                                         "(batch when the store is remote or takes INSERTs from other servers)")
    cluster: str = doc_field("", "a ClickHouse cluster name (remote store only): tables are created ON CLUSTER as "
                                 "ReplicatedMergeTree <table>_local plus Distributed <table> (docs/scale.md); "
                                 "'' = plain MergeTree tables")
    max_streams: int = doc_field(DEFAULT_MAX_STREAMS, "ingest streams open at once, all clients together; "
                                                      "beyond this a new stream is refused (RESOURCE_EXHAUSTED)")
    max_streams_per_host: int = doc_field(
        DEFAULT_STREAMS_PER_HOST, "ingest streams one client certificate (one host) may hold open at once "
                                  "(a collector uses one; mTLS only); beyond this its new streams are refused")
    max_streams_per_connection: int = doc_field(
        DEFAULT_STREAMS_PER_CONNECTION, "concurrent streams one gRPC connection may open (a collector uses one); "
                                        "more wait on the client's side")
    sql_max_concurrent_queries: int = doc_field(
        DEFAULT_SQL_MAX_CONCURRENT, "SQL queries running at once (each on its own worker and chDB handle); "
                                    "more wait in a queue")
    sql_max_queued_queries: int = doc_field(
        DEFAULT_SQL_MAX_QUEUED, "SQL queries waiting for a worker; beyond this a query is refused at once with "
                                "HTTP 503 (code 202, TOO_MANY_SIMULTANEOUS_QUERIES)")
    sql_max_connections: int = doc_field(
        DEFAULT_SQL_MAX_CONNECTIONS, "TCP connections the SQL endpoint keeps open at once (keep-alive clients "
                                     "included); a new one beyond is closed at once, so a flood of idle "
                                     "connections cannot take the descriptors the store needs")
    sql_max_connections_per_address: int = doc_field(
        DEFAULT_SQL_CONNECTIONS_PER_ADDRESS, "TCP connections one client address (an IPv6 /64) may keep open to the "
                                             "SQL endpoint; a new one beyond is closed at once, so one client cannot "
                                             "take every sql_max_connections slot")
    sql_request_timeout: float = doc_field(
        DEFAULT_SQL_REQUEST_TIMEOUT, "seconds a SQL client has to send a request's head (from its connection or "
                                     "its previous answer: an idle keep-alive connection is closed after it too) "
                                     "and again to send its body (plus 1 s per MiB sent); a slower one is closed "
                                     "(slowloris)", duration=True)
    sql_queue_timeout: float = doc_field(
        DEFAULT_SQL_QUEUE_TIMEOUT, "seconds a SQL query waits in the queue before it is refused (503, code 202)",
        duration=True)
    sql_max_memory_usage: int = doc_field(
        DEFAULT_SQL_MAX_MEMORY, "bytes of memory one SQL query may use (ClickHouse max_memory_usage); a client may "
                                "ask for less, never more")
    sql_max_execution_time: float = doc_field(
        DEFAULT_SQL_MAX_EXECUTION_TIME, "seconds one SQL query may run (max_execution_time); a client may ask for less",
        duration=True)
    sql_max_rows_to_read: int = doc_field(
        DEFAULT_SQL_MAX_ROWS_TO_READ, "rows one SQL query may read (max_rows_to_read); a client may ask for less")
    sql_max_result_rows: int = doc_field(
        DEFAULT_SQL_MAX_RESULT_ROWS, "rows one SQL result may have (max_result_rows); a client may ask for less")
    sql_max_result_bytes: int = doc_field(
        DEFAULT_SQL_MAX_RESULT_BYTES, "bytes one SQL result may have (max_result_bytes, uncompressed); "
                                      "a client may ask for less")
    sql_default_result_bytes: int = doc_field(
        DEFAULT_SQL_DEFAULT_RESULT_BYTES, "max_result_bytes of a SQL query that names none; a client may ask for "
                                          "up to sql_max_result_bytes (results stream, but Pretty/JSON/Arrow/Parquet "
                                          "answers are built whole in memory first)")
    sql_auth_failure_burst: int = doc_field(
        DEFAULT_SQL_AUTH_BURST, "failed SQL logins one client address (an IPv6 /64) may make before it is "
                                "rate-limited: HTTP 429 (code 516) without checking the password")
    sql_auth_failures_per_minute: float = doc_field(
        DEFAULT_SQL_AUTH_PER_MINUTE, "failed SQL logins per minute a rate-limited address earns back")
    max_server_memory_usage: int = doc_field(
        0, "bytes the embedded chDB engine may hold in all (queries and inserts together; its "
           "max_server_memory_usage); 0 means 0.6 x the lower of RAM and this process's cgroup memory limit "
           "(systemd MemoryMax). Ignored for a remote ClickHouse")
    max_connections: int = doc_field(
        0, "gRPC connections open at once, handshaking or established; beyond this a new one is closed at once "
           "(the collector retries). 0 = 2 x max_streams, and never more than the open-file limit less fd_reserve")
    handshake_timeout: float = doc_field(
        DEFAULT_HANDSHAKE_TIMEOUT, "seconds a new gRPC connection has to complete its TLS handshake before it is "
                                   "closed (connections that never speak cannot hold slots)", duration=True)
    connection_idle_timeout: float = doc_field(
        DEFAULT_CONNECTION_IDLE_TIMEOUT, "seconds a gRPC connection may stay open with no stream (a collector always "
                                         "has one; its gRPC reconnects by itself) before it is closed, so "
                                         "connections that handshake and never stream cannot hold slots; 0 = never",
        duration=True)
    fd_reserve: int = doc_field(
        DEFAULT_FD_RESERVE, "file descriptors kept out of gRPC's reach for the store, the SQL endpoint and metrics "
                            "(at most half the open-file limit, which the server raises to its hard limit at start)")
    flush_rows: int = doc_field(DEFAULT_FLUSH_ROWS, "insert when this many rows are pending (all streams together)")
    flush_interval: float = doc_field(DEFAULT_FLUSH_INTERVAL, "insert at least this often, in seconds, when rows are pending",
                                      duration=True)
    max_pending_rows: int = doc_field(
        0, "rows held in memory before streams are paused (backpressure); 0 means 4 x flush_rows")
    rollup_max_keys: int = doc_field(
        DEFAULT_ROLLUP_MAX_KEYS, "keys pairs_1m and services_1m keep per host, minute and flush; the rest of that "
        "minute is summed into one other = 1 row (docs/sql.md, \"Bounded rollups\")")
    max_message_bytes: int = doc_field(DEFAULT_MAX_MESSAGE_BYTES, "largest Batch message accepted, in bytes")
    status_interval: float = doc_field(DEFAULT_STATUS_INTERVAL, "seconds between one-line status logs; 0 disables them",
                                       duration=True)
    ttl_packets_days: int = doc_field(DEFAULT_TTL_DAYS["packets"], "days hdrlog.packets keeps rows (whole days "
                                      "dropped at once); 0 keeps them forever")
    ttl_flows_days: int = doc_field(DEFAULT_TTL_DAYS["flows"], "days hdrlog.flows keeps rows; 0 = forever")
    ttl_connections_days: int = doc_field(DEFAULT_TTL_DAYS["connections"],
                                          "days hdrlog.connections keeps a connection after it was last seen "
                                          "(end_ts, so a long-lived one stays whole); 0 = forever")
    ttl_collector_stats_days: int = doc_field(DEFAULT_TTL_DAYS["collector_stats"],
                                              "days hdrlog.collector_stats keeps rows; 0 = forever")
    ttl_rollups_days: int = doc_field(DEFAULT_TTL_DAYS["rollups"], "days the per-minute rollups (packets_1m, "
                                      "pairs_1m, services_1m) keep rows; 0 = forever")
    ttl_anomalies_days: int = doc_field(DEFAULT_TTL_DAYS["anomalies"], "days hdrlog.anomalies keeps findings; 0 = forever")
    report_every: str = doc_field("", "run the anomaly report in the server this often (15m, 1h, 1d; on the clock), "
                                      "over the period just ended, recording findings in hdrlog.anomalies; "
                                      "delivery settings come from the report: section / HDRLOG_* ('' = off)")

    @property
    def pending_rows_cap(self) -> int:
        return self.max_pending_rows or DEFAULT_PENDING_FACTOR * self.flush_rows

    def connection_cap(self, nofile: int) -> int:
        """gRPC connections allowed with ``nofile`` open files: max_connections (or 2 x max_streams),
        never more than nofile less the reserve (at most half of nofile), never less than 1."""
        reserve = min(self.fd_reserve, nofile // 2)
        wanted = self.max_connections or 2 * self.max_streams
        return max(1, min(wanted, nofile - reserve))

    def sql_credentials(self) -> tuple[str, str] | None:
        """(user, password) the SQL endpoint checks, or None when it is open (--insecure, no --sql-user)."""
        if not self.sql_user:
            return None
        password = self.sql_password
        if self.sql_password_file:
            with open(self.sql_password_file, encoding="utf-8") as fh:
                password = fh.readline().rstrip("\r\n")
        return self.sql_user, password

    def sql_write_credentials(self) -> tuple[str, str] | None:
        """(user, password) of the SQL endpoint's write user, or None when INSERTs are off."""
        if not self.sql_write_user:
            return None
        password = self.sql_write_password
        if self.sql_write_password_file:
            with open(self.sql_write_password_file, encoding="utf-8") as fh:
                password = fh.readline().rstrip("\r\n")
        return self.sql_write_user, password

    def store_shared(self) -> bool:
        """Other servers may write the same tables: a remote ClickHouse, or INSERTs taken on the SQL endpoint."""
        return not self.clickhouse.startswith("chdb:") or bool(self.sql_write_user)

    def per_batch_tokens(self) -> bool:
        return self.dedup_scope == "batch" or (self.dedup_scope == "auto" and self.store_shared())

    def ttl_days(self) -> dict[str, int]:
        """Age limit per table (schema.apply_ttl)."""
        r = self.ttl_rollups_days
        return {"packets": self.ttl_packets_days, "flows": self.ttl_flows_days,
                "connections": self.ttl_connections_days,
                "collector_stats": self.ttl_collector_stats_days, "packets_1m": r, "pairs_1m": r, "services_1m": r,
                "anomalies": self.ttl_anomalies_days}

    @property
    def report_every_seconds(self) -> float:
        from hdrlog.config import parse_duration

        return parse_duration("report_every", self.report_every) if self.report_every else 0.0

    def server_memory_bytes(self) -> int:
        """max_server_memory_usage for the embedded engine: the configured value or the automatic one."""
        if self.max_server_memory_usage:
            return self.max_server_memory_usage
        return int(DEFAULT_SERVER_MEMORY_FRACTION * memory_available())

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert and self.tls_key and self.tls_ca)

    def validate(self) -> None:
        parse_hostport("listen", self.listen)
        parse_hostport("sql_listen", self.sql_listen, allow_empty=True)
        parse_hostport("metrics_listen", self.metrics_listen, allow_empty=True)
        url = self.clickhouse
        if url.startswith("chdb://"):
            path = url[len("chdb://"):].split("?", 1)[0]
            if not path.startswith("/"):
                raise ConfigError("clickhouse", url, "expected chdb:///ABSOLUTE/PATH (three slashes)")
        elif not url.startswith(("http://", "https://")):
            raise ConfigError("clickhouse", url, "expected chdb:///PATH or http(s)://USER:PASSWORD@HOST:PORT")
        tls = {"tls_cert": self.tls_cert, "tls_key": self.tls_key, "tls_ca": self.tls_ca}
        given = [k for k, v in tls.items() if v]
        if self.insecure and given:
            raise ConfigError(given[0], tls[given[0]], "not allowed with insecure; pass either --insecure or the TLS files")
        if not self.insecure:
            if not given:
                raise ConfigError("insecure", False,
                                  "pass --insecure (no TLS, labs only) or all of --tls-cert, --tls-key and --tls-ca")
            missing = [k for k in tls if not tls[k]]
            if missing:
                raise ConfigError(missing[0], "", "mTLS needs all of --tls-cert, --tls-key and --tls-ca")
            for key, path in tls.items():
                if not os.path.isfile(path):
                    raise ConfigError(key, path, "expected a readable PEM file")
            from hdrlog.pki import TlsFileError, check_tls_files

            try:
                check_tls_files(self.tls_cert, self.tls_key, self.tls_ca)
            except TlsFileError as exc:
                raise ConfigError(exc.key, exc.path, str(exc)) from None
        if self.sql_password and self.sql_password_file:
            raise ConfigError("sql_password_file", self.sql_password_file,
                              "give the password once: HDRLOG_SQL_PASSWORD or --sql-password-file, not both")
        if self.sql_password_file:
            try:
                with open(self.sql_password_file, encoding="utf-8") as fh:
                    first = fh.readline().rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError("sql_password_file", self.sql_password_file,
                                  f"expected a readable file with the password on its first line ({exc})") from None
            if not first:
                raise ConfigError("sql_password_file", self.sql_password_file, "its first line (the password) is empty")
        has_password = bool(self.sql_password or self.sql_password_file)
        if (self.sql_user or has_password) and not (self.sql_user and has_password):
            raise ConfigError("sql_user" if not self.sql_user else "sql_password_file", self.sql_user or "",
                              "the SQL endpoint needs both --sql-user and a password "
                              "(HDRLOG_SQL_PASSWORD or --sql-password-file)")
        if not self.insecure and self.sql_listen and not self.sql_user:
            raise ConfigError("sql_user", "", "the SQL endpoint asks for credentials: give --sql-user and a password "
                                              "(HDRLOG_SQL_PASSWORD or --sql-password-file), or --sql-listen '' to "
                                              "turn it off, or --insecure for a lab")
        if self.sql_user and not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", self.sql_user):
            raise ConfigError("sql_user", self.sql_user, "letters, digits and _.@- up to 64 characters")
        if self.dedup_scope not in ("auto", "flush", "batch"):
            raise ConfigError("dedup_scope", self.dedup_scope, "expected auto, flush or batch")
        if self.cluster:
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", self.cluster):
                raise ConfigError("cluster", self.cluster, "a ClickHouse cluster name: letters, digits and _.-")
            if url.startswith("chdb:"):
                raise ConfigError("cluster", self.cluster, "needs a remote ClickHouse (--clickhouse http(s)://...); "
                                                           "an embedded store is one node")
        if self.sql_write_password and self.sql_write_password_file:
            raise ConfigError("sql_write_password_file", self.sql_write_password_file,
                              "give the password once: HDRLOG_SQL_WRITE_PASSWORD or --sql-write-password-file, "
                              "not both")
        if self.sql_write_password_file:
            try:
                with open(self.sql_write_password_file, encoding="utf-8") as fh:
                    first = fh.readline().rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError("sql_write_password_file", self.sql_write_password_file,
                                  f"expected a readable file with the password on its first line ({exc})") from None
            if not first:
                raise ConfigError("sql_write_password_file", self.sql_write_password_file,
                                  "its first line (the password) is empty")
        if self.sql_write_user:
            if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", self.sql_write_user):
                raise ConfigError("sql_write_user", self.sql_write_user, "letters, digits and _.@- up to 64 characters")
            if self.sql_write_user == self.sql_user:
                raise ConfigError("sql_write_user", self.sql_write_user,
                                  "must differ from sql_user (the read-only user)")
            if not (self.sql_write_password or self.sql_write_password_file):
                raise ConfigError("sql_write_user", self.sql_write_user, "needs a password: HDRLOG_SQL_WRITE_PASSWORD "
                                                                         "or --sql-write-password-file")
            if not url.startswith("chdb:"):
                raise ConfigError("sql_write_user", self.sql_write_user, "takes INSERTs into an embedded store only; "
                                                                         "a remote ClickHouse takes them itself")
            if not self.sql_listen:
                raise ConfigError("sql_write_user", self.sql_write_user, "needs the SQL endpoint (--sql-listen)")
        elif self.sql_write_password or self.sql_write_password_file:
            raise ConfigError("sql_write_user", "", "a write password is set but no --sql-write-user")
        if not 1 <= self.max_streams <= 1_000_000:
            raise ConfigError("max_streams", self.max_streams, "expected 1 to 1000000")
        if not 1 <= self.max_streams_per_host <= 1_000_000:
            raise ConfigError("max_streams_per_host", self.max_streams_per_host, "expected 1 to 1000000")
        if not 1 <= self.max_streams_per_connection <= 1000:
            raise ConfigError("max_streams_per_connection", self.max_streams_per_connection, "expected 1 to 1000")
        for key, low, high in (("sql_max_concurrent_queries", 1, 256), ("sql_max_queued_queries", 0, 100_000),
                               ("sql_max_connections", 1, 100_000), ("sql_max_connections_per_address", 1, 100_000),
                               ("sql_max_memory_usage", 1 << 20, 1 << 50), ("sql_max_rows_to_read", 1, 1 << 62),
                               ("sql_max_result_rows", 1, 1 << 62), ("sql_max_result_bytes", 1024, 1 << 50),
                               ("sql_default_result_bytes", 1024, 1 << 50),
                               ("sql_auth_failure_burst", 1, 1_000_000)):
            if not low <= getattr(self, key) <= high:
                raise ConfigError(key, getattr(self, key), f"expected an integer from {low} to {high}")
        for key, low, high in (("sql_queue_timeout", 0, 3600), ("sql_max_execution_time", 0.001, 86_400),
                               ("sql_request_timeout", 0.1, 3600),
                               ("sql_auth_failures_per_minute", 0.001, 1_000_000)):
            if not low <= getattr(self, key) <= high:
                raise ConfigError(key, getattr(self, key), f"expected a number from {low} to {high}")
        if self.max_server_memory_usage and self.max_server_memory_usage < 256 << 20:
            raise ConfigError("max_server_memory_usage", self.max_server_memory_usage,
                              "expected 0 (automatic) or bytes >= 268435456 (256 MiB)")
        if not 0 <= self.max_connections <= 1_000_000:
            raise ConfigError("max_connections", self.max_connections, "expected 0 (automatic) to 1000000")
        if not 0 <= self.connection_idle_timeout <= 86_400:
            raise ConfigError("connection_idle_timeout", self.connection_idle_timeout,
                              "expected seconds, 0 (never) to 86400")
        if not 0 < self.handshake_timeout <= 300:
            raise ConfigError("handshake_timeout", self.handshake_timeout, "expected seconds, > 0 and <= 300")
        if not 16 <= self.fd_reserve <= 1_000_000:
            raise ConfigError("fd_reserve", self.fd_reserve, "expected 16 to 1000000")
        if self.flush_rows < 1:
            raise ConfigError("flush_rows", self.flush_rows, "expected an integer >= 1")
        if not 0 < self.flush_interval <= 3600:
            raise ConfigError("flush_interval", self.flush_interval, "expected seconds, > 0 and <= 3600")
        if self.max_pending_rows < 0 or (self.max_pending_rows and self.max_pending_rows < self.flush_rows):
            raise ConfigError("max_pending_rows", self.max_pending_rows, "expected 0 (= 4 x flush_rows) or >= flush_rows")
        if not 1 <= self.rollup_max_keys <= 10_000_000:
            raise ConfigError("rollup_max_keys", self.rollup_max_keys, "expected an integer from 1 to 10000000")
        if not 1024 <= self.max_message_bytes <= 2**31 - 1:
            raise ConfigError("max_message_bytes", self.max_message_bytes, "expected bytes from 1024 to 2147483647")
        if self.status_interval < 0:
            raise ConfigError("status_interval", self.status_interval, "expected seconds >= 0 (0 disables)")
        for key in ("ttl_packets_days", "ttl_flows_days", "ttl_connections_days", "ttl_collector_stats_days",
                    "ttl_rollups_days", "ttl_anomalies_days"):
            if not 0 <= getattr(self, key) <= 36500:
                raise ConfigError(key, getattr(self, key), "expected days from 0 (keep forever) to 36500")
        if self.report_every and self.report_every_seconds < 10:
            raise ConfigError("report_every", self.report_every, "expected a period of at least 10s (or '' for off)")
