"""App-layer columns through the real classifier: payload bytes copied in the kernel, decoded in user space.

Frames cross a lab veth into the monitored end (clsact ingress), as in
test_capture.py. Checks which payloads the kernel copies (candidates only, never
the Ethernet padding, at most payload_bytes) and the DNS / HTTP / TLS columns.
"""

from __future__ import annotations

import os
import struct

import pytest
from scapy.all import IP, TCP, UDP, Ether, IPv6, Raw
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.tls.extensions import ServerName, TLS_Ext_ALPN, ProtocolName, TLS_Ext_Padding, \
    TLS_Ext_ServerName, TLS_Ext_SupportedVersion_CH, TLS_Ext_SupportedVersion_SH
from scapy.layers.tls.handshake import TLSClientHello, TLSServerHello
from scapy.layers.tls.record import TLS

from hdrlog.collector import records
from hdrlog.collector.capture import Capture, CaptureConfig
from tests.frames import FAKE_SRC, send_frames, sent_rows

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="eBPF and network namespaces need root")

APP = ("dns_id", "dns_flags", "dns_qname", "dns_qtype", "dns_rcode", "dns_answers", "http_method", "http_host",
       "http_path", "http_user_agent", "http_status", "tls_sni", "tls_version", "tls_offered_versions", "tls_alpn")


def test_dns_http_tls_columns(lab, tmp_path):
    h = lab.add_host("app")
    cap = Capture(CaptureConfig(ifaces=[h.peer_ifname], dns_ports=[53, 10053], payload_bytes=512))
    cap.start()
    try:
        eth = Ether(src=FAKE_SRC, dst=h.peer_mac)
        ip4, ip6 = IP(src=h.addr4, dst=h.peer_addr4), IPv6(src=h.addr6, dst=h.peer_addr6)
        query = DNS(id=0xABCD, rd=1, qd=DNSQR(qname="Mixed.Case.Example.org", qtype="TXT"))
        answer = DNS(id=2, qr=1, aa=1, rcode=3, qd=DNSQR(qname="nx.example.org"),
                     an=[DNSRR(rrname="nx.example.org", rdata="198.18.0.9")] * 2)
        hello = TLS(msg=[TLSClientHello(ciphers=list(range(0x1301, 0x1301 + 100)), ext=[
            TLS_Ext_Padding(padding=b"\0" * 150),  # pushes the SNI ~400 bytes into the payload
            TLS_Ext_ServerName(servernames=[ServerName(servername=b"Deep.Example.org")]),
            TLS_Ext_ALPN(protocols=[ProtocolName(protocol=b"h2")]),
            TLS_Ext_SupportedVersion_CH(versions=[0x0304, 0x0303])])])
        sh = TLS(msg=[TLSServerHello(version=0x0303, ext=[TLS_Ext_SupportedVersion_SH(version=0x0304)])])
        long_get = b"GET /" + b"a" * 600 + b" HTTP/1.1\r\nHost: late.example.org\r\n\r\n"
        qb = bytes(query)
        frames = [
            eth / ip4 / UDP(sport=40000, dport=53) / query,                              # 0 DNS query
            eth / ip6 / UDP(sport=53, dport=40000) / answer,                             # 1 DNS answer, IPv6
            eth / ip4 / TCP(sport=40001, dport=53, flags="PA") / Raw(struct.pack("!H", len(qb)) + qb),  # 2 DNS/TCP
            eth / ip4 / UDP(sport=40002, dport=10053) / query,                           # 3 configured port
            eth / ip4 / UDP(sport=40003, dport=5353) / query,                            # 4 not configured
            eth / ip4 / TCP(sport=40004, dport=8080, flags="PA")
            / Raw(b"PUT /x?y=1 HTTP/1.1\r\nUser-Agent: hdrlog-test/1\r\nHost: Api.Example.org\r\n\r\n"),  # 5
            eth / ip6 / TCP(sport=80, dport=40005, flags="PA") / Raw(b"HTTP/1.1 204 No Content\r\n\r\n"),  # 6
            eth / ip4 / TCP(sport=40006, dport=443, flags="PA") / hello,                 # 7 ClientHello
            eth / ip4 / TCP(sport=443, dport=40006, flags="PA") / sh,                    # 8 ServerHello
            eth / ip4 / TCP(sport=40007, dport=80, flags="PA") / Raw(long_get),          # 9 cut at 512
            eth / ip4 / TCP(sport=40008, dport=443, flags="PA") / Raw(b"\x17\x03\x03" + b"x" * 1000),  # 10 bulk
            eth / ip4 / UDP(sport=40009, dport=53) / Raw(b"\x12"),                       # 11 padded frame
        ]
        frames = [bytes(f) for f in frames]
        frames[11] += b"\0" * (60 - len(frames[11]))  # Ethernet padding behind the 1-byte datagram
        assert len(frames[7]) - 54 > 400
        send_frames(lab, h, frames, tmp_path)
        rows = sent_rows(cap, len(frames), lambda k: k in APP or k in ("parse_flags", "wire_len", "dst_port"))
        assert [r["wire_len"] for r in rows] == [len(f) for f in frames]
        r = rows
        assert (r[0]["dns_id"], r[0]["dns_qname"], r[0]["dns_qtype"], r[0]["dns_flags"], r[0]["dns_rcode"]) == \
            (0xABCD, "mixed.case.example.org", 16, 0x0100, 0)
        assert (r[1]["dns_qname"], r[1]["dns_rcode"], r[1]["dns_answers"], r[1]["dns_flags"] & 0x8400) == \
            ("nx.example.org", 3, 2, 0x8400)
        assert r[2]["dns_qname"] == "mixed.case.example.org" and r[2]["dns_id"] == 0xABCD
        assert r[3]["dns_qname"] == "mixed.case.example.org"
        assert r[4]["dns_qname"] == "" and r[4]["dns_id"] == 0, "5353 is not in dns_ports here"
        assert (r[5]["http_method"], r[5]["http_path"], r[5]["http_host"], r[5]["http_user_agent"]) == \
            ("PUT", "/x?y=1", "Api.Example.org", "hdrlog-test/1")
        assert r[6]["http_status"] == 204
        assert (r[7]["tls_sni"], r[7]["tls_alpn"], r[7]["tls_offered_versions"], r[7]["tls_version"]) == \
            ("deep.example.org", "h2", "0x0304,0x0303", 0x0304)
        assert r[8]["tls_version"] == 0x0304 and r[8]["tls_sni"] == ""
        assert r[9]["http_method"] == "GET" and r[9]["parse_flags"] & records.PARSE_PAYLOAD_CUT
        assert len(r[9]["http_path"]) <= 256 and r[9]["http_host"] == "", "Host sits beyond the 512 copied bytes"
        for i in (10, 11):
            assert all(not r[i][k] for k in APP), i
        # Candidates only: not the bulk TLS record (10) nor port 5353 (4); 11 copies 1 byte, not the padding.
        c = cap.counters()
        assert c["payload"] == len(frames) - 2, c
    finally:
        cap.stop()
