"""This schema against a naive one: bytes per row on disk and the cookbook's query times.

    .venv/bin/python -m bench.schema_bench [--rows 2000000] [--repeat 3]

Both schemas live in one fresh embedded chDB store and get the same synthetic packets
(bench/synth.py: a day of a small fleet), converted and inserted the way the server does
(100k-row Arrow blocks). The naive schema is what a first attempt looks like: the contract's
column types, no codecs, no LowCardinality, no skip indexes, no rollups, sorted by time only.
Both are merged (OPTIMIZE FINAL) before measuring. Queries are the cookbook's (docs/sql.md):
this schema runs each as written; the naive one runs its raw-table form. Each time is the
median of ``--repeat`` runs after one warm-up; ratios are naive / this (higher = this is faster).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from bench import synth
from bench.cookbook import recipes
from hdrlog.proto import columns as registry
from hdrlog.proto import ingest_pb2
from hdrlog.server.convert import convert_batch
from hdrlog.server.schema import column_type
from hdrlog.server.store import Store

NAIVE_TABLES = {"packets", "packets_1m", "pairs_1m", "services_1m", "flows"}
BLOCK = 100_000


def naive_ddl() -> str:
    cols = ["ts DateTime64(9, 'UTC')", "host String", "collector_id String", "batch_seq UInt64"]
    for spec in registry.PACKETS:
        if spec.name == "ts":
            continue
        typ = column_type("packets", spec.name, spec.dtype).replace("LowCardinality(String)", "String")
        cols.append(f"{spec.name} {typ}")
    return ("CREATE TABLE naive.packets (" + ", ".join(cols) + ") ENGINE = MergeTree "
            "PARTITION BY toDate(ts) ORDER BY ts")


def naive_flows_ddl() -> str:
    cols = ["host String", "collector_id String", "batch_seq UInt64"]
    for spec in registry.FLOWS:
        cols.append(f"{spec.name} {column_type('flows', spec.name, spec.dtype).replace('LowCardinality(String)', 'String')}")
    return ("CREATE TABLE naive.flows (" + ", ".join(cols) + ") ENGINE = MergeTree "
            "PARTITION BY toDate(start_ts) ORDER BY start_ts")


def load(store: Store, rows: int) -> int:
    client = store._client  # noqa: SLF001 - the bench is the store's own tool
    start = (time.time_ns() // 10**9 - 86_400) * 10**9
    by_host = synth.packets(rows, start_ns=start, seconds=86_400 - 60)
    seq = 0
    for host, cols in by_host.items():
        n = len(cols["ts"])
        for lo in range(0, n, BLOCK):
            hi = min(n, lo + BLOCK)
            part = {k: v[lo:hi] for k, v in cols.items()}
            seq += 1
            batch = ingest_pb2.Batch(collector_id=f"bench-{host}", host=host, seq=seq)
            batch.tables.append(registry.encode_table("packets", part, hi - lo))
            table = convert_batch(batch, host)[0]
            store.insert("packets", table.data, f"bench-{seq}")
            client.insert_arrow("naive.packets", table.data)
    for db, tables in (("hdrlog", ("packets", "packets_1m", "pairs_1m", "services_1m")), ("naive", ("packets",))):
        for t in tables:
            client.command(f"OPTIMIZE TABLE {db}.{t} FINAL")
    return seq


def size(client, db: str, table: str) -> tuple[int, int]:
    rows, nbytes = client.query(f"SELECT sum(rows), sum(bytes_on_disk) FROM system.parts WHERE database = '{db}' "
                                f"AND table = '{table}' AND active").result_rows[0]
    return int(rows), int(nbytes)


def timed(client, sql: str, repeat: int) -> float:
    client.query(sql)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        client.query(sql)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ns = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"chdb://{tmp}/store")
        store.open()
        store.migrate()
        client = store._client  # noqa: SLF001
        client.command("CREATE DATABASE naive")
        client.command(naive_ddl())
        client.command(naive_flows_ddl())
        t = time.perf_counter()
        load(store, ns.rows)
        print(f"loaded {ns.rows} synthetic packets into both schemas in {time.perf_counter() - t:.0f} s\n")

        rows, ours = size(client, "hdrlog", "packets")
        _, naive = size(client, "naive", "packets")
        rollups = sum(size(client, "hdrlog", t)[1] for t in ("packets_1m", "pairs_1m", "services_1m"))
        print("| storage | this schema | naive | naive / this |")
        print("|---|---:|---:|---:|")
        print(f"| packets bytes/row | {ours / rows:.1f} | {naive / rows:.1f} | {naive / ours:.2f} |")
        print(f"| + rollups bytes/row | {(ours + rollups) / rows:.1f} | {naive / rows:.1f} | "
              f"{naive / (ours + rollups):.2f} |")
        print()
        print("| cookbook query | this schema ms | naive ms | naive / this |")
        print("|---|---:|---:|---:|")
        ratios = []
        for r in recipes():
            if not r.tables() or not r.tables() <= NAIVE_TABLES:
                continue
            naive_sql = (r.raw or r.sql).replace("hdrlog.", "naive.")
            ours_t = timed(client, r.sql, ns.repeat)
            naive_t = timed(client, naive_sql, ns.repeat)
            ratios.append(naive_t / ours_t)
            print(f"| {r.number}. {r.question[:60]} | {ours_t * 1000:.1f} | {naive_t * 1000:.1f} | "
                  f"{naive_t / ours_t:.2f} |")
        print(f"| geometric mean | | | {statistics.geometric_mean(ratios):.2f} |")
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
