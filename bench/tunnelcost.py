"""BPF cost of tunnel decapsulation (bpf/tunnel.h): this tree against another tree, in one process.

bench/bpfcost.py's method: the real classifier of each tree runs in the kernel through
BPF_PROG_TEST_RUN (100k runs per round, rounds alternating between the trees, ring drained
between rounds) with kernel.bpf_stats_enabled=1, beside an empty classifier (the floor of the
measurement). Frames: an IPv4 TCP ACK (1,400 bytes of payload, not tunnelled: what must not
regress) and the same TCP ACK inside VXLAN (outer IPv4/UDP to 4789, VNI 4242): the baseline tree
sees a plain UDP packet there, this tree opens it. Modes packets (every packet a record) and auto
(connections, one flow: the map-hit path).

    .venv/bin/python -m bench.tunnelcost [--baseline /work/main]
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from bench import bpfcost
from bench.bpfrun import bpf_stats
from bench.consumer import ipv4_tcp_frame

HERE = Path(__file__).resolve().parents[1]
MODES = ("packets", "auto")


def vxlan_frame() -> bytes:
    from scapy.all import IP, TCP, UDP, Ether, Raw
    from scapy.layers.vxlan import VXLAN

    inner = (Ether(src="02:48:44:00:01:01", dst="02:48:44:00:01:02") / IP(src="198.18.251.1", dst="198.18.251.2")
             / TCP(sport=40000, dport=5201, flags="A") / Raw(b"\0" * 1350))
    return bytes(Ether(src="02:48:44:00:00:01", dst="02:48:44:00:00:02") / IP(src="198.18.0.1", dst="198.18.0.2")
                 / UDP(sport=49152, dport=4789) / VXLAN(vni=4242) / inner)


def _prog(tree: Path) -> bpfcost._Prog:
    os.environ["HDRLOG_BENCH_BPF_SOURCE"] = str(tree / "bpf" / "hdrlog.c")
    try:
        return bpfcost._Prog([])
    finally:
        os.environ.pop("HDRLOG_BENCH_BPF_SOURCE", None)


def run(baseline: Path, rounds: int = 7) -> list[dict]:
    frames = {"tcp-ack": ipv4_tcp_frame(), "vxlan-tcp-ack": vxlan_frame()}
    trees = {"this": HERE, "baseline": baseline}
    progs: dict[str, bpfcost._Prog] = {}
    res: dict[tuple, list[float]] = {}
    try:
        for name, tree in trees.items():
            progs[name] = _prog(tree)
        with bpf_stats():
            floor = bpfcost._floor(frames["tcp-ack"])
            for mode in MODES:
                for p in progs.values():
                    p.set_mode(mode)
                for _ in range(rounds):
                    for fname, frame in frames.items():
                        for name, p in progs.items():
                            res.setdefault((name, mode, fname), []).append(p.round(frame))
    finally:
        for p in progs.values():
            p.close()
    rows = []
    for mode in MODES:
        for fname in frames:
            ns = statistics.median(res[("this", mode, fname)])
            base = statistics.median(res[("baseline", mode, fname)])
            rows.append({
                "figure": f"BPF ns/packet, {fname}, mode {mode}",
                "value": f"{ns:.0f} ns",
                "baseline": f"{base:.0f} ns ({baseline}: " + ("not tunnelled" if fname == "tcp-ack" else
                                                              "a plain UDP packet there") + ")",
                "ratio": f"{ns / base:.2f}x",
                "note": f"median of {rounds} x {bpfcost.RUNS} runs, trees alternating; empty classifier {floor:.0f} ns",
            })
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default="/work/main", type=Path)
    ap.add_argument("--rounds", default=7, type=int)
    a = ap.parse_args()
    for row in run(a.baseline, a.rounds):
        print(row)
