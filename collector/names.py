"""Names and fingerprints (issue 14): what the decoded app headers reveal, kept across packets.

``Names`` is the collector's memory of three things, each bounded and each eviction counted:

Every key holds the packet's tunnel type and id too (``appdecode.tunnel_of``; (0, 0) when it was not
decapsulated), as the kernel's connection keys do: tenants of an overlay reuse addresses, so one VNI's
query, name or SNI is never another's.

* **DNS queries waiting for their response**, by (interface, protocol, client, server, id):
  a response's ``dns_rtt_us`` is the time since its query (the first one, when a query was
  resent with the same id). At most ``queries`` wait; a new one evicts the oldest
  (``dns_queries_evicted``).
* **Passive DNS**: per client (address and tunnel: the originator's host that asked), the addresses its
  resolver answered with and the name it asked for (the question's name, also when the
  answer came through CNAMEs). An LRU of ``names_per_host`` addresses per client, and of
  ``hosts`` clients (``dns_names_evicted``, ``dns_hosts_evicted``). A connection's
  ``resp_name`` is the name its originator resolved its responder's address from -- never a
  reverse lookup. The mappings seen in an interval also become ``dns_names`` rows
  (``drain_dns_names``: one row per interface, client (and tunnel), name and address per interval, with
  the first and last time seen and the last TTL; more than ``rows`` in an interval are
  dropped and counted, ``dns_names_dropped``).
* **The first TLS SNI, ALPN, JA4 and HTTP Host of each connection**, by (interface,
  protocol, both ends in a fixed order), for its ``connections`` rows (``annotate``); the
  entry goes with the connection's final row. At most ``conns`` connections
  (``conn_names_evicted``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import MutableMapping

import numpy as np

from hdrlog.collector.appheaders import AppHeaders
from hdrlog.collector.quic import InitialReassembly
from hdrlog.proto.columns import DNS_NAMES

DEFAULT_QUERIES = 16384
DEFAULT_HOSTS = 4096
DEFAULT_NAMES_PER_HOST = 1024
DEFAULT_CONNS = 65536
DEFAULT_ROWS = 65536
_V4MAPPED = b"\0" * 10 + b"\xff\xff"
_CONN_ATTRS = ("tls_sni", "tls_alpn", "ja4", "http_host")


def _addr16(text: str) -> bytes:
    import ipaddress

    a = ipaddress.ip_address(text)
    return _V4MAPPED + a.packed if a.version == 4 else a.packed


class Names:
    """See the module doc. ``observe`` per decoded packet row; ``annotate`` per connections chunk."""

    def __init__(self, queries: int = DEFAULT_QUERIES, hosts: int = DEFAULT_HOSTS,
                 names_per_host: int = DEFAULT_NAMES_PER_HOST, conns: int = DEFAULT_CONNS, rows: int = DEFAULT_ROWS):
        self.queries, self.hosts, self.names_per_host, self.conns, self.rows = queries, hosts, names_per_host, conns, rows
        self._queries: OrderedDict[tuple, int] = OrderedDict()
        self._passive: OrderedDict[tuple, OrderedDict[bytes, str]] = OrderedDict()  # (client, tunnel type, id)
        self._conns: OrderedDict[tuple, dict[str, str]] = OrderedDict()
        self._rows: dict[tuple, list[int]] = {}
        self.quic_reassembly = InitialReassembly()  # ClientHellos over two QUIC Initials
        self.counts = {"dns_rtt_matched": 0, "dns_queries_evicted": 0, "dns_names_evicted": 0,
                       "dns_hosts_evicted": 0, "dns_names_dropped": 0, "conn_names_evicted": 0}

    # -- packets ----------------------------------------------------------------------------
    def observe(self, out: MutableMapping[str, object], i: int, row, h: AppHeaders, is_dns: bool,
                tunnel: tuple[int, int] = (0, 0)) -> None:
        """One decoded packet row (``row`` its BPF record, ``out`` the packet columns, ``tunnel`` its
        decapsulated tunnel's type and id)."""
        proto = int(row["ip_proto"])
        src, dst = bytes(row["src_ip"]), bytes(row["dst_ip"])
        sport, dport = int(row["src_port"]), int(row["dst_port"])
        if is_dns:
            self._dns(out, i, int(row["ifindex"]), proto, src, sport, dst, dport, h, tunnel)
            return
        got = {a: v for a, v in (("tls_sni", h.tls_sni), ("ja4", h.ja4),
                                 ("http_host", h.http_host)) if v}
        if h.tls_alpn:
            got["tls_alpn"] = ",".join(a.replace(",", "%2C") for a in h.tls_alpn)
        if not got:
            return
        ends = sorted(((src, sport), (dst, dport)))
        key = (out["ifname"][i], proto, ends[0], ends[1]) + tunnel  # type: ignore[index]
        have = self._conns.get(key)
        if have is None:
            if len(self._conns) >= self.conns:
                self._conns.popitem(last=False)
                self.counts["conn_names_evicted"] += 1
            self._conns[key] = have = {}
        for a, v in got.items():
            have.setdefault(a, v)  # the first value seen

    def _dns(self, out, i, ifindex, proto, src, sport, dst, dport, h: AppHeaders, tunnel: tuple[int, int]) -> None:
        ts = int(out["ts"][i])  # type: ignore[index]
        if not h.dns_flags & 0x8000:  # a query
            key = (ifindex, proto, src, sport, dst, dport, h.dns_id) + tunnel
            if key not in self._queries:  # a resent query keeps the first one's time
                if len(self._queries) >= self.queries:
                    self._queries.popitem(last=False)
                    self.counts["dns_queries_evicted"] += 1
                self._queries[key] = ts
            return
        t0 = self._queries.pop((ifindex, proto, dst, dport, src, sport, h.dns_id) + tunnel, None)
        if t0 is not None and ts >= t0:
            out["dns_rtt_us"][i] = min((ts - t0) // 1000, 0xFFFFFFFF)  # type: ignore[index]
            self.counts["dns_rtt_matched"] += 1
        if h.dns_rcode or not h.dns_qname:
            return
        ifname = out["ifname"][i]  # type: ignore[index]
        for rtype, value, ttl, _owner in h.dns_answer_list:
            if rtype not in (1, 28):
                continue
            addr = _addr16(value)
            self._remember(dst, addr, h.dns_qname, tunnel)
            k = (ifname, dst, h.dns_qname, addr) + tunnel
            r = self._rows.get(k)
            if r is None:
                if len(self._rows) >= self.rows:
                    self.counts["dns_names_dropped"] += 1
                    continue
                self._rows[k] = [ts, ts, ttl, 1]
            else:
                r[1], r[2], r[3] = ts, ttl, r[3] + 1

    def _remember(self, client: bytes, addr: bytes, name: str, tunnel: tuple[int, int] = (0, 0)) -> None:
        client_key = (client,) + tunnel
        per = self._passive.get(client_key)
        if per is None:
            if len(self._passive) >= self.hosts:
                self._passive.popitem(last=False)
                self.counts["dns_hosts_evicted"] += 1
            self._passive[client_key] = per = OrderedDict()
        else:
            self._passive.move_to_end(client_key)
        if addr in per:
            per.move_to_end(addr)
        elif len(per) >= self.names_per_host:
            per.popitem(last=False)
            self.counts["dns_names_evicted"] += 1
        per[addr] = name  # the latest name that resolved to it

    def resolved(self, client: bytes, addr: bytes, tunnel: tuple[int, int] = (0, 0)) -> str:
        """The name ``client`` (behind ``tunnel``) last resolved ``addr`` from, or ''."""
        per = self._passive.get((client,) + tunnel)
        return per.get(addr, "") if per else ""

    # -- connections ------------------------------------------------------------------------
    def annotate(self, cols: MutableMapping[str, object]) -> None:
        """Fill resp_name, tls_sni, tls_alpn, ja4 and http_host of a connections chunk in place."""
        n = len(cols["uid"])  # type: ignore[arg-type]
        add = {name: [""] * n for name in ("resp_name",) + _CONN_ATTRS}
        ttype, tid = cols.get("tunnel_type"), cols.get("tunnel_id")
        for j in range(n):
            orig, resp = bytes(cols["orig_ip"][j]), bytes(cols["resp_ip"][j])  # type: ignore[index]
            op, rp = int(cols["orig_port"][j]), int(cols["resp_port"][j])  # type: ignore[index]
            tunnel = (int(ttype[j]), int(tid[j])) if ttype is not None and tid is not None else (0, 0)  # type: ignore[index]
            add["resp_name"][j] = self.resolved(orig, resp, tunnel)
            ends = sorted(((orig, op), (resp, rp)))
            key = (cols["ifname"][j], int(cols["ip_proto"][j]), ends[0], ends[1]) + tunnel  # type: ignore[index]
            have = self._conns.pop(key, None) if int(cols["final"][j]) else self._conns.get(key)  # type: ignore[index]
            if have:
                for a in _CONN_ATTRS:
                    add[a][j] = have.get(a, "")
        cols.update(add)

    # -- dns_names rows ---------------------------------------------------------------------
    def drain_dns_names(self) -> dict[str, object] | None:
        """The interval's ``dns_names`` rows (registry columns), or None."""
        if not self._rows:
            return None
        items, self._rows = list(self._rows.items()), {}
        cols: dict[str, object] = {}
        for spec in DNS_NAMES:
            name = spec.name
            if name == "first_seen":
                v: object = np.array([r[0] for _, r in items], dtype=spec.dtype)
            elif name == "last_seen":
                v = np.array([r[1] for _, r in items], dtype=spec.dtype)
            elif name == "ifname":
                v = [k[0] for k, _ in items]
            elif name == "client_ip":
                v = np.frombuffer(b"".join(k[1] for k, _ in items), dtype="V16").copy()
            elif name == "name":
                v = [k[2] for k, _ in items]
            elif name == "address":
                v = np.frombuffer(b"".join(k[3] for k, _ in items), dtype="V16").copy()
            elif name == "ttl":
                v = np.array([r[2] for _, r in items], dtype=spec.dtype)
            elif name == "responses":
                v = np.array([r[3] for _, r in items], dtype=spec.dtype)
            elif name == "tunnel_type":
                v = np.array([k[4] for k, _ in items], dtype=spec.dtype)
            elif name == "tunnel_id":
                v = np.array([k[5] for k, _ in items], dtype=spec.dtype)
            else:
                v = [""] * len(items) if spec.is_string else np.zeros(len(items), dtype=spec.dtype)
            cols[name] = v
        return cols

    def counters(self) -> dict[str, int]:
        return {**self.counts, **self.quic_reassembly.counters()}
