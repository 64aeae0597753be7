"""Direct packet access in load() gives the very records the bpf_skb_load_bytes-only build gives.

bpf/hdrlog.c reads headers straight from the skb's linear data when they are
there, else with bpf_skb_load_bytes. Both builds of the real classifier (the
second with -DHDRLOG_NO_DIRECT=1) run in the kernel (BPF_PROG_TEST_RUN, packets
mode) on the same frames -- whole, and cut at every length, so each header
read meets the end of the data -- and must emit byte-identical records
(mono_ns aside) with identical payload tails.
"""

from __future__ import annotations

import ctypes
import errno

import pytest

from bench import bpfrun
from bench.consumer import load
from hdrlog.collector import records
from hdrlog.collector.ringbuf import RingBufReader


def frames() -> list[bytes]:
    from scapy.all import DNS, DNSQR, ICMP, IP, TCP, UDP, Dot1Q, Ether, IPv6, IPv6ExtHdrFragment, \
        IPv6ExtHdrHopByHop, Raw

    e = Ether(src="02:48:44:00:00:01", dst="02:48:44:00:00:02")
    return [bytes(p) for p in (
        e / IP(src="198.18.0.1", dst="198.18.0.2", options=b"\x01\x01\x01\x00") /
        TCP(sport=40000, dport=443, flags="S", options=[("MSS", 1460), ("NOP", None), ("WScale", 7)]),
        e / IP(src="198.18.0.1", dst="198.18.0.2") / TCP(sport=40000, dport=80, flags="PA") /
        Raw(b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n"),
        e / Dot1Q(vlan=7) / Dot1Q(vlan=8) / IP(src="198.18.0.1", dst="198.18.0.2") / UDP(sport=5000, dport=53) /
        DNS(id=7, rd=1, qd=DNSQR(qname="www.example.org")),
        e / IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment(offset=0, m=1) /
        UDP(sport=1, dport=2) / Raw(b"x" * 40),
        e / IP(src="198.18.0.1", dst="198.18.0.2") / ICMP(type=8) / Raw(b"ping"),
    )]


@pytest.fixture(scope="module")
def progs():
    out = []
    try:
        for extra in ([], ["-DHDRLOG_NO_DIRECT=1"]):
            bpf, fn = load(1 << 22, extra)
            outer = bpf[b"flow_maps"]
            for slot in (0, 1):
                outer[ctypes.c_int(slot)] = ctypes.c_int(bpf[f"flows{slot}".encode()].map_fd)
            bpf[b"conn_maps"][ctypes.c_int(0)] = ctypes.c_int(bpf[b"conns"].map_fd)
            cfg = bpf[b"cfg"]
            leaf = cfg.Leaf()
            leaf.mode, leaf.sample_n = 0, 1  # packets mode: one record per run
            cfg[cfg.Key(0)] = leaf
            out.append((bpf, fn, RingBufReader(bpf[b"records"].map_fd, records.RECORD_SIZE)))
        yield out
    finally:
        for bpf, _, reader in out:
            reader.close()
            bpf.cleanup()


def record(prog, frame: bytes) -> tuple[bytes, list]:
    _, fn, reader = prog
    bpfrun.test_run(fn.fd, frame, 1)
    raw, n, tails = reader.read(0)
    assert n == 1, n
    rec = bytearray(bytes(raw))
    rec[0:8] = bytes(8)  # mono_ns
    return bytes(rec), [t for _, t in tails]


def test_direct_and_helper_builds_agree_on_every_cut(progs):
    direct, helper = progs
    checked = 0
    for frame in frames():
        for k in range(len(frame), 13, -1):  # the kernel refuses test runs shorter than an Ethernet header
            cut = frame[:k]
            try:
                want = record(helper, cut)
            except OSError as e:  # ... and untagged IPv4/IPv6 ones shorter than the IP header
                assert e.errno == errno.EINVAL and k < 14 + 40, (k, e)
                break
            assert record(direct, cut) == want, f"frame cut at {k}: {cut.hex()}"
            checked += 1
    assert checked > 200
