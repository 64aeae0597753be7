"""The gRPC ingest service: receive → validate → hand to the writer → ack.

One ``Stream`` call per collector connection. Reading and acking are
pipelined: the handler keeps reading batches while earlier ones wait for their
INSERT; each batch's Ack is written (by one writer coroutine per stream, so
writes never interleave) as soon as its outcome is known, which may be out of
order. A malformed batch is answered ``REJECTED`` with the reason and the
stream carries on; nothing a collector sends can end another stream.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from hdrlog.proto import ingest_pb2, ingest_pb2_grpc
from hdrlog.server.convert import BatchError, convert_batch
from hdrlog.server.metrics import ServerMetrics
from hdrlog.server.writer import Outcome, Writer

log = logging.getLogger("hdrlog.server")

# Batches with at most this many rows are converted on the event loop; larger ones in a thread.
INLINE_ROWS = 20_000
REJECT_LOG_INTERVAL = 1.0


def identity_for(context: grpc.aio.ServicerContext, batch: ingest_pb2.Batch, *, insecure: bool) -> str:
    """The host name the batch's rows are stored under.

    Insecure mode trusts ``Batch.host``. The mTLS issue binds it to the peer
    certificate's name here (``context.auth_context()``) and refuses a mismatch.
    """
    if insecure:
        return batch.host
    names = context.auth_context().get("x509_common_name") or []
    if not names:
        raise BatchError("identity", "no client certificate name")
    return names[0].decode()


class IngestServicer(ingest_pb2_grpc.IngestServicer):
    def __init__(self, writer: Writer, metrics: ServerMetrics, *, insecure: bool):
        self.writer = writer
        self.metrics = metrics
        self.insecure = insecure
        self._last_reject_log = 0.0
        self._suppressed = 0

    def _log_reject(self, line: str) -> None:
        """At most one rejection warning per second; the others are counted in the next line."""
        now = time.monotonic()
        if now - self._last_reject_log < REJECT_LOG_INTERVAL:
            self._suppressed += 1
            return
        more = f" (and {self._suppressed} more rejections not logged)" if self._suppressed else ""
        log.warning("%s%s", line, more)
        self._last_reject_log, self._suppressed = now, 0

    async def Stream(self, request_iterator, context: grpc.aio.ServicerContext):  # noqa: N802 (gRPC name)
        acks: asyncio.Queue[ingest_pb2.Ack | None] = asyncio.Queue()
        outstanding = 0
        drained = asyncio.Event()
        drained.set()
        self.metrics.stream_opened()
        peer = context.peer()

        def on_done(seq: int, fut: asyncio.Future) -> None:
            nonlocal outstanding
            outstanding -= 1
            if outstanding == 0:
                drained.set()
            if fut.cancelled():
                return
            acks.put_nowait(_ack(seq, fut.result()))

        async def write_acks() -> None:
            while True:
                ack = await acks.get()
                if ack is None:
                    return
                await context.write(ack)

        writer_task = asyncio.create_task(write_acks(), name=f"hdrlog-acks {peer}")
        try:
            while True:
                batch = await context.read()
                if batch is grpc.aio.EOF:
                    break
                self.metrics.received(batch.ByteSize())
                try:
                    host = identity_for(context, batch, insecure=self.insecure)
                    rows = sum(t.rows for t in batch.tables)
                    if rows > INLINE_ROWS:
                        tables = await asyncio.to_thread(convert_batch, batch, host)
                    else:
                        tables = convert_batch(batch, host)
                except BatchError as exc:
                    self.metrics.rejected(exc.kind)
                    self._log_reject(f"server: batch {batch.collector_id[:64]!r}/{batch.seq} from {peer} rejected: {exc}")
                    acks.put_nowait(ingest_pb2.Ack(seq=batch.seq, status=ingest_pb2.Ack.REJECTED, error=str(exc)))
                    continue
                fut = await self.writer.submit(batch.collector_id, batch.seq, tables)
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


def _ack(seq: int, outcome: Outcome) -> ingest_pb2.Ack:
    return ingest_pb2.Ack(seq=seq, status=outcome.status, rows=outcome.rows,
                          duplicate=outcome.duplicate, error=outcome.error)
