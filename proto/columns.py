"""The column registry: which tables and columns travel in a Batch, and their types.

Collector and server both read this table, so a column's wire type is declared
once. Columns are numpy arrays in memory (strings: a sequence of ``str``), and
``encode_table`` / ``decode_table`` move them into and out of the ``Table``
message of ``ingest.proto`` without a Python object per fixed-width value.

Server-side columns that never travel (``host``, ``collector_id``,
``batch_seq``) are added by the server and are not listed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import zstandard

from hdrlog.proto import ingest_pb2

STRING = "str"  # marker for variable-length UTF-8 columns
ZSTD = ingest_pb2.ZSTD
# zstd level the collector uses by default: level 1 takes most of what zstd can (a packets batch
# of bench/synth.py traffic: 165 -> 24 bytes a row; level 3: 23.7, level 6: 23.0) for a third
# of the time of level 3 (BENCHMARKS.md, "wire bytes").
DEFAULT_COMPRESS_LEVEL = 1
# Columns shorter than this travel as they are: a zstd frame costs ~10 bytes.
MIN_COMPRESS_BYTES = 64


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    dtype: str  # a little-endian numpy dtype string such as "<u4", "V16", or STRING
    doc: str

    @property
    def is_string(self) -> bool:
        return self.dtype == STRING

    @property
    def itemsize(self) -> int:
        return 0 if self.is_string else np.dtype(self.dtype).itemsize


def _cols(*specs: tuple[str, str, str]) -> tuple[ColumnSpec, ...]:
    return tuple(ColumnSpec(*s) for s in specs)


PACKETS = _cols(
    ("ts", "<i8", "capture time, UTC nanoseconds since the epoch"),
    ("ifname", STRING, "interface the packet crossed"),
    ("direction", "u1", "1 = ingress, 2 = egress"),
    ("sample_rate", "<u4", "1 = every packet was logged, N = one in N"),
    ("wire_len", "<u4", "frame length on the wire, VLAN tags included"),
    ("eth_src", "<u8", "source MAC as a 48-bit number"),
    ("eth_dst", "<u8", "destination MAC as a 48-bit number"),
    ("vlan_id", "<u2", "outermost VLAN id, 0 = untagged"),
    ("eth_type", "<u2", "EtherType after any VLAN tags"),
    ("ip_version", "u1", "4, 6, or 0 for non-IP"),
    ("src_ip", "V16", "IPv6 address in network order; IPv4 as ::ffff:a.b.c.d"),
    ("dst_ip", "V16", "IPv6 address in network order; IPv4 as ::ffff:a.b.c.d"),
    ("ip_proto", "u1", "IPv4 protocol / final IPv6 next header"),
    ("ttl", "u1", "IPv4 TTL or IPv6 hop limit"),
    ("dscp", "u1", "DiffServ code point"),
    ("ecn", "u1", "ECN bits"),
    ("ip_id", "<u4", "IPv4 identification, IPv6 fragment identification"),
    ("frag_offset", "<u2", "fragment offset in 8-byte units"),
    ("more_fragments", "u1", "MF flag (1/0)"),
    ("dont_fragment", "u1", "DF flag (1/0)"),
    ("flow_label", "<u4", "IPv6 flow label"),
    ("src_port", "<u2", "TCP/UDP source port"),
    ("dst_port", "<u2", "TCP/UDP destination port"),
    ("tcp_flags", "<u2", "bit 0 FIN .. bit 7 CWR, bit 8 AE"),
    ("tcp_seq", "<u4", "TCP sequence number"),
    ("tcp_ack", "<u4", "TCP acknowledgement number"),
    ("tcp_window", "<u2", "TCP window (unscaled)"),
    ("tcp_mss", "<u2", "MSS option, 0 = absent"),
    ("tcp_wscale", "u1", "window scale option, 0 = absent"),
    ("udp_len", "<u2", "UDP length field"),
    ("icmp_type", "u1", "ICMP or ICMPv6 type"),
    ("icmp_code", "u1", "ICMP or ICMPv6 code"),
    ("dns_id", "<u2", "DNS transaction id"),
    ("dns_qname", STRING, "first question name, lowercased"),
    ("dns_qtype", "<u2", "first question type"),
    ("dns_rcode", "u1", "DNS response code"),
    ("http_method", STRING, "HTTP request method"),
    ("http_host", STRING, "HTTP Host header"),
    ("http_path", STRING, "HTTP request target"),
    ("http_status", "<u2", "HTTP response status"),
    ("tls_sni", STRING, "TLS ClientHello server name"),
    ("parse_flags", "<u2", "parser notes, bits in bpf/types.h (PARSE_*): truncation and oddities"),
    ("dns_flags", "<u2", "DNS header flags word: QR, opcode, AA, TC, RD, RA, Z, AD, CD, rcode"),
    ("dns_answers", "<u2", "DNS answer count (ANCOUNT)"),
    ("http_user_agent", STRING, "HTTP User-Agent header"),
    ("tls_version", "<u2", "TLS ServerHello chosen version, or ClientHello highest offered version"),
    ("tls_offered_versions", STRING, "TLS ClientHello offered versions, comma-separated hex such as 0x0304,0x0303"),
    ("tls_alpn", STRING, "TLS ClientHello ALPN protocols, comma-separated"),
    ("vlan_inner_id", "<u2", "innermost VLAN id when the frame has two or more tags, else 0"),
    ("truncated", "<u2", "which app-layer values were cut (bits in collector/appheaders.py TRUNC_*; docs/sql.md)"),
    # Issue 14, names and fingerprints (collector/names.py, ja4.py, quic.py).
    ("dns_answer_records", STRING, "DNS response's A, AAAA and CNAME answers, comma-separated 'TYPE value ttl'"),
    ("dns_rtt_us", "<u4", "DNS response: microseconds since its query (same 5-tuple and id), 0 = query not seen"),
    ("ja4", STRING, "JA4 fingerprint of a TLS or QUIC ClientHello (FoxIO's JA4, BSD-3)"),
    ("quic_version", "<u4", "QUIC long header's version (0x00000001 = v1), 0 = not QUIC"),
    ("community_id", STRING, "Community ID v1, seed 0, of the packet's connection (TCP, UDP, ICMP, ICMPv6, SCTP; "
                             "'' for others and for fragments and headers cut short)"),
    # Issue 14 item 5, tunnels (bpf/tunnel.h): with TUN_DECAP the L3/L4 columns are the inner packet's.
    ("tunnel_type", "u1", "encapsulation found: 0 none, 1 vxlan, 2 geneve, 3 gre, 4 ipip (the server stores the name)"),
    ("tunnel_id", "<u4", "VXLAN / Geneve VNI or GRE key, 0 = none"),
    ("tunnel_flags", "u1", "tunnel notes, bits in bpf/types.h TUN_*: 1 decapsulated, 2 cut, 4 malformed, 8 other "
                           "payload, 16 nested tunnel not opened"),
    ("tunnel_vlan_id", "<u2", "VLAN id of the encapsulated Ethernet frame (its first tag), 0 = none"),
    ("outer_src_ip", "V16", "outer (tunnel) IP source, IPv6 / IPv4-mapped; :: when not tunnelled"),
    ("outer_dst_ip", "V16", "outer (tunnel) IP destination"),
)

# tunnel_type numbers on the wire (bpf/types.h TUNNEL_*) and the names the tables store.
TUNNEL_TYPES = ("", "vxlan", "geneve", "gre", "ipip")

FLOWS = _cols(
    ("start_ts", "<i8", "first packet, UTC nanoseconds"),
    ("end_ts", "<i8", "last packet, UTC nanoseconds"),
    ("ifname", STRING, "interface"),
    ("direction", "u1", "1 = ingress, 2 = egress"),
    ("ip_version", "u1", "4 or 6"),
    ("src_ip", "V16", "IPv6 / IPv4-mapped source"),
    ("dst_ip", "V16", "IPv6 / IPv4-mapped destination"),
    ("ip_proto", "u1", "protocol"),
    ("src_port", "<u2", "source port"),
    ("dst_port", "<u2", "destination port"),
    ("packets", "<u8", "packets in the interval"),
    ("bytes", "<u8", "wire bytes in the interval"),
    ("tcp_flags", "<u2", "OR of all TCP flags"),
    ("sample_rate", "<u4", "1 = every packet counted"),
    ("community_id", STRING, "Community ID v1, seed 0 (TCP, UDP, SCTP; '' for ICMP flows, whose key has no type, "
                             "and port-0 fragment flows)"),
    ("tunnel_type", "u1", "encapsulation of a decapsulated flow (the tuple is the inner one): as packets.tunnel_type"),
    ("tunnel_id", "<u4", "its VNI / GRE key (part of the flow key)"),
)

# One row per bidirectional connection per host interface, Zeek's conn.log semantics
# (collector/connections.py). Interim rows (final = 0) are cumulative; the final row has the totals.
CONNECTIONS = _cols(
    ("start_ts", "<i8", "first packet, UTC nanoseconds"),
    ("end_ts", "<i8", "last packet so far, UTC nanoseconds"),
    ("ifname", STRING, "interface"),
    ("uid", STRING, "stable id of the connection, the same on all its rows (C + base62)"),
    ("final", "u1", "1 on the row written when the connection ended or timed out, 0 on interim rows"),
    ("ip_version", "u1", "4 or 6"),
    ("ip_proto", "u1", "protocol"),
    ("orig_ip", "V16", "originator (IPv6 / IPv4-mapped)"),
    ("orig_port", "<u2", "originator port; ICMP: the type"),
    ("resp_ip", "V16", "responder (IPv6 / IPv4-mapped)"),
    ("resp_port", "<u2", "responder port; ICMP: the code, or the counterpart type of a request/reply"),
    ("orig_pkts", "<u8", "packets the originator sent"),
    ("resp_pkts", "<u8", "packets the responder sent"),
    ("orig_ip_bytes", "<u8", "IP bytes (total lengths) the originator sent"),
    ("resp_ip_bytes", "<u8", "IP bytes the responder sent"),
    ("orig_bytes", "<u8", "payload bytes the originator sent (TCP: by sequence numbers)"),
    ("resp_bytes", "<u8", "payload bytes the responder sent"),
    ("conn_state", STRING, "Zeek's conn_state: S0 S1 SF REJ S2 S3 RSTO RSTR RSTOS0 RSTRH SH SHR OTH"),
    ("history", STRING, "Zeek's history letters, originator upper case"),
    ("handshake_rtt_us", "<u4", "SYN to the originator's ACK of the SYN-ACK, microseconds; 0 = no handshake seen"),
    ("orig_retrans", "<u4", "originator packets that resent payload"),
    ("resp_retrans", "<u4", "responder packets that resent payload"),
    ("zero_windows", "<u4", "zero-window advertisements, both sides"),
    ("community_id", STRING, "Community ID v1, seed 0"),
    # Issue 14 (collector/names.py): the first value seen on the connection's packets.
    ("resp_name", STRING, "the name the originator's host resolved the responder's address from (passive DNS)"),
    ("tls_sni", STRING, "first TLS (or QUIC Initial) ClientHello server name"),
    ("tls_alpn", STRING, "its ALPN protocols, comma-separated"),
    ("ja4", STRING, "its JA4 fingerprint"),
    ("http_host", STRING, "first HTTP Host header"),
    # Issue 14 item 5, tunnels: the connection is the inner flow's; type and id are part of its key.
    ("tunnel_type", "u1", "encapsulation of a tunnelled connection: as packets.tunnel_type"),
    ("tunnel_id", "<u4", "its VNI / GRE key (part of the connection key: tenants reuse addresses)"),
    ("outer_orig_ip", "V16", "outer (tunnel endpoint) address on the originator's side, from the first packet"),
    ("outer_resp_ip", "V16", "outer address on the responder's side, from the first packet"),
)

# Passive DNS (collector/names.py): one row per interface, client, name and address per
# collector interval in which a response mapped the name to the address.
DNS_NAMES = _cols(
    ("first_seen", "<i8", "first response in the interval, UTC nanoseconds"),
    ("last_seen", "<i8", "last response in the interval, UTC nanoseconds"),
    ("ifname", STRING, "interface"),
    ("client_ip", "V16", "the host that asked (IPv6 / IPv4-mapped)"),
    ("name", STRING, "the question's name (what the client asked for, also when answered through CNAMEs)"),
    ("address", "V16", "an A / AAAA answer (IPv6 / IPv4-mapped)"),
    ("ttl", "<u4", "the answer's TTL in the last response, seconds"),
    ("responses", "<u4", "responses with this mapping in the interval"),
    # Tunnels: a decapsulated response's tunnel (tenants of an overlay reuse client addresses).
    ("tunnel_type", "u1", "encapsulation of the response (decapsulated): as packets.tunnel_type"),
    ("tunnel_id", "<u4", "its VNI / GRE key: the client is the tenant's host with that address"),
)

COLLECTOR_STATS = _cols(
    ("ts", "<i8", "end of the interval, UTC nanoseconds"),
    ("interval_ms", "<u4", "length of the interval"),
    ("counter", STRING, "what was counted: seen, logged, or drop_<reason>"),
    ("value", "<u8", "count during the interval"),
)

TABLES: dict[str, tuple[ColumnSpec, ...]] = {
    "packets": PACKETS,
    "flows": FLOWS,
    "connections": CONNECTIONS,
    "collector_stats": COLLECTOR_STATS,
    "dns_names": DNS_NAMES,
}

DIRECTIONS = {1: "ingress", 2: "egress"}


class ColumnError(ValueError):
    """A Table message does not match the registry; the message names the column."""


class InflateError(ColumnError):
    """A compressed column breaks its declared sizes or the server's bound."""


def spec_of(table: str) -> dict[str, ColumnSpec]:
    try:
        return {c.name: c for c in TABLES[table]}
    except KeyError:
        raise ColumnError(f"unknown table {table!r} (known: {', '.join(TABLES)})") from None


def empty_columns(table: str, rows: int) -> dict[str, object]:
    """Zero / empty-string columns of the given length, one per registry column."""
    out: dict[str, object] = {}
    for c in TABLES[table]:
        out[c.name] = [""] * rows if c.is_string else np.zeros(rows, dtype=c.dtype)
    return out


def encode_strings(values: Sequence[str]) -> tuple[bytes, bytes]:
    """UTF-8 data and Arrow-style int32 offsets (rows + 1 of them)."""
    rows = len(values)
    # Fast paths, no Python work per row: most app-layer columns are all empty, and
    # ifname usually holds one interface name for a whole batch.
    if not any(values):
        return b"", bytes(4 * (rows + 1))
    distinct = set(values)
    if len(distinct) == 1:
        one = distinct.pop().encode("utf-8", "replace")
        return one * rows, (np.arange(rows + 1, dtype="<i4") * len(one)).tobytes()
    encoded = [v.encode("utf-8", "replace") for v in values]
    lengths = np.fromiter((len(b) for b in encoded), dtype="<i4", count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype="<i4")
    np.cumsum(lengths, out=offsets[1:])
    return b"".join(encoded), offsets.tobytes()


def encode_table(table: str, columns: Mapping[str, object], rows: int, *, level: int = 0) -> ingest_pb2.Table:
    """Build a Table message; every registry column must be present with ``rows`` values.

    ``level`` > 0 compresses each column with zstd at that level where it is worth it
    (``Compression.ZSTD`` in ingest.proto); 0 sends every column as it is (what collectors before
    compression sent, still accepted)."""
    msg = ingest_pb2.Table(name=table, rows=rows)
    zc = zstandard.ZstdCompressor(level=level) if level > 0 else None
    for spec in TABLES[table]:
        values = columns[spec.name]
        if len(values) != rows:
            raise ColumnError(f"column {table}.{spec.name} has {len(values)} values, expected {rows}")
        col = msg.columns.add(name=spec.name)
        if spec.is_string:
            data, offsets = encode_strings(values)  # type: ignore[arg-type]
            if zc is not None and len(data) + len(offsets) >= MIN_COMPRESS_BYTES:
                lengths = np.diff(np.frombuffer(offsets, dtype="<i4")).astype("<i4").tobytes()
                cv, co = zc.compress(data), zc.compress(lengths)
                if len(cv) + len(co) < len(data) + len(offsets):
                    col.values, col.offsets, col.compression = cv, co, ZSTD
                    col.values_size, col.offsets_size = len(data), len(lengths)
                    continue
            col.values, col.offsets = data, offsets
        else:
            raw = np.ascontiguousarray(values, dtype=spec.dtype).tobytes()
            if zc is not None and len(raw) >= MIN_COMPRESS_BYTES:
                packed = zc.compress(raw)
                if len(packed) < len(raw):
                    col.values, col.compression, col.values_size = packed, ZSTD, len(raw)
                    continue
            col.values = raw
    return msg


class Inflater:
    """Inflates the compressed columns of one batch within a byte budget (the server's bound).

    Declared sizes are checked before anything is inflated: a fixed-width column must declare
    exactly rows x width, string lengths rows x 4, and all of a batch's inflated bytes together
    at most ``budget``; a frame that inflates to anything but its declared size is refused.
    """

    def __init__(self, budget: int):
        self.left = budget
        self._zd = zstandard.ZstdDecompressor()

    def _take(self, where: str, frame: bytes, size: int) -> bytes:
        if size > self.left:
            raise InflateError(f"{where} declares {size} bytes once inflated, past what the batch may hold "
                              f"({self.left} bytes left of the server's bound)")
        try:
            out = self._zd.decompress(frame, max_output_size=size) if size else b""
        except zstandard.ZstdError as exc:
            raise InflateError(f"{where} is not a zstd frame of {size} bytes ({exc})") from None
        if len(out) != size:
            raise InflateError(f"{where} inflates to {len(out)} bytes, it declares {size}")
        self.left -= size
        return out

    def column(self, table: str, col: ingest_pb2.Column, spec: ColumnSpec, rows: int) -> tuple[bytes, bytes]:
        """(values, offsets) of a column as NONE would carry them."""
        where = f"column {table}.{col.name}"
        if col.compression == ingest_pb2.NONE:
            return col.values, col.offsets
        if col.compression != ZSTD:
            raise InflateError(f"{where} has compression {col.compression}, not one this server knows (NONE, ZSTD)")
        if spec.is_string:
            if col.offsets_size != rows * 4:
                raise InflateError(f"{where} declares {col.offsets_size} bytes of lengths, expected {rows} x 4")
            lengths = np.frombuffer(self._take(where + " lengths", col.offsets, col.offsets_size), dtype="<i4")
            if rows and int(lengths.min()) < 0:
                raise InflateError(f"{where} has a negative string length")
            offsets = np.zeros(rows + 1, dtype="<i8")
            np.cumsum(lengths, out=offsets[1:])
            if offsets[-1] != col.values_size:
                raise InflateError(f"{where} lengths add up to {int(offsets[-1])} bytes, it declares {col.values_size}")
            return self._take(where, col.values, col.values_size), offsets.astype("<i4").tobytes()
        if col.values_size != rows * spec.itemsize:
            raise InflateError(f"{where} declares {col.values_size} bytes, expected {rows} x {spec.itemsize}")
        return self._take(where, col.values, col.values_size), b""


def decode_table(msg: ingest_pb2.Table, inflater: Inflater | None = None) -> tuple[dict[str, object], list[str]]:
    """Check a received Table against the registry and return its columns.

    Fixed-width columns come back as read-only numpy views of the message bytes;
    string columns as ``(values: bytes, offsets: np.ndarray[int32])`` pairs whose
    offsets have been checked (UTF-8 validity is the caller's job: Arrow checks it).
    Missing columns are filled with zeros / empty strings. Returns the columns and
    the names of unknown columns that were ignored. Raises ColumnError naming the
    first problem found. Compressed columns are inflated by ``inflater`` (its budget bounds
    them; without one, a compressed column is refused).
    """
    specs = spec_of(msg.name)
    rows = msg.rows
    out: dict[str, object] = {}
    ignored: list[str] = []
    for col in msg.columns:
        spec = specs.get(col.name)
        if spec is None:
            ignored.append(col.name)
            continue
        if col.name in out:
            raise ColumnError(f"column {msg.name}.{col.name} appears twice")
        if col.compression != ingest_pb2.NONE:
            if inflater is None:
                raise ColumnError(f"column {msg.name}.{col.name} is compressed and no inflater was given")
            values, offsets = inflater.column(msg.name, col, spec, rows)
        else:
            values, offsets = col.values, col.offsets
        if spec.is_string:
            out[col.name] = (values, _check_offsets(msg.name, col.name, values, offsets, rows))
        else:
            if len(values) != rows * spec.itemsize:
                raise ColumnError(
                    f"column {msg.name}.{col.name} has {len(values)} bytes, "
                    f"expected {rows} x {spec.itemsize}"
                )
            out[col.name] = np.frombuffer(values, dtype=spec.dtype)
    for spec in specs.values():
        if spec.name not in out:
            if spec.is_string:
                out[spec.name] = (b"", np.zeros(rows + 1, dtype="<i4"))
            else:
                out[spec.name] = np.zeros(rows, dtype=spec.dtype)
    return out, ignored


def table_bytes(msg: ingest_pb2.Table) -> tuple[int, int]:
    """(bytes sent, bytes of zeros to fill) for a Table message, before decoding anything.

    Bytes sent are those of the registry's columns present (values and offsets; for a
    compressed column the sizes it declares once inflated, which the server's inflate bound
    holds to ``max_message_bytes`` before anything is inflated); bytes to
    fill are what ``decode_table`` would allocate for the absent ones at ``msg.rows`` rows
    (fixed width: rows x item size; strings: rows + 1 int32 offsets). A receiver compares the
    two to refuse a table whose rows are not carried by its bytes. Unknown tables give (0, 0).
    """
    specs = {c.name: c for c in TABLES.get(msg.name, ())}
    rows = msg.rows
    sent = 0
    present: set[str] = set()
    for col in msg.columns:
        if col.name in specs:
            present.add(col.name)
            if col.compression != ingest_pb2.NONE:
                sent += col.values_size + col.offsets_size
            else:
                sent += len(col.values) + len(col.offsets)
    filled = sum((rows + 1) * 4 if s.is_string else rows * s.itemsize
                 for name, s in specs.items() if name not in present)
    return sent, filled


def _check_offsets(table: str, name: str, values: bytes, raw: bytes, rows: int) -> np.ndarray:
    if len(raw) != (rows + 1) * 4:
        raise ColumnError(
            f"column {table}.{name} has {len(raw) // 4} offsets, expected {rows + 1}"
        )
    offsets = np.frombuffer(raw, dtype="<i4")
    if offsets[0] != 0 or offsets[-1] != len(values) or (rows and np.any(np.diff(offsets) < 0)):
        raise ColumnError(f"column {table}.{name} has offsets that do not index its values")
    return offsets


def decode_strings(values: bytes, offsets: np.ndarray) -> list[str]:
    """Python strings from an encoded string column (tests and small tools)."""
    return [values[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]
