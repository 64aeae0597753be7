"""Connection rows through a server SIGKILL: the real collector (auto mode, eBPF on a lab veth)
→ gRPC → the real server → chDB, the server killed while connections open, close and send
interim rows, then restarted on the same store and ports.

Connection rows ride the same batches, spool, acks and dedup as packets: what was acked is
stored, what was not is resent, a resent batch is dropped by its insert token. Asserted: every
connection the lab made has exactly one final row, no row is stored twice, and the final rows'
byte counts are exactly what the applications sent and received (the long-lived ones also
have interim rows on both sides of the kill, never more bytes than their final row).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from bench.traffic import serve_tcp
from tests.support import CollectorProcess, ServerProcess, wait_until

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs Linux eBPF")

PORT = 49301
SHORT, LONG = 40, 2

CLIENT = r"""
import json, socket, sys, threading, time
dst, port, short, long_ = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
out = []
lock = threading.Lock()

def conn(i, rounds, gap):
    s = socket.create_connection((dst, port), timeout=30)
    sent = got = 0
    for r in range(rounds):
        b = bytes(100 * i + 7 + r)
        s.sendall(b)
        sent += len(b)
        time.sleep(gap)
    s.shutdown(socket.SHUT_WR)
    while True:
        d = s.recv(65536)
        if not d:
            break
        got += len(d)
    with lock:
        out.append({"cport": s.getsockname()[1], "sent": sent, "received": got})
    s.close()

longs = [threading.Thread(target=conn, args=(1000 + k, 16, 0.5)) for k in range(long_)]  # ~8 s each
for t in longs:
    t.start()
for i in range(short):
    conn(i, 1, 0)
    time.sleep(0.2)
for t in longs:
    t.join()
print(json.dumps(out))
"""


def _reply_half(c: socket.socket) -> None:
    """Read the request to its end; the reply is half its length, plus one."""
    n = 0
    while (d := c.recv(65536)):
        n += len(d)
    c.sendall(bytes(n // 2 + 1))


def test_server_sigkill_each_connection_one_final_row_and_exact_totals(lab, tmp_path, procs):
    server = ServerProcess(f"chdb://{tmp_path}/store", tmp_path)
    procs.append(server)
    server.start()
    host = lab.add_host("a")
    collector = CollectorProcess(server.address, [host.peer_ifname], "conn-kill", tmp_path, "--mode", "auto",
                                 "--conn-interim", "1", "--conn-tcp-timeout", "5", "--conn-linger", "0.3")
    procs.append(collector)
    collector.start()
    stop = threading.Event()
    listener = serve_tcp(host.peer_addr4, PORT, _reply_half, stop)
    client = lab.popen(host, sys.executable, "-c", CLIENT, host.peer_addr4, str(PORT), str(SHORT), str(LONG),
                       stdout=subprocess.PIPE, text=True)
    where = f"host = 'conn-kill' AND resp_port = {PORT}"

    def stored(what: str = "count()") -> int:
        return int(server.sql(f"SELECT {what} AS n FROM hdrlog.connections WHERE {where}")[0]["n"])

    try:
        wait_until(lambda: stored("countIf(final = 1)") >= 5, 60, "the first final connection rows")
        server.kill()  # connections keep opening, closing and sending interim rows meanwhile
        killed_at = time.time_ns()
        time.sleep(2.0)
        server.start()  # same store, same ports
        out, _ = client.communicate(timeout=120)
        made = json.loads(out)
        assert len(made) == SHORT + LONG
        wait_until(lambda: stored("countIf(final = 1)") >= SHORT + LONG, 60, f"{SHORT + LONG} final rows")
        time.sleep(1.5)  # a late duplicate would show now
    finally:
        stop.set()
        listener.join(5)
    rows = server.sql(f"SELECT count() AS n, uniqExact(uid, final, end_ts) AS distinct_rows, "
                      f"uniqExact(uid) AS uids, countIf(final = 1) AS finals FROM hdrlog.connections WHERE {where}")[0]
    print(f"SIGKILL: {rows}")
    assert int(rows["n"]) == int(rows["distinct_rows"]), "a row stored twice"
    assert int(rows["uids"]) == int(rows["finals"]) == SHORT + LONG
    per_uid = server.sql(f"SELECT uid, countIf(final = 1) AS f FROM hdrlog.connections WHERE {where} "
                         "GROUP BY uid HAVING f != 1")
    assert per_uid == [], "connections without exactly one final row"
    finals = {int(r["orig_port"]): r for r in server.sql(
        f"SELECT orig_port, orig_bytes, resp_bytes, conn_state, uid FROM hdrlog.connections WHERE {where} AND final")}
    assert sorted(finals) == sorted(m["cport"] for m in made)
    for m in made:
        f = finals[m["cport"]]
        assert (int(f["orig_bytes"]), int(f["resp_bytes"]), f["conn_state"]) == (m["sent"], m["received"], "SF"), m
    totals = server.sql(f"SELECT sum(orig_bytes) AS o, sum(resp_bytes) AS r FROM hdrlog.connections "
                        f"WHERE {where} AND final = 1")[0]
    assert (int(totals["o"]), int(totals["r"])) == (sum(m["sent"] for m in made), sum(m["received"] for m in made))
    # the long-lived ones: interim rows before and after the kill, cumulative, below their final row
    for m in made:
        if m["sent"] < 100_000:  # (100 * 1000 + ...) bytes per round: the long ones
            continue
        uid = finals[m["cport"]]["uid"]
        series = server.sql(f"SELECT toUnixTimestamp64Nano(end_ts) AS e, orig_bytes, final FROM hdrlog.connections "
                            f"WHERE uid = '{uid}' ORDER BY e, final")
        interim = [r for r in series if not int(r["final"])]
        assert len(interim) >= 4, series
        assert min(int(r["e"]) for r in interim) < killed_at < max(int(r["e"]) for r in interim), series
        bytes_ = [int(r["orig_bytes"]) for r in series]
        assert bytes_ == sorted(bytes_) and bytes_[-1] == m["sent"] and int(series[-1]["final"]) == 1
    assert collector.alive()
    assert collector.stop() == 0
    assert "retrying in" in collector.log()  # it noticed the outage and resent
