"""End to end through every real boundary: eBPF on a veth → collector → gRPC → server → chDB → SQL.

The server and collector run as the real `hdrlog` command in their own processes;
traffic comes from a network namespace across a veth whose root-side end the
collector watches.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.support import HDRLOG, CollectorProcess, ServerProcess, hdrlog_hooks, send_udp, wait_until

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs Linux eBPF")

@pytest.fixture
def collector_factory(tmp_path):
    started: list[CollectorProcess] = []

    def make(server: ServerProcess, ifaces: list[str], host_id: str, *extra: str) -> CollectorProcess:
        c = CollectorProcess(server.address, ifaces, host_id, tmp_path, *extra)
        c.start()
        started.append(c)
        return c
    yield make
    for c in started:
        c.stop()


def test_server_sigkill_mid_stream_loses_and_duplicates_nothing(lab, server, collector_factory):
    host = lab.add_host("a")
    collector = collector_factory(server, [host.peer_ifname], "kill-test")
    count, port = 6000, 40001
    sender = send_udp(lab, host, port, count, rate=1500)  # ~4 s of traffic
    wait_until(lambda: server.count(f"dst_port = {port}") > 300, 30, "first rows")
    server.kill()  # batches are in flight: acked ones stored, the rest kept by the collector
    time.sleep(1.5)
    server.start()  # same store, same ports
    assert sender.wait(60) == 0
    where = f"dst_port = {port} AND direction = 'ingress' AND host = 'kill-test'"
    wait_until(lambda: server.count(where) >= count, 60, f"{count} rows")
    time.sleep(1.0)  # anything late would be a duplicate
    rows = server.sql(f"SELECT count() AS n, uniqExact(udp_len, src_port, ip_id) AS distinct_packets "
                      f"FROM hdrlog.packets WHERE {where}")
    assert rows == [{"n": count, "distinct_packets": count}]
    assert collector.alive()
    assert collector.stop() == 0
    assert "retrying in" in collector.log()  # it noticed the outage and resent


def test_sql_while_ingesting_curl_hdrlog_sql_and_refusals(lab, server, collector_factory):
    host = lab.add_host("a")
    collector_factory(server, [host.peer_ifname], "sql-test")
    sender = send_udp(lab, host, 40002, 2000, rate=1000)
    wait_until(lambda: server.count("host = 'sql-test'") > 0, 30, "first rows")
    # curl, exactly as a person would type it, while packets still flow.
    curl = subprocess.run(["curl", "-sS", f"{server.sql_url}/?query=SELECT+count()+FROM+hdrlog.packets"],
                          capture_output=True, text=True, timeout=30)
    assert curl.returncode == 0 and int(curl.stdout.strip()) > 0
    # hdrlog sql through clickhouse-connect, in a ClickHouse output format.
    out = subprocess.run([*HDRLOG, "sql", "--url", server.sql_url, "--format", "JSONEachRow",
                          "SELECT host, count() > 0 AS some FROM hdrlog.packets GROUP BY host"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert '{"host":"sql-test","some":true}' in out.stdout.replace(" ", "") or \
        '{"host":"sql-test","some":1}' in out.stdout.replace(" ", "")
    # Writes are refused by the endpoint, and the table is still there afterwards.
    drop = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", "--data-binary", "DROP TABLE hdrlog.packets",
                           server.sql_url + "/"], capture_output=True, text=True, timeout=30)
    body, status = drop.stdout.rsplit("\n", 1)
    assert status != "200", body
    assert "readonly" in body.lower() or "read-only" in body.lower(), body
    bad = subprocess.run([*HDRLOG, "sql", "--url", server.sql_url, "SELEC count() FROM hdrlog.packets"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert "syntax error" in bad.stderr.lower(), bad.stderr
    assert sender.wait(60) == 0
    assert server.count("host = 'sql-test'") > 0


def test_collector_sigterm_flushes_detaches_and_exits_zero(lab, server, collector_factory):
    host = lab.add_host("a")
    collector = collector_factory(server, [host.peer_ifname], "term-test", "--batch-interval", "5")
    sender = send_udp(lab, host, 40003, 500, rate=2000)
    assert sender.wait(60) == 0
    time.sleep(0.5)  # the packets reached the ring buffer; the 5 s batch is still open
    assert collector.stop() == 0
    assert server.count("dst_port = 40003 AND direction = 'ingress'") == 500
    for direction in ("ingress", "egress"):
        assert hdrlog_hooks(host.peer_ifname, direction) == [], f"programs left on {direction}"
        out = subprocess.run(["tc", "filter", "show", "dev", host.peer_ifname, direction],
                             capture_output=True, text=True).stdout
        assert out.strip() == "", f"filters left on {direction}: {out}"
    qdiscs = subprocess.run(["tc", "qdisc", "show", "dev", host.peer_ifname], capture_output=True, text=True).stdout
    assert "clsact" not in qdiscs


def test_scripted_frames_become_rows_with_every_column_as_sent(lab, server, collector_factory, tmp_path):
    """The acceptance frames: one row per frame per direction, every contract column equal to what was sent."""
    from hdrlog.collector import records
    from hdrlog.proto.columns import PACKETS, TUNNEL_TYPES
    from tests.frames import FAKE_SRC, IGNORED_FLAGS, community_id, expected, mac_int, scripted_frames, send_frames

    host = lab.add_host("a")
    collector_factory(server, [host.peer_ifname], "frames-test")
    cases = scripted_frames(host)
    send_frames(lab, host, [f for _, f, _ in cases], tmp_path)
    where = f"host = 'frames-test' AND eth_src = {mac_int(FAKE_SRC)}"
    wait_until(lambda: server.count(where) >= len(cases), 30, f"{len(cases)} rows")
    time.sleep(1.0)  # a duplicate would arrive late
    select = ", ".join(
        "toUnixTimestamp64Nano(ts) AS ts" if c.name == "ts" else
        f"lower(hex({c.name})) AS {c.name}" if c.dtype == "V16" else c.name for c in PACKETS)
    rows = server.sql(f"SELECT {select} FROM hdrlog.packets WHERE {where} ORDER BY ts")
    assert len(rows) == len(cases), "exactly one row per frame"
    assert {r["direction"] for r in rows} == {"ingress"}
    for (name, frame, extra), got in zip(cases, rows):
        want = expected(frame)
        want.update(extra)
        want["community_id"] = community_id(want)  # after extra: its parse_flags say what was cut
        assert got["ifname"] == host.peer_ifname, name
        want.update(ts=0, ifname="", direction="ingress", parse_flags=want["parse_flags"] & ~IGNORED_FLAGS,
                    tunnel_type=TUNNEL_TYPES[want["tunnel_type"]],
                    **{c.name: want[c.name].hex() for c in PACKETS if c.dtype == "V16"})
        got = dict(got, ts=0, ifname="", parse_flags=got["parse_flags"] & ~records.PARSE_VLAN_ACCEL)
        got = {k: (int(v) if isinstance(want[k], int) and not isinstance(v, int) else v) for k, v in got.items()}
        diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        assert not diff, f"{name}: (got, want) {diff}"


def test_metrics_and_collector_stats_count_what_was_sent(lab, tmp_path, collector_factory):
    from tests.support import free_port

    server = ServerProcess(f"chdb://{tmp_path}/store", tmp_path, "--metrics-listen", f"127.0.0.1:{free_port()}")
    server.start()
    try:
        metrics_port = free_port()
        host = lab.add_host("a")
        collector = collector_factory(server, [host.peer_ifname], "metrics-test",
                                      "--metrics-listen", f"127.0.0.1:{metrics_port}")
        sender = send_udp(lab, host, 40004, 800, rate=2000)
        assert sender.wait(60) == 0
        wait_until(lambda: server.count("dst_port = 40004") == 800, 30, "800 rows")

        def scrape(port):
            import urllib.request
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines() if line and not line.startswith("#")}
        m = wait_until(lambda: (lambda m: m if m["hdrlog_collector_acked_rows_total"] >= 800 else None)(
            scrape(metrics_port)), 20, "collector acks in metrics")
        assert m["hdrlog_collector_logged_records_total"] >= 800
        assert m["hdrlog_collector_seen_packets_total"] >= m["hdrlog_collector_logged_records_total"]
        assert m['hdrlog_collector_dropped_records_total{reason="ringbuf_full"}'] == 0
        assert m["hdrlog_collector_server_connected"] == 1
        assert collector.stop() == 0
        s = scrape(int(server.cmd[server.cmd.index("--metrics-listen") + 1].rsplit(":", 1)[1]))
        assert s['hdrlog_server_inserted_rows_total{table="packets"}'] >= 800
        stats = {r["counter"]: int(r["total"]) for r in server.sql(
            "SELECT counter, sum(value) AS total FROM hdrlog.collector_stats WHERE host = 'metrics-test' "
            "GROUP BY counter")}
        assert stats["logged"] >= 800 and stats["seen"] >= stats["logged"]
        assert stats["drop_ringbuf_full"] == 0 and stats["drop_unacked_full"] == 0
    finally:
        server.stop()


def test_a_veth_that_appears_later_is_captured_without_a_restart(lab, server, collector_factory):
    """The README's `--iface 'veth*'` on a host whose containers start after the collector."""
    first = lab.add_host("a")
    collector = collector_factory(server, [first.peer_ifname, f"{lab.prefix}{lab.suffix}*"], "late-veth")
    late = lab.add_host("b")
    wait_until(lambda: f"attached to {late.peer_ifname}" in collector.log(), 30, "the new veth attached")
    assert send_udp(lab, late, 40005, 200, rate=400).wait(60) == 0
    where = f"dst_port = 40005 AND ifname = '{late.peer_ifname}' AND host = 'late-veth'"
    wait_until(lambda: server.count(where) >= 200, 30, "the new veth's rows")
    assert collector.alive()
