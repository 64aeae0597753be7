"""The spool under faults: a full disk, a read-only or failing filesystem, altered and
truncated batch files. The spool never takes the collector down: it degrades to memory
(counted drops, a rate-limited warning), keeps trying, and goes back to spooling when
the disk does; a bad file is skipped, counted (drop_spool_corrupt) and the rest goes on.

Real filesystems, mounted by the test in tmp_path (root): a small tmpfs for ENOSPC and
`mount -o remount,ro`, a loop-mounted ext4 (errors=remount-ro) whose error the kernel
turns into a read-only filesystem mid-run. Every mount is undone, also on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from hdrlog.collector.spool import Outbox
from hdrlog.collector.spool import HEADER, Spool
from hdrlog.proto import columns, ingest_pb2
from tests.support import ServerProcess, free_port, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts filesystems (root)")


# -- filesystems --------------------------------------------------------------------------
def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)  # something still holds it


@contextlib.contextmanager
def mounted_tmpfs(mnt: Path, size: str):
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        _umount(mnt)


@pytest.fixture
def tmpfs(tmp_path):
    """A 512 KiB tmpfs at tmp_path/mnt."""
    with mounted_tmpfs(tmp_path / "mnt", "512k") as mnt:
        yield mnt


@pytest.fixture
def ext4(tmp_path):
    """A 16 MiB ext4 without journal on a loop device, errors=remount-ro; yields (mountpoint, device name)."""
    img, mnt = tmp_path / "fs.img", tmp_path / "ext4"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", str(img)], check=True)
    subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(img), str(mnt)], check=True)
    try:
        dev = os.path.basename(subprocess.run(["findmnt", "-no", "SOURCE", str(mnt)], capture_output=True,
                                              text=True, check=True).stdout.strip())
        yield mnt, dev
    finally:
        _umount(mnt)


def remount(mnt: Path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", "-o", f"remount,{mode}", str(mnt)], capture_output=True, text=True)


def fill(mnt: Path) -> Path:
    """Take every free byte of the filesystem; returns the filler file."""
    filler = mnt / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


# -- batches --------------------------------------------------------------------------------
def packets(n: int, start: int = 0) -> dict:
    cols = columns.empty_columns("packets", n)
    cols["ts"] = np.arange(start, start + n, dtype="<i8")
    cols["dst_port"] = (np.arange(start, start + n) % 65536).astype("<u2")
    return cols


def body(seq: int, rows: int = 50, start: int = 0) -> ingest_pb2.Batch:
    return ingest_pb2.Batch(collector_id="c", host="h", seq=seq,
                            tables=[columns.encode_table("packets", packets(rows, start), rows)])


def put_many(box: Outbox, spool: Spool, n: int, rows: int = 50) -> list[int]:
    seqs = []
    for _ in range(n):
        seq = spool.next_seq()
        box.put(body(seq, rows, seq * rows), rows)
        seqs.append(seq)
    return seqs


def on_disk(spool: Spool) -> set[int]:
    return {int(p.stem) for p in spool.batches_dir.glob("*.batch")}


def held(box: Outbox) -> int:
    return box.rows


# -- a full disk -------------------------------------------------------------------------------
def test_disk_full_degrades_to_memory_counts_drops_and_recovers(tmpfs, caplog):
    async def go():
        spool = Spool(tmpfs / "spool", max_bytes=1 << 30, host_id="h")  # the disk, not the limit, is what fills
        spool.open()
        box = Outbox(max_rows=500, spool=spool)  # max_unacked_rows: what memory holds while the disk cannot
        first = put_many(box, spool, 4)
        assert on_disk(spool) == set(first)
        filler = fill(tmpfs)
        with caplog.at_level(logging.WARNING, logger="hdrlog.collector"):
            more = put_many(box, spool, 20)  # 1,000 records: 500 fit in memory, the oldest 500 are dropped
        assert spool.degraded
        assert on_disk(spool) == set(first) and not list(spool.batches_dir.glob("*.tmp"))
        assert box.memory_dropped_rows == 500
        assert box.seqs_after(0) == first + more[10:]  # the oldest of memory went, the spooled stay
        warnings = [r for r in caplog.records if "memory" in r.getMessage() and r.levelno >= logging.WARNING]
        assert 1 <= len(warnings) < 20  # loud, not once per batch
        # every record is accounted for: held (disk or memory) or dropped with a reason
        assert 24 * 50 == box.rows + box.memory_dropped_rows
        # acks free memory and disk; nothing raises
        for seq in first[:2] + more[10:12]:
            assert box.pop(seq) == 50
        filler.unlink()  # the disk is back
        with caplog.at_level(logging.INFO, logger="hdrlog.collector"):
            last = put_many(box, spool, 1)
        assert not spool.degraded
        assert any("spooling again" in r.getMessage() for r in caplog.records)
        # the batches memory held are on disk now, with the new one
        assert on_disk(spool) == set(first[2:] + more[12:] + last)
        assert [s for s, _, _ in box.after(0)] == first[2:] + more[12:] + last
        spool.close()
        again = Spool(tmpfs / "spool", max_bytes=1 << 30, host_id="h")
        assert [b.seq for b in again.open()] == first[2:] + more[12:] + last
        assert again.next_seq() > last[-1]
        again.close()
    asyncio.run(go())


def test_disk_full_at_a_seq_reservation_and_at_the_tally_does_not_crash(tmpfs):
    """state.json is rewritten every SEQ_BLOCK seqs and the tally is a mapped file: neither may
    raise (or SIGBUS) on a full disk."""
    from hdrlog.collector import spool as spool_mod

    s = Spool(tmpfs / "spool", max_bytes=1 << 30, host_id="h")
    s.open()
    old_id = s.collector_id
    filler = fill(tmpfs)
    used = []
    for _ in range(spool_mod.SEQ_BLOCK + 5):  # crosses a reservation the disk refuses
        seq = s.next_seq()
        used.append((s.collector_id, seq))
    assert len(set(used)) == len(used)
    # past the block on disk, the seqs go out under a fresh identity (a later run restarts that block)
    assert [seq for cid, seq in used if cid == old_id] == list(range(1, spool_mod.SEQ_BLOCK + 1))
    assert len({cid for cid, _ in used}) == 2
    s.count_read(10)  # a store into the mapped tally page
    box = Outbox(max_rows=10_000, spool=s)
    box.put(body(s.next_seq()), 50)
    assert s.degraded and len(box) == 1
    filler.unlink()
    box.put(body(s.next_seq()), 50)  # the disk is back: state.json takes the fresh identity
    assert not s.degraded
    new_id, last = s.collector_id, s._next_seq - 1
    s.close()
    again = Spool(tmpfs / "spool", max_bytes=1 << 30, host_id="h")
    again.open()
    assert again.collector_id == new_id and again.next_seq() > last
    again.close()


# -- a read-only filesystem ------------------------------------------------------------------------
def test_remount_ro_is_refused_while_a_spool_is_open(tmpfs):
    """What `mount -o remount,ro` does under a running collector: the kernel refuses (the tally is a
    writable shared mapping), so the spool cannot turn read-only under the collector that way."""
    s = Spool(tmpfs / "spool", max_bytes=1 << 30, host_id="h")
    s.open()
    try:
        assert remount(tmpfs, "ro").returncode != 0
    finally:
        s.close()
    assert remount(tmpfs, "ro").returncode == 0
    assert remount(tmpfs, "rw").returncode == 0


def test_read_only_spool_at_start_runs_from_memory_then_spools_when_rw_again(tmpfs):
    async def go():
        s = Spool(tmpfs / "spool", max_bytes=1 << 30, host_id="h")
        s.open()
        box = Outbox(max_rows=10_000, spool=s)
        left = put_many(box, s, 3)
        ident = s.collector_id
        s.close()
        assert remount(tmpfs, "ro").returncode == 0
        try:
            again = Spool(tmpfs / "spool", max_bytes=1 << 30, host_id="h")
            found = again.open()  # a restart on a read-only spool starts (it used to raise)
            assert [b.seq for b in found] == left and again.degraded
            box = Outbox(max_rows=10_000, spool=again)
            box.restore(found)
            new = put_many(box, again, 2)
            assert min(new) > max(left)
            # seqs it cannot reserve on disk go out under a fresh identity, never an old (id, seq)
            assert again.collector_id != ident and again.collector_id.startswith("h/")
            assert [s for s, _, _ in box.after(0)] == left + new  # leftovers read back, new ones from memory
            assert box.pop(left[0]) == 50  # the file cannot be removed: no crash
        finally:
            assert remount(tmpfs, "rw").returncode == 0
        newer = put_many(box, again, 1)
        assert not again.degraded
        assert set(new + newer) <= on_disk(again)
        again.close()
    asyncio.run(go())


def test_filesystem_error_turns_spool_read_only_mid_run(ext4):
    """The kernel remounts ext4 read-only on an error (errors=remount-ro), with the spool's files
    open: the writes fail with EROFS from then on; the collector goes on from memory."""
    mnt, dev = ext4

    async def go():
        s = Spool(mnt / "spool", max_bytes=1 << 30, host_id="h")
        s.open()
        box = Outbox(max_rows=200, spool=s)
        first = put_many(box, s, 3)
        with open(f"/sys/fs/ext4/{dev}/trigger_fs_error", "w") as f:
            f.write("hdrlog test: simulated disk error\n")
        more = put_many(box, s, 6)  # 300 records, 200 fit in memory
        assert s.degraded
        assert box.memory_dropped_rows == 100 and box.seqs_after(0) == first + more[2:]
        assert [seq for seq, _, _ in box.after(0)] == first + more[2:]
        for seq in first + more[2:]:
            assert box.pop(seq) == 50  # acks: removal fails (EROFS), nothing raises
        assert box.rows == 0
        s.close()
    asyncio.run(go())


# -- altered and truncated files ------------------------------------------------------------------
def _spooled(tmp_path, n=4):
    s = Spool(tmp_path / "spool", max_bytes=1 << 30, host_id="h")
    s.open()
    box = Outbox(max_rows=10_000, spool=s)
    seqs = put_many(box, s, n)
    for seq in seqs:  # sent once: the bodies leave memory, a resend reads the file
        box.get(seq)
    return s, box, seqs


def alter(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit of a value
    path.write_bytes(bytes(data))


def test_altered_file_is_skipped_and_counted_on_resend(tmp_path):
    async def go():
        s, box, seqs = _spooled(tmp_path, n=5)
        alter(s._path(seqs[1]))
        s._path(seqs[2]).write_bytes(s._path(seqs[2]).read_bytes()[:HEADER.size + 7])  # unparseable
        s._path(seqs[4]).write_bytes(s._path(seqs[0]).read_bytes())  # a whole, valid file of another seq
        sent = [seq for seq, _, _ in box.after(0)]
        assert sent == [seqs[0], seqs[3]]
        assert s.corrupt_rows == 150 and s.corrupt_files == 3
        assert not s._path(seqs[1]).exists() and not s._path(seqs[2]).exists()
        assert box.rows == 100 and len(box) == 2
        s.close()
    asyncio.run(go())


def test_corrupt_files_at_restart_are_counted_by_records(tmp_path):
    s, box, seqs = _spooled(tmp_path)
    alter(s._path(seqs[0]))
    s._path(seqs[1]).write_bytes(b"HLB1")  # not even a header: records unknown, the file is counted
    s.close()
    again = Spool(tmp_path / "spool", max_bytes=1 << 30, host_id="h")
    assert [b.seq for b in again.open()] == seqs[2:]
    assert again.corrupt_files == 2 and again.corrupt_rows == 50
    again.close()


def test_collector_counts_and_exports_spool_drops(tmp_path):
    """The named reasons reach collector_stats (counters()) and /metrics alike."""
    from hdrlog.collector.app import Collector
    from hdrlog.collector.config import CollectorConfig

    c = Collector(CollectorConfig(server="127.0.0.1:1", iface=["lo"], host_id="h", spool=str(tmp_path / "spool")))
    c.start_pipeline(credentials=None, start_sender=False)
    try:
        seqs = put_many(c.outbox, c.spool, 3)
        for seq in seqs:
            c.outbox.get(seq)
        alter(c.spool._path(seqs[0]))
        c.outbox.after(0)
        counters = c.counters()
        assert counters["drop_spool_corrupt"] == 50 and counters["spool_corrupt_files"] == 1
        assert "drop_unacked_full" in counters
        from prometheus_client import generate_latest
        text = generate_latest(c.metrics.registry).decode()
        assert 'hdrlog_collector_dropped_records_total{reason="spool_corrupt"} 50.0' in text
        assert "spool=ok" in c.status_line()
        # a lost file that carried collector_stats deltas: they are reported again, not lost with it
        c._add_stats()
        c.batcher.flush()
        stats_seq = max(c.outbox.seqs_after(0))
        assert c._stats_sent["drop_spool_corrupt"] == 50 and stats_seq in c._stats_by_seq
        c.outbox.get(stats_seq)
        alter(c.spool._path(stats_seq))
        c.outbox.after(0)
        assert stats_seq not in c.outbox
        c._on_packets(packets(10))
        c.batcher.flush()
        assert c._stats_sent["drop_spool_corrupt"] == 0  # the next row carries the 50 again
    finally:
        c.spool.close()


# -- with a real server ----------------------------------------------------------------------------
class Pipeline:
    """The collector's own send path (Collector.start_pipeline: spool, outbox, batcher, sender) without
    capture: the test hands it synthetic packet columns as the capture thread would."""

    def __init__(self, server: str, spool: Path, host: str, **config):
        from hdrlog.collector.app import Collector
        from hdrlog.collector.config import CollectorConfig
        self.c = Collector(CollectorConfig(server=server, iface=["lo"], host_id=host, spool=str(spool),
                                           batch_interval=60, **config))
        self.sent = 0

    async def __aenter__(self):
        self.c.start_pipeline(credentials=None)
        return self

    async def __aexit__(self, *exc):
        await self.c.sender.stop()
        self.c.spool.close()

    def send(self, n: int, per_batch: int = 100) -> None:
        for k in range(0, n, per_batch):
            chunk = packets(per_batch, self.sent)
            self.c.spool.count_read(per_batch)
            self.c._on_packets(chunk)
            self.c.batcher.flush()
            self.sent += per_batch

    def lost(self) -> dict[str, int]:
        return {k: v for k, v in self.c.counters().items() if k.startswith("drop_") and v}


def test_spool_fills_mid_run_with_a_real_server_and_the_numbers_add_up(tmp_path):
    """Server away, the spool's disk fills mid-run, the server comes back, the disk frees:
    stored + counted lost == sent, exactly, and no duplicate."""
    port = free_port()
    tmpfs = tmp_path / "mnt"

    async def go(server_box):
        async with Pipeline(f"127.0.0.1:{port}", tmpfs / "spool", "fullhost", max_unacked_rows=3000) as p:
            p.send(2000)  # spooled
            filler = fill(tmpfs)
            p.send(6000)  # the disk is full: memory holds 3,000, the oldest 3,000 of memory go
            assert p.c.spool.degraded and p.c.outbox.memory_dropped_rows == 3000
            assert "spool=memory-only" in p.c.status_line()
            from prometheus_client import generate_latest
            metrics = generate_latest(p.c.metrics.registry).decode()
            assert "hdrlog_collector_spool_degraded 1.0" in metrics
            assert 'hdrlog_collector_dropped_records_total{reason="unacked_full"} 3000.0' in metrics
            server = ServerProcess(f"chdb://{tmp_path}/store", tmp_path, grpc_port=port)
            server_box.append(server)
            await asyncio.get_running_loop().run_in_executor(None, server.start)
            assert await p.c.sender.wait_drained(120), p.c.status_line()
            filler.unlink()
            p.send(2000)  # back to the disk
            assert not p.c.spool.degraded
            p.c._add_stats()
            p.c.batcher.flush()
            assert await p.c.sender.wait_drained(120), p.c.status_line()
            return p.sent, p.lost(), p.c.status_line()

    servers: list[ServerProcess] = []
    try:
        with mounted_tmpfs(tmpfs, "1m"):
            sent, lost, status = asyncio.run(go(servers))
        server = servers[0]
        stored = server.count("host = 'fullhost'")
        distinct = int(server.sql("SELECT uniqExact(ts) FROM hdrlog.packets WHERE host = 'fullhost'",
                                  "TabSeparated").strip())
        reported = {r["counter"]: int(r["v"]) for r in server.sql(
            "SELECT counter, sum(value) AS v FROM hdrlog.collector_stats WHERE host = 'fullhost' "
            "AND counter LIKE 'drop_%' GROUP BY counter")}
        print(f"FAULT spool disk full: sent {sent}, stored {stored}, counted {lost}, status {status}")
        assert distinct == stored
        assert stored + sum(lost.values()) == sent, (stored, lost)
        assert lost == {"drop_unacked_full": 3000}
        assert {k: v for k, v in reported.items() if v} == lost
        assert "server=up" in status
    finally:
        for server in servers:
            server.stop()


def test_corrupt_spooled_files_do_not_stall_sending_to_a_real_server(tmp_path):
    """Left by an earlier run: one altered (checksum), one truncated (unparseable). The rest is sent and
    stored, the two counted; the stream stays up."""
    spool_dir = tmp_path / "spool"
    s = Spool(spool_dir, max_bytes=1 << 30, host_id="corrupthost")
    s.open()
    seqs = [s.next_seq() for _ in range(5)]
    for seq in seqs:
        s.write(ingest_pb2.Batch(collector_id=s.collector_id, host="corrupthost", seq=seq,
                                 tables=[columns.encode_table("packets", packets(100, seq * 100), 100)]), 100)
    s.close()
    server = ServerProcess(f"chdb://{tmp_path}/store", tmp_path)
    server.start()
    try:
        async def go():
            async with Pipeline(server.address, spool_dir, "corrupthost") as p:
                # altered while running (after open), truncated likewise
                alter(p.c.spool._path(seqs[1]))
                path = p.c.spool._path(seqs[3])
                path.write_bytes(path.read_bytes()[:40])
                assert await p.c.sender.wait_drained(60), p.c.status_line()
                p.send(100)
                p.c._add_stats()
                p.c.batcher.flush()
                assert await p.c.sender.wait_drained(60), p.c.status_line()
                return p.lost(), p.c.status_line()
        lost, status = asyncio.run(go())
        stored = server.count("host = 'corrupthost'")
        print(f"FAULT corrupt spool files: sent 600, stored {stored}, counted {lost}, status {status}")
        assert lost == {"drop_spool_corrupt": 200}
        assert stored == 400 and stored + 200 == 600
        assert "server=up" in status
        wait_until(lambda: server.sql("SELECT sum(value) AS v FROM hdrlog.collector_stats WHERE host = "
                                      "'corrupthost' AND counter = 'drop_spool_corrupt'")[0]["v"] == 200,
                   30, "drop_spool_corrupt in collector_stats")
    finally:
        server.stop()


def test_collector_process_with_its_spool_disk_full_keeps_running_and_counts_every_loss(lab, tmp_path):
    """Issue 11's run, end to end: real eBPF capture on a lab veth, the `hdrlog collector` process with
    its spool on a 256 KiB tmpfs, the server away while 6,000 packets arrive (the disk fills, memory
    holds max_unacked_rows), then the server: the collector never dies and stored + counted == sent."""
    from tests.test_faults import counts, only, stat
    from tests.support import CollectorProcess, send_udp

    port, host_id, base, n = free_port(), "spooldisk", 43100, 6000
    host = lab.add_host("a")
    procs: list = []
    with mounted_tmpfs(tmp_path / f"spool-{host_id}", "256k"):
        try:
            collector = CollectorProcess(f"127.0.0.1:{port}", [host.peer_ifname], host_id, tmp_path,
                                         *only(base), "--spool-max-bytes", str(1 << 30),
                                         "--max-unacked-rows", "1500", "--batch-rows", "200",
                                         # uncompressed, as sized: zstd batches would not fill the 256 KiB disk
                                         "--batch-compression", "0")
            procs.append(collector)
            collector.start()
            assert send_udp(lab, host, base, n, rate=2000).wait(60) == 0
            wait_until(lambda: "captured=6000" in collector.log() or not collector.alive(), 30,
                       "every packet captured")
            assert collector.alive(), collector.log()[-3000:]
            server = ServerProcess(f"chdb://{tmp_path}/store", tmp_path, grpc_port=port)
            procs.append(server)
            server.start()
            wait_until(lambda: " unacked=0 server=up" in collector.log().splitlines()[-1]
                       or not collector.alive(), 90, "the collector to drain")
            assert collector.stop() == 0, collector.log()[-3000:]
            time.sleep(0)  # (the final collector_stats row was acked before the collector exited)
            stored, distinct = counts(server, f"host = '{host_id}'")
            reasons = {r["counter"]: int(r["v"]) for r in server.sql(
                "SELECT counter, sum(value) AS v FROM hdrlog.collector_stats WHERE host = "
                f"'{host_id}' AND counter LIKE 'drop_%' AND counter NOT IN ('drop_filtered', 'drop_sampled_out') "
                "GROUP BY counter HAVING v > 0")}
            log_text = collector.log()
            print(f"FAULT spool disk full (process): sent {n}, stored {stored}, counted {reasons}, "
                  f"uncounted {n - stored - sum(reasons.values())}")
            assert "Traceback" not in log_text
            assert distinct == stored
            assert stored + sum(reasons.values()) == n, (stored, reasons)
            assert reasons.get("drop_unacked_full", 0) > 0 and stat(server, host_id, "spool_write_errors") > 0
            assert "running from memory" in log_text and "spooling again" in log_text
        finally:
            for p in reversed(procs):
                p.stop()


def test_kill_while_degraded_counts_what_memory_held(tmpfs):
    """SIGKILL while the disk refuses: the batches memory held are counted by the next run
    (drop_lost_at_crash), those acked from memory are not."""
    import signal
    import sys
    code = f"""
import asyncio, os, signal
from hdrlog.collector.spool import Outbox
from hdrlog.collector.spool import Spool
from tests.test_spool_faults import body, fill
from pathlib import Path
async def go():
    s = Spool({str(tmpfs / "spool")!r}, max_bytes=1 << 30, host_id="h")
    s.open()
    box = Outbox(max_rows=10_000, spool=s)
    s.count_read(50); box.put(body(s.next_seq()), 50)        # on disk
    fill(Path({str(tmpfs)!r}))
    s.count_read(50); box.put(body(s.next_seq()), 50)        # memory, then lost
    s.count_read(50); seq = s.next_seq(); box.put(body(seq), 50)
    assert s.degraded and box.pop(seq) == 50                  # memory, acked
    s.count_read(7)                                           # the open batch
    os.kill(os.getpid(), signal.SIGKILL)
asyncio.run(go())
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    (tmpfs / "filler").unlink()
    again = Spool(tmpfs / "spool", max_bytes=1 << 30, host_id="h")
    assert [b.rows for b in again.open()] == [50]
    assert again.lost_at_crash == 50 + 7
    again.close()


def test_clean_stop_while_degraded_counts_what_memory_held_at_the_next_start(tmpfs):
    async def go():
        s = Spool(tmpfs / "spool", max_bytes=1 << 30, host_id="h")
        s.open()
        box = Outbox(max_rows=10_000, spool=s)
        filler = fill(tmpfs)
        s.count_read(100)
        put_many(box, s, 2)
        assert s.degraded and box.memory_rows == 100
        s.close()  # stopped before the server acked them
        filler.unlink()
        again = Spool(tmpfs / "spool", max_bytes=1 << 30, host_id="h")
        again.open()
        assert again.lost_at_crash == 100
        again.close()
    asyncio.run(go())
