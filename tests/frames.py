"""Scripted frames and what each should become: shared by the capture and end-to-end tests.

Frames are built with scapy and sent raw (AF_PACKET, like scapy's sendp) from inside
a lab namespace. ``expected`` derives every registry column from scapy's dissection
of the frame (an independent dissector), outermost headers only.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import time

from scapy.all import (
    ARP,
    ICMP,
    IP,
    TCP,
    UDP,
    Dot1Q,
    Ether,
    ICMPv6EchoRequest,
    IPerror,
    IPOption_Router_Alert,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    Raw,
    UDPerror,
    fragment,
)
from scapy.layers.l2 import Dot1AD

from hdrlog.collector import appheaders, records
from hdrlog.proto.columns import PACKETS

FAKE_SRC = "02:48:44:00:00:01"  # source MAC of every scripted frame: tells them from kernel chatter
IGNORED_FLAGS = records.PARSE_VLAN_ACCEL  # depends on where the kernel put the tag, not on the frame

SEND = """
import json, socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
for h in json.load(open(sys.argv[1])):
    s.send(bytes.fromhex(h))
"""


# -- helpers ---------------------------------------------------------------------


def mac_int(mac: str) -> int:
    return int(mac.replace(":", ""), 16)


def v16(addr: str) -> bytes:
    ip = ipaddress.ip_address(addr)
    if ip.version == 4:
        return b"\0" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def expected(frame: bytes) -> dict:
    """Registry columns for one frame, from scapy's dissection (outermost headers only)."""
    e = {c.name: ("" if c.is_string else b"\0" * 16 if c.dtype == "V16" else 0) for c in PACKETS}
    p = Ether(frame)
    e.update(wire_len=len(frame), eth_src=mac_int(p.src), eth_dst=mac_int(p.dst), sample_rate=1, direction=1)
    etype, layer = p.type, p.payload
    tags = []
    while type(layer) in (Dot1Q, Dot1AD):
        tags.append(layer.vlan)
        etype, layer = layer.type, layer.payload
    if tags:
        e["vlan_id"] = tags[0]
    if len(tags) >= 2:
        e["vlan_inner_id"] = tags[-1]
    e["eth_type"] = etype
    flags = 0
    l4 = None
    if type(layer) is IP:
        ip = layer
        e.update(
            ip_version=4, src_ip=v16(ip.src), dst_ip=v16(ip.dst), ip_proto=ip.proto, ttl=ip.ttl,
            dscp=ip.tos >> 2, ecn=ip.tos & 3, ip_id=ip.id, frag_offset=ip.frag,
            more_fragments=int(ip.flags.MF), dont_fragment=int(ip.flags.DF),
        )
        if ip.frag:
            flags |= records.PARSE_NONFIRST_FRAG
        else:
            l4 = ip.payload
    elif type(layer) is IPv6:
        ip6 = layer
        e.update(
            ip_version=6, src_ip=v16(ip6.src), dst_ip=v16(ip6.dst), ttl=ip6.hlim,
            dscp=ip6.tc >> 2, ecn=ip6.tc & 3, flow_label=ip6.fl,
        )
        nh, layer = ip6.nh, ip6.payload
        frag = 0
        while type(layer) in (IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, IPv6ExtHdrFragment, IPv6ExtHdrDestOpt):
            if type(layer) is IPv6ExtHdrFragment:
                frag = layer.offset
                e.update(ip_id=layer.id, frag_offset=layer.offset, more_fragments=layer.m)
            nh, layer = layer.nh, layer.payload
        e["ip_proto"] = nh
        if frag:
            flags |= records.PARSE_NONFIRST_FRAG
        else:
            l4 = layer
    if l4 is not None:
        if type(l4) is TCP:
            e.update(
                src_port=l4.sport, dst_port=l4.dport, tcp_seq=l4.seq, tcp_ack=l4.ack,
                tcp_flags=int(l4.flags), tcp_window=l4.window,
            )
            for name, val in l4.options:
                if name == "MSS":
                    e["tcp_mss"] = val
                elif name == "WScale":
                    e["tcp_wscale"] = val
                    flags |= records.PARSE_TCP_WSCALE
        elif type(l4) is UDP:
            e.update(src_port=l4.sport, dst_port=l4.dport, udp_len=l4.len)
        elif type(l4) is ICMP:
            e.update(icmp_type=l4.type, icmp_code=l4.code)
        elif l4.name.startswith("ICMPv6"):
            e.update(icmp_type=l4.type, icmp_code=l4.code)
    e["parse_flags"] = flags
    return e


def community_id(e: dict) -> str:
    """The reference Community ID (PyPI ``communityid``, Corelight's) of a row's expected columns: the
    collector's rule (collector/records.py community_id_column) is '' for non-IP, other protocols, and
    packets whose tuple the parser could not read (fragments after the first, headers cut short)."""
    import communityid as ref

    if not e["ip_version"] or e["ip_proto"] not in (1, 6, 17, 58, 132) or e["parse_flags"] & records._NO_TUPLE:
        return ""
    icmp = e["ip_proto"] in (1, 58)
    sport, dport = (e["icmp_type"], e["icmp_code"]) if icmp else (e["src_port"], e["dst_port"])

    def text(a: bytes) -> str:
        ip = ipaddress.IPv6Address(a)
        return str(ip.ipv4_mapped or ip) if e["ip_version"] == 4 else str(ip)

    return ref.CommunityID(seed=0).calc(ref.FlowTuple(e["ip_proto"], text(e["src_ip"]), text(e["dst_ip"]), sport, dport))


def send_frames(lab, host, frames: list[bytes], tmp_path) -> None:
    path = tmp_path / "frames.json"
    path.write_text(json.dumps([f.hex() for f in frames]))
    lab.run(host, sys.executable, "-c", SEND, str(path))


def sent_rows(cap, n: int, keep, timeout: float = 5.0) -> list[dict]:
    """Poll the Capture ``cap`` until ``n`` ingress rows from FAKE_SRC are in (or ``timeout``): the columns
    ``keep(name)`` accepts, strings as they are and numbers as ints."""
    rows: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(rows) < n:
        cols = cap.poll(100)
        if cols is None:
            continue
        for i in range(len(cols["ts"])):
            if cols["direction"][i] == 1 and cols["eth_src"][i] == mac_int(FAKE_SRC):
                rows.append({k: (v[i] if isinstance(v, list) else int(v[i])) for k, v in cols.items() if keep(k)})
    return rows


def scripted_frames(h) -> list[tuple[str, bytes, dict]]:
    """(name, frame, columns that scapy's dissection cannot tell) for every case."""
    eth = Ether(src=FAKE_SRC, dst=h.peer_mac)
    ip4 = dict(src=h.addr4, dst=h.peer_addr4)
    ip6 = dict(src=h.addr6, dst=h.peer_addr6)
    syn_opts = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (12345, 0)), ("NOP", None), ("WScale", 7)]
    frags = fragment(IP(id=0xBEEF, ttl=33, **ip4) / UDP(sport=5300, dport=5354) / Raw(b"z" * 1200), fragsize=800)
    assert len(frags) == 2
    trunc_tcp = bytes(TCP(sport=4321, dport=80, seq=0x01020304, ack=0x0A0B0C0D, flags="A"))[:12]
    cases = [
        ("tcp4-syn-opts", eth / IP(tos=0xB9, ttl=61, id=777, flags="DF", **ip4)
         / TCP(sport=40001, dport=443, seq=0xDEADBEEF, flags="S", window=64240, options=syn_opts), {}),
        ("tcp6-syn-opts", eth / IPv6(tc=0x2A, fl=0xABCDE, hlim=44, **ip6)
         / TCP(sport=40002, dport=8443, seq=1, flags="SEC", window=65535, options=[("MSS", 1220), ("WScale", 0)]), {}),
        ("tcp4-all-flags", eth / IP(**ip4) / TCP(sport=1, dport=2, seq=3, ack=4, flags=0x1FF, window=5), {}),
        # 5 bytes to the DNS port: a header cut short still gives its id and flags, flagged (issue 14).
        ("udp4", eth / IP(ttl=7, **ip4) / UDP(sport=5000, dport=53) / Raw(b"hello"),
         dict(dns_id=0x6865, dns_flags=0x6C6C, dns_rcode=0xC, truncated=appheaders.TRUNC_DNS_HEADER)),
        ("icmp4-echo", eth / IP(**ip4) / ICMP(type=8, code=0, id=9, seq=1) / Raw(b"ping"), {}),
        ("icmp4-unreach", eth / IP(**ip4) / ICMP(type=3, code=3)
         / IPerror(src=h.peer_addr4, dst=h.addr4, ttl=2) / UDPerror(sport=999, dport=33434), {}),
        ("icmp6-echo", eth / IPv6(**ip6) / ICMPv6EchoRequest(id=1, seq=2), {}),
        ("ipv6-exthdrs", eth / IPv6(fl=5, **ip6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting()
         / IPv6ExtHdrFragment(id=0x12345678, offset=0, m=1) / IPv6ExtHdrDestOpt() / UDP(sport=7, dport=8) / Raw(b"x" * 16), {}),
        ("vlan-8021q", eth / Dot1Q(vlan=42, prio=5) / IP(**ip4) / UDP(sport=1111, dport=2222), {}),
        ("qinq-8021ad", eth / Dot1AD(vlan=100) / Dot1Q(vlan=200) / IP(**ip4) / TCP(sport=3333, dport=4444, flags="S"), {}),
        ("ipv4-frag-1", eth / frags[0], {}),
        ("ipv4-frag-2", eth / frags[1], {}),
        ("tcp4-truncated", eth / IP(proto=6, **ip4) / Raw(trunc_tcp),
         dict(src_port=4321, dst_port=80, tcp_seq=0x01020304, tcp_ack=0x0A0B0C0D, parse_flags=records.PARSE_TRUNC_L4)),
        ("arp", Ether(src=FAKE_SRC, dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc=FAKE_SRC, psrc=h.addr4, pdst="198.18.255.254"), {}),
        ("ipv4-options", eth / IP(options=[IPOption_Router_Alert()], **ip4) / UDP(sport=6000, dport=6001), {}),
        # Beyond the acceptance list: oddities the parser must survive.
        ("ipv6-frag-2", eth / IPv6(**ip6) / IPv6ExtHdrFragment(nh=17, offset=100, m=0, id=77) / Raw(b"y" * 24), {}),
        ("three-tags", eth / Dot1AD(vlan=10) / Dot1Q(vlan=20) / Dot1Q(vlan=30) / IP(**ip4) / UDP(sport=10, dport=20), {}),
        ("ipv4-bad-ihl", eth / IP(ihl=4, proto=17, **ip4) / Raw(bytes(UDP(sport=1, dport=2))),
         dict(src_port=0, dst_port=0, udp_len=0, parse_flags=records.PARSE_BAD_IHL)),
        ("tcp-bad-doff", eth / IP(**ip4) / TCP(sport=5, dport=6, dataofs=4, flags="S"),
         dict(parse_flags=records.PARSE_BAD_TCP_DOFF)),
        ("ipv6-truncated", Ether(src=FAKE_SRC, dst=h.peer_mac, type=0x86DD)
         / Raw(bytes(IPv6(nh=6, hlim=9, **ip6))[:30]),
         dict(ip_version=6, ttl=9, ip_proto=6, src_ip=v16(h.addr6), parse_flags=records.PARSE_TRUNC_L3)),
        ("tcp-bad-option-len", eth / IP(proto=6, **ip4)
         / Raw(bytes(TCP(sport=7, dport=8, flags="S", dataofs=6)) + b"\x01\x02\x01\x00"),
         dict(tcp_mss=0, parse_flags=records.PARSE_BAD_TCP_OPT)),
    ]
    out = []
    for name, pkt, extra in cases:
        frame = bytes(pkt)
        assert len(frame) <= 1514, name
        out.append((name, frame, extra))
    return out
