"""Issue 14 item 5, tunnels, through the real classifier: VXLAN, Geneve, GRE and IP-in-IP frames replayed onto a lab veth.

The capture tests/captures/tunnels-vxlan-geneve-gre-ipip.pcap (tests/captures/make_captures.py,
TUNNEL_CASES says what each frame is) is sent from inside a lab namespace into the monitored end
(clsact ingress). Every decapsulated row's inner addresses and ports, VNI / key and outer addresses
must agree with tshark's reading of the same file (the second IP layer of frame.protocols, its
fields' matching occurrence); the rows whose tunnel is cut, malformed or carries something else
keep the outer packet's fields. Then connections (auto mode) and flows (flows mode) of inner flows
keyed by the VNI, with each side's outer endpoint.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from scapy.all import DNS, DNSQR, DNSRR, IP, TCP, UDP, Ether, IPv6, Raw, rdpcap
from scapy.layers.vxlan import VXLAN

from hdrlog.collector import records
from hdrlog.collector.capture import Capture, CaptureConfig
from hdrlog.collector.connections import ConnConfig
from tests.captures.make_captures import TUNNEL_CASES
from tests.conncap import rows_of
from tests.frames import FAKE_SRC, mac_int, send_frames

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="eBPF and network namespaces need root")

PCAP = Path(__file__).resolve().parent / "captures" / "tunnels-vxlan-geneve-gre-ipip.pcap"
FIELDS = ["frame.protocols", "ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "tcp.srcport", "tcp.dstport", "udp.srcport",
          "udp.dstport", "vxlan.vni", "geneve.vni", "gre.key", "vlan.id", "dns.qry.name", "http.host"]


def tshark() -> list[dict[str, list[str]]]:
    out = subprocess.run(["tshark", "-r", str(PCAP), "-n", "-d", "udp.port==8472,vxlan", "-T", "fields",
                          "-E", "separator=|", "-E", "occurrence=a", "-E", "aggregator=;"]
                         + [a for f in FIELDS for a in ("-e", f)], capture_output=True, text=True, check=True)
    return [{f: (v.split(";") if v else []) for f, v in zip(FIELDS, line.split("|"))}
            for line in out.stdout.splitlines()]


def ours(cols, i) -> bool:
    return cols["direction"][i] == 1 and cols["eth_src"][i] == mac_int(FAKE_SRC)


def replay(lab, tmp_path, frames: list[bytes], want: int, host: str = "tun", **cfg) -> tuple[list[dict], Capture]:
    """Packet rows of our frames; the capture is stopped (its final connection rows wait in it)."""
    h = lab.add_host(host)
    cap = Capture(CaptureConfig(ifaces=[h.peer_ifname], **cfg))
    cap.start()
    try:
        send_frames(lab, h, frames, tmp_path)
        rows: list[dict] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(rows) < want:
            cols = cap.poll(100)
            if cols is not None:
                rows += rows_of(cols, ours)
        return rows, cap
    finally:
        cap.stop()


def inner_expected(t: dict[str, list[str]]) -> dict:
    """tshark's inner IP layer and transport ports: the second ip/ipv6 in frame.protocols, each field's
    occurrence counted among the layers of its kind before it."""
    layers = t["frame.protocols"][0].split(":")
    l3 = [i for i, name in enumerate(layers) if name in ("ip", "ipv6")]
    at = l3[1]
    kind = layers[at]
    k = layers[:at].count(kind)
    e = {"src_ip": t[f"{kind}.src"][k], "dst_ip": t[f"{kind}.dst"][k]}
    okind = layers[l3[0]]
    e["outer_src_ip"], e["outer_dst_ip"] = t[f"{okind}.src"][0], t[f"{okind}.dst"][0]
    l4 = layers[at + 1] if at + 1 < len(layers) else ""
    if l4 in ("tcp", "udp"):
        j = layers[:at + 1].count(l4)
        e["src_port"], e["dst_port"] = int(t[f"{l4}.srcport"][j]), int(t[f"{l4}.dstport"][j])
    return e


def test_tunnels_decapsulated_like_tshark_reads_them(lab, tmp_path):
    frames = [bytes(p) for p in rdpcap(str(PCAP))]
    assert len(frames) == len(TUNNEL_CASES)
    rows, _ = replay(lab, tmp_path, frames, len(frames))
    assert [r["wire_len"] for r in rows] == [len(f) for f in frames]
    ts = tshark()
    by = {}
    for (name, ttype, tid, decap), r, t in zip(TUNNEL_CASES, rows, ts):
        by[name] = r
        assert r["parse_flags"] & records.PARSE_TUNNEL, name
        assert (r["tunnel_type"], r["tunnel_id"]) == (ttype, tid), name
        assert bool(r["tunnel_flags"] & records.TUN_DECAP) == decap, (name, r["tunnel_flags"])
        # L2 stays the outer frame's (the link the packet crossed)
        assert r["eth_src"] == mac_int(FAKE_SRC), name
        if not decap:
            continue
        want = inner_expected(t)
        for k, v in want.items():
            assert r[k] == v, (name, k, r[k], v)
        assert r["ip_version"] == (6 if ":" in want["src_ip"] else 4), name
        ids = {"vxlan": t["vxlan.vni"], "geneve": t["geneve.vni"], "gre": t["gre.key"]}
        kind = records.TUNNEL_NAMES[ttype]
        if kind in ids:  # tshark's first one: the outer tunnel's (VNI decimal, Geneve and GRE key in hex)
            assert r["tunnel_id"] == (int(ids[kind][0], 0) if ids[kind] else 0), name
        else:
            assert r["tunnel_id"] == 0
    # the inner transport, all the way up: TCP flags and seq, app decoding of the inner payload
    assert (by["vxlan-syn"]["tcp_flags"], by["vxlan-syn"]["tcp_seq"], by["vxlan-syn"]["ip_proto"]) == (0x02, 1001, 6)
    assert by["vxlan-dns"]["dns_qname"] == "overlay2.example" == ts[1]["dns.qry.name"][0]
    assert (by["vxlan-http"]["http_host"], by["vxlan-http"]["http_path"]) == ("overlay.example.org", "/inner")
    assert by["vxlan-http"]["http_host"] == ts[12]["http.host"][0]
    assert by["vxlan-dns"]["community_id"] and by["vxlan-dns"]["community_id"] != by["vxlan-syn"]["community_id"]
    # an inner VLAN tag, and the lengths the connection tracker counts are the inner packet's
    assert by["vxlan-vlan-inner"]["tunnel_vlan_id"] == 333 == int(ts[8]["vlan.id"][0])
    assert by["vxlan-syn"]["vlan_id"] == 0 and by["vxlan-syn"]["tunnel_vlan_id"] == 0
    assert by["gre-teb-key-udp"]["udp_len"] == 16
    # one level: the tunnel inside the tunnel is flagged, not opened
    assert by["vxlan-nested"]["tunnel_flags"] & records.TUN_NESTED
    assert (by["vxlan-nested"]["src_ip"], by["vxlan-nested"]["dst_port"]) == ("198.18.251.15", 4789)
    # the outer packet kept, with the reason: no I flag, a header cut short, ARP inside, PPTP, inner IP cut
    for name, flag in (("vxlan-bad-flags", records.TUN_BAD), ("vxlan-cut", records.TUN_CUT),
                       ("vxlan-arp", records.TUN_OTHER), ("gre-pptp-v1", records.TUN_OTHER),
                       ("gre-inner-cut", records.TUN_CUT)):
        r = by[name]
        assert r["tunnel_flags"] & flag, (name, r["tunnel_flags"])
        assert (r["src_ip"], r["dst_ip"]) == ("198.18.250.2", "198.18.250.1") == (r["outer_src_ip"], r["outer_dst_ip"])
    assert (by["vxlan-cut"]["src_port"], by["vxlan-cut"]["dst_port"]) == (50017, 4789)
    assert by["gre-inner-cut"]["ip_proto"] == 47


def test_not_tunnelled_rows_have_no_tunnel_columns(lab, tmp_path):
    e = Ether(src=FAKE_SRC, dst="02:48:44:00:00:02")
    frames = [bytes(e / IP(src="198.18.250.2", dst="198.18.250.1") / TCP(sport=1234, dport=80, flags="A")),
              bytes(e / IPv6(src="2001:db8:fa::2", dst="2001:db8:fa::1") / UDP(sport=4789, dport=53))]
    rows, _ = replay(lab, tmp_path, frames, 2)
    assert len(rows) == 2
    for r in rows:
        assert not r["parse_flags"] & records.PARSE_TUNNEL
        assert (r["tunnel_type"], r["tunnel_id"], r["tunnel_flags"], r["outer_src_ip"]) == (0, 0, 0, "::")


A1, A2 = "198.18.250.2", "198.18.250.1"  # the two tunnel endpoints (VTEPs)


def vx(vni: int, outer_src: str, outer_dst: str, inner) -> bytes:
    return bytes(Ether(src=FAKE_SRC, dst="02:48:44:00:00:02") / IP(src=outer_src, dst=outer_dst)
                 / UDP(sport=49152 + vni % 1000, dport=4789) / VXLAN(vni=vni)
                 / Ether(src="02:48:44:00:01:01", dst="02:48:44:00:01:02") / inner)


def handshake(vni: int, data: bytes = b"") -> list[bytes]:
    """An inner TCP connection 198.18.251.1:40000 -> 198.18.251.2:443 in VNI `vni`: SYN from behind A1,
    SYN+ACK back from behind A2, ACK, FIN both ways. Tenants reuse addresses: every VNI the same."""
    c, s = dict(src="198.18.251.1", dst="198.18.251.2"), dict(src="198.18.251.2", dst="198.18.251.1")
    return [vx(vni, A1, A2, IP(**c) / TCP(sport=40000, dport=443, flags="S", seq=100)),
            vx(vni, A2, A1, IP(**s) / TCP(sport=443, dport=40000, flags="SA", seq=500, ack=101)),
            vx(vni, A1, A2, IP(**c) / TCP(sport=40000, dport=443, flags="A", seq=101, ack=501) / data),
            vx(vni, A1, A2, IP(**c) / TCP(sport=40000, dport=443, flags="FA", seq=101 + len(data), ack=501)),
            vx(vni, A2, A1, IP(**s) / TCP(sport=443, dport=40000, flags="FA", seq=501, ack=102 + len(data))),
            vx(vni, A1, A2, IP(**c) / TCP(sport=40000, dport=443, flags="A", seq=102 + len(data), ack=502))]


def test_connections_of_the_inner_flow_keyed_by_vni_with_outer_endpoints(lab, tmp_path):
    frames = handshake(100, b"x" * 10) + handshake(200, b"y" * 20)
    rows, cap = replay(lab, tmp_path, frames, 4, mode="auto", conn=ConnConfig(linger=0.0))
    conns = [r for r in rows_of(cap.drain_connections()) if r["resp_port"] == 443]
    assert len(conns) == 2, conns  # the same inner 5-tuple in two VNIs: two connections
    by = {c["tunnel_id"]: c for c in conns}
    assert sorted(by) == [100, 200]
    for vni, sent in ((100, 10), (200, 20)):
        c = by[vni]
        assert (c["orig_ip"], c["orig_port"], c["resp_ip"], c["resp_port"]) == ("198.18.251.1", 40000, "198.18.251.2", 443)
        assert (c["tunnel_type"], c["outer_orig_ip"], c["outer_resp_ip"]) == (records.TUNNEL_VXLAN, A1, A2)
        assert (c["conn_state"], c["orig_pkts"], c["resp_pkts"], c["orig_bytes"]) == ("SF", 4, 2, sent)
        assert c["history"] == "ShDFfA", c["history"]
        # IP bytes are the inner packets' (what the tenant's hosts sent), not the outer ones
        assert c["orig_ip_bytes"] == 4 * 40 + sent
    assert by[100]["uid"] != by[200]["uid"] and by[100]["community_id"] == by[200]["community_id"]
    # the packet rows of the first packets carry the same tunnel columns
    syn = [r for r in rows if r["tcp_flags"] == 0x02]
    assert sorted(r["tunnel_id"] for r in syn) == [100, 200]
    assert all((r["outer_src_ip"], r["outer_dst_ip"]) == (A1, A2) for r in syn)


def test_connection_flipped_by_a_first_syn_ack_keeps_the_originators_outer_side(lab, tmp_path):
    frames = handshake(300)[1:]  # the SYN+ACK first: Zeek flips the roles, the originator is the client
    _, cap = replay(lab, tmp_path, frames, 1, mode="auto", conn=ConnConfig(linger=0.0))
    (c,) = [r for r in rows_of(cap.drain_connections()) if r["resp_port"] == 443]
    assert c["history"].startswith("^") and (c["orig_ip"], c["resp_ip"]) == ("198.18.251.1", "198.18.251.2")
    assert (c["outer_orig_ip"], c["outer_resp_ip"], c["tunnel_id"]) == (A1, A2, 300)


def test_flows_of_the_inner_flow_keyed_by_vni(lab, tmp_path):
    frames = handshake(100)[:1] * 3 + handshake(200)[:1] * 2
    h = lab.add_host("tunf")
    cap = Capture(CaptureConfig(ifaces=[h.peer_ifname], mode="flows"))
    cap.start()
    try:
        send_frames(lab, h, frames, tmp_path)
        time.sleep(0.3)
        flows = rows_of(cap.drain_flows())
    finally:
        cap.stop()
    got = sorted((f["tunnel_type"], f["tunnel_id"], f["src_ip"], f["dst_port"], f["packets"]) for f in flows
                 if f["dst_port"] == 443)
    assert got == [(1, 100, "198.18.251.1", 443, 3), (1, 200, "198.18.251.1", 443, 2)]


def test_tenants_with_one_inner_tuple_keep_their_own_names(lab, tmp_path):
    """Two VNIs, the same inner 5-tuples: each tenant's DNS query and answer (same id, same resolver, a
    different name for the same address), then each one's ClientHello over two segments, interleaved
    (A's first, B's first, A's second, B's second; the same sequence numbers). Every piece of state
    that joins packets -- the kernel's continuation map, the hello reassembly, DNS query -> response,
    passive DNS, the connection's first SNI / JA4 -- is per tunnel: no tenant gets the other's."""
    from tests import gapframes as gf

    c, s, r = "198.18.251.1", "198.18.251.2", "198.18.251.53"
    cut = 1200  # the first segment: the hello goes on (its SNI is past byte 1,500); fits the veth's MTU
    tenants = {100: "a.tenant.example", 200: "b.tenant.example"}
    hellos = {vni: gf.pq_client_hello(sni=name) for vni, name in tenants.items()}
    frames: list[bytes] = []
    for vni, name in tenants.items():  # each tenant's client asks the same resolver, with the same id
        frames.append(vx(vni, A1, A2, IP(src=c, dst=r) / UDP(sport=5555, dport=53)
                         / DNS(id=0x4242, rd=1, qd=DNSQR(qname=name))))
    for vni, name in reversed(tenants.items()):  # answered the other way round
        frames.append(vx(vni, A2, A1, IP(src=r, dst=c) / UDP(sport=53, dport=5555)
                         / DNS(id=0x4242, qr=1, rd=1, ra=1, qd=DNSQR(qname=name),
                               an=DNSRR(rrname=name, type="A", ttl=60, rdata=s))))
    for vni in tenants:
        frames += handshake(vni)[:3]  # SYN, SYN+ACK, ACK: seq 101 next
    for part in (0, 1):
        for vni, hello in hellos.items():
            data = hello[:cut] if part == 0 else hello[cut:]
            frames.append(vx(vni, A1, A2, IP(src=c, dst=s) / TCP(sport=40000, dport=443, flags="PA",
                                                                 seq=101 + part * cut, ack=501) / Raw(data)))
    rows, cap = replay(lab, tmp_path, frames, len(frames), mode="auto", conn=ConnConfig(linger=0.0))
    counters = cap.counters()
    dns = [x for x in rows if x["src_port"] == 53]
    assert sorted((x["tunnel_id"], x["dns_qname"]) for x in dns) == sorted(tenants.items())
    assert counters["dns_rtt_matched"] == 2, counters  # each answer found its own tenant's query
    hello_rows = [x for x in rows if x["dst_port"] == 443 and x["tcp_flags"] & 0x08]
    assert len(hello_rows) == 4, hello_rows
    done = {x["tunnel_id"]: x for x in hello_rows if x["tls_sni"]}
    assert {vni: x["tls_sni"] for vni, x in done.items()} == tenants  # on the second segments
    assert counters["tls_reassembled"] == 2 and counters["tls_reassembly_mismatched"] == 0, counters
    assert done[100]["ja4"] and done[100]["ja4"] == done[200]["ja4"]  # same hello shape, different SNI
    conns = [x for x in rows_of(cap.drain_connections()) if x["resp_port"] == 443]
    by = {x["tunnel_id"]: x for x in conns if x["final"]}
    assert sorted(by) == [100, 200], conns
    for vni, name in tenants.items():
        assert (by[vni]["tls_sni"], by[vni]["resp_name"], by[vni]["tls_alpn"]) == (name, name, "h2,http/1.1"), by[vni]
    # passive DNS rows: one per tenant's client, with its tunnel
    names = rows_of(cap.drain_dns_names())
    assert sorted((x["tunnel_type"], x["tunnel_id"], x["client_ip"], x["name"], x["address"]) for x in names) == \
        [(records.TUNNEL_VXLAN, vni, c, name, s) for vni, name in sorted(tenants.items())]


def test_tunnel_ports_and_types_are_the_configured_ones(lab, tmp_path):
    """VXLAN on a custom port is opened only when vxlan_ports names it; Geneve likewise; tunnels=[]
    opens nothing (every row the outer packet's, no extension), tunnels=['gre'] only GRE."""
    from scapy.all import GRE
    from scapy.contrib.geneve import GENEVE

    inner = Ether(src="02:48:44:00:01:01", dst="02:48:44:00:01:02") / IP(src="198.18.251.1", dst="198.18.251.2") \
        / TCP(sport=40000, dport=443, flags="S", seq=100)
    outer = Ether(src=FAKE_SRC, dst="02:48:44:00:00:02") / IP(src=A1, dst=A2)
    frames = [bytes(outer / UDP(sport=49152, dport=14789) / VXLAN(vni=7) / inner),   # custom VXLAN port
              bytes(outer / UDP(sport=49153, dport=16081) / GENEVE(vni=8, proto=0x6558) / inner),  # custom Geneve
              bytes(outer / UDP(sport=49154, dport=4789) / VXLAN(vni=9) / inner),    # the default VXLAN port
              bytes(outer / GRE(key_present=1, key=10, proto=0x6558) / inner)]       # GRE with a key

    def opened(host: str, **cfg) -> list[int]:
        rows, _ = replay(lab, tmp_path, frames, len(frames), host, **cfg)
        assert [r["wire_len"] for r in rows] == [len(f) for f in frames], cfg
        for r in rows:
            if not r["tunnel_flags"] & records.TUN_DECAP:
                assert r["src_ip"] == A1 and r["dst_port"] in (0, 14789, 16081, 4789), (cfg, r)
        return [r["tunnel_id"] if r["tunnel_flags"] & records.TUN_DECAP else 0 for r in rows]

    assert opened("tp0") == [0, 0, 9, 10]  # the defaults: 4789 and 8472, 6081, GRE
    assert opened("tp1", vxlan_ports=[4789, 14789], geneve_ports=[16081]) == [7, 8, 9, 10]
    assert opened("tp2", vxlan_ports=[14789], tunnels=["vxlan", "gre"]) == [7, 0, 0, 10]
    rows, _ = replay(lab, tmp_path, frames, len(frames), "tp3", tunnels=[])
    assert [(r["parse_flags"] & records.PARSE_TUNNEL, r["tunnel_type"], r["src_ip"]) for r in rows] == [(0, 0, A1)] * 4
