"""Filters a killed collector left behind: found, proven unowned, and taken over.

A collector that is SIGKILLed (or crashes) cannot detach its TC filters; the
kernel keeps them, and the programs in them, running. The next collector on
the interface finds hdrlog's prio/handle taken. It may take the slot over only
when no live process holds the program: every BPF program a process holds
shows up as ``prog_id: N`` in one of its ``/proc/PID/fdinfo`` files. Processes
whose fdinfo cannot be read (another user's, for a non-root collector) count as
holders when their command line says ``hdrlog`` and ``collector``, so a live
collector is never robbed of its filter.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess

log = logging.getLogger("hdrlog.collector")


def prog_id_of(ifindex: int, direction: str, prio: int, handle: int) -> int | None:
    """The BPF program id in the tc filter at (prio, handle) of a clsact hook, from ``tc -j``
    (pyroute2 does not decode TCA_BPF_ID)."""
    try:
        name = socket.if_indextoname(ifindex)
        out = subprocess.run(["tc", "-j", "filter", "show", "dev", name, direction],
                             capture_output=True, text=True, timeout=10).stdout
        entries = json.loads(out or "[]")
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    for e in entries:
        opts = e.get("options") or {}
        if e.get("pref") == prio and e.get("kind") == "bpf" and str(opts.get("handle")) == hex(handle):
            prog = opts.get("prog") or {}
            if isinstance(prog.get("id"), int):
                return prog["id"]
    return None


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def held_by_a_process(prog_id: int, proc: str = "/proc") -> bool:
    """True when some live process holds a file descriptor of BPF program ``prog_id``
    (or may, and looks like an hdrlog collector)."""
    needle = f"prog_id:\t{prog_id}\n"
    me = str(os.getpid())
    for pid in os.listdir(proc):
        if not pid.isdigit() or pid == me:
            continue
        fdinfo = f"{proc}/{pid}/fdinfo"
        try:
            names = os.listdir(fdinfo)
        except PermissionError:
            cmd = _cmdline(pid)
            if "hdrlog" in cmd and "collector" in cmd:
                return True
            continue
        except OSError:  # the process is gone
            continue
        for name in names:
            try:
                with open(f"{fdinfo}/{name}") as f:
                    text = f.read()
            except OSError:
                continue
            if needle in text:
                return True
    return False


def is_orphan(ifindex: int, direction: str, prio: int, handle: int) -> bool:
    prog_id = prog_id_of(ifindex, direction, prio, handle)
    if prog_id is None:
        return False
    orphan = not held_by_a_process(prog_id)
    if orphan:
        log.warning("capture: the filter on ifindex %d %s belongs to a collector that is gone (BPF program %d, "
                    "no process holds it): taken over", ifindex, direction, prog_id)
    return orphan
