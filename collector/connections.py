"""Connections: the kernel's connection map (bpf/conntrack.h) turned into ``connections`` rows.

``ConnDrain.poll(now_ns)`` reads the whole map in one BPF_MAP_LOOKUP_BATCH (with BPF_F_LOCK, so
no entry is read half-updated) and decides per connection:

* **final** when it ended -- TCP: both sides closed (FIN) or one reset (RST), and no packet for
  ``linger`` seconds since -- or when it was idle for its protocol's inactivity timeout (TCP,
  UDP, ICMP; other IP protocols use the UDP one). The entry is taken out with
  BPF_MAP_LOOKUP_AND_DELETE_ELEM, so the final row carries the entry's last counts; a packet
  that comes later starts a new connection (a new uid), as in Zeek;
* **interim** every ``interim`` seconds of its life otherwise: a row with ``final = 0`` and the
  counts so far (cumulative: the latest row of a uid is its state, nothing is summed twice).

``finish()`` (the collector stops for good, the program is detached) writes a final row for
every connection still in the map.

``conn_state`` is Zeek's ``conn_state()`` (base/protocols/conn/main.zeek) over the endpoint
states the kernel keeps with Zeek's transitions; ``history`` is the kernel's letters, upper case
for the originator, '^' first when the roles were flipped (a SYN+ACK came first). ``uid`` is
'C' + base62 of a hash of host, interface, the key and the start time: the same on every row of
a connection, also after a collector restart. ``community_id`` is computed once per connection.

A tunnelled connection (bpf/tunnel.h) is the inner flow's: its key holds the tunnel type and id
(VNI / GRE key), so two tenants' connections with the same inner addresses stay apart, and the
value keeps each side's outer (tunnel endpoint) address from the connection's first packet.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from hdrlog.collector import bpfsys
from hdrlog.collector.communityid import community_id
from hdrlog.proto.columns import CONNECTIONS

log = logging.getLogger("hdrlog.collector")

# Mirrors of bpf/conntrack.h (tests/test_connections.py checks them against the header).
CONN_ORIG_1 = 1 << 0
CONN_FLIPPED = 1 << 1
CONN_HIST_FULL = 1 << 2
CONN_STARTED = 1 << 3
ZS_INACTIVE, ZS_SYN_SENT, ZS_SYN_ACK_SENT, ZS_PARTIAL, ZS_ESTABLISHED, ZS_CLOSED, ZS_RESET = range(7)
HDRLOG_CONN_HISTORY = 32
BPF_F_LOCK = bpfsys.BPF_F_LOCK

CONN_KEY_DTYPE = np.dtype([
    ("ifindex", "<u4"), ("ip_version", "u1"), ("ip_proto", "u1"), ("tunnel_type", "u1"), ("_pad", "u1"),
    ("ip0", "V16"), ("ip1", "V16"), ("port0", "<u2"), ("port1", "<u2"), ("tunnel_id", "<u4"),
])
CONN_SIDE_DTYPE = np.dtype([
    ("pkts", "<u8"), ("ip_bytes", "<u8"), ("bytes", "<u8"), ("ts_syn", "<u8"), ("ts_synack", "<u8"),
    ("ts_ack", "<u8"), ("seq_end", "<u4"), ("retrans", "<u4"), ("zero_win", "<u4"), ("last_syn", "<u4"),
    ("last_fin", "<u4"), ("last_rst", "<u4"), ("t_next", "<u4"), ("w_next", "<u4"), ("hist", "<u2"),
    ("state", "u1"), ("prev_state", "u1"), ("_pad", "<u4"),
])
CONN_VALUE_DTYPE = np.dtype([
    ("lock", "<u4"), ("flags", "<u4"), ("first_ns", "<u8"), ("last_ns", "<u8"),
    ("side", CONN_SIDE_DTYPE, (2,)), ("hist_len", "u1"), ("_pad", "V7"), ("hist", "u1", (HDRLOG_CONN_HISTORY,)),
    ("outer_ip", "V16", (2,)),
])
assert CONN_KEY_DTYPE.itemsize == 48 and CONN_SIDE_DTYPE.itemsize == 88 and CONN_VALUE_DTYPE.itemsize == 272

# Zeek's defaults: tcp_inactivity_timeout 5 min, udp/icmp_inactivity_timeout 1 min,
# tcp_connection_linger 5 s.
DEFAULT_TCP_TIMEOUT = 300.0
DEFAULT_UDP_TIMEOUT = 60.0
DEFAULT_ICMP_TIMEOUT = 60.0
DEFAULT_LINGER = 5.0
DEFAULT_INTERIM = 60.0
DEFAULT_ENTRIES = 65536
NS = 1_000_000_000

_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@dataclass
class ConnConfig:
    """When connections become rows. Plain data, validated by the collector's config."""

    entries: int = DEFAULT_ENTRIES
    interim: float = DEFAULT_INTERIM
    tcp_timeout: float = DEFAULT_TCP_TIMEOUT
    udp_timeout: float = DEFAULT_UDP_TIMEOUT
    icmp_timeout: float = DEFAULT_ICMP_TIMEOUT
    linger: float = DEFAULT_LINGER


def uid_of(host: str, key: bytes, first_ns: int) -> str:
    """Zeek-style uid: 'C' + 17 base62 digits of a hash of host, key (ifindex, ends) and start."""
    h = int.from_bytes(hashlib.sha1(host.encode() + b"\0" + key + first_ns.to_bytes(8, "little")).digest()[:13], "big")
    out = []
    for _ in range(17):
        h, r = divmod(h, 62)
        out.append(_B62[r])
    return "C" + "".join(out)


def zeek_conn_state(proto: int, os_: int, rs: int, orig_size: int, resp_size: int, history: str) -> str:
    """Zeek's conn_state() (base/protocols/conn/main.zeek) from the endpoint states."""
    if proto == 6:
        o_inactive = os_ in (ZS_INACTIVE, ZS_PARTIAL)
        r_inactive = rs in (ZS_INACTIVE, ZS_PARTIAL)
        if rs == ZS_RESET:
            if os_ in (ZS_SYN_SENT, ZS_SYN_ACK_SENT) or (os_ == ZS_RESET and orig_size == 0 and resp_size == 0):
                return "REJ"
            return "RSTRH" if o_inactive else "RSTR"
        if os_ == ZS_RESET:
            if r_inactive:
                if _rstos0(history):
                    return "RSTOS0"
                return "OTH"
            return "RSTO"
        if rs == ZS_CLOSED and os_ == ZS_CLOSED:
            return "SF"
        if os_ == ZS_CLOSED:
            return "SH" if r_inactive else "S2"
        if rs == ZS_CLOSED:
            return "SHR" if o_inactive else "S3"
        if os_ == ZS_SYN_SENT and rs == ZS_INACTIVE:
            return "S0"
        if os_ == ZS_ESTABLISHED and rs == ZS_ESTABLISHED:
            return "S1"
        return "OTH"
    if proto == 17:
        o_active, r_active = os_ != ZS_INACTIVE, rs != ZS_INACTIVE
        if o_active:
            return "SF" if r_active else "S0"
        return "SHR" if r_active else "OTH"
    return "OTH"


def _rstos0(h: str) -> bool:
    """Zeek's /^\\^?S[^HAFGIQ]*R.*/ on a history string."""
    if h.startswith("^"):
        h = h[1:]
    if not h.startswith("S"):
        return False
    for c in h[1:]:
        if c == "R":
            return True
        if c in "HAFGIQ":
            return False
    return False


def history_of(val, orig: int) -> str:
    """The history letters of one value, originator upper case."""
    n = min(int(val["hist_len"]), HDRLOG_CONN_HISTORY)
    out = ["^"] if int(val["flags"]) & CONN_FLIPPED else []
    for b in val["hist"][:n].tolist():
        side = 1 if b & 0x80 else 0
        c = chr(b & 0x7F)
        out.append(c if side == orig else c.lower())
    return "".join(out)


class ConnDrain:
    """Reads the kernel's connection map and writes ``connections`` rows (see the module doc)."""

    def __init__(self, map_fd: int, config: ConnConfig, host: str):
        self._fd = map_fd
        self.config = config
        self.host = host
        cap = config.entries
        self._keys = np.zeros(cap, CONN_KEY_DTYPE)
        self._vals = np.zeros(cap, CONN_VALUE_DTYPE)
        self._next_interim: dict[bytes, int] = {}
        self._ids: dict[bytes, tuple[str, str, int]] = {}  # uid, community_id, start_ts (fixed once)
        self.interim_rows = 0
        self.final_rows = 0

    # -- kernel map -------------------------------------------------------------------------
    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        """Every entry (copies), each read under its lock."""
        return bpfsys.map_batch_read(self._fd, self._keys, self._vals, lock=True, what="connection map")

    def _take(self, key: np.void) -> np.ndarray | None:
        """Delete one entry and return its last value (None when it is gone already)."""
        from bcc import libbcc

        k = np.array([key], CONN_KEY_DTYPE)
        v = np.zeros(1, CONN_VALUE_DTYPE)
        rc = libbcc.lib.bpf_map_lookup_and_delete_elem_flags(
            self._fd, ctypes.c_void_p(k.ctypes.data), ctypes.c_void_p(v.ctypes.data), ctypes.c_uint64(BPF_F_LOCK))
        if rc:
            return None
        return v[0]

    # -- rows -------------------------------------------------------------------------------
    def _timeout_ns(self, proto: int) -> int:
        c = self.config
        t = c.tcp_timeout if proto == 6 else c.icmp_timeout if proto in (1, 58) else c.udp_timeout
        return int(t * NS)

    def poll(self, now_ns: int, ifnames: Mapping[int, str], mono_to_wall_ns: int,
             finish: bool = False) -> dict[str, object] | None:
        """Rows due now (interim and final), or None. ``now_ns`` is CLOCK_MONOTONIC.
        ``finish``: every connection gets its final row (the program no longer runs)."""
        keys, vals = self.read_all()
        self.last_entries = len(keys)  # the map's fill level, for /metrics
        rows: list[tuple] = []
        interim_ns = int(self.config.interim * NS)
        linger_ns = int(self.config.linger * NS)
        seen: set[bytes] = set()
        for i in range(len(keys)):
            key, val = keys[i], vals[i]
            if not int(val["flags"]) & CONN_STARTED:
                continue  # inserted this instant, first packet not counted yet
            kb = key.tobytes()
            seen.add(kb)
            proto = int(key["ip_proto"])
            last = int(val["last_ns"])
            s0, s1 = int(val["side"][0]["state"]), int(val["side"][1]["state"])
            ended = proto == 6 and ((s0 == ZS_CLOSED and s1 == ZS_CLOSED) or ZS_RESET in (s0, s1))
            idle = now_ns - last >= self._timeout_ns(proto)
            if finish or idle or (ended and now_ns - last >= linger_ns):
                final = self._take(key)
                if final is None:
                    continue
                rows.append((key, final, 1))
                self._next_interim.pop(kb, None)  # its ids go once the final row is written (below)
                continue
            due = self._next_interim.get(kb)
            if due is None:
                due = int(val["first_ns"]) + interim_ns
                while due <= now_ns - interim_ns:  # adopted or long-lived: the next boundary from now
                    due += interim_ns
                self._next_interim[kb] = due
            if now_ns >= due:
                rows.append((key, val, 0))
                while self._next_interim[kb] <= now_ns:
                    self._next_interim[kb] += interim_ns
        for kb in list(self._next_interim):
            if kb not in seen:  # gone from the map without our final row (cannot happen but by hand)
                self._next_interim.pop(kb, None)
                self._ids.pop(kb, None)
        if not rows:
            return None
        cols = self._columns(rows, ifnames, mono_to_wall_ns)
        for key, _, final in rows:
            if final:
                self._ids.pop(key.tobytes(), None)
        return cols

    def _columns(self, rows: list[tuple], ifnames: Mapping[int, str], offset: int) -> dict[str, object]:
        cols: dict[str, list] = {c.name: [] for c in CONNECTIONS}
        for key, val, final in rows:
            flags = int(val["flags"])
            orig = 1 if flags & CONN_ORIG_1 else 0
            resp = orig ^ 1
            o, r = val["side"][orig], val["side"][resp]
            ips = (key["ip0"].tobytes(), key["ip1"].tobytes())
            ports = (int(key["port0"]), int(key["port1"]))
            proto = int(key["ip_proto"])
            kb = key.tobytes()
            ids = self._ids.get(kb)
            if ids is None:
                cid = _community_id(proto, ips[orig], ips[resp], ports[orig], ports[resp])
                ids = (uid_of(self.host, kb, int(val["first_ns"])), cid, int(val["first_ns"]) + offset)
                self._ids[kb] = ids
            hist = history_of(val, orig) if proto in (6, 17) else ""
            orig_bytes, resp_bytes = int(o["bytes"]), int(r["bytes"])
            state = zeek_conn_state(proto, int(o["state"]), int(r["state"]), orig_bytes, resp_bytes, hist)
            rtt = 0
            if o["ts_syn"] and r["ts_synack"] and o["ts_ack"] and int(o["ts_ack"]) >= int(o["ts_syn"]):
                rtt = min((int(o["ts_ack"]) - int(o["ts_syn"])) // 1000, 0xFFFFFFFF)
            ifindex = int(key["ifindex"])
            cols["start_ts"].append(ids[2])  # the same on every row, whatever the clock offset does
            # On the start's clock offset too: the offset drifts between reads, and a one-packet
            # connection must not end before it starts.
            cols["end_ts"].append(ids[2] + int(val["last_ns"]) - int(val["first_ns"]))
            cols["ifname"].append(ifnames.get(ifindex) or f"if{ifindex}")
            cols["uid"].append(ids[0])
            cols["final"].append(final)
            cols["ip_version"].append(int(key["ip_version"]))
            cols["ip_proto"].append(proto)
            cols["orig_ip"].append(ips[orig])
            cols["orig_port"].append(ports[orig])
            cols["resp_ip"].append(ips[resp])
            cols["resp_port"].append(ports[resp])
            cols["orig_pkts"].append(int(o["pkts"]))
            cols["resp_pkts"].append(int(r["pkts"]))
            cols["orig_ip_bytes"].append(int(o["ip_bytes"]))
            cols["resp_ip_bytes"].append(int(r["ip_bytes"]))
            cols["orig_bytes"].append(orig_bytes)
            cols["resp_bytes"].append(resp_bytes)
            cols["conn_state"].append(state)
            cols["history"].append(hist)
            cols["handshake_rtt_us"].append(rtt)
            cols["orig_retrans"].append(int(o["retrans"]))
            cols["resp_retrans"].append(int(r["retrans"]))
            cols["zero_windows"].append(int(o["zero_win"]) + int(r["zero_win"]))
            cols["community_id"].append(ids[1])
            # Tunnels (bpf/tunnel.h): type and id from the key, each side's outer address from the first packet.
            cols["tunnel_type"].append(int(key["tunnel_type"]))
            cols["tunnel_id"].append(int(key["tunnel_id"]))
            cols["outer_orig_ip"].append(val["outer_ip"][orig].tobytes())
            cols["outer_resp_ip"].append(val["outer_ip"][resp].tobytes())
            if final:
                self.final_rows += 1
            else:
                self.interim_rows += 1
        out: dict[str, object] = {}
        for spec in CONNECTIONS:
            v = cols[spec.name]
            if not v and rows:  # filled after the drain (names: resp_name, tls_sni, ... by collector/names.py)
                v = [""] * len(rows) if spec.is_string else [0] * len(rows)
            if spec.is_string:
                out[spec.name] = v
            elif spec.dtype == "V16":
                out[spec.name] = np.frombuffer(b"".join(v), dtype="V16").copy()
            else:
                out[spec.name] = np.array(v, dtype=spec.dtype)
        return out


def _community_id(proto: int, saddr: bytes, daddr: bytes, sport: int, dport: int) -> str:
    try:
        if proto not in (1, 6, 17, 58, 132):
            sport = dport = 0
        return community_id(proto, saddr, daddr, sport, dport)
    except Exception:  # never let one odd tuple stop the rows
        return ""
