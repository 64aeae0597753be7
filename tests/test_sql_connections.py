"""docs/sql.md's connection questions (30-35), each run on lab data and checked against what the
lab sent.

Real collector (auto mode, eBPF on two lab veths: clients ``a`` and ``b``), real server, real
chDB; services listen in the root namespace on the veths' peer addresses. Real stacks make the
refused connections, an originator reset, two transfers and a long-lived connection (interim
rows every second); crafted frames (scapy, sent to a MAC nobody owns, so the kernel drops them
after the hook saw them) make what real stacks on one machine cannot: unanswered SYNs, two
handshakes with a 300 ms and a 150 ms gap, and a connection whose data segment is sent three
times.
"""

from __future__ import annotations

import json
import sys
import threading

import pytest
from scapy.all import IP, TCP, Ether, Raw

from bench.cookbook import recipes
from bench.traffic import serve_tcp
from tests.frames import FAKE_SRC
from tests.support import CollectorProcess, ServerProcess, wait_until

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs Linux eBPF")

NOBODY_MAC = "02:48:44:00:00:99"
CLOSED, RESET, BULK, LONG = 49401, 49403, 49410, 49411
S0_PORT, SLOW1, SLOW2, RETRANS = 49402, 49420, 49421, 49430
UP_A, DOWN_B = 300_000, 400_000

SEND_TIMED = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
for gap, frame in json.load(open(sys.argv[1])):
    time.sleep(gap)
    s.send(bytes.fromhex(frame))
"""

CLIENT = r"""
import socket, struct, sys, time
dst, what = sys.argv[1], sys.argv[2]
if what == "refused":
    for _ in range(int(sys.argv[3])):
        try:
            socket.create_connection((dst, int(sys.argv[4])), timeout=5)
        except ConnectionRefusedError:
            pass
elif what == "reset":
    s = socket.create_connection((dst, int(sys.argv[3])), timeout=5)
    s.sendall(bytes(100))
    time.sleep(0.3)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
elif what == "bulk":  # send N bytes (the first 8 say how many to send back), read the reply
    up, down = int(sys.argv[4]), int(sys.argv[5])
    s = socket.create_connection((dst, int(sys.argv[3])), timeout=30)
    s.sendall(b"%08d" % down + bytes(up - 8))
    s.shutdown(socket.SHUT_WR)
    got = 0
    while (b := s.recv(65536)):
        got += len(b)
    assert got == down, got
elif what == "long":  # 10 messages of 100 bytes, 0.4 s apart; 200 bytes back for each
    s = socket.create_connection((dst, int(sys.argv[3])), timeout=30)
    got = 0
    for i in range(10):
        s.sendall(bytes(100))
        while got < 200 * (i + 1):
            got += len(s.recv(65536))
        time.sleep(0.4)
    s.shutdown(socket.SHUT_WR)
    s.recv(10)
    s.close()
"""


def _bulk(c):
    data = b""
    while (b := c.recv(65536)):
        data += b
    c.sendall(bytes(int(data[:8])))


def _echo_twice(c):
    while (b := c.recv(65536)):
        c.sendall(bytes(2 * len(b)))


def _drain(c):
    while c.recv(65536):
        pass


def _crafted(h) -> list[tuple[float, bytes]]:
    """(gap before, frame): unanswered SYNs, two slow handshakes, a retransmitting connection."""
    eth = Ether(src=FAKE_SRC, dst=NOBODY_MAC)
    up, down = IP(src=h.addr4, dst=h.peer_addr4), IP(src=h.peer_addr4, dst=h.addr4)
    out: list[tuple[float, bytes]] = []

    def add(gap, pkt):
        out.append((gap, bytes(eth / pkt)))

    for sport in (49502, 49503):  # S0: a SYN nobody answers
        add(0, up / TCP(sport=sport, dport=S0_PORT, flags="S", seq=1000))

    def conversation(sport, dport, gap, data_times=1):
        add(0.05, up / TCP(sport=sport, dport=dport, flags="S", seq=1000))
        add(gap, down / TCP(sport=dport, dport=sport, flags="SA", seq=5000, ack=1001))
        add(0, up / TCP(sport=sport, dport=dport, flags="A", seq=1001, ack=5001))
        for k in range(data_times):  # the same 100 bytes, sent data_times times
            add(0.01, up / TCP(sport=sport, dport=dport, flags="PA", seq=1001, ack=5001) / Raw(bytes(100)))
        add(0.01, down / TCP(sport=dport, dport=sport, flags="A", seq=5001, ack=1101))
        add(0.01, up / TCP(sport=sport, dport=dport, flags="FA", seq=1101, ack=5001))
        add(0.01, down / TCP(sport=dport, dport=sport, flags="FA", seq=5001, ack=1102))
        add(0.01, up / TCP(sport=sport, dport=dport, flags="A", seq=1102, ack=5002))

    conversation(49520, SLOW1, 0.300)
    conversation(49521, SLOW2, 0.150)
    conversation(49530, RETRANS, 0.0, data_times=3)
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from hdrlog.dev.lab import Lab

    tmp = tmp_path_factory.mktemp("sqlconn")
    server = ServerProcess(f"chdb://{tmp}/store", tmp)
    collector = None
    stop = threading.Event()
    threads = []
    with Lab("sq") as lab:
        try:
            server.start()
            a, b = lab.add_host("a"), lab.add_host("b")
            collector = CollectorProcess(server.address, [a.peer_ifname, b.peer_ifname], "sqlconn", tmp, "--mode",
                                         "auto", "--conn-interim", "1", "--conn-tcp-timeout", "3",
                                         "--conn-linger", "0.3")
            collector.start()
            for h in (a, b):
                threads += [serve_tcp(h.peer_addr4, port, handle, stop, backlog=16)
                            for port, handle in ((BULK, _bulk), (LONG, _echo_twice), (RESET, _drain))]
            run = lambda h, *args: lab.run(h, sys.executable, "-c", CLIENT, h.peer_addr4, *map(str, args))  # noqa: E731
            frames = tmp / "frames.json"
            frames.write_text(json.dumps([(g, f.hex()) for g, f in _crafted(a)]))
            crafted = lab.popen(a, sys.executable, "-c", SEND_TIMED, str(frames))
            long_ = lab.popen(a, sys.executable, "-c", CLIENT, a.peer_addr4, "long", str(LONG))
            run(a, "refused", 3, CLOSED)
            run(b, "refused", 1, CLOSED)
            run(a, "reset", RESET)
            run(a, "bulk", BULK, UP_A, 1000)
            run(b, "bulk", BULK, 100, DOWN_B)
            assert long_.wait(60) == 0 and crafted.wait(60) == 0
            want = 3 + 1 + 1 + 2 + 1 + 2 + 3  # refused, reset, bulk, long, S0, slow, retransmitting
            wait_until(lambda: int(server.sql("SELECT countIf(final = 1) AS n FROM hdrlog.connections "
                                              "WHERE ip_proto = 6")[0]["n"]) >= want, 60, f"{want} final rows")
            yield {"server": server, "a": a, "b": b}
        finally:
            stop.set()
            for t in threads:
                t.join(5)
            if collector is not None:
                collector.stop()
            server.stop()


def _q(store, n: int) -> list[dict]:
    r = next(r for r in recipes() if r.number == n)
    return store["server"].sql(r.sql)


def test_30_failed_connections_per_client(store):
    a, b = store["a"], store["b"]
    rows = {r["client"]: r for r in _q(store, 30)}
    assert set(rows) == {a.addr4, b.addr4}, rows
    ra, rb = rows[a.addr4], rows[b.addr4]
    assert (int(ra["unanswered"]), int(ra["refused"]), int(ra["half_open"]), int(ra["reset_after_setup"])) == (2, 3, 0, 1)
    assert (int(rb["unanswered"]), int(rb["refused"]), int(rb["half_open"]), int(rb["reset_after_setup"])) == (0, 1, 0, 0)
    assert int(ra["failed"]) == 5 and int(rb["failed"]) == 1
    assert list(rows) == [a.addr4, b.addr4]  # most failures first


def test_31_slowest_handshakes(store):
    rows = _q(store, 31)
    assert [int(r["port"]) for r in rows[:2]] == [SLOW1, SLOW2], rows[:3]
    # the crafted gaps are lower bounds of the handshake (SYN ... gap ... SYN-ACK, ACK)
    assert rows[0]["handshake_ms"] >= 300 and rows[1]["handshake_ms"] >= 150
    assert all(r["handshake_ms"] < rows[1]["handshake_ms"] for r in rows[2:])


def test_32_top_talkers_bytes_each_way(store):
    a, b = store["a"], store["b"]
    rows = {(r["client"], int(r["port"])): r for r in _q(store, 32)}
    top = _q(store, 32)[:2]
    assert [(r["client"], int(r["port"])) for r in top] == [(b.addr4, BULK), (a.addr4, BULK)]
    assert (int(rows[(a.addr4, BULK)]["bytes_up"]), int(rows[(a.addr4, BULK)]["bytes_down"])) == (UP_A, 1000)
    assert (int(rows[(b.addr4, BULK)]["bytes_up"]), int(rows[(b.addr4, BULK)]["bytes_down"])) == (100, DOWN_B)
    # the long-lived one counted once, though it has interim rows
    assert (int(rows[(a.addr4, LONG)]["bytes_up"]), int(rows[(a.addr4, LONG)]["bytes_down"])) == (1000, 2000)
    assert int(rows[(a.addr4, LONG)]["connections"]) == 1


def test_33_long_lived_connections_counted_once(store):
    rows = _q(store, 33)
    top = rows[0]
    assert int(top["port"]) == LONG and int(top["ended"]) == 1 and top["state"] == "SF", rows[:2]
    assert int(top["interim_rows"]) >= 3
    assert (int(top["bytes_up"]), int(top["bytes_down"])) == (1000, 2000)
    assert top["seconds"] >= 4.0  # 10 rounds, 0.4 s apart: a lower bound
    # what the naive sum over every row would have said: more than was sent
    naive = store["server"].sql(f"SELECT sum(orig_bytes) AS s FROM hdrlog.connections WHERE uid = '{top['uid']}'")
    assert int(naive[0]["s"]) > 1000


def test_34_retransmission_hot_spots(store):
    rows = _q(store, 34)
    assert [int(r["port"]) for r in rows] == [RETRANS], rows  # the only service that retransmitted
    r = rows[0]
    assert (int(r["retrans_from_clients"]), int(r["retrans_from_server"])) == (2, 0)
    assert (int(r["connections_retransmitting"]), int(r["connections"])) == (1, 1)
    assert int(r["packets"]) == 10  # S, SA, A, 3 x data, A, FA, FA, A


def test_35_zeek_columns_and_community_id(store):
    import communityid as ref

    a = store["a"]
    rows = [r for r in _q(store, 35) if int(r["id.resp_p"]) == SLOW1]
    assert len(rows) == 1, rows
    r = rows[0]
    want = ref.CommunityID().calc(ref.FlowTuple(6, a.addr4, a.peer_addr4, 49520, SLOW1))
    assert (r["community_id"], r["id.orig_h"], int(r["id.orig_p"]), r["id.resp_h"], r["proto"]) == (
        want, a.addr4, 49520, a.peer_addr4, "tcp")
    assert (r["conn_state"], r["history"], int(r["orig_bytes"]), int(r["resp_bytes"])) == ("SF", "ShADaFf", 100, 0)
    assert (int(r["orig_pkts"]), int(r["resp_pkts"])) == (5, 3)
