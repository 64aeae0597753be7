"""Application header elements from the first bytes of an L4 payload: DNS, HTTP/1.x, TLS hellos.

The kernel copies the first bytes of each payload into the record; these
decoders read them in user space. Each takes untrusted bytes that may be cut
short anywhere and returns what it could read, never raising on bad input:
a truncated or hostile message yields fewer fields, not an exception. Every
string has a documented limit (docs/sql.md, "Limits and the truncated column"),
and a value that was cut -- by that limit or because the copy ended first -- sets
its TRUNC_* bit in ``AppHeaders.truncated``: never silently different.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

MAX_STR = 256  # characters, cap for the HTTP and TLS string columns
DNS_MAX_NAME = 255  # octets of a name on the wire (RFC 1035 2.3.4), the cap of dns_qname before escaping
DNS_MAX_POINTERS = 16
HTTP_MAX_METHOD = 32  # a longer token is not taken for a method
TLS_MAX_ALPN = 8  # ALPN protocols kept
DNS_MAX_ANSWERS = 16  # answer records kept per response (dns_answer_records)

# Bits of AppHeaders.truncated (the packets column `truncated`): which value was cut,
# or could not be read to its end because the copied bytes ended first.
TRUNC_DNS_QNAME = 1 << 0  # dns_qname cut: over 255 octets, or the copy ended inside the name
TRUNC_DNS_HEADER = 1 << 1  # DNS message ended before its header / first question was whole
TRUNC_HTTP_PATH = 1 << 2  # http_path cut: over MAX_STR, copy ended inside it, or the target had spaces
TRUNC_HTTP_HOST = 1 << 3  # http_host over MAX_STR
TRUNC_HTTP_USER_AGENT = 1 << 4  # http_user_agent over MAX_STR
TRUNC_HTTP_HEADERS = 1 << 5  # the copy ended inside the header block: Host / User-Agent may be beyond it
TRUNC_TLS_HELLO = 1 << 6  # the copy ended inside the hello: versions / SNI / ALPN beyond it are unknown
TRUNC_TLS_SNI = 1 << 7  # tls_sni cut (over MAX_STR or the copy ended inside it)
TRUNC_TLS_ALPN = 1 << 8  # tls_alpn cut (more than TLS_MAX_ALPN protocols, one over MAX_STR, or copy end)
TRUNC_HTTP_METHOD = 1 << 9  # the request line ended before " HTTP/": method and path from a cut line
TRUNC_DNS_ANSWERS = 1 << 10  # dns_answer_records cut: more than DNS_MAX_ANSWERS, or the copy ended inside them
TRUNC_NAMES = {v: k for k, v in globals().items() if k.startswith("TRUNC_") and isinstance(v, int)}

HTTP_METHODS = (b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE")
# WebDAV (RFC 4918, 5323, 3253) and other registered methods: taken even from a request line cut
# before its version, like the nine above. Any other token needs " HTTP/" after its target.
HTTP_METHODS_EXTRA = (b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK", b"SEARCH",
                      b"REPORT", b"MKCALENDAR", b"ACL", b"BIND", b"UNBIND", b"REBIND", b"MERGE", b"CHECKOUT",
                      b"CHECKIN", b"UNCHECKOUT", b"VERSION-CONTROL", b"MKWORKSPACE", b"UPDATE", b"LABEL",
                      b"BASELINE-CONTROL", b"MKACTIVITY", b"ORDERPATCH", b"LINK", b"UNLINK", b"PRI")
KNOWN_METHODS = frozenset(HTTP_METHODS + HTTP_METHODS_EXTRA)
# First four bytes that can start an HTTP/1.x request or response: a cheap prefilter. A request with
# any other token method is told by its first 8 bytes: ``http_head``.
# The kernel's list (bpf/hdrlog.c app_candidate, kept equal by tests/test_appheaders.py): the nine,
# the WebDAV ones, and "HTTP" of a response.
HTTP_PREFIXES = frozenset(m[:4].ljust(4, b" ")[:4] for m in HTTP_METHODS + (
    b"PROPFIND", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK", b"SEARCH", b"REPORT")) | {b"HTTP"}
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_METHOD_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ-_")  # what the prefilters accept for an unknown method


def http_head(head: bytes) -> bool:
    """Could a payload starting with these (up to 8) bytes be an HTTP request or response?

    The kernel's test (bpf/hdrlog.c app_candidate): the first four bytes of a known
    method or "HTTP", or a token of up to 7 upper-case letters, '-' or '_', a space,
    and a request target that starts like one ('/', '*', or the "h" of http://).
    User space then wants " HTTP/" after the target.
    """
    if head[:4] in HTTP_PREFIXES:
        return True
    if not head or head[0] not in _METHOD_CHARS:
        return False
    for i in range(1, min(8, len(head))):
        if head[i] == 0x20:
            return i == 7 or (i + 1 < len(head) and head[i + 1] in b"/*h")
        if head[i] not in _METHOD_CHARS:
            return False
    return False


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
    # Answer records of a response (issue 14 "names"): (type, value, ttl), value an address
    # (A / AAAA) or a name (CNAME), with the owner name of each record.
    dns_answer_list: list[tuple[int, str, int, str]] = field(default_factory=list)
    http_method: str = ""
    http_path: str = ""
    http_host: str = ""
    http_user_agent: str = ""
    http_status: int = 0
    tls_sni: str = ""
    tls_version: int = 0  # ServerHello: the chosen version; ClientHello: the highest offered
    tls_offered_versions: list[int] = field(default_factory=list)
    tls_alpn: list[str] = field(default_factory=list)
    ja4: str = ""  # a whole ClientHello's JA4 (collector/ja4.py; set by appdecode)
    truncated: int = 0  # TRUNC_* bits: which values were cut
    tls_missing: int = 0  # a hello cut by the end of the bytes: how many of its bytes were not there


def _capped(raw: bytes, limit: int = MAX_STR) -> tuple[str, bool]:
    """Text from untrusted bytes (invalid UTF-8 replaced), at most ``limit`` characters; (text, was cut)."""
    text = raw[: 4 * limit].decode("utf-8", "replace")
    return text[:limit], len(text) > limit or len(raw) > 4 * limit


# -- DNS --------------------------------------------------------------------------------
def dns_name(msg: bytes, offset: int) -> tuple[str, int]:
    """Read a (possibly compressed) name at ``offset``; returns (name, offset after it).

    See ``dns_name_ex``, which also says whether the name was cut.
    """
    name, end, _ = dns_name_ex(msg, offset)
    return name, end


def dns_name_ex(msg: bytes, offset: int) -> tuple[str, int, bool]:
    """Read a (possibly compressed) name at ``offset``; returns (name, offset after it, cut).

    Lowercased; bytes outside printable ASCII and dots inside a label are written
    as \\DDD (as in zone files). The limit is DNS's own, 255 octets of name on the
    wire (length octets included), applied to the bytes before escaping, so an
    escape is never split. A longer name is not a name: "" (tshark's "<Name too
    long>") flagged cut. A name the end of the bytes cuts short keeps what was
    read, flagged cut.
    Each pointer must point before everything read so far, so no name can loop;
    an invalid one (forward or looping pointer) returns "" and the offset after
    its first pointer (a pointer ends a name's encoding wherever it points; -1
    when there was none), so the question's type is still read where tshark reads it.
    """
    labels: list[str] = []
    length = 1  # the root label's octet
    end = -1
    jumps = 0
    cut = False
    pos = floor = offset
    while True:
        if pos >= len(msg):
            cut = True  # the bytes ended before the root label
            break
        n = msg[pos]
        if n == 0:
            pos += 1
            break
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(msg):
                cut = True
                break
            target = ((n & 0x3F) << 8) | msg[pos + 1]
            if end < 0:
                end = pos + 2
            jumps += 1
            if target >= floor or jumps > DNS_MAX_POINTERS:
                return "", end, False  # forward or looping pointer: not a name (tshark agrees)
            pos = floor = target
            continue
        if n & 0xC0:
            break  # 0x40 / 0x80 label types are not names
        if length + n + 1 > DNS_MAX_NAME:
            # Longer than a name can be: not a name (tshark: "<Name too long>"), so "" -- flagged
            # cut, never silently empty -- and the rest of the encoding skipped (without following
            # pointers) to find the question's type.
            while pos < len(msg) and msg[pos] != 0 and not msg[pos] & 0xC0:
                pos += 1 + msg[pos]
            if pos < len(msg) and msg[pos] & 0xC0 == 0xC0:
                if end < 0:
                    end = pos + 2
            elif pos < len(msg):
                pos += 1
            return "", (end if end >= 0 else pos), True
        label = msg[pos + 1: pos + 1 + n]
        labels.append(_label(label))
        if len(label) < n:
            cut = True
            pos = len(msg)
            break
        length += n + 1
        pos += 1 + n
    return ".".join(labels), (end if end >= 0 else pos), cut


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
    if len(msg) < 2:
        return False
    if len(msg) < 12:
        # Cut short by the capture: the id (and the flags) that are there, flagged.
        h.dns_id = struct.unpack_from("!H", msg)[0]
        if len(msg) >= 4:
            h.dns_flags = struct.unpack_from("!H", msg, 2)[0]
            h.dns_rcode = h.dns_flags & 0xF
        if len(msg) >= 8:
            h.dns_answers = struct.unpack_from("!H", msg, 6)[0]
        h.truncated |= TRUNC_DNS_HEADER
        return True
    dns_id, flags, qdcount, ancount = struct.unpack_from("!HHHH", msg)
    h.dns_id, h.dns_flags, h.dns_rcode, h.dns_answers = dns_id, flags, flags & 0xF, ancount
    if qdcount:
        h.dns_qname, after, cut = dns_name_ex(msg, 12)
        if cut:
            h.truncated |= TRUNC_DNS_QNAME
        if 0 <= after and after + 2 <= len(msg):
            h.dns_qtype = struct.unpack_from("!H", msg, after)[0]
        elif after >= 0:
            h.truncated |= TRUNC_DNS_HEADER  # the question's type is not in the bytes
        if flags & 0x8000 and ancount and qdcount == 1 and after >= 0:
            _dns_answers(msg, after + 4, ancount, h)
    return True


DNS_A, DNS_CNAME, DNS_AAAA = 1, 5, 28


def _dns_answers(msg: bytes, pos: int, count: int, h: AppHeaders) -> None:
    """The answer section's A, AAAA and CNAME records (others skipped), at most DNS_MAX_ANSWERS."""
    import ipaddress

    for _ in range(count):
        owner, pos, cut = dns_name_ex(msg, pos)
        if pos < 0 or pos + 10 > len(msg) or cut:
            h.truncated |= TRUNC_DNS_ANSWERS
            return
        rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", msg, pos)
        rdata_at = pos + 10
        pos = rdata_at + rdlen
        if pos > len(msg):
            h.truncated |= TRUNC_DNS_ANSWERS
            return
        if rclass != 1 or rtype not in (DNS_A, DNS_AAAA, DNS_CNAME):
            continue
        if len(h.dns_answer_list) >= DNS_MAX_ANSWERS:
            h.truncated |= TRUNC_DNS_ANSWERS
            return
        if rtype == DNS_A and rdlen == 4:
            value = str(ipaddress.IPv4Address(msg[rdata_at:pos]))
        elif rtype == DNS_AAAA and rdlen == 16:
            value = str(ipaddress.IPv6Address(msg[rdata_at:pos]))
        elif rtype == DNS_CNAME:
            value, _, cut = dns_name_ex(msg[:pos], rdata_at)
            if cut or not value:
                h.truncated |= TRUNC_DNS_ANSWERS
                continue
        else:
            continue
        h.dns_answer_list.append((rtype, value, ttl, owner))


def looks_like_dns(msg: bytes) -> bool:
    """A plausible DNS header: opcode 0-6, at most a few questions, Z bit clear is not required."""
    if len(msg) < 12:
        return False
    flags, qdcount = struct.unpack_from("!HH", msg, 2)
    opcode = (flags >> 11) & 0xF
    return opcode <= 6 and qdcount <= 4


# -- HTTP -------------------------------------------------------------------------------
def _lines(data: bytes) -> tuple[list[bytes], bool]:
    """Header lines up to the empty line; CRLF or bare LF (RFC 9112 2.2). (lines, block complete).

    When the block is not complete, the last line is the one the end of the bytes cut.
    """
    out = []
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            out.append(data[pos:])  # the last line, cut by the end of the copy (maybe empty)
            return out, False
        line = data[pos:nl]
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            return out, True
        out.append(line)
        pos = nl + 1


def parse_http(payload: bytes, h: AppHeaders) -> bool:
    """Request line with Host and User-Agent, or a response status line.

    A request line is ``method SP target SP HTTP/x.y``. The method is any token; one
    outside KNOWN_METHODS needs the " HTTP/" to be seen. A target with spaces in it
    (scanners send them) gives the path up to its first space, as tshark reads it,
    flagged cut. Lines end in CRLF or a bare LF.
    """
    nl = payload.find(b"\n")
    first = payload if nl < 0 else payload[:nl]
    if first.endswith(b"\r"):
        first = first[:-1]
    if first.startswith(b"HTTP/1."):
        parts = first.split(b" ", 2)
        if len(parts) >= 2 and len(parts[1]) == 3 and parts[1].isdigit():
            h.http_status = int(parts[1])
            return True
        return False
    method, sp, rest = first.partition(b" ")
    if not sp or not method or len(method) > HTTP_MAX_METHOD or not all(c in _TCHAR for c in method):
        return False
    target, _, version = rest.rpartition(b" ")
    if not (version.startswith(b"HTTP/") and target):
        # No version at the end: the line was cut (by the copy or the packet), or is not HTTP.
        if method not in KNOWN_METHODS or (nl >= 0 and b" " in rest):
            return False
        target = rest
        h.truncated |= TRUNC_HTTP_METHOD
        if nl < 0:
            h.truncated |= TRUNC_HTTP_PATH
    path, space, _ = target.partition(b" ")
    if space:
        h.truncated |= TRUNC_HTTP_PATH  # spaces in the target: the path as far as it goes
    if not path:
        return False
    h.http_method = method.decode("ascii")
    h.http_path, cut = _capped(path)
    if cut:
        h.truncated |= TRUNC_HTTP_PATH
    if nl < 0:
        h.truncated |= TRUNC_HTTP_HEADERS
        return True
    lines, complete = _lines(payload[nl + 1:])
    if not complete:
        h.truncated |= TRUNC_HTTP_HEADERS
    for i, line in enumerate(lines):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        end_cut = not complete and i == len(lines) - 1  # the copy ended inside this line
        key = name.strip().lower()
        if key == b"host" and not h.http_host:
            h.http_host, cut = _capped(value.strip())
            if cut or end_cut:
                h.truncated |= TRUNC_HTTP_HOST
        elif key == b"user-agent" and not h.http_user_agent:
            h.http_user_agent, cut = _capped(value.strip())
            if cut or end_cut:
                h.truncated |= TRUNC_HTTP_USER_AGENT
    return True


# -- TLS --------------------------------------------------------------------------------
def parse_tls(payload: bytes, h: AppHeaders) -> bool:
    """ClientHello (SNI, offered versions, ALPN) or ServerHello (chosen version).

    The hello's own length (handshake header) says where it ends. When the bytes end
    first -- a hello longer than the copy, or one that goes on in the next TCP
    segment -- ``truncated`` gets TRUNC_TLS_HELLO and ``tls_missing`` how many bytes
    were not there; then the versions are only reported when the supported_versions
    extension was read whole (never the legacy field as if it were all the hello
    offered), and SNI / ALPN only when read (a cut one is flagged). A hello that
    itself ends before its extensions (malformed, or pre-TLS 1.2 style) offers its
    legacy version, as one without the extension does.
    """
    if len(payload) < 6 or payload[0] != TLS_HANDSHAKE or payload[1] != 3:
        return False
    kind = payload[5]
    if kind not in (TLS_CLIENT_HELLO, TLS_SERVER_HELLO):
        return False
    if len(payload) < 9:
        h.truncated |= TRUNC_TLS_HELLO
        h.tls_missing = max(1, struct.unpack_from("!H", payload, 3)[0] + 5 - len(payload))
        return True
    hs_len = int.from_bytes(payload[6:9], "big")
    body = payload[9: 9 + hs_len]  # after record header (5) and handshake header (4)
    missing = hs_len - len(body)
    if missing > 0:
        h.truncated |= TRUNC_TLS_HELLO
        h.tls_missing = missing
    cut = missing > 0
    if len(body) < 2:
        return True
    legacy = struct.unpack_from("!H", body)[0]
    seen_versions = False
    pos = 2 + 32  # version, random
    ext_end = -1
    if pos < len(body):
        pos += 1 + body[pos]  # session id
        if kind == TLS_CLIENT_HELLO:
            if pos + 2 <= len(body):
                pos += 2 + struct.unpack_from("!H", body, pos)[0]  # cipher suites
                if pos < len(body):
                    pos += 1 + body[pos]  # compression methods
                    ext_end = pos
        else:
            pos += 2 + 1  # chosen cipher suite, compression method
            ext_end = pos
    if 0 <= ext_end and ext_end + 2 <= len(body):
        declared = struct.unpack_from("!H", body, ext_end)[0]
        end = min(len(body), ext_end + 2 + declared)
        pos = ext_end + 2
        while pos + 4 <= end:
            ext, length = struct.unpack_from("!HH", body, pos)
            data = body[pos + 4: min(end, pos + 4 + length)]
            whole = len(data) == length
            pos += 4 + length
            if ext == TLS_EXT_SNI and kind == TLS_CLIENT_HELLO:
                _tls_sni(data, h, whole)
            elif ext == TLS_EXT_ALPN and kind == TLS_CLIENT_HELLO:
                _tls_alpn(data, h, whole)
            elif ext == TLS_EXT_SUPPORTED_VERSIONS and whole:
                if kind == TLS_SERVER_HELLO and len(data) >= 2:
                    h.tls_version = struct.unpack_from("!H", data)[0]
                    seen_versions = True
                elif kind == TLS_CLIENT_HELLO and data:
                    listed = data[1: 1 + data[0]]
                    versions = [int.from_bytes(listed[i: i + 2], "big") for i in range(0, len(listed) - 1, 2)]
                    offered = [v for v in versions if v & 0x0F0F != 0x0A0A]  # drop GREASE
                    if offered:
                        h.tls_offered_versions = offered
                        h.tls_version = max(offered)
                        seen_versions = True
    if not seen_versions and not cut:
        # The whole hello was read and names no other version: the legacy field is what it offers
        # (also for a malformed hello that ends before its extensions).
        h.tls_version = legacy
        if kind == TLS_CLIENT_HELLO:
            h.tls_offered_versions = [legacy]
    return True


def _tls_sni(data: bytes, h: AppHeaders, whole: bool) -> None:
    pos = 2  # server_name_list length
    while pos + 3 <= len(data):
        name_type, length = data[pos], struct.unpack_from("!H", data, pos + 1)[0]
        if name_type == 0:
            raw = data[pos + 3: pos + 3 + length]
            h.tls_sni, cut = _capped(raw)
            h.tls_sni = h.tls_sni.lower()
            if cut or len(raw) < length:
                h.truncated |= TRUNC_TLS_SNI
            return
        pos += 3 + length
    if not whole:
        h.truncated |= TRUNC_TLS_SNI  # cut before the host name


def _tls_alpn(data: bytes, h: AppHeaders, whole: bool) -> None:
    pos = 2  # protocol_name_list length
    while pos < len(data):
        if len(h.tls_alpn) >= TLS_MAX_ALPN:
            h.truncated |= TRUNC_TLS_ALPN
            return
        length = data[pos]
        raw = data[pos + 1: pos + 1 + length]
        text, cut = _capped(raw)
        h.tls_alpn.append(text)
        if cut or len(raw) < length:
            h.truncated |= TRUNC_TLS_ALPN
        pos += 1 + length
    if not whole:
        h.truncated |= TRUNC_TLS_ALPN


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
    if http_head(payload[:8]):
        return h if parse_http(payload, h) else None
    if payload[0] == TLS_HANDSHAKE:
        return h if parse_tls(payload, h) else None
    return None
