"""The collector's durable spool: survives reopen, never reuses a seq, drops oldest when full."""

from __future__ import annotations

from hdrlog.collector.spool import Spool
from hdrlog.proto import ingest_pb2


def batch(seq: int, size: int = 100) -> ingest_pb2.Batch:
    return ingest_pb2.Batch(collector_id="x", seq=seq, tables=[ingest_pb2.Table(
        name="packets", rows=1, columns=[ingest_pb2.Column(name="ts", values=b"\x01" * size)])])


def test_reopen_keeps_batches_id_and_seq(tmp_path):
    s = Spool(tmp_path, max_bytes=1 << 20, host_id="h1")
    assert s.open() == []
    seqs = [s.next_seq() for _ in range(3)]
    for seq in seqs:
        s.write(batch(seq), rows=5)
    s.remove(seqs[0])
    s.close()
    again = Spool(tmp_path, max_bytes=1 << 20, host_id="h1")
    found = again.open()
    assert again.collector_id == s.collector_id and again.collector_id.startswith("h1/")
    assert [(b.seq, b.rows) for b in found] == [(seqs[1], 5), (seqs[2], 5)]
    assert again.load(seqs[2]).seq == seqs[2]
    assert again.next_seq() > seqs[-1]


def test_seq_never_reused_even_without_files(tmp_path):
    s = Spool(tmp_path, max_bytes=1 << 20, host_id="h")
    s.open()
    used = [s.next_seq() for _ in range(1500)]  # crosses a reserved block
    s.close()
    again = Spool(tmp_path, max_bytes=1 << 20, host_id="h")
    again.open()
    assert again.next_seq() > max(used)


def test_corrupt_and_partial_files_are_dropped_and_counted(tmp_path):
    s = Spool(tmp_path, max_bytes=1 << 20, host_id="h")
    s.open()
    for seq in (1, 2):
        s.write(batch(seq), rows=1)
    path = s._path(2)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    (s.batches_dir / "00000000000000000003.tmp").write_bytes(b"half")
    s.close()
    again = Spool(tmp_path, max_bytes=1 << 20, host_id="h")
    assert [b.seq for b in again.open()] == [1]
    assert again.corrupt_files == 1 and not list(again.batches_dir.glob("*.tmp"))


def test_full_spool_drops_oldest_and_counts_rows(tmp_path):
    s = Spool(tmp_path, max_bytes=1000, host_id="h")
    s.open()
    dropped = []
    for seq in range(1, 11):
        dropped += s.write(batch(seq, size=200), rows=seq)
    assert s.bytes <= 1000
    kept = list(s.items)
    assert kept == list(range(11 - len(kept), 11))  # the newest survive
    assert s.dropped_rows == sum(b.rows for b in dropped) == sum(range(1, 11 - len(kept)))


def test_one_collector_per_spool_and_host_bound(tmp_path):
    import pytest
    from hdrlog.collector.spool import SpoolError

    s = Spool(tmp_path, max_bytes=1 << 20, host_id="h1")
    s.open()
    with pytest.raises(SpoolError, match="in use by another collector"):
        Spool(tmp_path, max_bytes=1 << 20, host_id="h1").open()
    s.write(batch(s.next_seq()), rows=1)
    s.close()
    with pytest.raises(SpoolError, match="unsent batches of host 'h1'"):
        Spool(tmp_path, max_bytes=1 << 20, host_id="h2").open()
    s = Spool(tmp_path, max_bytes=1 << 20, host_id="h1")
    s.open()
    for seq in list(s.items):
        s.remove(seq)
    s.close()
    other = Spool(tmp_path, max_bytes=1 << 20, host_id="h2")
    other.open()  # nothing left to send: the spool changes hands, with a new identity
    assert other.collector_id.startswith("h2/")
    other.close()


def test_tally_counts_what_a_killed_run_had_not_spooled(tmp_path):
    """The tally survives the process (a shared file mapping); the next open reports the gap once."""
    import subprocess
    import sys
    code = f"""
import os, signal
from hdrlog.collector.spool import Spool
from tests.test_spool import batch
s = Spool({str(tmp_path)!r}, max_bytes=1 << 20, host_id="h")
s.open()
s.count_read(700)
s.write(batch(s.next_seq()), rows=500)
s.count_read(42)
os.kill(os.getpid(), signal.SIGKILL)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == -9, p.stderr
    again = Spool(tmp_path, max_bytes=1 << 20, host_id="h")
    assert [b.rows for b in again.open()] == [500]
    assert again.lost_at_crash == 742 - 500
    again.close()
    third = Spool(tmp_path, max_bytes=1 << 20, host_id="h")
    third.open()
    assert third.lost_at_crash == 0  # reported once
    third.close()
