"""Consumer benchmark: ring-buffer records -> registry columns, per core.

The real classifier (bpf/hdrlog.c) is compiled with a 64 MiB ring buffer and
run in the kernel through BPF_PROG_TEST_RUN on one IPv4 TCP frame until the
ring holds ``FILL`` real records. Then one consumer drains the ring and decodes
everything into ``packets`` columns (records.decode), timed with the thread's
CPU clock. Rounds alternate between hdrlog's bulk mmap reader
(collector/ringbuf.py) and the baseline: BCC's per-record callback
(ringbuf.CallbackReader). Prints records/s per core for both and the ratio.
"""

from __future__ import annotations

import statistics
import time

FILL = 400_000
ROUNDS = 3


def ipv4_tcp_frame() -> bytes:
    from scapy.all import IP, TCP, Ether, Raw

    return bytes(Ether(src="02:48:44:00:00:01", dst="02:48:44:00:00:02") /
                 IP(src="198.18.0.1", dst="198.18.0.2") / TCP(sport=40000, dport=5201, flags="A") /
                 Raw(b"\0" * 1400))


def load(ringbuf_bytes: int = 64 << 20, extra_cflags: list[str] | None = None):
    import os

    from bcc import BPF

    from hdrlog.bpf.build import BPF_SOURCE, cflags
    from hdrlog.collector.capture import CaptureConfig

    cfg = CaptureConfig(ifaces=["lo"], ringbuf_bytes=ringbuf_bytes)
    src = os.environ.get("HDRLOG_BENCH_BPF_SOURCE", str(BPF_SOURCE))  # another tree's C, for A/B runs
    flags = cflags(cfg) + (extra_cflags or [])
    if src != str(BPF_SOURCE):
        flags.insert(0, f"-I{os.path.dirname(src)}")
    bpf = BPF(src_file=src.encode(), cflags=flags)
    fn = bpf.load_func(b"hdrlog_ingress", BPF.SCHED_CLS)
    return bpf, fn


def fill(fn, frame: bytes, n: int) -> None:
    from bench.bpfrun import test_run

    test_run(fn.fd, frame, n)


def drain_decode(read, offset: int) -> tuple[int, float]:
    from hdrlog.collector import records

    ifnames = {1: "lo"}
    n_total = 0
    t0 = time.thread_time()
    while True:
        raw, n, tails = read()
        if not n:
            break
        if tails:
            records.decode(raw, n, ifnames, offset, 1, payloads=tails)
        else:
            records.decode(raw, n, ifnames, offset, 1)
        n_total += n
    return n_total, time.thread_time() - t0


def run() -> list[dict]:
    from hdrlog.collector import records
    from hdrlog.collector.records import mono_to_wall_offset_ns
    from hdrlog.collector.ringbuf import CallbackReader
    from hdrlog.collector.ringbuf import RingBufReader

    frame = ipv4_tcp_frame()
    bpf, fn = load()
    offset = mono_to_wall_offset_ns()
    ours, base = [], []
    try:
        reader = RingBufReader(bpf[b"records"].map_fd, records.RECORD_SIZE, max_records=1 << 16)
        cb = CallbackReader(bpf, "records", records.RECORD_SIZE)
        for _ in range(ROUNDS):
            fill(fn, frame, FILL)
            n, cpu = drain_decode(lambda: reader.read(0), offset)
            assert n == FILL, (n, FILL)
            ours.append(n / cpu)
            fill(fn, frame, FILL)
            n, cpu = drain_decode(lambda: cb.read(0), offset)
            assert n == FILL, (n, FILL)
            base.append(n / cpu)
        reader.close()
    finally:
        bpf.cleanup()
    o, b = statistics.median(ours), statistics.median(base)
    return [{
        "figure": "consumer: records/s per core, ring buffer -> packets columns",
        "value": f"{o / 1e6:.2f} M/s",
        "baseline": f"{b / 1e6:.3f} M/s (BCC callback + same decode)",
        "ratio": f"{o / b:.1f}x",
        "note": f"median of {ROUNDS} rounds of {FILL} records, thread CPU time",
    }]


if __name__ == "__main__":
    for row in run():
        print(row)
