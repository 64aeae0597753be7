"""The gRPC ingest service: receive → validate → hand to the writer → ack.

One ``Stream`` call per collector connection. Reading and acking are
pipelined: the handler keeps reading batches while earlier ones wait for their
INSERT; each batch's Ack is written (by one writer coroutine per stream, so
writes never interleave) as soon as its outcome is known, which may be out of
order. A malformed batch is answered ``REJECTED`` with the reason and the
stream carries on; nothing a collector sends can end another stream.

Identity: with mTLS the stream belongs to the client certificate's name (its
common name, as ``hdrlog pki issue --name`` writes it). A batch must say that
name in ``host`` and carry a ``collector_id`` under it (``NAME/...``), else it is
refused: a collector writes rows for its own host only, and cannot touch
another collector's exactly-once watermarks. Rows are stored with the
certificate's name as ``host``. ``--insecure`` trusts ``Batch.host``.

Limits: at most ``max_streams`` streams at once, and with mTLS at most
``max_streams_per_host`` of them under one certificate name, so one host (or a
stolen certificate) cannot take every slot (more are refused with
RESOURCE_EXHAUSTED); a client that stops reading its acks stops being read once
``MAX_UNSENT_ACKS`` acks wait for it, so it costs a bounded amount of memory and
nobody else anything; a seq of 0, or one more than ``MAX_SEQ_JUMP`` past what is
stored for its collector, is refused (a sanity bound on a collector's nearly
dense seqs; a forged seq cannot hide later ones, see writer.py, "Exactly-once").

Rows are bounded by the bytes sent: absent columns are filled with zeros, so a table's
claimed ``rows`` may make the server allocate at most ``MAX_FILL_RATIO`` x the bytes its
columns carry, plus ``FILL_SLACK`` (a 40-byte Batch claiming ten million rows is refused
before anything is allocated; an older collector that lacks a few newer columns is not).
And the writer's pending-rows cap is taken *before* a batch is converted
(``Writer.reserve``), so a full buffer stops a stream before it allocates, not after.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from google.protobuf.message import DecodeError

from hdrlog.proto import columns as registry
from hdrlog.drops import Every
from hdrlog.proto import ingest_pb2, ingest_pb2_grpc
from hdrlog.server.convert import MAX_ROWS, BatchError, convert_batch
from hdrlog.server.metrics import ServerMetrics
from hdrlog.server.writer import Outcome, Writer

log = logging.getLogger("hdrlog.server")

# Batches with at most this many rows are converted on the event loop; larger ones in a thread,
# which overlaps their conversion (inflate, validate, Arrow) with the reading of the next ones and
# with the INSERT running in another thread (zstd and Arrow release the GIL).
INLINE_ROWS = 2_000
REJECT_LOG_INTERVAL = 1.0
MAX_UNSENT_ACKS = 10_000
# A restarted collector skips at most one reserved block of seqs (1000); this allows for a billion.
MAX_SEQ_JUMP = 1_000_000_000
# Zero-filled bytes (absent columns) a table may cost beyond what it sent: ratio x bytes sent + slack.
MAX_FILL_RATIO = 1
FILL_SLACK = 1 << 20
# Collector ids one stream remembers having read the stored seqs of (a collector sends one).
MAX_COLLECTORS_PER_STREAM = 1000


def peer_identity(context: grpc.aio.ServicerContext) -> str:
    """The client certificate's common name ('' when there is none)."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode("utf-8", "replace") if names else ""


def identity_for(identity: str | None, batch: ingest_pb2.Batch) -> str:
    """The host name the batch's rows are stored under.

    ``identity`` is the peer certificate's name, or None in insecure mode (which
    trusts ``Batch.host``). With a certificate the batch must name that host and
    a collector_id under it.
    """
    if identity is None:
        return batch.host
    if not identity:
        raise BatchError("identity", "the client certificate has no common name; issue it with `hdrlog pki issue --name HOST`")
    if batch.host != identity:
        shown = batch.host if len(batch.host) <= 64 else batch.host[:61] + "..."
        raise BatchError("identity", f"host {shown!r} does not match the client certificate's name {identity!r}: "
                                     "a collector may write rows only for its own host")
    if not batch.collector_id.startswith(identity + "/"):
        shown = batch.collector_id if len(batch.collector_id) <= 64 else batch.collector_id[:61] + "..."
        raise BatchError("identity", f"collector_id {shown!r} is not under the certificate's name "
                                     f"(expected {identity + '/...'!r})")
    return identity


def check_rows_carried(batch: ingest_pb2.Batch) -> int:
    """The batch's rows, once each table's claimed rows are shown to be carried by its bytes.

    Raises BatchError naming the table when it is unknown, claims more than MAX_ROWS rows, or
    its absent columns would be zero-filled to more than MAX_FILL_RATIO x the bytes sent +
    FILL_SLACK (kind ``rows``): all before the stream reserves room or allocates anything.
    """
    total = 0
    for t in batch.tables:
        if t.name not in registry.TABLES:
            raise BatchError("unknown_table", f"unknown table {t.name[:64]!r} (known: {', '.join(registry.TABLES)})")
        if t.rows > MAX_ROWS:
            raise BatchError("columns", f"table {t.name!r} claims {t.rows} rows (at most {MAX_ROWS} per batch)")
        sent, filled = registry.table_bytes(t)
        if filled > MAX_FILL_RATIO * sent + FILL_SLACK:
            raise BatchError("rows", f"table {t.name[:64]!r} claims {t.rows} rows but its columns carry {sent} bytes: "
                                     f"the absent columns would be {filled} bytes of zeros (at most "
                                     f"{MAX_FILL_RATIO} x the bytes sent + {FILL_SLACK}); send the columns")
        total += t.rows
    return total


class IngestServicer(ingest_pb2_grpc.IngestServicer):
    def __init__(self, writer: Writer, metrics: ServerMetrics, *, insecure: bool, max_streams: int = 1 << 30,
                 max_streams_per_host: int = 1 << 30):
        self.writer = writer
        self.metrics = metrics
        self.insecure = insecure
        self.max_streams = max_streams
        self.max_streams_per_host = max_streams_per_host
        self.open_streams = 0
        self.open_by_identity: dict[str, int] = {}
        self._reject_every = Every(first=REJECT_LOG_INTERVAL, most=REJECT_LOG_INTERVAL)

    def _log_reject(self, line: str) -> None:
        """At most one rejection warning per second; the others are counted in the next line."""
        if not self._reject_every.due():
            return
        held, self._reject_every.held = self._reject_every.held, 0
        more = f" (and {held} more rejections not logged)" if held else ""
        log.warning("%s%s", line, more)

    async def Stream(self, request_iterator, context: grpc.aio.ServicerContext):  # noqa: N802 (gRPC name)
        if self.open_streams >= self.max_streams:
            self.metrics.rejected("too_many_streams")
            self._log_reject(f"server: stream from {context.peer()} refused: {self.open_streams} streams open "
                             f"(max_streams={self.max_streams})")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"too many streams open ({self.max_streams}); retry later")
        identity = None if self.insecure else peer_identity(context)
        if identity is not None and self.open_by_identity.get(identity, 0) >= self.max_streams_per_host:
            self.metrics.rejected("too_many_streams_per_host")
            self._log_reject(f"server: stream from {context.peer()} refused: {identity!r} has "
                             f"{self.open_by_identity[identity]} streams open (max_streams_per_host="
                             f"{self.max_streams_per_host})")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"too many streams open for {identity!r} ({self.max_streams_per_host}); retry later")
        self.open_streams += 1
        if identity is not None:
            self.open_by_identity[identity] = self.open_by_identity.get(identity, 0) + 1
        try:
            await self._stream(context, identity)
        finally:
            self.open_streams -= 1
            if identity is not None:
                left = self.open_by_identity[identity] - 1
                if left:
                    self.open_by_identity[identity] = left
                else:
                    del self.open_by_identity[identity]

    async def _stream(self, context: grpc.aio.ServicerContext, identity: str | None) -> None:
        acks: asyncio.Queue[ingest_pb2.Ack | None] = asyncio.Queue()
        outstanding = 0
        drained = asyncio.Event()
        drained.set()
        room = asyncio.Event()  # set while fewer than MAX_UNSENT_ACKS acks wait to be written
        room.set()
        self.metrics.stream_opened()
        peer = context.peer()
        floors: dict[str, int] = {}  # collector_id -> lowest seq whose stored seqs were read for this stream

        def queue_ack(ack: ingest_pb2.Ack) -> None:
            acks.put_nowait(ack)
            if acks.qsize() >= MAX_UNSENT_ACKS:
                room.clear()

        def on_done(seq: int, fut: asyncio.Future) -> None:
            nonlocal outstanding
            outstanding -= 1
            if outstanding == 0:
                drained.set()
            if fut.cancelled():
                return
            queue_ack(_ack(seq, fut.result()))

        async def write_acks() -> None:
            while True:
                ack = await acks.get()
                if acks.qsize() < MAX_UNSENT_ACKS:
                    room.set()
                if ack is None:
                    return
                await context.write(ack)

        writer_task = asyncio.create_task(write_acks(), name=f"hdrlog-acks {peer}")
        try:
            while True:
                # A client that does not read its acks is not read either (bounded memory, gRPC flow control).
                await room.wait()
                try:
                    batch = await context.read()
                except DecodeError as exc:  # not a Batch at all: end this stream only, with the reason
                    self.metrics.rejected("decode")
                    self._log_reject(f"server: stream from {peer} ended: not a hdrlog.v1.Batch message ({exc})")
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"not a hdrlog.v1.Batch message: {exc}")
                if batch is grpc.aio.EOF:
                    break
                self.metrics.received(batch.ByteSize())
                reserved = 0
                try:
                    host = identity_for(identity, batch)
                    self._check_seq(batch)
                    rows = check_rows_carried(batch)
                    # Room in the pending buffer first, then the allocation (backpressure before conversion).
                    await self.writer.reserve(rows)
                    reserved = rows
                    limit = self.writer.config.max_message_bytes
                    if rows > INLINE_ROWS:
                        tables = await asyncio.to_thread(convert_batch, batch, host, limit)
                    else:
                        tables = convert_batch(batch, host, limit)
                except BatchError as exc:
                    self.writer.release(reserved)
                    self.metrics.rejected(exc.kind)
                    self._log_reject(f"server: batch {batch.collector_id[:64]!r}/{batch.seq} from {peer} rejected: {exc}")
                    queue_ack(ingest_pb2.Ack(seq=batch.seq, status=ingest_pb2.Ack.REJECTED, error=str(exc),
                                             reason=exc.kind))
                    continue
                except BaseException:
                    self.writer.release(reserved)
                    raise
                if self.writer.shared:
                    # Another server may have stored this collector's later seqs: ask ClickHouse (writer.py,
                    # "Across servers") on its first batch here, and on any batch below what was asked.
                    floor = floors.get(batch.collector_id)
                    if floor is None or batch.seq < floor:
                        try:
                            problem = await self.writer.refresh(batch.collector_id, host, batch.seq)
                        except BaseException:
                            self.writer.release(reserved)
                            raise
                        if problem:
                            self.writer.release(reserved)
                            self.metrics.batches_retry.inc()
                            queue_ack(ingest_pb2.Ack(seq=batch.seq, status=ingest_pb2.Ack.RETRY,
                                                     error=f"store unavailable: {problem}"))
                            continue
                        if len(floors) >= MAX_COLLECTORS_PER_STREAM:
                            floors.clear()
                        floors[batch.collector_id] = batch.seq
                fut = await self.writer.submit(batch.collector_id, batch.seq, tables, reserved=reserved)
                outstanding += 1
                drained.clear()
                fut.add_done_callback(lambda f, seq=batch.seq: on_done(seq, f))
            # The collector half-closed: answer everything it sent, then end the call.
            await drained.wait()
        finally:
            acks.put_nowait(None)
            try:
                await writer_task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the peer went away
                pass
            self.metrics.stream_closed()


    def _check_seq(self, batch: ingest_pb2.Batch) -> None:
        if batch.seq == 0:
            raise BatchError("seq", "seq 0 is not allowed: a collector's seqs start at 1")
        last = max((self.writer.watermark(batch.collector_id, t.name) for t in batch.tables), default=-1)
        if batch.seq > max(last, 0) + MAX_SEQ_JUMP:
            raise BatchError("seq", f"seq {batch.seq} jumps more than {MAX_SEQ_JUMP} past the last stored seq "
                                    f"{max(last, 0)} of collector {batch.collector_id[:64]!r}")


def _ack(seq: int, outcome: Outcome) -> ingest_pb2.Ack:
    return ingest_pb2.Ack(seq=seq, status=outcome.status, rows=outcome.rows,
                          duplicate=outcome.duplicate, error=outcome.error)
