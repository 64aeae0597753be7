"""A network-namespace lab: hosts behind veth pairs, for tests and the demo.

Each ``add_host`` creates a network namespace and a veth pair. One end (``eth0``)
lives inside the namespace; the other (``Host.peer_ifname``) stays in the root
namespace, so a collector in the root namespace can monitor it. Every name carries a
short random suffix so parallel runs never collide, and each host gets its own
subnet inside the test ranges 198.18.0.0/15 and 2001:db8::/32 (chosen among the
subnets no interface on this machine uses yet, unless given explicitly).

``close()`` kills the processes started through ``popen``, deletes veths and
namespaces, and is safe to call twice; it is also registered with ``atexit`` so an
aborted run does not leave anything behind::

    with Lab() as lab:
        h = lab.add_host("a")
        lab.run(h, "ping", "-c1", h.peer_addr4)
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import random
import secrets
import signal
import subprocess
import threading
import time
import weakref
from dataclasses import dataclass

TEST_NET4 = ipaddress.ip_network("198.18.0.0/15")
TEST_NET6 = ipaddress.ip_network("2001:db8::/32")

_IFNAMSIZ = 15


class LabError(RuntimeError):
    """A lab command failed; the message names the command and its stderr."""


# -- what every lab shares (this one, tests/corpus/lab.py, tests/e2e/lab.py, tests/bridge.py) ----------

def run(*cmd: str, check: bool = True, timeout: float | None = 60, **kw) -> subprocess.CompletedProcess:
    """Run a lab command; with ``check`` a failure is a LabError naming the command and its stderr."""
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


def run_ns(netns: str, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """Run a command inside network namespace ``netns`` (output captured as text unless told otherwise)."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    p = subprocess.run(["ip", "netns", "exec", netns, *cmd], timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise LabError(f"in {netns}: {' '.join(cmd)} exited {p.returncode}: {(p.stderr or '').strip()}")
    return p


def kill_all(procs: list) -> None:
    """SIGKILL every tracked process (its whole process group when it has one) and reap it; empties ``procs``."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                p.kill()
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    procs.clear()


def delete_netns(name: str) -> None:
    """Kill what still runs inside namespace ``name`` and delete it (retried: the kernel may still hold it)."""
    for pid in run("ip", "netns", "pids", name, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    for _ in range(50):
        if run("ip", "netns", "del", name, check=False).returncode == 0 or name not in netns_names():
            return
        time.sleep(0.1)


def netns_names() -> set[str]:
    return {line.split()[0] for line in run("ip", "netns", "list", check=False).stdout.splitlines() if line.strip()}


def used_subnets() -> tuple[set, set]:
    """IPv4 and IPv6 networks already configured on the root namespace's interfaces."""
    out = run("ip", "-j", "addr", "show", check=False).stdout or "[]"
    v4, v6 = set(), set()
    for link in json.loads(out):
        for a in link.get("addr_info", []):
            try:
                net = ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network
            except (KeyError, ValueError):
                continue
            (v4 if net.version == 4 else v6).add(net)
    return v4, v6


def free_subnet(order: list[int] | None = None, taken: set | None = None) -> int:
    """A number k (1..511) whose 198.18.0.0/15 /24 and 2001:db8:k::/64 overlap nothing configured here."""
    used4, used6 = used_subnets()
    used4 |= taken or set()
    for k in order or random.sample(range(1, 512), 511):
        net4 = ipaddress.ip_network(f"{TEST_NET4.network_address + (k << 8)}/24")
        net6 = ipaddress.ip_network(f"2001:db8:{k:x}::/64")
        if not any(net4.overlaps(u) for u in used4) and not any(net6.overlaps(u) for u in used6):
            return k
    raise LabError("no free /24 left in 198.18.0.0/15")


class LabBase:
    """The shape of every lab: ``with Lab() as lab`` builds it (``start()``), a failure while building
    tears down what was built, and leaving the block (or the interpreter: atexit) calls ``close()``."""

    def start(self) -> None:
        """Build what the lab needs before its first use (nothing by default)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Host:
    name: str
    netns: str
    ifname: str  # inside the namespace, "eth0"
    peer_ifname: str  # root-namespace end of the veth
    mac: str
    peer_mac: str
    ipv4: str  # with prefix length, e.g. "198.18.7.2/24"
    ipv6: str
    peer_ipv4: str
    peer_ipv6: str

    @property
    def addr4(self) -> str:
        return self.ipv4.split("/")[0]

    @property
    def addr6(self) -> str:
        return self.ipv6.split("/")[0]

    @property
    def peer_addr4(self) -> str:
        return self.peer_ipv4.split("/")[0]

    @property
    def peer_addr6(self) -> str:
        return self.peer_ipv6.split("/")[0]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise LabError(f"ip {' '.join(args)} failed: {p.stderr.strip()}")
    return p


def _mac_of(ifname: str, netns: str | None = None) -> str:
    args = (["-n", netns] if netns else []) + ["-j", "link", "show", "dev", ifname]
    return json.loads(_ip(*args).stdout)[0]["address"]


class Lab(LabBase):
    """Namespaces + veth pairs, torn down by ``close()`` (context manager)."""

    _lock = threading.Lock()

    def __init__(self, prefix: str = "hl"):
        if not prefix.isalnum() or len(prefix) > 4:
            raise ValueError(f"lab prefix {prefix!r}: use 1-4 letters/digits")
        self.prefix = prefix
        self.suffix = secrets.token_hex(3)
        self.hosts: list[Host] = []
        self._procs: list[subprocess.Popen] = []
        self._netns: list[str] = []
        self._links: list[str] = []
        self._closed = False
        self._finalizer = weakref.finalize(self, Lab._cleanup, self._procs, self._netns, self._links)
        atexit.register(self._finalizer)

    # -- building -------------------------------------------------------------

    def _pick_subnet(self) -> tuple[str, str, str, str]:
        k = free_subnet(taken={ipaddress.ip_interface(h.peer_ipv4).network for h in self.hosts})
        net4 = ipaddress.ip_network(f"{TEST_NET4.network_address + (k << 8)}/24")
        net6 = ipaddress.ip_network(f"2001:db8:{k:x}::/64")
        return (f"{net4.network_address + 2}/24", f"{net6.network_address + 2}/64",
                f"{net4.network_address + 1}/24", f"{net6.network_address + 1}/64")

    def add_host(
        self,
        name: str,
        ipv4: str | None = None,
        ipv6: str | None = None,
        peer_ipv4: str | None = None,
        peer_ipv6: str | None = None,
    ) -> Host:
        """Create namespace ``<prefix>-<name>-<suffix>`` joined to the root namespace.

        Addresses default to a free subnet per host (198.18.N.2/24 inside,
        198.18.N.1/24 on the root-side peer, likewise 2001:db8:N::2/64 and ::1/64).
        Explicit addresses must lie in the test ranges.
        """
        if self._closed:
            raise LabError("lab is closed")
        with Lab._lock:
            auto = self._pick_subnet()
        ipv4, ipv6, peer_ipv4, peer_ipv6 = (
            given or default for given, default in zip((ipv4, ipv6, peer_ipv4, peer_ipv6), auto)
        )
        for a in (ipv4, peer_ipv4):
            if ipaddress.ip_interface(a).ip not in TEST_NET4:
                raise ValueError(f"lab address {a} is outside {TEST_NET4}")
        for a in (ipv6, peer_ipv6):
            if ipaddress.ip_interface(a).ip not in TEST_NET6:
                raise ValueError(f"lab address {a} is outside {TEST_NET6}")
        n = len(self.hosts)
        netns = f"{self.prefix}-{name}-{self.suffix}"
        peer = f"{self.prefix}{self.suffix}{n}"[:_IFNAMSIZ]
        tmp = f"{peer}t"[:_IFNAMSIZ]
        _ip("netns", "add", netns)
        self._netns.append(netns)
        _ip("link", "add", peer, "type", "veth", "peer", "name", tmp)
        self._links.append(peer)
        _ip("link", "set", tmp, "netns", netns)
        _ip("-n", netns, "link", "set", tmp, "name", "eth0")
        # Quiet links: no router solicitations, no DAD (addresses usable at once).
        for path in (f"/proc/sys/net/ipv6/conf/{peer}/router_solicitations",):
            _write(path, "0")
        self.run_ns(netns, "sysctl", "-q", "-w", "net.ipv6.conf.eth0.router_solicitations=0", check=False)
        self.run_ns(netns, "sysctl", "-q", "-w", "net.ipv6.conf.eth0.accept_dad=0", check=False)
        _write(f"/proc/sys/net/ipv6/conf/{peer}/accept_dad", "0")
        _ip("addr", "add", peer_ipv4, "dev", peer)
        _ip("addr", "add", peer_ipv6, "dev", peer, "nodad")
        _ip("-n", netns, "addr", "add", ipv4, "dev", "eth0")
        _ip("-n", netns, "addr", "add", ipv6, "dev", "eth0", "nodad")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("link", "set", peer, "up")
        host = Host(
            name=name,
            netns=netns,
            ifname="eth0",
            peer_ifname=peer,
            mac=_mac_of("eth0", netns),
            peer_mac=_mac_of(peer),
            ipv4=ipv4,
            ipv6=ipv6,
            peer_ipv4=peer_ipv4,
            peer_ipv6=peer_ipv6,
        )
        self.hosts.append(host)
        return host

    # -- running --------------------------------------------------------------

    run_ns = staticmethod(run_ns)  # the module's, as a method for callers that hold a lab

    def run(self, host: Host, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a command inside the host's namespace (output captured as text)."""
        return self.run_ns(host.netns, *cmd, check=check, timeout=timeout, **kw)

    def popen(self, host: Host, *cmd: str, **kw) -> subprocess.Popen:
        """Start a command inside the host's namespace; killed by ``close()``."""
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(["ip", "netns", "exec", host.netns, *cmd], **kw)
        self._procs.append(p)
        return p

    # -- teardown -------------------------------------------------------------

    def close(self) -> None:
        """Kill tracked processes, delete veths and namespaces. Idempotent."""
        self._closed = True
        self._finalizer()

    @staticmethod
    def _cleanup(procs: list, netns: list, links: list) -> None:
        kill_all(procs)
        for link in links:
            _ip("link", "del", link, check=False)
        links.clear()
        for ns in netns:
            delete_netns(ns)
        netns.clear()


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        pass
