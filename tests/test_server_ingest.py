"""Server ingest over real gRPC on loopback into a real chDB store: rows equal what was sent,
resends never duplicate, malformed batches are rejected with a reason while other streams carry on."""

from __future__ import annotations

import ipaddress
import threading
import time

import grpc
import numpy as np
import pytest

from hdrlog.proto import columns as registry
from hdrlog.proto import ingest_pb2
from tests.support import ServerThread, T0, batch, config, packet_columns, packets_table

OK, REJECTED, RETRY = ingest_pb2.Ack.OK, ingest_pb2.Ack.REJECTED, ingest_pb2.Ack.RETRY


@pytest.fixture
def server(tmp_path):
    srv = ServerThread(config(tmp_path / "store")).start()
    try:
        yield srv
    finally:
        srv.stop()


def _ip_text(raw: bytes) -> str:
    addr = ipaddress.IPv6Address(raw)
    return f"::ffff:{addr.ipv4_mapped}" if addr.ipv4_mapped else str(addr)


def test_every_packets_column_is_stored_as_sent(server):
    n = 300
    acks = server.send([batch(1, n), batch(2, n)])
    assert [(a.seq, a.status, a.rows, a.duplicate, a.error) for a in acks] == [(1, OK, n, False, ""), (2, OK, n, False, "")]

    names = [c.name for c in registry.PACKETS]
    select = ", ".join(
        "toUnixTimestamp64Nano(ts)" if c == "ts" else f"toString({c})" if c in ("src_ip", "dst_ip", "outer_src_ip",
                                                                               "outer_dst_ip") else c
        for c in names)
    rows = server.query(f"SELECT {select}, host, collector_id, batch_seq FROM hdrlog.packets "
                        "ORDER BY batch_seq, toUnixTimestamp64Nano(ts)")
    assert len(rows) == 2 * n
    for seq in (1, 2):
        sent = packet_columns(n, seq)
        got = rows[(seq - 1) * n: seq * n]
        for j, spec in enumerate(registry.PACKETS):
            col = [r[j] for r in got]
            want = sent[spec.name]
            if spec.name == "direction":
                want = [registry.DIRECTIONS[int(v)] for v in want]
            elif spec.name == "tunnel_type":
                want = [registry.TUNNEL_TYPES[int(v)] for v in want]
            elif spec.name in ("src_ip", "dst_ip", "outer_src_ip", "outer_dst_ip"):
                want = [_ip_text(bytes(v)) for v in want]
            elif not spec.is_string:
                want = [int(v) for v in want]
            assert col == list(want), f"column {spec.name} differs"
        assert {(r[-3], r[-2], r[-1]) for r in got} == {("host-a", "c1", seq)}
    # IPv4 is stored IPv4-mapped and usable as such
    v4 = server.query("SELECT toString(src_ip), IPv6NumToString(src_ip) FROM hdrlog.packets "
                      "WHERE ip_version = 4 ORDER BY ts LIMIT 1")
    assert v4[0][0].startswith("::ffff:198.18.")
    # DateTime64(9, 'UTC') keeps nanoseconds
    assert server.query("SELECT toString(min(ts)) FROM hdrlog.packets")[0][0] == "2023-11-14 22:13:21.123456789"


def test_flows_and_collector_stats_in_one_batch(server):
    flows = registry.empty_columns("flows", 2)
    flows["start_ts"] = np.array([T0, T0 + 5], dtype="<i8")
    flows["end_ts"] = np.array([T0 + 10, T0 + 20], dtype="<i8")
    flows["ifname"] = ["eth0", "eth1"]
    flows["direction"] = np.array([2, 1], dtype="u1")
    flows["src_ip"] = np.frombuffer(ipaddress.IPv6Address("2001:db8::7").packed * 2, dtype="V16")
    flows["packets"] = np.array([3, 2**63], dtype="<u8")
    stats = registry.empty_columns("collector_stats", 3)
    stats["ts"] = np.full(3, T0, dtype="<i8")
    stats["interval_ms"] = np.full(3, 1000, dtype="<u4")
    stats["counter"] = ["seen", "logged", "drop_ringbuf_full"]
    stats["value"] = np.array([10, 9, 1], dtype="<u8")
    b = batch(1, tables=[packets_table(4), registry.encode_table("flows", flows, 2),
                         registry.encode_table("collector_stats", stats, 3)])
    acks = server.send([b])
    assert (acks[0].status, acks[0].rows) == (OK, 9)
    assert server.query("SELECT direction, ifname, toString(src_ip), packets, toUnixTimestamp64Nano(end_ts) "
                        "FROM hdrlog.flows ORDER BY start_ts") == [
        ("egress", "eth0", "2001:db8::7", 3, T0 + 10), ("ingress", "eth1", "2001:db8::7", 2**63, T0 + 20)]
    assert server.query("SELECT counter, value, host FROM hdrlog.collector_stats ORDER BY value") == [
        ("drop_ringbuf_full", 1, "host-a"), ("logged", 9, "host-a"), ("seen", 10, "host-a")]


def test_resent_seq_never_duplicates(server):
    first = server.send([batch(1, 50), batch(2, 50)])
    assert [a.duplicate for a in first] == [False, False]
    # same stream: a seq sent twice in a row
    same = server.send([batch(3, 50), batch(3, 50)])
    assert [(a.seq, a.status) for a in same] == [(3, OK), (3, OK)]
    assert sorted(a.duplicate for a in same) == [False, True]
    # a new stream resends everything
    again = server.send([batch(1, 50), batch(2, 50), batch(3, 50)])
    assert [(a.status, a.rows, a.duplicate) for a in again] == [(OK, 0, True)] * 3
    assert server.query("SELECT batch_seq, count() FROM hdrlog.packets GROUP BY batch_seq ORDER BY batch_seq") == [
        (1, 50), (2, 50), (3, 50)]
    assert server.server.metrics.value("hdrlog_server_duplicate_batches_total") >= 4


def test_resend_on_new_stream_while_first_is_in_flight_joins_it(tmp_path):
    # A long flush interval keeps seq 1 pending while a second stream resends it.
    srv = ServerThread(config(tmp_path / "store", flush_interval=1.0, flush_rows=10**6)).start()
    try:
        results = {}

        def stream(name):
            results[name] = srv.send([batch(1, 100)])

        threads = [threading.Thread(target=stream, args=(k,)) for k in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        got = sorted((a.status, a.rows, a.duplicate) for k in "ab" for a in results[k])
        assert got == [(OK, 0, True), (OK, 100, False)]
        assert srv.query("SELECT count() FROM hdrlog.packets") == [(100,)]
        assert srv.server.metrics.value("hdrlog_server_joined_batches_total") == 1
    finally:
        srv.stop()


def test_resend_after_restart_on_the_same_store_is_a_duplicate(tmp_path):
    store = tmp_path / "store"
    srv = ServerThread(config(store)).start()
    try:
        assert [a.status for a in srv.send([batch(1, 40), batch(2, 40, collector_id="c2")])] == [OK, OK]
    finally:
        srv.stop()
    srv = ServerThread(config(store)).start()
    try:
        acks = srv.send([batch(1, 40), batch(2, 40, collector_id="c2"), batch(2, 40), batch(3, 40, collector_id="c2")])
        assert [(a.seq, a.rows, a.duplicate) for a in acks] == [(1, 0, True), (2, 0, True), (2, 40, False),
                                                                  (3, 40, False)]
        assert srv.query("SELECT collector_id, batch_seq, count() FROM hdrlog.packets GROUP BY 1, 2 ORDER BY 1, 2") == [
            ("c1", 1, 40), ("c1", 2, 40), ("c2", 2, 40), ("c2", 3, 40)]
    finally:
        srv.stop()


def _bad_batches():
    unequal = packets_table(5)
    unequal.columns[3].values = unequal.columns[3].values[:-4]  # sample_rate: one value short
    unknown = packets_table(2)
    unknown.name = "nope"
    offsets = packets_table(3)
    col = next(c for c in offsets.columns if c.name == "ifname")
    col.offsets = np.array([0, 9, 4, 10], dtype="<i4").tobytes()[:16]
    utf8 = packets_table(3)
    col = next(c for c in utf8.columns if c.name == "tls_sni")
    col.values = b"\xff\xfe" + col.values[2:]
    direction = packets_table(3)
    col = next(c for c in direction.columns if c.name == "direction")
    col.values = bytes([1, 7, 2])
    tunnel = packets_table(3)
    col = next(c for c in tunnel.columns if c.name == "tunnel_type")
    col.values = bytes([0, 1, 9])
    return [
        (batch(1, tables=[unequal]), "packets.sample_rate"),
        (batch(2, tables=[unknown]), "unknown table 'nope'"),
        (batch(3, tables=[offsets]), "packets.ifname"),
        (batch(4, tables=[utf8]), "packets.tls_sni is not valid UTF-8"),
        (batch(5, collector_id=""), "collector_id is empty"),
        (batch(6, host="bad host\n"), "host 'bad host\\n' is not allowed"),
        (batch(7, tables=[direction]), "packets.direction has value 7"),
        (batch(8, tables=[packets_table(2), packets_table(2)]), "appears twice"),
        (batch(9, tables=[tunnel]), "packets.tunnel_type has value 9 at row 2"),
    ]


def test_malformed_batches_are_rejected_with_a_reason_while_another_stream_works(server):
    bad = _bad_batches()
    good_acks = []
    stop = threading.Event()

    def good_stream():
        def gen():
            seq = 1
            while not stop.is_set() or seq <= 5:
                yield batch(seq, 20, collector_id="good")
                seq += 1
                time.sleep(0.01)
        good_acks.extend(server.send(gen()) if False else list(server.stub().Stream(gen(), timeout=60)))

    t = threading.Thread(target=good_stream)
    t.start()
    try:
        # bad batches interleaved with good ones on the same stream: the stream carries on
        mixed = []
        for b, _ in bad:
            mixed += [b, batch(100 + b.seq, 10, collector_id="mixed")]
        acks = server.send(mixed)
    finally:
        stop.set()
        t.join(30)
    by_seq = {a.seq: a for a in acks}
    for b, reason in bad:
        assert by_seq[b.seq].status == REJECTED, b.seq
        assert reason in by_seq[b.seq].error, (reason, by_seq[b.seq].error)
        assert "\n" not in by_seq[b.seq].error
    assert all(by_seq[100 + b.seq].status == OK for b, _ in bad)
    assert good_acks and all(a.status == OK for a in good_acks)
    assert server.query("SELECT collector_id, count() FROM hdrlog.packets GROUP BY 1 ORDER BY 1") == [
        ("good", 20 * len(good_acks)), ("mixed", 10 * len(bad))]
    m = server.server.metrics
    assert m.value("hdrlog_server_batches_rejected_total", reason="utf8") == 1
    assert m.value("hdrlog_server_batches_rejected_total", reason="unknown_table") == 1


def test_large_batches_are_coalesced_and_backpressured(tmp_path):
    srv = ServerThread(config(tmp_path / "store", flush_rows=1000, max_pending_rows=2000, flush_interval=0.2)).start()
    try:
        acks = srv.send([batch(s, 700) for s in range(1, 21)])
        assert [a.status for a in acks] == [OK] * 20
        assert srv.query("SELECT count(), uniqExact(batch_seq) FROM hdrlog.packets") == [(14000, 20)]
        m = srv.server.metrics
        assert m.value("hdrlog_server_inserts_total") < 20  # coalesced
        assert m.value("hdrlog_server_inserted_rows_total", table="packets") == 14000
    finally:
        srv.stop()


def test_stop_flushes_pending_and_leaves_nothing_running(tmp_path):
    before = {t.name for t in threading.enumerate()}
    srv = ServerThread(config(tmp_path / "store", flush_interval=30, flush_rows=10**6)).start()
    try:
        acks: list = []
        reader = threading.Thread(target=lambda: acks.extend(srv.stub().Stream(iter([batch(1, 25)]), timeout=30)))
        reader.start()
        time.sleep(0.5)  # queued, far from flush_rows and flush_interval
        assert srv.server.writer.pending_rows == 25
        assert acks == []
    finally:
        left = srv.stop()
    reader.join(10)
    assert [(a.status, a.rows) for a in acks] == [(OK, 25)]
    assert left == []
    time.sleep(0.2)
    extra = {t.name for t in threading.enumerate()} - before
    assert not extra, extra
    srv2 = ServerThread(config(tmp_path / "store")).start()
    try:
        assert srv2.query("SELECT count() FROM hdrlog.packets") == [(25,)]
    finally:
        srv2.stop()


def test_retry_when_the_store_fails_and_no_duplicates_after(server, monkeypatch):
    store = server.server.store
    real = store.insert
    fails = {"n": 0}

    def flaky(table, data, token):
        if fails["n"] < 4:
            fails["n"] += 1
            from hdrlog.server.store import StoreError
            raise StoreError("connection refused (test)")
        return real(table, data, token)

    monkeypatch.setattr("hdrlog.server.writer.BACKOFF_START", 0.01)
    store.insert = flaky
    acks = server.send([batch(1, 30)])
    assert acks[0].status == RETRY and "store unavailable" in acks[0].error
    # the batch stayed queued; the resend joins it or finds it stored
    deadline = time.time() + 10
    while time.time() < deadline and server.query("SELECT count() FROM hdrlog.packets")[0][0] == 0:
        time.sleep(0.05)
    again = server.send([batch(1, 30)])
    assert again[0].status == OK
    assert server.query("SELECT count() FROM hdrlog.packets") == [(30,)]


def test_oversized_message_is_refused_by_grpc_not_fatal(tmp_path):
    srv = ServerThread(config(tmp_path / "store", max_message_bytes=64 * 1024)).start()
    try:
        with pytest.raises(grpc.RpcError) as err:
            srv.send([batch(1, 5000)])
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert [a.status for a in srv.send([batch(2, 10)])] == [OK]
    finally:
        srv.stop()


def test_metrics_endpoint_and_status_line(tmp_path):
    import urllib.request
    srv = ServerThread(config(tmp_path / "store", metrics_listen="127.0.0.1:0")).start()
    try:
        srv.send([batch(1, 10), batch(1, 10), batch(2, tables=[packets_table(0)], collector_id="")])
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.server.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        for line in ("hdrlog_server_batches_received_total 3.0", 'hdrlog_server_inserted_rows_total{table="packets"} 10.0',
                     'hdrlog_server_batches_rejected_total{reason="collector_id"} 1.0',
                     "hdrlog_server_duplicate_batches_total 1.0", "hdrlog_server_pending_rows 0.0"):
            assert line in text, line
        line = srv.server.status_line()
        assert line.startswith("streams=0 batches=3 rows=10 dup=1 rejected=1 pending=0 bytes=")
        assert int(line.rsplit("=", 1)[1]) == srv.server.metrics.value("hdrlog_server_received_bytes_total")
    finally:
        srv.stop()


def test_a_batch_clickhouse_refuses_is_rejected_and_the_rest_of_its_flush_is_stored(tmp_path):
    from hdrlog.server.store import StoreError
    srv = ServerThread(config(tmp_path / "store", flush_interval=0.3)).start()
    try:
        store = srv.server.store
        real = store.insert

        def picky(table, data, token):
            if 2 in set(data.column("batch_seq").to_pylist()):
                raise StoreError("Type mismatch in column x (TYPE_MISMATCH)", code=53, permanent=True)
            return real(table, data, token)

        store.insert = picky
        acks = srv.send([batch(1, 10), batch(2, 10), batch(3, 10)])
        acks = sorted(acks, key=lambda a: a.seq)
        assert [(a.seq, a.status) for a in acks] == [(1, OK), (2, REJECTED), (3, OK)]
        assert "TYPE_MISMATCH" in acks[1].error
        assert srv.query("SELECT batch_seq, count() FROM hdrlog.packets GROUP BY 1 ORDER BY 1") == [(1, 10), (3, 10)]
        assert srv.server.metrics.value("hdrlog_server_batches_rejected_total", reason="insert") == 1
    finally:
        srv.stop()


def test_a_collector_without_the_tunnel_columns_is_stored_with_their_defaults(server):
    """A collector from before tunnels (issue 14 item 5) sends no tunnel_* / outer_* columns: accepted, '' / 0 / ::."""
    old = packets_table(4, seed=3)
    keep = [c for c in old.columns if not c.name.startswith(("tunnel_", "outer_"))]
    del old.columns[:]
    old.columns.extend(keep)
    acks = server.send([batch(1, tables=[old], collector_id="old")])
    assert [(a.status, a.rows) for a in acks] == [(OK, 4)]
    rows = server.query("SELECT tunnel_type, tunnel_id, tunnel_flags, toString(outer_src_ip), toString(outer_dst_ip) "
                        "FROM hdrlog.packets WHERE collector_id = 'old'")
    assert rows == [("", 0, 0, "::", "::")] * 4
