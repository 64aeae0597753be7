"""hdrlog report on controlled data: every detector against ground truth, outputs, delivery, CLI.

The store is filled through the server's own conversion and rollups (convert_batch -> Store.insert,
and server/rollup.py's partial aggregates -> Store.insert_rollup, as the writer does) with synthetic traffic (bench/synth.py) for the
report's hour and the same hour of the 7 days before, plus injected anomalies whose subjects
are known. The lab test (test_report_lab.py) does the same with real traffic.
"""

from __future__ import annotations

import email
import http.server
import json
import os
import socketserver
import stat
import subprocess
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from bench import synth
from hdrlog.proto import columns as registry
from hdrlog.proto import ingest_pb2
from hdrlog.report import deliver, render
from hdrlog.report import build as reporting
from hdrlog.report.connection import Connection, connect
from hdrlog.report.scheduler import ReportScheduler
from hdrlog.server import rollup
from hdrlog.server.convert import convert_batch
from hdrlog.report.config import ReportConfig
from hdrlog.server.store import Store
from tests.support import HDRLOG

NS = 10**9
DAY = 86_400
LAB_NETS = ["198.18.0.0/15", "fe80::/10"]


def _columns(table: str, rows: list[dict]) -> dict:
    """The columns of ``table`` that ``rows`` (dicts of column values, addresses as text) name; 0 or '' where a
    row has no value."""
    cols: dict = {}
    specs = registry.spec_of(table)
    for name in {k for r in rows for k in r}:
        spec = specs[name]
        vals = [r.get(name, "" if spec.is_string else 0) for r in rows]
        if spec.dtype == "V16":
            cols[name] = np.array([synth.v16(v) if v else b"\0" * 16 for v in vals], dtype="V16")
        elif spec.is_string:
            cols[name] = vals
        else:
            cols[name] = np.array(vals, dtype=spec.dtype)
    return cols


class Filler:
    def __init__(self, store: Store):
        self.store, self.seq = store, 0

    def packets(self, host: str, cols: dict) -> None:
        self._send(host, "packets", cols)

    def _send(self, host: str, table: str, cols: dict) -> None:
        n = len(cols["ts"]) if "ts" in cols else len(cols["start_ts"])
        full = registry.empty_columns(table, n)
        full.update(cols)
        self.seq += 1
        b = ingest_pb2.Batch(collector_id=f"test-{host}", host=host, seq=self.seq)
        b.tables.append(registry.encode_table(table, full, n))
        for t in convert_batch(b, host):
            self.store.insert(t.name, t.data, f"fill-{self.seq}-{t.name}")
            if t.name == "packets":  # the rollups, as the server's writer makes them (server/rollup.py)
                self.store.insert_rollup(rollup.rollup_rows(t.data)[0], f"fill-{self.seq}-rollup")

    def connections(self, host: str, rows: list[dict], start: float, spread: float) -> None:
        """Connection rows given as dicts (addresses as text; final = 1 and a uid unless given)."""
        n = len(rows)
        cols: dict = {"start_ts": (start * NS + np.arange(n) * (spread * NS / max(n, 1))).astype("<i8")}
        cols["end_ts"] = cols["start_ts"] + 1000
        cols.update(_columns("connections", rows))
        cols.setdefault("uid", [f"Cinj{host}{start:.0f}{i:06d}" for i in range(n)])
        cols.setdefault("final", np.ones(n, dtype="u1"))
        cols.setdefault("ifname", ["eth0"] * n)
        cols.setdefault("ip_version", np.full(n, 4, dtype="u1"))
        cols.setdefault("ip_proto", np.full(n, 6, dtype="u1"))
        self._send(host, "connections", cols)

    def crafted(self, host: str, rows: list[dict], start: float, spread: float) -> None:
        """Rows given as dicts of column values (addresses as text), spread evenly over ``spread`` seconds."""
        n = len(rows)
        cols: dict = {"ts": (start * NS + np.arange(n) * (spread * NS / max(n, 1))).astype("<i8")}
        cols.update(_columns("packets", rows))
        cols.setdefault("ifname", ["eth0"] * n)
        cols.setdefault("sample_rate", np.ones(n, dtype="<u4"))
        cols.setdefault("ip_version", np.full(n, 4, dtype="u1"))
        cols.setdefault("wire_len", np.full(n, 60, dtype="<u4"))
        self.packets(host, cols)



@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """A store with 8 days of the same hour, and injected anomalies in the last hour."""
    tmp = tmp_path_factory.mktemp("report")
    url = f"chdb://{tmp}/store"
    store = Store(url)
    store.open()
    store.migrate()
    fill = Filler(store)
    now = time.time()
    end = now - 5
    for k in range(0, 8):
        e = end - k * DAY
        scale = 1
        for host, cols in synth.packets(24_000 * scale, start_ns=int((e - 3600) * NS), seconds=3590, hosts=4,
                                        seed=100 + k).items():
            if k == 0 and host == "host-03":
                keep = cols["ts"] < int((e - 1800) * NS)  # host-03 goes quiet half-way through the hour
                cols = {c: ([v for v, m in zip(vals, keep) if m] if isinstance(vals, list) else vals[keep])
                        for c, vals in cols.items()}
            fill.packets(host, cols)
        # the hosts' connections (auto mode): mostly SF, ~1% S0/REJ, some with interim rows; host-03
        # runs an older collector (packets only): its scan and flood below are judged from packets
        for host, cols in synth.connections(3000, start_ns=int((e - 3600) * NS), seconds=3590, hosts=4,
                                            seed=300 + k).items():
            if host != "host-03":
                fill._send(host, "connections", cols)
        if k == 0:  # host-01: five times its usual traffic
            for i in range(4):
                fill.packets("host-01", synth.packets(24_000, start_ns=int((e - 3600) * NS), seconds=3590, hosts=4,
                                                      seed=900 + i)["host-01"])
        # a source with a steady TTL of 60 on every previous day; 40 in the window
        fill.crafted("host-02", [{"src_ip": "198.19.7.7", "dst_ip": "198.18.2.10", "ip_proto": 6, "src_port": 443,
                                  "dst_port": 40000 + i, "tcp_flags": 0x10, "ttl": 40 if k == 0 else 60}
                                 for i in range(60)], e - 3000, 600)
    s = end - 1500
    # port scan as connections (host-00 has them, so the detector reads those): 198.19.9.9 tries 300
    # ports of 198.18.0.10: 200 refused, 97 unanswered, 3 open (SYN-ACK, then the scanner's RST)
    fill.connections("host-00", [{"orig_ip": "198.19.9.9", "resp_ip": "198.18.0.10", "orig_port": 55555,
                                  "resp_port": 1 + p, "orig_pkts": 1, "resp_pkts": 1 if p < 203 else 0,
                                  "conn_state": "REJ" if p < 200 else "RSTO" if p < 203 else "S0",
                                  "history": "Sr" if p < 200 else "ShR" if p < 203 else "S"}
                                 for p in range(300)], s, 20)
    # SYN flood as connections (host-01 has them): 2000 attempts from 50 sources to 198.18.1.10:443,
    # none completed
    fill.connections("host-01", [{"orig_ip": f"198.19.{100 + i % 50}.{1 + i % 10}", "resp_ip": "198.18.1.10",
                                  "orig_port": 1024 + i, "resp_port": 443, "orig_pkts": 1, "conn_state": "S0",
                                  "history": "S"} for i in range(2000)], s, 10)
    # host-03 logs packets only: its scan and flood are judged from packets (before it goes quiet)
    fill.crafted("host-03", [{"src_ip": "198.19.9.7", "dst_ip": "198.18.5.11", "ip_proto": 6, "src_port": 44444,
                              "dst_port": 1 + p, "tcp_flags": 0x02} for p in range(80)], end - 2400, 20)
    fill.crafted("host-03", [{"src_ip": f"198.19.{150 + i % 50}.{1 + i % 10}", "dst_ip": "198.18.5.10",
                              "ip_proto": 6, "src_port": 2048 + i, "dst_port": 80, "tcp_flags": 0x02}
                             for i in range(1500)], end - 2400, 10)
    # (the packet rows of the scan and flood below are on hosts with connections: not judged from packets)
    # port scan: 198.19.9.9 SYNs 300 ports of 198.18.0.10; a few answer
    fill.crafted("host-00", [{"src_ip": "198.19.9.9", "dst_ip": "198.18.0.10", "ip_proto": 6, "src_port": 55555,
                              "dst_port": 1 + p, "tcp_flags": 0x02} for p in range(300)]
                 + [{"src_ip": "198.18.0.10", "dst_ip": "198.19.9.9", "ip_proto": 6, "src_port": 22,
                     "dst_port": 55555, "tcp_flags": 0x12}], s, 20)
    # SYN flood: 2000 SYNs from 500 sources to 198.18.1.10:443, no handshake completed
    fill.crafted("host-01", [{"src_ip": f"198.19.{100 + i % 50}.{1 + i % 10}", "dst_ip": "198.18.1.10", "ip_proto": 6,
                              "src_port": 1024 + i, "dst_port": 443, "tcp_flags": 0x02} for i in range(2000)], s, 10)
    # XMAS probes
    fill.crafted("host-00", [{"src_ip": "198.19.9.8", "dst_ip": "198.18.0.11", "ip_proto": 6, "src_port": 40404,
                              "dst_port": 1000 + p, "tcp_flags": 0x29} for p in range(40)], s, 5)
    # DNS tunnel: long random names under tunnel.example.net, answered NXDOMAIN
    rng = np.random.default_rng(7)
    names = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz234567"), 40)) + ".tunnel.example.net"
             for _ in range(120)]
    fill.crafted("host-02", [{"src_ip": "198.18.2.10", "dst_ip": "198.19.0.53", "ip_proto": 17, "src_port": 40000 + i,
                              "dst_port": 53, "dns_qname": n, "dns_qtype": 16} for i, n in enumerate(names)]
                 + [{"src_ip": "198.19.0.53", "dst_ip": "198.18.2.10", "ip_proto": 17, "src_port": 53,
                     "dst_port": 40000 + i, "dns_qname": n, "dns_qtype": 16, "dns_flags": 0x8183, "dns_rcode": 3}
                    for i, n in enumerate(names)], s, 30)
    # a new service (198.18.0.10:2222 answers two clients) and a new external destination
    fill.crafted("host-00", [{"src_ip": "198.18.0.10", "dst_ip": f"198.18.0.{20 + i}", "ip_proto": 6, "src_port": 2222,
                              "dst_port": 50000 + i, "tcp_flags": 0x12} for i in range(2)]
                 + [{"src_ip": "198.18.0.12", "dst_ip": "203.0.113.50", "ip_proto": 6, "src_port": 51000,
                     "dst_port": 443, "tcp_flags": 0x02, "wire_len": 74}], s, 5)
    # collector drops on host-02
    fill._send("host-02", "collector_stats", {
        "ts": np.array([int(s * NS)] * 2, dtype="<i8"), "interval_ms": np.array([1000, 1000], dtype="<u4"),
        "counter": ["seen", "drop_ringbuf_full"], "value": np.array([10_000, 500], dtype="<u8")})
    # host-01 samples 1:10 and filters some: what it was asked to do, coverage not loss
    fill._send("host-01", "collector_stats", {
        "ts": np.array([int(s * NS)] * 3, dtype="<i8"), "interval_ms": np.array([1000] * 3, dtype="<u4"),
        "counter": ["seen", "drop_sampled_out", "drop_filtered"],
        "value": np.array([10_000, 9_000, 400], dtype="<u8")})
    store.close()
    return url, end


def _build(url: str, **kw) -> reporting.Report:
    cfg = ReportConfig(clickhouse=url, internal_nets=LAB_NETS, **kw)
    cfg.validate()
    conn = connect(cfg)
    try:
        return reporting.build(conn.query, cfg)
    finally:
        conn.close()


def _subjects(report: reporting.Report) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in report.findings:
        out.setdefault(f.detector, set()).add(f.subject)
    return out


def test_every_detector_flags_its_injected_anomaly(filled):
    url, end = filled
    report = _build(url, since="1h")
    got = _subjects(report)
    assert not report.failed, report.failed
    assert got.get("port_scan") == {"198.19.9.9", "198.19.9.7"}
    assert got.get("syn_flood") == {"198.18.1.10:443", "198.18.5.10:80"}
    assert got.get("tcp_flags") == {"198.19.9.8"}
    assert "host-01" in got.get("traffic_spike", set())
    assert "198.18.0.10:2222" in got.get("new_service", set())
    assert got.get("new_destination") == {"203.0.113.50"}
    assert got.get("dns_nxdomain") == {"198.18.2.10"}
    assert got.get("dns_long_names") == {"example.net"} or got.get("dns_long_names") == {"tunnel.example.net"}
    assert got.get("dns_many_subdomains") == got.get("dns_long_names")
    assert got.get("ttl") == {"198.19.7.7"}
    assert got.get("silent_host") == {"host-03"}
    assert got.get("collector_drops") == {"host-02:drop_ringbuf_full"}  # sampling is not loss
    coverage = [n for n in report.notes if n.startswith("coverage: host-01")]
    assert coverage and "9000 sampled out" in coverage[0] and "400 filtered" in coverage[0], report.notes
    flood = next(f for f in report.findings if f.detector == "syn_flood" and f.subject == "198.18.1.10:443")
    assert flood.evidence["source"] == "connections"
    assert flood.evidence["syns"] == 2000 and flood.evidence["handshakes_completed"] == 0
    assert (flood.evidence["half_open"], flood.evidence["unanswered_S0"], flood.evidence["sources"]) == (2000, 2000, 50)
    old = next(f for f in report.findings if f.detector == "syn_flood" and f.subject == "198.18.5.10:80")
    assert old.evidence["source"] == "packets" and old.evidence["syns"] == 1500  # the fallback
    scan = next(f for f in report.findings if f.detector == "port_scan" and f.subject == "198.19.9.9")
    assert scan.evidence["source"] == "connections"
    assert (scan.evidence["probed_pairs"], scan.evidence["refused_REJ"], scan.evidence["unanswered_S0"]) == (300, 200, 97)
    assert scan.evidence["targets"] == 1 and scan.evidence["answered_pairs"] == 0
    old = next(f for f in report.findings if f.detector == "port_scan" and f.subject == "198.19.9.7")
    assert old.evidence["source"] == "packets" and old.evidence["probed_pairs"] == 80
    spike = next(f for f in report.findings if f.detector == "traffic_spike")
    assert len(spike.evidence["series"]["current"]) == 60 and spike.evidence["robust_z"] > 3.5


def test_a_normal_hour_flags_nothing_and_says_so(filled):
    url, end = filled
    until = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(end - DAY))
    report = _build(url, since="1h", until=until)
    assert report.findings == [], [f.title for f in report.findings]
    assert report.summary().startswith("No anomalies found")
    assert "No anomalies found" in render.render(report, "md")
    assert "No anomalies found" in render.render(report, "html")
    assert json.loads(render.render(report, "json"))["findings"] == []


def test_without_history_new_things_are_not_judged(filled):
    url, end = filled
    report = _build(url, since="1h", baseline_days=1, min_baseline_days=1,
                    until=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(end - 7 * DAY)))
    assert not {"new_service", "new_destination"} & set(_subjects(report))
    assert any("nothing stored in the previous" in n for n in report.notes)


class _Hook(http.server.BaseHTTPRequestHandler):
    bodies: list = []

    def do_POST(self):  # noqa: N802
        self.bodies.append((self.headers["Content-Type"], self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a):
        pass


class _Smtp(socketserver.StreamRequestHandler):
    """Just enough SMTP for smtplib: EHLO/HELO, MAIL, RCPT, DATA, QUIT."""
    messages: list = []

    def handle(self):
        self.wfile.write(b"220 test\r\n")
        while line := self.rfile.readline():
            cmd = line.strip().upper()
            if cmd.startswith(b"DATA"):
                self.wfile.write(b"354 go\r\n")
                data = b""
                while (part := self.rfile.readline()) != b".\r\n":
                    data += part
                self.messages.append(data)
                self.wfile.write(b"250 ok\r\n")
            elif cmd.startswith(b"QUIT"):
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"250 ok\r\n")


def test_delivery_to_directory_webhook_and_mail(filled, tmp_path):
    url, _ = filled
    report = _build(url, since="1h")
    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    smtp = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Smtp)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (hook, smtp)]
    for t in threads:
        t.start()
    try:
        cfg = ReportConfig(format="md", out=str(tmp_path / "reports") + "/",
                           webhook=f"http://127.0.0.1:{hook.server_address[1]}/hdrlog",
                           smtp_host="127.0.0.1", smtp_port=smtp.server_address[1], mail_to=["ops@example.test"])
        cfg.validate()
        done = deliver.deliver(report, cfg)
        assert len(done) == 3, (done, report.notes)
        files = list((tmp_path / "reports").glob("hdrlog-report-*.md"))
        assert len(files) == 1 and "syn_flood" in files[0].read_text()
        ctype, body = _Hook.bodies[-1]
        assert ctype == "application/json"
        posted = json.loads(body)
        assert {f["detector"] for f in posted["findings"]} >= {"port_scan", "syn_flood", "silent_host"}
        msg = email.message_from_bytes(_Smtp.messages[-1])
        assert msg["To"] == "ops@example.test" and "findings" in msg["Subject"]
        kinds = {p.get_content_type() for p in msg.walk()}
        assert {"text/plain", "text/html"} <= kinds
        # an unreachable webhook is reported, the rest still delivered
        bad = replace(cfg, webhook="http://127.0.0.1:9/x", smtp_host="", out=str(tmp_path / "r.json"), format="json")
        deliver.WEBHOOK_ATTEMPTS, saved = 1, deliver.WEBHOOK_ATTEMPTS
        try:
            done = deliver.deliver(report, bad)
        finally:
            deliver.WEBHOOK_ATTEMPTS = saved
        assert done == [str(tmp_path / "r.json")] and any("not delivered" in n for n in report.notes)
    finally:
        for s in (hook, smtp):
            s.shutdown()
            s.server_close()


def test_cli_report_records_findings_and_migrate_is_idempotent(filled, tmp_path):
    url, _ = filled
    out = tmp_path / "r.html"
    p = subprocess.run([*HDRLOG, "report", "--clickhouse", url, "--since", "1h", "--out", str(out),
                        "--internal-nets", LAB_NETS[0]], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "findings from" in p.stderr
    # a delivery that fails makes the exit code non-zero, so that a timer's OnFailure= hears of it
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the report's directory should be\n")
    failed = subprocess.run([*HDRLOG, "report", "--clickhouse", url, "--since", "1h", "--out", f"{blocked}/r.html",
                             "--internal-nets", LAB_NETS[0]], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "report not written" in failed.stderr, failed.stderr
    text = out.read_text()
    assert "<svg" in text and "198.19.9.9" in text and "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    conf = tmp_path / "hdrlog.yml"
    conf.write_text("server:\n  ttl_packets_days: 30\n  ttl_connections_days: 14\n  ttl_anomalies_days: 400\n")
    for _ in range(2):  # the first run sets the configured TTLs, the second finds nothing to do
        m = subprocess.run([*HDRLOG, "server", "migrate", "--clickhouse", url, "--config", str(conf)],
                           capture_output=True, text=True, timeout=60)
        assert m.returncode == 0, m.stderr
    assert "no migration needed" in m.stdout and "TTLs unchanged" in m.stdout
    store = Store(url)
    store.open()
    try:
        rows = store._client.query("SELECT detector, subject, severity, evidence FROM hdrlog.anomalies").result_rows  # noqa: SLF001
        assert {("syn_flood", "198.18.1.10:443")} <= {(d, s) for d, s, _, _ in rows}
        assert all(json.loads(e) for _, _, _, e in rows)
        ttl = store._client.command("SELECT create_table_query FROM system.tables WHERE name = 'packets' "  # noqa: SLF001
                                    "AND database = 'hdrlog'")
        assert "toIntervalDay(30)" in ttl
        ttl = store._client.command("SELECT create_table_query FROM system.tables WHERE name = 'connections' "  # noqa: SLF001
                                    "AND database = 'hdrlog'")
        assert "toDateTime(end_ts) + toIntervalDay(14)" in ttl  # kept 14 days after it was last seen
    finally:
        store.close()
    bad = subprocess.run([*HDRLOG, "report", "--clickhouse", url, "--since", "forever"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == ("hdrlog: bad config since='forever': expected a duration "
                                                           "such as 500ms, 90s, 15m, 1h30m or 2d")


def test_scheduler_records_in_the_server_store(filled, tmp_path):
    url, _ = filled
    store = Store(url)
    store.open()
    try:
        cfg = ReportConfig(internal_nets=LAB_NETS, out=str(tmp_path / "reports") + "/")
        sched = ReportScheduler(lambda: Connection(store.new_client(), writable=True, label="test"), cfg, every=3600)
        before = store.count("anomalies")
        rep = sched.run_once()
        assert rep.recorded and store.count("anomalies") == before + len(rep.findings) > before
    finally:
        store.close()


def test_report_config_validation():
    from hdrlog.config import ConfigError, load

    assert load(ReportConfig, args={}, section="report", environ={}).since_seconds == 3600
    for args, key in [({"since": "0s"}, "since"), ({"format": "pdf"}, "format"), ({"webhook": "ftp://x"}, "webhook"),
                      ({"smtp_host": "mx"}, "mail_to"), ({"internal_nets": "10.0.0.0/33"}, "internal_nets"),
                      ({"sql_url": "http://a", "clickhouse": "http://b"}, "sql_url")]:
        with pytest.raises(ConfigError) as err:
            load(ReportConfig, args=args, section="report", environ={})
        assert err.value.key == key, args
    assert load(ReportConfig, args={"since": "1h30m"}, section="report", environ={}).since_seconds == 5400


def test_writing_to_a_device_writes_into_it_and_leaves_it_a_device(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()))
    reader.start()
    deliver.write("report text\n", str(fifo), "md", 0.0)
    reader.join(10)
    assert got == ["report text\n"] and stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_deliberate_drops_are_the_collectors():
    """The report's idea of what is not loss is the collector's own (one list each, kept equal)."""
    from hdrlog.collector import app
    from hdrlog.report.detectors import collector_drops

    assert set(collector_drops.DELIBERATE_DROPS) == set(app.DELIBERATE_DROPS)


def test_every_detector_module_is_registered_in_order():
    """Adding a detector is adding one file: the registry finds every module that declares one."""
    import pkgutil

    from hdrlog.report import detectors

    names = [d.name for d in detectors.registry()]
    modules = sorted(i.name for i in pkgutil.iter_modules(detectors.__path__))
    assert sorted(names) == modules and names[0] == "port_scan" and names[-1] == "collector_drops"
    assert len({d.order for d in detectors.registry()}) == len(names)
