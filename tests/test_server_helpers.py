"""Helpers for the server tests: a real Server on loopback in a thread, batches built with encode_table,
and the server as a subprocess (``python -m hdrlog.server``) for SIGKILL-and-restart tests.

Every server started here is stopped by the fixture or context manager that started it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

import grpc
import numpy as np

from hdrlog.proto import columns as registry
from hdrlog.proto import ingest_pb2, ingest_pb2_grpc
from hdrlog.server import Server, ServerConfig

T0 = 1_700_000_000_123_456_789  # 2023-11-14T22:13:20.123456789Z
NS_DAY = 86_400 * 10**9


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


# -- data ----------------------------------------------------------------------

def ip16(text: str) -> bytes:
    addr = ipaddress.ip_address(text)
    if addr.version == 4:
        addr = ipaddress.IPv6Address("::ffff:" + text)
    return addr.packed


def packet_columns(n: int, seed: int = 0) -> dict[str, object]:
    """Varied, deterministic packets: IPv4-mapped and IPv6 addresses, both directions, unicode strings."""
    rng = np.random.default_rng(seed)
    cols = registry.empty_columns("packets", n)
    cols["ts"] = (T0 + np.arange(n, dtype=np.int64) * 1_001 + seed * 10**9).astype("<i8")
    cols["ifname"] = [f"veth{i % 3}" for i in range(n)]
    cols["direction"] = (np.arange(n) % 2 + 1).astype("u1")
    cols["sample_rate"] = np.full(n, 1, dtype="<u4")
    cols["wire_len"] = rng.integers(60, 1514, n).astype("<u4")
    cols["eth_src"] = rng.integers(0, 2**48, n, dtype=np.uint64).astype("<u8")
    cols["eth_dst"] = np.full(n, 0xFFFFFFFFFFFF, dtype="<u8")
    cols["vlan_id"] = (np.arange(n) % 5 * 100).astype("<u2")
    v6 = np.arange(n) % 2 == 1
    cols["ip_version"] = np.where(v6, 6, 4).astype("u1")
    cols["eth_type"] = np.where(v6, 0x86DD, 0x0800).astype("<u2")
    src = [ip16(f"2001:db8::{i % 65536:x}") if i % 2 else ip16(f"198.18.{i // 256 % 256}.{i % 256}") for i in range(n)]
    dst = [ip16("2001:db8:ffff::1") if i % 2 else ip16("198.19.255.254") for i in range(n)]
    cols["src_ip"] = np.frombuffer(b"".join(src), dtype="V16")
    cols["dst_ip"] = np.frombuffer(b"".join(dst), dtype="V16")
    cols["ip_proto"] = np.where(v6, 17, 6).astype("u1")
    cols["ttl"] = rng.integers(1, 256, n).astype("u1")
    cols["tcp_flags"] = (np.arange(n) % 512).astype("<u2")
    cols["tcp_seq"] = rng.integers(0, 2**32, n, dtype=np.uint64).astype("<u4")
    cols["src_port"] = rng.integers(1, 65536, n).astype("<u2")
    cols["dst_port"] = np.full(n, 443, dtype="<u2")
    cols["flow_label"] = np.where(v6, 0xFFFFF, 0).astype("<u4")
    cols["dns_qname"] = [f"host{i}.example.org" if i % 7 == 0 else "" for i in range(n)]
    cols["http_host"] = ["bücher.example" if i % 11 == 0 else "" for i in range(n)]
    cols["http_path"] = [f"/p/{i}?q=é" if i % 13 == 0 else "" for i in range(n)]
    cols["tls_sni"] = ["sni.example" if i % 3 == 0 else "" for i in range(n)]
    cols["parse_flags"] = (np.arange(n) % 4).astype("<u2")
    return cols


def packets_table(n: int, seed: int = 0) -> ingest_pb2.Table:
    return registry.encode_table("packets", packet_columns(n, seed), n)


def batch(seq: int, n: int = 10, *, collector_id: str = "c1", host: str = "host-a", seed: int | None = None,
          tables: list[ingest_pb2.Table] | None = None) -> ingest_pb2.Batch:
    b = ingest_pb2.Batch(collector_id=collector_id, host=host, seq=seq, created_unix_ns=time.time_ns())
    b.tables.extend(tables if tables is not None else [packets_table(n, seq if seed is None else seed)])
    return b


# -- the server as a process -------------------------------------------------------

class ServerProcess:
    """``python -m hdrlog.server`` on a store; ``kill()`` sends SIGKILL, ``start()`` restarts on the same store."""

    def __init__(self, store: Path, log_path: Path, *extra: str):
        self.store, self.log_path, self.extra = store, log_path, extra
        self.proc: subprocess.Popen | None = None
        self.ports: dict = {}

    def start(self, timeout: float = 60) -> "ServerProcess":
        cmd = [sys.executable, "-m", "hdrlog.server", "--insecure", "--listen", "127.0.0.1:0",
               "--sql-listen", "127.0.0.1:0", "--clickhouse", f"chdb://{self.store}", *self.extra]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=dict(os.environ))
        log.close()
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line or time.monotonic() > deadline:
            self.stop()
            raise AssertionError(f"server did not start: {self.log_path.read_text()[-2000:]}")
        self.ports = json.loads(line)
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.ports['grpc_port']}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def stream_acks(target: str, batches: list[ingest_pb2.Batch], timeout: float = 60) -> Iterator[ingest_pb2.Ack]:
    with grpc.insecure_channel(target) as ch:
        yield from ingest_pb2_grpc.IngestStub(ch).Stream(iter(batches), timeout=timeout)
