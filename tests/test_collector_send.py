"""Batcher and sender against a real gRPC server on loopback whose behaviour the test scripts."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from hdrlog.collector.batcher import Batcher
from hdrlog.collector.sender import Sender
from hdrlog.collector.spool import Outbox
from hdrlog.proto import columns, ingest_pb2, ingest_pb2_grpc


def packets(n: int, start: int = 0) -> dict:
    cols = columns.empty_columns("packets", n)
    cols["ts"] = np.arange(start, start + n, dtype="<i8")
    cols["ifname"] = [f"if{i % 3}" for i in range(start, start + n)]
    cols["dst_port"] = (np.arange(start, start + n) % 65536).astype("<u2")
    return cols


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_batcher_closes_on_size_and_age_with_increasing_seq():
    out = []
    clock = FakeClock()
    b = Batcher(collector_id="c1", host="h", batch_rows=100, batch_interval=1.0,
                emit=lambda batch, rows: out.append((batch, rows)), clock=clock)
    b.add("packets", packets(60))
    assert out == []
    b.add("packets", packets(50, start=60))  # 110 >= 100: closes
    assert [r for _, r in out] == [110]
    b.add("packets", packets(5, start=110))
    clock.now = 0.9
    b.flush_if_due()
    assert len(out) == 1
    clock.now = 1.01
    b.flush_if_due()
    assert [r for _, r in out] == [110, 5]
    assert [batch.seq for batch, _ in out] == [1, 2]
    table = out[0][0].tables[0]
    decoded, ignored = columns.decode_table(table)
    assert ignored == [] and table.rows == 110
    assert decoded["ts"].tolist() == list(range(110))
    assert columns.decode_strings(*decoded["ifname"]) == [f"if{i % 3}" for i in range(110)]


def test_outbox_drops_oldest_when_full():
    async def go():
        box = Outbox(max_rows=100)
        assert box.put(ingest_pb2.Batch(seq=1), 60) == 0
        assert box.put(ingest_pb2.Batch(seq=2), 30) == 0
        assert box.put(ingest_pb2.Batch(seq=3), 50) == 60  # seq 1 goes
        assert [s for s, _, _ in box.after(0)] == [2, 3] and box.rows == 80
        assert box.pop(2) == 30 and box.pop(2) is None
    asyncio.run(go())


def test_spooled_outbox_keeps_bodies_on_disk_and_drops_oldest_by_bytes(tmp_path):
    from hdrlog.collector.spool import Spool

    def body(seq):
        return ingest_pb2.Batch(collector_id="c", seq=seq, tables=[columns.encode_table("packets", packets(50), 50)])

    async def go():
        size = len(body(1).SerializeToString()) + 16
        spool = Spool(tmp_path, max_bytes=size * 20, host_id="h")
        spool.open()
        box = Outbox(max_rows=10, spool=spool)  # max_rows does not apply with a spool
        dropped = sum(box.put(body(spool.next_seq()), 50) for _ in range(25))
        assert dropped == 5 * 50 and spool.dropped_rows == 250 and len(box) == 20 and box.rows == 1000
        assert box._cached <= Outbox.CACHED_BATCHES
        assert [s for s, _, _ in box.after(0)] == list(range(6, 26))  # bodies read back from disk
        assert box.pop(6) == 50 and not spool._path(6).exists()
        spool.close()
        again = Spool(tmp_path, max_bytes=size * 20, host_id="h")
        box2 = Outbox(max_rows=10, spool=again)
        box2.restore(again.open())
        assert box2.seqs_after(0) == list(range(7, 26)) and box2.rows == 950
        assert box2.get(7)[0].tables[0].rows == 50
        again.close()
    asyncio.run(go())


class ScriptedIngest(ingest_pb2_grpc.IngestServicer):
    """Acks each batch; the test decides per (stream number, seq) to drop the stream, retry or reject."""

    def __init__(self, script=None):
        self.script = script or {}
        self.streams = 0
        self.received: list[tuple[int, int]] = []  # (stream, seq)

    async def Stream(self, request_iterator, context):  # noqa: N802 - gRPC naming
        self.streams += 1
        stream = self.streams
        async for batch in request_iterator:
            self.received.append((stream, batch.seq))
            action = self.script.get((stream, batch.seq), "ok")
            if action == "drop":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "scripted failure")
            elif action == "retry":
                yield ingest_pb2.Ack(seq=batch.seq, status=ingest_pb2.Ack.RETRY, error="store busy")
            elif action == "reject":
                yield ingest_pb2.Ack(seq=batch.seq, status=ingest_pb2.Ack.REJECTED, error="bad: scripted")
            else:
                yield ingest_pb2.Ack(seq=batch.seq, status=ingest_pb2.Ack.OK, rows=batch.tables[0].rows)


async def start_server(servicer, port=0):
    server = grpc.aio.server()
    ingest_pb2_grpc.add_IngestServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, port


async def send_all(servicer, batches=5, delay_server=0.0):
    box = Outbox(max_rows=10_000)
    server, port = await start_server(servicer)
    sender = Sender(f"127.0.0.1:{port}", box)
    try:
        sender.start()
        for seq in range(1, batches + 1):
            box.put(ingest_pb2.Batch(collector_id="c", seq=seq, tables=[
                columns.encode_table("packets", packets(10), 10)]), 10)
        assert await sender.wait_drained(20), f"undrained: {box.after(0)}"
        return sender
    finally:
        await sender.stop()
        await server.stop(None)


def test_sender_delivers_everything_in_order():
    svc = ScriptedIngest()
    sender = asyncio.run(send_all(svc))
    assert [seq for _, seq in svc.received] == [1, 2, 3, 4, 5]
    assert sender.counters.rows_acked == 50 and sender.counters.reconnects == 0


def test_sender_resends_unacked_after_a_broken_stream_and_on_retry():
    svc = ScriptedIngest({(1, 3): "drop", (2, 4): "retry"})
    sender = asyncio.run(send_all(svc))
    acked_first = [seq for s, seq in svc.received if s == 1]
    assert acked_first[:3] == [1, 2, 3]
    # Everything from 3 on was sent again on stream 2, 4 again on stream 3.
    assert [seq for s, seq in svc.received if s == 2][0] == 3
    assert 4 in [seq for s, seq in svc.received if s == 3]
    assert sender.counters.rows_acked == 50 and sender.counters.reconnects == 2


def test_sender_counts_rejected_batches_and_goes_on():
    svc = ScriptedIngest({(1, 2): "reject"})
    sender = asyncio.run(send_all(svc))
    assert sender.counters.batches_rejected == 1 and sender.counters.rows_rejected == 10
    assert sender.counters.rows_acked == 40 and svc.streams == 1


def test_sender_waits_for_a_server_that_comes_later():
    async def go():
        with socket_port() as port:
            pass
        box = Outbox(max_rows=1000)
        sender = Sender(f"127.0.0.1:{port}", box)
        sender.start()
        box.put(ingest_pb2.Batch(collector_id="c", seq=1, tables=[columns.encode_table("packets", packets(3), 3)]), 3)
        await asyncio.sleep(1.0)
        assert len(box) == 1 and not sender.connected
        svc = ScriptedIngest()
        server, _ = await start_server(svc, port)
        try:
            assert await sender.wait_drained(20)
            return sender
        finally:
            await sender.stop()
            await server.stop(None)
    sender = asyncio.run(go())
    assert sender.counters.reconnects >= 1 and sender.counters.rows_acked == 3


class socket_port:
    """A free loopback port (bound then released)."""

    def __enter__(self):
        import socket
        self.s = socket.socket()
        self.s.bind(("127.0.0.1", 0))
        return self.s.getsockname()[1]

    def __exit__(self, *exc):
        self.s.close()
