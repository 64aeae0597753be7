"""Capture component: the TC classifier (bpf/hdrlog.c) on chosen interfaces.

``Capture(config)`` is inert; ``start()`` compiles the C through BCC, resolves the
interface names and globs, and attaches the classifier to ingress and egress of
each interface (rolling everything back if any step fails): through tcx links
where the kernel has them (collector/bpfsys.py; closing the link detaches), else
as cls_bpf filters on a clsact qdisc it creates where none exists. Under systemd
it takes over a predecessor's running classifier and keeps its own in the fd
store (collector/handover.py). ``poll()`` returns what the ring buffer holds as
``packets`` columns; ``stop()`` detaches only what this component attached (tc
filters matched by prio, handle and program name) and removes a clsact qdisc only
if it created it and nothing else is attached to it.

Reading the ring buffer goes through ``_CallbackReader``: BCC calls back once
per record and we copy the raw bytes out (the fixed header into one run, the
payload tail of app-layer candidates apart); decoding happens in bulk in
``records.decode``. A bulk mmap reader can replace it behind the same
``read(timeout_ms) -> (bytes, count, payloads)`` seam.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import fnmatch
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hdrlog.bpf import SOURCE_DIR
from hdrlog.collector import appdecode, bpfsys, fdstore, handover, names as namesmod, records
from hdrlog.collector import filters as filterlang
from hdrlog.collector import flows as flowmod
from hdrlog.collector import connections as connmod
from hdrlog.collector.ringbuf import RingBufReader
from hdrlog.collector.appdecode import DEFAULT_DNS_PORTS

log = logging.getLogger(__name__)

BPF_SOURCE = Path(SOURCE_DIR) / "hdrlog.c"
TYPES_HEADER = Path(SOURCE_DIR) / "types.h"
HEADERS = ("types.h", "flows.h", "conntrack.h")

# Our TC filters: low prio number so we run before typical filters (tc's
# automatic prios start at 49152); we return TC_ACT_UNSPEC so later filters
# still run. The handle tells our filters apart from anyone else's.
TC_PRIO = 7
TC_HANDLE = 0x4844  # "HD"
PROG_NAMES = {"ingress": "hdrlog_ingress", "egress": "hdrlog_egress"}
PARENTS = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}  # clsact ingress / egress
PAGE_SIZE = 4096
MONO_OFFSET_REFRESH_NS = 1_000_000_000

_GLOB_CHARS = set("*?[")

# Logging modes (bpf/flows.h MODE_*) and their defaults.
MODES = {"packets": 0, "flows": 1, "auto": 2}
DEFAULT_AUTO_SAMPLE = 100  # auto mode's 1:N for packets that are not notable
DEFAULT_FIRST_PACKETS = 3
DEFAULT_FLOW_ENTRIES = 65536
READERS = ("mmap", "callback")
# How the classifier is attached: tcx links (Linux 6.6+; an fd owns the attachment, and a restart
# under systemd hands it over without a gap, collector/handover.py) or cls_bpf tc filters.
ATTACH_KINDS = ("auto", "tcx", "tc")

# Payload copy (bpf/types.h HDRLOG_PAYLOAD_*): a TLS ClientHello's SNI can sit
# 1,100-1,400 bytes in (post-quantum key shares, shuffled extensions), DNS names
# up to ~270; 2048 holds a whole full-sized segment, and a hello longer than its
# segment is joined with the next one (collector/appdecode.py Reassembly). See
# bench/payload_copy.py for what the copy costs.
PAYLOAD_BYTES = 2048
PAYLOAD_CHUNK = 128
MAX_PAYLOAD_BYTES = 4096
MAX_DNS_PORTS = 16


@dataclass
class CaptureConfig:
    """What to capture. Plain data: CLI and config-file concerns live elsewhere."""

    ifaces: list[str] = field(default_factory=list)
    """Interface names or fnmatch globs such as "veth*"."""
    ringbuf_bytes: int = 8 << 20
    """Ring buffer size; rounded up to a power of two of pages. Raise it when ringbuf_full grows."""
    sample_rate: int = 1
    """1:N sampling: packets mode logs one packet in N (1 = all); auto mode logs one in N of the
    packets that are not notable (1 = its default, 100; 0 = none of them)."""
    mode: str = "packets"
    """packets (a row per packet), flows (in-kernel aggregates only) or auto (connections, exact,
    + notable packets + the 1:N sample of the rest; packets without a connection key, such as
    non-IP or non-first fragments, go to flows). The collector's default is auto."""
    first_packets: int = DEFAULT_FIRST_PACKETS
    """auto mode: log the first N packets of each new flow."""
    flow_entries: int = DEFAULT_FLOW_ENTRIES
    """Capacity of each of the two in-kernel flow maps; beyond it packets go to the ring buffer."""
    filters: list[str] = field(default_factory=list)
    """In-kernel filter rules (collector/filters.py); changeable with set_filters() while running."""
    reader: str = "mmap"
    """Ring-buffer consumer: mmap (bulk, collector/ringbuf.py) or callback (BCC's, one call per record)."""
    dns_ports: list[int] = field(default_factory=lambda: list(DEFAULT_DNS_PORTS))
    """UDP/TCP ports whose payload is decoded as DNS (in the kernel's copy decision and in user space)."""
    payload_bytes: int = PAYLOAD_BYTES
    """Payload bytes copied per app-layer candidate (bpf HDRLOG_PAYLOAD_BYTES; 0 = none)."""
    attach: str = "auto"
    """tcx (links, Linux 6.6+), tc (cls_bpf filters) or auto (tcx where the kernel has it)."""
    conn: connmod.ConnConfig = field(default_factory=connmod.ConnConfig)
    """auto mode: connection map size, interim interval, inactivity timeouts, linger."""
    host: str = ""
    """The host name connection uids are derived from (default: the hostname)."""

    def validate(self) -> None:
        if not self.ifaces:
            raise ValueError("capture ifaces: at least one interface name or glob is required")
        for name in self.ifaces:
            if not isinstance(name, str) or not name or len(name) > 15 and not (_GLOB_CHARS & set(name)):
                raise ValueError(f"capture ifaces: {name!r} is not an interface name or glob")
        if not isinstance(self.ringbuf_bytes, int) or self.ringbuf_bytes < PAGE_SIZE or self.ringbuf_bytes > 1 << 30:
            raise ValueError(
                f"capture ringbuf_bytes={self.ringbuf_bytes!r}: must be an integer from {PAGE_SIZE} to {1 << 30}"
            )
        if not isinstance(self.sample_rate, int) or self.sample_rate < 0:
            raise ValueError(f"capture sample_rate={self.sample_rate!r}: must be an integer >= 0")
        if self.mode not in MODES:
            raise ValueError(f"capture mode={self.mode!r}: must be one of {', '.join(MODES)}")
        if self.mode == "packets" and self.sample_rate == 0:
            pass
        if not isinstance(self.first_packets, int) or not 0 <= self.first_packets <= 1 << 20:
            raise ValueError(f"capture first_packets={self.first_packets!r}: must be an integer from 0 to {1 << 20}")
        if not isinstance(self.flow_entries, int) or not 16 <= self.flow_entries <= 1 << 24:
            raise ValueError(f"capture flow_entries={self.flow_entries!r}: must be an integer from 16 to {1 << 24}")
        if not isinstance(self.conn.entries, int) or not 16 <= self.conn.entries <= 1 << 24:
            raise ValueError(f"capture conn entries={self.conn.entries!r}: must be an integer from 16 to {1 << 24}")
        if self.attach not in ATTACH_KINDS:
            raise ValueError(f"capture attach={self.attach!r}: must be one of {', '.join(ATTACH_KINDS)}")
        if self.reader not in READERS:
            raise ValueError(f"capture reader={self.reader!r}: must be one of {', '.join(READERS)}")
        filterlang.parse_rules(self.filters)
        if not isinstance(self.dns_ports, (list, tuple)) or len(self.dns_ports) > MAX_DNS_PORTS or not all(
            isinstance(p, int) and 1 <= p <= 65535 for p in self.dns_ports
        ):
            raise ValueError(f"capture dns_ports={self.dns_ports!r}: at most {MAX_DNS_PORTS} port numbers 1-65535")
        if (not isinstance(self.payload_bytes, int) or not 0 <= self.payload_bytes <= MAX_PAYLOAD_BYTES
                or self.payload_bytes % PAYLOAD_CHUNK):
            raise ValueError(f"capture payload_bytes={self.payload_bytes!r}: must be a multiple of "
                             f"{PAYLOAD_CHUNK} from 0 to {MAX_PAYLOAD_BYTES}")

    @property
    def effective_sample(self) -> int:
        """The 1:N the kernel applies (0 = none of the rest, in auto mode)."""
        if self.mode == "auto" and self.sample_rate == 1:
            return DEFAULT_AUTO_SAMPLE
        return self.sample_rate

    @property
    def ringbuf_pages(self) -> int:
        pages = max(1, -(-self.ringbuf_bytes // PAGE_SIZE))
        return 1 << (pages - 1).bit_length()


def cflags(config: CaptureConfig) -> list[str]:
    """Compiler flags for bpf/hdrlog.c under this config."""
    ports = sorted(set(config.dns_ports))
    is_dns = "||".join(f"(p)=={p}" for p in ports) or "0"
    return [
        f"-I{SOURCE_DIR}",
        f"-DHDRLOG_RINGBUF_PAGES={config.ringbuf_pages}",
        f"-DHDRLOG_FLOW_ENTRIES={config.flow_entries}",
        f"-DHDRLOG_CONN_ENTRIES={config.conn.entries}",
        f"-DHDRLOG_PAYLOAD_BYTES={config.payload_bytes}",
        f"-DHDRLOG_PAYLOAD_CHUNK={PAYLOAD_CHUNK}",
        f"-DHDRLOG_IS_DNS_PORT(p)=({is_dns})",
        "-Wno-macro-redefined",
    ]


def render_source(config: CaptureConfig | None = None) -> str:
    """The C the collector compiles, with its cflags (BCC tools' --ebpf flag)."""
    config = config or CaptureConfig(ifaces=["*"])
    headers = "".join(f"// ---- {h} ----\n{(Path(SOURCE_DIR) / h).read_text()}\n" for h in HEADERS)
    return f"// cflags: {' '.join(cflags(config))}\n{headers}// ---- {BPF_SOURCE.name} ----\n{BPF_SOURCE.read_text()}"


def resolve_ifaces(patterns: list[str], links: dict[str, int]) -> list[tuple[str, int]]:
    """Names and globs -> [(name, ifindex)], in pattern order, without duplicates.

    A literal name that does not exist is a ValueError naming it. A glob matching nothing is
    a warning (``--iface eth0 --iface 'veth*'`` on a host without containers yet is normal),
    unless nothing at all matches: that is a ValueError naming every pattern.
    """
    out: dict[str, int] = {}
    empty: list[str] = []
    for pat in patterns:
        if _GLOB_CHARS & set(pat):
            hits = sorted(n for n in links if fnmatch.fnmatchcase(n, pat))
            if not hits:
                empty.append(pat)
            for n in hits:
                out.setdefault(n, links[n])
        else:
            if pat not in links:
                raise ValueError(f"capture ifaces: interface {pat!r} does not exist")
            out.setdefault(pat, links[pat])
    have = ", ".join(sorted(links))
    if empty and not out:
        raise ValueError(f"capture ifaces: glob {empty[0]!r} matches no interface (have: {have})")
    for pat in empty:
        log.warning("capture ifaces: glob %r matches no interface now (have: %s); interfaces that appear later "
                    "are captured after a restart of the collector", pat, have)
    return list(out.items())


def mono_to_wall_offset_ns() -> int:
    """UTC ns minus CLOCK_MONOTONIC ns, from the tightest of a few sandwiched reads."""
    best = None
    for _ in range(5):
        m1 = time.monotonic_ns()
        w = time.time_ns()
        m2 = time.monotonic_ns()
        if best is None or m2 - m1 < best[0]:
            best = (m2 - m1, w - (m1 + m2) // 2)
    return best[1]


class _CallbackReader:
    """Ring-buffer consumer through BCC's per-record callback: copies raw bytes out."""

    def __init__(self, bpf, map_name: str):
        self._bpf = bpf
        self._chunks: list[bytes] = []
        self._payloads: list[tuple[int, bytes]] = []
        self._odd = 0  # records shorter than the fixed header (should stay 0)
        chunks = self._chunks
        payloads = self._payloads
        size = records.RECORD_SIZE
        string_at = ctypes.string_at

        def on_record(_ctx, data, n):
            if n == size:
                chunks.append(string_at(data, size))
            elif n > size:
                payloads.append((len(chunks), string_at(data + size, n - size)))
                chunks.append(string_at(data, size))
            else:
                self._odd += 1
            return 0

        self._cb = on_record  # keep a reference: BCC holds only a C pointer
        bpf[map_name.encode()].open_ring_buffer(on_record)

    def read(self, timeout_ms: int) -> tuple[bytes, int, list[tuple[int, bytes]]]:
        """(fixed headers joined, how many, [(index, payload bytes)]) of what arrived."""
        self._bpf.ring_buffer_poll(timeout_ms)
        if not self._chunks:
            return b"", 0, []
        raw = b"".join(self._chunks)
        n = len(self._chunks)
        payloads = list(self._payloads)
        self._chunks.clear()
        self._payloads.clear()
        return raw, n, payloads


class _BulkReader:
    """Ring-buffer consumer without a Python call per record (collector/ringbuf.py)."""

    def __init__(self, bpf, map_name: str):
        self._rb = RingBufReader(bpf[map_name.encode()].map_fd, records.RECORD_SIZE)

    @property
    def _odd(self) -> int:
        return self._rb.odd

    def read(self, timeout_ms: int) -> tuple[bytes, int, list[tuple[int, bytes]]]:
        return self._rb.read(timeout_ms)

    def close(self) -> None:
        self._rb.close()


class Capture:
    """The TC classifier on a set of interfaces; ``start()`` / ``poll()`` / ``stop()``."""

    def __init__(self, config: CaptureConfig):
        self.config = config
        self._bpf = None
        self._reader: _CallbackReader | None = None
        self._fns: dict[str, object] = {}
        self._attached: list[tuple[str, int, str]] = []  # (ifname, ifindex, direction)
        self._attach_kind = config.attach  # "auto" until the first attach decides
        self._link_fds: dict[tuple[int, str], int] = {}  # tcx link fds by (ifindex, direction)
        self._keeper: handover.Keeper | None = None  # set when systemd keeps our fds across restarts
        self._pending: list[tuple] = []  # records a predecessor left in its ring buffer, for poll()
        self._inherited_flows: list[tuple[np.ndarray, np.ndarray]] = []  # and its flows
        self._inherited_counts: dict[str, int] = {}  # and what it saw after its last report
        self._kernel_counters: dict[str, int] = {}  # this program's counters at the last reading
        self._created_clsact: set[int] = set()
        self._ifnames: dict[int, str] = {}
        self._offset_ns = 0
        self._offset_at = 0
        self._lock = threading.Lock()
        self._final_counters: dict[str, int] | None = None
        self._polled = 0
        self._reassembly = appdecode.Reassembly()  # TLS hellos over two segments, across polls
        self._names = namesmod.Names()  # issue 14: DNS rtt, passive DNS, connection names (collector/names.py)
        self._cfg_leaf = None  # Python-side copy of the BPF cfg entry (bpf/flows.h struct hdrlog_cfg)
        self._flow_drain: flowmod.FlowDrain | None = None
        self._fallback: list = []  # records with LOG_FLOW_FALLBACK, for the next drain_flows()
        self._final_flows: tuple | None = None
        self._conn_drain: connmod.ConnDrain | None = None
        self._final_conns: dict[str, object] | None = None
        self.filter_rules: list[filterlang.Rule] = filterlang.parse_rules(config.filters)

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Compile, resolve interfaces, attach to ingress and egress of each."""
        if self._bpf is not None:
            raise RuntimeError("capture already started")
        self.config.validate()
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            links = {l.get_attr("IFLA_IFNAME"): l["index"] for l in ipr.get_links()}
            targets = resolve_ifaces(self.config.ifaces, links)
        try:
            from bcc import BPF
        except ImportError as e:  # pragma: no cover - environment problem
            raise RuntimeError("unable to initialize capture: BCC (python3-bpfcc) is not importable") from e
        try:
            bpf = BPF(src_file=str(BPF_SOURCE).encode(), cflags=cflags(self.config))
        except Exception as e:
            raise RuntimeError(f"unable to initialize capture: compiling {BPF_SOURCE.name} failed: {e}") from e
        self._bpf = bpf
        self._final_counters = None
        inheritance = handover.Inheritance.from_service_manager() if fdstore.available() else None
        try:
            if inheritance:  # a predecessor's links where we will not put ours: detach them first
                ours = {(idx, d) for _, idx in targets for d in PARENTS} if self.config.attach != "tc" else set()
                gone = inheritance.release_links_except(ours)
                if gone:
                    log.info("capture: detached the previous collector's classifier from %s (not ours to keep)",
                             ", ".join(f"ifindex {i} {d}" for i, d in gone))
            for direction, prog in PROG_NAMES.items():
                self._fns[direction] = bpf.load_func(prog.encode(), BPF.SCHED_CLS)
            self._init_maps(links)
            if self.config.reader == "mmap":
                self._reader = _BulkReader(bpf, "records")
            else:
                self._reader = _CallbackReader(bpf, "records")
            self._refresh_offset(force=True)
            if fdstore.available() and self.config.attach != "tc":
                # Our maps go to the store before any link runs the program that fills them.
                self._keeper = handover.Keeper(inheritance.next_gen if inheritance else 1)
                if not self._keeper.keep_maps({n: bpf[n.encode()].map_fd for n in handover.MAPS}):
                    self._keeper.close()
                    self._keeper = None
            with IPRoute() as ipr:
                for name, idx in targets:
                    self._attach(ipr, name, idx, inheritance)
            if inheritance:
                self._adopt(inheritance)
        except BaseException:
            self._teardown()
            raise
        # A collector that exits without stop() must not leave filters behind.
        atexit.register(self.stop)
        log.info("capture attached to %s", ", ".join(f"{n} {d}" for n, d in self.attachments))

    def stop(self) -> None:
        """Detach our filters, remove clsact qdiscs we created, free BPF. Idempotent.

        Under systemd with our links in its fd store, nothing is detached: the
        program keeps capturing for the next collector (handover.py), and
        systemd detaches it by closing the links if the service stays stopped.
        """
        with self._lock:
            self._teardown()
        atexit.unregister(self.stop)

    # -- reading --------------------------------------------------------------

    def poll(self, timeout_ms: int) -> dict[str, object] | None:
        """Packet columns for what the ring buffer holds (waiting up to timeout_ms), or None."""
        with self._lock:
            if self._reader is None:
                raise RuntimeError("capture is not started")
            raw, n, payloads = self._pending.pop(0) if self._pending else self._reader.read(timeout_ms)
            if not n:
                return None
            self._polled += n
            self._refresh_offset()
            missing = {int(i) for i in records.as_records(raw, n)["ifindex"]} - self._ifnames.keys()
            if missing:
                self._refresh_ifnames()
            rec = records.as_records(raw, n)
            why = rec["log_reason"]
            fallback = (why & records.LOG_FLOW_FALLBACK) != 0
            if fallback.any():  # the flow map was full: these packets are counted into flows here
                self._fallback.append(rec[fallback].copy())
                keep = (why & (0xFF ^ records.LOG_FLOW_FALLBACK)) != 0
                if not keep.all():
                    if not keep.any():
                        return None
                    idx = np.flatnonzero(keep)
                    remap = {int(j): i for i, j in enumerate(idx)}
                    payloads = [(remap[i], b) for i, b in payloads if i in remap]
                    raw = rec[keep].tobytes()
                    n = len(idx)
                    rec = records.as_records(raw, n)
                    why = rec["log_reason"]
            out = records.decode(raw, n, self._ifnames, self._offset_ns, 1,
                                 payloads=payloads, dns_ports=self.config.dns_ports, reassembly=self._reassembly,
                                 names_state=self._names)
            sampled = (why & records.LOG_SAMPLED) != 0
            if sampled.any():  # a sampled record stands for N packets, unless it is notable anyway
                rate = np.ones(n, dtype=np.uint32)
                # (a conn-map-full fallback, LOG_CONN_FALLBACK, stands for itself too)
                alone = records.LOG_NOTABLE | records.LOG_CONN_FALLBACK
                rate[sampled & ((why & alone) == 0)] = max(1, self.config.effective_sample)
                out["sample_rate"] = rate.astype(out["sample_rate"].dtype)
            return out

    def drain_flows(self) -> dict[str, object] | None:
        """``flows`` columns for the interval that just ended (kernel maps + fallback records), or None.

        Flips the live flow map, waits a grace period, empties the other one in
        bulk. After stop() it returns what the final drain found, once.
        """
        with self._lock:
            if self._bpf is None:
                final, self._final_flows = self._final_flows, None
                if final is None:
                    return None
                keys, vals = final
            else:
                if self._flow_drain is None and not self._inherited_flows:
                    return None
                keys, vals = self._flow_drain.drain() if self._flow_drain else flowmod.empty()
                keys, vals = self._with_fallback(keys, vals)
            if not len(keys):
                return None
            self._refresh_offset()
            if {int(i) for i in keys["ifindex"]} - self._ifnames.keys():
                self._refresh_ifnames()
            return flowmod.flow_columns(keys, vals, self._ifnames, self._offset_ns)

    def drain_connections(self) -> dict[str, object] | None:
        """``connections`` rows due now (interim rows of open connections, final rows of ended
        or idle ones), or None. After stop() it returns the final rows of the rest, once."""
        with self._lock:
            if self._bpf is None:
                final, self._final_conns = self._final_conns, None
                return final
            if self._conn_drain is None:
                return None
            self._refresh_offset()
            return self._conn_poll(finish=False)

    @property
    def connection_rows(self) -> tuple[int, int]:
        """(interim, final) connection rows written so far."""
        d = self._conn_drain or getattr(self, "_conn_drain_done", None)
        return (d.interim_rows, d.final_rows) if d else (0, 0)

    def _conn_poll(self, finish: bool) -> dict[str, object] | None:
        assert self._conn_drain is not None
        now = time.monotonic_ns()
        try:
            cols = self._conn_drain.poll(now, self._ifnames, self._offset_ns, finish=finish)
        except OSError as e:  # never let a map read stop the capture
            log.warning("capture: connection map read failed: %s", e)
            return None
        if cols:
            self._names.annotate(cols)  # names: resp_name, tls_sni, tls_alpn, ja4, http_host
        return cols

    def drain_dns_names(self) -> dict[str, object] | None:
        """``dns_names`` rows (passive DNS) seen since the last call, or None (collector/names.py)."""
        with self._lock:
            return self._names.drain_dns_names()

    def set_filters(self, rules) -> None:
        """Replace the in-kernel filters while running (expressions or text; see collector/filters.py)."""
        parsed = filterlang.parse_rules(rules)
        with self._lock:
            self.filter_rules = parsed
            if self._bpf is not None:
                self._apply_filters()
        log.info("capture filters now: %s", "; ".join(map(str, parsed)) or "none (everything passes)")

    def counters(self, reported: bool = False) -> dict[str, int]:
        """Cumulative counts: seen, logged, ringbuf_full, truncated, payload, polled, and the
        TLS reassembly's tls_reassembled, tls_reassembly_evicted, tls_reassembly_mismatched.

        ``reported=True``: these values go into a collector_stats row; a successor
        that takes the capture over reports only what the kernel counts after them.
        """
        with self._lock:
            out = self._read_counters()
            out.update(self._reassembly.counters())
            out.update(self._names.counters())
            if reported and self._keeper is not None and self._bpf is not None:
                self._keeper.write_state(self._kernel_counters)
            return out

    @property
    def attachments(self) -> list[tuple[str, str]]:
        return [(name, direction) for name, _, direction in self._attached]

    def render_source(self) -> str:
        return render_source(self.config)

    # -- internals ------------------------------------------------------------

    def _init_maps(self, links: dict[str, int]) -> None:
        bpf = self._bpf
        outer = bpf[b"flow_maps"]
        for slot in (0, 1):
            outer[ctypes.c_int(slot)] = ctypes.c_int(bpf[f"flows{slot}".encode()].map_fd)
        table = bpf[b"cfg"]
        leaf = table.Leaf()
        leaf.mode = MODES[self.config.mode]
        leaf.sample_n = self.config.effective_sample
        leaf.first_packets = self.config.first_packets
        leaf.flow_slot = 0
        self._cfg_leaf = leaf
        self._links = links
        self._apply_filters()
        if self.config.mode != "packets":
            self._flow_drain = flowmod.FlowDrain(bpf, self._set_flow_slot, self.config.flow_entries)
        if self.config.mode == "auto":
            import socket

            self._conn_drain = connmod.ConnDrain(bpf[b"conns"].map_fd, self.config.conn,
                                                 self.config.host or socket.gethostname())

    def _write_cfg(self) -> None:
        table = self._bpf[b"cfg"]
        table[table.Key(0)] = self._cfg_leaf

    def _set_flow_slot(self, slot: int) -> None:
        self._cfg_leaf.flow_slot = slot
        self._write_cfg()

    def _apply_filters(self) -> None:
        links = getattr(self, "_links", None) or {}
        if any(r.what == "iface" for r in self.filter_rules):
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                links = {l.get_attr("IFLA_IFNAME"): l["index"] for l in ipr.get_links()}
        tables = filterlang.compile_rules(self.filter_rules, links)
        tables.apply(self._bpf, self._cfg_leaf)
        self._write_cfg()

    def _with_fallback(self, keys, vals):
        """Add the flows of fallback records and those a predecessor left."""
        parts = [(keys, vals), *self._inherited_flows]
        self._inherited_flows.clear()
        if self._fallback:
            parts.append(flowmod.from_records(np.concatenate(self._fallback)))
            self._fallback.clear()
        if len(parts) == 1:
            return keys, vals
        return np.concatenate([k for k, _ in parts]), np.concatenate([v for _, v in parts])

    def _read_counters(self) -> dict[str, int]:
        if self._bpf is None:
            out = dict(self._final_counters or {n: 0 for n in records.COUNTER_NAMES})
        else:
            self._kernel_counters = handover.read_counters(self._bpf[b"counters"].map_fd)
            out = {n: v + self._inherited_counts.get(n, 0) for n, v in self._kernel_counters.items()}
        out["polled"] = self._polled
        return out

    def _adopt(self, inheritance: handover.Inheritance) -> None:
        """Read what the predecessors' programs left, now that ours runs in their links."""
        time.sleep(flowmod.DEFAULT_GRACE)  # a CPU still in an old program finishes its packet
        got_records = got_flows = 0
        for gen in inheritance.generations:
            state = gen.state()
            if state.get("layout") != handover.LAYOUT_ID:
                log.warning("capture: the previous collector (generation %d) wrote another record layout: "
                            "what it left in the kernel is not read", gen.gen)
                gen.release()
                continue
            reported = state.get("reported") or {}
            for name, value in gen.counters().items():
                self._inherited_counts[name] = self._inherited_counts.get(name, 0) + max(0, value - reported.get(name, 0))
            chunks, odd = gen.drain_records()
            if odd:  # should stay 0: the layout id matched
                log.warning("capture: %d records the previous collector left were of another size: skipped", odd)
            self._pending.extend(chunks)
            got_records += sum(n for _, n, _ in chunks)
            keys, vals = gen.drain_flows()
            if len(keys):
                self._inherited_flows.append((keys, vals))
                got_flows += len(keys)
            gen.release()
        log.info("capture: took over from the previous collector without a gap: %d records and %d flows it "
                 "left in the kernel, %d packets it saw after its last report", got_records, got_flows,
                 self._inherited_counts.get("seen", 0))

    def _refresh_offset(self, force: bool = False) -> None:
        now = time.monotonic_ns()
        if force or now - self._offset_at > MONO_OFFSET_REFRESH_NS:
            self._offset_ns = mono_to_wall_offset_ns()
            self._offset_at = now

    def _refresh_ifnames(self) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for l in ipr.get_links():
                self._ifnames[l["index"]] = l.get_attr("IFLA_IFNAME")

    def _attach(self, ipr, name: str, idx: int, inheritance: handover.Inheritance | None = None) -> None:
        self._ifnames[idx] = name
        if self._attach_kind != "tc":
            for direction in PARENTS:
                try:
                    self._attach_link(idx, direction, inheritance)
                except OSError as e:
                    if self._attach_kind == "tcx" or self._link_fds or not bpfsys.unsupported(e):
                        raise RuntimeError(f"unable to attach to {name} {direction}: {e}") from e
                    log.warning("capture: this kernel has no tcx links (Linux 6.6+): attaching as tc filters, "
                                "and a restart will miss the packets that pass meanwhile")
                    self._attach_kind = "tc"
                    if self._keeper is not None:
                        self._keeper.forget()
                        self._keeper = None
                    break
                self._attach_kind = "tcx"
                self._attached.append((name, idx, direction))
            else:
                return
        if not _has_clsact(ipr, idx):
            try:
                ipr.tc("add", "clsact", idx)
                self._created_clsact.add(idx)
            except Exception as e:
                if getattr(e, "code", None) != errno.EEXIST:
                    raise RuntimeError(f"unable to add a clsact qdisc to {name}: {e}") from e
        for direction, parent in PARENTS.items():
            fn = self._fns[direction]
            try:
                ipr.tc(
                    "add-filter",
                    "bpf",
                    idx,
                    TC_HANDLE,
                    fd=fn.fd,
                    name=fn.name.decode() if isinstance(fn.name, bytes) else fn.name,
                    parent=parent,
                    prio=TC_PRIO,
                    classid=1,
                    direct_action=True,
                )
            except Exception as e:
                hint = ""
                if getattr(e, "code", None) == errno.EEXIST:
                    if _take_over_orphan(ipr, idx, direction):  # left by a killed collector (orphans.py)
                        self._attach_one(ipr, idx, direction, parent, fn)
                        self._attached.append((name, idx, direction))
                        continue
                    hint = f" (prio {TC_PRIO} handle {TC_HANDLE:#x} is taken: another hdrlog collector on it?)"
                raise RuntimeError(f"unable to attach to {name} {direction}: {e}{hint}") from e
            self._attached.append((name, idx, direction))

    def _attach_link(self, idx: int, direction: str, inheritance: handover.Inheritance | None) -> None:
        """Attach through a tcx link: the predecessor's, with our program swapped in, or a new one."""
        fd = self._fns[direction].fd
        link = inheritance.take_link(idx, direction) if inheritance else None
        if link is not None:
            self._link_fds[(idx, direction)] = link
            bpfsys.link_update(link, fd)  # atomic: each packet sees the old program or ours
            return
        link = bpfsys.link_create(fd, idx, direction)
        self._link_fds[(idx, direction)] = link
        if self._keeper is not None:
            self._keeper.keep_link(idx, direction, link)

    @staticmethod
    def _attach_one(ipr, idx: int, direction: str, parent, fn) -> None:
        ipr.tc("add-filter", "bpf", idx, TC_HANDLE, fd=fn.fd,
               name=fn.name.decode() if isinstance(fn.name, bytes) else fn.name,
               parent=parent, prio=TC_PRIO, classid=1, direct_action=True)

    def _teardown(self) -> None:
        handing_over = self._keeper is not None and bool(self._link_fds)
        self._detach()
        if self._bpf is not None:
            try:
                self._final_counters = self._read_counters()
                self._final_counters.pop("polled", None)
                if handing_over:
                    self._keeper.write_state(self._kernel_counters)
            except Exception:  # pragma: no cover
                pass
            if self._flow_drain is not None:
                try:
                    # Detached: nothing writes the maps any more. Handing over: the program still
                    # does, so take the interval so far and leave the live map to the successor.
                    keys, vals = self._flow_drain.drain() if handing_over else self._flow_drain.drain_all()
                    self._final_flows = self._with_fallback(keys, vals)
                except Exception as e:  # pragma: no cover
                    log.warning("capture: final flow drain failed: %s", e)
                self._flow_drain = None
            if self._conn_drain is not None:
                # Connections are not handed over yet (see collector/handover.py): every open one
                # gets its final row now, and a successor starts it afresh as a new connection.
                try:
                    self._final_conns = self._conn_poll(finish=True)
                except Exception as e:  # pragma: no cover
                    log.warning("capture: final connection drain failed: %s", e)
                self._conn_drain_done = self._conn_drain
                self._conn_drain = None
            if handing_over:
                log.info("capture: left running in the kernel for the next collector (systemd keeps it; "
                         "a stop for good detaches it)")
            if self._reader is not None and hasattr(self._reader, "close"):
                self._reader.close()
            self._reader = None
            self._fns.clear()
            try:
                self._bpf.cleanup()
            finally:
                self._bpf = None
        if self._keeper is not None:
            self._keeper.close()
            self._keeper = None
        self._pending.clear()

    def _detach(self) -> None:
        """Close our tcx links (detaching them unless systemd keeps copies) and remove our tc filters."""
        for fd in self._link_fds.values():
            os.close(fd)
        self._link_fds.clear()
        if self._attach_kind == "tcx" or not (self._attached or self._created_clsact):
            self._attached.clear()
            return
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for name, idx, direction in reversed(self._attached):
                try:
                    _del_own_filter(ipr, idx, direction)
                except Exception as e:  # interface gone, or someone removed it
                    log.warning("capture: unable to detach from %s %s: %s", name, direction, e)
            self._attached.clear()
            for idx in sorted(self._created_clsact):
                try:
                    if not _filters(ipr, idx, "ingress") and not _filters(ipr, idx, "egress"):
                        ipr.tc("del", "clsact", idx)
                    else:
                        log.info("capture: leaving clsact on ifindex %d, other filters use it", idx)
                except Exception as e:
                    if getattr(e, "code", None) not in (errno.ENODEV, errno.EINVAL, errno.ENOENT):
                        log.warning("capture: unable to remove clsact from ifindex %d: %s", idx, e)
            self._created_clsact.clear()


def _has_clsact(ipr, idx: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=idx))


def _filters(ipr, idx: int, direction: str) -> list:
    """Filter entries (with options) on one clsact hook; [] if none or no clsact."""
    try:
        msgs = ipr.get_filters(index=idx, parent=PARENTS[direction])
    except Exception as e:
        if getattr(e, "code", None) in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
            return []
        raise
    return [m for m in msgs if m.get_attr("TCA_KIND")]


def _is_ours(msg, direction: str) -> bool:
    if msg.get_attr("TCA_KIND") != "bpf" or msg["handle"] != TC_HANDLE or (msg["info"] >> 16) != TC_PRIO:
        return False
    opts = msg.get_attr("TCA_OPTIONS")
    name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
    return name is None or str(name).startswith(PROG_NAMES[direction])


def _take_over_orphan(ipr, idx: int, direction: str) -> bool:
    """Delete our prio/handle's filter when no live process holds its program; True if done."""
    from hdrlog.collector.orphans import is_orphan

    for msg in _filters(ipr, idx, direction):
        if _is_ours(msg, direction) and is_orphan(idx, direction, TC_PRIO, TC_HANDLE):
            ipr.tc("del-filter", "bpf", idx, TC_HANDLE, parent=PARENTS[direction], prio=TC_PRIO)
            return True
    return False


def _del_own_filter(ipr, idx: int, direction: str) -> None:
    for msg in _filters(ipr, idx, direction):
        if _is_ours(msg, direction):
            ipr.tc("del-filter", "bpf", idx, TC_HANDLE, parent=PARENTS[direction], prio=TC_PRIO)
            return
