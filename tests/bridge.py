"""A user-space delay/loss bridge between two network namespaces, for lab tests.

This kernel has no netem (nor fq/fq_codel), so delay and loss come from here: a small
process in a middle namespace reads every frame from one veth end with an AF_PACKET
socket and sends it out of the other after a fixed one-way delay (order preserved),
unless a loss rule drops it. Everything it does is counted::

    ns A  eth0 198.18.N.1/24 2001:db8:N::1/64 ─ veth ─ [ea  ns M  eb] ─ veth ─ eth0 198.18.N.2 ... ns B
                                               (no IP, promisc, bridge process)

Offloads are off on all four ends (gro/gso/tso and tx checksumming), so frames are
MTU-sized with their checksums filled in and the bridge sees the real segments. The
neighbours are static (no ARP or ND through a lossy bridge).

Use in a test (the fixture tears everything down, also when the test fails)::

    from tests.bridge import bridge_lab, Loss, tcp_payload  # noqa: F401  (bridge_lab: a fixture)

    def test_x(bridge_lab):
        br = bridge_lab.start_bridge(delay=0.020, loss=Loss.every(20, "a>b", match=tcp_payload))
        bridge_lab.run("a", "ping", "-c3", bridge_lab.b.addr4)
        stats = br.stop()     # {"a>b": {"forwarded": ..., "dropped": ..., "bytes": ...}, "b>a": ..., ...}

Loss rules are picklable (the bridge is a separate process, so timing does not depend on
the test's own Python): ``Loss.every``, ``Loss.pattern``, ``Loss.nth``, ``Loss.random``,
each with a direction and an optional ``match``, which must be a module-level function
``(frame: bytes) -> bool`` (``tcp_payload``, ``tcp_flags_are``... here, or your own).
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import ipaddress
import json
import os
import pickle
import random
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from hdrlog.dev.lab import LabBase, delete_netns, free_subnet, kill_all, run, run_ns

REPO = Path(__file__).resolve().parent.parent
DIRECTIONS = ("a>b", "b>a")
NS_PREFIX = "hlbr-"

# -- frame predicates (module-level, so a loss rule can name them across the process boundary)


def l4(frame: bytes) -> tuple[int, int, int]:
    """(ip_proto, offset of the L4 header, end of the IP packet) of an Ethernet frame;
    (-1, 0, 0) when it is not IPv4/IPv6 (no VLAN tags or IPv6 extension headers here)."""
    if len(frame) < 34:
        return -1, 0, 0
    etype = frame[12] << 8 | frame[13]
    if etype == 0x0800:
        ihl = (frame[14] & 0x0F) * 4
        return frame[23], 14 + ihl, 14 + (frame[16] << 8 | frame[17])
    if etype == 0x86DD and len(frame) >= 54:
        return frame[20], 54, 54 + (frame[18] << 8 | frame[19])
    return -1, 0, 0


def tcp_payload_len(frame: bytes) -> int:
    """TCP payload bytes of the frame (0 for non-TCP or a bare segment)."""
    proto, off, end = l4(frame)
    if proto != 6 or len(frame) < off + 20:
        return 0
    return max(0, end - off - (frame[off + 12] >> 4) * 4)


def tcp_payload(frame: bytes) -> bool:
    """A TCP segment carrying data."""
    return tcp_payload_len(frame) > 0


def is_tcp(frame: bytes) -> bool:
    return l4(frame)[0] == 6


def is_ip(frame: bytes) -> bool:
    return l4(frame)[0] >= 0


def tcp_flags(frame: bytes) -> int:
    """The TCP flags byte (FIN 0x01 SYN 0x02 RST 0x04 PSH 0x08 ACK 0x10), -1 for non-TCP."""
    proto, off, _ = l4(frame)
    return frame[off + 13] if proto == 6 and len(frame) >= off + 14 else -1


def tcp_syn(frame: bytes) -> bool:
    """A SYN without ACK."""
    return tcp_flags(frame) & 0x12 == 0x02 if is_tcp(frame) else False


def tcp_synack(frame: bytes) -> bool:
    return tcp_flags(frame) & 0x12 == 0x12 if is_tcp(frame) else False


# -- loss rules ---------------------------------------------------------------------


@dataclass
class Loss:
    """Drop the k-th frame (k from 1, in arrival order) among those going ``direction``
    ("a>b", "b>a" or "both") that ``match`` accepts (all frames when None), when
    ``pattern[(k - 1) % len(pattern)] == "x"`` (``.`` keeps), or when k is in ``nth``, or
    with probability ``p`` from a generator seeded with ``seed``."""

    direction: str = "both"
    match: Callable[[bytes], bool] | None = None
    pattern: str = ""
    nth: frozenset[int] = frozenset()
    p: float = 0.0
    seed: int = 0
    seen: int = field(default=0, compare=False)

    def __post_init__(self):
        if self.direction not in (*DIRECTIONS, "both"):
            raise ValueError(f"direction {self.direction!r}: use 'a>b', 'b>a' or 'both'")
        if set(self.pattern) - {".", "x"}:
            raise ValueError(f"pattern {self.pattern!r}: use '.' (keep) and 'x' (drop)")
        if not 0 <= self.p <= 1:
            raise ValueError(f"p {self.p}: a probability is 0-1")
        m = self.match
        if m is not None and (getattr(m, "__name__", "<lambda>") == "<lambda>" or "<locals>" in m.__qualname__):
            raise ValueError(f"match {m!r}: give a module-level function (the bridge runs in another process)")
        self._rng = random.Random(self.seed)

    @classmethod
    def every(cls, n: int, direction: str = "both", match=None) -> "Loss":
        """Drop every n-th matching frame (the n-th, 2n-th, ...)."""
        if n < 1:
            raise ValueError(f"every {n}: give n >= 1")
        return cls(direction, match, pattern="." * (n - 1) + "x")

    @classmethod
    def from_pattern(cls, pattern: str, direction: str = "both", match=None) -> "Loss":
        return cls(direction, match, pattern=pattern)

    @classmethod
    def frames(cls, *ks: int, direction: str = "both", match=None) -> "Loss":
        """Drop exactly the k-th matching frames (e.g. the first SYN-ACK: ``frames(1, match=tcp_synack)``)."""
        return cls(direction, match, nth=frozenset(ks))

    @classmethod
    def random(cls, p: float, seed: int = 0, direction: str = "both", match=None) -> "Loss":
        return cls(direction, match, p=p, seed=seed)

    def __call__(self, direction: str, frame: bytes) -> bool:
        if self.direction not in ("both", direction) or (self.match is not None and not self.match(frame)):
            return False
        self.seen += 1
        k = self.seen
        return ((bool(self.pattern) and self.pattern[(k - 1) % len(self.pattern)] == "x") or k in self.nth
                or (self.p > 0 and self._rng.random() < self.p))

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_rng", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._rng = random.Random(self.seed)


# -- the bridge process -------------------------------------------------------------

SOL_PACKET, PACKET_STATISTICS, PACKET_IGNORE_OUTGOING, PACKET_OUTGOING = 263, 6, 23, 4
ETH_P_ALL = 0x0003


@dataclass
class BridgeConfig:
    if_a: str
    if_b: str
    delay_ab: float = 0.0  # seconds, one way
    delay_ba: float = 0.0
    loss: list = field(default_factory=list)  # Loss rules (or picklable callables (direction, frame) -> bool)


def _packet_socket(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    except OSError:
        pass  # older kernel: outgoing frames are skipped by their packet type below
    s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: bursts must not overflow
    s.setsockopt(socket.SOL_SOCKET, 32, 8 << 20)  # SO_SNDBUFFORCE
    s.bind((ifname, 0))
    s.setblocking(False)
    return s


def _kernel_drops(s: socket.socket) -> int:
    """Frames the kernel dropped on this socket's receive queue since the last call."""
    return struct.unpack("II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))[1]


# On "stop" the bridge keeps reading until no frame has arrived for STOP_QUIET seconds (that
# wait is cut at STOP_DRAIN_MAX after the stop; the delay queues are always emptied): a frame a
# host sent just before the stop can still be in the kernel's backlog (softirq deferred to
# ksoftirqd on a loaded machine) and must be counted, or "frames on the wire" would be one
# short of what the sender's hooks saw. Stop the traffic first: frames that keep coming
# through a delay keep its queue from emptying.
STOP_QUIET = 0.2
STOP_DRAIN_MAX = 3.0


def serve(cfg: BridgeConfig, ctrl_in: int = 0, ctrl_out=None) -> None:
    """Run the bridge until "stop" (or EOF) arrives on ``ctrl_in``; reply to "stats" with a
    JSON line on ``ctrl_out``. On stop, frames still arriving (until STOP_QUIET of quiet)
    are taken in and every delayed frame is sent before the final counters."""
    ctrl_out = ctrl_out or sys.stdout
    socks = {"a>b": _packet_socket(cfg.if_a), "b>a": _packet_socket(cfg.if_b)}  # where each direction enters
    out = {"a>b": socks["b>a"], "b>a": socks["a>b"]}
    delay = {"a>b": cfg.delay_ab, "b>a": cfg.delay_ba}
    queue: dict[str, deque] = {d: deque() for d in DIRECTIONS}
    stats = {d: {"received": 0, "forwarded": 0, "dropped": 0, "bytes": 0, "send_errors": 0} for d in DIRECTIONS}
    stats["kernel_drops"] = 0
    by_fd = {s.fileno(): d for d, s in socks.items()}
    ep = select.epoll()
    for fd in by_fd:
        ep.register(fd, select.EPOLLIN)
    ep.register(ctrl_in, select.EPOLLIN)

    def report():
        for s in socks.values():
            stats["kernel_drops"] += _kernel_drops(s)
        ctrl_out.write(json.dumps(stats) + "\n")
        ctrl_out.flush()

    def flush(now: float) -> None:
        for d, q in queue.items():
            while q and q[0][0] <= now:
                frame = q.popleft()[1]
                try:
                    out[d].send(frame)
                    stats[d]["forwarded"] += 1
                    stats[d]["bytes"] += len(frame)
                except BlockingIOError:
                    q.appendleft((now, frame))  # the veth queue is full: retry shortly, keep order
                    break
                except OSError:
                    stats[d]["send_errors"] += 1

    ctrl_out.write("ready\n")
    ctrl_out.flush()
    buf, stopping, stop_at, last_frame = b"", False, 0.0, 0.0
    while True:
        now = time.monotonic()
        flush(now)
        if stopping and not any(queue.values()) and (now - last_frame >= STOP_QUIET
                                                      or now - stop_at >= STOP_DRAIN_MAX):
            report()
            return
        due = [q[0][0] for q in queue.values() if q]
        if stopping and now - last_frame < STOP_QUIET:
            due.append(last_frame + STOP_QUIET)  # wake to see whether it stayed quiet
        timeout = max(0.0, min(due) - now) if due else 1.0
        for fd, _ in ep.poll(timeout):
            if fd == ctrl_in:
                chunk = os.read(ctrl_in, 4096)
                buf += chunk if chunk else b"\nstop\n"
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line == b"stats":
                        report()
                    elif line == b"stop":
                        stopping, stop_at = True, time.monotonic()
                        last_frame = max(last_frame, stop_at)  # the quiet counts from the stop on
                        ep.unregister(ctrl_in)
                        break
                continue
            d = by_fd[fd]
            s = socks[d]
            arrived = last_frame = time.monotonic()
            for _ in range(256):  # bounded, so the other direction and due frames are served too
                try:
                    frame, addr = s.recvfrom(65536)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue
                stats[d]["received"] += 1
                if any(rule(d, frame) for rule in cfg.loss):
                    stats[d]["dropped"] += 1
                    continue
                queue[d].append((arrived + delay[d], frame))


def _child_main(argv: list[str]) -> int:
    """``python -m tests.bridge --serve BASE64_PICKLE``: the bridge process (run by ``Bridge``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: never outlive the test process
    if os.getppid() == 1:
        return 1
    cfg = pickle.loads(base64.b64decode(argv[1]))
    serve(cfg)
    return 0


class Bridge:
    """One bridge process in namespace ``netns`` between ``if_a`` and ``if_b``.

    ``delay``: one-way seconds both ways (or ``delay_ab``/``delay_ba`` each); ``loss``: a
    ``Loss`` (or a list of them; a frame is dropped when any says so). ``start()`` returns
    once the sockets are bound; ``stats()`` and ``stop()`` return the counters:
    ``{"a>b": {"received", "forwarded", "dropped", "bytes", "send_errors"}, "b>a": {...},
    "kernel_drops"}`` ("a>b" = frames that entered at ``if_a``).
    """

    def __init__(self, netns: str, if_a: str, if_b: str, delay: float = 0.0, *, delay_ab: float | None = None,
                 delay_ba: float | None = None, loss=None):
        rules = [] if loss is None else list(loss) if isinstance(loss, (list, tuple)) else [loss]
        self.netns = netns
        self.config = BridgeConfig(if_a, if_b, delay if delay_ab is None else delay_ab,
                                   delay if delay_ba is None else delay_ba, rules)
        if min(self.config.delay_ab, self.config.delay_ba) < 0:
            raise ValueError("delay: give seconds >= 0")
        self.proc: subprocess.Popen | None = None
        self.final: dict | None = None

    def start(self, timeout: float = 10) -> "Bridge":
        arg = base64.b64encode(pickle.dumps(self.config)).decode()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.netns, sys.executable, "-m", "tests.bridge",
                                      "--serve", arg], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=REPO, env=env, start_new_session=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            self.kill()
            raise RuntimeError(f"bridge in {self.netns} did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        return self

    def _ask(self, cmd: str, timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"bridge in {self.netns} is not running (exit {self.proc and self.proc.returncode}):"
                               f" {self.proc and self.proc.stderr.read()[-2000:]}")
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"bridge in {self.netns}: no answer to {cmd!r} in {timeout:.0f}s")
        return json.loads(line)

    def stats(self, timeout: float = 10) -> dict:
        return self._ask("stats", timeout)

    def stop(self, timeout: float = 10) -> dict:
        """Send what is still delayed, stop, return the final counters (idempotent)."""
        if self.final is not None or self.proc is None:
            return self.final or {}
        try:
            self.final = self._ask("stop", timeout)
            self.proc.wait(timeout)
        finally:
            self.kill()
        return self.final

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)
        if self.proc is not None:
            for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                try:
                    f.close()
                except (OSError, BrokenPipeError):
                    pass


# -- the three-namespace topology ---------------------------------------------------


@dataclass
class End:
    """One side of the bridge: namespace ``netns`` with ``eth0``."""

    name: str
    netns: str
    mac: str
    addr4: str
    addr6: str
    ifname: str = "eth0"


class BridgeLab(LabBase):
    """Namespaces ``hlbr-a-X``, ``hlbr-m-X``, ``hlbr-b-X`` (X random) joined through a bridge.

    ``a``, ``b``: the ``End``s; ``mid``: the bridge namespace with ``ea`` (towards A) and
    ``eb``. ``start_bridge(...)`` starts a ``Bridge`` there (one at a time; a new one stops
    the previous); ``run``/``popen`` run commands in "a", "b" or "mid". ``close()`` stops
    the bridge and every process started here, then deletes the namespaces (and so the
    veths); it is idempotent and also runs at interpreter exit.
    """

    def __init__(self, mtu: int = 1500):
        self.suffix = secrets.token_hex(3)
        self._netns: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._bridges: list[Bridge] = []
        self._finalizer = weakref.finalize(self, BridgeLab._cleanup, self._bridges, self._procs, self._netns)
        atexit.register(self._finalizer)
        try:
            self._build(mtu)
        except BaseException:
            self.close()
            raise

    def _build(self, mtu: int) -> None:
        k = free_subnet()
        net4 = ipaddress.ip_network("198.18.0.0/15").network_address + (k << 8)
        ns = self._ns = {side: f"{NS_PREFIX}{side}-{self.suffix}" for side in ("a", "m", "b")}
        for name in ns.values():
            run("ip", "netns", "add", name)
            self._netns.append(name)
        self.mid = ns["m"]
        # No IPv6 on the bridge's own ends: they must send nothing (no link-local, no MLD).
        for key in ("all", "default"):
            self.run("mid", "sysctl", "-q", "-w", f"net.ipv6.conf.{key}.disable_ipv6=1")
        ends = {}
        for side, bend in (("a", "ea"), ("b", "eb")):
            tmp = f"hlbr{self.suffix}{side}"
            run("ip", "-n", ns[side], "link", "add", "eth0", "mtu", str(mtu), "type", "veth",
                 "peer", "name", tmp, "mtu", str(mtu), "netns", self.mid)
            run("ip", "-n", self.mid, "link", "set", tmp, "name", bend)
            host = 1 if side == "a" else 2
            addr4, addr6 = str(net4 + host), f"2001:db8:{k:x}::{host}"
            for opt in ("router_solicitations=0", "accept_dad=0", "dad_transmits=0"):
                self.run(side, "sysctl", "-q", "-w", f"net.ipv6.conf.eth0.{opt}", check=False)
            run("ip", "-n", ns[side], "addr", "add", f"{addr4}/24", "dev", "eth0")
            run("ip", "-n", ns[side], "addr", "add", f"{addr6}/64", "dev", "eth0", "nodad")
            run("ip", "-n", ns[side], "link", "set", "lo", "up")
            run("ip", "-n", ns[side], "link", "set", "eth0", "up")
            run("ip", "-n", self.mid, "link", "set", bend, "promisc", "on", "up")
            for netns, dev in ((ns[side], "eth0"), (self.mid, bend)):
                # MTU-sized frames with checksums filled in: no segmentation or checksum offload
                self.run_ns(netns, "ethtool", "-K", dev, "gro", "off", "gso", "off", "tso", "off", "tx", "off")
            mac = json.loads(run("ip", "-n", ns[side], "-j", "link", "show", "eth0").stdout)[0]["address"]
            ends[side] = End(side, ns[side], mac, addr4, addr6)
        self.a, self.b = ends["a"], ends["b"]
        for me, peer in ((self.a, self.b), (self.b, self.a)):  # static neighbours: no ARP/ND through the bridge
            for addr in (peer.addr4, peer.addr6):
                run("ip", "-n", me.netns, "neigh", "replace", addr, "lladdr", peer.mac, "dev", "eth0",
                     "nud", "permanent")

    def netns(self, side: str) -> str:
        return {"a": self._ns["a"], "b": self._ns["b"], "mid": self._ns["m"]}[side]

    run_ns = staticmethod(run_ns)  # hdrlog.dev.lab's (a LabError, a RuntimeError, names what failed)

    def run(self, side: str, *cmd: str, **kw) -> subprocess.CompletedProcess:
        """Run a command in "a", "b" or "mid" (output captured as text)."""
        return self.run_ns(self.netns(side), *cmd, **kw)

    def popen(self, side: str, *cmd: str, **kw) -> subprocess.Popen:
        """Start a command in "a", "b" or "mid"; killed by ``close()``."""
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(["ip", "netns", "exec", self.netns(side), *cmd], **kw)
        self._procs.append(p)
        return p

    def start_bridge(self, delay: float = 0.0, **kw) -> Bridge:
        """Start forwarding between A and B (see ``Bridge`` for ``delay``, ``delay_ab``,
        ``delay_ba``, ``loss``); a bridge already running is stopped first."""
        for old in self._bridges:
            old.stop()
        self._bridges.clear()
        br = Bridge(self.mid, "ea", "eb", delay, **kw)
        self._bridges.append(br)
        return br.start()

    def close(self) -> None:
        self._finalizer()

    @staticmethod
    def _cleanup(bridges: list, procs: list, netns: list) -> None:
        for br in bridges:
            br.kill()
        bridges.clear()
        kill_all(procs)
        for ns in netns:
            delete_netns(ns)
        netns.clear()


@pytest.fixture
def bridge_lab():
    """A ``BridgeLab`` (A — bridge — B in namespaces ``hlbr-*``), torn down after the test even on failure.
    Import it into a test module: ``from tests.bridge import bridge_lab  # noqa: F401``."""
    with BridgeLab() as lab:
        yield lab


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        raise SystemExit(_child_main(sys.argv[1:]))
    raise SystemExit("usage: python -m tests.bridge --serve CONFIG  (started by tests.bridge.Bridge)")
