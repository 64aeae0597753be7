"""Exactly-once at fleet size and under the faults of issue 11, against the real server process.

- 1,000 collectors streaming at once over real gRPC (one TCP connection each, from one grpc.aio
  process), plaintext with 1,000 host names and under mTLS with a few certificates: every batch of
  every collector is acked OK and stored exactly once (counts per collector in the store).
- The store's filesystem fills (a small tmpfs in the server's own mount namespace), the server is
  stopped with SIGTERM while full, restarted, space freed, the collector resends: every acked seq
  is stored, no row twice.
- ``--insecure``: a forged batch under another collector's id, with a huge seq, does not make the
  victim's later batches "duplicates".

Every server a test starts is stopped by the test (also on failure); a mount lives only in the
namespace of the process that made it, so it goes with that process.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from hdrlog import pki
from hdrlog.proto import ingest_pb2, ingest_pb2_grpc
from tests.support import HDRLOG, ServerProcess, wait_until
from tests.support import batch, packets_table

OK, REJECTED, RETRY = ingest_pb2.Ack.OK, ingest_pb2.Ack.REJECTED, ingest_pb2.Ack.RETRY
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]



# -- fleet size -------------------------------------------------------------------------------

async def _collector(target: str, creds, batches: list[ingest_pb2.Batch]) -> tuple[list[ingest_pb2.Ack], int]:
    """One collector: its own connection, one stream, every batch, half-close, all acks. Like the
    real collector, on a broken stream it reconnects and resends what is not acked OK (a few times).
    Returns the acks and the number of broken streams."""
    options = OWN_CONNECTION + [("grpc.max_receive_message_length", 64 << 20)]
    acks: list[ingest_pb2.Ack] = []
    unacked = {b.seq: b for b in batches}
    for broken in range(5):
        channel = (grpc.aio.secure_channel(target, creds, options=options) if creds is not None
                   else grpc.aio.insecure_channel(target, options=options))
        try:
            async with channel:
                call = ingest_pb2_grpc.IngestStub(channel).Stream(iter([unacked[s] for s in sorted(unacked)]),
                                                                  timeout=120)
                async for ack in call:
                    acks.append(ack)
                    if ack.status == OK:
                        unacked.pop(ack.seq, None)
        except grpc.aio.AioRpcError:
            if broken == 4:
                raise
            await asyncio.sleep(0.2 * 2 ** broken)
            continue
        return acks, broken
    raise AssertionError("unreachable")


async def _fleet(target: str, fleet: list[tuple[object, list[ingest_pb2.Batch]]]) -> list:
    return await asyncio.gather(*(_collector(target, creds, bs) for creds, bs in fleet), return_exceptions=True)


def _credentials(certs: Path, name: str):
    return grpc.ssl_channel_credentials(root_certificates=(certs / "ca.crt").read_bytes(),
                                        private_key=(certs / f"{name}.key").read_bytes(),
                                        certificate_chain=(certs / f"{name}.crt").read_bytes())


@pytest.mark.parametrize("security", ["insecure", "mtls"])
def test_1000_collectors_at_once_every_batch_acked_and_stored_once(tmp_path, procs, security):
    n_collectors, per_collector, rows = 1000, 3, 20
    tables = [packets_table(rows, seed) for seed in range(per_collector)]
    if security == "mtls":
        certs = tmp_path / "pki"
        pki.init_ca(certs)
        pki.issue(certs, "central", server=True, sans=["127.0.0.1"])
        hosts = [f"fleet-{k}" for k in range(4)]  # a few certificates, 250 collectors under each
        for h in hosts:
            pki.issue(certs, h)
        creds = {h: _credentials(certs, h) for h in hosts}
        ids = [(hosts[i % len(hosts)], f"{hosts[i % len(hosts)]}/{i}") for i in range(n_collectors)]
        extra = ["--max-streams-per-host", str(n_collectors)]
    else:
        certs, creds, extra = None, {}, []
        ids = [(f"fleet-{i}", f"fleet-{i}") for i in range(n_collectors)]  # insecure: identities are the ids
    server = ServerProcess(f"chdb://{tmp_path}/store", tmp_path, "--flush-interval", "0.2", "--flush-rows", "100000",
                           *extra, pki=certs)
    procs.append(server)
    server.start()
    fleet = [(creds.get(host), [batch(s, tables=[tables[s - 1]], host=host, collector_id=cid)
                                for s in range(1, per_collector + 1)]) for host, cid in ids]
    t0 = time.monotonic()
    results = asyncio.run(_fleet(server.address, fleet))
    elapsed = time.monotonic() - t0
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} streams failed, e.g. {errors[0]!r}"
    acks = [a for r, _ in results for a in r]
    broken = sum(b for _, b in results)
    bad = [a for a in acks if a.status != OK or (a.rows, a.duplicate) not in ((rows, False), (0, True))]
    assert not bad, (len(acks), len(bad), bad[:3])
    assert all({a.seq for a in r if a.status == OK} == set(range(1, per_collector + 1)) for r, _ in results)
    stored = {r["c"]: (int(r["n"]), int(r["s"])) for r in server.sql(
        "SELECT collector_id AS c, count() AS n, uniqExact(batch_seq) AS s FROM hdrlog.packets GROUP BY c")}
    assert stored == {cid: (per_collector * rows, per_collector) for _, cid in ids}
    if security == "insecure":
        assert int(server.sql("SELECT uniqExact(host) AS h FROM hdrlog.packets")[0]["h"]) == n_collectors
    log = server.log()
    failures = log.count("flush failed") + log.count("insert failed") + log.count("insert refused")
    assert failures == 0, log[-3000:]
    print(f"FLEET {security}: {n_collectors} collectors, {len(acks)} acks OK, {broken} broken streams resent, "
          f"{failures} flush failures, {elapsed:.1f} s")


# -- the store's disk fills ---------------------------------------------------------------------

class SmallDisk:
    """A tmpfs of ``size`` in a private mount namespace, held by a ``sleep`` that dies with us.

    Processes join it with ``nsenter`` (``prefix``); the test reaches its files through
    ``/proc/HOLDER/root``. Stopping the holder unmounts it (the namespace goes with its last process).
    """

    def __init__(self, mnt: Path, size: str):
        self.mnt = mnt
        mnt.mkdir(parents=True, exist_ok=True)
        self.holder = subprocess.Popen(
            ["setpriv", "--pdeathsig", "KILL", "unshare", "-m", "--propagation", "private", "sh", "-c",
             f'mount -t tmpfs -o size={size} hdrlog-test "{mnt}" && echo mounted && exec sleep infinity'],
            stdout=subprocess.PIPE, text=True)
        if self.holder.stdout.readline().strip() != "mounted":  # type: ignore[union-attr]
            self.stop()
            raise AssertionError("could not mount the test tmpfs")

    @property
    def prefix(self) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", "--"]

    def path(self, name: str) -> Path:
        return Path(f"/proc/{self.holder.pid}/root") / str(self.mnt).lstrip("/") / name

    def free(self) -> int:
        st = os.statvfs(self.path(""))
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int) -> None:
        """Fill the filesystem, then give back ``leave`` bytes."""
        with open(self.path("filler"), "ab") as fh:
            chunk = b"\xa5" * (1 << 20)
            try:
                while True:
                    fh.write(chunk)
                    fh.flush()
            except OSError:
                pass
        os.truncate(self.path("filler"), max(0, self.path("filler").stat().st_size - leave + self.free()))

    def empty(self) -> None:
        self.path("filler").unlink(missing_ok=True)

    def stop(self) -> None:
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.wait()
        if self.holder.stdout is not None:
            self.holder.stdout.close()


class StreamingCollector:
    """One long stream fed batch by batch (in seq order); every ack is recorded."""

    def __init__(self, target: str):
        import queue
        import threading
        self.todo: queue.Queue = queue.Queue()
        self.acks: list[ingest_pb2.Ack] = []
        self.error: BaseException | None = None

        def gen():
            while (b := self.todo.get()) is not None:
                yield b

        def run():
            try:
                with grpc.insecure_channel(target) as ch:
                    for ack in ingest_pb2_grpc.IngestStub(ch).Stream(gen(), timeout=300):
                        self.acks.append(ack)
            except grpc.RpcError as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, name="streaming-collector")
        self.thread.start()

    def send(self, batches) -> None:
        for b in batches:
            self.todo.put(b)

    def status(self, seq: int) -> list[int]:
        return [a.status for a in list(self.acks) if a.seq == seq]

    def close(self) -> None:
        self.todo.put(None)
        self.thread.join(60)


def _pending(log: str) -> int:
    words = [w for line in log.splitlines() if "pending=" in line for w in line.split() if w.startswith("pending=")]
    return int(words[-1].split("=")[1]) if words else 0


def test_disk_full_sigterm_restart_every_acked_seq_is_stored_once(tmp_path, procs):
    disk = SmallDisk(tmp_path / "mnt", "48m")
    try:
        _disk_full_sigterm_restart(tmp_path, procs, disk)
    finally:
        for p in reversed(procs):  # the servers live in the disk's namespace: stop them first
            p.stop()
        disk.stop()


def _disk_full_sigterm_restart(tmp_path, procs, disk: SmallDisk) -> None:
    big, small, cid = 10_000, 1_000, "full-test"
    batches = {s: batch(s, big, collector_id=cid) for s in range(1, 24)}   # random-ish rows: poor compression
    batches[24] = batch(24, small, collector_id=cid)
    rows = {s: b.tables[0].rows for s, b in batches.items()}
    acked: set[int] = set()

    def server():
        s = ServerProcess(f"chdb://{disk.mnt}/store", tmp_path, "--flush-interval", "0.3", "--flush-rows", "1000000",
                          command=[*disk.prefix, *HDRLOG])
        procs.append(s)
        s.start()
        return s

    first = server()
    c = StreamingCollector(first.address)
    c.send(batches[s] for s in range(1, 6))
    wait_until(lambda: all(c.status(s) == [OK] for s in range(1, 6)), 60, "seqs 1-5 acked")
    disk.fill(leave=2 << 20)  # room for a small insert, not for 18 x 10,000 rows
    c.send(batches[s] for s in range(6, 24))
    wait_until(lambda: all(RETRY in c.status(s) for s in range(6, 24)), 120, "RETRY for seqs 6-23 (disk full)")
    c.send([batches[24]])  # queued behind the flush that cannot be stored
    wait_until(lambda: _pending(first.log()) == 18 * big + small, 60, "seq 24 queued behind seqs 6-23")
    assert first.stop() == 0, first.log()[-3000:]  # SIGTERM while full
    c.close()
    acked |= {a.seq for a in c.acks if a.status == OK}
    before = sorted(acked)

    disk.empty()
    second = server()
    unacked = [batches[s] for s in sorted(set(batches) - acked)] + [batches[1], batches[2]]  # and two acked ones
    c = StreamingCollector(second.address)
    c.send(unacked)
    c.close()
    assert c.error is None, c.error
    assert sorted(a.seq for a in c.acks) == sorted(b.seq for b in unacked)
    assert all(a.status == OK for a in c.acks), [a for a in c.acks if a.status != OK][:3]
    acked |= {a.seq for a in c.acks}
    stored = {int(r["s"]): (int(r["n"]), int(r["d"])) for r in second.sql(
        "SELECT batch_seq AS s, count() AS n, uniqExact(ts, src_port, wire_len) AS d FROM hdrlog.packets "
        f"WHERE collector_id = '{cid}' GROUP BY s")}
    print(f"DISK FULL: acked before restart {before}, after: all {len(acked)}; stored seqs {len(stored)}, "
          f"missing {sorted(acked - set(stored))}")
    assert acked == set(batches)
    assert stored == {s: (rows[s], rows[s]) for s in batches}, "an acked seq is missing or stored twice"


# -- --insecure: forged seqs under someone else's collector_id ------------------------------------

def _send(target: str, batches: list[ingest_pb2.Batch]) -> list[ingest_pb2.Ack]:
    with grpc.insecure_channel(target, options=OWN_CONNECTION) as ch:
        return list(ingest_pb2_grpc.IngestStub(ch).Stream(iter(batches), timeout=60))


def test_insecure_forged_huge_seq_takes_only_that_seq_never_the_victims_later_ones(tmp_path, procs):
    server = ServerProcess(f"chdb://{tmp_path}/store", tmp_path, "--flush-interval", "0.05")
    procs.append(server)
    server.start()
    victim = dict(collector_id="victim", host="victim")
    assert [a.status for a in _send(server.address, [batch(s, 10, **victim) for s in (1, 2, 3)])] == [OK] * 3
    huge = 3 + 10**9 - 1  # just inside the jump the server allows past what is stored
    forged = _send(server.address, [batch(huge, 4, collector_id="victim", host="attacker"),
                                    batch(7, 4, collector_id="victim", host="attacker")])
    assert [(a.status, a.duplicate) for a in forged] == [(OK, False)] * 2  # --insecure cannot tell
    acks = _send(server.address, [batch(s, 10, **victim) for s in (4, 5, 6, 7, 8)])
    got = {a.seq: (a.status, a.rows, a.duplicate) for a in acks}
    # every later batch of the victim is stored; only the one seq the forger took (7) is lost to it
    assert got == {4: (OK, 10, False), 5: (OK, 10, False), 6: (OK, 10, False), 7: (OK, 0, True), 8: (OK, 10, False)}
    stored = {(r["h"], int(r["s"])): int(r["n"]) for r in server.sql(
        "SELECT host AS h, batch_seq AS s, count() AS n FROM hdrlog.packets WHERE collector_id = 'victim' GROUP BY h, s")}
    assert stored == {**{("victim", s): 10 for s in (1, 2, 3, 4, 5, 6, 8)}, ("attacker", 7): 4, ("attacker", huge): 4}
    # and it survives a restart: the stored seqs are read back from the table, holes and all
    server.stop()
    server.start()
    again = _send(server.address, [batch(s, 10, **victim) for s in (6, 9)])
    assert [(a.seq, a.status, a.rows, a.duplicate) for a in again] == [(6, OK, 0, True), (9, OK, 10, False)]


# -- a flush given up in an unknown state ------------------------------------------------------------

def test_flush_given_up_after_its_insert_landed_is_not_stored_twice(tmp_path):
    """An unexpected error after the INSERT returned (the rows are in) answers RETRY; the resend comes
    in another flush (another dedup token), so only the tables can say it is stored."""
    from tests.support import ServerThread, config
    srv = ServerThread(config(tmp_path / "store", flush_interval=0.3, flush_rows=10**6)).start()
    try:
        store = srv.server.store
        real, calls = store.insert, {"n": 0}

        def lands_then_fails(table, data, token):
            real(table, data, token)
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected: an unexpected error after the insert landed")

        store.insert = lands_then_fails
        first = srv.send([batch(1, 30, collector_id="unknown-state")])
        assert [(a.status, a.error) for a in first] == [(RETRY, "internal error while storing; resend later")]
        again = srv.send([batch(1, 30, collector_id="unknown-state"), batch(2, 30, collector_id="unknown-state")])
        assert sorted((a.seq, a.status, a.rows, a.duplicate) for a in again) == [(1, OK, 0, True), (2, OK, 30, False)]
        assert srv.query("SELECT batch_seq, count() FROM hdrlog.packets GROUP BY 1 ORDER BY 1") == [(1, 30), (2, 30)]
    finally:
        srv.stop()
