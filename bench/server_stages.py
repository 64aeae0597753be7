"""Insert throughput: ``python -m bench.server_stages [--rows 100000] [--batches 20]``.

Prints rows/s per stage for 100k-row packet batches into a fresh embedded chDB
store, with the ratio against a baseline measured in the same run (the bare
``insert_arrow`` of an already-built Arrow table): these machines are noisy, so
only ratios are comparable between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

import grpc
import numpy as np

from hdrlog.proto import columns as registry
from hdrlog.proto import ingest_pb2, ingest_pb2_grpc
from hdrlog.server.app import Server
from hdrlog.server.config import ServerConfig
from hdrlog.server.convert import convert_batch
from hdrlog.server.store import Store


def make_batch(seq: int, n: int, collector_id: str = "bench") -> ingest_pb2.Batch:
    rng = np.random.default_rng(seq)
    cols = registry.empty_columns("packets", n)
    for spec in registry.PACKETS:
        if spec.is_string:
            continue
        if spec.dtype == "V16":
            cols[spec.name] = np.frombuffer(rng.bytes(16 * n), dtype="V16")
        else:
            cols[spec.name] = rng.integers(0, 200, n).astype(spec.dtype)
    cols["ts"] = (1_700_000_000 * 10**9 + np.arange(n, dtype=np.int64) * 1000).astype("<i8")
    cols["direction"] = (np.arange(n) % 2 + 1).astype("u1")
    cols["ifname"] = ["eth0"] * n
    cols["dns_qname"] = [f"h{i % 1000}.example.org" if i % 10 == 0 else "" for i in range(n)]
    cols["tls_sni"] = ["www.example.com" if i % 5 == 0 else "" for i in range(n)]
    b = ingest_pb2.Batch(collector_id=collector_id, host="bench-host", seq=seq)
    b.tables.append(registry.encode_table("packets", cols, n))
    return b


def bench(rows: int, batches: int) -> list[tuple[str, float]]:
    msgs = [make_batch(s, rows) for s in range(1, batches + 1)]
    results: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"chdb://{tmp}/store")
        store.open()
        store.migrate()
        try:
            t = time.perf_counter()
            converted = [convert_batch(m, m.host) for m in msgs]
            results.append(("decode+validate+Arrow (convert_batch)", rows * batches / (time.perf_counter() - t)))
            tables = [c[0].data for c in converted]
            store.insert("packets", tables[0], "warm-up")  # first insert pays for part/partition creation
            t = time.perf_counter()
            for i, tbl in enumerate(tables):
                store._client.insert_arrow("hdrlog.packets", tbl)  # noqa: SLF001 - baseline
            base = rows * batches / (time.perf_counter() - t)
            results.insert(0, ("baseline: bare insert_arrow", base))
            t = time.perf_counter()
            for i, tbl in enumerate(tables):
                store.insert("packets", tbl, f"bench-{i}")
            results.append(("Store.insert (token, one block)", rows * batches / (time.perf_counter() - t)))
            t = time.perf_counter()
            for i, m in enumerate(msgs):
                store.insert("packets", convert_batch(m, m.host)[0].data, f"bench2-{i}")
            results.append(("decoded Batch -> rows in chDB (convert+insert)", rows * batches / (time.perf_counter() - t)))
        finally:
            store.close()
    with tempfile.TemporaryDirectory() as tmp:
        results.append(("gRPC stream -> acked rows (whole server)", asyncio.run(_end_to_end(tmp, msgs))))
    return results


async def _end_to_end(tmp: str, msgs: list[ingest_pb2.Batch], config: dict | None = None) -> float:
    cfg = ServerConfig(listen="127.0.0.1:0", sql_listen="", clickhouse=f"chdb://{tmp}/store", insecure=True,
                       status_interval=0, **(config or {}))
    server = Server(cfg)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}",
                                             options=[("grpc.max_send_message_length", 256 << 20)]) as ch:
            stub = ingest_pb2_grpc.IngestStub(ch)
            # Warm-up, like the baselines': the first part and partition, the rollup worker's handle.
            warm = ingest_pb2.Batch()
            warm.CopyFrom(msgs[0])
            warm.collector_id = "warm-up"
            async for _ack in stub.Stream(iter([warm])):
                pass
            await server.writer.caught_up()
            t = time.perf_counter()
            rows = 0
            async for ack in stub.Stream(iter(msgs)):
                rows += ack.rows
            await server.writer.caught_up()  # the rollups of the last flush are stored too
            return rows / (time.perf_counter() - t)
    finally:
        await server.stop(grace=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows per batch")
    parser.add_argument("--batches", type=int, default=20)
    ns = parser.parse_args()
    results = bench(ns.rows, ns.batches)
    base = results[0][1]
    print(f"{'stage':48} {'rows/s':>12} {'ratio':>7}   ({ns.batches} batches x {ns.rows} rows)")
    for name, rate in results:
        print(f"{name:48} {rate:12,.0f} {rate / base:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
