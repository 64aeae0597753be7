"""App-layer decoders: agree with scapy-built messages, and never raise on hostile bytes."""

from __future__ import annotations

import struct

from hypothesis import given, settings, strategies as st
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.tls.extensions import TLS_Ext_ServerName, ServerName, TLS_Ext_SupportedVersion_CH, \
    TLS_Ext_ALPN, ProtocolName
from scapy.layers.tls.handshake import TLSClientHello
from scapy.layers.tls.record import TLS

from hdrlog.collector import appheaders as ah


def test_dns_query_and_response():
    q = bytes(DNS(id=0x1234, rd=1, qd=DNSQR(qname="WWW.Example.ORG", qtype="AAAA")))
    h = ah.parse_payload(q, 17, 40000, 53)
    assert (h.dns_id, h.dns_qname, h.dns_qtype, h.dns_rcode, h.dns_flags & 0x8000) == \
        (0x1234, "www.example.org", 28, 0, 0)
    r = bytes(DNS(id=7, qr=1, rcode=3, qd=DNSQR(qname="nx.example.org"),
                  an=DNSRR(rrname="nx.example.org", rdata="198.18.0.1")))
    h = ah.parse_payload(r, 17, 53, 40000)
    assert (h.dns_qname, h.dns_rcode, h.dns_answers, bool(h.dns_flags & 0x8000)) == ("nx.example.org", 3, 1, True)
    # DNS over TCP carries a 2-byte length first.
    h = ah.parse_payload(struct.pack("!H", len(q)) + q, 6, 40000, 53)
    assert h.dns_qname == "www.example.org"


def test_dns_names_compression_loops_and_odd_bytes():
    header = struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0)
    # A pointer back to an earlier name is followed; loops and forward pointers are not.
    assert ah.dns_name(header + b"\x03org\x00\x03abc\xc0\x0c", 17) == ("abc.org", 23)
    assert ah.dns_name(header + b"\x03abc\xc0\x0c", 12) == ("", 18)  # back to its own start: a loop
    assert ah.dns_name(header + b"\x03abc\xc0\x10", 12) == ("", 18)  # points at itself
    assert ah.dns_name(header + b"\xc0\x20", 12)[0] == ""
    assert ah.dns_name(header + b"\x03a.b\x00", 12)[0] == "a\\046b"
    assert ah.dns_name(header + b"\x05ab", 12)[0] == "ab"  # cut short
    long = b"".join(b"\x3f" + b"a" * 63 for _ in range(5)) + b"\x00"
    assert len(ah.dns_name(header + long, 12)[0]) <= ah.DNS_MAX_NAME


def test_http_request_and_response():
    req = b"POST /api/v1/items?x=1 HTTP/1.1\r\nUser-Agent: curl/8\r\nHOST: Example.org:8080\r\n\r\nbody"
    h = ah.parse_payload(req, 6, 50000, 8080)
    assert (h.http_method, h.http_path, h.http_host, h.http_user_agent) == \
        ("POST", "/api/v1/items?x=1", "Example.org:8080", "curl/8")
    h = ah.parse_payload(b"HTTP/1.1 404 Not Found\r\n", 6, 80, 50000)
    assert h.http_status == 404
    assert ah.parse_payload(b"GETS /\r\n", 6, 1, 2) is None  # an unknown token needs its " HTTP/" (issue 14)
    assert ah.parse_payload(b"GETS / HTTP/1.1\r\n", 6, 1, 2).http_method == "GETS"
    h = ah.parse_payload(b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n", 6, 1, 2)
    assert len(h.http_path) == ah.MAX_STR


def test_tls_client_hello():
    hello = TLS(msg=[TLSClientHello(ext=[
        TLS_Ext_ServerName(servernames=[ServerName(servername=b"Secure.Example.org")]),
        TLS_Ext_ALPN(protocols=[ProtocolName(protocol=b"h2"), ProtocolName(protocol=b"http/1.1")]),
        TLS_Ext_SupportedVersion_CH(versions=[0x0A0A, 0x0304, 0x0303]),
    ])])
    h = ah.parse_payload(bytes(hello), 6, 50000, 443)
    assert (h.tls_sni, h.tls_alpn, h.tls_offered_versions, h.tls_version) == \
        ("secure.example.org", ["h2", "http/1.1"], [0x0304, 0x0303], 0x0304)


@settings(max_examples=3000, deadline=None)
@given(payload=st.binary(max_size=300), proto=st.sampled_from([6, 17]),
       sport=st.sampled_from([53, 80, 443, 40000]), dport=st.sampled_from([53, 80, 443, 40000]))
def test_never_raises_on_random_bytes(payload, proto, sport, dport):
    h = ah.parse_payload(payload, proto, sport, dport)
    if h is not None:
        for text in (h.http_path, h.http_host, h.tls_sni, h.http_user_agent):
            assert len(text) <= ah.MAX_STR
        assert len(h.dns_qname) <= 4 * ah.DNS_MAX_NAME and not h.dns_qname.endswith("\\")


@settings(max_examples=1500, deadline=None)
@given(prefix=st.sampled_from([b"\x16\x03\x01", b"GET /", b"HTTP/1.1 ", b"\x00\x01\x01\x00\x00\x01"]),
       rest=st.binary(max_size=300), cut=st.integers(min_value=0, max_value=400))
def test_never_raises_on_truncated_plausible_messages(prefix, rest, cut):
    data = (prefix + rest)[:cut]
    for sport, dport in ((40000, 443), (53, 40000)):
        ah.parse_payload(data, 6, sport, dport)
        ah.parse_payload(data, 17, sport, dport)


# -- issue 14: decoding gaps seen on real traffic ------------------------------------------------
from tests import gapframes as gf  # noqa: E402


def test_pq_client_hello_whole_and_cut():
    hello = gf.pq_client_hello()
    assert len(hello) > 1400
    h = ah.parse_payload(hello, 6, 50000, 443)
    assert (h.tls_sni, h.tls_alpn, h.tls_offered_versions, h.tls_version, h.truncated) == \
        (gf.PQ_SNI, ["h2", "http/1.1"], [0x0304, 0x0303], 0x0304, 0)
    # Cut at the old 1,024-byte copy: nothing past the cut, and never "offers TLS 1.2 only".
    h = ah.parse_payload(hello[:1024], 6, 50000, 443)
    assert h.truncated & ah.TRUNC_TLS_HELLO and h.tls_missing == len(hello) - 1024
    assert (h.tls_sni, h.tls_offered_versions, h.tls_version) == ("", [], 0)


def test_pq_server_hello_cut_and_whole():
    sh = gf.pq_server_hello()
    assert len(sh) > 1024
    h = ah.parse_payload(sh, 6, 443, 50000)
    assert (h.tls_version, h.truncated) == (0x0304, 0)
    h = ah.parse_payload(sh[:1024], 6, 443, 50000)
    assert h.tls_version == 0 and h.truncated & ah.TRUNC_TLS_HELLO  # not the legacy 0x0303


def test_malformed_hellos_ending_before_extensions_offer_the_legacy_version():
    for hello, version in ((gf.hello_without_extensions(0x0301), 0x0301), (gf.hello_ending_inside_ciphers(), 0x0303)):
        h = ah.parse_payload(hello, 6, 50000, 443)
        assert (h.tls_version, h.tls_offered_versions, h.truncated) == (version, [version], 0)


def test_http_webdav_token_methods_bare_lf_and_spaces():
    for req in gf.WEBDAV:
        h = ah.parse_payload(req, 6, 50000, 80)
        assert h is not None and h.http_method == req.split(b" ")[0].decode(), req
        assert h.http_host == "dav.example.org" and h.truncated == 0
    h = ah.parse_payload(gf.TOKEN_METHOD, 6, 50000, 80)
    assert (h.http_method, h.http_path, h.http_host) == ("BREW", "/pot-1", "coffee.example.org")
    assert ah.parse_payload(b"BREW /pot-1\r\n\r\n", 6, 50000, 80) is None  # unknown token, no HTTP/ version
    h = ah.parse_payload(gf.BARE_LF, 6, 50000, 80)
    assert (h.http_method, h.http_path, h.http_host, h.http_user_agent, h.truncated) == \
        ("GET", "/lf-only", "lf.example.org", "lf/1", 0)
    h = ah.parse_payload(gf.SCANNER_GET, 6, 50000, 80)
    assert (h.http_method, h.http_path, h.http_host, h.http_user_agent) == \
        ("GET", "/cgi-bin/x;cat", "victim.example.org", "scan/1")
    assert h.truncated == ah.TRUNC_HTTP_PATH  # the target went on past a space: said so


def test_http_cut_values_are_flagged():
    h = ah.parse_payload(b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 6, 1, 2)
    assert len(h.http_path) == ah.MAX_STR and h.truncated & ah.TRUNC_HTTP_PATH and h.http_host == "x"
    h = ah.parse_payload(b"GET /a HTTP/1.1\r\nHost: cut.exa", 6, 1, 2)
    assert h.http_host == "cut.exa" and h.truncated & ah.TRUNC_HTTP_HOST and h.truncated & ah.TRUNC_HTTP_HEADERS
    h = ah.parse_payload(b"GET /a HTTP/1.1\r\nUser-Agent: " + b"u" * 300 + b"\r\n\r\n", 6, 1, 2)
    assert len(h.http_user_agent) == ah.MAX_STR and h.truncated == ah.TRUNC_HTTP_USER_AGENT
    h = ah.parse_payload(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", 6, 1, 2)
    assert h.truncated == 0


def test_dns_long_names_cut_on_bytes_not_escapes():
    h = ah.parse_payload(gf.dns_long_name_query(over=False), 17, 40000, 53)
    assert h.dns_qname == ".".join(gf.LONG_LABELS) and h.truncated == 0 and h.dns_qtype == 16
    # Past 255 octets it is no name (tshark: "<Name too long>"): '' -- flagged, not silently -- and the type.
    h = ah.parse_payload(gf.dns_long_name_query(over=True), 17, 40000, 53)
    assert (h.dns_qname, h.dns_qtype, h.truncated) == ("", 16, ah.TRUNC_DNS_QNAME)
    # Escapes never count against the limit: 253 characters of dots inside labels (\046) come whole.
    dotted = [b"x." * 31 + b"x"] * 3 + [b"y" * 61]  # 255 octets with its length octets and root
    qname = b"".join(bytes([len(x)]) + x for x in dotted) + b"\x00"
    h = ah.parse_payload(struct.pack("!HHHHHH", 9, 0, 1, 0, 0, 0) + qname + b"\x00\x01\x00\x01", 17, 40000, 53)
    assert h.truncated == 0 and h.dns_qtype == 1 and len(h.dns_qname) > ah.MAX_STR
    assert h.dns_qname == ".".join(["x\\046" * 31 + "x"] * 3 + ["y" * 61])
    # Cut short by the capture inside the name: what was read, flagged.
    q = gf.dns_long_name_query(over=False)
    h = ah.parse_payload(q[:100], 17, 40000, 53)
    assert h.dns_qname == "a" * 63 + "." + "b" * 23 and h.truncated & ah.TRUNC_DNS_QNAME


def test_dns_cut_header_still_gives_the_id():
    q = gf.dns_long_name_query(over=False)
    for n in (2, 3, 5, 11):
        h = ah.parse_payload(q[:n], 17, 40000, 53)
        assert h is not None and h.dns_id == 0x4242 and h.truncated & ah.TRUNC_DNS_HEADER, n
    assert ah.parse_payload(q[:1], 17, 40000, 53) is None


def test_truncated_bits_are_documented():
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "sql.md").read_text()
    listed = {m[0]: int(m[1]) for m in re.findall(r"`(TRUNC_\w+)` \((\d+)\)", doc)}
    assert listed == {name: bit for bit, name in ah.TRUNC_NAMES.items()}
    assert all(b and b & (b - 1) == 0 for b in ah.TRUNC_NAMES) and max(ah.TRUNC_NAMES) < 1 << 16  # UInt16


def test_http_prefixes_mirror_the_kernel():
    import re

    from hdrlog.bpf import SOURCE_DIR

    text = (SOURCE_DIR / "payload.h").read_text()  # app_candidate() lives in payload.h
    body = text[text.index("app_candidate("):]
    body = body[:body.index("\n}\n")]
    words = {int(m, 16).to_bytes(4, "big") for m in re.findall(r"case 0x([0-9a-f]{8}):", body)}
    assert words == set(ah.HTTP_PREFIXES)
    for head, want in ((b"BREW /po", True), (b"USER ano", False), (b"SSH-2.0-", False), (b"PROPFIND", True),
                       (b"ABCDEFG ", True), (b"M * HTTP", True), (b"XY http:", True), (b"EHLO exa", False)):
        assert ah.http_head(head) is want, head
