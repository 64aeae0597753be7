"""The collector's configuration: every field has a flag, an HDRLOG_* variable and a file key."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from hdrlog.config import ConfigError, doc_field, parse_hostport

DEFAULT_SERVER_PORT = 7600


@dataclass
class CollectorConfig:
    server: str = doc_field("", "gRPC address of the hdrlog server, HOST:PORT")
    iface: list[str] = doc_field([], "interface to watch, a name or a glob such as 'veth*'")
    host_id: str = doc_field("", "name this host's records carry (default: the hostname)")
    sample: int = doc_field(1, "log one packet in N (1 = every packet)")
    spool: str = doc_field("", "directory for state that survives restarts (default: none)")
    metrics_listen: str = doc_field("", "HOST:PORT for Prometheus metrics at /metrics ('' = off)")
    insecure: bool = doc_field(False, "no TLS and no authentication (labs and demos only)")
    tls_cert: str = doc_field("", "this collector's certificate (PEM)")
    tls_key: str = doc_field("", "this collector's private key (PEM)")
    tls_ca: str = doc_field("", "CA certificate that signed the server's certificate (PEM)")
    batch_rows: int = doc_field(10_000, "close a batch when it holds this many records")
    batch_interval: float = doc_field(1.0, "close a batch at the latest this many seconds after its first record")
    max_unacked_rows: int = doc_field(2_000_000, "records kept in memory waiting for the server's ack; "
                                                 "beyond this the oldest batches are dropped and counted")
    ringbuf_bytes: int = doc_field(8 << 20, "BPF ring buffer size in bytes (a power of two)")
    dns_ports: list[int] = doc_field([53, 5353], "UDP/TCP port whose payload is decoded as DNS "
                                                 "(besides the content-recognised HTTP and TLS)")
    status_interval: float = doc_field(5.0, "seconds between one-line status reports on stderr (0 = off)")
    shutdown_timeout: float = doc_field(5.0, "seconds to wait for the server's acks when stopping")

    def validate(self) -> None:
        if not self.server:
            raise ConfigError("server", self.server, "required: the server's HOST:PORT")
        parse_hostport("server", self.server)
        if not self.iface:
            raise ConfigError("iface", self.iface, "name at least one interface (--iface NAME, globs allowed)")
        if self.sample < 1:
            raise ConfigError("sample", self.sample, "must be 1 or more")
        if self.batch_rows < 1:
            raise ConfigError("batch_rows", self.batch_rows, "must be 1 or more")
        if not 0 < self.batch_interval <= 60:
            raise ConfigError("batch_interval", self.batch_interval, "must be more than 0 and at most 60 seconds")
        if self.max_unacked_rows < self.batch_rows:
            raise ConfigError("max_unacked_rows", self.max_unacked_rows, f"must be at least batch_rows ({self.batch_rows})")
        if self.ringbuf_bytes < 4096 or self.ringbuf_bytes & (self.ringbuf_bytes - 1):
            raise ConfigError("ringbuf_bytes", self.ringbuf_bytes, "must be a power of two, at least 4096")
        try:
            self.dns_ports = [int(p) for p in self.dns_ports]
        except (TypeError, ValueError):
            raise ConfigError("dns_ports", self.dns_ports, "port numbers 1-65535") from None
        if len(self.dns_ports) > 16 or not all(1 <= p <= 65535 for p in self.dns_ports):
            raise ConfigError("dns_ports", self.dns_ports, "at most 16 port numbers 1-65535")
        if self.status_interval < 0 or self.shutdown_timeout < 0:
            raise ConfigError("status_interval", self.status_interval, "must not be negative")
        parse_hostport("metrics_listen", self.metrics_listen, allow_empty=True)
        tls = [self.tls_cert, self.tls_key, self.tls_ca]
        if self.insecure and any(tls):
            raise ConfigError("insecure", True, "--insecure and --tls-* exclude each other")
        if not self.insecure and not all(tls):
            raise ConfigError("tls_cert", self.tls_cert,
                              "give --tls-cert, --tls-key and --tls-ca, or --insecure for a plaintext lab")
        for key in ("tls_cert", "tls_key", "tls_ca"):
            path = getattr(self, key)
            if path and not os.access(path, os.R_OK):
                raise ConfigError(key, path, "file not readable")
        if not self.host_id:
            self.host_id = socket.gethostname()
