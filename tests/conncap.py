"""A capture in auto mode inside a lab namespace, printing its ``connections`` rows as JSON lines.

The bridge lab's ends (tests/bridge.py) and the corpus lab (tests/corpus/lab.py) live in
namespaces, so the capture runs there too, as a child process::

    ip netns exec NS python -m tests.conncap --iface eth0 [--interim S --tcp-timeout S ...] [--replay FILE ...]

It prints ``{"ready": true}`` once attached, then one JSON object per connection row (addresses
as text, IPv4-mapped ones as dotted quads). Live mode: rows as the drain produces them, until a
line ``stop`` (or EOF) on stdin, then the final rows of everything still open and
``{"done": true, "counters": ...}``. Replay mode: for each file, ``tcpreplay --topspeed`` on the
interface, then it waits until the connection map is empty (every connection of the file has
its final row: the timeouts are short here) and tags the file's rows with ``"file"``, so files
that reuse a 5-tuple do not merge.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import select
import subprocess
import sys
import time

from hdrlog.collector import connections as cm
from hdrlog.collector.capture import Capture, CaptureConfig


def _addr(b: bytes) -> str:
    a = ipaddress.IPv6Address(b)
    return str(a.ipv4_mapped) if a.ipv4_mapped else str(a)


def rows_of(cols: dict | None, keep=lambda cols, i: True) -> list[dict]:
    """A drain's columns as rows (addresses as text, numbers as Python ints), those ``keep(cols, i)``
    accepts; none for an empty drain (None)."""
    if not cols:
        return []
    out = []
    for i in range(len(next(iter(cols.values())))):
        if not keep(cols, i):
            continue
        r = {}
        for k, v in cols.items():
            x = v[i]
            if getattr(v, "dtype", None) is not None and v.dtype.kind == "V":
                x = _addr(x.tobytes())
            elif hasattr(x, "item"):
                x = x.item()
            r[k] = x
        out.append(r)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iface", required=True)
    ap.add_argument("--host", default="conncap")
    ap.add_argument("--interim", type=float, default=60.0)
    ap.add_argument("--tcp-timeout", type=float, default=5.0)
    ap.add_argument("--udp-timeout", type=float, default=3.0)
    ap.add_argument("--icmp-timeout", type=float, default=3.0)
    ap.add_argument("--linger", type=float, default=0.3)
    ap.add_argument("--replay", nargs="*", default=None)
    args = ap.parse_args()
    cap = Capture(CaptureConfig(
        ifaces=[args.iface], mode="auto", host=args.host, ringbuf_bytes=16 << 20,
        conn=cm.ConnConfig(interim=args.interim, tcp_timeout=args.tcp_timeout, udp_timeout=args.udp_timeout,
                           icmp_timeout=args.icmp_timeout, linger=args.linger)))
    cap.start()

    def emit(rows: list[dict], **extra) -> None:
        for r in rows:
            print(json.dumps({**r, **extra}), flush=True)

    def pull(**extra) -> int:
        while cap.poll(0):  # keep the ring buffer from filling; the packet rows are not needed
            pass
        rows = rows_of(cap.drain_connections())
        emit(rows, **extra)
        return len(rows)

    try:
        print(json.dumps({"ready": True}), flush=True)
        if args.replay is not None:
            longest = max(args.tcp_timeout, args.udp_timeout, args.icmp_timeout)
            for path in args.replay:
                p = subprocess.run(["tcpreplay", f"--intf1={args.iface}", "--topspeed", path],
                                   capture_output=True, text=True, timeout=120)
                deadline = time.monotonic() + longest + 5
                while time.monotonic() < deadline:
                    pull(file=path)
                    if not len(cap._conn_drain.read_all()[0]):  # every connection of the file is out
                        break
                    time.sleep(0.1)
                print(json.dumps({"replayed": path, "rc": p.returncode}), flush=True)
        else:
            while True:
                pull()
                ready, _, _ = select.select([sys.stdin], [], [], 0.2)
                if ready:
                    line = sys.stdin.readline()
                    if not line or line.strip() == "stop":
                        break
    finally:
        cap.stop()
        emit(rows_of(cap.drain_connections()))
        print(json.dumps({"done": True, "counters": cap.counters()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
