"""Capture: the TC classifier (bpf/hdrlog.c) on chosen interfaces, the first stage of a record's path.

``Capture(config)`` is inert; ``start()`` compiles the C (bpf/build.py), resolves the
interface names and globs and attaches the classifier to ingress and egress of each
(collector/attach.py), rolling everything back if any step fails. Under systemd it takes
over a predecessor's running classifier and keeps its own in the fd store
(collector/handover.py). ``poll()`` returns what the ring buffer holds (collector/ringbuf.py)
as ``packets`` columns (collector/records.py); ``drain_flows()`` and ``drain_connections()``
the ``flows`` and ``connections`` rows of the in-kernel maps (collector/flows.py,
collector/connections.py); ``stop()`` detaches what this component attached.

About 470 lines, past the ~400 of the others: the component's lifecycle (with what a handover
changes in it) and its three drains, each a few lines that call the stage that owns the work.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from hdrlog.bpf import build
from hdrlog.collector import appdecode, fdstore, handover, names as namesmod, records, ringbuf
from hdrlog.collector import connections as connmod
from hdrlog.collector import filters as filterlang
from hdrlog.collector import flows as flowmod
from hdrlog.collector.appdecode import DEFAULT_DNS_PORTS
from hdrlog.collector.attach import GLOB_CHARS, PARENTS, PROG_NAMES, Attacher, matching_ifaces, resolve_ifaces

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
MONO_OFFSET_REFRESH_NS = 1_000_000_000
# Logging modes (bpf/flows.h MODE_*) and their defaults.
MODES = {"packets": 0, "flows": 1, "auto": 2}
DEFAULT_AUTO_SAMPLE = 100  # auto mode's 1:N for packets that are not notable


@dataclass
class CaptureConfig:
    """What to capture. Plain data, checked where it is read from the user (CollectorConfig.validate);
    ``from_config()`` builds it from a validated CollectorConfig."""

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
    first_packets: int = 3
    """auto mode: log the first N packets of each new flow."""
    flow_entries: int = 65536
    """Capacity of each of the two in-kernel flow maps; beyond it packets go to the ring buffer."""
    filters: list[str] = field(default_factory=list)
    """In-kernel filter rules (collector/filters.py); changeable with set_filters() while running."""
    reader: str = "mmap"
    """Ring-buffer consumer: mmap (bulk, collector/ringbuf.py) or callback (BCC's, one call per record)."""
    dns_ports: list[int] = field(default_factory=lambda: list(DEFAULT_DNS_PORTS))
    """UDP/TCP ports whose payload is decoded as DNS (in the kernel's copy decision and in user space)."""
    tunnels: list[str] = field(default_factory=lambda: list(build.TUNNEL_TYPES))
    """Tunnels opened in the kernel (bpf/tunnel.h): any of vxlan, geneve, gre, ipip; [] = none."""
    vxlan_ports: list[int] = field(default_factory=lambda: list(build.VXLAN_PORTS))
    """UDP destination ports of VXLAN."""
    geneve_ports: list[int] = field(default_factory=lambda: list(build.GENEVE_PORTS))
    """UDP destination ports of Geneve."""
    payload_bytes: int = build.PAYLOAD_BYTES
    """Payload bytes copied per app-layer candidate (bpf HDRLOG_PAYLOAD_BYTES, a multiple of
    build.PAYLOAD_CHUNK up to build.MAX_PAYLOAD_BYTES; 0 = none)."""
    attach: str = "auto"
    """tcx (links, Linux 6.6+), tc (cls_bpf filters) or auto (tcx where the kernel has it)."""
    conn: connmod.ConnConfig = field(default_factory=connmod.ConnConfig)
    """auto mode: connection map size, interim interval, inactivity timeouts, linger."""
    host: str = ""
    """The host name connection uids are derived from (default: the hostname)."""

    @classmethod
    def from_config(cls, config, filters: list[str]) -> "CaptureConfig":
        """From a validated CollectorConfig (and the filter rules read from it and its filter_file)."""
        return cls(
            ifaces=list(config.iface), ringbuf_bytes=config.ringbuf_bytes, sample_rate=config.sample,
            mode=config.mode, first_packets=config.first_packets, flow_entries=config.flow_entries,
            filters=list(filters), reader=config.reader, dns_ports=list(config.dns_ports),
            tunnels=list(config.tunnels), vxlan_ports=list(config.vxlan_ports),
            geneve_ports=list(config.geneve_ports),
            attach=config.attach, host=config.host_id,
            conn=connmod.ConnConfig(entries=config.conn_entries, interim=config.conn_interim,
                                    tcp_timeout=config.conn_tcp_timeout, udp_timeout=config.conn_udp_timeout,
                                    icmp_timeout=config.conn_icmp_timeout, linger=config.conn_linger))

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


def render_source(config: CaptureConfig | None = None) -> str:
    """The C the collector compiles, with its cflags (``--print-bpf``)."""
    return build.render_source(config or CaptureConfig(ifaces=["*"]))


class Capture:
    """The TC classifier on a set of interfaces; ``start()`` / ``poll()`` / ``stop()``."""

    def __init__(self, config: CaptureConfig):
        self.config = config
        self._bpf = None
        self._reader = None  # ringbuf.RingBufReader or ringbuf.CallbackReader
        self._fns: dict[str, object] = {}
        self._attacher = Attacher(config.attach, self._fns)
        self._keeper: handover.Keeper | None = None  # set when systemd keeps our fds across restarts
        self._pending: list[tuple] = []  # records a predecessor left in its ring buffer, for poll()
        self._inherited_flows: list[tuple[np.ndarray, np.ndarray]] = []  # and its flows
        self._inherited_counts: dict[str, int] = {}  # and what it saw after its last report
        self._kernel_counters: dict[str, int] = {}  # this program's counters at the last reading
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
        self._conns_fd: int | None = None  # a predecessor's connection map (handover), ours to close
        self._conn_map_fd = -1  # the connection map the program counts into
        self._final_conns_inherited: dict[str, object] | None = None
        self.filter_rules: list[filterlang.Rule] = filterlang.parse_rules(config.filters)

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Compile, resolve interfaces, attach to ingress and egress of each."""
        if self._bpf is not None:
            raise RuntimeError("capture already started")
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            links = {l.get_attr("IFLA_IFNAME"): l["index"] for l in ipr.get_links()}
            targets = resolve_ifaces(self.config.ifaces, links)
        bpf = build.load(self.config)
        self._bpf = bpf
        self._final_counters = None
        inheritance = handover.Inheritance.from_service_manager() if fdstore.available() else None
        self._conns_fd = inheritance.take_conns() if inheritance else None  # kept open while we run
        try:
            if inheritance:  # a predecessor's links where we will not put ours: detach them first
                ours = {(idx, d) for _, idx in targets for d in PARENTS} if self.config.attach != "tc" else set()
                gone = inheritance.release_links_except(ours)
                if gone:
                    log.info("capture: detached the previous collector's classifier from %s (not ours to keep)",
                             ", ".join(f"ifindex {i} {d}" for i, d in gone))
            for direction, prog in PROG_NAMES.items():
                self._fns[direction] = bpf.load_func(prog.encode(), bpf.SCHED_CLS)
            self._init_maps(links)
            self._reader = ringbuf.open_reader(self.config.reader, bpf, "records", records.RECORD_SIZE)
            self._refresh_offset(force=True)
            if fdstore.available() and self.config.attach != "tc":
                # Our maps go to the store before any link runs the program that fills them.
                self._keeper = handover.Keeper(inheritance.next_gen if inheritance else 1)
                maps = {n: bpf[n.encode()].map_fd for n in handover.MAPS}
                maps["conns"] = self._conn_map_fd  # the one the program counts into: ours or the handed one
                if not self._keeper.keep_maps(maps):
                    self._keeper.close()
                    self._keeper = None
            self._attacher = Attacher(self.config.attach, self._fns,
                                      keep_link=self._keeper.keep_link if self._keeper else None,
                                      on_tc_fallback=self._forget_keeper)
            with IPRoute() as ipr:
                for name, idx in targets:
                    self._ifnames[idx] = name
                    self._attacher.attach(ipr, name, idx, inheritance)
            if self._conns_fd is not None and self._conn_map_fd != self._conns_fd:
                self._final_conns_inherited = self._finish_conns(self._conns_fd)
            if inheritance:
                adopted = handover.adopt(inheritance)
                self._pending.extend(adopted.records)
                self._inherited_flows.extend(adopted.flows)
                for name, value in adopted.counts.items():
                    self._inherited_counts[name] = self._inherited_counts.get(name, 0) + value
        except BaseException:
            self._teardown()
            raise
        # A collector that exits without stop() must not leave filters behind.
        atexit.register(self.stop)
        log.info("capture attached to %s", ", ".join(f"{n} {d}" for n, d in self.attachments))

    def attach_new_interfaces(self) -> tuple[list[str], list[str]]:
        """Follow the --iface globs: attach to interfaces that match one and appeared since the last
        call (a new container's veth), forget the ones that are gone. Returns (attached, gone)."""
        if not any(GLOB_CHARS & set(p) for p in self.config.ifaces):
            return [], []
        from pyroute2 import IPRoute

        attached: list[str] = []
        with IPRoute() as ipr, self._lock:
            if self._bpf is None:
                return [], []
            links = {l.get_attr("IFLA_IFNAME"): l["index"] for l in ipr.get_links()}
            keeper = self._keeper
            gone = self._attacher.forget_missing(set(links.values()),
                                                 keeper.forget_link if keeper is not None else None)
            have = {idx for _, idx, _ in self._attacher.attached}
            for name, idx in matching_ifaces(self.config.ifaces, links).items():
                if idx in have:
                    continue
                self._ifnames[idx] = name
                try:
                    self._attacher.attach(ipr, name, idx)
                except RuntimeError as e:  # gone again already, or not ours to take: try at the next call
                    log.warning("capture: %s", e)
                    continue
                attached.append(name)
            if (attached or gone) and any(r.what == "iface" for r in self.filter_rules):
                self._apply_filters()  # iface rules name indexes: new interfaces get theirs
        if attached:
            log.info("capture: attached to %s (appeared after start)", ", ".join(attached))
        if gone:
            log.info("capture: %s gone (detached with the interface)", ", ".join(gone))
        return attached, gone

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
            fallback, (raw, n, payloads, rec) = records.split_flow_fallback(raw, n, payloads)
            if fallback is not None:  # the flow map was full: these packets are counted into flows here
                self._fallback.append(fallback)
            if not n:
                return None
            if {int(i) for i in rec["ifindex"]} - self._ifnames.keys():
                self._refresh_ifnames()
            out = records.decode(raw, n, self._ifnames, self._offset_ns, 1,
                                 payloads=payloads, dns_ports=self.config.dns_ports, reassembly=self._reassembly,
                                 names_state=self._names)
            rate = records.sample_rates(rec["log_reason"], self.config.effective_sample)
            if rate is not None:
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
            if self._final_conns_inherited is not None:  # a predecessor's map we do not count into
                final, self._final_conns_inherited = self._final_conns_inherited, None
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

    def _finish_conns(self, fd: int) -> dict[str, object] | None:
        """Final rows for every connection in a predecessor's map that this program does not use."""
        drain = connmod.ConnDrain(fd, self.config.conn, self.config.host or socket.gethostname())
        try:
            return drain.poll(time.monotonic_ns(), self._ifnames, self._offset_ns, finish=True)
        except OSError as e:
            log.warning("capture: the previous collector's connection map could not be read: %s", e)
            return None

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

    def map_fill(self) -> dict[str, tuple[int, int]]:
        """(entries, capacity) of the kernel's connection map (at its last read) and flow map (at its
        last drain): how close each is to refusing new entries (conn_map_full, flow_map_full)."""
        out = {}
        if self._conn_drain is not None:
            out["conn"] = (getattr(self._conn_drain, "last_entries", 0), self.config.conn.entries)
        if self._flow_drain is not None:
            out["flow"] = (getattr(self._flow_drain, "last_entries", 0), self.config.flow_entries)
        return out

    @property
    def attachments(self) -> list[tuple[str, str]]:
        return [(name, direction) for name, _, direction in self._attacher.attached]

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
        self._conn_map_fd = bpf[b"conns"].map_fd
        if self._conns_fd is not None and self.config.mode == "auto":
            try:  # the predecessor's map: its open connections go on counting, with their uids
                bpf[b"conn_maps"][ctypes.c_int(0)] = ctypes.c_int(self._conns_fd)
                self._conn_map_fd = self._conns_fd
            except Exception as e:
                log.warning("capture: the previous collector's connection map does not fit this program (%s; "
                            "conn_entries changed?): its open connections get their final rows now", e)
        if self._conn_map_fd != self._conns_fd:
            bpf[b"conn_maps"][ctypes.c_int(0)] = ctypes.c_int(self._conn_map_fd)
        if self.config.mode == "auto":
            self._conn_drain = connmod.ConnDrain(self._conn_map_fd, self.config.conn,
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

    def _forget_keeper(self) -> None:
        """The kernel has no tcx links: nothing to hand over, take our maps out of the fd store."""
        if self._keeper is not None:
            self._keeper.forget()
            self._keeper = None

    def _refresh_offset(self, force: bool = False) -> None:
        now = time.monotonic_ns()
        if force or now - self._offset_at > MONO_OFFSET_REFRESH_NS:
            self._offset_ns = records.mono_to_wall_offset_ns()
            self._offset_at = now

    def _refresh_ifnames(self) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for l in ipr.get_links():
                self._ifnames[l["index"]] = l.get_attr("IFLA_IFNAME")

    def _teardown(self) -> None:
        handing_over = self._keeper is not None and bool(self._attacher.link_fds)
        self._attacher.detach()
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
                # Detached: every open connection gets its final row now. Handing over: only the rows
                # due now; the successor counts on in the same map (handover.py) and ends them.
                try:
                    self._final_conns = self._conn_poll(finish=not handing_over)
                except Exception as e:  # pragma: no cover
                    log.warning("capture: final connection drain failed: %s", e)
                self._conn_drain_done = self._conn_drain
                self._conn_drain = None
            if handing_over:
                log.info("capture: left running in the kernel for the next collector (systemd keeps it; "
                         "a stop for good detaches it)")
            if self._reader is not None:
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
        if self._conns_fd is not None:
            os.close(self._conns_fd)
            self._conns_fd = None
        self._pending.clear()
