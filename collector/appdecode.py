"""App-layer columns (DNS, HTTP, TLS) from the payload bytes the kernel copied.

The classifier copies the first payload bytes of candidate packets only (see
bpf/hdrlog.c); ``fill`` narrows those again with a vectorised prefilter (DNS
ports; first bytes that start an HTTP/1.x message or a TLS handshake record)
and runs ``appheaders.parse_payload`` on the survivors alone, writing into the
registry columns of the batch. Nothing here raises on hostile bytes: the
decoders return what they could read.

A TLS hello longer than one TCP segment (a ClientHello with a post-quantum key
share is ~1,800 bytes) is reassembled from the first two segments: the kernel
copies the segment that follows a cut-short hello (bpf/hdrlog.c, map
`tls_cont`), and ``Reassembly`` keeps the first segment's bytes per direction of
a connection (with its tunnel type and id, as the kernel's key: tenants of an
overlay reuse inner 5-tuples) until it comes, in bounded memory (oldest evicted first, counted).
The hello's columns go on the row of the segment that completes it, as tshark
shows a reassembled message on its last segment; the first row keeps what it
could read and its TRUNC_TLS_HELLO bit.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, MutableMapping, Sequence

import numpy as np

from hdrlog.collector import appheaders, ja4, quic

DEFAULT_DNS_PORTS = (53, 5353)

_HTTP_WORDS = np.array(sorted(int.from_bytes(p, "big") for p in appheaders.HTTP_PREFIXES), dtype=np.uint32)
_METHOD_CHAR = np.zeros(256, dtype=bool)
_METHOD_CHAR[list(appheaders._METHOD_CHARS)] = True
_TLS_WORD = 0x1603  # first two bytes of a TLS handshake record (content type 22, major version 3)

# AppHeaders attribute -> registry column, for the scalar ones.
_NUMERIC = ("dns_id", "dns_flags", "dns_qtype", "dns_rcode", "dns_answers", "http_status", "tls_version")
_STRINGS = ("dns_qname", "http_method", "http_host", "http_path", "http_user_agent", "tls_sni", "ja4")
QUIC_PORTS = (443,)  # UDP ports whose long-header payloads are QUIC (bpf/hdrlog.c app_candidate)

REASSEMBLY_ENTRIES = 4096  # first segments of cut-short TLS hellos kept at most (~2 KiB each)
REASSEMBLY_MAX_HELLO = 16384 + 9  # a hello needing more than this is not waited for


class Reassembly:
    """First segments of TLS hellos that go on in the next segment, per (interface, direction, 5-tuple,
    tunnel type and id: ``tunnel_of``; two tenants of an overlay reuse inner 5-tuples).

    Bounded: at most ``entries`` first segments; a new one evicts the oldest
    (``evicted`` counts them). A second segment that does not start where the first
    ended (loss, reordering, retransmission) drops the entry (``mismatched``).
    """

    def __init__(self, entries: int = REASSEMBLY_ENTRIES):
        self.entries = entries
        self._pending: OrderedDict[tuple, tuple[int, bytes]] = OrderedDict()
        self.stored = 0
        self.completed = 0
        self.evicted = 0
        self.mismatched = 0

    def __len__(self) -> int:
        return len(self._pending)

    def keep(self, key: tuple, next_seq: int, data: bytes) -> None:
        if key in self._pending:
            del self._pending[key]
        elif len(self._pending) >= self.entries:
            self._pending.popitem(last=False)
            self.evicted += 1
        self._pending[key] = (next_seq, data)
        self.stored += 1

    def take(self, key: tuple, seq: int) -> bytes | None:
        """The first segment's bytes when this segment continues it (entry removed), else None."""
        got = self._pending.pop(key, None)
        if got is None:
            return None
        if got[0] != seq:
            self.mismatched += 1
            return None
        self.completed += 1
        return got[1]

    def counters(self) -> dict[str, int]:
        return {"tls_reassembled": self.completed, "tls_reassembly_evicted": self.evicted,
                "tls_reassembly_mismatched": self.mismatched}


def candidates(proto: np.ndarray, sport: np.ndarray, dport: np.ndarray, head: np.ndarray,
               dns_ports: Iterable[int]) -> np.ndarray:
    """Boolean mask: rows worth decoding. ``head`` holds the first 4 payload bytes as a big-endian uint32."""
    ports = np.fromiter(dns_ports, dtype=np.uint16)
    l4 = (proto == 6) | (proto == 17)
    dns = l4 & (np.isin(sport, ports) | np.isin(dport, ports))
    tcp = proto == 6
    quic_ = (proto == 17) & (np.isin(sport, QUIC_PORTS) | np.isin(dport, QUIC_PORTS)) & ((head >> 30) == 3)
    return dns | quic_ | (tcp & (http_heads(head) | ((head >> 16) == _TLS_WORD)))


def http_heads(head: np.ndarray) -> np.ndarray:
    """``appheaders.http_head`` over big-endian uint32 first words: could this start an HTTP request?"""
    b = [((head >> (24 - 8 * i)) & 0xFF).astype(np.intp) for i in range(4)]
    ok = _METHOD_CHAR[b[0]]
    ended = np.zeros(len(head), dtype=bool)
    for i in range(1, 4):
        space = b[i] == 0x20
        ok &= ended | space | _METHOD_CHAR[b[i]]
        ended |= space
    return ok | np.isin(head, _HTTP_WORDS)


TUN_DECAP = 1  # records.TUN_DECAP (records imports this module)


def tunnel_of(out: MutableMapping[str, object], i: int) -> tuple[int, int]:
    """(tunnel_type, tunnel_id) of packet row ``i`` when it was decapsulated (its L3/L4 columns are the
    inner packet's), else (0, 0): with the 5-tuple, what tells one tenant's flow from another's, as in
    the kernel's connection and flow keys (bpf/conntrack.h conn_key_of)."""
    flags = out.get("tunnel_flags")
    if flags is None or not int(flags[i]) & TUN_DECAP:  # type: ignore[index]
        return (0, 0)
    return (int(out["tunnel_type"][i]), int(out["tunnel_id"][i]))  # type: ignore[index]


def _key(row, tunnel: tuple[int, int]) -> tuple:
    return (int(row["ifindex"]), int(row["direction"]), bytes(row["src_ip"]), bytes(row["dst_ip"]),
            int(row["src_port"]), int(row["dst_port"])) + tunnel


def fill(out: MutableMapping[str, object], rec: np.ndarray, payloads: Sequence[tuple[int, bytes]],
         dns_ports: Iterable[int] = DEFAULT_DNS_PORTS, reassembly: Reassembly | None = None,
         names=None) -> int:
    """Decode the payloads of candidate rows into ``out``'s app-layer columns; returns rows decoded.

    With ``reassembly``, a TLS hello cut short by the end of its segment (the whole
    segment copied) is kept, and the segment that continues it is decoded together
    with it; without, each row is decoded alone. ``names`` (a ``names.Names``) sees every
    decoded row: DNS response times and passive DNS, and the connections' first names.
    """
    if not payloads:
        return 0
    ports = frozenset(int(p) for p in dns_ports)
    idx = np.fromiter((i for i, _ in payloads), dtype=np.int64, count=len(payloads))
    head = np.fromiter((int.from_bytes(b[:4].ljust(4, b"\0"), "big") for _, b in payloads),
                       dtype=np.uint32, count=len(payloads))
    sub = rec[idx]
    proto, sport, dport = sub["ip_proto"], sub["src_port"], sub["dst_port"]
    mask = candidates(proto, sport, dport, head, ports)
    if reassembly is not None:
        # A continuation segment starts with any bytes; the kernel copies a non-candidate TCP
        # payload only when it continues a cut-short hello, so these rows are few.
        mask |= proto == 6
    decoded = 0
    for k in np.flatnonzero(mask).tolist():
        i, data = payloads[k]
        p, sp, dp = int(proto[k]), int(sport[k]), int(dport[k])
        row = sub[k]
        tun = tunnel_of(out, i)
        joined = False
        if reassembly is not None and p == 6 and len(reassembly):
            first = reassembly.take(_key(row, tun), int(row["tcp_seq"]))
            if first is not None:
                data, joined = first + data, True
        is_dns = p in (6, 17) and (sp in ports or dp in ports)
        if p == 17 and not is_dns and (sp in QUIC_PORTS or dp in QUIC_PORTS):
            h = _quic(out, i, row, data, names, tun)
        else:
            h = appheaders.parse_payload(data, p, sp, dp, ports)
        if h is None:
            continue
        if p == 6 and len(data) > 5 and data[0] == appheaders.TLS_HANDSHAKE and data[5] == appheaders.TLS_CLIENT_HELLO \
                and not h.truncated & appheaders.TRUNC_TLS_HELLO and not is_dns:
            h.ja4 = ja4.ja4_of_record(data)
        if (reassembly is not None and h.truncated & appheaders.TRUNC_TLS_HELLO and not joined
                and int(row["payload_len"]) == int(row["l4_payload_len"])
                and 0 < h.tls_missing <= REASSEMBLY_MAX_HELLO):
            # The hello goes on past this whole segment: wait for the next one.
            reassembly.keep(_key(row, tun), (int(row["tcp_seq"]) + int(row["l4_payload_len"])) & 0xFFFFFFFF, data)
        decoded += 1
        for name in _NUMERIC:
            value = getattr(h, name)
            if value:
                out[name][i] = value  # type: ignore[index]
        for name in _STRINGS:
            value = getattr(h, name)
            if value:
                out[name][i] = value  # type: ignore[index]
        if h.truncated:
            out["truncated"][i] = h.truncated  # type: ignore[index]
        if h.tls_offered_versions:
            out["tls_offered_versions"][i] = ",".join(f"0x{v:04x}" for v in h.tls_offered_versions)  # type: ignore[index]
        if h.tls_alpn:
            out["tls_alpn"][i] = ",".join(a.replace(",", "%2C") for a in h.tls_alpn)  # type: ignore[index]
        if h.dns_answer_list:
            out["dns_answer_records"][i] = answer_records(h.dns_answer_list)  # type: ignore[index]
        if names is not None:
            names.observe(out, i, row, h, is_dns, tun)
    return decoded


_RTYPES = {1: "A", 5: "CNAME", 28: "AAAA"}


def answer_records(answers: list[tuple[int, str, int, str]]) -> str:
    """The dns_answer_records text: 'TYPE value ttl' per answer, comma-separated (',' in a name: \\044)."""
    return ",".join(f"{_RTYPES[t]} {v.replace(',', chr(92) + '044')} {ttl}" for t, v, ttl, _ in answers)


def _quic(out: MutableMapping[str, object], i: int, row, data: bytes, names,
          tunnel: tuple[int, int] = (0, 0)) -> appheaders.AppHeaders | None:
    """A QUIC long-header datagram: its version, and a client Initial's ClientHello (SNI, ALPN,
    JA4) once whole -- across Initials with ``names`` (its reassembly), else from this one alone."""
    ini = quic.parse_initial(data)
    if ini is None:
        return None
    out["quic_version"][i] = ini.version  # type: ignore[index]
    if not ini.crypto:
        return None
    if names is not None:
        key = (int(row["ifindex"]), bytes(row["src_ip"]), int(row["src_port"]), ini.dcid) + tunnel
        hello, whole = names.quic_reassembly.add(key, ini.crypto)
    else:
        hello, whole = quic.hello_of(ini.crypto)
    if not whole or not hello or hello[0] != appheaders.TLS_CLIENT_HELLO:
        return None
    h = appheaders.AppHeaders()
    appheaders.parse_tls(quic.as_tls_record(hello), h)
    h.ja4 = ja4.ja4_of_hello(hello, "q")
    return h
