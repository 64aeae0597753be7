"""Compressed batches (proto/ingest.proto, Compression): what a collector compresses the server
stores identically, collectors that do not compress are still accepted (on the same stream), and
a hostile batch cannot inflate past the server's bound. Real server, real gRPC, real chDB."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard

from bench import synth
from hdrlog.proto import columns as registry
from hdrlog.proto import ingest_pb2
from hdrlog.server.convert import BatchError, convert_batch
from tests.support import ServerThread, batch, config, packet_columns

OK, REJECTED = ingest_pb2.Ack.OK, ingest_pb2.Ack.REJECTED


def plausible(n: int) -> dict:
    return synth.packets(n, start_ns=1_699_999_980 * 10**9, seconds=n / 50_000, hosts=1)["host-00"]


def test_compressed_columns_decode_to_the_same_arrow_rows_and_are_smaller():
    n = 5000
    cols = plausible(n)
    plain = registry.encode_table("packets", cols, n)
    packed = registry.encode_table("packets", cols, n, level=1)
    assert {c.compression for c in packed.columns} >= {ingest_pb2.ZSTD}
    assert packed.ByteSize() * 4 < plain.ByteSize()
    a = ingest_pb2.Batch(collector_id="c", host="h", seq=1, tables=[plain])
    b = ingest_pb2.Batch(collector_id="c", host="h", seq=1, tables=[packed])
    assert convert_batch(a, "h")[0].data.equals(convert_batch(b, "h")[0].data)


def test_old_and_new_collectors_on_one_stream_store_the_same_rows(tmp_path):
    n = 2000
    cols = packet_columns(n, 3)
    old = [batch(s, tables=[registry.encode_table("packets", cols, n)], collector_id="old") for s in (1, 2)]
    new = [batch(s, tables=[registry.encode_table("packets", cols, n, level=1)], collector_id="new") for s in (1, 2)]
    srv = ServerThread(config(tmp_path / "store")).start()
    try:
        acks = srv.send([old[0], new[0], old[1], new[1]])
        assert [a.status for a in acks] == [OK] * 4
        q = ("SELECT cityHash64(groupArray(tuple(* EXCEPT (collector_id, batch_seq))) ) FROM "
             "(SELECT * FROM hdrlog.packets WHERE collector_id = '{c}' ORDER BY batch_seq, ts, tcp_seq)")
        assert srv.query(q.format(c="old")) == srv.query(q.format(c="new"))
        assert srv.query("SELECT count() FROM hdrlog.packets") == [(4 * n,)]
    finally:
        assert srv.stop() == []


def _bomb(n: int, column: str, *, frame: bytes, values_size: int, offsets: bytes = b"", offsets_size: int = 0):
    table = registry.encode_table("packets", packet_columns(n, 1), n)
    col = next(c for c in table.columns if c.name == column)
    col.values, col.compression, col.values_size = frame, ingest_pb2.ZSTD, values_size
    if offsets or offsets_size:
        col.offsets, col.offsets_size = offsets, offsets_size
    return ingest_pb2.Batch(collector_id="evil", host="h", seq=1, tables=[table])


@pytest.mark.parametrize("case", ["lies_small", "lies_big_string", "past_budget", "not_zstd", "negative_length"])
def test_a_hostile_compressed_batch_cannot_inflate_past_the_bound(case):
    n = 100
    zc = zstandard.ZstdCompressor(level=1)
    if case == "lies_small":  # declares the right size, the frame holds 1 GB of zeros (a zstd bomb)
        cobj = zc.compressobj()
        frame = b"".join(cobj.compress(bytes(1 << 20)) for _ in range(1024)) + cobj.flush()
        b = _bomb(n, "tcp_seq", frame=frame, values_size=n * 4)
    elif case == "lies_big_string":  # lengths add up to 1 GB: refused before anything is inflated
        lengths = np.full(n, (1 << 30) // n, dtype="<i4").tobytes()
        b = _bomb(n, "dns_qname", frame=zc.compress(b"x"), values_size=(1 << 30) // n * n,
                  offsets=zc.compress(lengths), offsets_size=n * 4)
    elif case == "past_budget":
        b = _bomb(n, "dns_qname", frame=zc.compress(b"a" * 5000), values_size=5000,
                  offsets=zc.compress(np.full(n, 50, dtype="<i4").tobytes()), offsets_size=n * 4)
    elif case == "not_zstd":
        b = _bomb(n, "tcp_seq", frame=b"\x00" * 40, values_size=n * 4)
    else:
        lengths = np.full(n, -1, dtype="<i4").tobytes()
        b = _bomb(n, "dns_qname", frame=zc.compress(b""), values_size=0, offsets=zc.compress(lengths),
                  offsets_size=n * 4)
    limit = 4096 if case == "past_budget" else 64 << 20
    with pytest.raises(BatchError) as err:
        convert_batch(b, "h", inflate_limit=limit)
    assert "dns_qname" in str(err.value) or "tcp_seq" in str(err.value)


def test_the_server_answers_a_zstd_bomb_rejected_and_carries_on(tmp_path):
    n = 100
    cobj = zstandard.ZstdCompressor(level=1).compressobj()
    frame = b"".join(cobj.compress(bytes(1 << 20)) for _ in range(256)) + cobj.flush()
    evil = _bomb(n, "tcp_seq", frame=frame, values_size=n * 4)
    good = batch(2, n, collector_id="evil")
    srv = ServerThread(config(tmp_path / "store")).start()
    try:
        acks = srv.send([evil, good])
        assert [a.status for a in acks] == [REJECTED, OK]
        assert "tcp_seq" in acks[0].error and acks[0].reason == "inflate"
    finally:
        assert srv.stop() == []
