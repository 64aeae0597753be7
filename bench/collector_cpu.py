"""Collector CPU per 100k packets/s, per mode, on real traffic through a lab veth.

A real ``hdrlog server`` and, one mode at a time, a real ``hdrlog collector
--mode M`` watching the root-side end of a lab veth (bench/traffic.py). tcpreplay
sends the mix (64 TCP bulk connections with SYN/FIN, DNS) at ``RATE`` packets/s
from inside the lab namespace. The collector's CPU (user + system, all threads,
from /proc/PID/stat) is read over each replay plus a tail for the last batch and
ack, less its idle CPU measured just before over ``IDLE`` seconds, and divided by
the packets sent: CPU seconds per 100k packets = the share of one core that
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
RATE, SECONDS, ROUNDS, TAIL, IDLE = 40_000, 4, 3, 1.5, 2.0


def measure(lab, host, server, pcap: str, work, n_pcap: int, mode: str) -> tuple[float, float, float]:
    """(CPU s per 100k packets, idle CPU share, achieved packets/s), median over the rounds."""
    c = traffic.collector(server, host, work, f"cpu-{mode}", "--mode", mode)
    try:
        time.sleep(1.0)
        t0, c0 = time.monotonic(), traffic.proc_cpu(c.proc.pid)
        time.sleep(IDLE)
        idle = (traffic.proc_cpu(c.proc.pid) - c0) / (time.monotonic() - t0)
        per, rates = [], []
        limit = RATE * SECONDS
        for _ in range(ROUNDS):
            t0, c0 = time.monotonic(), traffic.proc_cpu(c.proc.pid)
            r = traffic.replay(lab, host, pcap, pps=RATE, loops=math.ceil(limit / n_pcap), limit=limit)
            time.sleep(TAIL)
            cpu = traffic.proc_cpu(c.proc.pid) - c0 - idle * (time.monotonic() - t0)
            per.append(max(cpu, 0.0) / r.packets * 100_000)
            rates.append(r.pps)
        return statistics.median(per), idle, statistics.median(rates)
    finally:
        c.stop()


def run() -> list[dict]:
    res = {}
    with traffic.rig("hbc") as (lab, host, server, pcap, work, n):
        for mode in MODES:
            res[mode] = measure(lab, host, server, pcap, work, n, mode)
    base = res["packets"][0]
    rows = []
    for mode, (cpu, idle, pps) in res.items():
        rows.append({
            "figure": f"collector CPU per 100k packets/s, mode {mode}",
            "value": f"{cpu * 100:.1f}% of a core",
            "baseline": f"{base * 100:.1f}% (packets mode)",
            "ratio": f"{cpu / base:.2f}x" if base else "n/a",
            "note": (f"user+system CPU of the collector process, less its idle {idle * 100:.1f}%, per packet sent; "
                     f"median of {ROUNDS} x {RATE * SECONDS} packets by tcpreplay at {pps / 1e3:.0f}k pps "
                     f"(TCP bulk + DNS mix)"),
        })
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
