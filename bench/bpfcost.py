"""BPF cost per packet, per mode, from the kernel's BPF stats (run_time_ns / run_cnt).

The real classifier runs in the kernel on one IPv4 TCP ACK frame through
BPF_PROG_TEST_RUN (100k runs per round, ring drained between rounds) with
kernel.bpf_stats_enabled=1 (restored afterwards). Baseline: the same program in
packets mode, measured in the same run.
"""

from __future__ import annotations

import ctypes
import statistics

from bench.bpfrun import bpf_stats, prog_stats, test_run
from bench.consumer import ipv4_tcp_frame, load

MODES = {"packets": 0, "flows": 1, "auto": 2}
RUNS, ROUNDS = 100_000, 5


def run() -> list[dict]:
    from hdrlog.collector import records
    from hdrlog.collector.ringbuf import RingBufReader

    bpf, fn = load(64 << 20)
    frame = ipv4_tcp_frame()
    res: dict[str, float] = {}
    try:
        outer = bpf[b"flow_maps"]
        for slot in (0, 1):
            outer[ctypes.c_int(slot)] = ctypes.c_int(bpf[f"flows{slot}".encode()].map_fd)
        reader = RingBufReader(bpf[b"records"].map_fd, records.RECORD_SIZE)
        cfg = bpf[b"cfg"]
        with bpf_stats():
            for mode, m in MODES.items():
                leaf = cfg.Leaf()
                leaf.mode, leaf.sample_n, leaf.first_packets = m, (100 if mode == "auto" else 1), 3
                cfg[cfg.Key(0)] = leaf
                per = []
                for _ in range(ROUNDS):
                    t0, c0 = prog_stats(fn.fd)
                    test_run(fn.fd, frame, RUNS)
                    t1, c1 = prog_stats(fn.fd)
                    per.append((t1 - t0) / (c1 - c0))
                    while reader.read(0)[1]:
                        pass
                res[mode] = statistics.median(per)
        reader.close()
    finally:
        bpf.cleanup()
    base = res["packets"]
    return [{
        "figure": f"BPF ns/packet, IPv4 TCP ACK, mode {mode}",
        "value": f"{ns:.0f} ns",
        "baseline": f"{base:.0f} ns (packets mode)",
        "ratio": f"{ns / base:.2f}x",
        "note": f"kernel bpf_stats, median of {ROUNDS} x {RUNS} BPF_PROG_TEST_RUN runs (one flow: map-hit path)",
    } for mode, ns in res.items()]


if __name__ == "__main__":
    for row in run():
        print(row)
