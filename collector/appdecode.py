"""App-layer columns (DNS, HTTP, TLS) from the payload bytes the kernel copied.

The classifier copies the first payload bytes of candidate packets only (see
bpf/hdrlog.c); ``fill`` narrows those again with a vectorised prefilter (DNS
ports; first bytes that start an HTTP/1.x message or a TLS handshake record)
and runs ``appheaders.parse_payload`` on the survivors alone, writing into the
registry columns of the batch. Nothing here raises on hostile bytes: the
decoders return what they could read.
"""

from __future__ import annotations

from typing import Iterable, MutableMapping, Sequence

import numpy as np

from hdrlog.collector import appheaders

DEFAULT_DNS_PORTS = (53, 5353)

_HTTP_WORDS = np.array(sorted(int.from_bytes(p, "big") for p in appheaders.HTTP_PREFIXES), dtype=np.uint32)
_TLS_WORD = 0x1603  # first two bytes of a TLS handshake record (content type 22, major version 3)

# AppHeaders attribute -> registry column, for the scalar ones.
_NUMERIC = ("dns_id", "dns_flags", "dns_qtype", "dns_rcode", "dns_answers", "http_status", "tls_version")
_STRINGS = ("dns_qname", "http_method", "http_host", "http_path", "http_user_agent", "tls_sni")


def candidates(proto: np.ndarray, sport: np.ndarray, dport: np.ndarray, head: np.ndarray,
               dns_ports: Iterable[int]) -> np.ndarray:
    """Boolean mask: rows worth decoding. ``head`` holds the first 4 payload bytes as a big-endian uint32."""
    ports = np.fromiter(dns_ports, dtype=np.uint16)
    l4 = (proto == 6) | (proto == 17)
    dns = l4 & (np.isin(sport, ports) | np.isin(dport, ports))
    tcp = proto == 6
    http = tcp & np.isin(head, _HTTP_WORDS)
    tls = tcp & ((head >> 16) == _TLS_WORD)
    return dns | http | tls


def fill(out: MutableMapping[str, object], rec: np.ndarray, payloads: Sequence[tuple[int, bytes]],
         dns_ports: Iterable[int] = DEFAULT_DNS_PORTS) -> int:
    """Decode the payloads of candidate rows into ``out``'s app-layer columns; returns rows decoded."""
    if not payloads:
        return 0
    ports = frozenset(int(p) for p in dns_ports)
    idx = np.fromiter((i for i, _ in payloads), dtype=np.int64, count=len(payloads))
    head = np.fromiter((int.from_bytes(b[:4].ljust(4, b"\0"), "big") for _, b in payloads),
                       dtype=np.uint32, count=len(payloads))
    sub = rec[idx]
    proto, sport, dport = sub["ip_proto"], sub["src_port"], sub["dst_port"]
    keep = np.flatnonzero(candidates(proto, sport, dport, head, ports))
    decoded = 0
    for k in keep.tolist():
        i, data = payloads[k]
        h = appheaders.parse_payload(data, int(proto[k]), int(sport[k]), int(dport[k]), ports)
        if h is None:
            continue
        decoded += 1
        for name in _NUMERIC:
            value = getattr(h, name)
            if value:
                out[name][i] = value  # type: ignore[index]
        for name in _STRINGS:
            value = getattr(h, name)
            if value:
                out[name][i] = value  # type: ignore[index]
        if h.tls_offered_versions:
            out["tls_offered_versions"][i] = ",".join(f"0x{v:04x}" for v in h.tls_offered_versions)  # type: ignore[index]
        if h.tls_alpn:
            out["tls_alpn"][i] = ",".join(a.replace(",", "%2C") for a in h.tls_alpn)  # type: ignore[index]
    return decoded
