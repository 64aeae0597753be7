"""What a collector restart costs: packets never logged, with and without the handover.

A real ``hdrlog server`` and ``hdrlog collector --mode packets`` on a lab veth; a
sender in the lab namespace sends ``RATE`` UDP datagrams a second, each numbered
by its source port, for the whole run. Mid-run the collector is restarted the way
systemd restarts it: SIGTERM, wait for the exit, start the next process.

* figure: tcx links kept in a service manager's fd store across the restart
  (hdrlog/dev/servicemanager.py speaks systemd's protocol), the way the playbooks
  install the unit: the next collector takes the running capture over;
* baseline, same run: ``--attach tc`` and no fd store, the old behaviour: the old
  collector detaches, packets are missed until the next one has compiled and
  attached.

The missed count is exact (datagram numbers absent from hdrlog.packets); the
restart time is from SIGTERM to the new collector's "capturing on".
"""

from __future__ import annotations

import time

from bench import traffic

RATE, SECONDS, RESTART_AT = 2000, 8.0, 2.0  # 16,000 datagrams: source ports 20000-35999
SENDER = r"""
import socket, sys, time
dst, port, n, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
start = time.monotonic()
for i in range(n):  # datagram i comes from source port 20000 + i: its number, readable in hdrlog.packets
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 20000 + i))
        s.sendto(b"hdrlog-bench", (dst, port))
    ahead = start + (i + 1) / rate - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
"""


def _trial(lab, host, server, work, name: str, port: int, handover: bool) -> tuple[int, int, float]:
    """(sent, missed, seconds from SIGTERM to the next collector capturing) for one restart."""
    from hdrlog.dev.servicemanager import FdStoreManager
    from hdrlog.dev.processes import CollectorProcess, wait_until

    manager = FdStoreManager(work) if handover else None
    extra = ("--attach", "tcx") if handover else ("--attach", "tc")
    count = int(RATE * SECONDS)
    procs = []
    try:
        def start() -> CollectorProcess:
            c = CollectorProcess(server.address, [host.peer_ifname], name, work, *extra, manager=manager)
            procs.append(c)
            c.start()
            return c

        first = start()
        sender = lab.popen(host, "/usr/bin/python3", "-c", SENDER, host.peer_addr4, str(port), str(count), str(RATE))
        time.sleep(RESTART_AT)
        t0 = time.monotonic()
        first.stop()
        start()
        took = time.monotonic() - t0
        sender.wait(SECONDS + 60)
        where = f"host = '{name}' AND dst_port = {port} AND direction = 'ingress'"

        def settled():
            a = server.count(where)
            time.sleep(2)
            return a if a == server.count(where) else None
        stored = wait_until(settled, 60, "rows to settle")
        distinct = int(server.sql(f"SELECT uniqExact(src_port) FROM hdrlog.packets WHERE {where}", "TabSeparated"))
        return count, count - min(stored, distinct), took
    finally:
        for c in procs:
            c.stop()
        if manager is not None:
            manager.close()


def run() -> list[dict]:
    with traffic.rig("hr") as (lab, host, server, _pcap, work, _n):
        sent, base_missed, base_took = _trial(lab, host, server, work, "restart-tc", 41501, handover=False)
        _, missed, took = _trial(lab, host, server, work, "restart-handover", 41502, handover=True)
    how = (f"{sent} numbered UDP datagrams at {RATE}/s, collector restarted (SIGTERM, exit, start) "
           f"{RESTART_AT:.0f} s in; missed = absent from hdrlog.packets")
    return [
        {"figure": "collector restart: datagrams never logged (tcx + systemd fd store handover)",
         "value": f"{missed} of {sent}", "baseline": f"{base_missed} of {sent} (tc filters, detach then attach)",
         "ratio": f"{missed / base_missed:.2f}x" if base_missed else "n/a", "note": how},
        {"figure": "collector restart: SIGTERM to the next collector capturing",
         "value": f"{took:.1f} s", "baseline": f"{base_took:.1f} s (tc filters)",
         "ratio": f"{took / base_took:.2f}x", "note": "the handover does not shorten the restart; "
                                                        "the kernel keeps capturing through it"},
    ]


if __name__ == "__main__":
    from bench.run import table

    print(table(run()))
