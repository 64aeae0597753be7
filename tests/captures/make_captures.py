"""Write the issue-14 captures in this folder (scapy): ``.venv/bin/python -m tests.captures.make_captures``.

Every frame comes from tests/gapframes.py, between 198.18.250.2 and 198.18.250.1
(2001:db8:fa::2 / ::1), source MAC 02:48:44:00:00:01 (tests.frames.FAKE_SRC), so
the capture tests can replay them onto a lab veth and tell them from kernel chatter.
Deterministic: the same bytes on every run (fixed timestamps, no randomness).
"""

from __future__ import annotations

import struct
from pathlib import Path

import sys

from scapy.all import DNS, DNSQR, GRE, IP, TCP, UDP, Dot1Q, Ether, IPv6, Raw, wrpcap
from scapy.layers.l2 import Dot1AD
from scapy.layers.vxlan import VXLAN

from tests import gapframes as gf

HERE = Path(__file__).resolve().parent
SRC_MAC, DST_MAC = "02:48:44:00:00:01", "02:48:44:00:00:02"
A4, B4, A6, B6 = "198.18.250.2", "198.18.250.1", "2001:db8:fa::2", "2001:db8:fa::1"
MSS = 1448  # a full segment's payload (1500 MTU, TCP timestamps)


def _eth():
    return Ether(src=SRC_MAC, dst=DST_MAC)


def pq_tls() -> list[bytes]:
    """A browser-sized ClientHello over two segments, a whole ServerHello over 1,024 bytes, and odd hellos."""
    hello = gf.pq_client_hello()
    seq = 0x10000000
    one = _eth() / IP(src=A4, dst=B4) / TCP(sport=50443, dport=443, flags="PA", seq=seq, ack=1) / Raw(hello[:MSS])
    two = _eth() / IP(src=A4, dst=B4) / TCP(sport=50443, dport=443, flags="PA", seq=seq + MSS, ack=1) / Raw(hello[MSS:])
    sh = _eth() / IP(src=A4, dst=B4) / TCP(sport=443, dport=50443, flags="PA", seq=7, ack=seq + len(hello)) \
        / Raw(gf.pq_server_hello())
    one_seg = _eth() / IPv6(src=A6, dst=B6) / TCP(sport=50444, dport=443, flags="PA", seq=5, ack=1) \
        / Raw(gf.single_segment_hello())
    noext = _eth() / IP(src=A4, dst=B4) / TCP(sport=50445, dport=443, flags="PA") / Raw(gf.hello_without_extensions())
    badext = _eth() / IP(src=A4, dst=B4) / TCP(sport=50446, dport=443, flags="PA") / Raw(gf.hello_ending_inside_ciphers())
    return [bytes(f) for f in (one, two, sh, one_seg, noext, badext)]


def webdav() -> list[bytes]:
    reqs = gf.WEBDAV + [gf.TOKEN_METHOD, gf.BARE_LF, gf.SCANNER_GET]
    return [bytes(_eth() / IP(src=A4, dst=B4) / TCP(sport=51000 + i, dport=80, flags="PA", seq=1000, ack=1) / Raw(r))
            for i, r in enumerate(reqs)]


def qinqinq() -> list[bytes]:
    """Three, four and five tags (802.1ad outer, 802.1Q inside) around IPv4/UDP and IPv6/TCP."""
    ip4 = IP(src=A4, dst=B4) / UDP(sport=52001, dport=4789) / Raw(b"q" * 8)
    ip6 = IPv6(src=A6, dst=B6) / TCP(sport=52002, dport=8080, flags="S", seq=99)
    return [bytes(f) for f in (
        _eth() / Dot1AD(vlan=100) / Dot1Q(vlan=200) / Dot1Q(vlan=300) / ip4,
        _eth() / Dot1AD(vlan=101) / Dot1Q(vlan=201) / Dot1Q(vlan=301) / Dot1Q(vlan=401) / ip6,
        _eth() / Dot1AD(vlan=102) / Dot1AD(vlan=202) / Dot1Q(vlan=302) / Dot1Q(vlan=402) / Dot1Q(vlan=502) / ip4,
    )]


def dns_long() -> list[bytes]:
    """A 255-octet name (DNS's limit), one past it with dots inside labels, a 2-byte cut header, and a
    255-octet name of dotted labels (373 characters escaped: cut mid-escape before issue 14)."""
    udp = lambda sport: _eth() / IP(src=A4, dst=B4) / UDP(sport=sport, dport=53)  # noqa: E731
    return [bytes(udp(53001) / Raw(gf.dns_long_name_query(over=False))),
            bytes(udp(53002) / Raw(gf.dns_long_name_query(over=True))),
            bytes(udp(53003) / Raw(struct.pack("!H", 0x4444))),
            bytes(udp(53004) / Raw(gf.dns_dotted_name_query()))]


# Frames of tunnels-vxlan-geneve-gre-ipip.pcap, in order, and what the classifier makes of them
# (tests/test_capture_tunnels.py): (name, tunnel_type, tunnel_id, decapsulated?).
TUNNEL_CASES = [
    ("vxlan-syn", 1, 4242, True), ("vxlan-dns", 1, 4242, True), ("geneve-teb-syn", 2, 77, True),
    ("gre-key-ip", 3, 9, True), ("ipip", 4, 0, True), ("vxlan-ipv6-outer", 1, 4243, True),
    ("geneve-options-ip", 2, 78, True), ("gre-csum-key-seq-ipv6", 3, 0x0A0B0C0D, True),
    ("vxlan-vlan-inner", 1, 4244, True), ("gre-teb-key-udp", 3, 11, True), ("ipv6-in-ipv4", 4, 0, True),
    ("ipv4-in-ipv6", 4, 0, True), ("vxlan-http", 1, 4245, True), ("vxlan-8472", 1, 8472, True),
    ("vxlan-nested", 1, 4246, True), ("gre-wccp2", 3, 0, True), ("vxlan-bad-flags", 1, 0, False),
    ("vxlan-cut", 1, 0, False),
    ("vxlan-arp", 1, 4247, False), ("gre-pptp-v1", 3, 0, False), ("gre-inner-cut", 3, 12, False),
]


def tunnels() -> list[bytes]:
    """Overlay traffic (TUNNEL_CASES): VXLAN (VNI 4242 over IPv4, 4243 over IPv6), Geneve (VNI 77 with
    Ethernet, 78 with options and IPv4 directly), GRE (key 9; checksum + key + sequence around IPv6;
    TEB with a key), IP-in-IP both ways, a VLAN-tagged inner frame, HTTP and DNS inside (app decoding
    of the inner payload), Linux's VXLAN port 8472, a tunnel inside a tunnel, and the ones whose outer
    packet is kept: VXLAN without the I flag, a VXLAN header cut short, ARP inside VXLAN, PPTP's GRE
    version 1, an inner IPv4 header cut short. Inner addresses 198.18.251.0/24, 2001:db8:fb::/64."""
    from scapy.contrib.geneve import GENEVE, GeneveOptions
    from scapy.layers.l2 import ARP

    inner = lambda n: (IP(src=f"198.18.251.{n}", dst="198.18.251.100") /  # noqa: E731
                       TCP(sport=41000 + n, dport=443, flags="S", seq=1000 + n))
    inner6 = lambda n: (IPv6(src=f"2001:db8:fb::{n}", dst="2001:db8:fb::100") /  # noqa: E731
                        TCP(sport=41000 + n, dport=443, flags="S", seq=1000 + n))
    dns = lambda n: (IP(src=f"198.18.251.{n}", dst="198.18.251.53") / UDP(sport=42000 + n, dport=53) /  # noqa: E731
                     DNS(id=n, rd=1, qd=DNSQR(qname=f"overlay{n}.example")))
    ieth = Ether(src="02:48:44:00:01:01", dst="02:48:44:00:01:02")
    outer = lambda: _eth() / IP(src=A4, dst=B4)  # noqa: E731
    outer6 = lambda: _eth() / IPv6(src=A6, dst=B6)  # noqa: E731
    http = (IP(src="198.18.251.13", dst="198.18.251.80") / TCP(sport=41013, dport=80, flags="PA", seq=7, ack=1)
            / Raw(b"GET /inner HTTP/1.1\r\nHost: overlay.example.org\r\nUser-Agent: vx/1\r\n\r\n"))
    nested = outer() / UDP(sport=50015, dport=4789) / VXLAN(vni=9999) / ieth / inner(15)
    pptp = bytes.fromhex("3001880b") + struct.pack("!HHI", 8, 0x1234, 1) + b"\xff\x03\x00\x21" + b"p" * 4
    cut_ip = bytes(inner(20))[:12]
    frames = [
        outer() / UDP(sport=50001, dport=4789) / VXLAN(vni=4242) / ieth / inner(1),
        outer() / UDP(sport=50002, dport=4789) / VXLAN(vni=4242) / ieth / dns(2),
        outer() / UDP(sport=50003, dport=6081) / GENEVE(vni=77, proto=0x6558) / ieth / inner(3),
        outer() / GRE(key_present=1, key=9, proto=0x0800) / inner(4),
        outer() / inner(5),  # IP-in-IP (protocol 4)
        outer6() / UDP(sport=50006, dport=4789) / VXLAN(vni=4243) / ieth / inner(6),
        outer() / UDP(sport=50007, dport=6081) / GENEVE(vni=78, proto=0x0800, options=[
            GeneveOptions(classid=0x0102, type=0x80, data=b"\x00\x11\x22\x33\x44\x55\x66\x77")]) / inner(7),
        outer() / GRE(chksum_present=1, key_present=1, seqnum_present=1, key=0x0A0B0C0D, seqence_number=5,
                      proto=0x86DD) / inner6(8),
        outer() / UDP(sport=50009, dport=4789) / VXLAN(vni=4244) / ieth / Dot1Q(vlan=333) / inner(9),
        outer() / GRE(key_present=1, key=11, proto=0x6558) / ieth /
        (IP(src="198.18.251.10", dst="198.18.251.53") / UDP(sport=42010, dport=5000) / Raw(b"u" * 8)),
        outer() / inner6(11),  # IPv6 in IPv4 (protocol 41)
        outer6() / inner(12),  # IPv4 in IPv6 (next header 4)
        outer() / UDP(sport=50013, dport=4789) / VXLAN(vni=4245) / ieth / http,
        outer() / UDP(sport=50014, dport=8472) / VXLAN(vni=8472) / ieth / inner(14),
        outer() / UDP(sport=50015, dport=4789) / VXLAN(vni=4246) / ieth /
        IP(src="198.18.251.15", dst="198.18.251.16") / UDP(sport=50115, dport=4789) / VXLAN(vni=9999) / ieth / inner(15),
        outer() / GRE(proto=0x883E) / Raw(bytes.fromhex("02000000")) / inner(21),  # WCCPv2 redirect header
        outer() / UDP(sport=50016, dport=4789) / VXLAN(flags=0x00, vni=0) / ieth / inner(16),
        outer() / UDP(sport=50017, dport=4789) / Raw(b"\x08\x00\x00\x00"),
        outer() / UDP(sport=50018, dport=4789) / VXLAN(vni=4247) / ieth /
        ARP(psrc="198.18.251.18", pdst="198.18.251.1", hwsrc="02:48:44:00:01:01"),
        outer() / Raw(pptp),
        outer() / GRE(key_present=1, key=12, proto=0x0800) / Raw(cut_ip),
    ]
    frames[-2][IP].proto = 47
    del nested
    assert len(frames) == len(TUNNEL_CASES)
    return [bytes(f) for f in frames]


def quic_initial() -> list[bytes]:
    """A real QUIC v1 client Initial (aioquic; SNI quic.example.org, ALPN h3) to B4:443. Random
    (connection id, key share): rewritten only with --random, and then decodes the same."""
    import time

    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    c = QuicConnection(configuration=QuicConfiguration(is_client=True, server_name="quic.example.org",
                                                       alpn_protocols=["h3"]))
    c.connect((B4, 443), now=time.time())
    return [bytes(_eth() / IP(src=A4, dst=B4) / UDP(sport=50443, dport=443) / Raw(d))
            for d, _ in c.datagrams_to_send(now=time.time())]


CAPTURES = {"tls-pq-hello-2seg.pcap": pq_tls, "http-webdav.pcap": webdav, "qinqinq.pcap": qinqinq,
            "dns-long-name.pcap": dns_long, "tunnels-vxlan-geneve-gre-ipip.pcap": tunnels}
RANDOM = {"quic-initial.pcap": quic_initial}  # not byte-for-byte reproducible: only with --random


def packets(name: str) -> list[bytes]:
    return {**CAPTURES, **RANDOM}[name]()


def main() -> None:
    todo = dict(CAPTURES, **(RANDOM if "--random" in sys.argv[1:] else {}))
    for name, build in todo.items():
        frames = [Ether(f) for f in build()]
        for i, f in enumerate(frames):
            f.time = 1_780_000_000 + i / 1000
        wrpcap(str(HERE / name), frames)
        print(name, len(frames), "frames")


if __name__ == "__main__":
    main()
