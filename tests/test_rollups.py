"""The per-minute rollups the server computes (server/rollup.py): the same answers as the same
aggregation over the raw rows, for every key they keep; bounded when a scan makes every key
distinct (the rest in one other = 1 row per host-minute, totals kept); exactly once across a
crash between a flush's packets INSERT and its rollup (the journal), and across a SIGKILL with
resends. Real servers, real chDB, real gRPC."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pyarrow as pa
import pytest

from bench import synth
from hdrlog.proto import columns as registry
from hdrlog.proto import ingest_pb2
from hdrlog.server import rollup
from hdrlog.server.convert import convert_batch
from hdrlog.server.store import Store
from hdrlog.server.writer import _Entry, _group_token, _journal, _token, concat
from tests.support import MiniCollector, ServerProcess, ServerThread, batch, config

OK = ingest_pb2.Ack.OK
START = 1_699_999_980 * 10**9  # a minute boundary
PORT = "if(src_port = 0 OR dst_port = 0, greatest(src_port, dst_port), least(src_port, dst_port))"
SERVICE = ("((ip_proto = 6 AND bitAnd(tcp_flags, 0x12) = 0x12) "
           "OR (ip_proto = 17 AND src_port != 0 AND src_port < dst_port AND src_port < 32768))")

# (rollup query, the same aggregation over the raw rows); every row: key..., measures...
PAIRS = (
    "SELECT toString(minute), host, toString(src_ip), toString(dst_ip), ip_proto, sum(packets), sum(bytes), "
    "sum(syns), sum(synacks), sum(rsts), uniqMerge(dst_ports) FROM hdrlog.pairs_1m WHERE other = 0 "
    "GROUP BY ALL ORDER BY ALL",
    "SELECT toString(toStartOfMinute(ts)), host, toString(src_ip), toString(dst_ip), ip_proto, "
    "sum(toUInt64(sample_rate)), sum(toUInt64(wire_len) * sample_rate), "
    "sumIf(toUInt64(sample_rate), ip_proto = 6 AND bitAnd(tcp_flags, 0x12) = 0x02), "
    "sumIf(toUInt64(sample_rate), ip_proto = 6 AND bitAnd(tcp_flags, 0x12) = 0x12), "
    "sumIf(toUInt64(sample_rate), ip_proto = 6 AND bitAnd(tcp_flags, 0x04) != 0), uniq(dst_port) "
    "FROM hdrlog.packets WHERE ip_version != 0 GROUP BY ALL ORDER BY ALL")
QUERIES = {
    "packets_1m": (
        "SELECT toString(minute), host, direction, ip_proto, port, sum(packets), sum(bytes), sum(records) "
        "FROM hdrlog.packets_1m WHERE other = 0 GROUP BY ALL ORDER BY ALL",
        f"SELECT toString(toStartOfMinute(ts)), host, direction, ip_proto, {PORT} AS p, sum(toUInt64(sample_rate)), "
        "sum(toUInt64(wire_len) * sample_rate), count() FROM hdrlog.packets GROUP BY ALL ORDER BY ALL"),
    "pairs_1m": PAIRS,
    "services_1m": (
        "SELECT toString(minute), host, toString(ip), ip_proto, port, sum(replies), uniqMerge(clients) "
        "FROM hdrlog.services_1m WHERE other = 0 GROUP BY ALL ORDER BY ALL",
        "SELECT toString(toStartOfMinute(ts)), host, toString(src_ip), ip_proto, src_port, "
        f"sum(toUInt64(sample_rate)), uniq(dst_ip) FROM hdrlog.packets WHERE {SERVICE} GROUP BY ALL ORDER BY ALL"),
}


def assert_rollups_equal_raw(query) -> None:
    for table, (mine, raw) in QUERIES.items():
        got, want = [tuple(map(str, r)) for r in query(mine)], [tuple(map(str, r)) for r in query(raw)]
        assert got, f"{table} is empty"
        assert got == want, f"{table}: {len(got)} rollup rows vs {len(want)} raw; first differences: " + \
            str([(a, b) for a, b in zip(got, want) if a != b][:3])


def cols_batch(seq: int, cols: dict, rows: int, collector_id: str = "roll") -> ingest_pb2.Batch:
    b = ingest_pb2.Batch(collector_id=collector_id, host="host-00", seq=seq)
    b.tables.append(registry.encode_table("packets", cols, rows))
    return b


def split(cols: dict, n: int, parts: int) -> list[dict]:
    size = n // parts
    return [{c: v[i * size:(i + 1) * size] for c, v in cols.items()} for i in range(parts)]


def test_rollups_equal_the_raw_aggregation_on_a_plausible_mix_and_a_scan(tmp_path):
    n = 12_000
    plausible = synth.packets(n, start_ns=START, seconds=150, hosts=1)["host-00"]
    scan = synth.scan(n, start_ns=START + 150 * 10**9, seconds=150, peers=3000)["host-00"]
    batches = [cols_batch(i + 1, c, n // 4) for i, c in enumerate(split(plausible, n, 4) + split(scan, n, 4))]
    srv = ServerThread(config(tmp_path / "store", flush_rows=5000)).start()
    try:
        acks = srv.send(batches)
        assert [a.status for a in acks] == [OK] * len(batches)
        srv.call(srv.server.writer.caught_up())  # the rollup worker has caught up
        assert_rollups_equal_raw(srv.query)
        # the materialized views on packets are gone: their work is the server's now
        assert srv.query("SELECT count() FROM system.tables WHERE database = 'hdrlog' AND name LIKE '%_1m_mv'") == [(0,)]
        assert srv.query("SELECT count() FROM hdrlog.pairs_1m WHERE other = 1") == [(0,)]
        # every flush is journaled with its end
        assert srv.query("SELECT countIf(state = 0) = countIf(state = 1) FROM hdrlog.rollup_log") == [(1,)]
    finally:
        assert srv.stop() == []


def test_a_scan_past_rollup_max_keys_keeps_the_top_keys_exact_and_folds_the_rest_counted(tmp_path):
    n, k = 6000, 50
    scan = synth.scan(n, start_ns=START, seconds=20, peers=2000)["host-00"]  # one minute, one flush
    srv = ServerThread(config(tmp_path / "store", flush_rows=100_000, rollup_max_keys=k)).start()
    try:
        assert [a.status for a in srv.send([cols_batch(1, scan, n)])] == [OK]
        srv.call(srv.server.writer.caught_up())
        kept = {r[:5]: r for r in srv.query(PAIRS[0])}
        raw = {r[:5]: r for r in srv.query(PAIRS[1])}
        assert len(kept) == k and len(raw) > 10 * k
        assert all(raw[key] == row for key, row in kept.items())  # a kept key: exactly the raw answer
        # they are the k pairs with the most packets
        assert min(r[5] for r in kept.values()) >= max(r[5] for key, r in raw.items() if key not in kept)
        other = srv.query("SELECT sum(packets), sum(bytes), sum(syns), sum(rsts), sum(folded_keys), count() "
                          "FROM hdrlog.pairs_1m WHERE other = 1")
        tot = srv.query("SELECT sum(packets), sum(bytes), sum(syns), sum(rsts) FROM hdrlog.pairs_1m")
        raw_tot = srv.query("SELECT count(), sum(toUInt64(wire_len)), countIf(tcp_flags = 2), "
                            "countIf(bitAnd(tcp_flags, 4) != 0) FROM hdrlog.packets")
        assert tot == raw_tot  # totals over a minute, other row included, are the raw totals
        assert other[0][4] == len(raw) - k and other[0][5] == 1
        svc_keys = srv.query("SELECT count() FROM hdrlog.services_1m WHERE other = 0")
        assert svc_keys[0][0] <= k
        # packets_1m: its kept keys exact too, its totals (other row included) the raw totals
        mine, raw_q = QUERIES["packets_1m"]
        kept1 = srv.query(mine)
        raw1 = {r[:5]: r for r in srv.query(raw_q)}
        assert len(kept1) == k and all(raw1[r[:5]] == r for r in kept1)
        assert srv.query("SELECT sum(packets), sum(bytes), sum(records) FROM hdrlog.packets_1m") == \
            srv.query("SELECT count(), sum(toUInt64(wire_len)), count() FROM hdrlog.packets")
        folded = srv.server.metrics.value("hdrlog_server_rollup_folded_keys_total", table="rollups")
        assert folded >= len(raw) - k
    finally:
        assert srv.stop() == []


def _flush_state(store_path, batches, landed: str) -> None:
    """What a server killed after its flushes' packets INSERTs leaves: the journal's intents and the
    rows; with ``landed`` "single" also the first flush's rollup, with "group" the rollup of all
    flushes in one INSERT and its group row; never the journal's ends."""
    store = Store(f"chdb://{store_path}")
    store.open()
    store.migrate()
    try:
        tokens, stages = [], []
        for b in batches:  # one flush per batch
            t = convert_batch(b, b.host)[0]
            e = _Entry(b.collector_id, b.seq, [t], {"packets": np.unique(t.days)}, t.rows, 0.0)
            token = _token("packets", [(e, t)])
            store.log_rollup(token, 0, _journal([(e, t)]))
            store.insert("packets", concat([t.data]), token)
            tokens.append(token)
            stages.append(rollup.rollup_rows(t.data)[0])
        if landed == "single":
            store.insert_rollup(stages[0], f"{tokens[0]}-rollup")
        elif landed == "group":
            group = _group_token(tokens)
            store.log_rollup(group, 2, [], members=tokens)
            store.insert_rollup(pa.concat_tables(stages), f"{group}-rollup")
    finally:
        store.close()


def _serve_prepared(tmp_path, prepare, store_path, *args) -> ServerProcess:
    """A started server on a store that ``prepare(store_path, *args)`` left, in a process of its own first
    (one process opens one chDB path)."""
    prep = multiprocessing.get_context("spawn").Process(target=prepare, args=(store_path, *args))
    prep.start()
    prep.join(120)
    assert prep.exitcode == 0
    srv = ServerProcess(f"chdb://{store_path}", tmp_path)
    srv.start()
    return srv


@pytest.mark.parametrize("landed", ["none", "single", "group"])
def test_a_crash_between_the_packets_insert_and_its_rollup_is_rolled_up_once_at_start(tmp_path, landed):
    path = tmp_path / "store"
    batches = [batch(s, 300, collector_id="crash") for s in (1, 2, 3)]
    srv = _serve_prepared(tmp_path, _flush_state, path, batches, landed)
    try:
        q = lambda text: [tuple(r.values()) for r in srv.sql(text)]  # noqa: E731
        assert_rollups_equal_raw(q)  # rolled up at start, and not twice what had landed
        ends = q("SELECT count() AS n FROM hdrlog.rollup_log WHERE state = 1")
        assert [tuple(map(int, r)) for r in ends] == [(3,)]
        collector = MiniCollector(batches)  # resends are duplicates: nothing moves
        assert collector.run_once(srv.address)
        assert all(a.duplicate for a in collector.acks)
        assert_rollups_equal_raw(q)
    finally:
        assert srv.stop() == 0, srv.log()[-2000:]


def _unjournaled_state(store_path, batches, before_migration_13: bool) -> None:
    """Packets stored with no journal entry at all: what a server killed after its flushes' packets
    INSERTs and before its rollup worker journaled their group leaves. With ``before_migration_13``
    their rollups are stored too and the store is put back before migration 13 (a store of an older
    server: rolled up by it, never journaled per rollup INSERT)."""
    store = Store(f"chdb://{store_path}")
    store.open()
    store.migrate()
    try:
        for b in batches:
            t = convert_batch(b, b.host)[0]
            e = _Entry(b.collector_id, b.seq, [t], {"packets": np.unique(t.days)}, t.rows, 0.0)
            token = _token("packets", [(e, t)])
            store.insert("packets", concat([t.data]), token)
            if before_migration_13:
                store.insert_rollup(rollup.rollup_rows(t.data)[0], f"{token}-rollup")
        if before_migration_13:
            store._client.command("TRUNCATE TABLE hdrlog.rollup_log")  # noqa: SLF001
            store._client.command("ALTER TABLE hdrlog.schema_version DELETE WHERE version = 13 "  # noqa: SLF001
                                  "SETTINGS mutations_sync = 1")
    finally:
        store.close()


@pytest.mark.parametrize("before_migration_13", [False, True])
def test_stored_packets_without_a_journal_entry_are_rolled_up_once_at_start(tmp_path, before_migration_13):
    """The journal is written per rollup INSERT (not before each flush's packets): a start rolls up the
    stored batches no intent names, and only those (an older store's are named by migration 13)."""
    path = tmp_path / "store"
    batches = [batch(s, 300, collector_id="unjournaled") for s in (1, 2, 3, 5)]
    srv = _serve_prepared(tmp_path, _unjournaled_state, path, batches, before_migration_13)
    try:
        q = lambda text: [tuple(r.values()) for r in srv.sql(text)]  # noqa: E731
        assert_rollups_equal_raw(q)  # rolled up at start (or kept), never twice
        opened = q("SELECT countIf(state = 0) = countIf(state = 1) AS ok FROM hdrlog.rollup_log")
        assert [tuple(map(int, r)) for r in opened] == [(1,)]
        collector = MiniCollector(batches + [batch(4, 300, collector_id="unjournaled")])
        assert collector.run_once(srv.address)  # the resends are duplicates, seq 4 is new
        assert sorted(a.duplicate for a in collector.acks) == [False, True, True, True, True]
        srv.stop()  # the rollup worker finishes before the process ends
        srv.start()  # nothing is left to roll up again
        assert_rollups_equal_raw(q)
    finally:
        assert srv.stop() == 0, srv.log()[-2000:]


def test_rollups_stay_exact_across_a_sigkill_and_resends(tmp_path):
    store = tmp_path / "store"
    batches = [batch(s, 1500, collector_id="kill-rollup") for s in range(1, 41)]
    proc = ServerProcess(f"chdb://{store}", tmp_path, "--flush-rows", "4000", "--flush-interval", "0.05")
    collector = MiniCollector(batches)
    try:
        proc.start()
        assert 0 < collector.kill_mid_stream(proc, 10) < len(batches), "the kill did not land mid-stream"
        proc.start()
        collector.resend(batches[:5])
        assert collector.run_once(proc.address)
        proc.stop()  # the rollup worker finishes before the process ends
        proc.start()
        q = lambda text: [tuple(r.values()) for r in proc.sql(text)]  # noqa: E731
        assert [tuple(map(int, r)) for r in q("SELECT count() AS n FROM hdrlog.packets")] == [(40 * 1500,)]
        assert_rollups_equal_raw(q)
    finally:
        assert proc.stop() == 0, proc.log()[-2000:]


def test_the_rollup_of_the_same_rows_is_the_same_whatever_their_order():
    """The crash recovery reads a flush's rows back in another order and must get its rollup."""
    n = 4000
    cols = synth.scan(n, start_ns=START, seconds=90, peers=500)["host-00"]
    data = convert_batch(cols_batch(1, cols, n), "host-00")[0].data
    shuffled = data.take(pa.array(np.random.default_rng(7).permutation(n)))
    for k in (30, 10**6):
        a, fa = rollup.rollup_rows(data, k)
        b, fb = rollup.rollup_rows(shuffled, k)
        assert fa == fb and (fa > 0) == (k == 30)

        def canon(t: pa.Table) -> list:
            rows = t.to_pylist()
            for r in rows:
                r["ports"], r["clients"] = sorted(r["ports"]), sorted(r["clients"])
            return sorted(rows, key=repr)
        assert canon(a) == canon(b)


def _repeat_rollup_state(store_path) -> list:
    store = Store(f"chdb://{store_path}")
    store.open()
    store.migrate()
    try:
        n = 3000
        cols = synth.scan(n, start_ns=START, seconds=30, peers=300)["host-00"]
        rows = rollup.rollup_rows(convert_batch(cols_batch(1, cols, n), "host-00")[0].data)[0]
        client = store._client  # noqa: SLF001
        sums = "SELECT sum(records) FROM hdrlog.packets_1m UNION ALL SELECT sum(packets) FROM hdrlog.pairs_1m"
        out = []
        store.insert_rollup(rows, "tok-1-rollup")  # the server's path (embedded: chDB's Python())
        out.append(sorted(r[0] for r in client.query(sums).result_rows))
        # the same rows again under the same token: other chunks (a recovery), then the other path
        store.insert_rollup(pa.concat_tables([rows.slice(0, 7), rows.slice(7)]), "tok-1-rollup")
        store.insert_rollup(rows.combine_chunks(), "tok-1-rollup")
        client.insert_arrow("hdrlog.rollup_in", rows.combine_chunks(), settings={
            "insert_deduplication_token": "tok-1-rollup", "insert_deduplicate": 1, "async_insert": 0})
        out.append(sorted(r[0] for r in client.query(sums).result_rows))
        return out
    finally:
        store.close()


def test_a_repeated_rollup_insert_is_dropped_whatever_its_chunks_and_insert_path(tmp_path):
    """The token of a block squashed from several Arrow chunks is not that of the same rows in one chunk,
    so the store inserts one chunk, whichever path: a recovered rollup (other chunks) or another server's
    (insert_arrow over HTTP) is then dropped as the repeat it is."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # one process opens one chDB path
        first, after = pool.apply(_repeat_rollup_state, (tmp_path / "store",))
    assert first == after and first[0] == 3000
