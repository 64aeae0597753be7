"""QUIC Initial packets: the version, and the ClientHello inside (SNI, ALPN, JA4) -- RFC 9000 / 9001.

A client's first Initial is protected with keys anyone can derive from its Destination
Connection ID (RFC 9001 section 5.2): initial_secret = HKDF-Extract(salt, DCID), client
secret = HKDF-Expand-Label(initial_secret, "client in", 32), then key (16), iv (12) and hp
(16) from it ("quic key", "quic iv", "quic hp"; v2, RFC 9369: its own salt and "quicv2 *"
labels). Header protection (section 5.4) is AES-ECB of a 16-byte sample of the ciphertext
taken 4 bytes after the start of the packet number field; the payload is AES-128-GCM with
the nonce iv XOR packet number and the header as associated data. The decrypted payload's
CRYPTO frames carry the TLS ClientHello, which a post-quantum key share can spread over
two Initial packets (two datagrams): ``InitialReassembly`` keeps the CRYPTO bytes per
(client, DCID) until the hello is whole, bounded and counted like the TCP reassembly.

Only what the kernel copied is read (bpf/hdrlog.c copies UDP/443 long-header payloads up to
HDRLOG_PAYLOAD_BYTES, 2,048, more than a datagram of 1,200-1,500 bytes). Nothing here
raises on hostile bytes: a packet that does not decrypt (authentication fails: not QUIC,
or cut) gives its version and nothing else.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from cryptography.exceptions import InvalidTag

QUIC_V1 = 0x00000001
QUIC_V2 = 0x6B3343CF
_SALTS = {
    QUIC_V1: bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"),
    QUIC_V2: bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"),
}
_LABELS = {QUIC_V1: (b"quic key", b"quic iv", b"quic hp"), QUIC_V2: (b"quicv2 key", b"quicv2 iv", b"quicv2 hp")}
_INITIAL_TYPE = {QUIC_V1: 0, QUIC_V2: 1}  # long-header packet type bits of an Initial
MAX_CRYPTO = 16384  # CRYPTO bytes of one ClientHello kept at most
REASSEMBLY_ENTRIES = 1024


def is_long_header(payload: bytes) -> bool:
    """The kernel's test too (bpf/hdrlog.c app_candidate): long header, fixed bit, a version."""
    return len(payload) >= 7 and payload[0] & 0xC0 == 0xC0 and payload[1:5] != b"\0\0\0\0"


def _hkdf_label(secret: bytes, label: bytes, length: int) -> bytes:
    full = b"tls13 " + label
    info = struct.pack("!H", length) + bytes([len(full)]) + full + b"\0"
    return HKDFExpand(hashes.SHA256(), length, info).derive(secret)


def _hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    import hmac
    import hashlib

    return hmac.new(salt, ikm, hashlib.sha256).digest()


_KEYS: OrderedDict = OrderedDict()  # (version, dcid) -> keys: a client's next Initial reuses them


def client_keys(version: int, dcid: bytes) -> tuple[bytes, bytes, bytes]:
    """(key, iv, hp) of the client's Initial packets."""
    got = _KEYS.get((version, dcid))
    if got is not None:
        return got
    secret = _hkdf_label(_hkdf_extract(_SALTS[version], dcid), b"client in", 32)
    kl, il, hl = _LABELS[version]
    got = (_hkdf_label(secret, kl, 16), _hkdf_label(secret, il, 12), _hkdf_label(secret, hl, 16))
    _KEYS[(version, dcid)] = got
    if len(_KEYS) > 256:
        _KEYS.popitem(last=False)
    return got


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    first = buf[pos]
    n = 1 << (first >> 6)
    if pos + n > len(buf):
        raise IndexError("varint cut")
    v = first & 0x3F
    for b in buf[pos + 1:pos + n]:
        v = (v << 8) | b
    return v, pos + n


@dataclass
class Initial:
    version: int = 0
    dcid: bytes = b""
    scid: bytes = b""
    crypto: list[tuple[int, bytes]] = field(default_factory=list)  # (offset, data) of CRYPTO frames
    decrypted: bool = False


def parse_initial(datagram: bytes) -> Initial | None:
    """The first long-header packet of a UDP datagram: version, and when it is a client Initial
    that decrypts, its CRYPTO frames. None when it is not a QUIC long header."""
    if not is_long_header(datagram):
        return None
    try:
        return _parse(datagram)
    except (IndexError, ValueError, struct.error):
        return Initial(version=struct.unpack_from("!I", datagram, 1)[0])


def _parse(d: bytes) -> Initial:
    version = struct.unpack_from("!I", d, 1)[0]
    out = Initial(version=version)
    pos = 5
    n = d[pos]
    out.dcid = d[pos + 1:pos + 1 + n]
    pos += 1 + n
    n = d[pos]
    out.scid = d[pos + 1:pos + 1 + n]
    pos += 1 + n
    if version not in _SALTS or (d[0] >> 4) & 3 != _INITIAL_TYPE[version] or len(out.dcid) > 20:
        return out
    token_len, pos = _varint(d, pos)
    pos += token_len
    length, pos = _varint(d, pos)
    pn_off = pos
    end = pn_off + length
    if end > len(d) or length < 20:
        return out  # cut by the copy: the tag is not there
    key, iv, hp = client_keys(version, out.dcid)
    sample = d[pn_off + 4:pn_off + 20]
    enc = Cipher(algorithms.AES(hp), modes.ECB()).encryptor()
    mask = enc.update(sample) + enc.finalize()
    first = d[0] ^ (mask[0] & 0x0F)
    pn_len = (first & 0x03) + 1
    pn_bytes = bytes(d[pn_off + i] ^ mask[1 + i] for i in range(pn_len))
    header = bytes([first]) + d[1:pn_off] + pn_bytes
    pn = int.from_bytes(pn_bytes, "big")
    nonce = (int.from_bytes(iv, "big") ^ pn).to_bytes(12, "big")
    try:
        plain = AESGCM(key).decrypt(nonce, d[pn_off + pn_len:end], header)
    except InvalidTag:
        return out
    out.decrypted = True
    out.crypto = _crypto_frames(plain)
    return out


def _crypto_frames(p: bytes) -> list[tuple[int, bytes]]:
    """CRYPTO frames of an Initial's payload; stops at a frame an Initial may not carry."""
    out = []
    pos = 0
    while pos < len(p):
        t = p[pos]
        if t == 0x00:  # PADDING
            pos += 1
        elif t == 0x01:  # PING
            pos += 1
        elif t in (0x02, 0x03):  # ACK
            pos += 1
            _, pos = _varint(p, pos)  # largest
            _, pos = _varint(p, pos)  # delay
            ranges, pos = _varint(p, pos)
            _, pos = _varint(p, pos)  # first range
            for _ in range(ranges):
                _, pos = _varint(p, pos)
                _, pos = _varint(p, pos)
            if t == 0x03:
                for _ in range(3):
                    _, pos = _varint(p, pos)
        elif t == 0x06:  # CRYPTO
            off, pos = _varint(p, pos + 1)
            n, pos = _varint(p, pos)
            out.append((off, p[pos:pos + n]))
            pos += n
        elif t == 0x1C:  # CONNECTION_CLOSE
            break
        else:
            break
    return out


def hello_of(frames: list[tuple[int, bytes]]) -> tuple[bytes, bool]:
    """The contiguous CRYPTO bytes from offset 0, and whether they hold a whole handshake message."""
    buf = bytearray()
    for off, data in sorted(frames):
        if off > len(buf):
            break
        if off + len(data) > len(buf):
            buf += data[len(buf) - off:]
        if len(buf) > MAX_CRYPTO:
            break
    whole = len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[1:4], "big")
    return bytes(buf), whole


class InitialReassembly:
    """CRYPTO frames of client Initials whose ClientHello is not whole yet, per (key, DCID).

    At most ``entries`` hellos wait; a new one evicts the oldest (``evicted``)."""

    def __init__(self, entries: int = REASSEMBLY_ENTRIES):
        self.entries = entries
        self._pending: OrderedDict[tuple, list[tuple[int, bytes]]] = OrderedDict()
        self.completed = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, key: tuple, frames: list[tuple[int, bytes]]) -> tuple[bytes, bool]:
        """This packet's frames joined with the ones kept for ``key``: (hello bytes, whole)."""
        kept = self._pending.pop(key, None)
        joined = (kept or []) + frames
        hello, whole = hello_of(joined)
        if whole:
            if kept:
                self.completed += 1
            return hello, True
        if sum(len(d) for _, d in joined) <= MAX_CRYPTO:
            if len(self._pending) >= self.entries:
                self._pending.popitem(last=False)
                self.evicted += 1
            self._pending[key] = joined
        return hello, False

    def counters(self) -> dict[str, int]:
        return {"quic_reassembled": self.completed, "quic_reassembly_evicted": self.evicted}


def as_tls_record(hello: bytes) -> bytes:
    """A ClientHello handshake message inside a TLS record header, for appheaders.parse_tls."""
    return b"\x16\x03\x01" + struct.pack("!H", min(len(hello), 0xFFFF)) + hello
