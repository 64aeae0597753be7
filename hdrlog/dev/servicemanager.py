"""The service-manager side of systemd's notify protocol, for tests outside systemd.

Speaks what systemd speaks to a ``Type=notify`` service with ``FileDescriptorStoreMax=``:
it receives ``READY=1``, ``FDSTORE=1`` (with fds, by ``FDNAME``) and ``FDSTOREREMOVE=1``
on a datagram socket named by ``NOTIFY_SOCKET``, keeps the fds, and starts the next
process with them as fds 3, 4, ... plus ``LISTEN_FDS``/``LISTEN_FDNAMES``/``LISTEN_PID``.
``close_store()`` is what systemd does when a service is stopped for good. The real
systemd does the same in the e2e lab (tests/e2e).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path


_LAUNCHER = """
import fcntl, os, sys
high = [int(x) for x in sys.argv[1].split(",")]
floor = 3 + len(high) + max(high)
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, floor) for fd in high]  # above every target first: no clobbering
for fd in high:
    os.close(fd)
for i, fd in enumerate(moved):
    os.dup2(fd, 3 + i)
for fd in moved:
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execvp(sys.argv[2], sys.argv[2:])
"""


class FdStoreManager:
    def __init__(self, directory: Path):
        self.path = str(directory / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.store: list[tuple[str, int]] = []  # (name, fd), in arrival order like systemd
        self.messages: list[str] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, 16)
            except OSError:
                return
            if not data and not fds:
                return
            try:
                self._handle(data, fds)
            except Exception as e:  # keep serving; the test sees it in errors
                self.errors.append(repr(e))

    def _handle(self, data: bytes, fds: list[int]) -> None:
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        with self._lock:
            self.messages.append(data.decode())
            name = fields.get("FDNAME", "stored")
            if fields.get("FDSTORE") == "1":
                self.store.extend((name, fd) for fd in fds)
                fds = []
            elif fields.get("FDSTOREREMOVE") == "1":
                for _, fd in [e for e in self.store if e[0] == name]:
                    os.close(fd)
                self.store = [e for e in self.store if e[0] != name]
        for fd in fds:
            os.close(fd)

    def names(self) -> list[str]:
        with self._lock:
            return [n for n, _ in self.store]

    def ready_count(self) -> int:
        with self._lock:
            return sum("READY=1" in m for m in self.messages)

    def popen(self, cmd: list[str], log, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``cmd`` the way systemd starts a service with this store."""
        with self._lock:
            entries = list(self.store)
        env = {**os.environ, **(env or {}), "NOTIFY_SOCKET": self.path}
        for var in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID"):
            env.pop(var, None)
        if entries:
            env["LISTEN_FDS"] = str(len(entries))
            env["LISTEN_FDNAMES"] = ":".join(n for n, _ in entries)
        # The stored fds go to the child at high numbers; a tiny launcher moves them to 3, 4, ...,
        # sets LISTEN_PID to its own pid (the one the command keeps) and execs the command.
        high = [os.dup(fd) for fd in (fd for _, fd in entries)]
        launcher = [sys.executable, "-c", _LAUNCHER, ",".join(map(str, high))] if entries else []
        try:
            return subprocess.Popen([*launcher, *cmd], stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, pass_fds=tuple(high))
        finally:
            for fd in high:
                os.close(fd)

    def close_store(self) -> None:
        """What systemd does when the service stops for good: close every stored fd."""
        with self._lock:
            for _, fd in self.store:
                os.close(fd)
            self.store.clear()

    def close(self) -> None:
        self.close_store()
        # Wake and end the receiver before closing: a thread still blocked on a closed fd number
        # would read from whatever socket gets that number next.
        self.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
