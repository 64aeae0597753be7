"""Decode raw BPF records (bpf/types.h ``struct pkt_record``) into packet columns.

``RECORD_DTYPE`` mirrors the C struct's fixed part field for field; ``decode``
turns a run of those into the ``packets`` columns of the registry
(``hdrlog.proto.columns``) with one numpy pass per column, no Python object per
record except the interface-name strings. Records that carry payload bytes
(app-layer candidates) come with them apart, as ``(index, bytes)`` pairs, and
``appdecode`` fills the DNS / HTTP / TLS columns from those. A record with
PARSE_TUNNEL has the 40-byte tunnel extension (``TUNNEL_EXT_DTYPE``) after its
payload bytes: ``split_tunnels`` takes it off, and its fields become the tunnel_*
and outer_* columns. Change this file and ``bpf/types.h`` together.
"""

from __future__ import annotations

import time
from typing import Iterable, Mapping, Sequence

import numpy as np

from hdrlog.collector import appdecode, communityid
from hdrlog.proto.columns import PACKETS

# parse_flags bits (bpf/types.h PARSE_*).
PARSE_TRUNC_L2 = 1 << 0  # Ethernet header or a VLAN tag cut short
PARSE_TRUNC_L3 = 1 << 1  # IPv4/IPv6 header or an IPv6 extension header cut short
PARSE_TRUNC_L4 = 1 << 2  # TCP/UDP/ICMP header (or TCP options) cut short
PARSE_BAD_IHL = 1 << 3  # IPv4 IHL < 5: L4 not parsed
PARSE_EXTHDR_LIMIT = 1 << 4  # more IPv6 extension headers than the parser walks
PARSE_VLAN_LIMIT = 1 << 5  # more VLAN tags than the parser walks
PARSE_BAD_TCP_DOFF = 1 << 6  # TCP data offset < 5
PARSE_BAD_TCP_OPT = 1 << 7  # malformed TCP option list, or more options than walked
PARSE_VLAN_ACCEL = 1 << 8  # outer VLAN tag was in skb metadata, not in the frame
PARSE_NONFIRST_FRAG = 1 << 9  # non-first fragment: no L4 header
PARSE_TCP_WSCALE = 1 << 10  # window-scale option present (tcp_wscale 0 is real)
PARSE_BAD_IP_VERSION = 1 << 11  # version nibble disagrees with the EtherType
PARSE_GSO = 1 << 12  # GSO/GRO super-packet: wire_len covers several frames
PARSE_PAYLOAD_CUT = 1 << 13  # payload copy shorter than the candidate payload (cap or load error)
PARSE_TUNNEL = 1 << 14  # a tunnel header was found: a tunnel extension follows the payload bytes (bpf/tunnel.h)

PARSE_FLAG_NAMES = {v: k for k, v in globals().items() if k.startswith("PARSE_") and isinstance(v, int)}
PARSE_TRUNC_ANY = PARSE_TRUNC_L2 | PARSE_TRUNC_L3 | PARSE_TRUNC_L4

# Per-CPU counter indexes (bpf/types.h CNT_*), in index order.
COUNTER_NAMES = ("seen", "logged", "ringbuf_full", "truncated", "payload", "filtered", "sampled_out",
                 "flowed", "flow_map_full", "conn_tracked", "conn_map_full")

# log_reason bits (bpf/modes.h LOG_*): why a record was sent.
LOG_ALL = 1 << 0  # packets mode, every packet
LOG_SAMPLED = 1 << 1  # the 1:N sample: stands for N packets
LOG_FIRST = 1 << 2  # among the first packets of its flow
LOG_TCP_CTRL = 1 << 3  # TCP SYN, FIN or RST
LOG_DNS = 1 << 4  # to or from a DNS port
LOG_ICMP = 1 << 5  # ICMP / ICMPv6
LOG_APP = 1 << 6  # app-layer candidate (payload copied)
LOG_FLOW_FALLBACK = 1 << 7  # flow map full: counted into flows from this record
LOG_CONN_FALLBACK = LOG_ALL  # auto mode (bpf/conntrack.h): connection map full, the record stands for itself
LOG_NOTABLE = LOG_FIRST | LOG_TCP_CTRL | LOG_DNS | LOG_ICMP | LOG_APP

DIR_INGRESS = 1
DIR_EGRESS = 2

RECORD_DTYPE = np.dtype(
    [
        ("mono_ns", "<u8"),
        ("ifindex", "<u4"),
        ("wire_len", "<u4"),
        ("src_ip", "V16"),
        ("dst_ip", "V16"),
        ("eth_src", "u1", (6,)),
        ("eth_dst", "u1", (6,)),
        ("vlan_id", "<u2"),
        ("eth_type", "<u2"),
        ("ip_id", "<u4"),
        ("flow_label", "<u4"),
        ("tcp_seq", "<u4"),
        ("tcp_ack", "<u4"),
        ("frag_offset", "<u2"),
        ("src_port", "<u2"),
        ("dst_port", "<u2"),
        ("tcp_flags", "<u2"),
        ("tcp_window", "<u2"),
        ("tcp_mss", "<u2"),
        ("udp_len", "<u2"),
        ("l4_payload_off", "<u2"),
        ("l4_payload_len", "<u2"),
        ("parse_flags", "<u2"),
        ("direction", "u1"),
        ("ip_version", "u1"),
        ("ip_proto", "u1"),
        ("ttl", "u1"),
        ("dscp", "u1"),
        ("ecn", "u1"),
        ("more_fragments", "u1"),
        ("dont_fragment", "u1"),
        ("tcp_wscale", "u1"),
        ("icmp_type", "u1"),
        ("icmp_code", "u1"),
        ("log_reason", "u1"),
        ("payload_len", "<u2"),
        ("ip_len", "<u2"),
        ("l4_len", "<u2"),
        ("vlan_inner_id", "<u2"),
    ]
)
RECORD_SIZE = RECORD_DTYPE.itemsize
assert RECORD_SIZE == 120, RECORD_SIZE  # sizeof(struct pkt_record); payload bytes follow it

# The tunnel extension (bpf/types.h struct tunnel_ext): 40 bytes after the payload bytes of a record
# with PARSE_TUNNEL. tunnel_type (TUNNEL_*) travels as its number; the server stores the name.
TUNNEL_EXT_DTYPE = np.dtype([
    ("tunnel_type", "u1"), ("tunnel_flags", "u1"), ("tunnel_vlan_id", "<u2"), ("tunnel_id", "<u4"),
    ("outer_src_ip", "V16"), ("outer_dst_ip", "V16"),
])
TUNNEL_EXT_SIZE = TUNNEL_EXT_DTYPE.itemsize
assert TUNNEL_EXT_SIZE == 40, TUNNEL_EXT_SIZE
TUNNEL_VXLAN, TUNNEL_GENEVE, TUNNEL_GRE, TUNNEL_IPIP = 1, 2, 3, 4
TUNNEL_NAMES = ("", "vxlan", "geneve", "gre", "ipip")  # by TUNNEL_* (proto/columns.py TUNNEL_TYPES)
TUN_DECAP = 1 << 0  # the record's L3/L4 fields are the inner packet's
assert appdecode.TUN_DECAP == TUN_DECAP
TUN_CUT = 1 << 1  # the tunnel header or the inner headers before IP were cut short
TUN_BAD = 1 << 2  # malformed tunnel header or inner IP version
TUN_OTHER = 1 << 3  # carries something not decoded (non-IP inner frame, GRE routing / version 1, ...)
TUN_NESTED = 1 << 4  # the inner packet is a tunnel candidate itself: not opened (one level)
_TUNNEL_COLUMNS = TUNNEL_EXT_DTYPE.names


def split_tunnels(rec: np.ndarray, payloads: Sequence[tuple[int, bytes]]):
    """Take the tunnel extensions off the tails of the records with PARSE_TUNNEL: (payloads without
    them, the extensions as a TUNNEL_EXT_DTYPE array of len(rec), zeros where none; or None when no
    record has one)."""
    if not payloads:
        return payloads, None
    flags = rec["parse_flags"]
    if not (flags & PARSE_TUNNEL).any():
        return payloads, None
    ext = np.zeros(len(rec), TUNNEL_EXT_DTYPE)
    plen = rec["payload_len"]
    out: list[tuple[int, bytes]] = []
    for i, tail in payloads:
        if flags[i] & PARSE_TUNNEL:
            n = int(plen[i])
            e = tail[n:n + TUNNEL_EXT_SIZE]
            if len(e) == TUNNEL_EXT_SIZE:
                ext[i] = np.frombuffer(e, TUNNEL_EXT_DTYPE)[0]
            tail = tail[:n]
            if not tail:
                continue
        out.append((i, tail))
    return out, ext

# Registry columns copied as they are from the record (same name, cast to the registry dtype).
_DIRECT = tuple(
    c.name
    for c in PACKETS
    if not c.is_string and c.name in RECORD_DTYPE.names and c.name not in ("eth_src", "eth_dst")
)
_MAC_WEIGHTS = np.array([1 << (8 * (5 - i)) for i in range(6)], dtype=np.uint64)


def mac_to_u64(macs: np.ndarray) -> np.ndarray:
    """(N, 6) uint8 MAC bytes -> uint64 numbers, first byte most significant."""
    return macs.astype(np.uint64) @ _MAC_WEIGHTS


def mono_to_wall_offset_ns() -> int:
    """UTC ns minus CLOCK_MONOTONIC ns (what ``decode`` adds to mono_ns), from the tightest of a few
    sandwiched reads."""
    best = None
    for _ in range(5):
        m1 = time.monotonic_ns()
        w = time.time_ns()
        m2 = time.monotonic_ns()
        if best is None or m2 - m1 < best[0]:
            best = (m2 - m1, w - (m1 + m2) // 2)
    return best[1]


def split_flow_fallback(raw, n: int, payloads: list[tuple[int, bytes]]):
    """Take the records with LOG_FLOW_FALLBACK (the flow map was full: user space counts them into
    flows) out of a run of ``n``: (those records or None, (raw, n, payloads, records view) of the ones
    still to log as rows)."""
    rec = as_records(raw, n)
    why = rec["log_reason"]
    fallback = (why & LOG_FLOW_FALLBACK) != 0
    if not fallback.any():
        return None, (raw, n, payloads, rec)
    taken = rec[fallback].copy()
    keep = (why & (0xFF ^ LOG_FLOW_FALLBACK)) != 0
    if keep.all():
        return taken, (raw, n, payloads, rec)
    idx = np.flatnonzero(keep)
    remap = {int(j): i for i, j in enumerate(idx)}
    raw = rec[keep].tobytes()
    return taken, (raw, len(idx), [(remap[i], b) for i, b in payloads if i in remap], as_records(raw, len(idx)))


def sample_rates(why: np.ndarray, effective_sample: int) -> np.ndarray | None:
    """sample_rate per record from its log_reason, or None when every record stands for itself: a
    sampled record stands for N packets unless it is notable anyway (or a conn-map-full fallback)."""
    sampled = (why & LOG_SAMPLED) != 0
    if not sampled.any():
        return None
    rate = np.ones(len(why), dtype=np.uint32)
    rate[sampled & ((why & (LOG_NOTABLE | LOG_CONN_FALLBACK)) == 0)] = max(1, effective_sample)
    return rate


def as_records(raw: bytes | bytearray | memoryview, count: int) -> np.ndarray:
    """View ``count`` packed records as a structured array (no copy)."""
    if len(raw) < count * RECORD_SIZE:
        raise ValueError(f"{len(raw)} bytes hold fewer than {count} records of {RECORD_SIZE} bytes")
    return np.frombuffer(raw, dtype=RECORD_DTYPE, count=count)


def decode(
    raw: bytes | bytearray | memoryview,
    count: int,
    ifnames: Mapping[int, str],
    mono_to_wall_ns: int,
    sample_rate: int = 1,
    payloads: Sequence[tuple[int, bytes]] = (),
    dns_ports: Iterable[int] = appdecode.DEFAULT_DNS_PORTS,
    reassembly: appdecode.Reassembly | None = None,
    names_state=None,
    cids: communityid.CommunityIdCache | None = None,
) -> dict[str, object]:
    """Packet columns (registry order and dtypes) from ``count`` packed records.

    ``mono_to_wall_ns`` is added to the CLOCK_MONOTONIC stamps to give UTC
    nanoseconds; ``ifnames`` maps ifindex to name (unknown ones become "if<N>").
    ``payloads`` are the payload bytes of the records that carry some, as
    ``(record index, bytes)``; the app-layer columns are decoded from them
    (``appdecode.fill``, with ``reassembly`` for TLS hellos over two segments)
    and stay 0 / '' for every other record. ``community_id`` comes from ``cids`` (once per
    connection; default: the process's cache).
    """
    rec = as_records(raw, count)
    payloads, tunnels = split_tunnels(rec, payloads)
    out: dict[str, object] = {}
    for spec in PACKETS:
        name = spec.name
        if name == "ts":
            out[name] = rec["mono_ns"].astype(np.int64) + np.int64(mono_to_wall_ns)
        elif name == "ifname":
            idx = rec["ifindex"]
            uniq, inverse = np.unique(idx, return_inverse=True)
            names = [ifnames.get(int(i)) or f"if{int(i)}" for i in uniq]
            out[name] = [names[j] for j in inverse.tolist()]
        elif name == "sample_rate":
            out[name] = np.full(count, sample_rate, dtype=spec.dtype)
        elif name in ("eth_src", "eth_dst"):
            out[name] = mac_to_u64(rec[name]).astype(spec.dtype)
        elif name in _DIRECT:
            out[name] = np.ascontiguousarray(rec[name]).astype(spec.dtype, copy=False)
        elif name in _TUNNEL_COLUMNS and tunnels is not None:
            out[name] = np.ascontiguousarray(tunnels[name]).astype(spec.dtype, copy=False)
        elif spec.is_string:
            out[name] = [""] * count
        else:
            out[name] = np.zeros(count, dtype=spec.dtype)
    if payloads:
        appdecode.fill(out, rec, payloads, dns_ports, reassembly, names_state)  # collector/names.py
    out["community_id"] = community_id_column(rec, cids or communityid.CACHE)
    return out


# What keeps a packet out of the connection tracker (bpf/conntrack.h conn_key_of) keeps it
# without a Community ID too: the same tuple, or none, on the packet and its connection.
_NO_TUPLE = (PARSE_TRUNC_L3 | PARSE_TRUNC_L4 | PARSE_BAD_IHL | PARSE_EXTHDR_LIMIT | PARSE_NONFIRST_FRAG
             | PARSE_BAD_IP_VERSION)


def community_id_column(rec: np.ndarray, cids: communityid.CommunityIdCache) -> list[str]:
    """The Community ID of every record's tuple ('' where it has none)."""
    proto = rec["ip_proto"]
    ok = (rec["ip_version"] != 0) & np.isin(proto, communityid.ID_PROTOCOLS) & ((rec["parse_flags"] & _NO_TUPLE) == 0)
    icmp = (proto == 1) | (proto == 58)
    sport = np.where(icmp, rec["icmp_type"], rec["src_port"])
    dport = np.where(icmp, rec["icmp_code"], rec["dst_port"])
    return cids.of_rows(proto, rec["src_ip"], rec["dst_ip"], sport, dport, ok)
