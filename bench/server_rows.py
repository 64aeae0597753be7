"""Server benchmark: rows/s from gRPC Batch to rows (and rollups) in ClickHouse, on two mixes.

Two data sets of packets rows, one host, as a collector would send them (batches of ``ROWS``):
- plausible: bench/synth.py's fleet traffic (ephemeral client ports towards a few services);
- scan: bench/synth.py's ``scan`` (TCP SYNs to every port from 20,000 peers, RST-ACK answers):
  every port and nearly every pair its own rollup key, the rollups' worst case.

For each, in the same run and in rounds that alternate their order (these machines are noisy):
- the whole server (``bench.server_stages._end_to_end``: grpc.aio -> validate -> Arrow ->
  packets INSERT and the per-minute rollups -> Ack) into a fresh embedded chDB store, after one
  warm-up batch, timed until the last Ack *and* the rollup worker has stored the last rollup;
- its baseline: a bare ``insert_arrow`` of the same rows, already converted to Arrow, into a
  fresh store with the packets table and no rollups (the store's own ceiling). The ratio is
  what the server's share and the rollups together cost.
And: the scan rate against the plausible rate (the acceptance wants >= 0.5x), and the wire
bytes per packets row of the batches, compressed (zstd level 1, the collector's default) against
uncompressed (what collectors sent before), on the same batches.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time

ROWS, BATCHES, ROUNDS = 25_000, 16, 5
START = 1_699_999_980 * 10**9  # a minute boundary
RATE = 50_000                   # packets/s of the synthetic host: the rows span ROWS * BATCHES / RATE seconds


def mixes() -> dict[str, dict]:
    from bench import synth

    n = ROWS * BATCHES
    return {"plausible": synth.packets(n, start_ns=START, seconds=n / RATE, hosts=1)["host-00"],
            "scan": synth.scan(n, start_ns=START, seconds=n / RATE)["host-00"]}


def batches(cols: dict, level: int, collector_id: str = "bench") -> list:
    from hdrlog.proto import columns as registry
    from hdrlog.proto import ingest_pb2

    out = []
    for j in range(BATCHES):
        part = {c: v[j * ROWS:(j + 1) * ROWS] for c, v in cols.items()}
        b = ingest_pb2.Batch(collector_id=collector_id, host="host-00", seq=j + 1)
        b.tables.append(registry.encode_table("packets", part, ROWS, level=level))
        out.append(b)
    return out


def _bare(msgs) -> tuple[float, float]:
    """rows/s of the converted rows, in flush-sized tables, into a packets table without rollups, two
    ways (alternating table by table, each into its own fresh store): clickhouse-connect's
    ``insert_arrow`` (its chDB backend: Arrow IPC temporary file, ``INSERT ... FROM INFILE``), and the
    server's own embedded path (``Store.insert``: chDB's ``Python()`` table function, the server's
    settings and dedup tokens)."""
    from hdrlog.server.convert import convert_batch
    from hdrlog.server.store import Store

    from hdrlog.server.config import DEFAULT_FLUSH_ROWS
    from hdrlog.server.writer import concat

    # In the server's flush size (its default flush_rows), so the baseline coalesces as well as it.
    converted = [convert_batch(m, m.host)[0].data for m in msgs]
    per = max(1, DEFAULT_FLUSH_ROWS // ROWS)
    tables = [concat(converted[i:i + per]) for i in range(0, len(converted), per)]
    with tempfile.TemporaryDirectory() as tmp:
        # One embedded engine per process (one path): the two ways write two like tables of one store.
        store = Store(f"chdb://{tmp}/store")
        store.open()
        try:
            store.migrate()
            client = store._client  # noqa: SLF001 - the baseline talks to the store directly
            for view in ("packets_1m_in", "pairs_1m_in", "services_1m_in"):
                client.command(f"DROP VIEW IF EXISTS hdrlog.{view}")
            client.command("CREATE TABLE hdrlog.packets_local AS hdrlog.packets")
            client.insert_arrow("hdrlog.packets", tables[0])  # warm-up: first part, partition
            store.insert("packets_local", tables[0], "warm-up")
            took = [0.0, 0.0]
            for i, tbl in enumerate(tables):
                t = time.perf_counter()
                client.insert_arrow("hdrlog.packets", tbl)
                took[0] += time.perf_counter() - t
                t = time.perf_counter()
                store.insert("packets_local", tbl, f"bench-{i}")
                took[1] += time.perf_counter() - t
            rows = sum(t.num_rows for t in tables)
            return rows / took[0], rows / took[1]
        finally:
            store.close()


def _grpc(msgs) -> float:
    from bench.server_stages import _end_to_end

    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(_end_to_end(tmp, msgs))


def run() -> list[dict]:
    data = mixes()
    sent = {k: batches(v, 1) for k, v in data.items()}
    plain = {k: batches(v, 0) for k, v in data.items()}
    ours: dict[str, list[float]] = {k: [] for k in data}
    bare: dict[str, list[float]] = {k: [] for k in data}
    local: dict[str, list[float]] = {k: [] for k in data}
    for rnd in range(ROUNDS):
        names = list(data) if rnd % 2 == 0 else list(reversed(data))
        for k in names:
            ours[k].append(_grpc(sent[k]))
            a, b = _bare(plain[k])
            bare[k].append(a)
            local[k].append(b)
    o = {k: statistics.median(v) for k, v in ours.items()}
    b = {k: statistics.median(v) for k, v in bare.items()}
    lo = {k: statistics.median(v) for k, v in local.items()}
    how = (f"median of {ROUNDS} rounds of {BATCHES} Batches x {ROWS} packets rows (zstd level 1) over loopback "
           "gRPC into a fresh embedded chDB store, until the last Ack and the last rollup stored (the sending "
           "client in the same process); baseline: the same rows as ready Arrow tables of the server's "
           "flush_rows, clickhouse-connect insert_arrow into a fresh store without rollups (after a warm-up "
           "insert, like the server's warm-up batch)")
    rows = []
    for k, label in (("plausible", "plausible mix (bench/synth.py)"), ("scan", "scan-like mix (every port, 20k peers)")):
        rows.append({
            "figure": f"server: rows/s gRPC -> packets + rollups in chDB, {label}",
            "value": f"{o[k] / 1e3:.0f} k/s",
            "baseline": f"{b[k] / 1e3:.0f} k/s (bare insert_arrow, no rollups)",
            "ratio": f"{o[k] / b[k]:.2f}x",
            "note": how if not rows else "same procedure",
        })
    for k, label in (("plausible", "plausible mix"), ("scan", "scan-like mix")):
        rows.append({
            "figure": f"server: same, {label}, against the server's own insert path bare",
            "value": f"{o[k] / 1e3:.0f} k/s",
            "baseline": f"{lo[k] / 1e3:.0f} k/s (bare Store.insert: chDB Python() table function, no rollups)",
            "ratio": f"{o[k] / lo[k]:.2f}x",
            "note": "the same rounds; the baseline inserts the same tables the way the server does (its settings and "
                    "tokens), interleaved table by table with the insert_arrow baseline: what the rollups and the "
                    "rest of the server cost on top of the store's own insert",
        })
    rows.append({
        "figure": "server: bare insert paths, chDB Python() table function against insert_arrow (plausible mix)",
        "value": f"{lo['plausible'] / 1e3:.0f} k/s",
        "baseline": f"{b['plausible'] / 1e3:.0f} k/s (bare insert_arrow)",
        "ratio": f"{lo['plausible'] / b['plausible']:.2f}x",
        "note": "same rounds; insert_arrow's chDB backend writes Arrow IPC to a temporary file for INSERT ... FROM INFILE",
    })
    rows.append({
        "figure": "server: scan-like mix against the plausible mix (whole server)",
        "value": f"{o['scan'] / 1e3:.0f} k/s",
        "baseline": f"{o['plausible'] / 1e3:.0f} k/s (plausible mix)",
        "ratio": f"{o['scan'] / o['plausible']:.2f}x",
        "note": "same rounds as above; before the server made the rollups: 0.08-0.23x (issue 16)",
    })
    for k in data:
        packed = sum(m.ByteSize() for m in sent[k]) / (ROWS * BATCHES)
        raw = sum(m.ByteSize() for m in plain[k]) / (ROWS * BATCHES)
        rows.append({
            "figure": f"wire bytes per packets row, {k} mix, zstd level 1 per column",
            "value": f"{packed:.1f} B",
            "baseline": f"{raw:.1f} B (uncompressed, as before)",
            "ratio": f"{packed / raw:.2f}x",
            "note": f"serialized Batch bytes / rows, the same {BATCHES} batches of {ROWS} rows",
        })
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
