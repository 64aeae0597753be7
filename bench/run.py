"""`make bench`: run every benchmark, print one table, write it into BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import sys

from bench import bpfcost, consumer

BENCHES = (consumer, bpfcost)


def table(rows: list[dict]) -> str:
    out = ["| figure | value | baseline (same run) | ratio | how |", "|---|---|---|---|---|"]
    out += [f"| {r['figure']} | {r['value']} | {r['baseline']} | {r['ratio']} | {r['note']} |" for r in rows]
    return "\n".join(out)


def main() -> int:
    rows = []
    for b in BENCHES:
        rows += b.run()
    t = table(rows)
    print(t)
    machine = f"{platform.node()}: {platform.machine()}, {os.cpu_count()} CPUs, kernel {platform.release()}"
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(f"# hdrlog benchmarks\n\nMachine: {machine}\n\nCommand: `make bench` "
                    f"(= `.venv/bin/python -m bench.run BENCHMARKS.md`, as root)\n\n{t}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
