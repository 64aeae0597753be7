"""systemd's notify protocol: readiness, and the file-descriptor store.

With ``Type=notify`` and ``FileDescriptorStoreMax=`` in the unit, a service can
hand file descriptors to systemd (``FDSTORE=1``) and get them back, by name, in
its next incarnation (``LISTEN_FDS``/``LISTEN_FDNAMES``, starting at fd 3). systemd
keeps them while the service runs or restarts (also after a crash, with
``Restart=``) and closes them when the service is stopped for good. The collector
keeps its tcx links and BPF maps there, so a restart does not interrupt capture
(collector/handover.py). Outside systemd every call here is a harmless no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("hdrlog.collector")

LISTEN_FDS_START = 3


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    return "\0" + addr[1:] if addr.startswith("@") else addr


def available() -> bool:
    """True when a service manager listens for our notifications."""
    return _address() is not None


def notify(message: str, fds: list[int] | None = None) -> bool:
    """Send one notification (``READY=1``, ``FDSTORE=1\\nFDNAME=x``, ...); False when none listens or it fails."""
    addr = _address()
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            if fds:
                socket.send_fds(s, [message.encode()], fds)
            else:
                s.sendall(message.encode())
        return True
    except OSError as e:
        log.warning("collector: unable to notify the service manager (%s): %s", message.split("\n")[0], e)
        return False


def store(name: str, fd: int) -> bool:
    """Keep ``fd`` in the service manager's fd store under ``name``."""
    return notify(f"FDSTORE=1\nFDNAME={name}", [fd])


def remove(name: str) -> bool:
    """Drop (and let the service manager close) every stored fd named ``name``."""
    return notify(f"FDSTOREREMOVE=1\nFDNAME={name}")


def inherited() -> dict[str, list[int]]:
    """Fds the service manager passed us, by name; the environment variables are consumed."""
    try:
        pid = int(os.environ.get("LISTEN_PID", "0"))
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    if pid != os.getpid() or count <= 0:
        return {}
    out: dict[str, list[int]] = {}
    for i in range(count):
        fd = LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue
        name = names[i] if i < len(names) and names[i] else "unknown"
        out.setdefault(name, []).append(fd)
    return out
