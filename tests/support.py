"""Test helpers: the real `hdrlog` server and collector as processes, and SQL over HTTP.

Every process started here is stopped by the fixture that owns it (see
conftest.py), also when the test fails.
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


class Process:
    """A tracked child process with its output in a log file."""

    def __init__(self, name: str, cmd: list[str], log_dir: Path):
        self.name, self.cmd = name, cmd
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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
    def __init__(self, store: str, log_dir: Path, *extra: str):
        self.grpc_port, self.sql_port = free_port(), free_port()
        self.store = store
        super().__init__("server", [*HDRLOG, "server", "run", "--insecure",
                                    "--listen", f"127.0.0.1:{self.grpc_port}",
                                    "--sql-listen", f"127.0.0.1:{self.sql_port}",
                                    "--clickhouse", store, "--status-interval", "1", *extra], log_dir)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def sql_url(self) -> str:
        return f"http://127.0.0.1:{self.sql_port}"

    def start(self, timeout: float = 60) -> None:
        super().start()

        def ready():
            if not self.alive():
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                return self.http("/ping") == "Ok.\n"
            except OSError:
                return False
        wait_until(ready, timeout, "the server's SQL endpoint")

    def http(self, path: str, data: bytes | None = None) -> str:
        with urllib.request.urlopen(self.sql_url + path, data=data, timeout=30) as resp:
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
    """The collector; its spool is ``log_dir/spool-<host_id>`` unless ``extra`` names one."""

    def __init__(self, server: str, ifaces: list[str], host_id: str, log_dir: Path, *extra: str):
        self.spool = log_dir / f"spool-{host_id}"
        cmd = [*HDRLOG, "collector", "run", "--insecure", "--server", server, "--host-id", host_id,
               "--status-interval", "1", "--batch-interval", "0.2", "--spool", str(self.spool),
               "--mode", "packets"]
        for iface in ifaces:
            cmd += ["--iface", iface]
        super().__init__(f"collector-{host_id}", [*cmd, *extra], log_dir)
        self.ifaces = ifaces

    def start(self, timeout: float = 60) -> None:
        super().start()

        def attached():
            if not self.alive():
                raise AssertionError(f"collector exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            out = subprocess.run(["tc", "filter", "show", "dev", self.ifaces[0], "egress"],
                                 capture_output=True, text=True).stdout
            return "hdrlog" in out
        wait_until(attached, timeout, "the collector's TC filters")
