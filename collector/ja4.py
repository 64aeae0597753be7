"""JA4, the TLS client fingerprint, from a ClientHello (FoxIO's spec, technical_details/JA4.md).

JA4 (TLS client fingerprinting) is BSD 3-Clause, Copyright (c) 2023, FoxIO, LLC (the
spec's licence, LICENSE-JA4 in github.com/FoxIO-LLC/ja4). Only JA4 is implemented here:
JA4S, JA4H, JA4X and the rest of JA4+ are under FoxIO's non-commercial licence and must
not be added to hdrlog.

    ja4 = a_b_c
    a: protocol (t TCP, q QUIC, d DTLS), 2-character version (highest of supported_versions,
       else the legacy field), d (SNI present) or i, number of ciphers and of extensions
       (2 digits each, capped at 99), first and last character of the first ALPN value
       ("00" when none; hex digits when not alphanumeric);
    b: sha256 of the sorted cipher list (4-hex, comma-separated), first 12 hex, or 000000000000;
    c: sha256 of the sorted extension list without SNI (0000) and ALPN (0010), then "_" and
       the signature algorithms in their order (omitted with its "_" when there are none),
       first 12 hex, or 000000000000 when there are no extensions left.
GREASE values (0x?a?a) are ignored everywhere.

``ja4_of_hello`` takes the handshake message (type 1, 3-byte length, body); ``ja4_of_record``
a TLS record holding it (the payload of a TCP segment, or segments joined). Untrusted bytes:
anything cut short or malformed gives "" (never a fingerprint of part of a hello).
"""

from __future__ import annotations

import hashlib
import struct

_VERSIONS = {0x0304: "13", 0x0303: "12", 0x0302: "11", 0x0301: "10", 0x0300: "s3", 0x0002: "s2",
             0xFEFF: "d1", 0xFEFD: "d2", 0xFEFC: "d3"}
EXT_SNI, EXT_ALPN, EXT_SIG_ALGS, EXT_SUPPORTED_VERSIONS = 0x0000, 0x0010, 0x000D, 0x002B


def _grease(v: int) -> bool:
    return v & 0x0F0F == 0x0A0A and (v >> 8) == (v & 0xFF)


def _hash12(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _alnum(b: int) -> bool:
    return 0x30 <= b <= 0x39 or 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A


def _alpn_chars(first: bytes) -> str:
    if not first:
        return "00"
    a, z = first[0], first[-1]
    if _alnum(a) and _alnum(z):
        return chr(a) + chr(z)
    h = first.hex()
    return h[0] + h[-1]


def ja4_of_record(data: bytes, proto: str = "t") -> str:
    """JA4 of the ClientHello in a TLS handshake record (``data`` starts with 0x16 0x03), or ""."""
    if len(data) < 9 or data[0] != 0x16 or data[5] != 1:
        return ""
    return ja4_of_hello(data[5:], proto)


def ja4_of_hello(hs: bytes, proto: str = "t") -> str:
    """JA4 of a ClientHello handshake message (type byte first), or "" when it is not whole."""
    try:
        return _ja4(hs, proto)
    except (IndexError, struct.error, ValueError):
        return ""


def _ja4(hs: bytes, proto: str) -> str:
    if len(hs) < 4 or hs[0] != 1:
        return ""
    n = int.from_bytes(hs[1:4], "big")
    body = hs[4:4 + n]
    if len(body) < n or n < 38:
        return ""
    legacy = struct.unpack_from("!H", body)[0]
    pos = 34
    pos += 1 + body[pos]  # session id
    clen = struct.unpack_from("!H", body, pos)[0]
    pos += 2
    if pos + clen > n:
        return ""
    ciphers = [c for c in struct.unpack_from(f"!{clen // 2}H", body, pos) if not _grease(c)]
    pos += clen
    pos += 1 + body[pos]  # compression methods
    exts: list[int] = []
    sni = False
    alpn = b""
    sigs: list[int] = []
    versions: list[int] = []
    if pos + 2 <= n:
        end = pos + 2 + struct.unpack_from("!H", body, pos)[0]
        if end > n:
            return ""
        pos += 2
        while pos + 4 <= end:
            ext, length = struct.unpack_from("!HH", body, pos)
            data = body[pos + 4:pos + 4 + length]
            if len(data) < length:
                return ""
            pos += 4 + length
            if _grease(ext):
                continue
            exts.append(ext)
            if ext == EXT_SNI:
                sni = True
            elif ext == EXT_ALPN and len(data) >= 3:
                alpn = data[3:3 + data[2]]
            elif ext == EXT_SIG_ALGS and len(data) >= 2:
                k = struct.unpack_from("!H", data)[0]
                sigs = [s for s in struct.unpack_from(f"!{min(k, len(data) - 2) // 2}H", data, 2) if not _grease(s)]
            elif ext == EXT_SUPPORTED_VERSIONS and data:
                listed = data[1:1 + data[0]]
                versions = [v for v in struct.unpack_from(f"!{len(listed) // 2}H", listed) if not _grease(v)]
    version = max(versions) if versions else legacy
    a = (f"{proto}{_VERSIONS.get(version, '00')}{'d' if sni else 'i'}"
         f"{min(len(ciphers), 99):02d}{min(len(exts), 99):02d}{_alpn_chars(alpn)}")
    b = _hash12(",".join(f"{c:04x}" for c in sorted(ciphers))) if ciphers else "000000000000"
    rest = sorted(e for e in exts if e not in (EXT_SNI, EXT_ALPN))
    if rest:
        text = ",".join(f"{e:04x}" for e in rest)
        if sigs:
            text += "_" + ",".join(f"{s:04x}" for s in sigs)
        c = _hash12(text)
    else:
        c = "000000000000"
    return f"{a}_{b}_{c}"
