"""The rollup journal's retention (writer.py, "The journal's retention"): the prune drops the entries
no recovery can need (ended, older than the keep time) and keeps every open intent whatever its age;
the batches of pruned intents are summarized, so a start neither takes them for unjournaled ones (a
second rollup) nor misses an interrupted one (none). Real chDB, a real server process."""

from __future__ import annotations

import multiprocessing
import time

import numpy as np

from hdrlog.server import rollup, writer
from hdrlog.server.convert import convert_batch
from hdrlog.server.store import JOURNAL_SUMMARY, Store
from hdrlog.server.writer import _Entry, _journal, _token, concat
from tests.support import ServerProcess, ServerThread, batch, config
from tests.test_rollups import assert_rollups_equal_raw

DAY = 86400
COLLECTOR = "prune"


def _age(client, tokens: list[str], seconds: int) -> None:
    """Make the journal rows of ``tokens`` look ``seconds`` older (as journaled that long ago)."""
    client.command("ALTER TABLE hdrlog.rollup_log UPDATE at = at - toIntervalSecond({s:UInt32}) "
                   "WHERE token IN {t:Array(String)}", parameters={"s": seconds, "t": tokens},
                   settings={"mutations_sync": 2})


def _journal_state(store_path) -> dict:
    """A store whose journal has, for collector "prune" (one flush per batch, journaled before its packets):
    seqs 1, 2 rolled up and ended 30 days ago; seq 3 rolled up and ended now; seq 4 stored 30 days ago with
    its intent and no end (killed before its rollup); seq 5 stored and never journaled (killed before its
    intent); seq 6 ended 30 days ago and journaled again now (a copy racing on another server, killed
    before its end); an old group row of ended members, and one with an open member. Then one prune."""
    store = Store(f"chdb://{store_path}")
    store.open()
    store.migrate()
    client = store._client  # noqa: SLF001
    out: dict = {}
    try:
        tokens = {}
        for seq in range(1, 7):
            b = batch(seq, 200, collector_id=COLLECTOR)
            t = convert_batch(b, b.host)[0]
            e = _Entry(b.collector_id, b.seq, [t], {"packets": np.unique(t.days)}, t.rows, 0.0)
            token = tokens[seq] = _token("packets", [(e, t)])
            if seq != 5:
                store.log_rollup(token, 0, _journal([(e, t)]))
            store.insert("packets", concat([t.data]), token)
            if seq in (1, 2, 3, 6):
                store.insert_rollup(rollup.rollup_rows(t.data)[0], f"{token}-rollup")
                store.end_rollups([token])
        store.log_rollup("hdrlog-g-old", 2, [], members=[tokens[1], tokens[2]])
        store.log_rollup("hdrlog-g-open", 2, [], members=[tokens[4]])
        # a summary of an earlier prune, of a day whose packets are gone (their TTL)
        client.command(f"INSERT INTO hdrlog.rollup_log (token, state, collector_ids, seqs, days) VALUES "
                       f"('hdrlog-s-gone', {JOURNAL_SUMMARY}, ['{COLLECTOR}'], [99], [1000])")
        _age(client, [tokens[s] for s in (1, 2, 4, 6)] + ["hdrlog-g-old", "hdrlog-g-open"], 30 * DAY)
        b6 = batch(6, 200, collector_id=COLLECTOR)
        t6 = convert_batch(b6, b6.host)[0]
        e6 = _Entry(COLLECTOR, 6, [t6], {"packets": np.unique(t6.days)}, t6.rows, 0.0)
        store.log_rollup(tokens[6], 0, _journal([(e6, t6)]))  # the racing copy's intent, journaled now
        rows = lambda: client.query(  # noqa: E731
            "SELECT token, state, count() FROM hdrlog.rollup_log GROUP BY ALL ORDER BY ALL").result_rows
        out["before"] = rows()
        # The sweep's window: the old open intent (seq 4) is not in it, seq 6's new intent is closed by its old end.
        out["recent_open"] = [t for t, _b, _a in store.unfinished_rollups(since=3600)]
        out["all_open"] = [t for t, _b, _a in store.unfinished_rollups()]
        out["summaries"] = store.prune_rollup_log(writer.ROLLUP_LOG_KEEP, wait=True)
        out["after"] = rows()
        out["summary_seqs"] = client.query(
            f"SELECT arraySort(groupArrayArray(seqs)) FROM hdrlog.rollup_log WHERE state = {JOURNAL_SUMMARY}"
        ).result_rows[0][0]
        out["unjournaled"] = store.unjournaled_packets()
        out["open_after"] = [t for t, _b, _a in store.unfinished_rollups()]
        out["again"] = store.prune_rollup_log(writer.ROLLUP_LOG_KEEP, wait=True)  # nothing more to prune
        out["after_again"] = rows()
        out["tokens"] = tokens
        return out
    finally:
        store.close()


def test_the_prune_keeps_what_recovery_needs_and_a_start_rolls_up_each_batch_once(tmp_path):
    path = tmp_path / "store"
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # one process opens one chDB path
        got = pool.apply(_journal_state, (path,))
    tok = got["tokens"]
    before = {(t, s) for t, s, _n in got["before"]}
    assert {(tok[1], 0), (tok[1], 1), (tok[2], 0), (tok[4], 0), ("hdrlog-g-old", 2),
            ("hdrlog-s-gone", JOURNAL_SUMMARY)} <= before
    # the sweep's window sees no open intent; the full read sees the old one
    assert got["recent_open"] == [] and got["all_open"] == [tok[4]]
    after = {(t, s) for t, s, _n in got["after"]}
    # dropped: the ended entries older than a week (1, 2), their old group row (summarized by collector and
    # day), and the summary of a day packets no longer holds
    assert not {(tok[1], 0), (tok[1], 1), (tok[2], 0), (tok[2], 1), ("hdrlog-g-old", 2),
                ("hdrlog-s-gone", JOURNAL_SUMMARY)} & after
    assert got["summaries"] == 1 and list(got["summary_seqs"]) == [1, 2]
    # kept: the recent entry (3), the old open intent (4) and its group, the old end of a recent intent (6)
    assert {(tok[3], 0), (tok[3], 1), (tok[4], 0), ("hdrlog-g-open", 2), (tok[6], 0), (tok[6], 1)} <= after
    assert sum(n for t, s, n in got["after"] if t == tok[6]) == 3
    assert got["open_after"] == [tok[4]]
    # the summarized batches are not taken for unjournaled ones; the never journaled one is
    assert [s for _c, s, _d in got["unjournaled"]] == [5]
    assert got["again"] == 0 and got["after_again"] == got["after"]

    srv = ServerProcess(f"chdb://{path}", tmp_path)
    srv.start()
    try:
        q = lambda text: [tuple(r.values()) for r in srv.sql(text)]  # noqa: E731
        assert_rollups_equal_raw(q)  # 4 (open intent) and 5 (unjournaled) rolled up once, 1, 2 not again
        open_left = q("SELECT count() AS n FROM (SELECT token FROM hdrlog.rollup_log WHERE state IN (0, 1) "
                      "GROUP BY token HAVING countIf(state = 1) = 0)")
        assert [tuple(map(int, r)) for r in open_left] == [(0,)]
        srv.stop()
        srv.start()  # nothing is left to roll up again
        assert_rollups_equal_raw(q)
    finally:
        assert srv.stop() == 0, srv.log()[-2000:]


def _old_ended_entry(store_path) -> str:
    store = Store(f"chdb://{store_path}")
    store.open()
    store.migrate()
    try:
        b = batch(1, 200, collector_id=COLLECTOR)
        t = convert_batch(b, b.host)[0]
        e = _Entry(b.collector_id, b.seq, [t], {"packets": np.unique(t.days)}, t.rows, 0.0)
        token = _token("packets", [(e, t)])
        store.log_rollup(token, 0, _journal([(e, t)]))
        store.insert("packets", concat([t.data]), token)
        store.insert_rollup(rollup.rollup_rows(t.data)[0], f"{token}-rollup")
        store.end_rollups([token])
        _age(store._client, [token], 30 * DAY)  # noqa: SLF001
        return token
    finally:
        store.close()


def test_a_running_server_prunes_the_journal_soon_after_start(tmp_path, monkeypatch):
    path = tmp_path / "store"
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        token = pool.apply(_old_ended_entry, (path,))
    monkeypatch.setattr(writer, "ROLLUP_PRUNE_FIRST", 0)
    srv = ServerThread(config(path)).start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            intent = srv.query(f"SELECT count() FROM hdrlog.rollup_log WHERE token = '{token}' AND state = 0")
            summary = srv.query(f"SELECT seqs FROM hdrlog.rollup_log WHERE state = {JOURNAL_SUMMARY}")
            if intent == [(0,)] and summary:
                break
            time.sleep(0.2)
        # The server's prune does not wait for its mutations: the end, left without its intent once the first
        # one ran, goes at the next prune (or now, if the first was done when the second was decided).
        assert intent == [(0,)] and summary == [([1],)]
        assert srv.query("SELECT count() FROM hdrlog.rollup_log WHERE state IN (0, 1) "
                         "GROUP BY token HAVING countIf(state = 1) = 0") == []
        assert srv.server.store.unjournaled_packets() == []  # the summary names the batch: not rolled up again
    finally:
        assert srv.stop() == []
