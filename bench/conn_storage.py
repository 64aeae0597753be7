"""Stored bytes per connection: auto mode (connections + notable packets + 1:N sample) against
packets mode (a row per packet) for the same traffic, measured on disk in chDB.

The same lab traffic runs twice through the real capture (eBPF on a lab veth), once per mode,
in two shapes (``SHAPES``): "short", 3000 TCP connections from a lab host to a service in the
root namespace, each a 300-byte request and a 6 kB response, then a clean close (10 packets
each at the hook); "bulk", 100 connections with a 500 kB response each (the service's side
sends GSO packets: fewer at the hook than on the wire, the same for both modes). The
rows go the server's way (columnar Batch -> convert_batch -> Store.insert, with the rollups'
materialized views) into a fresh chDB store per mode; after ``OPTIMIZE TABLE ... FINAL`` the
bytes on disk of every hdrlog table are read from system.parts.

Figures: the connections table alone per connection (the efficient record) and the whole
auto-mode store per connection (connections + its packet rows + flows + rollups), each
against the packets-mode store (packets + rollups) per connection of the same run. Data parts
carry a fixed cost (marks, checksums, column headers), so the figures are per connection at
this size; larger runs only lower auto mode's share.
"""

from __future__ import annotations

import socket
import sys
import tempfile
import threading
import time

from bench.traffic import serve_tcp

# name: (connections, request bytes, response bytes)
SHAPES = {"short": (3000, 300, 6000), "bulk": (100, 300, 500_000)}
PORT = 49601

CLIENT = r"""
import socket, sys
dst, port, n, req, resp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
for i in range(n):
    s = socket.create_connection((dst, port), timeout=10)
    s.sendall(bytes(req))
    got = 0
    while got < resp:
        got += len(s.recv(65536))
    s.shutdown(socket.SHUT_WR)
    s.recv(10)
    s.close()
"""


def _answer(request: int, response: int):
    """The service's side of a connection: read ``request`` bytes, send ``response`` bytes, wait for the close."""
    def handle(c: socket.socket) -> None:
        got = 0
        while got < request:
            got += len(c.recv(65536))
        c.sendall(bytes(response))
        while c.recv(65536):
            pass
    return handle


def _capture(lab, host, mode: str, shape: tuple[int, int, int]) -> tuple[list, dict]:
    """Run the traffic with a capture in ``mode``; returns (Batch messages, counters)."""
    from hdrlog.collector import connections as cm
    from hdrlog.collector.batcher import Batcher
    from hdrlog.collector.capture import Capture, CaptureConfig

    batches: list = []
    batcher = Batcher(collector_id=f"bench-{mode}", host="bench", batch_rows=50_000, batch_interval=3600,
                      emit=lambda b, n: batches.append(b))
    cap = Capture(CaptureConfig(ifaces=[host.peer_ifname], mode=mode, host="bench", ringbuf_bytes=64 << 20,
                                conn=cm.ConnConfig(interim=60, tcp_timeout=5, linger=0.2)))
    cap.start()

    def pull():
        while (chunk := cap.poll(0)):
            batcher.add("packets", chunk)
        for table, fn in (("flows", cap.drain_flows), ("connections", cap.drain_connections)):
            chunk = fn()
            if chunk:
                batcher.add(table, chunk)

    try:
        client = lab.popen(host, sys.executable, "-c", CLIENT, host.peer_addr4, str(PORT),
                           *map(str, shape))
        while client.poll() is None:
            pull()
            time.sleep(0.05)
        assert client.returncode == 0, "bench client failed"
        time.sleep(0.5)
        pull()
    finally:
        cap.stop()
    chunk = cap.drain_connections()  # the final rows of what was still in the map
    if chunk:
        batcher.add("connections", chunk)
    batcher.flush()
    return batches, cap.counters()


def _stored(batches: list) -> dict[str, tuple[int, int]]:
    """{table: (rows, bytes on disk)} after inserting ``batches`` the server's way into a fresh store."""
    from hdrlog.server.convert import convert_batch
    from hdrlog.server.store import Store

    with tempfile.TemporaryDirectory(prefix="hdrlog-connbench-") as tmp:
        store = Store(f"chdb://{tmp}/store")
        store.open()
        try:
            store.migrate()
            for b in batches:
                for t in convert_batch(b, b.host):
                    store.insert(t.name, t.data, f"{b.collector_id}-{b.seq}-{t.name}")
            client = store._client  # noqa: SLF001 - the bench reads system tables directly
            tables = [r[0] for r in client.query(
                "SELECT name FROM system.tables WHERE database = 'hdrlog' AND engine LIKE '%MergeTree'").result_rows]
            for t in tables:
                client.command(f"OPTIMIZE TABLE hdrlog.{t} FINAL")
            rows = client.query("SELECT table, sum(rows), sum(bytes_on_disk) FROM system.parts "
                                "WHERE database = 'hdrlog' AND active AND table != 'schema_version' GROUP BY table").result_rows
        finally:
            store.close()
    return {t: (int(n), int(b)) for t, n, b in rows}


def measure(shape: tuple[int, int, int]) -> dict:
    from hdrlog.dev.lab import Lab

    out = {}
    with Lab("cb") as lab:
        host = lab.add_host("a")
        stop = threading.Event()
        server = serve_tcp(host.peer_addr4, PORT, _answer(shape[1], shape[2]), stop)
        try:
            for mode in ("auto", "packets"):
                batches, counters = _capture(lab, host, mode, shape)
                out[mode] = {"stored": _stored(batches), "counters": counters}
        finally:
            stop.set()
            server.join(5)
    return out


def run() -> list[dict]:
    rows = []
    for name, shape in SHAPES.items():
        rows += _rows(name, shape, measure(shape))
    return rows


def _rows(name: str, shape: tuple[int, int, int], m: dict) -> list[dict]:
    n, request, response = shape
    auto, packets = m["auto"]["stored"], m["packets"]["stored"]
    finals = auto.get("connections", (0, 0))[0]  # interim 60 s: one final row per connection here
    seen = m["packets"]["counters"].get("seen", 0)
    per_conn_pkts = sum(b for _, b in packets.values()) / max(finals, 1)
    per_conn_conn = auto.get("connections", (0, 0))[1] / max(finals, 1)
    per_conn_auto = sum(b for _, b in auto.values()) / max(finals, 1)
    pkt_rows = packets.get("packets", (0, 0))[0]
    auto_pkt_rows = auto.get("packets", (0, 0))[0]
    note = (f"{finals} of {n} TCP connections ({request} B up, {response} B down, clean close), the same lab "
            f"traffic through the real capture in each mode, stored the server's way into a fresh chDB store, "
            f"OPTIMIZE FINAL, system.parts bytes_on_disk; packets mode: {pkt_rows} packet rows ({seen} packets "
            f"seen at the hook); auto: {auto_pkt_rows} notable/sampled packet rows")
    return [
        {"figure": f"stored bytes per connection ({name}): connections table (auto mode)",
         "value": f"{per_conn_conn:.1f} B", "baseline": f"{per_conn_pkts:.1f} B (packets mode: every table)",
         "ratio": f"{per_conn_conn / per_conn_pkts:.3f}x", "note": note},
        {"figure": f"stored bytes per connection ({name}): whole store, auto mode (connections + packet rows + "
                   "flows + rollups)",
         "value": f"{per_conn_auto:.1f} B", "baseline": f"{per_conn_pkts:.1f} B (packets mode: every table)",
         "ratio": f"{per_conn_auto / per_conn_pkts:.3f}x",
         "note": "per table: auto " + ", ".join(f"{t} {r} rows {b} B" for t, (r, b) in sorted(auto.items()))
                 + "; packets " + ", ".join(f"{t} {r} rows {b} B" for t, (r, b) in sorted(packets.items()))},
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
