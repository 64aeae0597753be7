"""Server benchmark: rows/s from gRPC Batch to rows in ClickHouse, against a row-wise insert.

Reuses bench.server_stages (``python -m bench.server_stages`` prints every stage):
``make_batch`` builds columnar packets Batches of ``ROWS`` rows, and its
``_end_to_end`` streams them to a whole in-process server (grpc.aio ->
validate -> Arrow -> insert -> Ack) over loopback into a fresh embedded chDB
store, timing until the last Ack (an Ack means the rows are stored).

Baselines, measured in the same run on the same rows into a fresh chDB store:
- row-wise insert: clickhouse-connect ``client.insert(table, rows)`` with one
  Python sequence per row (the rows are built before the clock starts, so the
  baseline is not charged for them);
- bare ``insert_arrow`` of the already-built Arrow tables (the store's own
  ceiling: what is left is the server's part).
Rounds alternate; medians are reported.

What the schema costs at insert time (``_schema_rows``): the same Arrow tables
inserted the server's way (``Store.insert``'s settings: dedup token, one block)
into fresh stores that got the real migrations and then lost, in the scratch
store only, the per-minute rollups' materialized views (DROP VIEW), the packets
skip indexes (ALTER TABLE ... DROP INDEX), or both; the baseline is the full
schema as it ships, measured in the same rounds. One more variant keeps the full
schema and inserts with ``parallel_view_processing = 1`` (the three views run in
parallel instead of one after the other). Every variant goes through the same
procedure (fresh store, migrate, drop, one warm-up insert, timed inserts), in an
order that reverses every round so load drift hits all sides alike.
The views' cost depends on how many groups a block has per minute, so this runs
on two data sets: ``make_batch``'s (random addresses, ports and protocols: nearly
every row its own group in packets_1m and pairs_1m, the worst case) and
bench/synth.py's plausible fleet traffic (one host, 50k packets/s).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time

ROWS, BATCHES, ROUNDS = 50_000, 3, 2
SCHEMA_ROUNDS = 5
SCHEMA_RATES: dict[tuple[str, str], list[float]] = {}  # every round's rows/s of the last run, for __main__
ROLLUP_VIEWS = ("packets_1m_mv", "pairs_1m_mv", "services_1m_mv")
# name: (drop the rollup views, drop the packets skip indexes, extra insert settings)
VARIANTS = {
    "full": (False, False, {}),
    "no_mv": (True, False, {}),
    "no_idx": (False, True, {}),
    "bare": (True, True, {}),
    "pvp": (False, False, {"parallel_view_processing": 1}),
}


def _fresh_store(tmp: str):
    from hdrlog.server.store import Store

    store = Store(f"chdb://{tmp}/store")
    store.open()
    store.migrate()
    return store


def _rowwise_and_arrow(msgs) -> tuple[float, float]:
    from hdrlog.server.convert import convert_batch

    tables = [convert_batch(m, m.host)[0].data for m in msgs]
    names = tables[0].column_names
    rows = [[list(r.values()) for r in t.to_pylist()] for t in tables]
    n = sum(t.num_rows for t in tables)
    with tempfile.TemporaryDirectory() as tmp:
        store = _fresh_store(tmp)
        try:
            client = store._client  # noqa: SLF001 - the baselines talk to the store directly
            client.insert_arrow("hdrlog.packets", tables[0])  # warm-up: parts, partitions, MVs
            t = time.perf_counter()
            for r in rows:
                client.insert("hdrlog.packets", r, column_names=names)
            rowwise = n / (time.perf_counter() - t)
            t = time.perf_counter()
            for tbl in tables:
                client.insert_arrow("hdrlog.packets", tbl)
            arrow = n / (time.perf_counter() - t)
        finally:
            store.close()
    return rowwise, arrow


def _synth_tables(n: int, k: int):
    """k Arrow tables of n rows of bench/synth.py traffic from one host, 50k packets/s."""
    from bench import synth
    from hdrlog.proto import columns as registry
    from hdrlog.proto import ingest_pb2
    from hdrlog.server.convert import convert_batch

    start = 1_699_999_980 * 10**9  # a minute boundary
    cols = synth.packets(n * k, start_ns=start, seconds=n * k / 50_000, hosts=1)["host-00"]
    out = []
    for j in range(k):
        part = {c: v[j * n:(j + 1) * n] for c, v in cols.items()}
        batch = ingest_pb2.Batch(collector_id="bench", host="host-00", seq=j + 1)
        batch.tables.append(registry.encode_table("packets", part, n))
        out.append(convert_batch(batch, batch.host)[0].data)
    return out


def _variant_rate(tables, drop_views: bool, drop_indexes: bool, extra: dict) -> float:
    """rows/s of inserting ``tables`` into a fresh store with the schema variant."""
    from hdrlog.server import schema

    with tempfile.TemporaryDirectory() as tmp:
        store = _fresh_store(tmp)
        client = store._client  # noqa: SLF001 - the bench changes its scratch store's schema
        try:
            if drop_views:
                for view in ROLLUP_VIEWS:
                    client.command(f"DROP VIEW {schema.DATABASE}.{view}")
            if drop_indexes:
                for name, *_ in schema._SKIP_INDEXES["packets"]:  # noqa: SLF001
                    client.command(f"ALTER TABLE {schema.DATABASE}.packets DROP INDEX {name}")

            def insert(tbl, token: str) -> None:
                # Store.insert's settings (server/store.py), plus the variant's.
                settings = {"insert_deduplication_token": token, "insert_deduplicate": 1,
                            "max_insert_block_size": max(tbl.num_rows, 1_048_449),
                            "min_insert_block_size_rows": 0, "min_insert_block_size_bytes": 0, **extra}
                client.insert_arrow(f"{schema.DATABASE}.packets", tbl, settings=settings)

            insert(tables[0], "warm-up")  # first insert pays for part/partition creation
            t = time.perf_counter()
            for i, tbl in enumerate(tables):
                insert(tbl, f"bench-{i}")
            return sum(tbl.num_rows for tbl in tables) / (time.perf_counter() - t)
        finally:
            store.close()


def _schema_rows(msgs) -> list[dict]:
    from hdrlog.server.convert import convert_batch

    data = {"make_batch": [convert_batch(m, m.host)[0].data for m in msgs],
            "synth": _synth_tables(ROWS, BATCHES)}
    rates: dict[tuple[str, str], list[float]] = {}
    for rnd in range(SCHEMA_ROUNDS):
        names, variants = list(data), list(VARIANTS)
        if rnd % 2:
            names.reverse()
            variants.reverse()
        for d in names:
            for v in variants:
                rates.setdefault((d, v), []).append(_variant_rate(data[d], *VARIANTS[v]))
    SCHEMA_RATES.clear()
    SCHEMA_RATES.update(rates)
    med = {k: statistics.median(v) for k, v in rates.items()}
    what = {
        "no_mv": "without the 3 rollup materialized views",
        "no_idx": "without the 4 packets skip indexes",
        "bare": "without views and skip indexes",
        "pvp": "full schema, insert with parallel_view_processing=1",
    }
    label = {"make_batch": "make_batch data (worst case for rollups)",
             "synth": "bench/synth.py fleet traffic (plausible)"}
    how = (f"median of {SCHEMA_ROUNDS} rounds of {BATCHES} x {ROWS} rows, Store.insert settings, each into a fresh "
           "chDB store: real migrations, then the variant's DROP VIEW / DROP INDEX; all variants interleaved, "
           "order reversed each round")
    rows = []
    for d in data:
        base = med[(d, "full")]
        for v in ("no_mv", "no_idx", "bare", "pvp"):
            val = med[(d, v)]
            share = f"{1 - base / val:.0%}".replace("-0%", "0%")
            note = how if not rows else "same procedure as above"
            if v != "pvp":
                note += f"; the removed part is {share} of the full schema's insert time"
            rows.append({
                "figure": f"schema insert cost, {label[d]}: {what[v]}",
                "value": f"{val / 1e3:.0f} k/s",
                "baseline": f"{base / 1e3:.0f} k/s (full schema as it ships)",
                "ratio": f"{val / base:.2f}x",
                "note": note,
            })
    return rows


def _grpc(msgs) -> float:
    from bench.server_stages import _end_to_end

    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(_end_to_end(tmp, msgs))


def run() -> list[dict]:
    from bench.server_stages import make_batch

    msgs = [make_batch(s, ROWS) for s in range(1, BATCHES + 1)]
    ours, rowwise, arrow = [], [], []
    for _ in range(ROUNDS):
        ours.append(_grpc(msgs))
        r, a = _rowwise_and_arrow(msgs)
        rowwise.append(r)
        arrow.append(a)
    o, r, a = statistics.median(ours), statistics.median(rowwise), statistics.median(arrow)
    how = (f"median of {ROUNDS} rounds of {BATCHES} Batches x {ROWS} packets rows over loopback gRPC into a "
           f"fresh embedded chDB store, until the last Ack; baselines on the same rows, same run")
    return [{
        "figure": "server: rows/s, gRPC Batch -> rows in ClickHouse (chDB), one server process",
        "value": f"{o / 1e3:.0f} k/s",
        "baseline": f"{r / 1e3:.0f} k/s (row-wise clickhouse-connect insert)",
        "ratio": f"{o / r:.2f}x",
        "note": how,
    }, {
        "figure": "server: same, against the store's own ceiling",
        "value": f"{o / 1e3:.0f} k/s",
        "baseline": f"{a / 1e3:.0f} k/s (bare insert_arrow of ready Arrow tables)",
        "ratio": f"{o / a:.2f}x",
        "note": "the gap is the server's share (receive, validate, convert, dedup token, ack)",
    }] + _schema_rows(msgs)


if __name__ == "__main__":
    for row in run():
        print(row)
    for (d, v), r in SCHEMA_RATES.items():
        print(f"{d:10} {v:6} rounds: " + " ".join(f"{x / 1e3:.0f}" for x in r) + " k/s")
