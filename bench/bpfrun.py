"""Kernel-side helpers for the benchmarks: BPF_PROG_TEST_RUN and the kernel's BPF run-time stats.

``test_run(prog_fd, frame, repeat)`` runs a loaded program ``repeat`` times on one
frame inside the kernel (no traffic, no network: the frame never leaves the
call) — a quick way to fill a ring buffer with real records, or to measure a
program on one exact kind of packet. ``bpf_stats()`` switches
``kernel.bpf_stats_enabled`` on for a block and restores the old value, also on
error; ``prog_stats(fd)`` reads ``run_time_ns`` / ``run_cnt`` from fdinfo.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

SYS_BPF = 321  # x86_64
BPF_PROG_TEST_RUN = 10
STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"

_libc = ctypes.CDLL(None, use_errno=True)


class _TestRunAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint8 * 84),
    ]


def test_run(prog_fd: int, frame: bytes, repeat: int = 1) -> tuple[int, int]:
    """Run the program ``repeat`` times on ``frame``: (return value, mean ns per run by the kernel)."""
    buf = ctypes.create_string_buffer(frame, len(frame))
    out = ctypes.create_string_buffer(len(frame) + 256)
    attr = _TestRunAttr(prog_fd=prog_fd, data_size_in=len(frame), data_in=ctypes.addressof(buf),
                        data_size_out=len(out), data_out=ctypes.addressof(out), repeat=repeat)
    rc = _libc.syscall(SYS_BPF, BPF_PROG_TEST_RUN, ctypes.byref(attr), ctypes.sizeof(attr))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_PROG_TEST_RUN: {os.strerror(err)}")
    return attr.retval, attr.duration


def prog_stats(prog_fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a program, from /proc/self/fdinfo."""
    vals = {}
    with open(f"/proc/self/fdinfo/{prog_fd}") as f:
        for line in f:
            k, _, v = line.partition(":")
            vals[k.strip()] = v.strip()
    return int(vals.get("run_time_ns", 0)), int(vals.get("run_cnt", 0))


@contextlib.contextmanager
def bpf_stats():
    """kernel.bpf_stats_enabled=1 inside the block; the old value is put back afterwards."""
    with open(STATS_SYSCTL) as f:
        old = f.read().strip()
    with open(STATS_SYSCTL, "w") as f:
        f.write("1")
    try:
        yield
    finally:
        with open(STATS_SYSCTL, "w") as f:
            f.write(old)
