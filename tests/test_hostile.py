"""Hostile input at a running server: fuzzed Batch messages, garbage bytes, a client opening
1,000 streams, a client that never reads its acks. Each gets a clear answer (REJECTED with a
reason, or a gRPC status) and costs the other clients nothing: a well-behaved collector streams
alongside the whole time and every one of its batches is acked and stored exactly once.

(Unequal column lengths, bad offsets, invalid UTF-8, unknown tables and enum values, oversized
messages are pinned one by one in test_server_ingest.py; bad SQL in test_server_sql.py; bad
config files in test_config.py.)
"""

from __future__ import annotations

import queue
import threading
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hdrlog.proto import columns as registry
from hdrlog.proto import ingest_pb2, ingest_pb2_grpc
from tests.support import ServerThread, batch, config

OK, REJECTED, RETRY = ingest_pb2.Ack.OK, ingest_pb2.Ack.REJECTED, ingest_pb2.Ack.RETRY
# Each client its own TCP connection, as separate processes would have (gRPC shares them by default).
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerThread(config(tmp_path_factory.mktemp("hostile") / "store", flush_interval=0.005,
                              max_message_bytes=1 << 20)).start()
    try:
        yield srv
    finally:
        assert srv.stop() == [], "tasks left running on the server's loop"


class GoodCollector:
    """A well-behaved client streaming small batches in the background; every ack must be OK."""

    def __init__(self, srv, name: str):
        self.srv, self.name = srv, name
        self.acks: list[ingest_pb2.Ack] = []
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"good-{name}")
        self.error: BaseException | None = None

    def __enter__(self):
        self._thread.start()
        return self

    def _gen(self):
        seq = 0
        while not self._stop.is_set():
            seq += 1
            self.sent = seq
            yield batch(seq, 5, collector_id=self.name, host=self.name)
            time.sleep(0.02)

    def _run(self):
        try:
            with grpc.insecure_channel(self.srv.target, options=OWN_CONNECTION) as ch:
                for ack in ingest_pb2_grpc.IngestStub(ch).Stream(self._gen(), timeout=600):
                    self.acks.append(ack)
        except BaseException as exc:  # noqa: BLE001 - reported by __exit__
            self.error = exc

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(60)
        assert self.error is None, self.error
        assert self.sent > 3 and len(self.acks) == self.sent
        assert all(a.status == OK for a in self.acks), [a for a in self.acks if a.status != OK][:3]
        got = self.srv.query(f"SELECT count(), uniqExact(batch_seq) FROM hdrlog.packets WHERE collector_id = '{self.name}'")
        assert got == [(5 * self.sent, self.sent)]


NAMES = [s.name for s in registry.TABLES["packets"]] + ["ts", "x", "", "start_ts", "counter", "é", "value"]
TABLES = list(registry.TABLES) + ["nope", "", "packets\x00"]

columns_st = st.builds(
    lambda name, values, offsets: ingest_pb2.Column(name=name, values=values, offsets=offsets),
    st.sampled_from(NAMES), st.binary(max_size=96), st.binary(max_size=24))


@st.composite
def tables_st(draw):
    name = draw(st.sampled_from(TABLES))
    rows = draw(st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1)))
    if draw(st.booleans()) and name in registry.TABLES and rows <= 8:
        # mostly well-formed: real columns, then one of them damaged
        n = draw(st.integers(0, 4))
        t = registry.encode_table(name, registry.empty_columns(name, n), n)
        if t.columns and draw(st.booleans()):
            col = t.columns[draw(st.integers(0, len(t.columns) - 1))]
            col.values = draw(st.binary(max_size=64))
        return t
    return ingest_pb2.Table(name=name, rows=rows, columns=draw(st.lists(columns_st, max_size=6)))


batches_st = st.builds(
    lambda cid, host, seq, tables: ingest_pb2.Batch(collector_id=cid, host=host, seq=seq, tables=tables),
    st.one_of(st.just("fuzz/1"), st.text(max_size=300)),
    st.one_of(st.just("fuzz"), st.text(max_size=300)),
    st.one_of(st.integers(0, 50), st.integers(0, 2**64 - 1)),
    st.lists(tables_st(), max_size=3))


def test_thousands_of_fuzzed_batches_get_one_clear_ack_each_and_others_are_unaffected(server):
    """Fuzzed batches are pipelined down one stream (as a collector does); each gets exactly one ack."""
    q: queue.Queue = queue.Queue()
    sent: list[int] = []
    with grpc.insecure_channel(server.target, options=OWN_CONNECTION) as ch:
        responses = ingest_pb2_grpc.IngestStub(ch).Stream(iter(q.get, None), timeout=600)
        acks: list[ingest_pb2.Ack] = []
        reader = threading.Thread(target=lambda: acks.extend(responses))
        reader.start()

        @settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(batches_st)
        def one(b):
            sent.append(b.seq)
            q.put(b)

        with GoodCollector(server, "good-during-fuzz"):
            one()
            q.put(None)
            reader.join(300)
    assert len(sent) >= 3000
    assert sorted(a.seq for a in acks) == sorted(sent), "every batch gets exactly one ack"
    for ack in acks:
        assert ack.status in (OK, REJECTED), ack
        if ack.status == REJECTED:
            assert ack.error and "\n" not in ack.error and len(ack.error) < 2000, ack.error
    assert sum(a.status == REJECTED for a in acks) > len(acks) // 2  # the fuzzer mostly makes bad batches


def test_garbage_bytes_end_only_their_own_stream(server):
    raw = grpc.insecure_channel(server.target, options=OWN_CONNECTION)
    call = raw.stream_stream("/hdrlog.v1.Ingest/Stream", request_serializer=lambda b: b,
                             response_deserializer=ingest_pb2.Ack.FromString)
    junk = [b"\xff" * 7, b"\x0a\xff\xfe", bytes(range(256)), b"\x1a\x05\x0a\x03\xc3\x28\x00"]
    with GoodCollector(server, "good-during-garbage"):
        for i in range(200):
            try:
                acks = list(call(iter([junk[i % len(junk)]]), timeout=10))
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
                assert "not a hdrlog.v1.Batch message" in err.details()
            else:  # bytes that happen to parse as a Batch: refused like any bad batch
                assert [a.status for a in acks] == [REJECTED], acks
    raw.close()


def test_a_client_opening_1000_streams_gets_a_few_and_costs_others_nothing(server):
    hold = threading.Event()
    ch = grpc.insecure_channel(server.target, options=OWN_CONNECTION)
    stub = ingest_pb2_grpc.IngestStub(ch)

    def idle():
        hold.wait(60)
        return
        yield  # noqa: unreachable - a generator that sends nothing until released

    calls = [stub.Stream(idle(), timeout=120) for _ in range(1000)]
    try:
        time.sleep(1.0)
        with GoodCollector(server, "good-during-1000"):
            t0 = time.monotonic()
            with grpc.insecure_channel(server.target, options=OWN_CONNECTION) as other:
                acks = list(ingest_pb2_grpc.IngestStub(other).Stream(
                    iter([batch(1, 3, collector_id="other", host="other")]), timeout=10))
            assert [a.status for a in acks] == [OK] and time.monotonic() - t0 < 5
            time.sleep(0.5)
        # the greedy connection holds at most max_streams_per_connection streams on the server
        assert server.server.metrics.open_streams <= server.cfg.max_streams_per_connection + 2
    finally:
        hold.set()
        for c in calls:
            c.cancel()
        ch.close()


def test_a_client_that_never_reads_its_acks_is_paused_not_buffered(server):
    ch = grpc.insecure_channel(server.target, options=OWN_CONNECTION)
    n = 40_000
    # seq 0 is refused at once: a flood of small REJECTED acks that this client never reads
    call = ingest_pb2_grpc.IngestStub(ch).Stream(iter([batch(0, 1, collector_id="slow", host="slow")] * n), timeout=120)
    try:
        with GoodCollector(server, "good-during-slow"):
            time.sleep(3)
        received = server.server.metrics.value("hdrlog_server_batches_received_total")
        assert received < n, "the server kept reading a client that does not read its acks"
    finally:
        call.cancel()
        ch.close()
    time.sleep(0.5)
    assert server.server.metrics.open_streams == 0


def test_seq_zero_and_absurd_seq_jumps_are_refused(server):
    acks = server.send([batch(0, 2, collector_id="jumpy"), batch(1, 2, collector_id="jumpy"),
                        batch(10**12, 2, collector_id="jumpy", seed=1), batch(2, 2, collector_id="jumpy")])
    assert [a.status for a in acks].count(OK) == 2
    by_seq = {a.seq: a for a in acks}
    assert "seq 0 is not allowed" in by_seq[0].error
    assert "jumps more than" in by_seq[10**12].error
