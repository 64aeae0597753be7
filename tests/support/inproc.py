"""A real Server on its own event loop in a thread, talked to over loopback (the server tests).

Every server started here is stopped by the fixture or context manager that started it.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Iterable

import grpc

from hdrlog.proto import ingest_pb2, ingest_pb2_grpc
from hdrlog.server import Server, ServerConfig

def config(store: Path, **kw) -> ServerConfig:
    base = dict(listen="127.0.0.1:0", sql_listen="127.0.0.1:0", clickhouse=f"chdb://{store}", insecure=True,
                flush_interval=0.05, status_interval=0)
    base.update(kw)
    cfg = ServerConfig(**base)
    cfg.validate()
    return cfg


class ServerThread:
    """A Server running on its own event loop in a thread; the tests talk to it over loopback."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.server = Server(cfg)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self.channel: grpc.Channel | None = None

    def start(self) -> "ServerThread":
        self.thread.start()
        self.call(self.server.start())
        return self

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> list[asyncio.Task]:
        """Stop the server and its loop; returns tasks still alive on the loop (should be none)."""
        try:
            self.call(self.server.stop(grace=1))
            if self.channel is not None:
                self.channel.close()

            async def leftovers():
                await asyncio.sleep(0)
                return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

            left = self.call(leftovers())
            self.call(self.loop.shutdown_default_executor())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
        return left

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def sql_url(self) -> str:
        return f"http://127.0.0.1:{self.server.sql_port}"

    def stub(self) -> ingest_pb2_grpc.IngestStub:
        if self.channel is None:
            self.channel = grpc.insecure_channel(self.target, options=[("grpc.max_send_message_length", 256 << 20)])
        return ingest_pb2_grpc.IngestStub(self.channel)

    def send(self, batches: Iterable[ingest_pb2.Batch], timeout: float = 60) -> list[ingest_pb2.Ack]:
        """One stream: send every batch, half-close, return all acks."""
        return list(self.stub().Stream(iter(list(batches)), timeout=timeout))

    def query(self, sql: str) -> list[tuple]:
        """Rows through the store's own client (not the endpoint under test)."""
        client = self.server.store._client  # noqa: SLF001 - test-only peek
        return client.query(sql).result_rows
