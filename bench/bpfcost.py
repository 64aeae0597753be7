"""BPF cost per packet, per mode, from the kernel's BPF stats (run_time_ns / run_cnt).

The real classifier runs in the kernel on one IPv4 TCP ACK frame through
BPF_PROG_TEST_RUN (100k runs per round, ring drained between rounds) with
kernel.bpf_stats_enabled=1 (restored afterwards), in each mode.

Baseline, in the same run: the same source built with -DHDRLOG_NO_DIRECT=1,
which reads every header with bpf_skb_load_bytes (the parser before direct
packet access). Rounds alternate between the two builds. Also measured, one
round before each pair of rounds: an empty classifier, the floor of this
measurement (bpf_stats' own clock reads, about 47 ns in this VM), reported in
the notes. bench/bpf_ab.py measures other builds (another git revision,
elimination builds with -D flags) the same way, side by side.
"""

from __future__ import annotations

import ctypes
import statistics

from bench.bpfrun import bpf_stats, prog_stats, test_run
from bench.consumer import ipv4_tcp_frame, load

MODES = {"packets": 0, "flows": 1, "auto": 2}
VARIANTS = {"direct": [], "helper": ["-DHDRLOG_NO_DIRECT=1"]}
RUNS, ROUNDS = 100_000, 15  # a round is ~15 ms: 15 rounds keep a loaded machine's bursts out of the median


class _Prog:
    def __init__(self, extra: list[str]):
        from hdrlog.collector import records
        from hdrlog.collector.ringbuf import RingBufReader

        self.bpf, self.fn = load(64 << 20, extra)
        outer = self.bpf[b"flow_maps"]
        for slot in (0, 1):
            outer[ctypes.c_int(slot)] = ctypes.c_int(self.bpf[f"flows{slot}".encode()].map_fd)
        try:  # trees before the connection map's handover have no conn_maps
            self.bpf[b"conn_maps"][ctypes.c_int(0)] = ctypes.c_int(self.bpf[b"conns"].map_fd)
        except KeyError:
            pass
        self.reader = RingBufReader(self.bpf[b"records"].map_fd, records.RECORD_SIZE)

    def set_mode(self, mode: str) -> None:
        cfg = self.bpf[b"cfg"]
        leaf = cfg.Leaf()
        leaf.mode, leaf.sample_n, leaf.first_packets = MODES[mode], (100 if mode == "auto" else 1), 3
        cfg[cfg.Key(0)] = leaf

    def round(self, frame: bytes) -> float:
        t0, c0 = prog_stats(self.fn.fd)
        test_run(self.fn.fd, frame, RUNS)
        t1, c1 = prog_stats(self.fn.fd)
        while self.reader.read(0)[1]:
            pass
        return (t1 - t0) / (c1 - c0)

    def close(self) -> None:
        self.reader.close()
        self.bpf.cleanup()


def _empty():
    from bcc import BPF

    b = BPF(text=b"int empty(struct __sk_buff *skb) { return -1; }")
    return b, b.load_func(b"empty", BPF.SCHED_CLS)


def _floor_round(fd: int, frame: bytes) -> float:
    t0, c0 = prog_stats(fd)
    test_run(fd, frame, RUNS)
    t1, c1 = prog_stats(fd)
    return (t1 - t0) / (c1 - c0)


def run() -> list[dict]:
    frame = ipv4_tcp_frame()
    progs: dict[str, _Prog] = {}
    res: dict[tuple[str, str], list[float]] = {}
    floors: list[float] = []
    eb = None
    try:
        for name, extra in VARIANTS.items():
            progs[name] = _Prog(extra)
        eb, efn = _empty()
        with bpf_stats():
            for mode in MODES:
                for p in progs.values():
                    p.set_mode(mode)
                for _ in range(ROUNDS):
                    floors.append(_floor_round(efn.fd, frame))  # the floor between the rounds, same conditions
                    for name, p in progs.items():
                        res.setdefault((name, mode), []).append(p.round(frame))
    finally:
        for p in progs.values():
            p.close()
        if eb is not None:
            eb.cleanup()
    floor = statistics.median(floors)
    rows = []
    for mode in MODES:
        ns, base = statistics.median(res[("direct", mode)]), statistics.median(res[("helper", mode)])
        rows.append({
            "figure": f"BPF ns/packet, IPv4 TCP ACK, mode {mode}",
            "value": f"{ns:.0f} ns",
            "baseline": f"{base:.0f} ns (headers via bpf_skb_load_bytes only)",
            "ratio": f"{ns / base:.2f}x",
            "note": (f"kernel bpf_stats, median of {ROUNDS} x {RUNS} BPF_PROG_TEST_RUN runs (one flow: map-hit "
                     f"path), builds alternating; an empty classifier measures {floor:.0f} ns here"),
        })
    auto, flows = statistics.median(res[("direct", "auto")]), statistics.median(res[("direct", "flows")])
    rows.append({
        "figure": "BPF ns/packet, IPv4 TCP ACK, auto mode (connections) vs flows mode",
        "value": f"{auto:.0f} ns",
        "baseline": f"{flows:.0f} ns (flows mode, same run)",
        "ratio": f"{auto / flows:.2f}x",
        "note": "auto: the connection tracker (bpf/conntrack.h; counters-only packets lock-free) instead of the flow map, plus "
                "the notable/sample decision; goal <= 1.1x flows mode (issue 13)",
    })
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
