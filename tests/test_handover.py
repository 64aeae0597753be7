"""A collector restart under a service manager loses nothing: the capture is handed over.

The collector runs as the real `hdrlog` process, started by hdrlog/dev/servicemanager.py
exactly as systemd starts a ``Type=notify`` service with an fd store (the e2e lab
does the same under the real systemd). Traffic flows through the whole restart,
including a second in which no collector process exists at all; every datagram
must come out once. Outside a service manager, tcx links mean a killed collector
leaves nothing attached.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

import pytest

from hdrlog.collector import bpfsys
from hdrlog.dev.servicemanager import FdStoreManager
from tests.support import CollectorProcess, hdrlog_hooks, send_udp, wait_until

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs Linux eBPF")


@pytest.fixture
def manager(tmp_path):
    m = FdStoreManager(tmp_path)
    yield m
    (tmp_path / "manager.txt").write_text("\n".join([*m.errors, *m.messages]))
    m.close()  # like `systemctl stop`: the stored links close, the programs detach


@pytest.fixture
def collectors():
    started: list[CollectorProcess] = []
    yield started
    for c in started:
        c.kill()


def hooks(dev: str) -> list[str]:
    return hdrlog_hooks(dev, "ingress") + hdrlog_hooks(dev, "egress")


@pytest.mark.parametrize("mode", ["packets", "auto"])
def test_restart_under_a_service_manager_hands_the_capture_over_without_a_gap(
        lab, tmp_path, server, manager, collectors, mode):
    host = lab.add_host("a")
    dev, host_id, port, count = host.peer_ifname, f"handover-{mode}", 40061, 6000
    ifindex = socket.if_nametoindex(dev)

    def collector() -> CollectorProcess:
        c = CollectorProcess(server.address, [dev], host_id, tmp_path, "--mode", mode, "--conn-interim", "1",
                             manager=manager)
        collectors.append(c)
        c.start()
        return c

    first = collector()
    wait_until(lambda: manager.ready_count() == 1, 30, "READY=1 from the first collector")
    assert {f"hdrlog.link.{ifindex}.ingress", f"hdrlog.link.{ifindex}.egress",
            "hdrlog.1.records", "hdrlog.1.counters", "hdrlog.1.flows0", "hdrlog.1.flows1", "hdrlog.1.conns",
            "hdrlog.1.state"} == set(manager.names()), " | ".join(m.replace("\n", " ") for m in manager.messages)

    sender = send_udp(lab, host, port, count, rate=1000)  # 6 s of traffic across the restart
    wait_until(lambda: server.count(f"host = '{host_id}'") > 100 or mode == "auto", 30, "first rows")
    time.sleep(1.0)
    assert first.stop() == 0
    # No collector process now, and the classifier still runs: systemd's copies hold the links.
    assert sorted(hooks(dev)) == ["tcx hdrlog_egress", "tcx hdrlog_ingress"]
    time.sleep(1.0)
    second = collector()
    assert "took over from the previous collector without a gap" in second.log()
    assert sender.wait(60) == 0
    names = set(manager.names())
    assert "hdrlog.2.records" in names and not any(n.startswith("hdrlog.1.") for n in names), names

    if mode == "packets":  # every datagram is a row, exactly once
        where = f"host = '{host_id}' AND dst_port = {port} AND direction = 'ingress'"
        wait_until(lambda: server.count(where) >= count, 60, f"{count} rows")
        time.sleep(1.0)  # anything late would be a duplicate
        rows = server.sql("SELECT count() AS n, uniqExact(src_port, ip_id) AS distinct_packets "
                          f"FROM hdrlog.packets WHERE {where}")
        assert rows == [{"n": count, "distinct_packets": count}]
    if mode == "auto":  # every datagram counted once, in its (one of 50) connection kept across the restart
        where = f"host = '{host_id}' AND resp_port = {port} AND ip_proto = 17"
        query = ("SELECT count() AS uids, sum(n) AS n, sum(finals) AS finals FROM (SELECT uid, max(orig_pkts) "
                 f"AS n, sum(final) AS finals FROM hdrlog.connections WHERE {where} GROUP BY uid)")
        wait_until(lambda: server.sql(query)[0]["n"] == count, 30, f"connection rows with all {count} datagrams")
        assert server.sql(query) == [{"uids": 50, "n": count, "finals": 0}]  # open still: no final row yet
    assert second.stop() == 0
    # Counters: what the second collector reported continues the first, no packet twice or never.
    stats = {r["counter"]: int(r["n"]) for r in server.sql(
        f"SELECT counter, sum(value) AS n FROM hdrlog.collector_stats WHERE host = '{host_id}' GROUP BY counter")}
    if mode == "packets":
        assert stats["seen"] == server.count(f"host = '{host_id}'"), stats
    else:  # every packet counted once, into a connection or a flow, by one of the two
        assert stats["seen"] == stats["conn_tracked"] + stats["flowed"] >= count, stats

    manager.close_store()  # `systemctl stop`: systemd closes what it kept
    wait_until(lambda: not hooks(dev), 10, "the programs to detach once the store is closed")


def test_without_a_service_manager_a_killed_collector_leaves_nothing_attached(lab, tmp_path, server, collectors):
    host = lab.add_host("a")
    c = CollectorProcess(server.address, [host.peer_ifname], "kill-clean", tmp_path)
    collectors.append(c)
    c.start()
    assert sorted(hooks(host.peer_ifname)) == ["tcx hdrlog_egress", "tcx hdrlog_ingress"]
    c.kill()
    wait_until(lambda: not hooks(host.peer_ifname), 10, "the links to go with the process")


def test_a_restart_with_other_interfaces_or_tc_filters_detaches_what_it_does_not_keep(
        lab, tmp_path, server, manager, collectors):
    a, b = lab.add_host("a"), lab.add_host("b")

    def collector(ifaces: list[str], *extra: str) -> CollectorProcess:
        c = CollectorProcess(server.address, ifaces, "handover-ifaces", tmp_path, *extra, manager=manager)
        collectors.append(c)
        c.start()
        return c

    first = collector([a.peer_ifname, b.peer_ifname])
    assert first.stop() == 0
    assert len(hooks(a.peer_ifname)) == len(hooks(b.peer_ifname)) == 2  # kept running by the store
    # The next one captures only on a, with tc filters: nothing of the old classifier may stay
    # (it would log every packet twice).
    second = collector([a.peer_ifname], "--attach", "tc")
    assert hooks(b.peer_ifname) == []
    assert sorted(hooks(a.peer_ifname)) == ["tc hdrlog_egress", "tc hdrlog_ingress"]
    assert "detached the previous collector's classifier" in second.log()
    assert not any(n.startswith("hdrlog.link.") for n in manager.names())
    assert second.stop() == 0
    assert hooks(a.peer_ifname) == []  # tc filters are removed at stop: no store keeps them


def test_a_predecessor_with_another_record_layout_is_swapped_out_but_not_read(
        lab, tmp_path, server, manager, collectors):
    host = lab.add_host("a")
    dev = host.peer_ifname

    def collector() -> CollectorProcess:
        c = CollectorProcess(server.address, [dev], "handover-layout", tmp_path, manager=manager)
        collectors.append(c)
        c.start()
        return c

    first = collector()
    assert first.stop() == 0
    ifindex = socket.if_nametoindex(dev)
    old_ids = [bpfsys.attached_prog_ids(ifindex, d) for d in ("ingress", "egress")]
    # What an older build would have left: its state names another layout id.
    state = dict((n, fd) for n, fd in manager.store)["hdrlog.1.state"]
    os.pwrite(state, json.dumps({"layout": 1, "reported": {}}).encode().ljust(4096, b"\0"), 0)
    second = collector()
    assert "wrote another record layout: what it left in the kernel is not read" in second.log()
    new_ids = [bpfsys.attached_prog_ids(ifindex, d) for d in ("ingress", "egress")]
    assert sorted(hooks(dev)) == ["tcx hdrlog_egress", "tcx hdrlog_ingress"]  # one program per hook:
    assert all(len(n) == 1 and n != o for n, o in zip(new_ids, old_ids)), (old_ids, new_ids)  # ours now
    assert not any(n.startswith("hdrlog.1.") for n in manager.names())
    assert second.stop() == 0


def test_a_tcp_connection_open_across_a_restart_keeps_its_uid_and_exact_totals(
        lab, tmp_path, server, manager, collectors):
    """The connection map is handed over: one connection, one uid, one final row, every byte."""
    host = lab.add_host("a")
    dev, host_id, sport, cport, rounds = host.peer_ifname, "handover-conn", 47301, 47302, 24

    def collector() -> CollectorProcess:
        c = CollectorProcess(server.address, [dev], host_id, tmp_path, "--mode", "auto", "--conn-interim", "1",
                             "--conn-linger", "0.5", manager=manager)
        collectors.append(c)
        c.start()
        return c

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host.peer_addr4, sport))
    listener.listen()
    listener.settimeout(30)

    def serve():
        c, _ = listener.accept()
        with c:
            while d := c.recv(65536):
                c.sendall(b"e" * (2 * len(d)))

    first = collector()
    wait_until(lambda: manager.ready_count() == 1, 30, "READY=1 from the first collector")
    server_thread = threading.Thread(target=serve, daemon=True)
    server_thread.start()
    gate = tmp_path / "close-now"  # the client closes only once the second collector has counted it
    client = lab.popen(host, sys.executable, "-c", f"""
import os, socket, time
s = socket.socket()
s.bind(('{host.addr4}', {cport}))
s.connect(('{host.peer_addr4}', {sport}))
got = 0
for i in range({rounds}):
    s.sendall(b'm' * 1000)
    while got < 2000 * (i + 1):
        got += len(s.recv(65536))
    time.sleep(0.25)
while not os.path.exists('{gate}'):
    time.sleep(0.05)
s.shutdown(socket.SHUT_WR)
s.recv(10)
s.close()
""")
    where = f"host = '{host_id}' AND resp_port = {sport} AND orig_port = {cport}"
    wait_until(lambda: server.sql(f"SELECT count() AS n FROM hdrlog.connections WHERE {where}") != [{"n": 0}],
               30, "an interim row from the first collector")
    assert first.stop() == 0  # mid-connection
    time.sleep(1.0)  # the old program counts on with no collector at all
    second = collector()
    assert "took over from the previous collector without a gap" in second.log()
    before = server.sql(f"SELECT count() AS n FROM hdrlog.connections WHERE {where}")[0]["n"]
    wait_until(lambda: server.sql(f"SELECT count() AS n FROM hdrlog.connections WHERE {where}")[0]["n"] > before,
               30, "an interim row from the second collector")
    gate.write_text("")
    assert client.wait(60) == 0
    server_thread.join(10)
    listener.close()
    wait_until(lambda: server.sql(f"SELECT sum(final) AS n FROM hdrlog.connections WHERE {where}") == [{"n": 1}],
               30, "the connection's final row")
    time.sleep(1.5)  # a second final row, if any, would come now
    assert second.stop() == 0
    rows = server.sql(f"SELECT uid, final, conn_state, orig_bytes, resp_bytes, orig_pkts, resp_pkts, start_ts "
                      f"FROM hdrlog.connections WHERE {where} ORDER BY end_ts")
    assert len({r["uid"] for r in rows}) == 1, rows  # the same connection before and after the restart
    finals = [r for r in rows if r["final"]]
    assert len(finals) == 1 and rows[-1]["final"] == 1, rows
    final = finals[0]
    assert (final["conn_state"], final["orig_bytes"], final["resp_bytes"]) == ("SF", 1000 * rounds, 2000 * rounds)
    interim = [r for r in rows if not r["final"]]
    assert len(interim) >= 2 and all(r["orig_bytes"] <= final["orig_bytes"] for r in interim), rows  # never above
    assert [r["orig_pkts"] for r in rows] == sorted(r["orig_pkts"] for r in rows)  # cumulative, never restarted
    manager.close_store()
    wait_until(lambda: not hooks(dev), 10, "the programs to detach once the store is closed")
