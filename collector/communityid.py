"""Community ID v1 (corelight/community-id-spec): the key a connection row, its packet rows and a
Zeek or Suricata log of the same traffic join on.

Minimal stand-in written with the connection layer (issue 13); the dedicated implementation from
the Community ID work keeps this signature and replaces this file::

    "1:" + base64(sha1(seed . saddr . daddr . proto . 0 . sport . dport))

seed as 2 bytes in network order, IPv4 addresses as 4 bytes (IPv4-mapped ones too), IPv6 as 16,
the smaller (address, port) end first; ports only for TCP, UDP, SCTP, and for ICMP / ICMPv6 the
type and the counterpart type of a request/reply (else the code, and the ends stay as given).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import struct

PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMP6, PROTO_SCTP = 1, 6, 17, 58, 132
ICMP_COUNTERPART = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 10: 9, 9: 10, 17: 18, 18: 17}
ICMP6_COUNTERPART = {128: 129, 129: 128, 130: 131, 131: 130, 133: 134, 134: 133, 135: 136, 136: 135,
                     139: 140, 140: 139, 144: 145, 145: 144}
_MAPPED = b"\x00" * 10 + b"\xff\xff"


def _addr(a) -> bytes:
    b = bytes(a) if isinstance(a, (bytes, bytearray, memoryview)) else ipaddress.ip_address(a).packed
    if len(b) not in (4, 16):
        raise ValueError(f"address of {len(b)} bytes: give 4 (IPv4) or 16 (IPv6)")
    return b[12:] if len(b) == 16 and b[:12] == _MAPPED else b


def community_id(proto: int, saddr, daddr, sport: int, dport: int, seed: int = 0) -> str:
    """Community ID v1 of one tuple (addresses as bytes, text or ipaddress objects)."""
    s, d = _addr(saddr), _addr(daddr)
    one_way = False
    if proto in (PROTO_ICMP, PROTO_ICMP6):
        table = ICMP_COUNTERPART if proto == PROTO_ICMP else ICMP6_COUNTERPART
        if sport in table:
            dport = table[sport]
        else:
            one_way = True
    has_ports = proto in (PROTO_TCP, PROTO_UDP, PROTO_SCTP, PROTO_ICMP, PROTO_ICMP6)
    if not one_way and (s, sport if has_ports else 0) > (d, dport if has_ports else 0):
        s, d, sport, dport = d, s, dport, sport
    data = struct.pack("!H", seed) + s + d + struct.pack("!BB", proto, 0)
    if has_ports:
        data += struct.pack("!HH", sport, dport)
    return "1:" + base64.b64encode(hashlib.sha1(data).digest()).decode()
