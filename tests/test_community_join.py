"""Community ID joins a packet row, its flow row and its connection row (issue 13 item 4).

Real eBPF on a lab veth, real stacks: one capture in auto mode (connections + notable packets)
and one in flows mode on the same interface (tcx runs both), one TCP and one UDP exchange, IPv4
and IPv6. Every packets row and flows row of each exchange carries the connection row's
community_id, and that id is the reference implementation's (PyPI ``communityid``, Corelight's).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import communityid as ref
import pytest

from hdrlog.collector import connections as cm
from hdrlog.collector.capture import Capture, CaptureConfig
from hdrlog.collector.communityid import CommunityIdCache, addr16
from hdrlog.dev.lab import Lab

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="eBPF and network namespaces need root")


def _reference(proto: int, saddr: str, daddr: str, sport: int, dport: int) -> str:
    return ref.CommunityID(seed=0).calc(ref.FlowTuple(proto, saddr, daddr, sport, dport))


def _rows(cols: dict | None) -> list[dict]:
    if not cols:
        return []
    n = len(next(iter(cols.values())))
    return [{k: (v[i].tobytes() if getattr(v, "dtype", None) is not None and v.dtype.kind == "V"
                 else (v[i].item() if hasattr(v[i], "item") else v[i])) for k, v in cols.items()} for i in range(n)]


def test_cache_computes_once_per_tuple_and_stays_bounded():
    cache = CommunityIdCache(entries=2)
    a, b = addr16("198.18.0.1"), addr16("198.18.0.2")
    ids = cache.of_rows([6, 6, 6], [a, b, a], [b, a, b], [40000, 80, 40000], [80, 40000, 80], [True, True, True])
    assert ids == [_reference(6, "198.18.0.1", "198.18.0.2", 40000, 80)] * 3
    assert (cache.misses, cache.hits) == (2, 0)  # two directions: two keys, one id
    assert cache.of_rows([6], [a], [b], [40000], [80], [True]) == ids[:1] and cache.hits == 1
    cache.of_rows([17], [a], [b], [1], [2], [True])
    assert len(cache._ids) == 2  # the least recently used tuple went
    assert cache.of_rows([6, 47], [a, a], [b, b], [1, 0], [2, 0], [False, True])[0] == ""


@pytest.mark.parametrize("family", [4, 6])
def test_packet_flow_and_connection_rows_carry_the_same_reference_community_id(family):
    with Lab("cj") as lab:
        h = lab.add_host("a")
        auto = Capture(CaptureConfig(ifaces=[h.peer_ifname], mode="auto", host="cid-test",
                                     conn=cm.ConnConfig(interim=60.0, tcp_timeout=2.0, udp_timeout=1.0,
                                                        icmp_timeout=1.0, linger=0.3)))
        flows = Capture(CaptureConfig(ifaces=[h.peer_ifname], mode="flows", attach="tcx"))
        auto.start()
        try:
            flows.start()
            try:
                packets, flow_rows, conns = _exchange(lab, h, family, auto, flows)
            finally:
                flows.stop()
        finally:
            auto.stop()
    client = h.addr4 if family == 4 else h.addr6.split("/")[0]
    server = h.peer_addr4 if family == 4 else h.peer_addr6.split("/")[0]
    for proto, cport, sport in ((6, 47401, 47402), (17, 47403, 47404)):
        want = _reference(proto, client, server, cport, sport)
        conn = [r for r in conns if r["ip_proto"] == proto and {r["orig_port"], r["resp_port"]} == {cport, sport}]
        pk = [r for r in packets if r["ip_proto"] == proto and {r["src_port"], r["dst_port"]} == {cport, sport}]
        fl = [r for r in flow_rows if r["ip_proto"] == proto and {r["src_port"], r["dst_port"]} == {cport, sport}]
        assert conn and {r["community_id"] for r in conn} == {want}, conn
        assert pk and {r["community_id"] for r in pk} == {want}, pk  # both directions, every logged packet
        assert {r["direction"] for r in fl} == {1, 2} and {r["community_id"] for r in fl} == {want}, fl


def _exchange(lab: Lab, h, family: int, auto: Capture, flows: Capture):
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    client = h.addr4 if family == 4 else h.addr6.split("/")[0]
    server = h.peer_addr4 if family == 4 else h.peer_addr6.split("/")[0]
    tcp = socket.socket(af, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((server, 47402))
    tcp.listen()
    tcp.settimeout(15)
    udp = socket.socket(af, socket.SOCK_DGRAM)
    udp.bind((server, 47404))
    udp.settimeout(15)

    def serve():
        c, _ = tcp.accept()
        with c:
            c.sendall(c.recv(1000) * 2)
        data, peer = udp.recvfrom(100)
        udp.sendto(data, peer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    fam = "socket.AF_INET" if family == 4 else "socket.AF_INET6"
    lab.run(h, sys.executable, "-c", f"""
import socket
s = socket.socket({fam}, socket.SOCK_STREAM)
s.bind(({client!r}, 47401))
s.connect(({server!r}, 47402))
s.sendall(b'q' * 100)
got = 0
while got < 200:
    got += len(s.recv(1000))
s.close()
u = socket.socket({fam}, socket.SOCK_DGRAM)
u.bind(({client!r}, 47403))
u.sendto(b'hello', ({server!r}, 47404))
u.recv(100)
""", timeout=30)
    t.join(10)
    tcp.close()
    udp.close()
    packets, flow_rows, conns = [], [], []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and sum(r["final"] for r in conns) < 2:
        for cap in (auto, flows):
            while (chunk := cap.poll(50)) is not None:
                packets += _rows(chunk)
        flow_rows += _rows(flows.drain_flows())
        conns += [r for r in _rows(auto.drain_connections()) if r["resp_port"] in (47402, 47404)]
        time.sleep(0.3)
    flow_rows += _rows(flows.drain_flows())
    return packets, flow_rows, conns
