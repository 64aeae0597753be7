"""Sending: one long-lived gRPC stream, every batch kept until the server acks it.

The outbox (collector/spool.py) holds closed batches in seq order. The stream task sends each one
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
from dataclasses import dataclass, field
from typing import Callable

import grpc

from hdrlog.collector.spool import Outbox
from hdrlog.drops import DropWarning, backoff_delay
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
        self._warn_rejected = DropWarning(log, f"server {', '.join(self.targets)} rejected batches",
                                          "they can never be stored; the reason names what to fix "
                                          "(rows_rejected counts them)", level=logging.ERROR)

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
        attempt = 0       # rounds of servers that all failed in a row (the backoff's exponent)
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
                attempt, failed_in_row = 0, 0
            failed_in_row += 1
            if len(self.targets) > 1:
                self._current = (self._current + 1) % len(self.targets)
                self.counters.switches += 1
            if failed_in_row % len(self.targets):
                wait = backoff_delay(1, BACKOFF_FIRST, BACKOFF_MAX, jitter=(0.5, 1.5))  # another server may be fine: try it soon
            else:
                attempt += 1  # every server failed once more: back off
                wait = backoff_delay(attempt, BACKOFF_FIRST, BACKOFF_MAX, jitter=(0.5, 1.5))
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
                self._warn_rejected.dropped(rows, f"the last: seq {ack.seq} from {self.target}, {ack.error}")
            else:
                self.counters.batches_acked += 1
                self.counters.rows_acked += rows
