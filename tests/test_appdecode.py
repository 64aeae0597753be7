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


def _segments(hello: bytes, cut: int, seq: int = 1000, batches: int = 1):
    rec = recs([(6, 50000, 443), (6, 50000, 443)])
    for i, (s, data) in enumerate(((seq, hello[:cut]), (seq + cut, hello[cut:]))):
        rec[i]["tcp_seq"], rec[i]["l4_payload_len"], rec[i]["payload_len"] = s, len(data), len(data)
        rec[i]["ifindex"], rec[i]["direction"] = 3, 1
    return rec, [(0, hello[:cut]), (1, hello[cut:])]


def test_tls_hello_over_two_segments_is_reassembled_in_one_batch_or_two():
    from tests import gapframes as gf

    hello = gf.pq_client_hello()
    rec, payloads = _segments(hello, 1448)
    # Alone (no reassembly): the first row is flagged, the second decodes nothing.
    out = records.decode(rec.tobytes(), 2, {}, 0, payloads=payloads)
    assert out["truncated"].tolist()[0] & appdecode.appheaders.TRUNC_TLS_HELLO and out["tls_sni"] == ["", ""]
    for split in (False, True):
        ra = appdecode.Reassembly()
        if split:  # the two segments in separate polls
            a = records.decode(rec[:1].tobytes(), 1, {}, 0, payloads=payloads[:1], reassembly=ra)
            b = records.decode(rec[1:].tobytes(), 1, {}, 0, payloads=[(0, payloads[1][1])], reassembly=ra)
            sni, versions = a["tls_sni"] + b["tls_sni"], a["tls_offered_versions"] + b["tls_offered_versions"]
        else:
            out = records.decode(rec.tobytes(), 2, {}, 0, payloads=payloads, reassembly=ra)
            sni, versions = out["tls_sni"], out["tls_offered_versions"]
        assert sni == ["", gf.PQ_SNI] and versions == ["", "0x0304,0x0303"], split
        assert ra.counters() == {"tls_reassembled": 1, "tls_reassembly_evicted": 0, "tls_reassembly_mismatched": 0}
        assert len(ra) == 0


def test_reassembly_is_bounded_and_counts():
    ra = appdecode.Reassembly(entries=2)
    for k in range(3):
        ra.keep(("k", k), 100, b"x")
    assert len(ra) == 2 and ra.evicted == 1
    assert ra.take(("k", 0), 100) is None  # evicted
    assert ra.take(("k", 1), 99) is None and ra.mismatched == 1  # not where the first ended: dropped
    assert ra.take(("k", 2), 100) == b"x" and ra.completed == 1 and len(ra) == 0
    # A cut copy (payload_len < l4_payload_len) is not waited for: its bytes are not all there.
    from tests import gapframes as gf
    rec, payloads = _segments(gf.pq_client_hello(), 1448)
    rec[0]["l4_payload_len"] = 1460
    ra = appdecode.Reassembly()
    records.decode(rec[:1].tobytes(), 1, {}, 0, payloads=payloads[:1], reassembly=ra)
    assert len(ra) == 0
