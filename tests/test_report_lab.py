"""hdrlog report with ground truth on a lab: real traffic through real collectors into a real server.

One scenario for the module (it is the expensive part):

1. Background: two hosts make HTTP requests, DNS lookups and pings to services on their
   root-side peers: ``web`` (watched, with the idle ``scan``, ``xmas`` and ``flood`` hosts, by
   collector ``gw``) and ``quiet`` (collector ``quiet``).
2. Baseline history: the background rows just stored are read back over SQL and ingested again
   through the server's gRPC ingest, shifted by 1..7 days (collector ids ``baseline-copy-K``):
   "the same hours of the previous days" held the same traffic. (Synthesised on purpose: a lab
   cannot wait a week; the copies are the recorded traffic itself, not invented numbers.)
3. A baseline-only report must find nothing.
4. Injected: a SYN port scan (``scan``), an XMAS scan (``xmas``), a SYN flood with spoofed
   sources to a listening port (``flood``), a DNS-tunnel-like burst of long random names under
   one domain answered NXDOMAIN (``web``), and ``quiet`` goes silent (traffic and collector
   stop). The report must name each with the right subject.

The HTML report is rendered by headless Chromium and the screenshot checked for the findings;
every docs/sql.md query runs against this lab's data.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import grpc
import pytest

from hdrlog.dev.demo import serve_dns
from hdrlog.dev.lab import Lab
from hdrlog.proto import columns as registry
from hdrlog.proto import ingest_pb2, ingest_pb2_grpc
from tests.support import HDRLOG, CollectorProcess, ServerProcess, wait_until

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs Linux eBPF")

DAY_NS = 86_400 * 10**9
SILENT = 12  # seconds: --silent-after of the reports here

BACKGROUND = r"""
import http.client, socket, struct, subprocess, sys, time
peer, seconds = sys.argv[1], float(sys.argv[2])
names = ["www.example.test", "api.example.test", "cdn.example.test"]
def query(name, i):
    q = struct.pack(">HHHHHH", i & 0xffff, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
    s.sendto(q, (peer, 53))
    try: s.recvfrom(512)
    except OSError: pass
    s.close()
end, i = time.monotonic() + seconds, 0
while time.monotonic() < end:
    c = http.client.HTTPConnection(peer, 8080, timeout=2)
    c.request("GET", f"/page/{i % 5}", headers={"Host": "web.example.test"})
    c.getresponse().read(); c.close()
    query(names[i % 3], i)
    i += 1
    time.sleep(0.25)
"""

TUNNEL = r"""
import random, socket, struct, sys, time
peer, n = sys.argv[1], int(sys.argv[2])
rnd = random.Random(7)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)
for i in range(n):
    label = "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz234567") for _ in range(40))
    name = f"{label}.t.exfil.test"
    q = struct.pack(">HHHHHH", i, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 16, 1)
    s.sendto(q, (peer, 53))
    try: s.recvfrom(512)
    except OSError: pass
    time.sleep(0.003)
"""


class _Web(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):  # noqa: N802
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def _noerror_or_nxdomain(query: bytes) -> bytes:
    """NOERROR (no records) for *.example.test, NXDOMAIN for anything else."""
    end = query.index(b"\0", 12) + 5
    labels, pos = [], 12
    while query[pos]:
        labels.append(query[pos + 1: pos + 1 + query[pos]].decode())
        pos += 1 + query[pos]
    rcode = 0 if ".".join(labels).endswith("example.test") else 3
    return query[:2] + struct.pack(">H", 0x8180 | rcode) + b"\0\x01\0\0\0\0\0\0" + query[12:end]


def _copy_to_previous_days(server: ServerProcess, lo_ns: int, hi_ns: int, days: int = 7) -> int:
    """Read the rows stored in [lo, hi) and ingest them again shifted by 1..days days."""
    # Aliases get a prefix: an alias named like its column would shadow it in WHERE.
    select = ", ".join(f"toString(toUnixTimestamp64Nano(ts)) AS c_{c.name}" if c.name == "ts" else
                       f"hex({c.name}) AS c_{c.name}" if c.dtype == "V16" else
                       f"toString({c.name}) AS c_{c.name}" for c in registry.PACKETS)
    rows = server.sql(f"SELECT host, {select} FROM hdrlog.packets WHERE ts >= fromUnixTimestamp64Nano(toInt64({lo_ns})) "
                      f"AND ts < fromUnixTimestamp64Nano(toInt64({hi_ns})) AND collector_id NOT LIKE 'baseline-copy-%'")
    import numpy as np
    by_host: dict[str, list[dict]] = {}
    for r in rows:
        by_host.setdefault(r["host"], []).append(r)
    batches = []
    for k in range(1, days + 1):
        for seq, (host, hrows) in enumerate(sorted(by_host.items()), 1):
            cols: dict = {}
            for c in registry.PACKETS:
                vals = [r["c_" + c.name] for r in hrows]
                if c.name == "ts":
                    cols["ts"] = np.array([int(v) - k * DAY_NS for v in vals], dtype="<i8")
                elif c.name == "direction":
                    cols[c.name] = np.array([1 if v == "ingress" else 2 for v in vals], dtype="u1")
                elif c.name == "tunnel_type":
                    cols[c.name] = np.array([registry.TUNNEL_TYPES.index(v) for v in vals], dtype="u1")
                elif c.dtype == "V16":
                    cols[c.name] = np.array([bytes.fromhex(v) for v in vals], dtype="V16")
                elif c.is_string:
                    cols[c.name] = vals
                else:
                    cols[c.name] = np.array([int(v) for v in vals], dtype=c.dtype)
            b = ingest_pb2.Batch(collector_id=f"baseline-copy-{k}", host=host, seq=seq)
            b.tables.append(registry.encode_table("packets", cols, len(hrows)))
            batches.append(b)
    with grpc.insecure_channel(server.address) as channel:
        acks = list(ingest_pb2_grpc.IngestStub(channel).Stream(iter(batches), timeout=120))
    assert len(acks) == len(batches) and all(a.status == ingest_pb2.Ack.OK for a in acks), acks
    return len(rows)


def _report(server: ServerProcess, since: float, out: Path, fmt: str = "json") -> dict | str:
    p = subprocess.run([*HDRLOG, "report", "--url", server.sql_url, "--since", f"{since:.0f}s", "--format", fmt,
                        "--out", str(out), "--silent-after", f"{SILENT}s"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(out.read_text()) if fmt == "json" else out.read_text()


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    from scapy.all import IP, TCP, Ether

    from tests.frames import send_frames

    tmp = tmp_path_factory.mktemp("reportlab")
    stop = threading.Event()
    servers: list = []
    procs: list = []
    with Lab() as lab:
        server = ServerProcess(f"chdb://{tmp}/store", tmp)
        try:
            web, quiet, scan, xmas, flood = (lab.add_host(n) for n in ("web", "quiet", "scan", "xmas", "flood"))
            for h in (web, quiet, flood):
                httpd = http.server.ThreadingHTTPServer((h.peer_addr4, 8080), _Web)
                servers.append(httpd)
                threading.Thread(target=httpd.serve_forever, daemon=True).start()
            for h in (web, quiet):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.bind((h.peer_addr4, 53))
                servers.append(s)
                threading.Thread(target=serve_dns, args=(s, stop, _noerror_or_nxdomain), daemon=True).start()
            server.start()
            gw = CollectorProcess(server.address, [web.peer_ifname, scan.peer_ifname, xmas.peer_ifname,
                                                   flood.peer_ifname], "gw", tmp)
            qc = CollectorProcess(server.address, [quiet.peer_ifname], "quiet", tmp)
            procs += [gw, qc]
            starting = [threading.Thread(target=c.start) for c in (gw, qc)]  # BCC compiles both at once
            for t in starting:
                t.start()
            for t in starting:
                t.join()
            assert gw.alive() and qc.alive(), gw.log()[-2000:] + qc.log()[-2000:]

            # 1. background, and pings that keep both hosts reporting
            t0 = time.time_ns()
            pings = [lab.popen(h, "ping", "-q", "-i", "0.5", h.peer_addr4, stdout=subprocess.DEVNULL)
                     for h in (web, quiet)]
            bg = [lab.popen(h, sys.executable, "-c", BACKGROUND, h.peer_addr4, "15") for h in (web, quiet)]
            assert all(p.wait(60) == 0 for p in bg)
            time.sleep(1.0)
            wait_until(lambda: server.count("host = 'quiet' AND dns_qname != ''") > 0, 30, "background rows")
            # 2. the same traffic on the previous 7 days
            copied = _copy_to_previous_days(server, t0 - 10**9, time.time_ns())
            wait_until(lambda: server.count("collector_id LIKE 'baseline-copy-%'") >= 7 * copied, 60, "baseline copies")
            # the rollups follow the packets by up to a few seconds (docs/sql.md): the detectors read them
            old_rows = "SELECT toInt64({}) AS n FROM hdrlog.{} WHERE {} < now() - INTERVAL 1 DAY"
            wait_until(lambda: server.sql(old_rows.format("sum(records)", "packets_1m", "minute"))
                       == server.sql(old_rows.format("count()", "packets", "ts")), 60, "the baseline days rolled up")
            # 3. baseline only
            since = (time.time_ns() - t0) / 1e9 + 2
            baseline = _report(server, since, tmp / "baseline.json")
            baseline_html = _report(server, since, tmp / "baseline.html", fmt="html")

            # 4. anomalies
            pings[1].kill()
            assert qc.stop() == 0
            t_silent = time.time()
            web_bg = lab.popen(web, sys.executable, "-c", BACKGROUND, web.peer_addr4, "8")

            for d in ("scan", "xmas", "flood"):
                (tmp / d).mkdir()

            def frames(h, flags, ports, sources=None):
                return [bytes(Ether(src=h.mac, dst=h.peer_mac)
                              / IP(src=(sources[i % len(sources)] if sources else h.addr4), dst=h.peer_addr4)
                              / TCP(sport=(1024 + i) if sources else 40404, dport=p, flags=flags))
                        for i, p in enumerate(ports)]
            send_frames(lab, scan, frames(scan, "S", range(20000, 20300)), tmp / "scan")
            send_frames(lab, xmas, frames(xmas, "FPU", range(21000, 21060)), tmp / "xmas")
            base = flood.addr4.rsplit(".", 1)[0]
            send_frames(lab, flood, frames(flood, "S", [8080] * 3000, [f"{base}.{i}" for i in range(10, 250)]),
                        tmp / "flood")
            tunnel = lab.run(web, sys.executable, "-c", TUNNEL, web.peer_addr4, "200", timeout=60)
            assert tunnel.returncode == 0
            assert web_bg.wait(60) == 0
            wait_until(lambda: server.count("dns_rcode = 3 AND host = 'gw'") >= 150, 30, "tunnel answers")
            wait_until(lambda: server.count(f"dst_port = 8080 AND tcp_flags = 2 AND host = 'gw' AND "
                                            f"dst_ip = toIPv6('{flood.peer_addr4}')") >= 3000, 30, "flood rows")
            time.sleep(max(0.0, SILENT + 2 - (time.time() - t_silent)))
            since = (time.time_ns() - t0) / 1e9 + 2
            attack = _report(server, since, tmp / "attack.json")
            attack_html = _report(server, since, tmp / "attack.html", fmt="html")
            yield {"server": server, "tmp": tmp, "baseline": baseline, "attack": attack,
                   "baseline_html": tmp / "baseline.html", "attack_html": tmp / "attack.html",
                   "hosts": {"web": web, "quiet": quiet, "scan": scan, "xmas": xmas, "flood": flood},
                   "texts": (baseline_html, attack_html)}
        finally:
            stop.set()
            for s in servers:
                if isinstance(s, socket.socket):
                    s.close()
                else:
                    s.shutdown()
                    s.server_close()
            for p in procs:
                p.stop()
            server.stop()


def _subjects(report: dict) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in report["findings"]:
        out.setdefault(f["detector"], set()).add(f["subject"])
    return out


def test_baseline_only_flags_nothing(scenario):
    rep = scenario["baseline"]
    assert rep["findings"] == [], [f["title"] for f in rep["findings"]]
    assert rep["summary"].startswith("No anomalies found")
    assert not rep["detectors_failed"]
    assert "traffic_change" in rep["detectors_run"] and not any("not judged" in n for n in rep["notes"]), rep["notes"]


def test_injected_anomalies_are_flagged_with_the_right_subject(scenario):
    rep, h = scenario["attack"], scenario["hosts"]
    got = _subjects(rep)
    assert not rep["detectors_failed"]
    assert h["scan"].addr4 in got.get("port_scan", set()), got
    assert got.get("syn_flood") == {f"{h['flood'].peer_addr4}:8080"}, got
    assert h["xmas"].addr4 in got.get("tcp_flags", set()), got
    assert got.get("dns_long_names") == {"exfil.test"} and got.get("dns_many_subdomains") == {"exfil.test"}, got
    assert got.get("dns_nxdomain") == {h["web"].addr4}, got
    assert got.get("silent_host") == {"quiet"}, got
    sev = {(f["detector"], f["subject"]): f["severity"] for f in rep["findings"]}
    assert sev[("syn_flood", f"{h['flood'].peer_addr4}:8080")] in ("high", "critical")
    xmas = next(f for f in rep["findings"] if f["detector"] == "tcp_flags" and f["subject"] == h["xmas"].addr4)
    assert xmas["evidence"]["kind"] == "XMAS" and xmas["evidence"]["probed_pairs"] == 60
    assert any("read-only" in n for n in rep["notes"])  # through the SQL endpoint: not recorded, and it says so


def _png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Width, height and rows of RGB(A) pixels of an 8-bit PNG (what Chromium writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8: pos + 8 + n]
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and ctype in (2, 6)
            bpp = 4 if ctype == 6 else 3
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r[i:i + 3]) for r in rows for i in range(0, len(r), bpp)]


def _screenshot(html: Path, png: Path) -> list[bytes]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: run scripts/install-os.sh (make install does)")
    profile = tempfile.mkdtemp(prefix="hdrlog-chromium-")
    try:
        p = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                            "--disable-component-update", "--disable-sync", "--no-first-run",
                            f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1200,1600",
                            html.as_uri()], capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert p.returncode == 0 and png.exists(), p.stderr[-2000:]
    return _png_pixels(png)[2]


def _count(pixels: list[bytes], hex_color: str) -> int:
    want = bytes.fromhex(hex_color.lstrip("#"))
    return sum(1 for px in pixels if px == want)


def test_html_report_renders_in_chromium_and_shows_the_findings(scenario):
    tmp = scenario["tmp"]
    base_html, attack_html = scenario["texts"]
    h = scenario["hosts"]
    # self-contained: no external assets, charts inline
    for text in (base_html, attack_html):
        assert "<script" not in text and "src=" not in text and "<svg" in text
    for subject in (h["scan"].addr4, f"{h['flood'].peer_addr4}:8080", "exfil.test", "quiet", h["xmas"].addr4):
        assert subject in attack_html
    base_px = _screenshot(scenario["baseline_html"], tmp / "baseline.png")
    attack_px = _screenshot(scenario["attack_html"], tmp / "attack.png")
    shutil.copy(tmp / "attack.png", Path(os.environ.get("HDRLOG_REPORT_PNG", tmp / "kept.png")))
    # The attack page shows severity badges and cards (high red, critical purple) and the "findings"
    # summary box; the baseline page shows the green "no anomalies" box and no badge colour at all.
    high, critical = "#c62828", "#7b1fa2"
    assert _count(attack_px, high) + _count(attack_px, critical) > 2000
    assert _count(attack_px, "#fff3e0") > 10_000 and _count(attack_px, "#e8f5e9") == 0
    assert _count(base_px, "#e8f5e9") > 10_000
    assert _count(base_px, high) + _count(base_px, critical) == 0


def test_every_cookbook_query_runs_on_lab_data(scenario):
    from bench.cookbook import recipes

    server = scenario["server"]
    nonempty = 0
    for r in recipes():
        for sql in filter(None, (r.sql, r.raw)):
            try:
                rows = server.sql(sql)
            except Exception as exc:  # noqa: BLE001 - name the recipe
                body = exc.read().decode() if hasattr(exc, "read") else str(exc)
                raise AssertionError(f"docs/sql.md question {r.number} ({r.question}) failed: {body[:500]}") from None
            nonempty += bool(rows)
    assert len(recipes()) >= 20
    # the lab's traffic answers most questions (flows, fragments, SSH... have no lab traffic)
    assert nonempty >= 20, nonempty
