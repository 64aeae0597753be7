"""The real `hdrlog` server and collector as child processes, and SQL over HTTP to the server.

Shared by the tests (through tests/support), the benchmarks and the demo. Whoever starts a
process here stops it (the tests' fixtures do, also when a test fails). ``hdrlog_hooks`` is the
one answer to "is hdrlog attached to this interface" (tcx links and tc filters, as the kernel
reports them).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

HDRLOG = [sys.executable, "-m", "hdrlog"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def hdrlog_hooks(dev: str, direction: str) -> list[str]:
    """hdrlog's programs on a TC hook of ``dev``, as the kernel reports them: tcx links
    ("tcx hdrlog_egress") and tc filters ("tc hdrlog_egress")."""
    from hdrlog.collector import bpfsys

    out = [f"tcx {n}" for n in bpfsys.tcx_program_names(dev, direction) if n.startswith("hdrlog")]
    tc = subprocess.run(["tc", "filter", "show", "dev", dev, direction], capture_output=True, text=True).stdout
    return out + hdrlog_tc_filters(tc)


def hdrlog_tc_filters(tc_output: str) -> list[str]:
    """hdrlog's filters in ``tc filter show`` output, one "tc hdrlog_..." per filter."""
    out = []
    for line in tc_output.splitlines():  # a filter's line names its program twice
        names = [word for word in line.split() if word.startswith("hdrlog")]
        out += [f"tc {names[0]}"] if names else []
    return out


class Process:
    """A tracked child process with its output in a log file (``env``: extra environment)."""

    def __init__(self, name: str, cmd: list[str], log_dir: Path, env: dict[str, str] | None = None,
                 manager=None):
        self.name, self.cmd = name, cmd
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.env = env
        self.manager = manager  # a hdrlog.dev.servicemanager FdStoreManager: started as systemd would

    def start(self) -> None:
        log = open(self.log_path, "ab")
        if self.manager is not None:
            self.proc = self.manager.popen(self.cmd, log, self.env)
        else:
            env = {**os.environ, **self.env} if self.env else None
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=env)
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.proc.pid, sig)  # type: ignore[union-attr]

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc is None:
            return None
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.alive():
            self.signal(signal.SIGKILL)
            self.proc.wait()  # type: ignore[union-attr]


class ServerProcess(Process):
    """``hdrlog server run`` on ``store``.

    Options: ``host`` to listen on (default loopback), ``netns`` to run inside a lab namespace,
    ``pki`` (a `hdrlog pki` directory with a ``central`` server certificate) for mTLS plus SQL
    credentials ``SQL_USER``/``SQL_PASSWORD``, ``command`` to replace ``hdrlog`` (a fault-injecting
    wrapper), ``grpc_port`` to reuse a port.
    """

    SQL_USER, SQL_PASSWORD = "tester", "pw-for-tests"

    def __init__(self, store: str, log_dir: Path, *extra: str, host: str = "127.0.0.1", netns: str | None = None,
                 pki: Path | None = None, command: list[str] | None = None, grpc_port: int | None = None,
                 manager=None):
        self.grpc_port, self.sql_port = grpc_port or free_port(), free_port()
        self._ports_free_to_move = grpc_port is None  # until the first start succeeds (then the address holds)
        self.store, self.host, self.pki = store, host, pki
        security = ["--insecure"] if pki is None else [
            "--tls-cert", str(pki / "central.crt"), "--tls-key", str(pki / "central.key"),
            "--tls-ca", str(pki / "ca.crt"), "--sql-user", self.SQL_USER]
        prefix = ["ip", "netns", "exec", netns] if netns else []
        super().__init__("server", [*prefix, *(command or HDRLOG), "server", "run", *security,
                                    "--listen", f"{host}:{self.grpc_port}",
                                    "--sql-listen", f"{host}:{self.sql_port}",
                                    "--clickhouse", store, "--status-interval", "1", *extra], log_dir,
                         env={"HDRLOG_SQL_PASSWORD": self.SQL_PASSWORD} if pki is not None else None,
                         manager=manager)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def sql_url(self) -> str:
        return f"http://{self.host}:{self.sql_port}"

    def start(self, timeout: float = 60) -> None:
        for attempt in range(3):
            seen = len(self.log())
            super().start()

            def ready():
                if not self.alive():
                    raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
                try:
                    return self.http("/ping") == "Ok.\n"
                except OSError:
                    return False
            try:
                wait_until(ready, timeout, "the server's SQL endpoint")
                self._ports_free_to_move = False
                return
            except AssertionError:
                # free_port() races with every other socket on the machine: a port taken between the
                # pick and the bind gets new ports, once the address was not handed out yet
                if not (self._ports_free_to_move and "address already in use" in self.log()[seen:] and attempt < 2):
                    raise
                self._move_ports(free_port(), free_port())

    def _move_ports(self, grpc_port: int, sql_port: int) -> None:
        old = (f"{self.host}:{self.grpc_port}", f"{self.host}:{self.sql_port}")
        self.grpc_port, self.sql_port = grpc_port, sql_port
        new = (f"{self.host}:{grpc_port}", f"{self.host}:{sql_port}")
        self.cmd = [new[old.index(a)] if a in old else a for a in self.cmd]

    def http(self, path: str, data: bytes | None = None) -> str:
        req = urllib.request.Request(self.sql_url + path, data=data)
        if self.pki is not None:
            req.add_header("X-ClickHouse-User", self.SQL_USER)
            req.add_header("X-ClickHouse-Key", self.SQL_PASSWORD)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read().decode()

    def sql(self, query: str, fmt: str = "JSONEachRow") -> list[dict] | str:
        """Run a query the way curl would; JSONEachRow comes back parsed."""
        text = self.http("/?" + urllib.parse.urlencode({"query": query, "default_format": fmt}))
        if fmt == "JSONEachRow":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return text

    def count(self, where: str = "1") -> int:
        return int(self.sql(f"SELECT count() FROM hdrlog.packets WHERE {where}", "TabSeparated").strip())


class CollectorProcess(Process):
    """The collector; its spool is ``log_dir/spool-<host_id>`` unless ``extra`` names one.
    With ``pki`` it uses the certificate ``<host_id>.crt`` from that directory (mTLS)."""

    def __init__(self, server: str, ifaces: list[str], host_id: str, log_dir: Path, *extra: str,
                 pki: Path | None = None, prefix: list[str] | None = None, manager=None):
        self.spool = log_dir / f"spool-{host_id}"
        security = ["--insecure"] if pki is None else [
            "--tls-cert", str(pki / f"{host_id}.crt"), "--tls-key", str(pki / f"{host_id}.key"),
            "--tls-ca", str(pki / "ca.crt")]
        cmd = [*(prefix or []), *HDRLOG, "collector", "run", *security, "--server", server, "--host-id", host_id,
               "--status-interval", "1", "--batch-interval", "0.2", "--spool", str(self.spool),
               "--mode", "packets"]
        for iface in ifaces:
            cmd += ["--iface", iface]
        super().__init__(f"collector-{host_id}", [*cmd, *extra], log_dir, manager=manager)
        self.ifaces = ifaces

    def start(self, timeout: float = 60) -> None:
        seen = len(self.log())
        super().start()

        def attached():
            if not self.alive():
                raise AssertionError(f"collector exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            # (a filter alone may be one a killed collector left; the log says this one is capturing)
            return hdrlog_hooks(self.ifaces[0], "egress") and "capturing on" in self.log()[seen:]
        wait_until(attached, timeout, "the collector's TC hooks")
