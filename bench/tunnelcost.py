"""BPF cost of tunnel decapsulation (bpf/tunnel.h): this tree against another tree, in one process.

bench/bpfcost.py's method: the real classifier of each tree runs in the kernel through
BPF_PROG_TEST_RUN (100k runs per round, rounds alternating between the trees, ring drained
between rounds) with kernel.bpf_stats_enabled=1, beside an empty classifier (the floor of the
measurement). Frames: an IPv4 TCP ACK (1,400 bytes of payload, not tunnelled: what must not
regress) and the same TCP ACK inside VXLAN (outer IPv4/UDP to 4789, VNI 4242): a tree before
tunnels sees a plain UDP packet there, a tree with them opens it; and the VXLAN one on a custom
port (14789), plain UDP to the baseline and to this tree's default config.
Modes packets (every packet a record) and auto (connections, one flow: the map-hit path).

This tree runs in three configs (collector tunnels / vxlan_ports / geneve_ports, compiled in by
bpf/build.py tunnel_cflags): the defaults; more ports (VXLAN 4789, 8472, 14789; Geneve 6081,
16081: the custom-port frame is opened); tunnels none (nothing opened).

    .venv/bin/python -m bench.tunnelcost [--baseline /work/main]
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from types import SimpleNamespace

from bench import bpfcost
from bench.bpfrun import bpf_stats
from bench.consumer import ipv4_tcp_frame

HERE = Path(__file__).resolve().parents[1]
MODES = ("packets", "auto")


CONFIGS = {
    "this": SimpleNamespace(),
    "this, more ports": SimpleNamespace(vxlan_ports=[4789, 8472, 14789], geneve_ports=[6081, 16081]),
    "this, tunnels none": SimpleNamespace(tunnels=[]),
}


def vxlan_frame(port: int = 4789) -> bytes:
    from scapy.all import IP, TCP, UDP, Ether, Raw
    from scapy.layers.vxlan import VXLAN

    inner = (Ether(src="02:48:44:00:01:01", dst="02:48:44:00:01:02") / IP(src="198.18.251.1", dst="198.18.251.2")
             / TCP(sport=40000, dport=5201, flags="A") / Raw(b"\0" * 1350))
    return bytes(Ether(src="02:48:44:00:00:01", dst="02:48:44:00:00:02") / IP(src="198.18.0.1", dst="198.18.0.2")
                 / UDP(sport=49152, dport=port) / VXLAN(vni=4242) / inner)


def _prog(tree: Path, extra: list[str] | None = None) -> bpfcost._Prog:
    os.environ["HDRLOG_BENCH_BPF_SOURCE"] = str(tree / "bpf" / "hdrlog.c")
    try:
        return bpfcost._Prog(extra or [])
    finally:
        os.environ.pop("HDRLOG_BENCH_BPF_SOURCE", None)


def run(baseline: Path, rounds: int = 7) -> list[dict]:
    from hdrlog.bpf import build

    frames = {"tcp-ack": ipv4_tcp_frame(), "vxlan-tcp-ack": vxlan_frame(), "vxlan14789-tcp-ack": vxlan_frame(14789)}
    progs: dict[str, bpfcost._Prog] = {}
    res: dict[tuple, list[float]] = {}
    floors: list[float] = []
    eb = None
    try:
        for name, cfg in CONFIGS.items():
            progs[name] = _prog(HERE, build.tunnel_cflags(cfg))
        progs["baseline"] = _prog(baseline)
        eb, efn = bpfcost._empty()
        with bpf_stats():
            for mode in MODES:
                for p in progs.values():
                    p.set_mode(mode)
                for _ in range(rounds):
                    floors.append(bpfcost._floor_round(efn.fd, frames["tcp-ack"]))  # between rounds, as bpfcost
                    for fname, frame in frames.items():
                        for name, p in progs.items():
                            res.setdefault((name, mode, fname), []).append(p.round(frame))
    finally:
        for p in progs.values():
            p.close()
        if eb is not None:
            eb.cleanup()
    floor = statistics.median(floors)
    rows = []
    for mode in MODES:
        for fname in frames:
            base = statistics.median(res[("baseline", mode, fname)])
            for name in CONFIGS:
                ns = statistics.median(res[(name, mode, fname)])
                rows.append({
                    "figure": f"BPF ns/packet, {fname}, mode {mode}, {name}",
                    "value": f"{ns:.0f} ns",
                    "baseline": f"{base:.0f} ns ({baseline}: " + ("not tunnelled" if fname == "tcp-ack" else
                                                                  "opened" if fname == "vxlan-tcp-ack" else
                                                                  "a plain UDP packet") + ")",
                    "ratio": f"{ns / base:.2f}x",
                    "note": f"median of {rounds} x {bpfcost.RUNS} runs, trees alternating; "
                            f"empty classifier {floor:.0f} ns",
                })
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default="/work/main", type=Path)
    ap.add_argument("--rounds", default=7, type=int)
    a = ap.parse_args()
    for row in run(a.baseline, a.rounds):
        print(row)
