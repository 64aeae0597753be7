"""What a token per batch costs: ``python -m bench.scaleout [--rounds 3]``.

The writer's two dedup scopes (server/writer.py, "Across servers") on the same rows:
``flush`` = the batches of a flush concatenated into one INSERT with one token (one server owns the store);
``batch`` = one INSERT per batch with its own token (several servers share the store). Each into a fresh
embedded chDB store with the full schema (rollup views included), and again through the SQL endpoint's
write user (``--clickhouse http://writer:...@W``: what a stateless server pays against a remote store).
Prints rows/s and the ratio batch / flush measured in the same run (these machines are noisy), then the
bytes on disk per packets row after OPTIMIZE FINAL.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from bench.server_stages import make_batch
from hdrlog.dev.processes import free_port
from hdrlog.server.convert import convert_batch
from hdrlog.server.store import Store
from hdrlog.server.writer import batch_token, concat

FLUSH_ROWS = 50_000


def tables(batch_rows: int, n_batches: int, start: int):
    out = []
    for seq in range(start, start + n_batches):
        tr = convert_batch(make_batch(seq, batch_rows), "bench-host")[0]
        out.append((seq, tr))
    return out


def run_once(store: Store, scope: str, batch_rows: int, start: int) -> float:
    """Rows/s for one flush of FLUSH_ROWS rows made of batches of ``batch_rows``."""
    parts = tables(batch_rows, FLUSH_ROWS // batch_rows, start)
    t0 = time.perf_counter()
    if scope == "flush":
        data = concat([tr.data for _, tr in parts])
        store.insert("packets", data, f"bench-flush-{start}")
    else:
        for seq, tr in parts:
            store.insert("packets", tr.data, batch_token("bench", seq, "packets", int(tr.days[0]), tr.rows))
    return FLUSH_ROWS / (time.perf_counter() - t0)


def measure(store: Store, label: str, rounds: int, sizes: list[int]) -> list[tuple[str, float, float]]:
    out = []
    seq = 1
    for size in sizes:
        rates: dict[str, list[float]] = {"flush": [], "batch": []}
        for r in range(rounds):
            for scope in (("flush", "batch") if r % 2 == 0 else ("batch", "flush")):
                rates[scope].append(run_once(store, scope, size, seq))
                seq += FLUSH_ROWS // size
        out.append((f"{label}, batches of {size} rows", statistics.median(rates["batch"]),
                    statistics.median(rates["flush"])))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="1000,10000")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="hdrlog-scaleout-") as tmp:
        store = Store(f"chdb://{tmp}/embedded")
        store.open()
        store.migrate()
        rows += measure(store, "embedded chDB", args.rounds, sizes)
        store._client.command("OPTIMIZE TABLE hdrlog.packets FINAL")
        n, nbytes = store._client.query("SELECT sum(rows), sum(bytes_on_disk) FROM system.parts "
                                        "WHERE database = 'hdrlog' AND table = 'packets' AND active").result_rows[0]
        r_bytes = store._client.query("SELECT sum(bytes_on_disk) FROM system.parts WHERE database = 'hdrlog' "
                                      "AND table IN ('packets_1m', 'pairs_1m', 'services_1m') AND active").result_rows[0][0]
        store.close()

        port, grpc_port = free_port(), free_port()
        env = {**os.environ, "HDRLOG_SQL_WRITE_PASSWORD": "bench", "HDRLOG_SQL_PASSWORD": "bench-r"}
        w = subprocess.Popen([sys.executable, "-m", "hdrlog", "server", "run", "--insecure", "--listen",
                              f"127.0.0.1:{grpc_port}", "--sql-listen", f"127.0.0.1:{port}", "--clickhouse",
                              f"chdb://{tmp}/w", "--sql-user", "reader", "--sql-write-user", "writer",
                              "--status-interval", "0"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).read()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.3)
            remote = Store(f"http://writer:bench@127.0.0.1:{port}")
            remote.open()
            remote.migrate()
            time.sleep(1)
            rows += measure(remote, "remote (HTTP INSERT endpoint of an embedded store)", args.rounds, sizes)
            remote.close()
        finally:
            w.terminate()
            w.wait(30)
    print("| figure | per batch (dedup_scope=batch) | per flush (dedup_scope=flush) | ratio |")
    print("|---|---|---|---|")
    for label, b, f in rows:
        print(f"| rows/s, {label}, flushes of {FLUSH_ROWS} rows | {b / 1000:.0f} k/s | {f / 1000:.0f} k/s | {b / f:.2f}x |")
    print(f"\npackets on disk after OPTIMIZE FINAL: {nbytes / max(n, 1):.1f} bytes/row ({n} rows, make_batch data); "
          f"rollup tables: {r_bytes / max(n, 1):.1f} bytes per packets row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
