"""Tunnels end to end: the real collector (auto mode, eBPF on a lab veth) -> gRPC -> the real server -> chDB.

VXLAN frames of two tenants' inner TCP connections with the same addresses and ports (VNI 100 and
200) are sent into the monitored veth; the packets table must hold the inner tuple with
tunnel_type 'vxlan', the VNI and the outer endpoints, and the connections table one final row per
VNI, of the inner flow, with each side's outer endpoint. Each tenant's resolver answers a name for
the same client address: dns_names holds one row per tenant, with its VNI.
"""

from __future__ import annotations

import os

import pytest

from tests.frames import send_frames
from tests.support import CollectorProcess, ServerProcess, wait_until
from scapy.all import DNS, DNSQR, DNSRR, IP, UDP

from tests.test_capture_tunnels import A1, A2, handshake, vx

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="eBPF and network namespaces need root")



def test_tunnel_columns_arrive_in_packets_and_connections(lab, tmp_path, procs):
    server = ServerProcess(f"chdb://{tmp_path}/store", tmp_path)
    procs.append(server)
    server.start()
    h = lab.add_host("tuns")
    collector = CollectorProcess(server.address, [h.peer_ifname], "tun-host", tmp_path, "--mode", "auto",
                                 "--conn-linger", "0.2", "--conn-interim", "1")
    procs.append(collector)
    collector.start()
    answers = [vx(vni, A2, A1, IP(src="198.18.251.53", dst="198.18.251.1") / UDP(sport=53, dport=5555)
                  / DNS(id=7, qr=1, qd=DNSQR(qname=name), an=DNSRR(rrname=name, type="A", rdata="198.18.251.2")))
               for vni, name in ((100, "a.tenant.example"), (200, "b.tenant.example"))]
    send_frames(lab, h, answers + handshake(100, b"x" * 10) + handshake(200, b"y" * 20), tmp_path)
    where = "host = 'tun-host' AND tunnel_type = 'vxlan'"
    wait_until(lambda: int(server.sql(f"SELECT countIf(final = 1) AS n FROM hdrlog.connections WHERE {where}")[0]["n"])
               >= 2, 60, "the two tunnelled connections' final rows")
    conns = server.sql("SELECT tunnel_type, tunnel_id, toString(outer_orig_ip) AS oo, toString(outer_resp_ip) AS orr, "
                       "toString(orig_ip) AS o, orig_port, toString(resp_ip) AS r, resp_port, orig_bytes, conn_state "
                       f"FROM hdrlog.connections WHERE {where} AND final = 1 ORDER BY tunnel_id")
    assert [(c["tunnel_type"], int(c["tunnel_id"]), c["oo"], c["orr"], c["o"], int(c["orig_port"]), c["r"],
             int(c["resp_port"]), int(c["orig_bytes"]), c["conn_state"]) for c in conns] == [
        ("vxlan", vni, f"::ffff:{A1}", f"::ffff:{A2}", "::ffff:198.18.251.1", 40000, "::ffff:198.18.251.2", 443, n, "SF")
        for vni, n in ((100, 10), (200, 20))]
    pk = server.sql("SELECT tunnel_id, toString(src_ip) AS s, toString(outer_src_ip) AS os, "
                    "toString(outer_dst_ip) AS od, tunnel_flags, community_id "
                    f"FROM hdrlog.packets WHERE {where} AND tcp_flags = 2 ORDER BY tunnel_id")
    assert [(int(p["tunnel_id"]), p["s"], p["os"], p["od"], int(p["tunnel_flags"])) for p in pk] == [
        (vni, "::ffff:198.18.251.1", f"::ffff:{A1}", f"::ffff:{A2}", 1) for vni in (100, 200)]
    # the packet joins its connection on the community id and the tunnel id
    joined = server.sql("SELECT count() AS n FROM hdrlog.packets p JOIN hdrlog.connections c "
                        "ON p.community_id = c.community_id AND p.tunnel_id = c.tunnel_id "
                        f"WHERE p.host = 'tun-host' AND p.tcp_flags = 2 AND c.final = 1 AND c.tunnel_type = 'vxlan'")
    assert int(joined[0]["n"]) == 2
    wait_until(lambda: int(server.sql("SELECT count() AS n FROM hdrlog.dns_names WHERE host = 'tun-host'")[0]["n"])
               >= 2, 30, "the two tenants' dns_names rows")
    names = server.sql("SELECT tunnel_type, tunnel_id, toString(client_ip) AS c, name FROM hdrlog.dns_names "
                       "WHERE host = 'tun-host' ORDER BY tunnel_id")
    assert [(n["tunnel_type"], int(n["tunnel_id"]), n["c"], n["name"]) for n in names] == [
        ("vxlan", 100, "::ffff:198.18.251.1", "a.tenant.example"), ("vxlan", 200, "::ffff:198.18.251.1", "b.tenant.example")]
    assert collector.stop() == 0
