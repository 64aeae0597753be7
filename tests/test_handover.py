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
import time

import pytest

from hdrlog.collector import bpfsys
from hdrlog.dev.servicemanager import FdStoreManager
from tests.support import CollectorProcess, hdrlog_hooks, wait_until
from tests.test_e2e import send_udp

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
        c = CollectorProcess(server.address, [dev], host_id, tmp_path, "--mode", mode, manager=manager)
        collectors.append(c)
        c.start()
        return c

    first = collector()
    wait_until(lambda: manager.ready_count() == 1, 30, "READY=1 from the first collector")
    assert {f"hdrlog.link.{ifindex}.ingress", f"hdrlog.link.{ifindex}.egress",
            "hdrlog.1.records", "hdrlog.1.counters", "hdrlog.1.flows0", "hdrlog.1.flows1",
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
    assert second.stop() == 0
    if mode == "auto":  # every datagram is counted in exactly one flow row
        where = f"host = '{host_id}' AND dst_port = {port} AND direction = 'ingress'"
        total = server.sql(f"SELECT sum(packets) AS n FROM hdrlog.flows WHERE {where}")
        assert total == [{"n": count}]
    # Counters: what the second collector reported continues the first, no packet twice or never.
    stats = {r["counter"]: int(r["n"]) for r in server.sql(
        f"SELECT counter, sum(value) AS n FROM hdrlog.collector_stats WHERE host = '{host_id}' GROUP BY counter")}
    if mode == "packets":
        assert stats["seen"] == server.count(f"host = '{host_id}'"), stats
    else:
        flowed = server.sql(f"SELECT sum(packets) AS n FROM hdrlog.flows WHERE host = '{host_id}'")[0]["n"]
        assert stats["seen"] == int(flowed), stats

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
