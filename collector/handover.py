"""Handing the running capture from one collector to the next, so a restart loses nothing.

Under systemd (``Type=notify``, ``FileDescriptorStoreMax=``) the collector keeps
in the service manager's fd store, besides its own copies:

* ``hdrlog.link.<ifindex>.<direction>``: each tcx link (collector/bpfsys.py);
  the classifier stays attached while any copy of the link is open;
* ``hdrlog.<gen>.<map>``: the program's ring buffer (``records``), per-CPU
  ``counters``, both flow maps of generation ``gen`` (one per incarnation) and the
  connection map it counts into (``conns``: its own, or the one it was handed);
* ``hdrlog.<gen>.state``: a small memfd with the record layout id and the
  counter values already reported in ``collector_stats``.

When the collector exits (SIGTERM, a crash, SIGKILL), the old program keeps
running: packets go on into its ring buffer and flow maps. The next collector
finds the fds in ``LISTEN_FDS``, swaps its program into each link with one
atomic BPF_LINK_UPDATE (every packet runs the old program or the new one), then
reads what the old program left: the ring buffer to its end, both flow maps,
and the counters since the last report. Then it drops the old generation from
the store. The connection map is not read but taken over: the new program counts
into the same map (through its one-slot ``conn_maps``), so a connection open across
the restart keeps its entry, its counts and its uid, and gets one final row, from
whichever collector sees it end; the one that stops for a restart writes no final
rows for open connections. ``systemctl stop`` makes systemd close the stored fds: the links go,
and nothing stays attached. Outside systemd none of this happens: closing the
process's own link fds detaches on exit.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from hdrlog.collector import bpfsys, connections, fdstore, flows, records
from hdrlog.collector.ringbuf import RingBufReader, map_info

log = logging.getLogger("hdrlog.collector")

MAPS = ("records", "counters", "flows0", "flows1", "conns")
STATE_BYTES = 4096
# Changes whenever what a ring-buffer record, a flow entry or the counters mean changes:
# a successor decodes a predecessor's records only when this matches.
LAYOUT_ID = zlib.crc32(repr((records.RECORD_DTYPE.descr, flows.FLOW_KEY_DTYPE.descr,
                             flows.FLOW_VALUE_DTYPE.descr, records.COUNTER_NAMES,
                             connections.CONN_KEY_DTYPE.descr, connections.CONN_VALUE_DTYPE.descr,
                             records.TUNNEL_EXT_DTYPE.descr)).encode())

_LINK = re.compile(r"^hdrlog\.link\.(\d+)\.(ingress|egress)$")
_GEN = re.compile(r"^hdrlog\.(\d+)\.(records|counters|flows0|flows1|conns|state)$")


def link_name(ifindex: int, direction: str) -> str:
    return f"hdrlog.link.{ifindex}.{direction}"


class Generation:
    """One predecessor's maps and state, as inherited fds."""

    def __init__(self, gen: int, fds: dict[str, int]):
        self.gen = gen
        self.fds = fds
        self._taken: set[str] = set()

    def state(self) -> dict:
        fd = self.fds.get("state")
        if fd is None:
            return {}
        try:
            raw = os.pread(fd, STATE_BYTES, 0).rstrip(b"\0")
            return json.loads(raw or b"{}")
        except (OSError, ValueError):
            return {}

    def counters(self) -> dict[str, int]:
        fd = self.fds.get("counters")
        if fd is None:
            return {}
        return read_counters(fd)

    def drain_records(self) -> tuple[list[tuple[np.ndarray | bytes, int, list]], int]:
        """Every record left in the ring buffer: ([(raw, n, payloads)], records not decodable)."""
        fd = self.fds.get("records")
        if fd is None:
            return [], 0
        reader = RingBufReader(fd, records.RECORD_SIZE, gather_s=0)
        try:
            chunks = []
            while True:
                raw, n, payloads = reader.read(0)
                if not n:
                    break
                chunks.append((raw, n, payloads))
            return chunks, reader.odd
        finally:
            reader.close()

    def drain_flows(self) -> tuple[np.ndarray, np.ndarray]:
        keys, vals = [], []
        for name in ("flows0", "flows1"):
            fd = self.fds.get(name)
            if fd is None:
                continue
            cap = map_info(fd).get("max_entries", 0)
            k, v = flows.read_flow_map(fd, np.zeros(cap, flows.FLOW_KEY_DTYPE), np.zeros(cap, flows.FLOW_VALUE_DTYPE))
            keys.append(k)
            vals.append(v)
        if not keys:
            return flows.empty()
        return np.concatenate(keys), np.concatenate(vals)

    def take_conns(self) -> int | None:
        """The connection map's fd, now the caller's to keep and close (None when there is none or
        the layout differs); release() still drops its name from the store."""
        if self.state().get("layout") != LAYOUT_ID:
            return None
        fd = self.fds.pop("conns", None)
        if fd is not None:
            self._taken.add("conns")
        return fd

    def release(self) -> None:
        """Drop this generation from the fd store and close our copies."""
        for name in self._taken:
            fdstore.remove(f"hdrlog.{self.gen}.{name}")
        for name, fd in self.fds.items():
            fdstore.remove(f"hdrlog.{self.gen}.{name}")
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()


def read_counters(fd: int) -> dict[str, int]:
    """The per-CPU ``counters`` map summed over CPUs, by name: ours, or a predecessor's."""
    ncpu = bpfsys.possible_cpus()
    size = len(records.COUNTER_NAMES) * 8
    raw = bpfsys.map_lookup(fd, b"\0\0\0\0", size * ncpu)
    per_cpu = np.frombuffer(raw, dtype="<u8").reshape(ncpu, len(records.COUNTER_NAMES))
    return {name: int(v) for name, v in zip(records.COUNTER_NAMES, per_cpu.sum(axis=0))}


class Inheritance:
    """What a predecessor left in the fd store: links by (ifindex, direction), and generations."""

    def __init__(self, fds: dict[str, list[int]]):
        self.links: dict[tuple[int, str], int] = {}
        gens: dict[int, dict[str, int]] = {}
        for name, fdlist in fds.items():
            fd, extra = fdlist[0], fdlist[1:]
            for dup in extra:  # one fd per name is all we use
                os.close(dup)
            m = _LINK.match(name)
            g = _GEN.match(name)
            if m:
                self.links[(int(m.group(1)), m.group(2))] = fd
            elif g:
                gens.setdefault(int(g.group(1)), {})[g.group(2)] = fd
            else:
                log.warning("collector: closing an fd of unknown name %r from the service manager", name)
                fdstore.remove(name)
                os.close(fd)
        self.generations = [Generation(g, gens[g]) for g in sorted(gens)]

    @classmethod
    def from_service_manager(cls) -> "Inheritance":
        return cls(fdstore.inherited())

    def __bool__(self) -> bool:
        return bool(self.links or self.generations)

    def take_conns(self) -> int | None:
        """The newest generation's connection map (see Generation.take_conns)."""
        for gen in reversed(self.generations):
            fd = gen.take_conns()
            if fd is not None:
                return fd
        return None

    @property
    def next_gen(self) -> int:
        return max((g.gen for g in self.generations), default=0) + 1

    def take_link(self, ifindex: int, direction: str) -> int | None:
        return self.links.pop((ifindex, direction), None)

    def release_links_except(self, keep: set[tuple[int, str]]) -> list[tuple[int, str]]:
        """Detach the links not in ``keep`` (interfaces this collector does not capture, or all of
        them when it uses tc filters): drop them from the store and close them."""
        gone = sorted(k for k in self.links if k not in keep)
        for ifindex, direction in gone:
            fdstore.remove(link_name(ifindex, direction))
            os.close(self.links.pop((ifindex, direction)))
        return gone


class Keeper:
    """This collector's side: what it puts in the fd store, and the state memfd it keeps current."""

    def __init__(self, gen: int):
        self.gen = gen
        self._state_fd = os.memfd_create(f"hdrlog-state-{gen}", os.MFD_CLOEXEC)
        os.ftruncate(self._state_fd, STATE_BYTES)
        self.write_state({})

    def keep_maps(self, maps: dict[str, int]) -> bool:
        """Put this generation's maps and state in the fd store; False when it cannot be reached."""
        ok = all([fdstore.store(f"hdrlog.{self.gen}.{name}", maps[name]) for name in MAPS])
        return fdstore.store(f"hdrlog.{self.gen}.state", self._state_fd) and ok

    def keep_link(self, ifindex: int, direction: str, fd: int) -> None:
        fdstore.store(link_name(ifindex, direction), fd)

    def forget_link(self, ifindex: int, direction: str) -> None:
        """The interface is gone: its link's copy leaves the store (churning veths must not fill it)."""
        fdstore.remove(link_name(ifindex, direction))

    def forget(self) -> None:
        """Take this generation out of the store again (capture fell back to tc filters)."""
        for name in (*MAPS, "state"):
            fdstore.remove(f"hdrlog.{self.gen}.{name}")
        self.close()

    def write_state(self, reported: dict[str, int]) -> None:
        """Record the counter values already reported, for a successor to report only the rest."""
        raw = json.dumps({"layout": LAYOUT_ID, "reported": reported}).encode()
        if len(raw) > STATE_BYTES:  # pragma: no cover - a handful of counters
            raise ValueError("handover state does not fit its memfd")
        os.pwrite(self._state_fd, raw.ljust(STATE_BYTES, b"\0"), 0)

    def close(self) -> None:
        if self._state_fd >= 0:
            os.close(self._state_fd)
            self._state_fd = -1


@dataclass
class Adopted:
    """What the predecessors' programs left, read by ``adopt()``."""

    records: list = field(default_factory=list)  # [(raw, n, payloads)] from their ring buffers, in order
    flows: list = field(default_factory=list)  # [(keys, values)] from their flow maps
    counts: dict = field(default_factory=dict)  # what they counted after their last collector_stats row


def adopt(inheritance: Inheritance) -> Adopted:
    """Read what the predecessors' programs left, once ours runs in their links, and release them."""
    time.sleep(flows.DEFAULT_GRACE)  # a CPU still in an old program finishes its packet
    out = Adopted()
    got_records = got_flows = 0
    for gen in inheritance.generations:
        state = gen.state()
        if state.get("layout") != LAYOUT_ID:
            log.warning("capture: the previous collector (generation %d) wrote another record layout: "
                        "what it left in the kernel is not read", gen.gen)
            gen.release()
            continue
        reported = state.get("reported") or {}
        for name, value in gen.counters().items():
            out.counts[name] = out.counts.get(name, 0) + max(0, value - reported.get(name, 0))
        chunks, odd = gen.drain_records()
        if odd:  # should stay 0: the layout id matched
            log.warning("capture: %d records the previous collector left were of another size: skipped", odd)
        out.records.extend(chunks)
        got_records += sum(n for _, n, _ in chunks)
        keys, vals = gen.drain_flows()
        if len(keys):
            out.flows.append((keys, vals))
            got_flows += len(keys)
        gen.release()
    log.info("capture: took over from the previous collector without a gap: %d records and %d flows it "
             "left in the kernel, %d packets it saw after its last report", got_records, got_flows,
             out.counts.get("seen", 0))
    return out
