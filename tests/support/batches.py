"""Batches for the server tests, built with the wire contract's own encoder (proto/columns.py), and the
collectors in miniature that send them (a stream that returns acks; MiniCollector, which resends)."""

from __future__ import annotations

import ipaddress
import threading
import time
from typing import Iterator

import grpc
import numpy as np

from hdrlog.proto import columns as registry
from hdrlog.proto import ingest_pb2, ingest_pb2_grpc

T0 = 1_700_000_000_123_456_789  # 2023-11-14T22:13:20.123456789Z
NS_DAY = 86_400 * 10**9


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
    # tunnels: every type, a VNI, the outer endpoints (IPv4-mapped and IPv6)
    cols["tunnel_type"] = (np.arange(n) % len(registry.TUNNEL_TYPES)).astype("u1")
    cols["tunnel_id"] = np.where(cols["tunnel_type"] > 0, np.arange(n) * 7 % (1 << 24), 0).astype("<u4")
    cols["tunnel_flags"] = np.where(cols["tunnel_type"] > 0, 1, 0).astype("u1")
    cols["outer_src_ip"] = np.frombuffer(b"".join(ip16("198.18.9.1") if i % 5 else bytes(16) for i in range(n)), dtype="V16")
    cols["outer_dst_ip"] = np.frombuffer(b"".join(ip16("2001:db8:9::2") if i % 5 else bytes(16) for i in range(n)),
                                         dtype="V16")
    return cols


def packets_table(n: int, seed: int = 0) -> ingest_pb2.Table:
    return registry.encode_table("packets", packet_columns(n, seed), n)


def batch(seq: int, n: int = 10, *, collector_id: str = "c1", host: str = "host-a", seed: int | None = None,
          tables: list[ingest_pb2.Table] | None = None) -> ingest_pb2.Batch:
    b = ingest_pb2.Batch(collector_id=collector_id, host=host, seq=seq, created_unix_ns=time.time_ns())
    b.tables.extend(tables if tables is not None else [packets_table(n, seq if seed is None else seed)])
    return b



def stream_acks(target: str, batches: list[ingest_pb2.Batch], timeout: float = 60) -> Iterator[ingest_pb2.Ack]:
    with grpc.insecure_channel(target) as ch:
        yield from ingest_pb2_grpc.IngestStub(ch).Stream(iter(batches), timeout=timeout)


class MiniCollector:
    """Keeps every batch until it is acked OK; sends in seq order; on a broken stream resends the unacked."""

    def __init__(self, batches: list[ingest_pb2.Batch]):
        self.unacked = {b.seq: b for b in batches}
        self.acks: list[ingest_pb2.Ack] = []
        self.lock = threading.Lock()

    def run_once(self, target: str, pace: float = 0.0) -> bool:
        """One stream over everything unacked; True when all got OK."""
        todo = [self.unacked[s] for s in sorted(self.unacked)]

        def gen():
            for b in todo:
                yield b
                if pace:
                    time.sleep(pace)

        try:
            with grpc.insecure_channel(target) as ch:
                for ack in ingest_pb2_grpc.IngestStub(ch).Stream(gen(), timeout=60):
                    with self.lock:
                        self.acks.append(ack)
                        if ack.status == ingest_pb2.Ack.OK:
                            self.unacked.pop(ack.seq, None)
        except grpc.RpcError:
            return False
        return not self.unacked

    def kill_mid_stream(self, proc, after_acks: int) -> int:
        """Stream (paced) to the server process ``proc`` and SIGKILL it once ``after_acks`` acks are back
        (30 s at most); returns how many acks came back in all."""
        sender = threading.Thread(target=self.run_once, args=(proc.address, 0.01))
        sender.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(self.acks) < after_acks:
            time.sleep(0.01)
        proc.kill()  # batches are queued and being inserted right now
        sender.join(30)
        return len(self.acks)

    def resend(self, batches: list[ingest_pb2.Batch]) -> None:
        """Queue these batches again on the next run, acked or not (resending an acked one must be harmless)."""
        for b in batches:
            self.unacked.setdefault(b.seq, b)
