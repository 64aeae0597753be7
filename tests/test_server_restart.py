"""Exactly-once across a server SIGKILL: the real `hdrlog server run` is killed while batches are in
flight, restarted on the same store, and every batch arrives exactly once."""

from __future__ import annotations

import numpy as np

from hdrlog.server.writer import Outcome  # noqa: F401 - import check of the package under test
from tests.support import NS_DAY, MiniCollector, ServerProcess, batch, packets_table


def test_sigkill_while_batches_are_in_flight_then_restart_stores_everything_once(tmp_path):
    store = tmp_path / "store"
    n_batches, rows = 60, 2000
    batches = [batch(s, rows, collector_id="kill-test") for s in range(1, n_batches + 1)]
    # one batch spans midnight UTC: its rows go to two partitions
    span = packets_table(rows, 7)
    ts_col = next(c for c in span.columns if c.name == "ts")
    ts = np.frombuffer(ts_col.values, dtype="<i8").copy()
    ts[: rows // 2] = (ts[0] // NS_DAY + 1) * NS_DAY - 1000
    ts[rows // 2:] = (ts[0] // NS_DAY + 1) * NS_DAY + 1000
    ts_col.values = ts.tobytes()
    batches[40] = batch(41, tables=[span], collector_id="kill-test")

    proc = ServerProcess(f"chdb://{store}", tmp_path, "--flush-rows", "5000", "--flush-interval", "0.05")
    collector = MiniCollector(batches)
    try:
        proc.start()
        acked_before = collector.kill_mid_stream(proc, 15)
        assert 0 < acked_before < n_batches, "the kill did not land mid-stream"

        proc.start()  # same store
        # the collector resends what was unacked; on top, resend a few that were acked (harmless)
        collector.resend(batches[:5])
        assert collector.run_once(proc.address)
        got = proc.sql("SELECT batch_seq, count() AS n FROM hdrlog.packets GROUP BY batch_seq ORDER BY batch_seq")
        assert [(r["batch_seq"], int(r["n"])) for r in got] == [(s, rows) for s in range(1, n_batches + 1)]
        days = proc.sql("SELECT uniqExact(toDate(ts)) AS d FROM hdrlog.packets WHERE batch_seq = 41")
        assert int(days[0]["d"]) == 2
        dup_acks = [a for a in collector.acks if a.duplicate]
        assert len(dup_acks) >= 5
    finally:
        assert proc.stop() == 0, proc.log()[-2000:]


def test_a_clean_stop_logs_one_stopped_line(tmp_path):
    proc = ServerProcess(f"chdb://{tmp_path}/store", tmp_path)
    try:
        proc.start()
        assert proc.http("/ping") == "Ok.\n"
    finally:
        assert proc.stop() == 0
    log = proc.log()
    assert log.count("server: stopped;") == 1 and "Traceback" not in log


def test_the_server_tells_systemd_it_is_ready_once_it_answers(tmp_path):
    """Type=notify: READY=1 comes after the schema is applied and every port listens, STOPPING=1 at a stop."""
    from hdrlog.dev.processes import Process, wait_until
    from hdrlog.dev.servicemanager import FdStoreManager

    manager = FdStoreManager(tmp_path)
    proc = ServerProcess(f"chdb://{tmp_path}/store", tmp_path, manager=manager)
    try:
        Process.start(proc)  # no polling of our own: systemd's word is all we wait for
        wait_until(lambda: manager.ready_count() == 1 or not proc.alive(), 60, "READY=1")
        assert proc.alive(), proc.log()[-2000:]
        assert proc.http("/ping") == "Ok.\n"                 # the SQL endpoint answers at once
        assert proc.sql("SELECT count() AS n FROM hdrlog.packets") == [{"n": 0}]  # the schema is there
    finally:
        assert proc.stop() == 0
        manager.close()
    assert any("STOPPING=1" in m for m in manager.messages), manager.messages
