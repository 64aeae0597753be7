"""The collector's configuration: every field has a flag, an HDRLOG_* variable and a file key."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from hdrlog.config import ConfigError, doc_field, parse_hostport

DEFAULT_SERVER_PORT = 7600
DEFAULT_SPOOL_MAX_BYTES = 1 << 30
# Tunnels the kernel opens (bpf/tunnel.h; compiled in per start, bpf/build.py) and their UDP ports.
TUNNEL_TYPES = ("vxlan", "geneve", "gre", "ipip")
DEFAULT_VXLAN_PORTS = (4789, 8472)
DEFAULT_GENEVE_PORTS = (6081,)
VXLAN_GPE_PORT = 4790
MAX_TUNNEL_PORTS = 8


def default_spool() -> str:
    """/var/lib/hdrlog/spool as root, else a spool under the working directory."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return "/var/lib/hdrlog/spool"
    return str(Path.cwd() / "var" / "spool")


@dataclass
class CollectorConfig:
    server: list[str] = doc_field([], "gRPC address of an hdrlog server, HOST:PORT; several (repeat the flag, or a "
                                      "comma list) for failover: the collector sticks to one while it is healthy "
                                      "and moves to the next when its stream breaks (docs/scale.md)")
    iface: list[str] = doc_field([], "interface to watch, a name or a glob such as 'veth*' (a glob is followed: "
                                     "interfaces that match it later are attached within 2 s)")
    host_id: str = doc_field("", "name this host's records carry (default: the client certificate's name under "
                                 "mTLS, which the server requires; the hostname with --insecure)")
    mode: str = doc_field("auto", "what is logged: packets (a row per packet), flows (in-kernel aggregates "
                                  "only) or auto (connections, exact and never sampled, plus rows for notable "
                                  "packets and a 1:N sample of the rest; packets with no connection key, such as "
                                  "non-IP frames and non-first fragments, go to flows)")
    sample: int = doc_field(1, "1:N sampling of packet rows: packets mode logs one packet in N (1 = every packet); "
                               "auto mode one in N of the packets that are not notable (1 = its default, 100)")
    first_packets: int = doc_field(3, "auto mode: log the first N packets of every new flow")
    flow_interval: float = doc_field(5.0, "seconds between drains of the in-kernel flow map: the longest a flow "
                                          "row spans (active and idle timeout)", duration=True)
    flow_entries: int = doc_field(65536, "flows the kernel holds per interval; beyond this, packets go through "
                                         "the ring buffer instead (counted as flow_map_full)")
    conn_entries: int = doc_field(65536, "auto mode: connections the kernel tracks at once; beyond this, packets "
                                         "of new connections go through the ring buffer as packet rows "
                                         "(counted as conn_map_full)")
    conn_interim: float = doc_field(60.0, "auto mode: seconds between interim rows (final = 0, cumulative) of a "
                                          "connection still open")
    conn_tcp_timeout: float = doc_field(300.0, "seconds without a packet after which a TCP connection gets its "
                                               "final row (Zeek's tcp_inactivity_timeout)")
    conn_udp_timeout: float = doc_field(60.0, "seconds without a packet after which a UDP (or other non-TCP, "
                                              "non-ICMP) connection gets its final row")
    conn_icmp_timeout: float = doc_field(60.0, "seconds without a packet after which an ICMP connection gets its "
                                               "final row")
    conn_linger: float = doc_field(5.0, "seconds a TCP connection that closed (FIN both ways) or reset waits "
                                        "for stragglers before its final row (Zeek's tcp_connection_linger)")
    filter: list[str] = doc_field([], "in-kernel filter rule, e.g. 'include src 198.18.0.0/15', 'exclude dport 22', "
                                      "'include proto tcp,udp' (see docs/filters.md)")
    filter_file: str = doc_field("", "file of filter rules, one per line; re-read when it changes and on SIGHUP")
    reader: str = doc_field("mmap", "ring-buffer consumer: mmap (bulk) or callback (BCC's, slower)")
    attach: str = doc_field("auto", "how the classifier attaches: tcx (links, Linux 6.6+; under systemd a "
                            "restart hands the running capture over without a gap), tc (cls_bpf filters) "
                            "or auto (tcx where the kernel has it)")
    spool: str = doc_field(default_spool(), "durable spool: every batch is on disk (fsynced) before it is sent "
                                            "and leaves when acked; also keeps this collector's identity and seqs "
                                            "across restarts; one collector per directory; '' = memory only")
    spool_max_bytes: int = doc_field(DEFAULT_SPOOL_MAX_BYTES, "largest the spool grows while the server does not "
                                                              "ack; beyond this the oldest batches are dropped and "
                                                              "counted (drop_spool_full)")
    metrics_listen: str = doc_field("", "HOST:PORT for Prometheus metrics at /metrics ('' = off)")
    insecure: bool = doc_field(False, "no TLS and no authentication (labs and demos only)")
    tls_cert: str = doc_field("", "this collector's certificate (PEM)")
    tls_key: str = doc_field("", "this collector's private key (PEM)")
    tls_ca: str = doc_field("", "CA certificate that signed the server's certificate (PEM)")
    batch_rows: int = doc_field(10_000, "close a batch when it holds this many records")
    batch_interval: float = doc_field(1.0, "close a batch at the latest this many seconds after its first record",
                                      duration=True)
    batch_compression: int = doc_field(1, "zstd level for a batch's columns on the wire and in the spool "
                                          "(1 is the measured sweet spot; 0 = uncompressed, for servers before it)")
    max_unacked_rows: int = doc_field(2_000_000, "without a spool, or while the spool's disk refuses "
                                                 "batches (full, read-only, failing): records kept in memory "
                                                 "waiting for the server's ack; beyond this the oldest batches "
                                                 "are dropped and counted (drop_unacked_full)")
    ringbuf_bytes: int = doc_field(8 << 20, "BPF ring buffer size in bytes (a power of two)")
    dns_ports: list[int] = doc_field([53, 5353], "UDP/TCP port whose payload is decoded as DNS "
                                                 "(besides the content-recognised HTTP and TLS)")
    tunnels: list[str] = doc_field(list(TUNNEL_TYPES), "tunnels the kernel opens, one level (their packets are "
                                                    "logged as the inner packet, with the tunnel's type, id and "
                                                    "outer addresses): any of vxlan, geneve, gre, ipip; 'none' "
                                                    "= keep every packet as it is on the wire (docs/sql.md)")
    vxlan_ports: list[int] = doc_field(list(DEFAULT_VXLAN_PORTS), "UDP destination port that carries VXLAN "
                                                                  "(IANA's 4789, Linux's default 8472); not "
                                                                  "4790, which is VXLAN-GPE, another header")
    geneve_ports: list[int] = doc_field(list(DEFAULT_GENEVE_PORTS), "UDP destination port that carries Geneve")
    status_interval: float = doc_field(5.0, "seconds between one-line status reports on stderr (0 = off)",
                                       duration=True)
    shutdown_timeout: float = doc_field(5.0, "seconds to wait for the server's acks when stopping", duration=True)

    def validate(self) -> None:
        if isinstance(self.server, str):  # a single value (the key's old shape) still works
            self.server = [self.server]
        self.server = [p for item in self.server for p in (s.strip() for s in str(item).split(",")) if p]
        if not self.server:
            raise ConfigError("server", "", "required: the server's HOST:PORT (several for failover)")
        for address in self.server:
            parse_hostport("server", address)
        if len(set(self.server)) != len(self.server):
            raise ConfigError("server", ",".join(self.server), "each server may be named once")
        if not self.iface:
            raise ConfigError("iface", self.iface, "name at least one interface (--iface NAME, globs allowed)")
        for name in self.iface:
            if not isinstance(name, str) or not name or (len(name) > 15 and not set("*?[") & set(name)):
                raise ConfigError("iface", name, "an interface name (at most 15 characters) or a glob")
        if self.sample < 1:
            raise ConfigError("sample", self.sample, "must be 1 or more")
        if self.mode not in ("packets", "flows", "auto"):
            raise ConfigError("mode", self.mode, "must be packets, flows or auto")
        if not 0 <= self.first_packets <= 1 << 20:
            raise ConfigError("first_packets", self.first_packets, f"must be from 0 to {1 << 20}")
        if not 0.1 <= self.flow_interval <= 3600:
            raise ConfigError("flow_interval", self.flow_interval, "must be from 0.1 to 3600 seconds")
        if not 16 <= self.flow_entries <= 1 << 24:
            raise ConfigError("flow_entries", self.flow_entries, f"must be from 16 to {1 << 24}")
        if not 16 <= self.conn_entries <= 1 << 24:
            raise ConfigError("conn_entries", self.conn_entries, f"must be from 16 to {1 << 24}")
        for key in ("conn_interim", "conn_tcp_timeout", "conn_udp_timeout", "conn_icmp_timeout"):
            if not 0.1 <= getattr(self, key) <= 7 * 86400:
                raise ConfigError(key, getattr(self, key), "must be from 0.1 to 604800 seconds")
        if not 0 <= self.conn_linger <= 3600:
            raise ConfigError("conn_linger", self.conn_linger, "must be from 0 to 3600 seconds")
        if self.attach not in ("auto", "tcx", "tc"):
            raise ConfigError("attach", self.attach, "must be auto, tcx or tc")
        if self.reader not in ("mmap", "callback"):
            raise ConfigError("reader", self.reader, "must be mmap or callback")
        from hdrlog.collector.filters import FilterError, parse_rules

        try:
            parse_rules(self.filter)
        except FilterError as e:
            raise ConfigError("filter", self.filter, str(e)) from None
        if self.filter_file and not os.access(self.filter_file, os.R_OK):
            raise ConfigError("filter_file", self.filter_file, "file not readable")
        if self.batch_rows < 1:
            raise ConfigError("batch_rows", self.batch_rows, "must be 1 or more")
        if not 0 <= self.batch_compression <= 19:
            raise ConfigError("batch_compression", self.batch_compression, "must be a zstd level from 0 (off) to 19")
        if not 0 < self.batch_interval <= 60:
            raise ConfigError("batch_interval", self.batch_interval, "must be more than 0 and at most 60 seconds")
        if self.max_unacked_rows < self.batch_rows:
            raise ConfigError("max_unacked_rows", self.max_unacked_rows, f"must be at least batch_rows ({self.batch_rows})")
        if self.spool_max_bytes < 1 << 20:
            raise ConfigError("spool_max_bytes", self.spool_max_bytes, "must be at least 1048576 (1 MiB)")
        if not 4096 <= self.ringbuf_bytes <= 1 << 30 or self.ringbuf_bytes & (self.ringbuf_bytes - 1):
            raise ConfigError("ringbuf_bytes", self.ringbuf_bytes, "must be a power of two from 4096 to 1073741824")
        try:
            self.dns_ports = [int(p) for p in self.dns_ports]
        except (TypeError, ValueError):
            raise ConfigError("dns_ports", self.dns_ports, "port numbers 1-65535") from None
        if len(self.dns_ports) > 16 or not all(1 <= p <= 65535 for p in self.dns_ports):
            raise ConfigError("dns_ports", self.dns_ports, "at most 16 port numbers 1-65535")
        self._validate_tunnels()
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
        if not self.insecure:
            from hdrlog.pki import TlsFileError, check_tls_files

            try:
                check_tls_files(self.tls_cert, self.tls_key, self.tls_ca)
            except TlsFileError as exc:
                raise ConfigError(exc.key, exc.path, str(exc)) from None
            # Under mTLS the identity *is* the certificate: the server stores rows only under its name.
            identity = _certificate_name(self.tls_cert)
            if self.host_id and self.host_id != identity:
                raise ConfigError("host_id", self.host_id,
                                  f"must be the client certificate's name {identity!r} (the server accepts rows "
                                  "only for that host), or left out to take it from the certificate")
            self.host_id = identity
        if not self.host_id:
            self.host_id = socket.gethostname()

    def _validate_tunnels(self) -> None:
        types = [t.strip().lower() for item in _items(self.tunnels) for t in item.split(",") if t.strip()]
        if types == ["none"]:
            types = []
        for t in types:
            if t not in TUNNEL_TYPES:
                raise ConfigError("tunnels", self.tunnels, f"any of {', '.join(TUNNEL_TYPES)}, or none")
        self.tunnels = [t for t in TUNNEL_TYPES if t in types]
        for key in ("vxlan_ports", "geneve_ports"):
            value = getattr(self, key)
            try:  # a YAML list, a comma list (env, one flag) or repeated flags
                ports = [int(p) for item in _items(value) for p in str(item).split(",") if p.strip()]
            except (TypeError, ValueError):
                raise ConfigError(key, value, "UDP port numbers 1-65535") from None
            if len(ports) > MAX_TUNNEL_PORTS or not all(1 <= p <= 65535 for p in ports):
                raise ConfigError(key, value, f"at most {MAX_TUNNEL_PORTS} UDP port numbers 1-65535")
            setattr(self, key, sorted(set(ports)))
        if VXLAN_GPE_PORT in self.vxlan_ports:
            raise ConfigError("vxlan_ports", self.vxlan_ports,
                              f"{VXLAN_GPE_PORT} is VXLAN-GPE, a different header that is not decoded")
        both = sorted(set(self.vxlan_ports) & set(self.geneve_ports))
        if both:
            raise ConfigError("geneve_ports", self.geneve_ports, f"port {both[0]} is in vxlan_ports too")


def _items(value) -> list[str]:
    """A list key's items as text: a single value (int, str) is one item."""
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _certificate_name(path: str) -> str:
    """The common name of the PEM certificate at ``path``: the identity the server sees."""
    from hdrlog.pki import identity_of

    try:
        name = identity_of(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError("tls_cert", path, f"not a readable PEM certificate ({exc})") from None
    if not name:
        raise ConfigError("tls_cert", path, "the certificate has no common name; issue it with "
                                            "`hdrlog pki issue --name HOST`")
    return name
