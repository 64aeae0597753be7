"""Connections (bpf/conntrack.h + collector/connections.py) on real eBPF, real stacks, in a lab.

One capture in auto mode watches the root-side veth of one lab host for the whole module (one
BPF compile); each test uses its own ports and picks its connection's rows out of everything the
drain returns. Expected conn_state and history are written by hand from Zeek's definitions
(base/protocols/conn/main.zeek conn_state(), the TCP analyzer's endpoint states and
update_history()). Frames that must go unanswered are crafted with scapy and sent to a MAC no
one owns: the classifier sees them at ingress, the kernel drops them (PACKET_OTHERHOST).
"""

from __future__ import annotations

import os
import re
import socket
import struct
import sys
import threading
import time

import pytest
from scapy.all import IP, TCP, Ether

from hdrlog.bpf import SOURCE_DIR
from hdrlog.collector import connections as cm
from hdrlog.collector import records
from hdrlog.collector.capture import Capture, CaptureConfig
from hdrlog.collector.communityid import community_id
from hdrlog.dev.lab import Lab
from tests.frames import FAKE_SRC, send_frames, v16

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="eBPF and network namespaces need root")

NOBODY_MAC = "02:48:44:00:00:99"  # owned by no interface: frames to it are seen, then dropped


# -- pure parts ----------------------------------------------------------------------------

# The constants and layouts shared with bpf/conntrack.h: tests/test_capture_records.py
# (test_constants_mirror_the_bpf_headers, one test for every header).


@pytest.mark.parametrize("os_,rs,sizes,hist,want", [
    (cm.ZS_SYN_SENT, cm.ZS_INACTIVE, (0, 0), "S", "S0"),
    (cm.ZS_ESTABLISHED, cm.ZS_ESTABLISHED, (1, 1), "ShAD", "S1"),
    (cm.ZS_CLOSED, cm.ZS_CLOSED, (5, 5), "ShADadFf", "SF"),
    (cm.ZS_SYN_SENT, cm.ZS_RESET, (0, 0), "Sr", "REJ"),
    (cm.ZS_CLOSED, cm.ZS_ESTABLISHED, (5, 5), "ShADF", "S2"),
    (cm.ZS_ESTABLISHED, cm.ZS_CLOSED, (5, 5), "ShADf", "S3"),
    (cm.ZS_RESET, cm.ZS_ESTABLISHED, (5, 5), "ShADR", "RSTO"),
    (cm.ZS_ESTABLISHED, cm.ZS_RESET, (5, 5), "ShADr", "RSTR"),
    (cm.ZS_RESET, cm.ZS_INACTIVE, (0, 0), "SR", "RSTOS0"),
    (cm.ZS_INACTIVE, cm.ZS_RESET, (0, 0), "hr", "RSTRH"),
    (cm.ZS_CLOSED, cm.ZS_INACTIVE, (0, 0), "SF", "SH"),
    (cm.ZS_INACTIVE, cm.ZS_CLOSED, (0, 0), "hf", "SHR"),
    (cm.ZS_PARTIAL, cm.ZS_PARTIAL, (5, 5), "Dd", "OTH"),
    (cm.ZS_RESET, cm.ZS_INACTIVE, (0, 0), "R", "OTH"),
])
def test_zeek_conn_state_table(os_, rs, sizes, hist, want):
    assert cm.zeek_conn_state(6, os_, rs, *sizes, hist) == want


def test_zeek_udp_and_icmp_states():
    assert cm.zeek_conn_state(17, cm.ZS_ESTABLISHED, cm.ZS_ESTABLISHED, 1, 1, "Dd") == "SF"
    assert cm.zeek_conn_state(17, cm.ZS_ESTABLISHED, cm.ZS_INACTIVE, 1, 0, "D") == "S0"
    assert cm.zeek_conn_state(1, cm.ZS_ESTABLISHED, cm.ZS_ESTABLISHED, 1, 1, "") == "OTH"


def test_uid_is_stable_and_zeek_shaped():
    a = cm.uid_of("h1", b"k" * 44, 123)
    assert a == cm.uid_of("h1", b"k" * 44, 123) and re.fullmatch(r"C[0-9A-Za-z]{17}", a)
    assert a != cm.uid_of("h2", b"k" * 44, 123) and a != cm.uid_of("h1", b"k" * 44, 124)


def test_community_id_spec_vectors():
    assert community_id(6, "128.232.110.120", "66.35.250.204", 34855, 80) == "1:LQU9qZlK+B5F3KDmev6m5PMibrg="
    assert community_id(17, "192.168.1.52", "8.8.8.8", 54585, 53) == "1:d/FP5EW3wiY1vCndhwleRRKHowQ="
    assert community_id(1, "192.168.0.89", "192.168.0.1", 8, 0) == "1:X0snYXpgwiv9TZtqg64sgzUn6Dk="


# -- the lab -------------------------------------------------------------------------------

class Conns:
    """The module's capture and every connection row it produced so far."""

    def __init__(self, lab: Lab, host, cap: Capture):
        self.lab, self.h, self.cap = lab, host, cap
        self.rows: list[dict] = []

    def _pull(self) -> None:
        cols = self.cap.drain_connections()
        while self.cap.poll(0):  # keep the ring buffer from filling
            pass
        if not cols:
            return
        n = len(cols["uid"])
        for i in range(n):
            self.rows.append({k: (v[i].tobytes() if getattr(v, "dtype", None) is not None and v.dtype.kind == "V"
                                  else (v[i].item() if hasattr(v[i], "item") else v[i])) for k, v in cols.items()})

    def of_port(self, port: int, final_timeout: float = 10.0, proto: int | None = None) -> list[dict]:
        """Rows of the connection(s) with ``port`` at either end, once one has its final row."""
        deadline = time.monotonic() + final_timeout
        while True:
            self._pull()
            mine = [r for r in self.rows if port in (r["orig_port"], r["resp_port"])
                    and (proto is None or r["ip_proto"] == proto)]
            if any(r["final"] for r in mine) or time.monotonic() > deadline:
                return mine
            time.sleep(0.2)


@pytest.fixture(scope="module")
def conns():
    with Lab("cn") as lab:
        h = lab.add_host("a")
        cap = Capture(CaptureConfig(
            ifaces=[h.peer_ifname], mode="auto", host="conn-test",
            conn=cm.ConnConfig(interim=1.0, tcp_timeout=2.0, udp_timeout=1.5, icmp_timeout=1.5, linger=0.3)))
        cap.start()
        try:
            yield Conns(lab, h, cap)
        finally:
            cap.stop()


def _final(rows: list[dict]) -> dict:
    finals = [r for r in rows if r["final"]]
    assert len(finals) == 1, rows
    assert len({r["uid"] for r in rows}) == 1, rows
    return finals[0]


def _client(conns: Conns, code: str) -> str:
    return conns.lab.run(conns.h, sys.executable, "-c", code, timeout=30).stdout


def _server(addr: str, port: int, handler, kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    if kind == socket.SOCK_STREAM:
        s.listen()
    s.settimeout(15)
    t = threading.Thread(target=lambda: (handler(s), s.close()), daemon=True)
    t.start()
    return t


def _check_common(row: dict, conns: Conns, proto: int, cport: int | None, sport: int, t0: int):
    h = conns.h
    assert row["ifname"] == h.peer_ifname
    assert row["ip_version"] == 4 and row["ip_proto"] == proto
    assert row["orig_ip"] == v16(h.addr4) and row["resp_ip"] == v16(h.peer_addr4)
    assert row["resp_port"] == sport
    if cport is not None:
        assert row["orig_port"] == cport
    assert t0 <= row["start_ts"] <= row["end_ts"] <= time.time_ns()
    assert re.fullmatch(r"C[0-9A-Za-z]{17}", row["uid"])
    assert row["community_id"] == community_id(proto, h.addr4, h.peer_addr4, row["orig_port"], row["resp_port"])


def _tcp_ip_bytes_ok(row: dict, side: str):
    # Linux: 20-byte IPv4 header, 32-byte TCP header (timestamps), 40 on the SYN / SYN-ACK.
    assert row[f"{side}_ip_bytes"] == row[f"{side}_bytes"] + 52 * row[f"{side}_pkts"] + 8


CLIENT_TCP = """
import socket, struct, sys
s = socket.socket()
s.bind(('{src}', {cport}))
s.connect(('{dst}', {sport}))
s.sendall(b'q' * {req})
got = 0
while got < {resp}:
    got += len(s.recv(65536))
{close}
print(got)
"""


def test_tcp_data_both_ways_clean_close_is_SF(conns):
    h, sport, cport = conns.h, 47001, 47101
    t0 = time.time_ns()

    def serve(s):
        c, _ = s.accept()
        got = 0
        while got < 1000:
            got += len(c.recv(65536))
        c.sendall(b"r" * 3000)
        while c.recv(65536):  # until the client's FIN
            pass
        c.close()

    t = _server(h.peer_addr4, sport, serve)
    out = _client(conns, CLIENT_TCP.format(src=h.addr4, cport=cport, dst=h.peer_addr4, sport=sport, req=1000,
                                           resp=3000, close="s.shutdown(socket.SHUT_WR); s.recv(10); s.close()"))
    assert out.strip() == "3000"
    t.join(10)
    row = _final(conns.of_port(sport))
    _check_common(row, conns, 6, cport, sport, t0)
    assert row["conn_state"] == "SF"
    hist = row["history"]
    # Zeek's letters, each once: SYN, SYN-ACK, the originator's ACK, data both ways, FINs (originator first).
    assert hist.startswith("ShA") and sorted(hist) == sorted("ShADadFf") or sorted(hist) == sorted("ShADdFf"), hist
    assert hist.index("D") < hist.index("F") and hist.index("d") < hist.index("f") and hist.index("F") < hist.index("f")
    assert (row["orig_bytes"], row["resp_bytes"]) == (1000, 3000)
    assert row["orig_pkts"] >= 5 and row["resp_pkts"] >= 4
    _tcp_ip_bytes_ok(row, "orig")
    _tcp_ip_bytes_ok(row, "resp")
    assert 0 < row["handshake_rtt_us"] < 1_000_000
    assert (row["orig_retrans"], row["resp_retrans"], row["zero_windows"]) == (0, 0, 0)


def test_refused_is_REJ(conns):
    h, sport = conns.h, 47002  # nothing listens: the root stack answers the SYN with RST+ACK
    t0 = time.time_ns()
    out = _client(conns, f"""
import socket
s = socket.socket()
try:
    s.connect(('{h.peer_addr4}', {sport}))
except ConnectionRefusedError:
    print('refused')
""")
    assert out.strip() == "refused"
    row = _final(conns.of_port(sport))
    _check_common(row, conns, 6, None, sport, t0)
    assert (row["conn_state"], row["history"]) == ("REJ", "Sr")
    assert (row["orig_pkts"], row["resp_pkts"], row["orig_bytes"], row["resp_bytes"]) == (1, 1, 0, 0)
    assert (row["orig_ip_bytes"], row["resp_ip_bytes"]) == (60, 40)  # SYN with options; bare RST+ACK
    assert row["handshake_rtt_us"] == 0


def _crafted(conns: Conns, tmp_path, sport: int, dport: int, flags: list[str]) -> None:
    h = conns.h
    eth = Ether(src=FAKE_SRC, dst=NOBODY_MAC)
    ip = IP(src=h.addr4, dst=h.peer_addr4)
    frames = []
    seq = 1000
    for f in flags:
        frames.append(bytes(eth / ip / TCP(sport=sport, dport=dport, flags=f, seq=seq, window=1000)))
        if "S" in f:
            seq += 1
    send_frames(conns.lab, h, frames, tmp_path)


def test_syn_unanswered_is_S0(conns, tmp_path):
    t0 = time.time_ns()
    _crafted(conns, tmp_path, 47103, 47003, ["S"])
    row = _final(conns.of_port(47003))  # after the TCP inactivity timeout (2 s here)
    _check_common(row, conns, 6, 47103, 47003, t0)
    assert (row["conn_state"], row["history"]) == ("S0", "S")
    assert (row["orig_pkts"], row["resp_pkts"], row["orig_ip_bytes"], row["resp_ip_bytes"]) == (1, 0, 40, 0)
    assert (row["orig_bytes"], row["resp_bytes"], row["handshake_rtt_us"]) == (0, 0, 0)


def test_syn_then_fin_unanswered_is_SH(conns, tmp_path):
    t0 = time.time_ns()
    _crafted(conns, tmp_path, 47104, 47004, ["S", "F"])
    row = _final(conns.of_port(47004))
    _check_common(row, conns, 6, 47104, 47004, t0)
    assert (row["conn_state"], row["history"]) == ("SH", "SF")
    assert (row["orig_pkts"], row["resp_pkts"], row["orig_bytes"]) == (2, 0, 0)


def test_syn_then_rst_unanswered_is_RSTOS0(conns, tmp_path):
    t0 = time.time_ns()
    _crafted(conns, tmp_path, 47105, 47005, ["S", "R"])
    row = _final(conns.of_port(47005))
    _check_common(row, conns, 6, 47105, 47005, t0)
    assert (row["conn_state"], row["history"]) == ("RSTOS0", "SR")


def _reset_test(conns: Conns, sport: int, cport: int, who: str):
    h = conns.h
    t0 = time.time_ns()
    linger0 = struct.pack("ii", 1, 0)

    def serve(s):
        c, _ = s.accept()
        c.recv(100)
        c.sendall(b"r" * 200)
        if who == "resp":
            time.sleep(0.2)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
            c.close()
        else:
            try:
                c.recv(10)  # the client's RST ends it
            except ConnectionResetError:
                pass
            c.close()

    t = _server(h.peer_addr4, sport, serve)
    close = ("import struct; s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0)); s.close()"
             if who == "orig" else "import time; time.sleep(0.6); s.close()")
    _client(conns, CLIENT_TCP.format(src=h.addr4, cport=cport, dst=h.peer_addr4, sport=sport, req=100, resp=200,
                                     close=close))
    t.join(10)
    row = _final(conns.of_port(sport))
    _check_common(row, conns, 6, cport, sport, t0)
    assert (row["orig_bytes"], row["resp_bytes"]) == (100, 200)
    assert row["handshake_rtt_us"] > 0
    return row


def test_originator_reset_is_RSTO(conns):
    row = _reset_test(conns, 47006, 47106, "orig")
    assert row["conn_state"] == "RSTO"
    assert row["history"].startswith("ShA") and row["history"].endswith("R") and "F" not in row["history"]


def test_responder_reset_is_RSTR(conns):
    row = _reset_test(conns, 47007, 47107, "resp")
    assert row["conn_state"] == "RSTR"
    assert row["history"].startswith("ShA") and "r" in row["history"] and "f" not in row["history"]


def test_udp_answered_is_SF_and_unanswered_S0(conns):
    h = conns.h
    t0 = time.time_ns()

    def serve(s):
        _, peer = s.recvfrom(2048)
        s.sendto(b"u" * 200, peer)

    t = _server(h.peer_addr4, 47008, serve, socket.SOCK_DGRAM)
    _client(conns, f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('{h.addr4}', 47108))
s.settimeout(5)
s.sendto(b'x' * 100, ('{h.peer_addr4}', 47008))
s.recvfrom(2048)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(('{h.addr4}', 47109))
u.sendto(b'y' * 50, ('{h.peer_addr4}', 47009))
""")
    t.join(5)
    row = _final(conns.of_port(47008, proto=17))
    _check_common(row, conns, 17, 47108, 47008, t0)
    assert (row["conn_state"], row["history"]) == ("SF", "Dd")
    assert (row["orig_pkts"], row["resp_pkts"], row["orig_bytes"], row["resp_bytes"]) == (1, 1, 100, 200)
    assert (row["orig_ip_bytes"], row["resp_ip_bytes"]) == (128, 228)
    row = _final(conns.of_port(47009, proto=17))  # the root stack's port unreachable is an ICMP connection
    _check_common(row, conns, 17, 47109, 47009, t0)
    assert (row["conn_state"], row["history"]) == ("S0", "D")
    assert (row["orig_pkts"], row["resp_pkts"], row["orig_bytes"], row["orig_ip_bytes"]) == (1, 0, 50, 78)


def test_icmp_echo_is_one_OTH_connection(conns):
    h = conns.h
    t0 = time.time_ns()
    conns.lab.run(h, "ping", "-c", "3", "-i", "0.2", "-s", "56", h.peer_addr4)
    deadline = time.monotonic() + 10
    while True:
        conns._pull()
        mine = [r for r in conns.rows if r["ip_proto"] == 1 and r["orig_port"] == 8 and r["start_ts"] >= t0]
        if any(r["final"] for r in mine) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    row = _final(mine)
    _check_common(row, conns, 1, 8, 0, t0)  # Zeek: orig_p = type 8, resp_p = 0 (the reply's type)
    assert (row["conn_state"], row["history"]) == ("OTH", "")
    assert (row["orig_pkts"], row["resp_pkts"]) == (3, 3)
    assert (row["orig_bytes"], row["resp_bytes"]) == (3 * 56, 3 * 56)
    assert (row["orig_ip_bytes"], row["resp_ip_bytes"]) == (3 * 84, 3 * 84)


def test_long_connection_has_interim_rows_and_one_final(conns):
    h, sport, cport = conns.h, 47010, 47110
    t0 = time.time_ns()

    def serve(s):
        c, _ = s.accept()
        while True:
            d = c.recv(65536)
            if not d:
                break
            c.sendall(b"e" * (2 * len(d)))
        c.close()

    t = _server(h.peer_addr4, sport, serve)
    client = threading.Thread(target=_client, args=(conns, f"""
import socket, time
s = socket.socket()
s.bind(('{h.addr4}', {cport}))
s.connect(('{h.peer_addr4}', {sport}))
got = 0
for i in range(8):
    s.sendall(b'm' * 100)
    while got < 200 * (i + 1):
        got += len(s.recv(65536))
    time.sleep(0.5)
s.shutdown(socket.SHUT_WR)
s.recv(10)
s.close()
"""), daemon=True)
    client.start()
    fill = []
    while client.is_alive():  # the collector reads the map every second while the connection lives
        conns._pull()
        fill.append(conns.cap.map_fill()["conn"])
        time.sleep(0.25)
    # the map's fill level (exported as hdrlog_collector_map_entries) saw the open connection
    assert max(n for n, _ in fill) >= 1 and {cap for _, cap in fill} == {conns.cap.config.conn.entries}
    t.join(10)
    rows = conns.of_port(sport)
    final = _final(rows)
    _check_common(final, conns, 6, cport, sport, t0)
    interim = [r for r in rows if not r["final"]]
    assert len(interim) >= 3, rows  # ~4 s alive, an interim row every second
    assert final["conn_state"] == "SF" and (final["orig_bytes"], final["resp_bytes"]) == (800, 1600)
    series = [r["orig_bytes"] for r in interim] + [final["orig_bytes"]]
    assert series == sorted(series) and interim[0]["orig_bytes"] < 800  # cumulative, never summed twice
    assert all(r["conn_state"] == "S1" for r in interim[:2])
    assert all(r["start_ts"] == final["start_ts"] for r in interim)
    assert sum(r["final"] for r in rows) == 1
    assert conns.cap.counters()["conn_map_full"] == 0
