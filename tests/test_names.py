"""Issue 14, names and fingerprints: DNS answers and rtt, passive DNS and resp_name, JA4, QUIC Initials.

Oracles: tshark for DNS answers and the QUIC Initial's SNI (it decrypts Initials itself),
PyPI ``ja4plus`` for JA4 (its JA4 fingerprinter only -- the BSD-3 part; nothing of it ships).
The lab part runs the real classifier on a lab veth with real stacks: the namespace's glibc
resolver asks a lab DNS server (in the root namespace, answering after a known delay), then
Python's ssl and curl connect to the address it gave; aioquic builds a real QUIC Initial
that a UDP socket in the namespace sends to port 443.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from scapy.all import DNS, DNSQR, DNSRR, IP, TCP, UDP, Ether, Raw, rdpcap, wrpcap

from hdrlog.collector import appdecode, appheaders as ah, ja4, quic
from hdrlog.collector import connections as cm
from hdrlog.collector.capture import Capture, CaptureConfig
from hdrlog.collector.names import Names
from tests.frames import v16

CAPTURES = Path(__file__).resolve().parent / "captures"
ja4plus = pytest.importorskip("ja4plus.fingerprinters.ja4")


def _tshark(path: Path, *fields: str, extra: tuple[str, ...] = ()) -> list[list[str]]:
    out = subprocess.run(["tshark", "-r", str(path), *extra, "-T", "fields", "-E", "separator=|"]
                         + [a for f in fields for a in ("-e", f)], capture_output=True, text=True, check=True)
    return [line.split("|") for line in out.stdout.splitlines()]


def _oracle_ja4(payload: bytes, udp: bool = False) -> str:
    l4 = UDP(sport=40001, dport=443) if udp else TCP(sport=40000, dport=443, flags="PA", seq=1)
    pkt = Ether() / IP(src="198.18.250.2", dst="198.18.250.1") / l4 / Raw(payload)
    return ja4plus.JA4Fingerprinter().process_packet(pkt) or ""


def python_hello(sni: str = "py.example.org") -> bytes:
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    out, inc = ssl.MemoryBIO(), ssl.MemoryBIO()
    s = ctx.wrap_bio(inc, out, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        s.do_handshake()
    return out.read()


def first_tls_record(c: socket.socket) -> bytes:
    """Read from ``c`` until its first TLS record (a ClientHello here) is whole, or the peer closes."""
    data = b""
    while len(data) < 5 or len(data) < 5 + int.from_bytes(data[3:5], "big"):
        got = c.recv(65536)
        if not got:
            break
        data += got
    return data


def curl_hello(sni: str = "curl.example.org") -> bytes:
    """The first bytes curl sends to a TLS server (a loopback listener that only reads)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    p = subprocess.Popen(["curl", "-sk", "--max-time", "3", "--resolve", f"{sni}:{port}:127.0.0.1",
                          f"https://{sni}:{port}/"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        srv.settimeout(5)
        c, _ = srv.accept()
        c.settimeout(2)
        with c:
            return first_tls_record(c)
    finally:
        srv.close()
        p.kill()
        p.wait()


def quic_initial(sni: str = "quic.example.org", alpn: tuple[str, ...] = ("h3",)) -> bytes:
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    c = QuicConnection(configuration=QuicConfiguration(is_client=True, server_name=sni, alpn_protocols=list(alpn)))
    c.connect(("198.18.250.1", 443), now=time.time())
    return c.datagrams_to_send(now=time.time())[0][0]


def pq_hello() -> bytes:
    """The browser-sized (post-quantum) ClientHello of tests/captures, its two segments joined."""
    frames = rdpcap(str(CAPTURES / "tls-pq-hello-2seg.pcap"))
    return bytes(frames[0][TCP].payload) + bytes(frames[1][TCP].payload)


# -- DNS answers ------------------------------------------------------------------------------

def test_dns_answers_equal_tsharks_reading(tmp_path):
    resp = DNS(id=7, qr=1, rd=1, ra=1, qd=DNSQR(qname="www.example.org", qtype="A"), ancount=4, an=[
        DNSRR(rrname="www.example.org", type="CNAME", ttl=60, rdata="edge.example.net"),
        DNSRR(rrname="edge.example.net", type="A", ttl=300, rdata="198.18.0.5"),
        DNSRR(rrname="edge.example.net", type="A", ttl=299, rdata="198.18.0.6"),
        DNSRR(rrname="edge.example.net", type="AAAA", ttl=30, rdata="2001:db8::5")])
    pcap = tmp_path / "dns.pcap"
    wrpcap(str(pcap), [Ether() / IP(src="198.18.250.1", dst="198.18.250.2") / UDP(sport=53, dport=33333) / resp])
    h = ah.AppHeaders()
    ah.parse_dns(bytes(resp), h)
    assert h.truncated == 0
    text = appdecode.answer_records(h.dns_answer_list)
    assert text == "CNAME edge.example.net 60,A 198.18.0.5 300,A 198.18.0.6 299,AAAA 2001:db8::5 30"
    (cname, a, aaaa, ttls), = _tshark(pcap, "dns.cname", "dns.a", "dns.aaaa", "dns.resp.ttl")
    assert [v for t, v, _, _ in h.dns_answer_list if t == 5] == cname.split(",")
    assert [v for t, v, _, _ in h.dns_answer_list if t == 1] == a.split(",")
    assert [v for t, v, _, _ in h.dns_answer_list if t == 28] == aaaa.split(",")
    assert [str(ttl) for _, _, ttl, _ in h.dns_answer_list] == ttls.split(",")


def test_dns_answers_cut_copy_is_flagged():
    resp = DNS(id=7, qr=1, qd=DNSQR(qname="a.example"), ancount=2, an=[
        DNSRR(rrname="a.example", type="A", ttl=5, rdata="198.18.0.5"),
        DNSRR(rrname="a.example", type="A", ttl=5, rdata="198.18.0.6")])
    h = ah.AppHeaders()
    ah.parse_dns(bytes(resp)[:-3], h)
    assert [v for _, v, _, _ in h.dns_answer_list] == ["198.18.0.5"] and h.truncated & ah.TRUNC_DNS_ANSWERS


def test_names_bounded_and_counted():
    n = Names(hosts=2, names_per_host=2, queries=2)
    for i in range(3):
        n._remember(b"c%d" % i, b"a", "x")
    assert n.counts["dns_hosts_evicted"] == 1 and n.resolved(b"c2", b"a") == "x" and n.resolved(b"c0", b"a") == ""
    for i in range(3):
        n._remember(b"c2", b"a%d" % i, f"n{i}")
    assert n.counts["dns_names_evicted"] == 2 and n.resolved(b"c2", b"a2") == "n2"


# -- JA4 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["python_ssl", "curl", "pq_browser"])
def test_ja4_equals_ja4plus(source):
    hello = {"python_ssl": python_hello, "curl": curl_hello, "pq_browser": pq_hello}[source]()
    want = _oracle_ja4(hello)
    assert want and ja4.ja4_of_record(hello) == want


def test_ja4_spec_example_parts():
    # FoxIO's technical_details/JA4.md: the sorted cipher list and the extension+signature string.
    assert ja4._hash12("002f,0035,009c,009d,1301,1302,1303,c013,c014,c02b,c02c,c02f,c030,cca8,cca9") == "8daaf6152771"
    assert ja4._hash12("0005,000a,000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,4469,ff01_"
                       "0403,0804,0401,0503,0805,0501,0806,0601") == "e5627efa2ab1"
    assert ja4._alpn_chars(b"http/1.1") == "h1" and ja4._alpn_chars(b"\xab\xcd") == "ad" and ja4._alpn_chars(b"") == "00"


def test_ja4_of_a_cut_hello_is_empty():
    hello = python_hello()
    assert ja4.ja4_of_record(hello[:200]) == ""


# -- QUIC -------------------------------------------------------------------------------------

def test_quic_initial_sni_equals_tshark(tmp_path):
    dgram = quic_initial("quic.example.org", ("h3", "h3-29"))
    pcap = tmp_path / "quic.pcap"
    wrpcap(str(pcap), [Ether() / IP(src="198.18.250.2", dst="198.18.250.1") / UDP(sport=40001, dport=443) / dgram])
    (version, sni, alpn), = _tshark(pcap, "quic.version", "tls.handshake.extensions_server_name",
                                    "tls.handshake.extensions_alpn_str")
    ini = quic.parse_initial(dgram)
    assert ini.decrypted and ini.version == int(version, 16) == quic.QUIC_V1
    hello, whole = quic.hello_of(ini.crypto)
    h = ah.AppHeaders()
    ah.parse_tls(quic.as_tls_record(hello), h)
    assert whole and h.tls_sni == sni == "quic.example.org"
    assert ",".join(h.tls_alpn) == alpn == "h3,h3-29"
    assert ja4.ja4_of_hello(hello, "q") == _oracle_ja4(dgram, udp=True)


def test_quic_hello_over_two_initials_is_joined():
    dgram = quic_initial()
    frames = quic.parse_initial(dgram).crypto
    (off, data), = frames
    r = quic.InitialReassembly()
    assert r.add(("k",), [(off + 100, data[100:])]) == (b"", False)
    hello, whole = r.add(("k",), [(0, data[:100])])
    assert whole and hello == data and r.completed == 1


def test_not_quic_is_not_decrypted():
    assert quic.parse_initial(b"\x16\x03\x01" + bytes(100)) is None
    ini = quic.parse_initial(bytes([0xC3]) + (1).to_bytes(4, "big") + bytes([8]) + bytes(8) + bytes(200))
    assert ini.version == 1 and not ini.decrypted and ini.crypto == []


# -- the lab: real classifier, real stacks ----------------------------------------------------

DNS_DELAY = 0.050
NAME = "svc.names-lab.example"
TTL = 120


def _dns_server(addr: str, answer: str, stop: threading.Event, sent: list) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, 53))
    s.settimeout(0.2)

    def run():
        while not stop.is_set():
            try:
                data, peer = s.recvfrom(2048)
            except socket.timeout:
                continue
            q = DNS(data)
            qd = q.qd[0] if q.qd else None
            an = []
            if qd is not None and qd.qtype == 1 and qd.qname.decode().rstrip(".") == NAME:
                an = [DNSRR(rrname=qd.qname, type="A", ttl=TTL, rdata=answer)]
            r = DNS(id=q.id, qr=1, aa=1, rd=q.rd, ra=1, qd=q.qd, ancount=len(an), an=an or None)
            time.sleep(DNS_DELAY)  # the known delay dns_rtt_us must show
            s.sendto(bytes(r), peer)
            sent.append(r)
        s.close()

    threading.Thread(target=run, daemon=True).start()
    return s


CLIENT = """
import socket, ssl, sys, subprocess
addr = socket.getaddrinfo({name!r}, {port}, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["h2", "http/1.1"])
s = socket.create_connection((addr, {port}), timeout=5)
try:
    ctx.wrap_socket(s, server_hostname={name!r}).close()
except (ssl.SSLError, OSError):
    pass
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.sendto(bytes.fromhex({quic!r}), (addr, 443))
print(addr)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="eBPF and network namespaces need root")
def test_lab_dns_rtt_resp_name_ja4_and_quic(lab, tmp_path):
    h = lab.add_host("names")
    resolv = Path("/etc/netns") / h.netns
    resolv.mkdir(parents=True, exist_ok=True)
    (resolv / "resolv.conf").write_text(f"nameserver {h.peer_addr4}\noptions timeout:2 attempts:1\n")
    stop = threading.Event()
    sent: list = []
    cap = Capture(CaptureConfig(ifaces=[h.peer_ifname], mode="auto", host="names-test",
                                conn=cm.ConnConfig(interim=1.0, tcp_timeout=2.0, udp_timeout=1.0, linger=0.3)))
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((h.peer_addr4, 47443))
    srv.listen()
    srv.settimeout(10)
    hellos: list[bytes] = []

    def tls_server():  # reads the ClientHello and closes: the hello is what the test is about
        try:
            c, _ = srv.accept()
            c.settimeout(3)
            with c:
                hellos.append(first_tls_record(c))
        except OSError:
            pass

    dgram = quic_initial("quic.names-lab.example")
    cap.start()
    try:
        _dns_server(h.peer_addr4, h.peer_addr4, stop, sent)
        threading.Thread(target=tls_server, daemon=True).start()
        out = lab.run(h, sys.executable, "-c", CLIENT.format(name=NAME, port=47443, quic=dgram.hex()), timeout=30)
        assert out.stdout.strip() == h.peer_addr4
        packets: list[dict] = []
        conns: list[dict] = []
        names: list[dict] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            cols = cap.poll(100)
            if cols:
                packets += [{k: v[i] for k, v in cols.items()} for i in range(len(cols["ts"]))]
            c = cap.drain_connections()
            if c:
                conns += [{k: v[i] for k, v in c.items()} for i in range(len(c["uid"]))]
            d = cap.drain_dns_names()
            if d:
                names += [{k: v[i] for k, v in d.items()} for i in range(len(d["name"]))]
            finals = {int(r["resp_port"]) for r in conns if r["final"]}
            if {47443, 443} <= finals:
                break
        counters = cap.counters()
    finally:
        stop.set()
        cap.stop()
        srv.close()
        (resolv / "resolv.conf").unlink()
        resolv.rmdir()
    # 1. The DNS response row: its answers as sent, its rtt the server's delay (+-25%).
    resp = [p for p in packets if int(p["src_port"]) == 53 and p["dns_qname"] == NAME and int(p["dns_qtype"]) == 1]
    assert len(resp) == 1, resp
    assert resp[0]["dns_answer_records"] == f"A {h.peer_addr4} {TTL}"
    rtt = int(resp[0]["dns_rtt_us"])
    print(f"dns_rtt_us {rtt} for a {DNS_DELAY * 1e6:.0f} us delay")
    assert 0.75 * DNS_DELAY * 1e6 <= rtt <= 1.25 * DNS_DELAY * 1e6
    assert counters["dns_rtt_matched"] >= 1
    # 2. Passive DNS: the mapping, and the connection's resp_name.
    mine = [n for n in names if n["name"] == NAME]
    assert len(mine) == 1 and bytes(mine[0]["address"]) == v16(h.peer_addr4)
    assert bytes(mine[0]["client_ip"]) == v16(h.addr4) and int(mine[0]["ttl"]) == TTL
    tls_rows = [r for r in conns if int(r["resp_port"]) == 47443]
    assert tls_rows and all(r["resp_name"] == NAME for r in tls_rows)
    # 3. JA4 on the ClientHello row and its connection, equal to ja4plus's of the same hello.
    assert hellos
    want = _oracle_ja4(hellos[0])
    hello_rows = [p for p in packets if int(p["dst_port"]) == 47443 and p["ja4"]]
    assert len(hello_rows) == 1 and hello_rows[0]["ja4"] == want and hello_rows[0]["tls_sni"] == NAME
    final = [r for r in tls_rows if r["final"]][-1]
    assert (final["ja4"], final["tls_sni"], final["tls_alpn"]) == (want, NAME, "h2,http/1.1")
    # 4. QUIC: the Initial's version and SNI on its row and on the UDP/443 connection.
    q = [p for p in packets if int(p["dst_port"]) == 443 and int(p["ip_proto"]) == 17]
    assert len(q) == 1 and int(q[0]["quic_version"]) == 1 and q[0]["tls_sni"] == "quic.names-lab.example"
    assert q[0]["ja4"] == _oracle_ja4(dgram, udp=True)
    qc = [r for r in conns if int(r["resp_port"]) == 443 and r["final"]]
    assert qc and qc[-1]["tls_sni"] == "quic.names-lab.example" and qc[-1]["tls_alpn"] == "h3"
    assert qc[-1]["resp_name"] == NAME


@pytest.mark.skipif(os.geteuid() != 0, reason="eBPF and network namespaces need root")
def test_quic_capture_through_the_classifier_equals_tshark(lab, tmp_path):
    from tests.test_capture_gaps import frames_of, replay

    (version, sni, alpn), = _tshark(CAPTURES / "quic-initial.pcap", "quic.version",
                                    "tls.handshake.extensions_server_name", "tls.handshake.extensions_alpn_str")
    frames = frames_of("quic-initial.pcap")
    rows, _ = replay(lab, tmp_path, frames)
    assert len(rows) == 1
    r = rows[0]
    assert (r["quic_version"], r["tls_sni"], r["tls_alpn"]) == (int(version, 16), sni, alpn)
    assert r["ja4"] == _oracle_ja4(bytes(rdpcap(str(CAPTURES / "quic-initial.pcap"))[0][UDP].payload), udp=True)
