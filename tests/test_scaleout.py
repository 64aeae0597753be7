"""Past one server (issue 16, item 5): several stateless servers in front of one store.

The store is an embedded chDB owned by one server (``W``), which takes the other servers' INSERTs on its
ClickHouse-compatible HTTP endpoint (``--sql-write-user``); the others run ``--clickhouse http://writer:...@W``,
the same clickhouse-connect code that would talk to a real ClickHouse. Real processes, real gRPC, real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import clickhouse_connect
import numpy as np
import pyarrow as pa
import pytest

from hdrlog.collector.sender import Outbox, Sender
from hdrlog.collector.spool import Spool
from hdrlog.proto import ingest_pb2
from hdrlog.server import schema
from tests.support import ServerProcess, wait_until
from tests.support import packets_table

WRITER, WRITE_PW = "writer", "write-pw-for-tests"
READER, READ_PW = "reader", "read-pw-for-tests"


def writer_server(tmp_path: Path) -> ServerProcess:
    """W: owns the embedded store, serves reads to READER and INSERTs to WRITER."""
    d = tmp_path / "w"
    d.mkdir()
    w = ServerProcess(f"chdb://{tmp_path}/store", d, "--sql-user", READER, "--sql-write-user", WRITER,
                      "--flush-interval", "0.1")
    w.env = {"HDRLOG_SQL_PASSWORD": READ_PW, "HDRLOG_SQL_WRITE_PASSWORD": WRITE_PW}
    return w


def remote_server(tmp_path: Path, name: str, w: ServerProcess, grpc_port: int | None = None) -> ServerProcess:
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    url = f"http://{WRITER}:{WRITE_PW}@127.0.0.1:{w.sql_port}"
    return ServerProcess(url, d, "--flush-interval", "0.1", grpc_port=grpc_port)


def sql(w: ServerProcess, query: str, user: str = READER, password: str = READ_PW) -> list[dict]:
    qs = urllib.parse.urlencode({"query": query, "default_format": "JSONEachRow"})
    req = urllib.request.Request(f"{w.sql_url}/?{qs}", headers={"X-ClickHouse-User": user,
                                                               "X-ClickHouse-Key": password})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return [json.loads(line) for line in resp.read().decode().splitlines() if line.strip()]


@pytest.fixture
def fleet(tmp_path):
    started: list[ServerProcess] = []

    def start(proc: ServerProcess) -> ServerProcess:
        started.append(proc)
        proc.start()
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()


def test_two_servers_one_collector_switching_under_sigkill_every_packet_exactly_once(tmp_path, fleet):
    w = fleet(writer_server(tmp_path))
    s1 = fleet(remote_server(tmp_path, "s1", w))
    s2 = fleet(remote_server(tmp_path, "s2", w))
    n_batches, rows = 240, 500
    IN_FLIGHT = 40  # noqa: N806
    spool = Spool(tmp_path / "spool", max_bytes=1 << 30, host_id="fo-host")
    spool.open()

    def make(seq: int) -> ingest_pb2.Batch:
        b = ingest_pb2.Batch(collector_id=spool.collector_id, host="fo-host", seq=seq)
        b.tables.extend([packets_table(rows, seq)])
        return b

    seqs: list[int] = []
    events: list[str] = []

    async def go() -> Sender:
        outbox = Outbox(max_rows=1 << 30, spool=spool)
        sender = Sender([s1.address, s2.address], outbox)
        sender.start()
        loop = asyncio.get_running_loop()

        async def acked_at_least(n: int, what: str) -> None:
            deadline = loop.time() + 300  # a hang guard only; nothing here is timed
            while sender.counters.batches_acked < n:
                assert loop.time() < deadline, f"stuck before {what}: {sender.counters} ({events})"
                await asyncio.sleep(0.02)

        killed = [asyncio.Event(), asyncio.Event()]
        gates = {n_batches // 3: killed[0], 2 * n_batches // 3: killed[1]}  # batch index -> the kill it waits for

        async def produce() -> None:
            # A collector under steady load: new batches keep coming while up to IN_FLIGHT wait for acks.
            # Each third after the first waits for its kill, so batches are still to come after each
            # (unpaced, the servers acked all 240 before the second kill landed).
            for i in range(n_batches):
                if i in gates:
                    await gates[i].wait()
                while len(outbox) >= IN_FLIGHT:
                    await asyncio.sleep(0.005)
                seq = spool.next_seq()
                seqs.append(seq)
                outbox.put(make(seq), rows)

        producer = asyncio.create_task(produce())
        # The first server dies with batches in flight; the collector moves to the second ...
        await acked_at_least(n_batches // 5, "killing s1")
        assert sender.target == s1.address  # sticky while healthy
        await asyncio.to_thread(s1.kill)
        killed[0].set()
        events.append(f"killed s1 at {sender.counters.batches_acked} acked")
        # ... the first comes back on its port, then the second dies: the collector moves back.
        restarted = remote_server(tmp_path, "s1", w, grpc_port=s1.grpc_port)
        await asyncio.to_thread(fleet, restarted)
        await acked_at_least(n_batches // 2, "the second kill")
        # Normally on s2 now; a stream that hiccuped under this machine's load may have sent it back to
        # the restarted s1 already. Either way the server it is on dies, and it must move to the other.
        on = s2 if sender.target == s2.address else restarted
        await asyncio.to_thread(on.kill)
        killed[1].set()
        acked_at_kill = sender.counters.batches_acked
        events.append(f"killed {on.address} (the collector's server) at {acked_at_kill} acked")
        await producer
        assert await sender.wait_drained(300), f"unacked: {len(outbox)} ({events})"
        # `on` is dead, so beyond the IN_FLIGHT it may have acked while dying, every later ack came
        # from the other server: the collector moved. (Not sender.target: after the last ack a
        # hiccup under load can leave it trying the dead one, with nothing left to send.)
        assert sender.counters.batches_acked - acked_at_kill > IN_FLIGHT, (acked_at_kill, events)
        print(f"failover: {'; '.join(events)}; {sender.counters.batches_acked} acked in the end")
        await sender.stop()
        return sender

    sender = asyncio.run(go())
    assert sender.counters.switches >= 2 and sender.counters.batches_rejected == 0
    total = sql(w, "SELECT count() AS n, uniqExact(batch_seq) AS seqs FROM hdrlog.packets")[0]
    wrong = sql(w, f"SELECT batch_seq, count() AS n FROM hdrlog.packets GROUP BY batch_seq "
                   f"HAVING n != {rows} ORDER BY batch_seq LIMIT 20")
    assert wrong == [], f"seqs stored other than once: {wrong} ({events})"
    assert int(total["seqs"]) == n_batches and int(total["n"]) == n_batches * rows, (total, events)
    stored = [int(r["batch_seq"]) for r in sql(w, "SELECT DISTINCT batch_seq FROM hdrlog.packets ORDER BY batch_seq")]
    assert stored == sorted(seqs)
    # The rollups too, exactly once: per-batch rollup tokens drop the copies of batches both servers held, and what
    # s2 stored but had not rolled up when it was killed (it is not restarted) is finished by a surviving server's
    # sweep of the shared journal (server/writer.py, "Rollups across servers").
    rolled = "SELECT toInt64(sum(records)) AS r, toInt64(sum(packets)) AS p FROM hdrlog.packets_1m"
    raw = sql(w, "SELECT toInt64(count()) AS r, toInt64(sum(toUInt64(sample_rate))) AS p FROM hdrlog.packets")
    wait_until(lambda: sql(w, rolled) == raw, 120, f"rollups equal to the raw rows {raw}")
    wait_until(lambda: sql(w, "SELECT count() AS n FROM (SELECT token FROM hdrlog.rollup_log WHERE state IN (0, 1) "
                              "GROUP BY token HAVING countIf(state = 1) = 0)") == [{"n": 0}],
               120, "every rollup journal entry ended")
    assert sql(w, rolled) == raw


def test_insert_endpoint_write_user_only_hdrlog_tables_and_dedup_token(tmp_path, fleet):
    w = fleet(writer_server(tmp_path))
    host = f"127.0.0.1:{w.sql_port}"
    writer = clickhouse_connect.get_client(dsn=f"http://{WRITER}:{WRITE_PW}@{host}")
    data = pa.table({"ts": pa.array(np.full(3, 1_700_000_000 * 10**9), pa.timestamp("ns", "UTC")),
                     "host": ["h", "h", "h"], "collector_id": ["h/x"] * 3,
                     "batch_seq": pa.array([7, 7, 7], pa.uint64())})
    token = {"insert_deduplication_token": "t-1"}
    writer.insert_arrow("hdrlog.packets", data, settings=token)
    writer.insert_arrow("hdrlog.packets", data, settings=token)  # a resend: dropped by the token
    assert sql(w, "SELECT count() AS n FROM hdrlog.packets") == [{"n": 3}]
    # Native too (clickhouse-connect's insert(): DESCRIBE first, lz4-compressed body)
    import datetime
    when = datetime.datetime(2023, 11, 14, 22, 13, 20, tzinfo=datetime.timezone.utc)
    writer.insert("hdrlog.packets", [[when, "h", "h/x", 8]],
                  column_names=["ts", "host", "collector_id", "batch_seq"], settings={"insert_deduplication_token": "t-2"})
    assert sql(w, "SELECT count() AS n FROM hdrlog.packets") == [{"n": 4}]
    # the watermark reads a server makes, through the same endpoint
    assert writer.query("SELECT max(batch_seq) FROM hdrlog.packets").result_rows == [(8,)]

    def refused(client, statement: str) -> str:
        with pytest.raises(Exception) as info:
            client.command(statement)
        return str(info.value)

    assert "164" in refused(writer, "CREATE TABLE default.x (a UInt8) ENGINE = Memory")
    assert "164" in refused(writer, "DROP TABLE hdrlog.packets")
    with pytest.raises(Exception, match="hdrlog"):
        writer.insert_arrow("default.t", data)
    with pytest.raises(Exception):
        writer.command("INSERT INTO hdrlog.packets SELECT * FROM hdrlog.packets")
    assert sql(w, "SELECT count() AS n FROM hdrlog.packets") == [{"n": 4}]
    # the read-only user cannot insert; a wrong write password is refused
    reader = clickhouse_connect.get_client(dsn=f"http://{READER}:{READ_PW}@{host}")
    with pytest.raises(Exception, match="164|READONLY|readonly"):
        reader.insert_arrow("hdrlog.packets", data, settings={"insert_deduplication_token": "t-3"})
    with pytest.raises(Exception, match="516|Authentication"):
        clickhouse_connect.get_client(dsn=f"http://{WRITER}:wrong@{host}")
    assert sql(w, "SELECT count() AS n FROM hdrlog.packets") == [{"n": 4}]


def _head_answer(port: int, user: str, password: str, length: int) -> bytes:
    """Send only a POST's head (Expect: 100-continue, ``length`` bytes announced) and read what comes back."""
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST /?query=INSERT%20INTO%20hdrlog.packets%20FORMAT%20Native HTTP/1.1\r\n"
                     f"Host: x\r\nX-ClickHouse-User: {user}\r\nX-ClickHouse-Key: {password}\r\n"
                     f"Content-Length: {length}\r\nExpect: 100-continue\r\n\r\n".encode())
        return sock.recv(4096)


def test_insert_endpoint_larger_body_only_after_the_write_user_is_verified(tmp_path, fleet):
    """Credentials are judged on the head (a wrong write password never gets 100 Continue); the write user's
    larger body cap (sql/insert.py MAX_INSERT_BYTES) is its own: the read user keeps the query cap."""
    from hdrlog.server.sql.body import MAX_BODY_BYTES
    from hdrlog.server.sql.insert import MAX_INSERT_BYTES

    w = fleet(writer_server(tmp_path))
    big = MAX_BODY_BYTES + (1 << 20)
    assert _head_answer(w.sql_port, WRITER, "wrong", big).startswith(b"HTTP/1.1 403")
    assert _head_answer(w.sql_port, WRITER, WRITE_PW, big).startswith(b"HTTP/1.1 100")
    assert _head_answer(w.sql_port, READER, READ_PW, big).startswith(b"HTTP/1.1 413")
    assert _head_answer(w.sql_port, WRITER, WRITE_PW, MAX_INSERT_BYTES + 1).startswith(b"HTTP/1.1 413")
    # A body past the query cap: refused for the read user, taken from the write user.
    n = 1_200_000  # ~19 MB as Arrow, more than MAX_BODY_BYTES once decoded
    data = pa.table({"ts": pa.array(np.full(n, 1_700_000_000 * 10**9), pa.timestamp("ns", "UTC")),
                     "host": pa.array(["h"] * n), "collector_id": pa.array(["h/big"] * n),
                     "batch_seq": pa.array(np.arange(n, dtype=np.uint64))})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, data.schema) as out:
        out.write_table(data)
    body = sink.getvalue().to_pybytes()
    assert MAX_BODY_BYTES < len(body) < MAX_INSERT_BYTES

    def post(user: str, password: str) -> tuple[int, str]:
        qs = urllib.parse.urlencode({"query": "INSERT INTO hdrlog.packets FORMAT Arrow"})
        req = urllib.request.Request(f"{w.sql_url}/?{qs}", data=body, headers={
            "X-ClickHouse-User": user, "X-ClickHouse-Key": password})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:  # the server may close before the whole body is sent
            return 413, str(exc)

    status, text = post(READER, READ_PW)
    assert status == 413, text
    status, text = post(WRITER, WRITE_PW)
    assert status == 200, text
    assert sql(w, "SELECT count() AS n FROM hdrlog.packets") == [{"n": n}]


def test_insert_endpoint_is_off_by_default(server):
    body = b"INSERT INTO hdrlog.packets (batch_seq) FORMAT Native\n"
    req = urllib.request.Request(server.sql_url + "/", data=body)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == 403 and info.value.headers["X-ClickHouse-Exception-Code"] == "164"


# -- --cluster NAME: what can be shown on one node ------------------------------------------------------

CLUSTER_XML = """<clickhouse>
  <tcp_port>{port}</tcp_port>
  <remote_servers><one><shard><replica><host>localhost</host><port>{port}</port></replica></shard></one></remote_servers>
</clickhouse>
"""


def _every_schema_statement() -> list[str]:
    out = [f"CREATE DATABASE IF NOT EXISTS {schema.DATABASE}", schema.SCHEMA_VERSION_DDL]
    for _, _, statements in schema.MIGRATIONS:
        out += statements
    out += [f"ALTER TABLE hdrlog.packets MODIFY TTL toDateTime(ts) + INTERVAL 30 DAY "
            "SETTINGS materialize_ttl_after_modify = 0",
            "ALTER TABLE hdrlog.packets MODIFY SETTING ttl_only_drop_parts = 1",
            "ALTER TABLE hdrlog.packets ADD COLUMN IF NOT EXISTS vlan_inner_id UInt16"]
    return out


def test_cluster_ddl_parses_in_the_engine_and_has_the_replicated_distributed_shape(tmp_path):
    from hdrlog.server.cluster import Layout

    layout = Layout("fleet")
    client = clickhouse_connect.get_client(dsn=f"chdb://{tmp_path}/parse")
    made: list[str] = []
    for sql in _every_schema_statement():
        for stmt in layout.statements(sql):
            # The engine's own parser accepts each statement (formatQuery raises SYNTAX_ERROR otherwise).
            text = client.query("SELECT formatQuery({q:String})", parameters={"q": stmt}).result_rows[0][0]
            if text.startswith("INSERT INTO"):
                # Data, not DDL (migration 13 names the stored batches in rollup_log): run once, through
                # the Distributed tables, never ON CLUSTER (each node would add the rows again).
                assert "_local" not in text and "ON CLUSTER" not in text, stmt
                continue
            assert "ON CLUSTER fleet" in text, stmt
            made.append(text)
    creates = [t for t in made if t.startswith("CREATE TABLE")]
    for table in list(schema.PARTITION_TS) + list(schema.ROLLUP_TABLES) + ["anomalies"]:
        local = [t for t in creates if t.startswith(f"CREATE TABLE IF NOT EXISTS hdrlog.{table}_local ")]
        dist = [t for t in creates if t.startswith(f"CREATE TABLE IF NOT EXISTS hdrlog.{table} ")]
        assert len(local) == 1 and "Replicated" in local[0] and "'{replica}'" in local[0], table
        assert "non_replicated_deduplication_window" not in local[0]
        assert len(dist) == 1 and f"Distributed(fleet, hdrlog, {table}_local, cityHash64(host))" in dist[0], table
    views = [t for t in made if t.startswith("CREATE MATERIALIZED VIEW")]
    # Migration 5's views read packets_local; migration 11 drops them (on the cluster) for views on rollup_in_local,
    # the Null table the servers' rollups go through (server/rollup.py).
    assert len(views) == 6 and all("_local" in v.split(" AS ")[0] for v in views)
    assert sum("FROM hdrlog.packets_local" in v for v in views) == 3
    assert sum("FROM hdrlog.rollup_in_local" in v for v in views) == 3
    drops = [t for t in made if t.startswith("DROP VIEW")]
    assert len(drops) == 3 and all("ON CLUSTER fleet" in t for t in drops)
    stage = [t for t in creates if t.startswith("CREATE TABLE IF NOT EXISTS hdrlog.rollup_in_local ")]
    assert len(stage) == 1 and "ENGINE = `Null`" in stage[0]
    journal = [t for t in creates if t.startswith("CREATE TABLE IF NOT EXISTS hdrlog.rollup_log ")]
    assert len(journal) == 1 and "Distributed(fleet, hdrlog, rollup_log_local, cityHash64(token))" in journal[0]
    assert not [t for t in made if t.startswith("ALTER TABLE hdrlog.packets_1m ON CLUSTER") and "ORDER BY" in t]
    assert any("ReplicatedSummingMergeTree('/clickhouse/tables/{shard}/hdrlog/packets_1m_local', '{replica}', "
               "(packets, bytes, records))" in t for t in creates)
    assert any("hdrlog.schema_version ON CLUSTER fleet" in t and "/clickhouse/tables/hdrlog/schema_version" in t
               for t in creates)


def test_cluster_layout_rehearsed_on_one_chdb_node_distributed_writes_are_deduplicated(tmp_path):
    """The same layout without ON CLUSTER and replication, on a one-shard cluster of chDB's own (a config
    file): the Distributed write path the server uses, its tokens, views and stored-seq reads."""
    from hdrlog.server.convert import convert_batch
    from hdrlog.server.store import Store
    from hdrlog.server.writer import batch_token
    from tests.support import batch
    from tests.support import free_port

    config = tmp_path / "cluster.xml"
    config.write_text(CLUSTER_XML.format(port=free_port()))
    store = Store(f"chdb://{tmp_path}/node", cluster="one", cluster_rehearsal=True)
    real_connect = store._connect
    store._connect = lambda options=None: real_connect({**(options or {}), "config-file": str(config)})
    store.open()
    store.migrate()
    engines = dict(store._client.query("SELECT name, engine FROM system.tables WHERE database = 'hdrlog'").result_rows)
    assert engines["packets"] == "Distributed" and engines["packets_local"] == "MergeTree"
    assert engines["packets_1m_local"] == "SummingMergeTree" and engines["packets_1m"] == "Distributed"
    tr = convert_batch(batch(5, 300, collector_id="host-a/c"), "host-a")[0]
    token = batch_token("host-a/c", 5, "packets", int(tr.days[0]), tr.rows)
    store.insert("packets", tr.data, token)
    store.insert("packets", tr.data, token)  # the resend, from another server: same token, dropped on the shard
    assert store.count("packets") == 300
    # The rollups are the server's (server/rollup.py): the batch's rollup under its per-batch token, twice.
    from hdrlog.server import rollup
    rows, _ = rollup.rollup_rows(tr.data)
    store.insert_rollup(rows, f"{token}-rollup")
    store.insert_rollup(rows, f"{token}-rollup")
    assert store._client.command("SELECT sum(records) FROM hdrlog.packets_1m") == 300
    store.log_rollups([(token, [("host-a/c", 5, int(tr.days[0]))])])
    assert [t for t, *_ in store.unfinished_rollups()] == [token]
    store.end_rollups([token])
    assert store.unfinished_rollups() == [] and store.unfinished_rollups(since=3600) == []
    # The journal's prune (server/writer.py, "The journal's retention"): its mutations go to the local table,
    # its summary through the Distributed one.
    store._client.command("ALTER TABLE hdrlog.rollup_log_local UPDATE at = at - toIntervalDay(30) WHERE 1",
                          settings={"mutations_sync": 2})
    assert store.prune_rollup_log(7 * 86400, wait=True) == 1
    assert store._client.query("SELECT state, seqs FROM hdrlog.rollup_log").result_rows == [(3, [5])]
    assert store.unjournaled_packets() == []
    marks = store.stored_seqs("host-a/c", "host-a", 1)
    assert [s.ranges() for s in marks["packets"].values()] == [[(5, 5)]]
    assert store.committed_watermarks().by_key[("host-a/c", "packets")]
    store.close()


@pytest.mark.parametrize("scope, copies", [("batch", 1), ("flush", 2)])
def test_same_batches_coalesced_differently_by_two_servers_racing(tmp_path, scope, copies):
    """Server B reads the stored seqs before server A's INSERT of the same batches lands (A was cut off from
    the collector mid-insert); each coalesced them with other batches. Tokens per batch drop B's copies;
    tokens per flush (the old scheme) cannot: this is the race they exist for."""
    from hdrlog.server.config import ServerConfig
    from hdrlog.server.convert import convert_batch
    from hdrlog.server.metrics import ServerMetrics
    from hdrlog.server.store import Store
    from hdrlog.server.writer import Writer
    from tests.support import batch

    cfg = ServerConfig(clickhouse=f"chdb://{tmp_path}/s", insecure=True, flush_rows=10**9, flush_interval=3600,
                       dedup_scope=scope)
    store = Store(cfg.clickhouse)
    store.open()
    store.migrate()

    def rows(seq: int, cid: str = "host-a/c"):
        return convert_batch(batch(seq, 100, collector_id=cid, host="host-a"), "host-a")

    async def go():
        a, b = Writer(store, cfg, ServerMetrics()), Writer(store, cfg, ServerMetrics())
        await a.start()
        await b.start()
        assert await b.refresh("host-a/c", "host-a", 1) == ""  # B's stream starts: nothing stored yet
        fa = [await a.submit("host-a/c", s, rows(s)) for s in range(1, 6)] + [await a.submit("host-a/o", 9, rows(9, "host-a/o"))]
        fb = [await b.submit("host-a/c", s, rows(s)) for s in range(1, 11)]
        a.flush_now()
        await asyncio.gather(*fa)       # A's insert lands after B decided to keep seqs 1..5
        b.flush_now()
        await asyncio.gather(*fb)
        await a.stop()
        await b.stop()

    asyncio.run(go())
    counts = dict(store._client.query("SELECT batch_seq, count() FROM hdrlog.packets WHERE collector_id = 'host-a/c' "
                                      "GROUP BY batch_seq").result_rows)
    # The rollups follow the raw rows: with per-batch tokens each batch's rollup is its own INSERT under its own
    # token, so B's copy of a batch A rolled up (in another grouping) is dropped too.
    raw = store._client.query("SELECT count(), sum(toUInt64(wire_len) * sample_rate) FROM hdrlog.packets").result_rows
    rolled = store._client.query("SELECT sum(records), sum(bytes) FROM hdrlog.packets_1m").result_rows
    pairs = store._client.query("SELECT sum(packets) FROM hdrlog.pairs_1m").result_rows
    pairs_raw = store._client.query("SELECT sum(toUInt64(sample_rate)) FROM hdrlog.packets WHERE ip_version != 0").result_rows
    open_entries = store.unfinished_rollups()
    store.close()
    assert counts == {s: 100 * (copies if s <= 5 else 1) for s in range(1, 11)}
    assert rolled == raw and pairs == pairs_raw, (rolled, raw, pairs, pairs_raw)
    assert open_entries == []
