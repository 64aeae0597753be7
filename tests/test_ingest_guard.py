"""Hostile clients at a real `hdrlog server run` process, over real gRPC with mTLS from `hdrlog pki`:

- a flood of TCP connections that never send a ClientHello (the server's open-file limit is
  lowered with prlimit, so the machine's own limits are never approached): a collector already
  streaming keeps getting its batches acked, the SQL endpoint keeps answering, the log stays
  small, and once the flood's handshakes time out a new collector gets in;
- a 40-byte Batch claiming millions of rows and no columns (and one carrying a single 1-byte
  column for millions of rows): REJECTED with the reason, before anything is zero-filled, so the
  server's peak RSS does not move; honest batches, also ones missing a few columns (an older
  collector), are still stored.
"""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import threading

import grpc

from hdrlog.proto import columns as registry
from hdrlog.proto import ingest_pb2, ingest_pb2_grpc
from tests.support import HDRLOG, ServerProcess, wait_until
from tests.support import batch, packet_columns

OK, REJECTED = ingest_pb2.Ack.OK, ingest_pb2.Ack.REJECTED
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
MiB = 1 << 20


def credentials(certs, name: str) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials((certs / "ca.crt").read_bytes(), (certs / f"{name}.key").read_bytes(),
                                        (certs / f"{name}.crt").read_bytes())


def status_kib(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class Stream:
    """One long-lived mTLS ingest stream fed from a queue, as a collector holds it."""

    def __init__(self, target: str, creds: grpc.ChannelCredentials):
        self.channel = grpc.secure_channel(target, creds, options=OWN_CONNECTION)
        self.q: queue.Queue = queue.Queue()
        self.acks: queue.Queue = queue.Queue()
        self.call = ingest_pb2_grpc.IngestStub(self.channel).Stream(iter(self.q.get, None), timeout=600)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        try:
            for ack in self.call:
                self.acks.put(ack)
        except grpc.RpcError as exc:
            self.acks.put(exc)

    def send(self, b: ingest_pb2.Batch, timeout: float = 60) -> ingest_pb2.Ack:
        self.q.put(b)
        ack = self.acks.get(timeout=timeout)
        if isinstance(ack, Exception):
            raise ack
        return ack

    def close(self):
        self.q.put(None)
        self.call.cancel()
        self.reader.join(10)
        self.channel.close()


def one_batch(target: str, creds, b: ingest_pb2.Batch, timeout: float = 10) -> ingest_pb2.Ack | None:
    """A new connection, one batch; None when the server does not let it in (yet)."""
    try:
        with grpc.secure_channel(target, creds, options=OWN_CONNECTION) as ch:
            acks = list(ingest_pb2_grpc.IngestStub(ch).Stream(iter([b]), timeout=timeout))
            return acks[0] if acks else None
    except grpc.RpcError:
        return None


# -- the connection flood ----------------------------------------------------------------------------

NOFILE = 512          # the server's hard RLIMIT_NOFILE (it starts with a soft limit of 256 and raises it)
FLOOD = 2_000         # raw TCP connections that never speak, ~4x the server's whole fd table
BAD_HELLOS = 500      # connections whose TLS ClientHello is garbage (gRPC logged ~215 bytes for each)


def test_a_flood_of_silent_connections_costs_collectors_and_the_sql_endpoint_nothing(tmp_path, certs):
    server = ServerProcess(f"chdb://{tmp_path}/store", tmp_path, "--handshake-timeout", "3", pki=certs,
                           command=["prlimit", f"--nofile=256:{NOFILE}", "--", *HDRLOG])
    flood: list[socket.socket] = []
    stream = None
    try:
        server.start()
        assert status_soft_nofile(server.proc.pid) == NOFILE, "the soft limit is raised to the hard one at start"
        # The start line comes after /ping answers (the engine's memory limit is read first): wait for it.
        wait_until(lambda: "(at most 256 connections)" in server.log(), 30, "the server's start line")
        stream = Stream(server.address, credentials(certs, "host-a"))
        assert stream.send(batch(1, 10, collector_id="host-a/1", host="host-a")).status == OK
        log_before = server.log_path.stat().st_size

        # Connections that send a broken ClientHello: each fails its handshake, none may cost a log line.
        for _ in range(BAD_HELLOS):
            with socket.create_connection(("127.0.0.1", server.grpc_port), timeout=10) as s:
                s.sendall(b"\x16\x03\x01\x00\x05hello" + os.urandom(64))
                s.recv(1024)  # the server's alert, or its close: the handshake was tried
        for _ in range(FLOOD):
            s = socket.create_connection(("127.0.0.1", server.grpc_port), timeout=10)
            flood.append(s)
        fds = len(os.listdir(f"/proc/{server.proc.pid}/fd"))

        # The collector already connected is served, more than once, while the flood is held.
        for seq in (2, 3, 4):
            ack = stream.send(batch(seq, 10, collector_id="host-a/1", host="host-a"))
            assert ack.status == OK, ack
        # The SQL endpoint answers (it has its reserve of file descriptors).
        assert server.http("/ping") == "Ok.\n"
        assert server.count("collector_id = 'host-a/1'") == 40
        # Once the flood's handshakes time out, a new collector gets in (it retries, as a collector does).
        ack = wait_until(lambda: one_batch(server.address, credentials(certs, "host-b"),
                                           batch(1, 10, collector_id="host-b/1", host="host-b")),
                         120, "a new collector's batch to be acked during the flood")
        assert ack.status == OK, ack
        assert server.alive()
        log_growth = server.log_path.stat().st_size - log_before
        print(f"flood: {len(flood)} connections held + {BAD_HELLOS} bad handshakes, server fds {fds} "
              f"(RLIMIT_NOFILE {NOFILE}), log grew {log_growth} bytes")
        assert fds < NOFILE, fds
        assert log_growth < 16 * 1024, server.log()[-3000:]
    finally:
        for s in flood:
            s.close()
        if stream is not None:
            stream.close()
        server.stop()


def status_soft_nofile(pid: int) -> int:
    for line in open(f"/proc/{pid}/limits"):
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no Max open files")


# -- rows claimed vs bytes sent -------------------------------------------------------------------------

CLAIMED = 2_000_000   # ~400 MiB of zero-filled packets columns if believed; safe for this machine


def test_a_tiny_batch_claiming_millions_of_rows_is_rejected_before_any_allocation(tmp_path, certs):
    server = ServerProcess(f"chdb://{tmp_path}/store", tmp_path, pki=certs)
    stream = None
    try:
        server.start()
        stream = Stream(server.address, credentials(certs, "host-a"))
        # A warm-up batch, so the peak RSS below includes a normal conversion and insert.
        assert stream.send(batch(1, 1000, collector_id="host-a/1", host="host-a")).status == OK
        peak_before = status_kib(server.proc.pid, "VmHWM")

        empty = ingest_pb2.Batch(collector_id="host-a/1", host="host-a", seq=2,
                                 tables=[ingest_pb2.Table(name="packets", rows=CLAIMED)])
        assert empty.ByteSize() < 64
        ack = stream.send(empty)
        assert ack.status == REJECTED, ack
        assert "rows" in ack.error and "bytes" in ack.error, ack.error

        # One real 1-byte column for all those rows: 2 MB sent, ~400 MB if the others were zero-filled.
        one_col = ingest_pb2.Batch(collector_id="host-a/1", host="host-a", seq=3)
        t = one_col.tables.add(name="packets", rows=CLAIMED)
        t.columns.add(name="direction", values=b"\x01" * CLAIMED)
        ack = stream.send(one_col)
        assert ack.status == REJECTED, ack
        assert "rows" in ack.error and "bytes" in ack.error, ack.error
        peak_after = status_kib(server.proc.pid, "VmHWM")
        print(f"amplification: peak RSS {peak_before // 1024} MiB before, {peak_after // 1024} MiB after "
              f"two batches claiming {CLAIMED} rows")
        assert (peak_after - peak_before) * 1024 < 64 * MiB

        # Honest batches still go in, also one from an older collector that lacks a few columns.
        assert stream.send(batch(4, 5000, collector_id="host-a/1", host="host-a")).status == OK
        cols = packet_columns(5000)
        old = registry.encode_table("packets", cols, 5000)
        keep = [c for c in old.columns if c.name not in ("parse_flags", "dns_flags", "dns_answers", "tls_version",
                                                         "tls_offered_versions", "tls_alpn", "http_user_agent")]
        del old.columns[:]
        old.columns.extend(keep)
        older = ingest_pb2.Batch(collector_id="host-a/1", host="host-a", seq=5, tables=[old])
        ack = stream.send(older)
        assert ack.status == OK and ack.rows == 5000, ack
        assert server.count("collector_id = 'host-a/1'") == 11000
    finally:
        if stream is not None:
            stream.close()
        server.stop()


# -- backpressure before conversion ------------------------------------------------------------------------

def test_a_full_pending_buffer_stops_a_stream_before_it_converts_the_next_batch(tmp_path, monkeypatch):
    """The store holds the first flush; with the pending buffer full, the next batch read is not
    converted (no Arrow allocation) until the flush is done, then everything is stored."""
    from tests.support import ServerThread, config
    import hdrlog.server.ingest as ingest

    converted: list[int] = []
    real_convert = ingest.convert_batch

    def counting(b, host, *limit):
        converted.append(b.seq)
        return real_convert(b, host, *limit)

    monkeypatch.setattr(ingest, "convert_batch", counting)
    srv = ServerThread(config(tmp_path / "store", flush_rows=1000, max_pending_rows=1000, flush_interval=0.01)).start()
    hold = threading.Event()
    store = srv.server.store
    real_insert = store.insert

    def held(table, data, token):
        hold.wait(60)
        return real_insert(table, data, token)

    store.insert = held
    acks: list = []
    try:
        reader = threading.Thread(target=lambda: acks.extend(srv.send([batch(1, 1000), batch(2, 1000)])))
        reader.start()
        # The server has read batch 2 while batch 1's flush is held: the buffer (1000 rows) is full.
        wait_until(lambda: srv.server.metrics.total_batches == 2, 30, "the server to read batch 2")
        srv.call(asyncio.sleep(0))  # one turn of the server's loop after the read
        assert converted == [1], "batch 2 was converted while the pending buffer was full"
        assert srv.server.writer.pending_rows == 1000
        hold.set()
        reader.join(60)
        assert [(a.seq, a.status, a.rows) for a in sorted(acks, key=lambda a: a.seq)] == [(1, OK, 1000), (2, OK, 1000)]
        assert converted == [1, 2]
        assert srv.query("SELECT count() FROM hdrlog.packets") == [(2000,)]
    finally:
        hold.set()
        srv.stop()
