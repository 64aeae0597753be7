"""Community ID v1 flow hashing (corelight/community-id-spec), one tuple or a batch.

The Community ID is the key on which a ``connections`` row, its ``packets`` rows and a
Zeek ``conn.log`` or Suricata EVE record of the same traffic join::

    "1:" + base64(sha1(seed . saddr . daddr . proto . 0 . sport . dport))

with the seed as 2 bytes in network order, IPv4 addresses as 4 bytes and IPv6 as 16, the
endpoints ordered so that the smaller (address, port) comes first, and the ports left
out for protocols that have none. TCP, UDP and SCTP use their ports; ICMP and ICMPv6
put the message type in the source port and, for the request/reply types Zeek pairs
(echo, router/neighbor solicitation and advertisement, ...), the counterpart type in
the destination port, so that a request and its reply hash alike. Any other ICMP type
is one-way: the code goes in the destination port and the endpoints are not reordered.

Two entry points:

- ``community_id(proto, saddr, daddr, sport, dport, seed=0)`` for one tuple
  (addresses as 4- or 16-byte ``bytes``, text, or ``ipaddress`` objects);
- ``community_ids(proto, saddr, daddr, sport, dport, seed=0, ip_version=None)`` for a
  batch of numpy arrays, addresses as 16 bytes each (IPv4 IPv4-mapped, as the SQL
  tables store them). The collector calls it once per batch of new connections, not
  per packet: the hash inputs are built with array operations, only SHA-1 runs once
  per tuple, and the base64 rendering is one call for the whole batch.

IPv4-mapped addresses (``::ffff:a.b.c.d``) are hashed as the 4-byte IPv4 address, since
that is what every other implementation sees for an IPv4 packet; pass ``ip_version``
to ``community_ids`` to decide it per row instead (a real IPv6 packet whose address is
IPv4-mapped, which should never be on a wire, then hashes as IPv6).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import struct

import numpy as np

PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMP6, PROTO_SCTP = 1, 6, 17, 58, 132
PORT_PROTOS = frozenset((PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMP6, PROTO_SCTP))

# Zeek's ICMP4_counterpart / ICMP6_counterpart: the request/reply types that form a two-way
# "connection". Every other type is one-way (its code becomes the destination port).
ICMP_COUNTERPART = {
    8: 0, 0: 8,  # echo request / reply
    13: 14, 14: 13,  # timestamp request / reply
    15: 16, 16: 15,  # information request / reply
    10: 9, 9: 10,  # router solicitation / advertisement
    17: 18, 18: 17,  # address mask request / reply
}
ICMP6_COUNTERPART = {
    128: 129, 129: 128,  # echo request / reply
    130: 131, 131: 130,  # MLD listener query / report
    133: 134, 134: 133,  # router solicitation / advertisement
    135: 136, 136: 135,  # neighbor solicitation / advertisement
    139: 140, 140: 139,  # node information (who-are-you) query / reply
    144: 145, 145: 144,  # home agent address discovery request / reply
}

_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


def _addr_bytes(addr) -> bytes:
    """4 bytes for IPv4 (and IPv4-mapped IPv6), 16 for IPv6."""
    if isinstance(addr, (bytes, bytearray, memoryview)):
        b = bytes(addr)
        if len(b) not in (4, 16):
            raise ValueError(f"address of {len(b)} bytes: give 4 (IPv4) or 16 (IPv6)")
    else:
        b = ipaddress.ip_address(addr).packed
    return b[12:] if len(b) == 16 and b[:12] == _MAPPED_PREFIX else b


def icmp_ports(proto: int, mtype: int, mcode: int) -> tuple[int, int, bool]:
    """(sport, dport, one_way) for an ICMP (proto 1) or ICMPv6 (58) type and code."""
    table = ICMP_COUNTERPART if proto == PROTO_ICMP else ICMP6_COUNTERPART
    counter = table.get(mtype)
    return (mtype, mcode, True) if counter is None else (mtype, counter, False)


def community_id(proto: int, saddr, daddr, sport: int = 0, dport: int = 0, seed: int = 0) -> str:
    """The Community ID v1 of one tuple. For ICMP/ICMPv6 ``sport`` is the type and
    ``dport`` the code; for protocols without ports both are ignored."""
    if not 0 <= proto <= 255:
        raise ValueError(f"proto {proto}: an IP protocol number is 0-255")
    if not 0 <= seed <= 0xFFFF:
        raise ValueError(f"seed {seed}: the Community ID seed is 0-65535")
    s, d = _addr_bytes(saddr), _addr_bytes(daddr)
    if len(s) != len(d):
        raise ValueError(f"addresses of different families: {saddr!r}, {daddr!r}")
    one_way = False
    if proto in (PROTO_ICMP, PROTO_ICMP6):
        sport, dport, one_way = icmp_ports(proto, sport, dport)
    ports = proto in PORT_PROTOS
    if not one_way and (s > d or (s == d and ports and sport > dport)):
        s, d, sport, dport = d, s, dport, sport
    data = struct.pack("!H", seed) + s + d + struct.pack("BB", proto, 0)
    if ports:
        data += struct.pack("!HH", sport, dport)
    return "1:" + base64.b64encode(hashlib.sha1(data).digest()).decode("ascii")


def _addr16(a) -> np.ndarray:
    """An (N, 16) uint8 view of 16-byte addresses given as (N, 16) uint8, S16/V16 or (N, 2) uint64."""
    if isinstance(a, (list, tuple)):  # of 16-byte bytes (np.array would cut trailing zero bytes)
        if any(len(x) != 16 for x in a):
            raise ValueError("addresses: give 16 bytes each (IPv4 as IPv4-mapped, see addr16)")
        a = np.frombuffer(b"".join(a), "S16") if a else np.zeros((0, 16), np.uint8)
    a = np.ascontiguousarray(a)
    if a.dtype.kind in "SV" and a.dtype.itemsize == 16:
        return a.view(np.uint8).reshape(-1, 16)
    if a.ndim == 2 and a.shape[1] * a.dtype.itemsize == 16 and a.dtype.kind in "ui":
        return a.view(np.uint8).reshape(-1, 16)
    raise ValueError(f"addresses as {a.dtype}{list(a.shape)}: give (N, 16) uint8 or N x S16 (network order)")


def _lookup(table: dict[int, int]) -> np.ndarray:
    lut = np.full(256, -1, np.int32)
    for k, v in table.items():
        lut[k] = v
    return lut


_ICMP_LUT, _ICMP6_LUT = _lookup(ICMP_COUNTERPART), _lookup(ICMP6_COUNTERPART)
_HAS_PORTS = np.zeros(256, bool)
_HAS_PORTS[list(PORT_PROTOS)] = True


def community_ids(proto, saddr, daddr, sport, dport, seed: int = 0, ip_version=None) -> list[str]:
    """Community IDs of N tuples given as numpy arrays (or sequences), in input order.

    ``proto``, ``sport``, ``dport``: N integers (ICMP type and code in the port arrays);
    ``saddr``, ``daddr``: (N, 16) uint8 or N x ``S16``, network order, IPv4 as
    IPv4-mapped; ``ip_version``: optional N values of 4 or 6 to say which rows are IPv4
    instead of recognising the mapped prefix.
    """
    if not 0 <= seed <= 0xFFFF:
        raise ValueError(f"seed {seed}: the Community ID seed is 0-65535")
    proto = np.asarray(proto).astype(np.int64, copy=False)
    n = len(proto)
    if n == 0:
        return []
    s, d = _addr16(saddr), _addr16(daddr)
    sp = np.asarray(sport).astype(np.int64)
    dp = np.asarray(dport).astype(np.int64)
    if not (len(s) == len(d) == len(sp) == len(dp) == n):
        raise ValueError(f"arrays of different lengths: proto {n}, saddr {len(s)}, daddr {len(d)}, "
                         f"sport {len(sp)}, dport {len(dp)}")
    if ((proto < 0) | (proto > 255)).any():
        raise ValueError("proto: IP protocol numbers are 0-255")
    if ip_version is None:
        v4 = (s[:, :12] == np.frombuffer(_MAPPED_PREFIX, np.uint8)).all(1)
        v4d = (d[:, :12] == np.frombuffer(_MAPPED_PREFIX, np.uint8)).all(1)
        if (v4 != v4d).any():
            raise ValueError("rows with an IPv4-mapped and a plain IPv6 address: addresses of different families")
    else:
        v4 = np.asarray(ip_version) == 4
        if v4.any():  # compare IPv4 rows on their last 4 bytes only
            s, d = s.copy(), d.copy()
            s[v4, :12] = d[v4, :12] = np.frombuffer(_MAPPED_PREFIX, np.uint8)

    # ICMP/ICMPv6: type -> sport, counterpart (two-way) or code (one-way) -> dport.
    one_way = np.zeros(n, bool)
    for p, lut in ((PROTO_ICMP, _ICMP_LUT), (PROTO_ICMP6, _ICMP6_LUT)):
        rows = proto == p
        if rows.any():
            t = sp[rows]
            counter = np.where((t >= 0) & (t < 256), lut[t & 0xFF], -1)
            one_way[rows] = counter < 0
            dp[rows] = np.where(counter < 0, dp[rows], counter)
    ports = _HAS_PORTS[proto]
    sp = np.where(ports, sp, 0)
    dp = np.where(ports, dp, 0)

    # Order the endpoints: the smaller (address, port) first, unless one-way. Comparing the
    # 16 bytes (mapped prefix included) orders IPv4 rows as their 4 bytes would.
    diff = s != d
    first = diff.argmax(1)
    idx = np.arange(n)
    s_lt = s[idx, first] < d[idx, first]
    same = ~diff.any(1)
    ordered = one_way | (~same & s_lt) | (same & (~ports | (sp <= dp)))
    # (equal addresses and ports: either order hashes the same; no ports: nothing to flip)
    lo = np.where(ordered[:, None], s, d)
    hi = np.where(ordered[:, None], d, s)
    lp = np.where(ordered, sp, dp).astype(">u2")
    hp = np.where(ordered, dp, sp).astype(">u2")

    # Hash inputs, one row each: seed(2) addr(16) addr(16) proto(1) 0(1) ports(4) = 40 bytes.
    # IPv4 rows use 4-byte addresses: 16 bytes in all; rows without ports are 4 shorter.
    buf = np.zeros((n, 40), np.uint8)
    buf[:, 0:2] = np.frombuffer(struct.pack("!H", seed), np.uint8)
    buf[:, 2:18], buf[:, 18:34] = lo, hi
    buf[:, 34] = proto
    buf[:, 36:38] = lp.view(np.uint8).reshape(n, 2)
    buf[:, 38:40] = hp.view(np.uint8).reshape(n, 2)
    if v4.any():
        r = buf[v4]
        r[:, 2:6], r[:, 6:10] = r[:, 14:18], r[:, 30:34]
        r[:, 10:16] = r[:, 34:40]
        buf[v4] = r
    length = np.where(v4, 16, 40) - np.where(ports, 0, 4)

    raw = buf.tobytes()
    sha1 = hashlib.sha1
    starts = range(0, 40 * n, 40)
    # 20-byte digest + 1 zero byte = 21 bytes = 28 base64 characters that do not straddle
    # rows; the first 27 equal the digest's own encoding, the 28th ("A") becomes "=".
    digests = b"".join([sha1(raw[o:o + k]).digest() + b"\0" for o, k in zip(starts, length.tolist())])
    enc = np.frombuffer(base64.b64encode(digests), np.uint8).reshape(n, 28)
    out = np.empty((n, 30), np.uint8)
    out[:, 0], out[:, 1] = ord("1"), ord(":")
    out[:, 2:29] = enc[:, :27]
    out[:, 29] = ord("=")
    return out.view("S30").ravel().astype("U30").tolist()


def addr16(addr) -> bytes:
    """The 16-byte form of an address (IPv4 IPv4-mapped), as the batched form takes it."""
    b = ipaddress.ip_address(addr).packed if not isinstance(addr, (bytes, bytearray)) else bytes(addr)
    return _MAPPED_PREFIX + b if len(b) == 4 else b


# Protocols whose rows carry a Community ID (the spec's, with ports or ICMP type/code).
ID_PROTOCOLS = (1, 6, 17, 58, 132)
DEFAULT_CACHE_ENTRIES = 65536


class CommunityIdCache:
    """Community IDs for the rows of a batch, computed once per connection.

    A bounded LRU keyed by the tuple as a row gives it (protocol, addresses, ports or ICMP
    type/code): the packets of a connection hit the same entry (its two directions are two
    keys with the same id), so a flow of a million packets costs one SHA-1, and the misses
    of a batch are computed together (``community_ids``). ``entries`` bounds the memory;
    beyond it the least recently used tuples go.
    """

    def __init__(self, entries: int = DEFAULT_CACHE_ENTRIES):
        from collections import OrderedDict

        self.entries = entries
        self._ids: OrderedDict[bytes, str] = OrderedDict()
        self.hits = self.misses = 0

    def of_rows(self, proto, saddr, daddr, sport, dport, ok) -> list[str]:
        """One id per row ('' where ``ok`` is False); ``saddr``/``daddr`` as 16-byte (V16) values."""
        proto = np.asarray(proto, np.uint8)
        n = len(proto)
        ok = np.asarray(ok, bool)
        out = [""] * n
        if n == 0 or not ok.any():
            return out
        rows = np.flatnonzero(ok)
        key = np.zeros((len(rows), 37), np.uint8)
        key[:, 0] = proto[rows]
        s16, d16 = _addr16(saddr), _addr16(daddr)
        key[:, 1:17] = s16[rows]
        key[:, 17:33] = d16[rows]
        key[:, 33:35] = np.asarray(sport, "<u2")[rows].view(np.uint8).reshape(-1, 2)
        key[:, 35:37] = np.asarray(dport, "<u2")[rows].view(np.uint8).reshape(-1, 2)
        uniq, first, inverse = np.unique(key.view("V37").ravel(), return_index=True, return_inverse=True)
        cache = self._ids
        ids: list[str | None] = []
        missing: list[int] = []
        keys = uniq.tolist()
        for i, k in enumerate(keys):
            got = cache.get(k)
            if got is None:
                missing.append(i)
            else:
                cache.move_to_end(k)
            ids.append(got)
        self.misses += len(missing)
        self.hits += len(uniq) - len(missing)
        if missing:
            at = rows[first[missing]]
            new = community_ids(proto[at], s16[at], d16[at], np.asarray(sport)[at], np.asarray(dport)[at])
            for i, cid in zip(missing, new):
                ids[i] = cid
                cache[keys[i]] = cid
            while len(cache) > self.entries:
                cache.popitem(last=False)
        for r, j in zip(rows.tolist(), inverse.ravel().tolist()):
            out[r] = ids[j]
        return out


CACHE = CommunityIdCache()  # the collector's (one capture per process)
