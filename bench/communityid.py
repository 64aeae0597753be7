"""Benchmark: Community ID v1 per second, hdrlog's batched and per-tuple forms vs Corelight's
reference (PyPI ``communityid``, one ``FlowTuple`` + ``calc`` per tuple), same run.

    .venv/bin/python -m bench.communityid [--n 100000] [--repeat 3]

The tuples are a mix like a connection table's: IPv4 and IPv6, TCP, UDP, ICMP echo,
ICMPv6. Best of ``--repeat`` runs for each form; ratios are against the reference.
No root needed.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from hdrlog.collector.communityid import addr16, community_id, community_ids


def tuples(n: int, seed: int = 1) -> list[tuple]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        v6 = rnd.random() < 0.3
        s = f"2001:db8:{rnd.randrange(65536):x}::{rnd.randrange(65536):x}" if v6 else \
            f"198.{18 + rnd.randrange(2)}.{rnd.randrange(256)}.{rnd.randrange(256)}"
        d = f"2001:db8:{rnd.randrange(65536):x}::{rnd.randrange(65536):x}" if v6 else \
            f"198.{18 + rnd.randrange(2)}.{rnd.randrange(256)}.{rnd.randrange(256)}"
        kind = rnd.random()
        if kind < 0.6:
            out.append((6, s, d, rnd.randrange(1024, 65536), rnd.choice([80, 443, 22, 5432])))
        elif kind < 0.9:
            out.append((17, s, d, rnd.randrange(1024, 65536), 53))
        else:
            out.append((58 if v6 else 1, s, d, 128 if v6 else 8, 0))
    return out


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def run(n: int = 100_000, repeat: int = 3) -> list[dict]:
    import communityid as ref

    rows = tuples(n)
    proto = np.array([r[0] for r in rows], np.uint8)
    s = np.frombuffer(b"".join(addr16(r[1]) for r in rows), np.uint8).reshape(n, 16)
    d = np.frombuffer(b"".join(addr16(r[2]) for r in rows), np.uint8).reshape(n, 16)
    sp = np.array([r[3] for r in rows], np.uint16)
    dp = np.array([r[4] for r in rows], np.uint16)
    algo = ref.CommunityID()
    m = min(n, 20_000)  # the reference is slow: time a slice of the same tuples

    want = [algo.calc(ref.FlowTuple(*r)) for r in rows[:m]]
    assert community_ids(proto[:m], s[:m], d[:m], sp[:m], dp[:m]) == want, "batched form disagrees with reference"

    t_ref = best(lambda: [algo.calc(ref.FlowTuple(*r)) for r in rows[:m]], repeat) / m
    t_one = best(lambda: [community_id(*r) for r in rows[:m]], repeat) / m
    t_batch = best(lambda: community_ids(proto, s, d, sp, dp), repeat) / n
    t_small = best(lambda: [community_ids(proto[i:i + 100], s[i:i + 100], d[i:i + 100], sp[i:i + 100],
                                          dp[i:i + 100]) for i in range(0, m, 100)], repeat) / m
    base = f"{1 / t_ref:,.0f} ids/s"

    def row(figure, t, note):
        return {"figure": figure, "value": f"{1 / t:,.0f} ids/s", "baseline": base,
                "ratio": f"{t_ref / t:.1f}x", "note": note}

    return [
        row("Community ID, reference per call", t_ref, f"pycommunityid FlowTuple+calc, {m:,} tuples"),
        row("Community ID, community_id() per call", t_one, f"text addresses, {m:,} tuples"),
        row("Community ID, community_ids() batch of 100", t_small, "numpy arrays of 16-byte addresses"),
        row(f"Community ID, community_ids() batch of {n:,}", t_batch, "30% IPv6; TCP/UDP/ICMP mix"),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ns = ap.parse_args()
    out = ["| figure | value | baseline (same run) | ratio | how |", "|---|---|---|---|---|"]
    out += [f"| {r['figure']} | {r['value']} | {r['baseline']} | {r['ratio']} | {r['note']} |"
            for r in run(ns.n, ns.repeat)]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
