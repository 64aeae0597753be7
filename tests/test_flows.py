"""Logging at line rate on real eBPF: flows, auto mode, filters, sampling, counted loss.

Frames are built with scapy and sent raw from a lab namespace into the monitored
veth end (as in test_capture.py); every frame carries FAKE_SRC and an address of
the lab host, so kernel chatter on the link is told apart by address.
"""

from __future__ import annotations

import os
import subprocess
import time

import numpy as np
import pytest
from scapy.all import IP, TCP, UDP, Ether, IPv6, Raw
from scapy.layers.dns import DNS, DNSQR

from hdrlog.collector.capture import Capture, CaptureConfig
from hdrlog.collector.filters import FilterError, parse_rules
from tests.frames import FAKE_SRC, send_frames, v16

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="eBPF and network namespaces need root")


@pytest.fixture
def host(lab):
    return lab.add_host("flw")


def eth(host):
    return Ether(src=FAKE_SRC, dst=host.peer_mac)


def tcp(host, sport, dport, flags="A", size=0, v6=False):
    ip = IPv6(src=host.addr6, dst=host.peer_addr6) if v6 else IP(src=host.addr4, dst=host.peer_addr4)
    return bytes(eth(host) / ip / TCP(sport=sport, dport=dport, flags=flags) / Raw(b"\0" * size))


def udp(host, sport, dport, size=0, v6=False):
    ip = IPv6(src=host.addr6, dst=host.peer_addr6) if v6 else IP(src=host.addr4, dst=host.peer_addr4)
    return bytes(eth(host) / ip / UDP(sport=sport, dport=dport) / Raw(b"\1" * size))


def dns(host, sport):
    return bytes(eth(host) / IP(src=host.addr4, dst=host.peer_addr4) / UDP(sport=sport, dport=53)
                 / DNS(id=sport, rd=1, qd=DNSQR(qname="hdrlog.example.")))


def started(host, **kw) -> Capture:
    cap = Capture(CaptureConfig(ifaces=[host.peer_ifname], **kw))
    cap.start()
    return cap


def drain_packets(cap: Capture, host, settle: float = 0.3) -> dict[str, np.ndarray]:
    """Every packet row from the lab host until the ring stays quiet (columns of interest)."""
    mine = {4: v16(host.addr4), 6: v16(host.addr6)}
    parts = []
    quiet_until = time.monotonic() + settle
    while time.monotonic() < quiet_until:
        cols = cap.poll(50)
        if cols is None:
            continue
        quiet_until = time.monotonic() + settle
        src = np.array(cols["src_ip"]).astype("V16")
        keep = ((src == np.void(mine[4])) | (src == np.void(mine[6]))) & np.isin(cols["ip_proto"], (6, 17))
        parts.append({k: np.asarray(cols[k])[keep] for k in
                      ("src_port", "dst_port", "ip_proto", "tcp_flags", "sample_rate", "wire_len", "dns_qname")})
    if not parts:
        return {k: np.zeros(0) for k in ("src_port", "dst_port", "ip_proto", "tcp_flags", "sample_rate", "wire_len")}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def flows_of(cap: Capture, host, final: bool = False) -> dict[tuple, tuple[int, int]]:
    """{(ip_version, proto, sport, dport): (packets, bytes)} of the lab host's flows, summed."""
    if final:
        cap.stop()
    cols = cap.drain_flows()
    out: dict[tuple, list[int]] = {}
    if cols is None:
        return {}
    mine = {v16(host.addr4), v16(host.addr6)}
    for i in range(len(cols["packets"])):
        if bytes(cols["src_ip"][i]) not in mine or cols["ip_proto"][i] not in (6, 17):
            continue  # kernel chatter (ICMPv6 neighbour discovery) from the lab host
        k = (int(cols["ip_version"][i]), int(cols["ip_proto"][i]), int(cols["src_port"][i]), int(cols["dst_port"][i]))
        assert cols["direction"][i] == 1 and cols["ifname"][i] == host.peer_ifname
        assert cols["start_ts"][i] <= cols["end_ts"][i]
        acc = out.setdefault(k, [0, 0])
        acc[0] += int(cols["packets"][i])
        acc[1] += int(cols["bytes"][i])
    return {k: (p, b) for k, (p, b) in out.items()}


def test_flow_totals_equal_what_was_sent(lab, host, tmp_path):
    frames = []
    want: dict[tuple, list[int]] = {}
    for i in range(300):  # 5 flows, v4 and v6, TCP and UDP, various sizes
        kind = i % 5
        f = [tcp(host, 40000, 5201, size=i % 700), udp(host, 40001, 9000, size=i % 300),
             tcp(host, 40002, 443, size=100, v6=True), udp(host, 40003, 9001, size=7, v6=True),
             tcp(host, 40004, 80, flags="S" if i < 5 else "A")][kind]
        frames.append(f)
        p = Ether(f)
        key = (6 if p.haslayer(IPv6) else 4, 6 if p.haslayer(TCP) else 17, p.sport, p.dport)
        acc = want.setdefault(key, [0, 0])
        acc[0] += 1
        acc[1] += len(f)
    cap = started(host, mode="flows")
    try:
        send_frames(lab, host, frames[:150], tmp_path)
        time.sleep(0.1)
        got = flows_of(cap, host)  # one interval ...
        send_frames(lab, host, frames[150:], tmp_path)
        time.sleep(0.1)
        later = flows_of(cap, host)  # ... and the next: together, exactly what was sent
        assert cap.poll(100) is None, "flows mode sends no packet records"
        c = cap.counters()
    finally:
        cap.stop()
    total = {k: (got.get(k, (0, 0))[0] + later.get(k, (0, 0))[0], got.get(k, (0, 0))[1] + later.get(k, (0, 0))[1])
             for k in set(got) | set(later)}
    assert total == {k: tuple(v) for k, v in want.items()}
    assert c["flowed"] >= 300 and c["flow_map_full"] == 0 and c["logged"] == 0


def test_auto_mode_logs_every_notable_packet_and_little_of_a_bulk_flow(lab, host, tmp_path):
    notable, bulk = [], []
    for i in range(20):
        notable += [tcp(host, 41000 + i, 80, "S"), tcp(host, 41000 + i, 80, "FA"), tcp(host, 42000 + i, 80, "R"),
                    dns(host, 43000 + i)]
    bulk = [tcp(host, 44444, 5201, "A", size=1000) for _ in range(3000)]
    frames = notable[:40] + bulk[:1500] + notable[40:] + bulk[1500:]
    cap = started(host, mode="auto", sample_rate=100, first_packets=3)
    try:
        send_frames(lab, host, frames, tmp_path)
        rows = drain_packets(cap, host)
        flows = flows_of(cap, host, final=True)
        c = cap.counters()
    finally:
        cap.stop()
    conns = cap.drain_connections()  # every connection's final row, after stop
    ports = list(zip(rows["src_port"].tolist(), rows["dst_port"].tolist(), rows["tcp_flags"].tolist()))
    for i in range(20):
        assert (41000 + i, 80, 0x02) in ports, "SYN"
        assert (41000 + i, 80, 0x11) in ports, "FIN"
        assert (42000 + i, 80, 0x04) in ports, "RST"
        assert (43000 + i, 53, 0) in ports, "DNS"
    assert sum(1 for p in ports if p[0] == 43000 and p[1] == 53) == 1
    bulk_rows = rows["src_port"] == 44444
    n_bulk = int(bulk_rows.sum())
    assert 3 <= n_bulk <= 3 + 80, n_bulk  # first 3, then about 1 in 100 of 2997
    assert n_bulk / len(bulk) < 0.03
    # The sampled rows stand for 100 packets each; the first three of the connection for themselves
    # (auto mode counts first packets per connection, both ways: the root stack's RST answers to the
    # bulk segments are among them).
    assert sorted(set(rows["sample_rate"][bulk_rows].tolist())) in ([1], [1, 100])
    assert 1 <= int((rows["sample_rate"][bulk_rows] == 1).sum()) <= 3
    # Auto mode aggregates by connection (collector/connections.py), exactly: flows only get what has
    # no connection key.
    assert (4, 6, 44444, 5201) not in flows
    conn = [i for i, p in enumerate(conns["orig_port"].tolist()) if p == 44444]
    assert len(conn) == 1
    assert int(conns["orig_pkts"][conn[0]]) == 3000
    assert int(conns["orig_ip_bytes"][conn[0]]) == 3000 * (len(bulk[0]) - 14)
    assert c["sampled_out"] >= 3000 - n_bulk
    assert c["conn_tracked"] + c["flowed"] >= len(frames)


def test_filters_include_and_exclude_exactly_and_change_while_running(lab, host, tmp_path):
    other = lab.add_host("flx")
    frames = [tcp(host, 50000 + i, 80) for i in range(10)] + [udp(host, 50100 + i, 53 if i < 5 else 9999)
                                                              for i in range(10)]
    v6 = [tcp(host, 50200 + i, 443, v6=True) for i in range(5)]
    cap = started(host, mode="packets", filters=[f"include net {host.addr4}/32", "exclude dport 9999"])
    try:
        send_frames(lab, host, frames + v6, tmp_path)
        rows = drain_packets(cap, host)
        got = sorted(rows["src_port"].tolist())
        assert got == list(range(50000, 50010)) + list(range(50100, 50105))
        filtered_before = cap.counters()["filtered"]
        assert filtered_before >= 5 + 5

        cap.set_filters("include proto udp\nexclude sport 50100-50101\n# a comment\n")
        send_frames(lab, host, frames + v6, tmp_path)
        rows = drain_packets(cap, host)
        assert sorted(rows["src_port"].tolist()) == list(range(50102, 50110))

        cap.set_filters([f"include src {host.addr6.split('/')[0]}/128", "include dir ingress",
                         f"exclude iface {other.peer_ifname}"])
        send_frames(lab, host, frames + v6, tmp_path)
        rows = drain_packets(cap, host)
        assert sorted(rows["src_port"].tolist()) == list(range(50200, 50205))

        cap.set_filters([])  # everything again
        send_frames(lab, host, frames + v6, tmp_path)
        assert len(drain_packets(cap, host)["src_port"]) == 25
    finally:
        cap.stop()


def test_filter_language_errors_name_the_rule():
    assert [str(r) for r in parse_rules("include src 198.18.0.0/15, 2001:db8::/32\nexclude port 1-1023")] == [
        "include src 198.18.0.0/15,2001:db8::/32", "exclude port 1-1023"]
    for bad in ("include src 10.0.0.300", "keep src 198.18.0.1", "include dport 70000", "include proto xyz",
                "include dir sideways", "include port 9-3", "exclude src"):
        with pytest.raises(FilterError, match="filter"):
            parse_rules([bad])


def test_sampling_stays_within_statistical_bounds(lab, host, tmp_path):
    n, rate = 6000, 10
    frames = [udp(host, 45000 + (i % 50), 7000) for i in range(n)]
    cap = started(host, mode="packets", sample_rate=rate)
    try:
        send_frames(lab, host, frames, tmp_path)
        rows = drain_packets(cap, host)
        c = cap.counters()
    finally:
        cap.stop()
    k = len(rows["src_port"])
    sigma = (n * (1 / rate) * (1 - 1 / rate)) ** 0.5
    assert abs(k - n / rate) < 5 * sigma, (k, n / rate, sigma)
    assert set(rows["sample_rate"].tolist()) == {rate}
    assert c["sampled_out"] + c["logged"] + c["filtered"] + c["ringbuf_full"] == c["seen"]


def test_a_full_flow_map_falls_back_and_is_counted(lab, host, tmp_path):
    frames = [udp(host, 46000 + i, 7001, size=i) for i in range(200)]  # 200 flows, room for 16
    cap = started(host, mode="flows", flow_entries=16)
    try:
        send_frames(lab, host, frames, tmp_path)
        time.sleep(0.1)
        assert cap.poll(100) is None  # fallback records feed flows, not packet rows
        c = cap.counters()
        flows = flows_of(cap, host)
    finally:
        cap.stop()
    assert c["flow_map_full"] >= 200 - 16
    assert c["logged"] >= c["flow_map_full"]
    assert flows == {(4, 17, 46000 + i, 7001): (1, len(frames[i])) for i in range(200)}


def test_a_flows_end_ts_follows_its_later_packets(lab, host, tmp_path):
    """Later packets of a flow only move counters and stamp last-seen from tick_ns() (bpf/hdrlog.c:
    the precise clock read once per jiffy per CPU): end_ts still follows them, to the tick."""
    frame = udp(host, 48000, 7003, size=10)
    cap = started(host, mode="flows")
    try:
        send_frames(lab, host, [frame], tmp_path)
        time.sleep(0.3)
        send_frames(lab, host, [frame] * 3, tmp_path)
        before_drain = time.time_ns()
        cols = cap.drain_flows()
    finally:
        cap.stop()
    mine = [i for i in range(len(cols["packets"])) if int(cols["src_port"][i]) == 48000]
    assert sum(int(cols["packets"][i]) for i in mine) == 4
    start = min(int(cols["start_ts"][i]) for i in mine)
    end = max(int(cols["end_ts"][i]) for i in mine)
    assert end - start >= 290_000_000  # >= 0.3 s apart, less at most one tick (10 ms at HZ=100)
    assert end <= before_drain + 50_000_000  # never ahead of the clock (allowing for the wall/mono offset)


def test_a_full_ring_buffer_is_counted_loss(lab, host, tmp_path):
    frames = [udp(host, 47000, 7002, size=100) for _ in range(400)]
    cap = started(host, mode="packets", ringbuf_bytes=4096)
    try:
        send_frames(lab, host, frames, tmp_path)  # nobody reads meanwhile: ~30 fit in 4 KiB
        rows = drain_packets(cap, host)
        c = cap.counters()
    finally:
        cap.stop()
    assert c["ringbuf_full"] > 0
    assert len(rows["src_port"]) + c["ringbuf_full"] >= 400
    assert c["seen"] == c["logged"] + c["ringbuf_full"] + c["filtered"] + c["sampled_out"]


def _flow_rows(cap: Capture) -> list[dict]:
    cols = cap.drain_flows()
    if cols is None:
        return []
    return [{k: (bytes(v[i]) if getattr(v, "dtype", None) is not None and v.dtype.kind == "V" else
                 (v[i].item() if hasattr(v[i], "item") else v[i])) for k, v in cols.items()}
            for i in range(len(cols["packets"]))]


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_icmp_flows_are_keyed_by_type_and_code_and_carry_community_id(lab, host, family):
    """Echo requests and replies are flows of their own (type and code in the ports, as Zeek has
    them) with the Community ID Corelight's reference gives both (before: '' and ports 0)."""
    import communityid as ref

    v6 = family == "ipv6"
    src, dst = (host.addr6, host.peer_addr6) if v6 else (host.addr4, host.peer_addr4)
    request, reply, proto = (128, 129, 58) if v6 else (8, 0, 1)
    cap = started(host, mode="flows")
    try:
        lab.run(host, "ping", "-6" if v6 else "-4", "-c", "4", "-i", "0.2", "-W", "1", dst)
        time.sleep(0.1)
        rows = [r for r in _flow_rows(cap) if r["ip_proto"] == proto and r["src_port"] in (request, reply)]
    finally:
        cap.stop()
    by_type = {r["src_port"]: r for r in rows}
    assert set(by_type) == {request, reply}, rows
    assert by_type[request]["packets"] == by_type[reply]["packets"] == 4
    assert by_type[request]["dst_port"] == by_type[reply]["dst_port"] == 0  # the code
    tpl = (ref.FlowTuple.make_icmp6 if v6 else ref.FlowTuple.make_icmp)(src, dst, request, 0)
    want = ref.CommunityID().calc(tpl)
    assert by_type[request]["community_id"] == by_type[reply]["community_id"] == want


TCP_SINK = r"""
import socket, sys
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[1], int(sys.argv[2]))); ls.listen(1); print("ready", flush=True)
c, _ = ls.accept(); n = 0
while True:
    b = c.recv(65536)
    if not b: break
    n += len(b)
c.close(); print(n, flush=True)
"""


def _bulk_egress_flow(lab, host, port: int, size: int) -> dict:
    """``size`` bytes over TCP from the root namespace to the lab host; the data direction's flow."""
    import socket
    import subprocess

    sink = lab.popen(host, "/usr/bin/python3", "-c", TCP_SINK, host.addr4, str(port), stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout.readline().strip() == "ready"
        with socket.create_connection((host.addr4, port), timeout=10) as s:
            s.sendall(b"\0" * size)
        assert int(sink.stdout.readline()) == size
    finally:
        sink.wait(10)
    return port


def test_a_gso_skb_counts_as_the_frames_it_stands_for(lab, host):
    """TCP from this host goes out as GSO skbs (one at the egress hook, many frames on the wire). The
    same transfer with gso_max_segs 1 (every skb one frame) is the reference: the flow's packets and
    bytes agree (before: a 600 kB transfer's ~420 frames counted as a few dozen skbs)."""
    dev = host.peer_ifname
    cap = started(host, mode="flows")
    got = {}
    try:
        for segs, port in ((1, 46001), (None, 46002)):
            if segs is not None:
                subprocess.run(["ip", "link", "set", dev, "gso_max_segs", str(segs)], check=True)
            try:
                _bulk_egress_flow(lab, host, port, 600_000)
            finally:
                subprocess.run(["ip", "link", "set", dev, "gso_max_segs", "65535"], check=True)
            time.sleep(0.2)
            rows = [r for r in _flow_rows(cap) if r["dst_port"] == port and r["direction"] == 2]
            got[segs] = (sum(r["packets"] for r in rows), sum(r["bytes"] for r in rows))
    finally:
        cap.stop()
    (ref_pkts, ref_bytes), (pkts, nbytes) = got[1], got[None]
    print(f"gso_max_segs 1: {ref_pkts} packets {ref_bytes} bytes; GSO: {pkts} packets {nbytes} bytes")
    assert ref_pkts > 400 and abs(pkts - ref_pkts) <= 0.03 * ref_pkts
    assert abs(nbytes - ref_bytes) <= 0.03 * ref_bytes
