"""Putting the classifier on interfaces and taking it off: tcx links, or tc filters on clsact.

``resolve_ifaces()`` turns the configured names and globs into ifindexes. ``Attacher``
attaches the loaded programs to ingress and egress of each interface: through tcx
links where the kernel has them (collector/bpfsys.py; closing the link detaches; under
systemd the predecessor's link is reused with our program swapped in, collector/handover.py),
else as cls_bpf filters on a clsact qdisc it creates where none exists. ``detach()``
removes only what it attached (tc filters matched by prio, handle and program name) and
a clsact qdisc only if it created it and nothing else is attached to it.

Filters a killed collector left behind (it could not detach them; the kernel keeps them
and their programs running) are taken over only when no live process holds the program:
every BPF program a process holds shows up as ``prog_id: N`` in one of its
``/proc/PID/fdinfo`` files. Processes whose fdinfo cannot be read (another user's, for a
non-root collector) count as holders when their command line says ``hdrlog`` and
``collector``, so a live collector is never robbed of its filter.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import logging
import os
import socket
import subprocess
from typing import Callable

from hdrlog.collector import bpfsys

log = logging.getLogger("hdrlog.collector.capture")

# Our TC filters: low prio number so we run before typical filters (tc's automatic prios start at
# 49152); we return TC_ACT_UNSPEC so later filters still run. The handle tells ours from anyone else's.
TC_PRIO = 7
TC_HANDLE = 0x4844  # "HD"
PROG_NAMES = {"ingress": "hdrlog_ingress", "egress": "hdrlog_egress"}
PARENTS = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}  # clsact ingress / egress
GLOB_CHARS = set("*?[")


def matching_ifaces(patterns: list[str], links: dict[str, int]) -> dict[str, int]:
    """Every interface a name or glob of ``patterns`` names now, in pattern order (no errors)."""
    out: dict[str, int] = {}
    for pat in patterns:
        if GLOB_CHARS & set(pat):
            for n in sorted(n for n in links if fnmatch.fnmatchcase(n, pat)):
                out.setdefault(n, links[n])
        elif pat in links:
            out.setdefault(pat, links[pat])
    return out


def resolve_ifaces(patterns: list[str], links: dict[str, int]) -> list[tuple[str, int]]:
    """Names and globs -> [(name, ifindex)], in pattern order, without duplicates.

    A literal name that does not exist is a ValueError naming it. A glob matching nothing is
    a warning (``--iface eth0 --iface 'veth*'`` on a host without containers yet is normal:
    interfaces that appear later are attached then, see ``Capture.attach_new_interfaces``),
    unless nothing at all matches: that is a ValueError naming every pattern.
    """
    for pat in patterns:
        if not GLOB_CHARS & set(pat) and pat not in links:
            raise ValueError(f"capture ifaces: interface {pat!r} does not exist")
    out = matching_ifaces(patterns, links)
    empty = [p for p in patterns if GLOB_CHARS & set(p) and not any(fnmatch.fnmatchcase(n, p) for n in links)]
    have = ", ".join(sorted(links))
    if empty and not out:
        raise ValueError(f"capture ifaces: glob {empty[0]!r} matches no interface (have: {have})")
    for pat in empty:
        log.warning("capture ifaces: glob %r matches no interface now (have: %s); interfaces that appear later "
                    "are attached when they do", pat, have)
    return list(out.items())


class Attacher:
    """Our programs on (interface, direction) pairs; ``kind`` is auto until the first attach decides."""

    def __init__(self, kind: str, fns: dict[str, object], keep_link: Callable | None = None,
                 on_tc_fallback: Callable[[], None] | None = None):
        self.kind = kind  # "auto", "tcx" or "tc"
        self._fns = fns  # BCC functions by direction
        self._keep_link = keep_link  # puts a new tcx link in the fd store (handover.Keeper.keep_link)
        self._on_tc_fallback = on_tc_fallback
        self.attached: list[tuple[str, int, str]] = []  # (ifname, ifindex, direction)
        self.link_fds: dict[tuple[int, str], int] = {}  # tcx link fds by (ifindex, direction)
        self._created_clsact: set[int] = set()

    def attach(self, ipr, name: str, idx: int, inheritance=None) -> None:
        if self.kind != "tc":
            for direction in PARENTS:
                try:
                    self._attach_link(idx, direction, inheritance)
                except OSError as e:
                    if self.kind == "tcx" or self.link_fds or not bpfsys.unsupported(e):
                        raise RuntimeError(f"unable to attach to {name} {direction}: {e}") from e
                    log.warning("capture: this kernel has no tcx links (Linux 6.6+): attaching as tc filters, "
                                "and a restart will miss the packets that pass meanwhile")
                    self.kind = "tc"
                    self._keep_link = None
                    if self._on_tc_fallback is not None:
                        self._on_tc_fallback()
                    break
                self.kind = "tcx"
                self.attached.append((name, idx, direction))
            else:
                return
        if not _has_clsact(ipr, idx):
            try:
                ipr.tc("add", "clsact", idx)
                self._created_clsact.add(idx)
            except Exception as e:
                if getattr(e, "code", None) != errno.EEXIST:
                    raise RuntimeError(f"unable to add a clsact qdisc to {name}: {e}") from e
        for direction in PARENTS:
            try:
                self._add_filter(ipr, idx, direction)
            except Exception as e:
                if getattr(e, "code", None) != errno.EEXIST:
                    raise RuntimeError(f"unable to attach to {name} {direction}: {e}") from e
                if not _take_over_orphan(ipr, idx, direction):
                    raise RuntimeError(f"unable to attach to {name} {direction}: {e} (prio {TC_PRIO} handle "
                                       f"{TC_HANDLE:#x} is taken: another hdrlog collector on it?)") from e
                self._add_filter(ipr, idx, direction)
            self.attached.append((name, idx, direction))

    def _add_filter(self, ipr, idx: int, direction: str) -> None:
        fn = self._fns[direction]
        ipr.tc("add-filter", "bpf", idx, TC_HANDLE, fd=fn.fd,
               name=fn.name.decode() if isinstance(fn.name, bytes) else fn.name,
               parent=PARENTS[direction], prio=TC_PRIO, classid=1, direct_action=True)

    def _attach_link(self, idx: int, direction: str, inheritance) -> None:
        """Attach through a tcx link: the predecessor's, with our program swapped in, or a new one."""
        fd = self._fns[direction].fd
        link = inheritance.take_link(idx, direction) if inheritance else None
        if link is not None:
            self.link_fds[(idx, direction)] = link
            bpfsys.link_update(link, fd)  # atomic: each packet sees the old program or ours
            return
        link = bpfsys.link_create(fd, idx, direction)
        self.link_fds[(idx, direction)] = link
        if self._keep_link is not None:
            self._keep_link(idx, direction, link)

    def forget_missing(self, present: set[int], forget_link: Callable | None = None) -> list[str]:
        """Drop what we hold on interfaces that no longer exist (the kernel detached us with them);
        returns their names. ``forget_link(ifindex, direction)`` takes a link out of the fd store."""
        gone = [(name, idx, d) for name, idx, d in self.attached if idx not in present]
        for name, idx, direction in gone:
            self.attached.remove((name, idx, direction))
            fd = self.link_fds.pop((idx, direction), None)
            if fd is not None:
                os.close(fd)
                if forget_link is not None:
                    forget_link(idx, direction)
            self._created_clsact.discard(idx)
        return sorted({name for name, _, _ in gone})

    def detach(self) -> None:
        """Close our tcx links (detaching them unless systemd keeps copies) and remove our tc filters."""
        for fd in self.link_fds.values():
            os.close(fd)
        self.link_fds.clear()
        if self.kind == "tcx" or not (self.attached or self._created_clsact):
            self.attached.clear()
            return
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for name, idx, direction in reversed(self.attached):
                try:
                    _del_own_filter(ipr, idx, direction)
                except Exception as e:  # interface gone, or someone removed it
                    log.warning("capture: unable to detach from %s %s: %s", name, direction, e)
            self.attached.clear()
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


# -- orphans: filters a killed collector left -------------------------------------------------

def _take_over_orphan(ipr, idx: int, direction: str) -> bool:
    """Delete our prio/handle's filter when no live process holds its program; True if done."""
    for msg in _filters(ipr, idx, direction):
        if _is_ours(msg, direction) and is_orphan(idx, direction, TC_PRIO, TC_HANDLE):
            ipr.tc("del-filter", "bpf", idx, TC_HANDLE, parent=PARENTS[direction], prio=TC_PRIO)
            return True
    return False


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
