"""The few bpf(2) commands BCC does not give us: tcx links, program queries, map lookups by fd.

Since Linux 6.6 a TC program can be attached through a BPF link (attach types
BPF_TCX_INGRESS/EGRESS) instead of a cls_bpf filter. Two properties make the
collector's life simpler and its restarts lossless:

* the attachment lives exactly as long as some process (or systemd's fd store)
  holds the link's fd: a collector that dies, even by SIGKILL, leaves nothing
  attached, and one whose fds are kept by systemd keeps capturing while it
  restarts (collector/handover.py);
* ``BPF_LINK_UPDATE`` swaps the program behind a link atomically: every packet
  runs either the old program or the new one, never neither or both.

Raw ``bpf(2)`` calls through ctypes: Debian 12's libbpf predates tcx. Needs
CAP_BPF and CAP_NET_ADMIN, like the cls_bpf path.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct

SYS_BPF = 321  # x86_64
BPF_MAP_LOOKUP_ELEM = 1
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
ATTACH_TYPES = {"ingress": BPF_TCX_INGRESS, "egress": BPF_TCX_EGRESS}
ATTR_SIZE = 128  # union bpf_attr prefix we fill; the rest must be zero

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    rc = _libc.syscall(SYS_BPF, cmd, attr, ctypes.sizeof(attr))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


def link_create(prog_fd: int, ifindex: int, direction: str) -> int:
    """Attach ``prog_fd`` to the tcx hook of ``ifindex``; returns the link fd (close it to detach)."""
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into("<III", attr, 0, prog_fd, ifindex, ATTACH_TYPES[direction])
    fd = _bpf(BPF_LINK_CREATE, attr)
    os.set_inheritable(fd, False)
    return fd


def link_update(link_fd: int, new_prog_fd: int) -> None:
    """Swap the program behind a link atomically."""
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into("<II", attr, 0, link_fd, new_prog_fd)
    _bpf(BPF_LINK_UPDATE, attr)


def attached_prog_ids(ifindex: int, direction: str) -> list[int]:
    """Ids of the programs attached to the tcx hook of ``ifindex`` (any owner), in run order."""
    ids = (ctypes.c_uint32 * 64)()
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    # query: target_ifindex, attach_type, query_flags, attach_flags, prog_ids (u64 ptr), count
    struct.pack_into("<IIIIQI", attr, 0, ifindex, ATTACH_TYPES[direction], 0, 0, ctypes.addressof(ids), len(ids))
    try:
        _bpf(BPF_PROG_QUERY, attr)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EINVAL, errno.ENODEV):  # nothing attached / no tcx / gone
            return []
        raise
    count = struct.unpack_from("<I", attr, 24)[0]
    return list(ids[: min(count, len(ids))])


def prog_id(fd: int) -> int:
    """The id of the program behind an fd we hold: a program's own, or the one a link runs now."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("prog_id:"):
                return int(line.split()[1])
    raise ValueError(f"fd {fd} is neither a BPF program nor a link")


def prog_name(prog_id: int) -> str:
    """A loaded program's name, by id ("" when it is gone). Needs CAP_SYS_ADMIN (tests, the demo)."""
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into("<I", attr, 0, prog_id)
    try:
        fd = _bpf(BPF_PROG_GET_FD_BY_ID, attr)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return ""
        raise
    try:
        info = ctypes.create_string_buffer(80)  # struct bpf_prog_info up to name[16] at offset 64
        attr = ctypes.create_string_buffer(ATTR_SIZE)
        struct.pack_into("<IIQ", attr, 0, fd, len(info), ctypes.addressof(info))
        _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
        return info.raw[64:80].split(b"\0")[0].decode()
    finally:
        os.close(fd)


def tcx_program_names(ifname: str, direction: str) -> list[str]:
    """Names of the programs on an interface's tcx hook, in run order ([] if it has none or is gone)."""
    try:
        ifindex = socket.if_nametoindex(ifname)
    except OSError:
        return []
    return [name for name in map(prog_name, attached_prog_ids(ifindex, direction)) if name]


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes:
    """The value under ``key`` in a map we hold an fd of (``value_size`` bytes; per-CPU maps:
    the value size rounded up to 8, times the possible CPUs)."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into("<IIQQ", attr, 0, map_fd, 0, ctypes.addressof(k), ctypes.addressof(v))
    _bpf(BPF_MAP_LOOKUP_ELEM, attr)
    return v.raw


def possible_cpus() -> int:
    """How many CPUs per-CPU maps hold a value for (/sys/devices/system/cpu/possible, e.g. "0-3")."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


def unsupported(err: OSError) -> bool:
    """True when a link_create error means "this kernel has no tcx" (before Linux 6.6)."""
    return err.errno in (errno.EINVAL, errno.EOPNOTSUPP, 524)  # 524: the kernel's ENOTSUPP


class _BatchOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


BPF_F_LOCK = 4  # read or write an element under its bpf_spin_lock


def map_batch_read(fd: int, keys, vals, *, delete: bool = False, lock: bool = False, what: str = "map"):
    """Every entry of the hash map ``fd`` through BPF_MAP_LOOKUP_BATCH (or LOOKUP_AND_DELETE_BATCH with
    ``delete``) into the scratch arrays ``keys``/``vals``, whose length is the map's capacity; returns
    copies of what was read. ``lock``: each element is read under its bpf_spin_lock (BPF_F_LOCK)."""
    from bcc import libbcc

    cap, total, first = len(keys), 0, True
    token = ctypes.c_uint32(0) if delete else ctypes.c_uint64(0)  # the types libbcc declares for each call
    opts = _BatchOpts(ctypes.sizeof(_BatchOpts), BPF_F_LOCK if lock else 0, 0)
    while total < cap:
        count = ctypes.c_uint32(cap - total)
        where = (ctypes.c_void_p(keys.ctypes.data + total * keys.itemsize),
                 ctypes.c_void_p(vals.ctypes.data + total * vals.itemsize), ctypes.byref(count))
        batch = (fd, None if first else ctypes.byref(token), ctypes.byref(token), *where)
        rc = (libbcc.lib.bpf_lookup_and_delete_batch(*batch) if delete
              else libbcc.lib.bpf_map_lookup_batch(*batch, ctypes.byref(opts)))
        err = ctypes.get_errno() if rc else 0
        total += count.value
        first = False
        if rc:
            if err == errno.ENOENT or rc == -errno.ENOENT:
                break  # the whole map was read
            raise OSError(err or -rc, f"{what} read: {os.strerror(err or -rc)}")
        if count.value == 0:
            break
    return keys[:total].copy(), vals[:total].copy()
