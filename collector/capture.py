"""Capture component: the TC classifier (bpf/hdrlog.c) on chosen interfaces.

``Capture(config)`` is inert; ``start()`` compiles the C through BCC, resolves the
interface names and globs, creates a clsact qdisc where none exists, and attaches
the classifier to ingress and egress of each interface (rolling everything back if
any step fails). ``poll()`` returns what the ring buffer holds as ``packets``
columns; ``stop()`` detaches only the filters this component added (matched by
prio, handle and program name) and removes a clsact qdisc only if it created it
and nothing else is attached to it.

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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hdrlog.bpf import SOURCE_DIR
from hdrlog.collector import records
from hdrlog.collector.appdecode import DEFAULT_DNS_PORTS

log = logging.getLogger(__name__)

BPF_SOURCE = Path(SOURCE_DIR) / "hdrlog.c"
TYPES_HEADER = Path(SOURCE_DIR) / "types.h"

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

# Payload copy (bpf/types.h HDRLOG_PAYLOAD_*): a TLS ClientHello's SNI can sit
# several hundred bytes in (long key shares, shuffled extensions), DNS names up
# to ~270; see scripts/bench_payload_copy.py for what the copy costs.
PAYLOAD_BYTES = 1024
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
    """Written into the sample_rate column (real sampling is a later issue)."""
    dns_ports: list[int] = field(default_factory=lambda: list(DEFAULT_DNS_PORTS))
    """UDP/TCP ports whose payload is decoded as DNS (in the kernel's copy decision and in user space)."""
    payload_bytes: int = PAYLOAD_BYTES
    """Payload bytes copied per app-layer candidate (bpf HDRLOG_PAYLOAD_BYTES; 0 = none)."""

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
        if not isinstance(self.sample_rate, int) or self.sample_rate < 1:
            raise ValueError(f"capture sample_rate={self.sample_rate!r}: must be an integer >= 1")
        if not isinstance(self.dns_ports, (list, tuple)) or len(self.dns_ports) > MAX_DNS_PORTS or not all(
            isinstance(p, int) and 1 <= p <= 65535 for p in self.dns_ports
        ):
            raise ValueError(f"capture dns_ports={self.dns_ports!r}: at most {MAX_DNS_PORTS} port numbers 1-65535")
        if (not isinstance(self.payload_bytes, int) or not 0 <= self.payload_bytes <= MAX_PAYLOAD_BYTES
                or self.payload_bytes % PAYLOAD_CHUNK):
            raise ValueError(f"capture payload_bytes={self.payload_bytes!r}: must be a multiple of "
                             f"{PAYLOAD_CHUNK} from 0 to {MAX_PAYLOAD_BYTES}")

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
        f"-DHDRLOG_PAYLOAD_BYTES={config.payload_bytes}",
        f"-DHDRLOG_PAYLOAD_CHUNK={PAYLOAD_CHUNK}",
        f"-DHDRLOG_IS_DNS_PORT(p)=({is_dns})",
        "-Wno-macro-redefined",
    ]


def render_source(config: CaptureConfig | None = None) -> str:
    """The C the collector compiles, with its cflags (BCC tools' --ebpf flag)."""
    config = config or CaptureConfig(ifaces=["*"])
    return (
        f"// cflags: {' '.join(cflags(config))}\n"
        f"// ---- {TYPES_HEADER.name} ----\n{TYPES_HEADER.read_text()}\n"
        f"// ---- {BPF_SOURCE.name} ----\n{BPF_SOURCE.read_text()}"
    )


def resolve_ifaces(patterns: list[str], links: dict[str, int]) -> list[tuple[str, int]]:
    """Names and globs -> [(name, ifindex)], in pattern order, without duplicates.

    A literal name that does not exist, or a glob matching nothing, is a ValueError
    naming it.
    """
    out: dict[str, int] = {}
    for pat in patterns:
        if _GLOB_CHARS & set(pat):
            hits = sorted(n for n in links if fnmatch.fnmatchcase(n, pat))
            if not hits:
                raise ValueError(f"capture ifaces: glob {pat!r} matches no interface (have: {', '.join(sorted(links))})")
            for n in hits:
                out.setdefault(n, links[n])
        else:
            if pat not in links:
                raise ValueError(f"capture ifaces: interface {pat!r} does not exist")
            out.setdefault(pat, links[pat])
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


class Capture:
    """The TC classifier on a set of interfaces; ``start()`` / ``poll()`` / ``stop()``."""

    def __init__(self, config: CaptureConfig):
        self.config = config
        self._bpf = None
        self._reader: _CallbackReader | None = None
        self._fns: dict[str, object] = {}
        self._attached: list[tuple[str, int, str]] = []  # (ifname, ifindex, direction)
        self._created_clsact: set[int] = set()
        self._ifnames: dict[int, str] = {}
        self._offset_ns = 0
        self._offset_at = 0
        self._lock = threading.Lock()
        self._final_counters: dict[str, int] | None = None
        self._polled = 0

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
        try:
            for direction, prog in PROG_NAMES.items():
                self._fns[direction] = bpf.load_func(prog.encode(), BPF.SCHED_CLS)
            self._reader = _CallbackReader(bpf, "records")
            self._refresh_offset(force=True)
            with IPRoute() as ipr:
                for name, idx in targets:
                    self._attach(ipr, name, idx)
        except BaseException:
            self._teardown()
            raise
        # A collector that exits without stop() must not leave filters behind.
        atexit.register(self.stop)
        log.info("capture attached to %s", ", ".join(f"{n} {d}" for n, d in self.attachments))

    def stop(self) -> None:
        """Detach our filters, remove clsact qdiscs we created, free BPF. Idempotent."""
        with self._lock:
            self._teardown()
        atexit.unregister(self.stop)

    # -- reading --------------------------------------------------------------

    def poll(self, timeout_ms: int) -> dict[str, object] | None:
        """Packet columns for what the ring buffer holds (waiting up to timeout_ms), or None."""
        with self._lock:
            if self._reader is None:
                raise RuntimeError("capture is not started")
            raw, n, payloads = self._reader.read(timeout_ms)
            if not n:
                return None
            self._polled += n
            self._refresh_offset()
            missing = {int(i) for i in records.as_records(raw, n)["ifindex"]} - self._ifnames.keys()
            if missing:
                self._refresh_ifnames()
            return records.decode(raw, n, self._ifnames, self._offset_ns, self.config.sample_rate,
                                  payloads=payloads, dns_ports=self.config.dns_ports)

    def counters(self) -> dict[str, int]:
        """Cumulative counts: seen, logged, ringbuf_full, truncated, payload, polled."""
        with self._lock:
            return self._read_counters()

    @property
    def attachments(self) -> list[tuple[str, str]]:
        return [(name, direction) for name, _, direction in self._attached]

    def render_source(self) -> str:
        return render_source(self.config)

    # -- internals ------------------------------------------------------------

    def _read_counters(self) -> dict[str, int]:
        if self._bpf is None:
            out = dict(self._final_counters or {n: 0 for n in records.COUNTER_NAMES})
        else:
            table = self._bpf.get_table(b"counters")
            per_cpu = table.getvalue(table.Key(0))
            out = {
                name: int(sum(cpu.n[i] for cpu in per_cpu))
                for i, name in enumerate(records.COUNTER_NAMES)
            }
        out["polled"] = self._polled
        return out

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

    def _attach(self, ipr, name: str, idx: int) -> None:
        if not _has_clsact(ipr, idx):
            try:
                ipr.tc("add", "clsact", idx)
                self._created_clsact.add(idx)
            except Exception as e:
                if getattr(e, "code", None) != errno.EEXIST:
                    raise RuntimeError(f"unable to add a clsact qdisc to {name}: {e}") from e
        self._ifnames[idx] = name
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
                    hint = f" (prio {TC_PRIO} handle {TC_HANDLE:#x} is taken: another hdrlog collector on it?)"
                raise RuntimeError(f"unable to attach to {name} {direction}: {e}{hint}") from e
            self._attached.append((name, idx, direction))

    def _teardown(self) -> None:
        if self._attached or self._created_clsact:
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
        if self._bpf is not None:
            try:
                self._final_counters = self._read_counters()
                self._final_counters.pop("polled", None)
            except Exception:  # pragma: no cover
                pass
            self._reader = None
            self._fns.clear()
            try:
                self._bpf.cleanup()
            finally:
                self._bpf = None


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


def _del_own_filter(ipr, idx: int, direction: str) -> None:
    for msg in _filters(ipr, idx, direction):
        if _is_ours(msg, direction):
            ipr.tc("del-filter", "bpf", idx, TC_HANDLE, parent=PARENTS[direction], prio=TC_PRIO)
            return
