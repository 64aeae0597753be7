"""Server configuration: one dataclass, each field with its default and doc.

``hdrlog.config`` derives the flag (``--sql-listen``), the environment variable
(``HDRLOG_SQL_LISTEN``) and the config-file key (``server.sql_listen``) from each
field, and calls ``validate()``, which raises one ``ConfigError`` line naming the
key, the value and what is allowed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hdrlog.config import ConfigError, doc_field, parse_hostport

DEFAULT_LISTEN = "0.0.0.0:7600"
DEFAULT_SQL_LISTEN = "127.0.0.1:7623"
DEFAULT_FLUSH_ROWS = 50_000
DEFAULT_FLUSH_INTERVAL = 0.5
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_STATUS_INTERVAL = 5.0
DEFAULT_PENDING_FACTOR = 4


def default_clickhouse() -> str:
    """chdb:///var/lib/hdrlog/clickhouse as root, else a store under the working directory."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return "chdb:///var/lib/hdrlog/clickhouse"
    return "chdb://" + str(Path.cwd() / "var" / "clickhouse")


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
    flush_rows: int = doc_field(DEFAULT_FLUSH_ROWS, "insert when this many rows are pending (all streams together)")
    flush_interval: float = doc_field(DEFAULT_FLUSH_INTERVAL, "insert at least this often, in seconds, when rows are pending")
    max_pending_rows: int = doc_field(
        0, "rows held in memory before streams are paused (backpressure); 0 means 4 x flush_rows")
    max_message_bytes: int = doc_field(DEFAULT_MAX_MESSAGE_BYTES, "largest Batch message accepted, in bytes")
    status_interval: float = doc_field(DEFAULT_STATUS_INTERVAL, "seconds between one-line status logs; 0 disables them")

    @property
    def pending_rows_cap(self) -> int:
        return self.max_pending_rows or DEFAULT_PENDING_FACTOR * self.flush_rows

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
        if self.flush_rows < 1:
            raise ConfigError("flush_rows", self.flush_rows, "expected an integer >= 1")
        if not 0 < self.flush_interval <= 3600:
            raise ConfigError("flush_interval", self.flush_interval, "expected seconds, > 0 and <= 3600")
        if self.max_pending_rows < 0 or (self.max_pending_rows and self.max_pending_rows < self.flush_rows):
            raise ConfigError("max_pending_rows", self.max_pending_rows, "expected 0 (= 4 x flush_rows) or >= flush_rows")
        if not 1024 <= self.max_message_bytes <= 2**31 - 1:
            raise ConfigError("max_message_bytes", self.max_message_bytes, "expected bytes from 1024 to 2147483647")
        if self.status_interval < 0:
            raise ConfigError("status_interval", self.status_interval, "expected seconds >= 0 (0 disables)")
