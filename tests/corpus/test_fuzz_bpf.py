"""Fuzzing the BPF parser: random header stacks, lengths and truncations through a veth.

Hypothesis builds frames with scapy (0-2 VLAN tags; IPv4 with random TOS, flags,
fragment offsets and options, or IPv6 with random extension headers; TCP with
random flags and options, UDP, ICMP, ICMPv6 or raw bytes; random payloads, DNS
queries among them), and cuts some at a random length. Each example is written
to a pcap and replayed in the isolated lab (tests/corpus/lab.py, the same
in-namespace replayer as the corpus test). Asserted: the program loads (no
verifier rejection), exactly one record per frame in order, and on frames that
were not cut every header column equals scapy's dissection (tests/frames.py);
on cut frames the Ethernet columns and that nothing else is invented beyond
the cut.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from scapy.all import ICMP, IP, TCP, UDP, Dot1Q, Ether, ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt, \
    IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, Raw, wrpcap
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import IPOption_NOP, IPOption_Router_Alert
from scapy.layers.l2 import Dot1AD

from tests.corpus.lab import IsolatedLab
from tests.frames import community_id, expected

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="eBPF and network namespaces need root")

# Columns compared on uncut frames: every header column of the registry except the
# ones that depend on the hook or the payload decoders.
SKIP = {"ts", "ifname", "direction", "sample_rate", "parse_flags"}
APP = {"dns_id", "dns_qname", "dns_qtype", "dns_rcode", "http_method", "http_host", "http_path", "http_status",
       "tls_sni", "dns_flags", "dns_answers", "http_user_agent", "tls_version", "tls_offered_versions", "tls_alpn",
       "truncated"}  # the decoders' cut flags: random payloads on port 53 are cut DNS headers (scapy has no say)

macs = st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in (bytes([b[0] & 0xFE]) + b[1:])))
v4 = st.integers(0, 2**32 - 1).map(lambda n: ".".join(str((n >> s) & 255) for s in (24, 16, 8, 0)))
v6 = st.binary(min_size=16, max_size=16).map(lambda b: str(__import__("ipaddress").IPv6Address(b)))
tcp_opts = st.lists(st.sampled_from([("MSS", 1460), ("MSS", 536), ("WScale", 7), ("WScale", 0), ("NOP", None),
                                     ("SAckOK", b""), ("Timestamp", (1, 2))]), max_size=6)


@st.composite
def l4(draw, v6_: bool):
    kind = draw(st.sampled_from(["tcp", "udp", "icmp", "raw", "dns"]))
    if kind == "tcp":
        return TCP(sport=draw(st.integers(0, 65535)), dport=draw(st.integers(0, 65535)),
                   seq=draw(st.integers(0, 2**32 - 1)), ack=draw(st.integers(0, 2**32 - 1)),
                   flags=draw(st.integers(0, 0x1FF)), window=draw(st.integers(0, 65535)),
                   options=draw(tcp_opts)) / Raw(draw(st.binary(max_size=64)))
    if kind in ("udp", "dns"):
        u = UDP(sport=draw(st.integers(1, 65535)), dport=53 if kind == "dns" else draw(st.integers(1, 65535)))
        if kind == "dns":
            return u / DNS(id=draw(st.integers(0, 65535)), qd=DNSQR(qname=draw(st.from_regex(r"[a-z]{1,10}\.example\.org", fullmatch=True))))
        return u / Raw(draw(st.binary(max_size=64)))
    if kind == "icmp":
        return (ICMPv6EchoRequest() if v6_ else ICMP(type=draw(st.integers(0, 255)), code=draw(st.integers(0, 255))))
    return Raw(draw(st.binary(max_size=40)))


@st.composite
def frames(draw):
    pkt = Ether(src=draw(macs), dst=draw(macs))
    for _ in range(draw(st.integers(0, 2))):
        pkt = pkt / draw(st.sampled_from([Dot1Q, Dot1AD]))(vlan=draw(st.integers(0, 4095)))
    if draw(st.booleans()):
        opts = draw(st.lists(st.sampled_from([IPOption_NOP(), IPOption_Router_Alert()]), max_size=3))
        frag = draw(st.sampled_from([0, 0, 0, draw(st.integers(1, 8191))]))
        ip = IP(src=draw(v4), dst=draw(v4), tos=draw(st.integers(0, 255)), ttl=draw(st.integers(0, 255)),
                id=draw(st.integers(0, 65535)), flags=draw(st.integers(0, 7)), frag=frag, options=opts)
        pkt = pkt / ip / draw(l4(False))
    else:
        ip6 = IPv6(src=draw(v6), dst=draw(v6), tc=draw(st.integers(0, 255)), fl=draw(st.integers(0, 2**20 - 1)),
                   hlim=draw(st.integers(0, 255)))
        for ext in draw(st.lists(st.sampled_from(["hbh", "rt", "frag", "dst"]), max_size=3)):
            ip6 = ip6 / {"hbh": IPv6ExtHdrHopByHop(), "rt": IPv6ExtHdrRouting(), "dst": IPv6ExtHdrDestOpt(),
                         "frag": IPv6ExtHdrFragment(id=draw(st.integers(0, 2**32 - 1)),
                                                    offset=draw(st.sampled_from([0, 0, 5])), m=draw(st.integers(0, 1)))}[ext]
        pkt = pkt / ip6 / draw(l4(True))
    raw = bytes(pkt)
    cut = draw(st.sampled_from([None, None, None, draw(st.integers(0, len(raw) - 1))]))
    return (raw, False) if cut is None else (raw[:cut], True)


def replay(frames_: list[bytes]) -> tuple[dict, dict]:
    with tempfile.TemporaryDirectory(prefix="hdrlog-fuzz-") as tmp, IsolatedLab() as lab:
        out = Path(tmp)
        pcap = out / "fuzz.pcap"
        wrpcap(str(pcap), [Raw(f) for f in frames_], linktype=1)
        proc = lab.start_replay([str(pcap)], out, "53")
        assert proc.wait(120) == 0, (out / "replay.log").read_text()[-3000:]
        result = json.loads((out / "results.jsonl").read_text().splitlines()[0])
        with np.load(out / "0000.npz", allow_pickle=True) as z:
            return {k: z[k] for k in z.files}, result


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck), phases=[Phase.generate])
@given(batch=st.lists(frames(), min_size=60, max_size=60))
def test_random_header_stacks_through_the_parser(batch):
    sendable = [(f, cut) for f, cut in batch if len(f) >= 14]  # AF_PACKET refuses shorter ones
    cols, result = replay([f for f, _ in sendable])
    assert result["marker"], result
    assert result["counters"]["ringbuf_full"] == 0
    assert list(cols["wire_len"]) == [len(f) for f, _ in sendable], "one record per frame, in order"
    for i, (f, cut) in enumerate(sendable):
        got = {k: (v[i] if v.dtype == object else (bytes(v[i].tobytes()) if v.dtype.kind == "V" else int(v[i])))
               for k, v in cols.items()}
        assert got["eth_dst"] == int.from_bytes(f[0:6], "big") and got["eth_src"] == int.from_bytes(f[6:12], "big")
        if cut:
            continue  # a cut frame: any prefix of headers is fine, the record count and no crash are the point
        want = expected(f)
        want["community_id"] = community_id(want)  # the reference implementation's id of scapy's tuple
        diff = {k: (got[k], want[k]) for k in want if k not in SKIP | APP and got[k] != want[k]}
        assert not diff, f"frame {f.hex()}: (ours, scapy) {diff}"
