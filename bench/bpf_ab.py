"""BPF cost per packet of several builds of the classifier, side by side in one run.

    python -m bench.bpf_ab [--tree NAME=REV_OR_DIR[:CFLAG,CFLAG...]] ... [--rounds 7] [--modes packets,flows,auto]

Each tree is a git revision (its bpf/ is extracted into a temporary directory) or a
directory holding hdrlog.c and its headers; ``:`` after it adds -D flags to that build
(an elimination build: ``--tree noout=.:-DHDRLOG_AB_NO_OUTPUT=1``). Default: ``base=main``
against ``this=.`` (the working tree). Every build is loaded in one process and measured
bench/bpfcost.py's way (kernel bpf_stats, 100000 BPF_PROG_TEST_RUN runs of one IPv4 TCP ACK
per round, ring drained between rounds), rounds alternating between the builds and their
order reversed every round, beside an empty classifier (the floor) measured between the
rounds. Prints, per mode, each build's median ns, its ratio to the first build, and the
medians less the floor. Needs root.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile

from bench import bpfcost
from bench.bpfrun import bpf_stats, prog_stats, test_run
from bench.consumer import ipv4_tcp_frame

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree_dir(spec: str, tmp: str, name: str) -> str:
    if os.path.isdir(spec):
        return os.path.join(os.path.abspath(spec), "bpf") if os.path.isfile(os.path.join(spec, "bpf", "hdrlog.c")) \
            else os.path.abspath(spec)
    out = os.path.join(tmp, name)
    os.makedirs(out)
    tar = subprocess.run(["git", "-C", REPO, "archive", spec, "bpf"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", out], input=tar, check=True)
    return os.path.join(out, "bpf")


def _load(src_dir: str, extra: list[str]) -> bpfcost._Prog:
    old = os.environ.get("HDRLOG_BENCH_BPF_SOURCE")
    os.environ["HDRLOG_BENCH_BPF_SOURCE"] = os.path.join(src_dir, "hdrlog.c")
    try:
        return bpfcost._Prog(extra)
    finally:
        if old is None:
            os.environ.pop("HDRLOG_BENCH_BPF_SOURCE")
        else:
            os.environ["HDRLOG_BENCH_BPF_SOURCE"] = old


def _empty():
    from bcc import BPF

    b = BPF(text=b"int empty(struct __sk_buff *skb) { return -1; }")
    return b, b.load_func(b"empty", BPF.SCHED_CLS)


def _round(fd: int, frame: bytes) -> float:
    t0, c0 = prog_stats(fd)
    test_run(fd, frame, bpfcost.RUNS)
    t1, c1 = prog_stats(fd)
    return (t1 - t0) / (c1 - c0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", default=[], help="NAME=REV_OR_DIR[:-DFLAG,...] (repeatable)")
    ap.add_argument("--rounds", type=int, default=bpfcost.ROUNDS)
    ap.add_argument("--modes", default=",".join(bpfcost.MODES))
    ns = ap.parse_args()
    specs = ns.tree or ["base=main", "this=."]
    modes = [m for m in ns.modes.split(",") if m]
    frame = ipv4_tcp_frame()
    tmp = tempfile.mkdtemp(prefix="hdrlog-ab-")
    progs: dict[str, bpfcost._Prog] = {}
    eb = None
    try:
        for spec in specs:
            name, _, rest = spec.partition("=")
            where, _, flags = rest.partition(":")
            progs[name] = _load(_tree_dir(where, tmp, name), [f for f in flags.split(",") if f])
        eb, efn = _empty()
        res: dict[tuple[str, str], list[float]] = {}
        floor: list[float] = []
        with bpf_stats():
            for mode in modes:
                for p in progs.values():
                    p.set_mode(mode)
                order = list(progs.items())
                for i in range(ns.rounds):
                    floor.append(_round(efn.fd, frame))
                    for name, p in (order if i % 2 == 0 else order[::-1]):
                        res.setdefault((name, mode), []).append(p.round(frame))
        fl = statistics.median(floor)
        first = next(iter(progs))
        print(f"floor (empty classifier): {fl:.0f} ns (median of {len(floor)}; "
              f"range {min(floor):.0f}-{max(floor):.0f}); load average {os.getloadavg()[0]:.1f}")
        print(f"{'mode':8} {'build':12} {'ns':>6} {'range':>11} {'-floor':>7} {'vs ' + first:>9}")
        for mode in modes:
            b = statistics.median(res[(first, mode)])
            for name in progs:
                v = res[(name, mode)]
                m = statistics.median(v)
                print(f"{mode:8} {name:12} {m:6.0f} {min(v):5.0f}-{max(v):<5.0f} {m - fl:7.0f} {m / b:8.2f}x")
    finally:
        for p in progs.values():
            p.close()
        if eb is not None:
            eb.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
