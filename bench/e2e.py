"""End to end: the highest packet rate logged with zero loss, and capture-to-queryable latency.

A real ``hdrlog server`` (fresh chDB store) and a real ``hdrlog collector --mode
packets`` (every packet a row: the strictest loss check; default batching, 1 s)
watch the root-side end of a lab veth; tcpreplay sends the mix of
bench/traffic.py from inside the lab namespace (bench/traffic.py).

Zero-loss rate. Baseline: tcpreplay --topspeed with no collector attached, in
the same run: the fastest this machine generates. Then ``BURST`` packets at
topspeed with the collector attached; a trial passes when the rows in
hdrlog.packets for those frames (their destination MAC, their time window)
equal what tcpreplay sent. On loss the rate steps down (--pps) and retries, at
most ``TRIES`` times. The figure is the fastest passing trial.

Latency. ``LAT_PACKETS`` packets at ``LAT_PPS``; a poller asks the SQL endpoint
every ``POLL`` seconds for the frames' rows and takes, for each row seen first
in a poll, (that poll's midpoint) - (the row's capture ts). Baseline: the
poll query's own round trip in the same run (the floor of what a poller can see).
"""

from __future__ import annotations

import math
import statistics
import subprocess
import time

from bench import traffic

BURST, TRIES = 300_000, 3
LAT_PACKETS, LAT_PPS, POLL = 1500, 300, 0.05


def _rows(server, t0_ns: int, t1_ns: int) -> int:
    q = (f"SELECT count() FROM hdrlog.packets WHERE eth_dst = MACStringToNum('{traffic.NOWHERE_MAC}') "
         f"AND ts >= fromUnixTimestamp64Nano({t0_ns}) AND ts < fromUnixTimestamp64Nano({t1_ns})")
    return int(server.sql(q, "TabSeparated").strip())


def _settle(server, t0_ns: int, t1_ns: int, want: int, timeout: float = 60) -> int:
    """Rows for the window once they reach ``want`` or stop growing for 5 s."""
    deadline, last, since = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() < deadline:
        n = _rows(server, t0_ns, t1_ns)
        if n >= want:
            return n
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > 5:
            return n
        time.sleep(0.5)
    return last


def zero_loss(lab, host, server, pcap: str, n_pcap: int) -> tuple[float, int, list[str]]:
    """(fastest zero-loss rate, its packets, trial log)."""
    loops = math.ceil(BURST / n_pcap)
    pps: float | None = None  # topspeed first
    trials = []
    for _ in range(TRIES):
        t0 = time.time_ns()
        r = traffic.replay(lab, host, pcap, pps=pps, loops=loops, limit=BURST)
        t1 = time.time_ns() + 1_000_000_000
        got = _settle(server, t0, t1, r.packets)
        trials.append(f"{r.pps / 1e3:.0f}k pps: {got}/{r.packets}")
        if got == r.packets and r.failed == 0:
            return r.pps, r.packets, trials
        pps = r.pps * 0.6
    return 0.0, 0, trials


def latency(lab, host, server, pcap: str) -> tuple[list[float], list[float]]:
    """(capture-to-queryable latencies s, poll round trips s)."""
    q = ("SELECT toUnixTimestamp64Nano(ts) FROM hdrlog.packets WHERE eth_dst = "
         f"MACStringToNum('{traffic.NOWHERE_MAC}') AND ts >= fromUnixTimestamp64Nano({{t0}})")
    t0 = time.time_ns()
    gen = lab.popen(host, "tcpreplay", "-q", "-i", host.ifname, f"--pps={LAT_PPS}", f"--limit={LAT_PACKETS}", pcap,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[int, int] = {}
    lat, rtt = [], []
    deadline = time.monotonic() + LAT_PACKETS / LAT_PPS + 30
    try:
        while time.monotonic() < deadline and len(seen) < LAT_PACKETS:
            a = time.time_ns()
            text = server.sql(q.format(t0=t0), "TabSeparated")
            b = time.time_ns()
            rtt.append((b - a) / 1e9)
            mid = (a + b) // 2
            counts: dict[int, int] = {}
            for line in text.split():
                ts = int(line)
                counts[ts] = counts.get(ts, 0) + 1
            for ts, c in counts.items():
                new = c - seen.get(ts, 0)
                if new > 0:
                    lat += [(mid - ts) / 1e9] * new
                    seen[ts] = c
            time.sleep(POLL)
    finally:
        if gen.poll() is None:
            gen.kill()
        gen.wait()
    return lat, rtt


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def run() -> list[dict]:
    with traffic.rig("hbe") as (lab, host, server, pcap, work, n):
        loops = math.ceil(BURST / n)
        base = max(traffic.replay(lab, host, pcap, loops=loops, limit=BURST).pps for _ in range(2))
        c = traffic.collector(server, host, work, "e2e", "--batch-interval", "1.0")
        try:
            time.sleep(1.0)
            rate, sent, trials = zero_loss(lab, host, server, pcap, n)
            lat, rtt = latency(lab, host, server, pcap)
        finally:
            c.stop()
    p50, p99, r50 = pct(lat, 50), pct(lat, 99), statistics.median(rtt) if rtt else float("nan")
    return [{
        "figure": "end to end: highest packet rate logged with zero loss (mode packets)",
        "value": f"{rate / 1e3:.0f}k pps" if rate else "none of the trials",
        "baseline": f"{base / 1e3:.0f}k pps (tcpreplay --topspeed, no collector)",
        "ratio": f"{rate / base:.2f}x",
        "note": (f"{BURST} packets of the TCP bulk + DNS mix per trial, every one a row in hdrlog.packets; "
                 f"trials: {'; '.join(trials)}"),
    }, {
        "figure": "end to end: capture-to-queryable latency p50 / p99",
        "value": f"{p50 * 1e3:.0f} / {p99 * 1e3:.0f} ms",
        "baseline": f"{r50 * 1e3:.0f} ms (the poll query's round trip, median)",
        "ratio": f"{p50 / r50:.0f}x / {p99 / r50:.0f}x",
        "note": (f"{len(lat)} of {LAT_PACKETS} packets at {LAT_PPS} pps, polled every {POLL * 1e3:.0f} ms; "
                 f"collector batch_interval 1 s, server flush_interval 0.5 s (defaults)"),
    }]


if __name__ == "__main__":
    for row in run():
        print(row)
