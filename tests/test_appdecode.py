"""appdecode: app-layer columns from payload tails, through records.decode (no kernel)."""

from __future__ import annotations

import struct

import numpy as np
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.tls.extensions import ServerName, TLS_Ext_ALPN, ProtocolName, TLS_Ext_ServerName, \
    TLS_Ext_SupportedVersion_CH
from scapy.layers.tls.handshake import TLSClientHello
from scapy.layers.tls.record import TLS

from hdrlog.collector import appdecode, records


def recs(specs):
    rec = np.zeros(len(specs), dtype=records.RECORD_DTYPE)
    for i, (proto, sport, dport) in enumerate(specs):
        rec[i]["ip_proto"], rec[i]["src_port"], rec[i]["dst_port"] = proto, sport, dport
    return rec


def test_columns_from_payloads():
    dns = bytes(DNS(id=9, rd=1, qd=DNSQR(qname="A.Example.org", qtype="MX")))
    hello = bytes(TLS(msg=[TLSClientHello(ext=[
        TLS_Ext_ServerName(servernames=[ServerName(servername=b"x.example.org")]),
        TLS_Ext_ALPN(protocols=[ProtocolName(protocol=b"h2"), ProtocolName(protocol=b"http/1.1")]),
        TLS_Ext_SupportedVersion_CH(versions=[0x0304, 0x0303])])]))
    http = b"GET /p HTTP/1.1\r\nHost: h.example.org\r\nUser-Agent: ua/1\r\n\r\n"
    specs = [(17, 40000, 53), (6, 40000, 443), (6, 40000, 8080), (6, 80, 40000), (6, 1, 2), (17, 5300, 5301),
             (6, 40000, 5353)]
    rec = recs(specs)
    payloads = [(0, dns), (1, hello), (2, http), (3, b"HTTP/1.0 302 Found\r\n"), (4, b"\x17\x03\x03junk"),
                (5, dns), (6, struct.pack("!H", len(dns)) + dns)]
    cols = records.decode(rec.tobytes(), len(specs), {}, 0, payloads=payloads, dns_ports=[53, 5353])
    assert (cols["dns_id"][0], cols["dns_qname"][0], cols["dns_qtype"][0], cols["dns_flags"][0]) == \
        (9, "a.example.org", 15, 0x0100)
    assert (cols["tls_sni"][1], cols["tls_alpn"][1], cols["tls_offered_versions"][1], cols["tls_version"][1]) == \
        ("x.example.org", "h2,http/1.1", "0x0304,0x0303", 0x0304)
    assert (cols["http_method"][2], cols["http_path"][2], cols["http_host"][2], cols["http_user_agent"][2]) == \
        ("GET", "/p", "h.example.org", "ua/1")
    assert cols["http_status"].tolist() == [0, 0, 0, 302, 0, 0, 0]
    assert cols["dns_qname"][5] == "" and cols["dns_id"][5] == 0, "port 5300 is not a DNS port"
    assert cols["dns_qname"][6] == "a.example.org", "DNS over TCP on a configured port"
    for c in ("dns_qname", "http_host", "tls_sni"):
        assert cols[c][4] == ""


def test_prefilter_is_vectorised_and_selective():
    head = np.array([int.from_bytes(b, "big") for b in (b"GET ", b"HTTP", b"\x16\x03\x01\x02", b"\x17\x03\x03\x00",
                                                         b"abcd", b"\x00\x01\x00\x00")], dtype=np.uint32)
    proto = np.array([6, 6, 6, 6, 17, 17], dtype=np.uint8)
    sport = np.array([1, 1, 1, 1, 1, 1], dtype=np.uint16)
    dport = np.array([2, 2, 2, 2, 2, 53], dtype=np.uint16)
    assert appdecode.candidates(proto, sport, dport, head, [53]).tolist() == [True, True, True, False, False, True]
