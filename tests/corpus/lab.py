"""An isolated replay lab: one namespace holding BOTH ends of a veth, and nothing else.

The corpus carries arbitrary (real) addresses, so nothing replayed may reach a
routing table that leads anywhere: the namespace has no other interface, the
veth ends have no addresses, IPv6 is disabled (no SLAAC, DAD, MLD or router
solicitations), forwarding is off and lo stays down. The capture runs inside the
namespace too. ``close()`` kills every process in the namespace and deletes it,
which takes the veth pair and its TC filters with it; it runs on failure and
at interpreter exit.
"""

from __future__ import annotations

import atexit
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from hdrlog.dev.lab import LabBase, LabError, delete_netns, run

ROOT = Path(__file__).resolve().parents[2]
SEND_IF = "va"  # tcpreplay writes here; the capture sits on its egress hook
PEER_IF = "vb"
MTU = 65535  # veth's maximum: lets every frame up to 64 KiB cross


class IsolatedLab(LabBase):
    def __init__(self):
        self.netns = f"hlc-{secrets.token_hex(4)}"
        self._proc: subprocess.Popen | None = None
        self._created = False
        atexit.register(self.close)

    def start(self) -> None:
        self._build()

    def ns(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return run("ip", "netns", "exec", self.netns, *cmd, check=check)

    def _build(self) -> None:
        run("ip", "netns", "add", self.netns)
        self._created = True
        for key in ("net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"):
            self.ns("sysctl", "-q", "-w", f"{key}=1")
        self.ns("sysctl", "-q", "-w", "net.ipv4.ip_forward=0")
        self.ns("sysctl", "-q", "-w", "net.ipv4.conf.all.forwarding=0")
        run("ip", "-n", self.netns, "link", "add", SEND_IF, "type", "veth", "peer", "name", PEER_IF)
        for dev in (SEND_IF, PEER_IF):
            run("ip", "-n", self.netns, "link", "set", dev, "mtu", str(MTU))
            run("ip", "-n", self.netns, "link", "set", dev, "up")
        self.check_isolated()

    def check_isolated(self) -> None:
        """Fail loudly if anything could route out of the namespace."""
        links = self.ns("ip", "-o", "link", "show").stdout
        names = sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines())
        if names != sorted(["lo", SEND_IF, PEER_IF]):
            raise LabError(f"isolated lab {self.netns} has unexpected links: {names}")
        addrs = self.ns("ip", "-o", "addr", "show").stdout.strip()
        if addrs:
            raise LabError(f"isolated lab {self.netns} has addresses: {addrs}")
        routes = self.ns("ip", "route", "show", "table", "all").stdout.strip()
        if routes:
            raise LabError(f"isolated lab {self.netns} has routes: {routes}")

    def start_replay(self, files: list[str], out: Path, dns_ports: str) -> subprocess.Popen:
        ready = out / "ready"
        cmd = ["ip", "netns", "exec", self.netns, sys.executable, "-m", "tests.corpus.replay_capture",
               "--iface", SEND_IF, "--out", str(out), "--dns-ports", dns_ports, "--ready", str(ready), *files]
        log = open(out / "replay.log", "wb")
        self._proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                      env=dict(os.environ, PYTHONPATH=str(ROOT)))
        log.close()
        return self._proc

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGTERM)  # the replayer detaches its filters on SIGTERM
                self._proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self._proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._proc.wait()
        self._proc = None
        if self._created:
            delete_netns(self.netns)
            self._created = False
        atexit.unregister(self.close)

    def exists(self) -> bool:
        return self.netns in run("ip", "netns", "list", check=False).stdout
