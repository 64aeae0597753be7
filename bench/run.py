"""`make bench`: run every benchmark, print one table, write it into BENCHMARKS.md.

    python -m bench.run [OUT.md] [--only consumer,bpfcost,server_rows,conn_storage,collector_cpu,e2e,restart_gap]

Each benchmark module has ``run() -> [row]``; every row is a figure beside a
baseline measured in the same run, and their ratio (these machines are noisy:
compare ratios between runs, not absolute values). Needs root (eBPF, namespaces).
A ``## Notes`` section already in OUT.md (hand-written analysis) is kept.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

from bench import bpfcost, collector_cpu, conn_storage, consumer, e2e, restart_gap, server_rows

BENCHES = {"consumer": consumer, "bpfcost": bpfcost, "collector_cpu": collector_cpu,
           "server_rows": server_rows, "conn_storage": conn_storage, "e2e": e2e, "restart_gap": restart_gap}
NOTES = "## Notes"


def table(rows: list[dict]) -> str:
    out = ["| figure | value | baseline (same run) | ratio | how |", "|---|---|---|---|---|"]
    out += [f"| {r['figure']} | {r['value']} | {r['baseline']} | {r['ratio']} | {r['note']} |" for r in rows]
    return "\n".join(out)


def machine() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.node()}: {platform.machine()}, {os.cpu_count()} CPUs ({model}), "
            f"kernel {platform.release()}; load average at start {load} (shared machine)")


def main() -> int:
    ap = argparse.ArgumentParser(description="run the hdrlog benchmarks")
    ap.add_argument("out", nargs="?", help="Markdown file to write (BENCHMARKS.md)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHES)}")
    ns = ap.parse_args()
    names = [n for n in ns.only.split(",") if n] or list(BENCHES)
    unknown = set(names) - set(BENCHES)
    if unknown:
        ap.error(f"--only: unknown {', '.join(sorted(unknown))}; choose from {', '.join(BENCHES)}")
    where = machine()
    rows, took = [], {}
    for name in names:
        t = time.monotonic()
        rows += BENCHES[name].run()
        took[name] = time.monotonic() - t
        print(f"bench: {name} done in {took[name]:.0f} s", file=sys.stderr)
    t = table(rows)
    print(t)
    if ns.out:
        notes = ""
        if os.path.exists(ns.out):
            with open(ns.out) as f:
                old = f.read()
            if NOTES in old:
                notes = "\n" + old[old.index(NOTES):].rstrip() + "\n"
        cmd = "`make bench` (= `.venv/bin/python -m bench.run BENCHMARKS.md`, as root)"
        if ns.only:
            cmd += f" with `--only {ns.only}`"
        durations = ", ".join(f"{k} {v:.0f} s" for k, v in took.items())
        with open(ns.out, "w") as f:
            f.write(f"# hdrlog benchmarks\n\nMachine: {where}\n\nCommand: {cmd}; took {durations}\n\n{t}\n{notes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
