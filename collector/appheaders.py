"""Application header elements from the first bytes of an L4 payload: DNS, HTTP/1.x, TLS hellos.

The kernel copies the first bytes of each payload into the record; these
decoders read them in user space. Each takes untrusted bytes that may be cut
short anywhere and returns what it could read, never raising on bad input:
a truncated or hostile message yields fewer fields, not an exception. Every
string is length-capped.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

MAX_STR = 256  # cap for every string column
DNS_MAX_NAME = 255
DNS_MAX_POINTERS = 16

HTTP_METHODS = (b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE")
# First four bytes that can start an HTTP/1.x request or response: a cheap prefilter.
HTTP_PREFIXES = frozenset(m[:4].ljust(4, b" ")[:4] for m in HTTP_METHODS) | {b"HTTP"}

TLS_HANDSHAKE = 0x16
TLS_CLIENT_HELLO = 1
TLS_SERVER_HELLO = 2
TLS_EXT_SNI = 0
TLS_EXT_ALPN = 16
TLS_EXT_SUPPORTED_VERSIONS = 43


@dataclass
class AppHeaders:
    """Decoded application header elements; absent values are 0 or ''."""

    dns_id: int = 0
    dns_flags: int = 0  # the DNS header's flags word: QR, opcode, AA, TC, RD, RA, Z, AD, CD, rcode
    dns_qname: str = ""
    dns_qtype: int = 0
    dns_rcode: int = 0
    dns_answers: int = 0
    http_method: str = ""
    http_path: str = ""
    http_host: str = ""
    http_user_agent: str = ""
    http_status: int = 0
    tls_sni: str = ""
    tls_version: int = 0  # ServerHello: the chosen version; ClientHello: the highest offered
    tls_offered_versions: list[int] = field(default_factory=list)
    tls_alpn: list[str] = field(default_factory=list)


def _text(raw: bytes) -> str:
    """Printable text from untrusted bytes, capped; invalid UTF-8 is replaced."""
    return raw[:MAX_STR].decode("utf-8", "replace")


# -- DNS --------------------------------------------------------------------------------
def dns_name(msg: bytes, offset: int) -> tuple[str, int]:
    """Read a (possibly compressed) name at ``offset``; returns (name, offset after it).

    Lowercased; bytes outside printable ASCII and dots inside a label are written
    as \\DDD (as in zone files). Each pointer must point before everything read
    so far, so no name can loop. A name cut short by the end of the bytes returns
    what was read; an invalid one (forward or looping pointer, over 255 octets)
    returns "" and the offset after its first pointer (a pointer ends a name's
    encoding wherever it points; -1 when there was none), so the question's
    type is still read where tshark reads it.
    """
    labels: list[str] = []
    length = 0
    end = -1
    jumps = 0
    pos = floor = offset
    while pos < len(msg):
        n = msg[pos]
        if n == 0:
            pos += 1
            break
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(msg):
                break
            target = ((n & 0x3F) << 8) | msg[pos + 1]
            if end < 0:
                end = pos + 2
            jumps += 1
            if target >= floor or jumps > DNS_MAX_POINTERS:
                return "", end  # forward or looping pointer: not a name (tshark agrees)
            pos = floor = target
            continue
        if n & 0xC0:
            break  # 0x40 / 0x80 label types are not names
        label = msg[pos + 1: pos + 1 + n]
        if len(label) < n:
            labels.append(_label(label))
            pos = len(msg)
            break
        length += n + 1
        if length > DNS_MAX_NAME:
            return "", end  # longer than a name can be: not a name (tshark: "<name too long>")
        labels.append(_label(label))
        pos += 1 + n
    name = ".".join(labels)
    return name[:MAX_STR], (end if end >= 0 else pos)


def _label(raw: bytes) -> str:
    out = []
    for b in raw.lower():
        if 0x21 <= b <= 0x7E and b not in (0x2E, 0x5C):
            out.append(chr(b))
        else:
            out.append(f"\\{b:03d}")
    return "".join(out)


def parse_dns(msg: bytes, h: AppHeaders) -> bool:
    """Fill DNS fields from a DNS message (UDP payload, or TCP payload after its length)."""
    if len(msg) < 12:
        return False
    dns_id, flags, qdcount, ancount = struct.unpack_from("!HHHH", msg)
    h.dns_id, h.dns_flags, h.dns_rcode, h.dns_answers = dns_id, flags, flags & 0xF, ancount
    if qdcount:
        h.dns_qname, after = dns_name(msg, 12)
        if 0 <= after and after + 2 <= len(msg):
            h.dns_qtype = struct.unpack_from("!H", msg, after)[0]
    return True


def looks_like_dns(msg: bytes) -> bool:
    """A plausible DNS header: opcode 0-6, at most a few questions, Z bit clear is not required."""
    if len(msg) < 12:
        return False
    flags, qdcount = struct.unpack_from("!HH", msg, 2)
    opcode = (flags >> 11) & 0xF
    return opcode <= 6 and qdcount <= 4


# -- HTTP -------------------------------------------------------------------------------
def parse_http(payload: bytes, h: AppHeaders) -> bool:
    """Request line with Host and User-Agent, or a response status line."""
    line_end = payload.find(b"\r\n")
    first = payload if line_end < 0 else payload[:line_end]
    if first.startswith(b"HTTP/1."):
        parts = first.split(b" ", 2)
        if len(parts) >= 2 and len(parts[1]) == 3 and parts[1].isdigit():
            h.http_status = int(parts[1])
            return True
        return False
    parts = first.split(b" ")
    if len(parts) < 2 or parts[0] not in HTTP_METHODS:
        return False
    if len(parts) >= 3 and not parts[2].startswith(b"HTTP/"):
        return False
    h.http_method = parts[0].decode()
    h.http_path = _text(parts[1])
    if line_end >= 0:
        for line in payload[line_end + 2:].split(b"\r\n"):
            if not line:
                break
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            key = name.strip().lower()
            if key == b"host" and not h.http_host:
                h.http_host = _text(value.strip())
            elif key == b"user-agent" and not h.http_user_agent:
                h.http_user_agent = _text(value.strip())
    return True


# -- TLS --------------------------------------------------------------------------------
def parse_tls(payload: bytes, h: AppHeaders) -> bool:
    """ClientHello (SNI, offered versions, ALPN) or ServerHello (chosen version)."""
    if len(payload) < 9 or payload[0] != TLS_HANDSHAKE or payload[1] != 3:
        return False
    kind = payload[5]
    if kind not in (TLS_CLIENT_HELLO, TLS_SERVER_HELLO):
        return False
    body = payload[9:]  # after record header (5) and handshake header (4)
    if len(body) < 2:
        return True
    h.tls_version = struct.unpack_from("!H", body)[0]
    pos = 2 + 32  # version, random
    if pos >= len(body):
        return True
    pos += 1 + body[pos]  # session id
    if kind == TLS_CLIENT_HELLO:
        if pos + 2 > len(body):
            return True
        pos += 2 + struct.unpack_from("!H", body, pos)[0]  # cipher suites
        if pos >= len(body):
            return True
        pos += 1 + body[pos]  # compression methods
    else:
        pos += 2 + 1  # chosen cipher suite, compression method
    if pos + 2 > len(body):
        return True
    end = min(len(body), pos + 2 + struct.unpack_from("!H", body, pos)[0])
    pos += 2
    while pos + 4 <= end:
        ext, length = struct.unpack_from("!HH", body, pos)
        data = body[pos + 4: min(end, pos + 4 + length)]
        pos += 4 + length
        if ext == TLS_EXT_SNI and kind == TLS_CLIENT_HELLO:
            _tls_sni(data, h)
        elif ext == TLS_EXT_ALPN and kind == TLS_CLIENT_HELLO:
            _tls_alpn(data, h)
        elif ext == TLS_EXT_SUPPORTED_VERSIONS:
            if kind == TLS_SERVER_HELLO and len(data) >= 2:
                h.tls_version = struct.unpack_from("!H", data)[0]
            elif kind == TLS_CLIENT_HELLO and data:
                listed = data[1: 1 + data[0]]
                versions = [int.from_bytes(listed[i: i + 2], "big") for i in range(0, len(listed) - 1, 2)]
                h.tls_offered_versions = [v for v in versions if v & 0x0F0F != 0x0A0A]  # drop GREASE
                if h.tls_offered_versions:
                    h.tls_version = max(h.tls_offered_versions)
    if kind == TLS_CLIENT_HELLO and not h.tls_offered_versions and h.tls_version:
        h.tls_offered_versions = [h.tls_version]
    return True


def _tls_sni(data: bytes, h: AppHeaders) -> None:
    pos = 2  # server_name_list length
    while pos + 3 <= len(data):
        name_type, length = data[pos], struct.unpack_from("!H", data, pos + 1)[0]
        if name_type == 0:
            h.tls_sni = _text(data[pos + 3: pos + 3 + length]).lower()
            return
        pos += 3 + length


def _tls_alpn(data: bytes, h: AppHeaders) -> None:
    pos = 2  # protocol_name_list length
    while pos < len(data) and len(h.tls_alpn) < 8:
        length = data[pos]
        h.tls_alpn.append(_text(data[pos + 1: pos + 1 + length]))
        pos += 1 + length


# -- dispatch ---------------------------------------------------------------------------
def parse_payload(payload: bytes, ip_proto: int, src_port: int, dst_port: int,
                  dns_ports: frozenset[int] = frozenset({53, 5353})) -> AppHeaders | None:
    """Decode whichever application header the payload carries, or None.

    On a DNS port any message of 12 bytes or more is decoded as DNS, as tshark
    does: the header's fields are what they are even when the opcode or counts
    are bogus (``looks_like_dns`` tells plausible ones apart when that matters).
    """
    if not payload:
        return None
    h = AppHeaders()
    if ip_proto == 17 and (src_port in dns_ports or dst_port in dns_ports):
        return h if parse_dns(payload, h) else None
    if ip_proto != 6:
        return None
    if (src_port in dns_ports or dst_port in dns_ports) and len(payload) >= 14:
        # DNS over TCP: a 2-byte length, then the message.
        return h if parse_dns(payload[2:], h) else None
    if payload[:4] in HTTP_PREFIXES:
        return h if parse_http(payload, h) else None
    if payload[0] == TLS_HANDSHAKE:
        return h if parse_tls(payload, h) else None
    return None
