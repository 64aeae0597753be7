"""Server benchmark: rows/s from gRPC Batch to rows in ClickHouse, against a row-wise insert.

Reuses hdrlog.server.bench (``python -m hdrlog.server.bench`` prints every stage):
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
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time

ROWS, BATCHES, ROUNDS = 50_000, 3, 2


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


def _grpc(msgs) -> float:
    from hdrlog.server.bench import _end_to_end

    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(_end_to_end(tmp, msgs))


def run() -> list[dict]:
    from hdrlog.server.bench import make_batch

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
    }]


if __name__ == "__main__":
    for row in run():
        print(row)
