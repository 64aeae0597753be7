"""Sending: one long-lived gRPC stream, every batch kept until the server acks it.

The outbox holds closed batches in seq order. The stream task sends each one
once per connection and removes it when its Ack arrives (OK: stored, REJECTED:
never storable, counted). When the stream breaks or the server answers RETRY,
the task reconnects after a jittered, capped backoff and resends everything
still unacked, oldest first; the server makes a resent seq harmless.

Failover: the sender may know several servers (stateless servers in front of one
ClickHouse, docs/scale.md). It sticks to the one it is on while that one is
healthy; when a stream breaks (UNAVAILABLE, a reset, the server closing it, or a
RETRY answer) it moves to the next one in the list after a short jittered pause,
and only after a whole round of servers failed in a row does the capped
exponential backoff grow. Whatever was unacked is resent to the new server; the
servers' exactly-once does not depend on which of them receives a batch
(server/writer.py, "Across servers"), and the spool makes the switch lossless.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import grpc

from hdrlog.collector.spool import Every, SpoolCorrupt, SpoolUnwritable
from hdrlog.proto import ingest_pb2, ingest_pb2_grpc

log = logging.getLogger("hdrlog.collector")

BACKOFF_FIRST = 0.2
BACKOFF_MAX = 10.0
MAX_MESSAGE_BYTES = 64 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Notice a vanished server within ~30 s even when the stream is idle.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


class RetryLater(Exception):
    """The server asked for a resend later."""


class Refused(Exception):
    """The server refuses this collector's identity: resending cannot help, and dropping would lose data."""


@dataclass
class SendCounters:
    batches_sent: int = 0
    rows_sent: int = 0
    batches_acked: int = 0
    rows_acked: int = 0
    batches_rejected: int = 0
    rows_rejected: int = 0
    reconnects: int = 0
    switches: int = 0  # times the sender moved to another server (failover)
    rejects: dict[str, int] = field(default_factory=dict)


class Outbox:
    """Batches waiting for their ack, oldest first.

    Without a spool the batches live in memory, at most ``max_rows`` records; beyond
    that the oldest are dropped (``memory_dropped_rows``, drop_unacked_full). With a
    spool (``hdrlog.collector.spool``) every batch is on disk before it is offered to
    the sender, the spool's byte limit decides what is dropped (the oldest), and memory
    holds only the bodies of at most ``CACHED_BATCHES`` batches not yet sent: a resend,
    or a backlog built while the server was away, is read back from disk one batch at a
    time, checked; a bad file is skipped and counted (drop_spool_corrupt).

    When the spool's disk refuses a batch (full, read-only, failing) the batch is kept
    in memory instead, under the same ``max_rows`` bound as without a spool, and every
    later batch tries the disk again: the first that succeeds writes the batches memory
    held (oldest first) to disk too, and the outbox is back to spooling.
    """

    CACHED_BATCHES = 8

    def __init__(self, max_rows: int, spool=None):
        self.max_rows = max_rows
        self.spool = spool
        # seq -> (body or None when only on disk, rows, on disk)
        self._items: OrderedDict[int, tuple[ingest_pb2.Batch | None, int, bool]] = OrderedDict()
        self._cached = 0  # bodies in memory of batches also on disk
        self._memory_rows = 0  # records of batches held in memory only
        self.rows = 0
        self.memory_dropped_rows = 0  # dropped because memory was full (drop_unacked_full)
        self.unreadable_rows = 0  # spooled batches that could not be read back (disk trouble)
        self.last_dropped: list[int] = []  # seqs the last put() dropped to make room
        self.discarded: list[int] = []  # seqs get() dropped (bad or unreadable file), until the owner clears it
        self.changed = asyncio.Event()
        self._warn_memory = Every()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def memory_rows(self) -> int:
        """Records of batches held in memory only (the spool's disk refused them)."""
        return self._memory_rows

    def restore(self, spooled) -> None:
        """Batches an earlier run left in the spool, sent first (they have the lowest seqs)."""
        for b in spooled:
            self._items[b.seq] = (None, b.rows, True)
            self.rows += b.rows
        self.changed.set()

    def put(self, batch: ingest_pb2.Batch, rows: int) -> int:
        """Add a batch; returns how many rows of older batches had to be dropped to fit
        (their seqs are in ``last_dropped``). Never raises for the disk's sake."""
        self.last_dropped = []
        dropped = 0
        if self.spool is not None and self._spool_memory():
            try:
                dropped += self._dropped_by_spool(self.spool.write(batch, rows))
            except SpoolUnwritable as exc:
                dropped += self._dropped_by_spool(exc.dropped)
            else:
                self._items[batch.seq] = (batch, rows, True)
                self._cached += 1
                self._uncache()
                self.rows += rows
                self.changed.set()
                return dropped
        dropped += self._make_room(rows)
        self._items[batch.seq] = (batch, rows, False)
        self._memory_rows += rows
        self.rows += rows
        self.changed.set()
        return dropped

    def _spool_memory(self) -> bool:
        """Write the batches memory holds to the spool, oldest first; True when none is left in memory."""
        if not self._memory_rows:
            return True
        for seq, (body, rows, disk) in list(self._items.items()):
            if disk or seq not in self._items:
                continue
            try:
                self._dropped_by_spool(self.spool.write(body, rows))
            except SpoolUnwritable as exc:
                self._dropped_by_spool(exc.dropped)
                return False
            if seq in self._items:
                self._items[seq] = (body, rows, True)
                self._memory_rows -= rows
                self._cached += 1
        self._uncache()
        return True

    def _dropped_by_spool(self, batches) -> int:
        """The spool removed its oldest batches to stay under its limit (drop_spool_full, counted there)."""
        n = 0
        for old in batches:
            self.last_dropped.append(old.seq)
            n += self._drop(old.seq)
        return n

    def _make_room(self, rows: int) -> int:
        """Drop the oldest batches held in memory only until ``rows`` more fit under max_rows."""
        dropped = 0
        for seq in [s for s, item in self._items.items() if not item[2]]:
            if self._memory_rows + rows <= self.max_rows:
                break
            self.last_dropped.append(seq)
            n = self._drop(seq)
            dropped += n
        if dropped:
            self.memory_dropped_rows += dropped
            if self.spool is not None:
                self.spool.count_accounted(dropped)
                if self._warn_memory.due():
                    log.error("spool %s unwritable (%s) and memory full (max_unacked_rows=%d): dropped the oldest "
                              "%d records, %d so far, counted as drop_unacked_full — fix the disk or raise "
                              "max_unacked_rows", self.spool.dir, self.spool.degraded, self.max_rows, dropped,
                              self.memory_dropped_rows)
        return dropped

    def _uncache(self) -> None:
        while self._cached > self.CACHED_BATCHES:
            for seq, (body, r, disk) in self._items.items():  # uncache the oldest cached body
                if body is not None and disk:
                    self._items[seq] = (None, r, True)
                    self._cached -= 1
                    break

    def _drop(self, seq: int) -> int:
        item = self._items.pop(seq, None)
        if item is None:
            return 0
        body, rows, disk = item
        if body is not None and disk and self.spool is not None:
            self._cached -= 1
        if not disk:
            self._memory_rows -= rows
        self.rows -= rows
        return rows

    def pop(self, seq: int) -> int | None:
        """The batch was acked (or rejected): forget it, on disk too."""
        item = self._items.get(seq)
        if item is None:
            return None
        rows = self._drop(seq)
        if self.spool is not None:
            if item[2]:
                self.spool.remove(seq)
            else:
                self.spool.count_accounted(rows)
        self.changed.set()
        return rows

    def __contains__(self, seq: int) -> bool:
        return seq in self._items

    def seqs_after(self, seq: int) -> list[int]:
        return [s for s in self._items if s > seq]

    def get(self, seq: int) -> tuple[ingest_pb2.Batch, int] | None:
        """The batch to send, read back from the spool when it is not in memory; None when gone
        (acked, dropped, or its file unreadable or bad: counted, and the rest goes on)."""
        item = self._items.get(seq)
        if item is None:
            return None
        body, rows, disk = item
        if body is not None:
            if self.spool is not None and disk:  # sent once: from now on it lives on disk only
                self._items[seq] = (None, rows, True)
                self._cached -= 1
            return body, rows
        try:
            return self.spool.load(seq), rows
        except SpoolCorrupt as exc:
            self._drop(seq)
            self.spool.discard_corrupt(seq, exc)
            self.discarded.append(seq)
        except OSError as exc:
            log.error("spool: cannot read back batch %d (%s); %d records lost, counted as drop_spool_unreadable",
                      seq, exc, rows)
            self._drop(seq)
            self.spool.remove(seq)
            self.unreadable_rows += rows
            self.discarded.append(seq)
        self.changed.set()
        return None

    def after(self, seq: int) -> list[tuple[int, ingest_pb2.Batch, int]]:
        """Unacked batches with a seq above ``seq``, in order (bodies read from the spool if needed)."""
        out = []
        for s in self.seqs_after(seq):
            got = self.get(s)
            if got is not None:
                out.append((s, got[0], got[1]))
        return out


class Sender:
    """Keeps one stream to a server alive and drains the outbox through it; fails over between ``targets``."""

    def __init__(self, targets: str | list[str], outbox: Outbox, *,
                 credentials: grpc.ChannelCredentials | None = None,
                 on_connected: Callable[[bool], None] | None = None):
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        if not self.targets:
            raise ValueError("Sender needs at least one server address")
        self._current = 0
        self.outbox = outbox
        self.credentials = credentials
        self.counters = SendCounters()
        self.connected = False
        self._on_connected = on_connected or (lambda up: None)
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_error = ""
        self.refused = ""  # set when the server refused our identity: the sender has stopped

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="hdrlog-sender")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def wait_drained(self, timeout: float) -> bool:
        """Wait until every batch is acked, at most ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.outbox):
            left = deadline - loop.time()
            if left <= 0:
                return False
            self.outbox.changed.clear()
            try:
                await asyncio.wait_for(self.outbox.changed.wait(), left)
            except asyncio.TimeoutError:
                return not len(self.outbox)
        return True

    @property
    def target(self) -> str:
        """The server the sender is on (or will try next)."""
        return self.targets[self._current]

    def _set_connected(self, up: bool) -> None:
        if up != self.connected:
            self.connected = up
            self._on_connected(up)

    async def _run(self) -> None:
        delay = BACKOFF_FIRST
        failed_in_row = 0  # streams that ended without an ack, on any server
        while not self._stopping.is_set():
            acked_before = self.counters.batches_acked + self.counters.batches_rejected
            target = self.target
            try:
                await self._stream_once()
            except asyncio.CancelledError:
                raise
            except RetryLater as exc:
                self._last_error = str(exc)
            except Refused as exc:
                self.refused = str(exc)
                self._set_connected(False)
                log.error("server %s: %s; %d batches (%d records) kept unsent", self.target, exc,
                          len(self.outbox), self.outbox.rows)
                return
            except grpc.aio.AioRpcError as exc:
                self._last_error = f"{exc.code().name}: {exc.details()}"
            except Exception as exc:  # never let a transport surprise end the collector
                self._last_error = f"{type(exc).__name__}: {exc}"
            self._set_connected(False)
            if self.counters.batches_acked + self.counters.batches_rejected > acked_before:
                delay, failed_in_row = BACKOFF_FIRST, 0
            failed_in_row += 1
            if len(self.targets) > 1:
                self._current = (self._current + 1) % len(self.targets)
                self.counters.switches += 1
            if failed_in_row % len(self.targets):
                wait = BACKOFF_FIRST * random.uniform(0.5, 1.5)  # another server may be fine: try it soon
            else:
                wait = delay * random.uniform(0.5, 1.5)  # every server failed once more: back off
                delay = min(delay * 2, BACKOFF_MAX)
            where = f", trying {self.target} in {wait:.1f}s" if self.target != target else f", retrying in {wait:.1f}s"
            log.warning("server %s: %s; %d batches (%d records) unacked%s",
                        target, self._last_error, len(self.outbox), self.outbox.rows, where)
            self.counters.reconnects += 1
            try:
                await asyncio.wait_for(self._stopping.wait(), wait)
            except asyncio.TimeoutError:
                pass

    def _channel(self) -> grpc.aio.Channel:
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        return grpc.aio.secure_channel(self.target, self.credentials, options=CHANNEL_OPTIONS)

    async def _stream_once(self) -> None:
        async with self._channel() as channel:
            call = ingest_pb2_grpc.IngestStub(channel).Stream()
            reader = asyncio.create_task(self._read_acks(call), name="hdrlog-acks")
            writer = asyncio.create_task(self._write_batches(call), name="hdrlog-writes")
            try:
                done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()  # raise what ended the stream
                raise ConnectionError("the server closed the stream")
            finally:
                for task in (reader, writer):
                    task.cancel()
                await asyncio.gather(reader, writer, return_exceptions=True)
                call.cancel()

    async def _write_batches(self, call: grpc.aio.StreamStreamCall) -> None:
        last_sent = 0
        while True:
            self.outbox.changed.clear()
            for seq in self.outbox.seqs_after(last_sent):
                got = self.outbox.get(seq)  # None: acked or dropped meanwhile
                if got is None:
                    continue
                batch, rows = got
                await call.write(batch)
                last_sent = seq
                self.counters.batches_sent += 1
                self.counters.rows_sent += rows
            await self.outbox.changed.wait()

    async def _read_acks(self, call: grpc.aio.StreamStreamCall) -> None:
        async for ack in call:
            self._set_connected(True)
            if ack.status == ingest_pb2.Ack.RETRY:
                raise RetryLater(f"server asked to retry seq {ack.seq}: {ack.error}")
            if ack.status == ingest_pb2.Ack.REJECTED and ack.reason == "identity":
                # Keep the batch (in the spool too): it is fine, only who sends it is wrong.
                raise Refused(f"server refuses this collector's identity: {ack.error}")
            rows = self.outbox.pop(ack.seq)
            if rows is None:
                continue  # an ack for a batch already acked on an earlier stream
            if ack.status == ingest_pb2.Ack.REJECTED:
                self.counters.batches_rejected += 1
                self.counters.rows_rejected += rows
                reason = ack.error.split(":", 1)[0][:80] or "unknown"
                self.counters.rejects[reason] = self.counters.rejects.get(reason, 0) + 1
                log.error("server rejected batch seq %d (%d records lost): %s", ack.seq, rows, ack.error)
            else:
                self.counters.batches_acked += 1
                self.counters.rows_acked += rows
