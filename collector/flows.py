"""Flows: draining the kernel's flow maps in bulk, and flows from fallback records.

bpf/flows.h keeps two flow hash maps and a slot in ``cfg`` saying which one the
classifier writes. ``FlowDrain.drain()`` flips the slot, waits ``grace`` seconds
so no program still holds a pointer into the old map, then empties the old map
with BPF_MAP_LOOKUP_AND_DELETE_BATCH straight into numpy arrays (no Python
object per flow) and returns ``flows`` columns. Anything a straggler wrote after
the batch read stays in that map and comes out one drain later: never lost.

``from_records`` builds flow rows from packet records that carry
LOG_FLOW_FALLBACK (the map was full), grouping them by the flow key with numpy,
so the ``flows`` table stays complete when the map is not.
"""

from __future__ import annotations

import time
from typing import Mapping

import numpy as np

from hdrlog.collector import bpfsys, communityid
from hdrlog.proto.columns import FLOWS

FLOW_KEY_DTYPE = np.dtype([
    ("ifindex", "<u4"), ("direction", "u1"), ("ip_version", "u1"), ("ip_proto", "u1"), ("tunnel_type", "u1"),
    ("src_ip", "V16"), ("dst_ip", "V16"), ("src_port", "<u2"), ("dst_port", "<u2"), ("tunnel_id", "<u4"),
])
FLOW_VALUE_DTYPE = np.dtype([
    ("packets", "<u8"), ("bytes", "<u8"), ("first_ns", "<u8"), ("last_ns", "<u8"),
    ("tcp_flags", "<u4"), ("flags", "<u4"),
])
assert FLOW_KEY_DTYPE.itemsize == 48 and FLOW_VALUE_DTYPE.itemsize == 40  # struct flow_key / flow_value
FLOW_CONTINUED = 1 << 0  # flow_value.flags: the flow had an entry in the other map (bpf/flows.h)

DEFAULT_GRACE = 0.01
_KEY_FIELDS = ("ifindex", "direction", "ip_version", "ip_proto", "src_ip", "dst_ip", "src_port", "dst_port")


def flow_columns(keys: np.ndarray, vals: np.ndarray, ifnames: Mapping[int, str], mono_to_wall_ns: int,
                 sample_rate: int = 1, cids: communityid.CommunityIdCache | None = None) -> dict[str, object]:
    """``flows`` columns (registry order and dtypes) from key and value arrays; ``community_id``
    from ``cids`` (default: the process's cache)."""
    n = len(keys)
    uniq, inverse = np.unique(keys["ifindex"], return_inverse=True)
    names = [ifnames.get(int(i)) or f"if{int(i)}" for i in uniq]
    out: dict[str, object] = {}
    for spec in FLOWS:
        name = spec.name
        if name == "start_ts":
            col = vals["first_ns"].astype(np.int64) + np.int64(mono_to_wall_ns)
        elif name == "end_ts":
            col = vals["last_ns"].astype(np.int64) + np.int64(mono_to_wall_ns)
        elif name == "ifname":
            out[name] = [names[j] for j in inverse.tolist()]
            continue
        elif name == "sample_rate":
            col = np.full(n, sample_rate)
        elif name == "community_id":  # ICMP: type and code in the ports; port 0 both ways: fragments
            proto = keys["ip_proto"]
            ok = (keys["ip_version"] != 0) & (np.isin(proto, (1, 58, 132)) | (
                np.isin(proto, (6, 17)) & ((keys["src_port"] != 0) | (keys["dst_port"] != 0))))
            out[name] = (cids or communityid.CACHE).of_rows(proto, keys["src_ip"], keys["dst_ip"],
                                                             keys["src_port"], keys["dst_port"], ok)
            continue
        elif name in vals.dtype.names:
            col = vals[name]
        else:
            col = keys[name]
        out[name] = np.ascontiguousarray(col).astype(spec.dtype, copy=False)
    return out


class FlowDrain:
    """Flips the live flow map and reads the other one out in bulk."""

    def __init__(self, bpf, set_slot, entries: int, grace: float = DEFAULT_GRACE):
        """``set_slot(n)`` writes cfg.flow_slot (the caller owns cfg and its lock)."""
        self._bpf = bpf
        self._set_slot = set_slot
        self._maps = [bpf[b"flows0"], bpf[b"flows1"]]
        self._slot = 0
        self._grace = grace
        self._keys = np.zeros(entries, FLOW_KEY_DTYPE)
        self._vals = np.zeros(entries, FLOW_VALUE_DTYPE)
        self.drains = 0
        self.flows = 0

    def drain(self) -> tuple[np.ndarray, np.ndarray]:
        """Flip, wait, and return (keys, values) of every flow in the map that was live."""
        old = self._slot
        self._slot = 1 - old
        self._set_slot(self._slot)
        time.sleep(self._grace)
        keys, vals = self.read_map(old)
        self.drains += 1
        self.flows += len(keys)
        self.last_entries = len(keys)  # how full the map got in the interval just ended, for /metrics
        return keys, vals

    def drain_all(self) -> tuple[np.ndarray, np.ndarray]:
        """Both maps (at shutdown, after the classifier is detached)."""
        k0, v0 = self.read_map(0)
        k1, v1 = self.read_map(1)
        self.flows += len(k0) + len(k1)
        return np.concatenate([k0, k1]), np.concatenate([v0, v1])

    def read_map(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        return read_flow_map(self._maps[slot].map_fd, self._keys, self._vals)


def empty() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, FLOW_KEY_DTYPE), np.zeros(0, FLOW_VALUE_DTYPE)


def read_flow_map(fd: int, keys: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Empty the flow map ``fd`` (lookup-and-delete batches through the scratch arrays ``keys``/``vals``,
    its capacity); returns copies of what it held."""
    return bpfsys.map_batch_read(fd, keys, vals, delete=True, what="flow map drain")


def from_records(rec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flow (keys, values) aggregated from packet records (``records.RECORD_DTYPE``). The records'
    tunnel extensions are not read here: a decapsulated packet that found the flow map full is
    counted into its inner flow without the tunnel type and id (a full map is rare and counted)."""
    n = len(rec)
    if not n:
        return empty()
    keys = np.zeros(n, FLOW_KEY_DTYPE)
    for f in _KEY_FIELDS:
        keys[f] = rec[f]
    icmp = np.isin(rec["ip_proto"], (1, 58))  # type and code in the ports, as the kernel keys them
    keys["src_port"][icmp] = rec["icmp_type"][icmp]
    keys["dst_port"][icmp] = rec["icmp_code"][icmp]
    uniq, inverse = np.unique(keys.view(np.dtype((np.void, FLOW_KEY_DTYPE.itemsize))), return_inverse=True)
    inverse = inverse.ravel()
    m = len(uniq)
    vals = np.zeros(m, FLOW_VALUE_DTYPE)
    vals["packets"] = np.bincount(inverse, minlength=m)
    vals["bytes"] = np.bincount(inverse, weights=rec["wire_len"].astype(np.float64), minlength=m).astype(np.uint64)
    first = np.full(m, np.iinfo(np.uint64).max, np.uint64)
    np.minimum.at(first, inverse, rec["mono_ns"])
    last = np.zeros(m, np.uint64)
    np.maximum.at(last, inverse, rec["mono_ns"])
    flags = np.zeros(m, np.uint32)
    np.bitwise_or.at(flags, inverse, rec["tcp_flags"].astype(np.uint32))
    vals["first_ns"], vals["last_ns"], vals["tcp_flags"] = first, last, flags
    return uniq.view(FLOW_KEY_DTYPE).ravel().copy(), vals
