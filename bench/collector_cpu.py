"""Collector CPU per 100k packets/s, per mode, on real traffic through a lab veth.

A real ``hdrlog server`` and, one mode at a time, a real ``hdrlog collector
--mode M`` watching the root-side end of a lab veth (bench/traffic.py). tcpreplay
sends the mix (64 TCP bulk connections with SYN/FIN, DNS) at ``RATE`` packets/s
from inside the lab namespace. The collector's CPU (user + system, all threads,
from /proc/PID/stat) is read over each replay plus a tail for the last batch and
ack, less its idle CPU measured just before over ``IDLE`` seconds, and divided by
the packets sent (packets mode also with ``--batch-compression 0``, the baseline of the
compression's cost and of its wire bytes, read from the server's status line): CPU seconds per 100k packets = the share of one core that
100k packets/s take. The BPF program's own time runs in the sender's softirq, not
in the collector, and is the bpfcost figure. Baseline: packets mode (every packet
to user space), measured in the same run on the same traffic.
"""

from __future__ import annotations

import math
import statistics
import time

from bench import traffic

MODES = ("packets", "flows", "auto")
# The same packets mode with uncompressed batches (--batch-compression 0, what collectors sent
# before zstd): the baseline of the compression's CPU cost and of its wire bytes.
PLAIN = "packets, uncompressed"
RATE, SECONDS, ROUNDS, TAIL, IDLE = 40_000, 4, 3, 1.5, 2.0


def server_totals(server) -> tuple[int, int]:
    """(rows, serialized Batch bytes) the server has received, from its last status line."""
    import re
    found = re.findall(r"rows=(\d+) .*?bytes=(\d+)", server.log())
    return (int(found[-1][0]), int(found[-1][1])) if found else (0, 0)


def measure(lab, host, server, pcap: str, work, n_pcap: int, mode: str) -> tuple[float, float, float, float]:
    """(CPU s per 100k packets, idle CPU share, achieved packets/s, wire bytes per row), median over the rounds."""
    extra = ("--mode", "packets", "--batch-compression", "0") if mode == PLAIN else ("--mode", mode)
    c = traffic.collector(server, host, work, f"cpu-{mode.split(',')[0]}{'-plain' if mode == PLAIN else ''}", *extra)
    try:
        time.sleep(1.0)
        t0, c0 = time.monotonic(), traffic.proc_cpu(c.proc.pid)
        time.sleep(IDLE)
        idle = (traffic.proc_cpu(c.proc.pid) - c0) / (time.monotonic() - t0)
        per, rates = [], []
        limit = RATE * SECONDS
        rows0, bytes0 = server_totals(server)
        for _ in range(ROUNDS):
            t0, c0 = time.monotonic(), traffic.proc_cpu(c.proc.pid)
            r = traffic.replay(lab, host, pcap, pps=RATE, loops=math.ceil(limit / n_pcap), limit=limit)
            time.sleep(TAIL)
            cpu = traffic.proc_cpu(c.proc.pid) - c0 - idle * (time.monotonic() - t0)
            per.append(max(cpu, 0.0) / r.packets * 100_000)
            rates.append(r.pps)
        time.sleep(1.2)  # the next status line
        rows1, bytes1 = server_totals(server)
        wire = (bytes1 - bytes0) / (rows1 - rows0) if rows1 > rows0 else 0.0
        return statistics.median(per), idle, statistics.median(rates), wire
    finally:
        c.stop()


def run() -> list[dict]:
    res = {}
    with traffic.rig("hbc") as (lab, host, server, pcap, work, n):
        for mode in (PLAIN, *MODES):
            res[mode] = measure(lab, host, server, pcap, work, n, mode)
    base = res["packets"][0]
    rows = []
    for mode, (cpu, idle, pps, _wire) in res.items():
        if mode == PLAIN:
            continue
        rows.append({
            "figure": f"collector CPU per 100k packets/s, mode {mode}",
            "value": f"{cpu * 100:.1f}% of a core",
            "baseline": f"{base * 100:.1f}% (packets mode)",
            "ratio": f"{cpu / base:.2f}x" if base else "n/a",
            "note": (f"user+system CPU of the collector process, less its idle {idle * 100:.1f}%, per packet sent; "
                     f"median of {ROUNDS} x {RATE * SECONDS} packets by tcpreplay at {pps / 1e3:.0f}k pps "
                     f"(TCP bulk + DNS mix)"),
        })
    (cpu, _, _, wire), (plain, _, _, plain_wire) = res["packets"], res[PLAIN]
    rows.append({
        "figure": "collector CPU per 100k packets/s, mode packets, zstd level 1 batches",
        "value": f"{cpu * 100:.1f}% of a core",
        "baseline": f"{plain * 100:.1f}% (same, uncompressed batches)",
        "ratio": f"{cpu / plain:.2f}x" if plain else "n/a",
        "note": "the compression's cost to the collector (acceptance: <= 1.10x); same procedure as above",
    })
    rows.append({
        "figure": "wire bytes per packets row, bench traffic mix (TCP bulk + DNS), mode packets",
        "value": f"{wire:.1f} B",
        "baseline": f"{plain_wire:.1f} B (uncompressed batches)",
        "ratio": f"{wire / plain_wire:.2f}x" if plain_wire else "n/a",
        "note": "serialized Batch bytes the server received / rows, from its status line, over the rounds above",
    })
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
