"""Issue 14's decoding gaps through the real classifier: the captures in tests/captures/ replayed onto a lab veth.

Each capture (made by tests/captures/make_captures.py) is sent from inside a lab
namespace into the monitored end (clsact ingress); the rows must carry the
columns listed here, and agree with tshark's reading of the same file where
tshark decodes them (tshark reassembles the two-segment ClientHello onto its
second frame, as the collector does).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from scapy.all import rdpcap

from hdrlog.collector import appheaders as ah
from hdrlog.collector import records
from hdrlog.collector.capture import Capture, CaptureConfig
from tests import gapframes as gf
from tests.frames import send_frames, sent_rows

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="eBPF and network namespaces need root")

CAPTURES = Path(__file__).resolve().parent / "captures"
TSHARK = ["tls.handshake.extensions_server_name", "tls.handshake.extensions.supported_version",
          "tls.handshake.version", "tls.handshake.extensions_alpn_str", "http.request.method", "http.request.uri",
          "http.host", "http.user_agent", "dns.id", "dns.qry.name", "vlan.id", "ieee8021ad.id", "ip.proto",
          "ipv6.nxt", "udp.srcport", "tcp.srcport"]


def frames_of(name: str) -> list[bytes]:
    return [bytes(p) for p in rdpcap(str(CAPTURES / name))]


def tshark(name: str) -> list[dict[str, str]]:
    out = subprocess.run(["tshark", "-r", str(CAPTURES / name), "-T", "fields", "-E", "separator=|"]
                         + [a for f in TSHARK for a in ("-e", f)], capture_output=True, text=True, check=True)
    return [dict(zip(TSHARK, line.split("|"))) for line in out.stdout.splitlines()]


def replay(lab, tmp_path, frames: list[bytes], **cfg) -> tuple[list[dict], dict]:
    h = lab.add_host("gaps")
    cap = Capture(CaptureConfig(ifaces=[h.peer_ifname], **cfg))
    cap.start()
    try:
        send_frames(lab, h, frames, tmp_path)
        rows = sent_rows(cap, len(frames), lambda k: k not in ("src_ip", "dst_ip", "outer_src_ip", "outer_dst_ip"))
        return rows, cap.counters()
    finally:
        cap.stop()


def test_pq_client_hello_over_two_segments(lab, tmp_path):
    frames = frames_of("tls-pq-hello-2seg.pcap")
    rows, counters = replay(lab, tmp_path, frames)
    assert [r["wire_len"] for r in rows] == [len(f) for f in frames]
    first, second, sh, single, noext, badext = rows
    # The first segment: the hello is cut by the segment's end; nothing reported as if complete.
    assert first["truncated"] & ah.TRUNC_TLS_HELLO and (first["tls_version"], first["tls_sni"]) == (0, "")
    assert first["tls_offered_versions"] == "" and not first["parse_flags"] & records.PARSE_PAYLOAD_CUT
    # The second segment completes it: the whole hello, decoded (tshark shows it there too).
    assert (second["tls_sni"], second["tls_alpn"], second["tls_offered_versions"], second["tls_version"]) == \
        (gf.PQ_SNI, "h2,http/1.1", "0x0304,0x0303", 0x0304)
    assert second["truncated"] == 0
    assert counters["tls_reassembled"] == 1 and counters["tls_reassembly_evicted"] == 0
    # A ServerHello over 1,024 bytes: the chosen version from supported_versions, not the legacy 0x0303.
    assert (sh["tls_version"], sh["truncated"]) == (0x0304, 0)
    # One segment, SNI past byte 1,100 (over IPv6): the bigger copy holds it.
    assert (single["tls_sni"], single["tls_version"], single["truncated"]) == ("single.example.org", 0x0304, 0)
    # Malformed hellos ending before their extensions: the legacy version, consistently.
    assert (noext["tls_version"], noext["tls_offered_versions"]) == (0x0301, "0x0301")
    assert (badext["tls_version"], badext["tls_offered_versions"]) == (0x0303, "0x0303")
    for r, t in zip(rows, tshark("tls-pq-hello-2seg.pcap")):
        assert r["tls_sni"] == t["tls.handshake.extensions_server_name"]
        assert r["tls_alpn"] == t["tls.handshake.extensions_alpn_str"]
        offered = [v for v in t["tls.handshake.extensions.supported_version"].split(",") if v]
        offered = [v for v in offered if int(v, 16) & 0x0F0F != 0x0A0A]
        if r["tls_sni"] or r is sh:
            assert r["tls_version"] == max(int(v, 16) for v in offered)
        if r in (noext, badext):
            assert r["tls_version"] == int(t["tls.handshake.version"], 16)


def test_http_webdav_token_methods_bare_lf_and_scanner_targets(lab, tmp_path):
    frames = frames_of("http-webdav.pcap")
    rows, counters = replay(lab, tmp_path, frames)
    assert [r["wire_len"] for r in rows] == [len(f) for f in frames]
    assert all(r["payload_len"] if "payload_len" in r else True for r in rows)
    methods = [r["http_method"] for r in rows]
    assert methods == ["PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "SEARCH", "BREW", "GET",
                       "GET"]
    assert counters["payload"] == len(frames), "the kernel copies every one of them"
    lf, scan = rows[9], rows[10]
    assert (lf["http_path"], lf["http_host"], lf["http_user_agent"], lf["truncated"]) == \
        ("/lf-only", "lf.example.org", "lf/1", 0)
    assert (scan["http_path"], scan["http_host"], scan["http_user_agent"], scan["truncated"]) == \
        ("/cgi-bin/x;cat", "victim.example.org", "scan/1", ah.TRUNC_HTTP_PATH)
    assert rows[8]["http_host"] == "coffee.example.org"
    for i, (r, t) in enumerate(zip(rows, tshark("http-webdav.pcap"))):
        if not t["http.request.method"]:
            assert i == 8  # tshark does not know the BREW method
            continue
        assert (r["http_method"], r["http_path"], r["http_host"], r["http_user_agent"]) == \
            (t["http.request.method"], t["http.request.uri"], t["http.host"], t["http.user_agent"]), i


def test_three_four_and_five_vlan_tags(lab, tmp_path):
    frames = frames_of("qinqinq.pcap")
    rows, _ = replay(lab, tmp_path, frames)
    assert [r["wire_len"] for r in rows] == [len(f) for f in frames]
    want = [(100, 300, 0x0800, 4, 52001), (101, 401, 0x86DD, 6, 52002), (102, 502, 0x0800, 4, 52001)]
    for r, (outer, inner, etype, ipv, sport) in zip(rows, want):
        assert (r["vlan_id"], r["vlan_inner_id"], r["eth_type"], r["ip_version"], r["src_port"]) == \
            (outer, inner, etype, ipv, sport), r
        assert not r["parse_flags"] & records.PARSE_VLAN_LIMIT
    for r, t in zip(rows, tshark("qinqinq.pcap")):
        inner = [v for v in t["vlan.id"].split(",") if v]
        assert r["vlan_inner_id"] == int(inner[-1])
        assert r["src_port"] == int(t["udp.srcport"] or t["tcp.srcport"])
    assert rows[0]["vlan_id"] == int(tshark("qinqinq.pcap")[0]["ieee8021ad.id"])


def test_dns_long_names_and_cut_header(lab, tmp_path):
    frames = frames_of("dns-long-name.pcap")
    rows, _ = replay(lab, tmp_path, frames)
    assert [r["wire_len"] for r in rows] == [len(f) for f in frames]
    full, over, cut, dotted = rows
    assert (full["dns_qname"], full["dns_qtype"], full["truncated"]) == (".".join(gf.LONG_LABELS), 16, 0)
    assert (over["dns_qname"], over["truncated"], over["dns_qtype"], over["dns_id"]) == \
        ("", ah.TRUNC_DNS_QNAME, 16, 0x4343)
    assert (cut["dns_id"], cut["truncated"]) == (0x4444, ah.TRUNC_DNS_HEADER)
    assert (dotted["dns_qname"], dotted["dns_qtype"], dotted["truncated"]) == (gf.DOTTED_QNAME, 1, 0)
    t = tshark("dns-long-name.pcap")
    assert full["dns_qname"] == t[0]["dns.qry.name"] and full["dns_id"] == int(t[0]["dns.id"], 16)
    assert t[1]["dns.qry.name"] == "<Name too long>"  # tshark: no name either; ours says so in `truncated`
