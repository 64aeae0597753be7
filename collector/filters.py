"""In-kernel filters: the expression language, and what it becomes in BPF maps.

A filter is a list of rules, one per line or per ``--filter`` flag::

    include src 198.18.0.0/15          exclude dst 2001:db8:1::/48
    include net 198.18.7.0/24          (either address)
    include proto tcp,udp              exclude proto icmp6
    include dport 53                   exclude port 8000-8999     (sport / dport / port)
    include dir ingress                exclude iface veth-backup*
    # comments and blank lines are ignored

Several values after one keyword are separated by commas. Meaning: within a
dimension (source address, destination address, either address, source port,
destination port, either port, protocol, direction, interface) a packet must
match one include rule if the dimension has any, and must match no exclude
rule; the dimensions are ANDed. No rules: everything passes. Packets without
ports (ICMP, ...) have port 0 and fail a port include; non-IP packets have no
address and fail an address include.

``compile_rules`` turns rules into ``FilterTables`` (plain data);
``FilterTables.apply(bpf, ...)`` writes them into the maps of bpf/filter.h while
the program runs (see there for the bit layout). The collector re-applies
them when its ``filter_file`` changes or on SIGHUP.
"""

from __future__ import annotations

import ctypes
import fnmatch
import ipaddress
from dataclasses import dataclass, field

import numpy as np

# bpf/filter.h F_* and FF_* (tests/test_capture_records.py checks they agree).
F_INC_SRC, F_EXC_SRC, F_INC_DST, F_EXC_DST, F_INC_ANY, F_EXC_ANY = (1 << i for i in range(6))
FF_ADDR = 1 << 0
FF_ADDR_INC_SRC = 1 << 1
FF_ADDR_INC_DST = 1 << 2
FF_ADDR_INC_ANY = 1 << 3
FF_PORT = 1 << 4
FF_PORT_INC_SRC = 1 << 5
FF_PORT_INC_DST = 1 << 6
FF_PORT_INC_ANY = 1 << 7
FF_PROTO = 1 << 8
FF_PROTO_INC = 1 << 9
FF_IFACE = 1 << 10
FF_IFACE_INC = 1 << 11
FF_DIR = 1 << 12
FF_DIR_INC = 1 << 13

PROTOCOLS = {"icmp": 1, "igmp": 2, "tcp": 6, "udp": 17, "gre": 47, "esp": 50, "ah": 51, "icmp6": 58,
             "icmpv6": 58, "sctp": 132}
DIRECTIONS = {"ingress": 1, "egress": 2}
SIDES = {"src": (F_INC_SRC, F_EXC_SRC), "dst": (F_INC_DST, F_EXC_DST), "net": (F_INC_ANY, F_EXC_ANY)}
PORT_SIDES = {"sport": (F_INC_SRC, F_EXC_SRC), "dport": (F_INC_DST, F_EXC_DST), "port": (F_INC_ANY, F_EXC_ANY)}
KEYWORDS = (*SIDES, *PORT_SIDES, "proto", "dir", "iface")
MAX_PREFIXES = 4096  # bpf/filter.h HDRLOG_FILTER_PREFIXES


class FilterError(ValueError):
    """A rule that does not parse; the message quotes it and says what is allowed."""


@dataclass(frozen=True)
class Rule:
    action: str  # "include" | "exclude"
    what: str  # one of KEYWORDS
    values: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.action} {self.what} {','.join(self.values)}"


def parse_rules(lines) -> list[Rule]:
    """Rules from expressions (a list of strings, or text with one rule per line)."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    rules = []
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split(None, 2)
        if len(words) != 3 or words[0] not in ("include", "exclude") or words[1] not in KEYWORDS:
            raise FilterError(f"filter {raw.strip()!r}: expected 'include|exclude {'|'.join(KEYWORDS)} VALUE[,VALUE...]'")
        values = tuple(v.strip() for v in words[2].replace(" ", "").split(",") if v.strip())
        if not values:
            raise FilterError(f"filter {raw.strip()!r}: no value")
        rule = Rule(words[0], words[1], values)
        _check(rule)
        rules.append(rule)
    return rules


def _check(rule: Rule) -> None:
    for v in rule.values:
        if rule.what in SIDES:
            _prefix(rule, v)
        elif rule.what in PORT_SIDES:
            _port_range(rule, v)
        elif rule.what == "proto":
            _proto(rule, v)
        elif rule.what == "dir" and v not in DIRECTIONS:
            raise FilterError(f"filter {rule}: direction {v!r} is not ingress or egress")


def _prefix(rule: Rule, v: str) -> tuple[int, bytes]:
    """(prefix length over 128 bits, 16 address bytes) of a v4 or v6 CIDR or address."""
    try:
        net = ipaddress.ip_network(v, strict=False)
    except ValueError:
        raise FilterError(f"filter {rule}: {v!r} is not an IPv4/IPv6 address or CIDR") from None
    if net.version == 4:
        return 96 + net.prefixlen, b"\0" * 10 + b"\xff\xff" + net.network_address.packed
    return net.prefixlen, net.network_address.packed


def _port_range(rule: Rule, v: str) -> tuple[int, int]:
    lo, _, hi = v.partition("-")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise FilterError(f"filter {rule}: {v!r} is not a port or a range N-M") from None
    if not 0 <= a <= b <= 65535:
        raise FilterError(f"filter {rule}: {v!r} must be ports 0-65535, low-high")
    return a, b


def _proto(rule: Rule, v: str) -> int:
    if v.lower() in PROTOCOLS:
        return PROTOCOLS[v.lower()]
    if v.isdigit() and int(v) < 256:
        return int(v)
    raise FilterError(f"filter {rule}: protocol {v!r} is not one of {', '.join(PROTOCOLS)} or 0-255")


@dataclass
class FilterTables:
    """What the rules become in the maps of bpf/filter.h."""

    flags: int = 0
    dir: bytes = bytes(4)
    proto: bytes = bytes(256)
    addr: dict[tuple[int, bytes], int] = field(default_factory=dict)  # (prefixlen, addr16) -> bits
    ports: np.ndarray = field(default_factory=lambda: np.zeros(65536, np.uint8))
    ifaces: dict[int, int] = field(default_factory=dict)  # ifindex -> bits

    def apply(self, bpf, cfg_leaf) -> None:
        """Write the maps, then the flags and tables inside ``cfg_leaf`` (the caller writes cfg)."""
        t = bpf[b"f_addr"]
        _sync_hash(t, [(_addr_key(t, p, a), bits) for (p, a), bits in self.addr.items()],
                   lambda k: (k.prefixlen, bytes(k.addr)))
        t = bpf[b"f_ifaces"]
        _sync_hash(t, [(t.Key(i), b) for i, b in self.ifaces.items()], lambda k: k.value)
        _write_ports(bpf[b"f_ports"], self.ports)
        cfg_leaf.filter_flags = self.flags
        ctypes.memmove(ctypes.addressof(cfg_leaf.dir), self.dir, 4)
        ctypes.memmove(ctypes.addressof(cfg_leaf.proto), self.proto, 256)


def _addr_key(t, prefixlen: int, addr: bytes):
    k = t.Key()
    k.prefixlen = prefixlen
    ctypes.memmove(ctypes.addressof(k.addr), addr, 16)
    return k


def _sync_hash(table, want: list, ident) -> None:
    """Make a hash/trie map hold exactly ``want`` [(key, u8 bits)]: update, then delete the rest."""
    wanted_ids = set()
    for k, bits in want:
        table[k] = table.Leaf(bits)
        wanted_ids.add(ident(k))
    for k in list(table.keys()):
        if ident(k) not in wanted_ids:
            try:
                del table[k]
            except KeyError:
                pass


def _write_ports(table, ports: np.ndarray) -> None:
    from bcc import libbcc

    keys = np.arange(65536, dtype=np.uint32)
    vals = np.ascontiguousarray(ports, dtype=np.uint8)
    count = ctypes.c_uint32(65536)
    rc = libbcc.lib.bpf_update_batch(table.map_fd, keys.ctypes.data_as(ctypes.c_void_p),
                                     vals.ctypes.data_as(ctypes.c_void_p), ctypes.byref(count))
    if rc != 0:  # older kernels: one write per port
        for p in range(65536):
            table[table.Key(p)] = table.Leaf(int(vals[p]))


def compile_rules(rules: list[Rule], links: dict[str, int]) -> FilterTables:
    """FilterTables for ``rules``; ``links`` maps interface names to ifindex (globs match them)."""
    t = FilterTables()
    dir_ = bytearray(4)
    proto = bytearray(256)
    flags = 0
    for r in rules:
        inc = r.action == "include"
        if r.what in SIDES:
            ibit, ebit = SIDES[r.what]
            flags |= FF_ADDR
            if inc:
                flags |= {"src": FF_ADDR_INC_SRC, "dst": FF_ADDR_INC_DST, "net": FF_ADDR_INC_ANY}[r.what]
            for v in r.values:
                key = _prefix(r, v)
                t.addr[key] = t.addr.get(key, 0) | (ibit if inc else ebit)
        elif r.what in PORT_SIDES:
            ibit, ebit = PORT_SIDES[r.what]
            flags |= FF_PORT
            if inc:
                flags |= {"sport": FF_PORT_INC_SRC, "dport": FF_PORT_INC_DST, "port": FF_PORT_INC_ANY}[r.what]
            for v in r.values:
                a, b = _port_range(r, v)
                t.ports[a : b + 1] |= ibit if inc else ebit
        elif r.what == "proto":
            flags |= FF_PROTO | (FF_PROTO_INC if inc else 0)
            for v in r.values:
                proto[_proto(r, v)] |= F_INC_ANY if inc else F_EXC_ANY
        elif r.what == "dir":
            flags |= FF_DIR | (FF_DIR_INC if inc else 0)
            for v in r.values:
                dir_[DIRECTIONS[v]] |= F_INC_ANY if inc else F_EXC_ANY
        elif r.what == "iface":
            flags |= FF_IFACE | (FF_IFACE_INC if inc else 0)
            for v in r.values:
                hits = [i for n, i in links.items() if fnmatch.fnmatchcase(n, v)]
                for i in hits:  # a name that matches nothing (yet) simply matches no packet
                    t.ifaces[i] = t.ifaces.get(i, 0) | (F_INC_ANY if inc else F_EXC_ANY)
    if len(t.addr) > MAX_PREFIXES:
        raise FilterError(f"filter: {len(t.addr)} address prefixes, at most {MAX_PREFIXES}")
    # Longest-prefix match returns one entry: give each the bits of every prefix covering it.
    items = sorted(t.addr.items())
    nets = {k: ipaddress.ip_network((int.from_bytes(k[1], "big"), k[0])) for k, _ in items}
    for k, _ in items:
        for q, qbits in items:
            if q != k and q[0] < k[0] and nets[k].subnet_of(nets[q]):
                t.addr[k] |= qbits
    t.flags, t.dir, t.proto = flags, bytes(dir_), bytes(proto)
    return t
