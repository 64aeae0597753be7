"""`make demo`: the main job on a lab, end to end, on the embedded store.

Starts `hdrlog server run` on the default embedded store and `hdrlog collector
run` watching the root-namespace end of a lab host's veth, drives real traffic
across it (HTTP over IPv4 and IPv6, a DNS query, UDP to a closed port and the
ICMP error it earns, ICMP and ICMPv6 echo), waits until every record is
queryable, prints three SQL answers through the server's SQL endpoint while it
still runs, then stops everything and removes the lab. The data stays in the
store for `hdrlog sql`.
"""

from __future__ import annotations

import argparse
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from typing import Callable

from hdrlog import sqlclient
from hdrlog.collector import bpfsys
from hdrlog.dev.lab import Lab

GRPC = "127.0.0.1:7600"
SQL_URL = "http://127.0.0.1:7623"

QUERIES = [
    ("Packets by protocol and direction",
     "SELECT multiIf(ip_version = 0, 'non-IP', ip_version = 4, 'IPv4', 'IPv6') AS ip, "
     "multiIf(ip_proto = 6, 'TCP', ip_proto = 17, 'UDP', ip_proto = 1, 'ICMP', ip_proto = 58, 'ICMPv6', "
     "toString(ip_proto)) AS proto, direction, count() AS packets, sum(wire_len) AS bytes "
     "FROM hdrlog.packets WHERE host = '{host}' AND ts >= fromUnixTimestamp64Nano({since}) GROUP BY ip, proto, direction ORDER BY packets DESC"),
    ("Conversations: who talked to whom on which port",
     "SELECT replaceRegexpOne(IPv6NumToString(src_ip), '^::ffff:', '') AS src, "
     "replaceRegexpOne(IPv6NumToString(dst_ip), '^::ffff:', '') AS dst, ip_proto, dst_port, "
     "count() AS packets, sum(wire_len) AS bytes FROM hdrlog.packets "
     "WHERE host = '{host}' AND ts >= fromUnixTimestamp64Nano({since}) AND direction = 'ingress' AND ip_version != 0 "
     "GROUP BY src, dst, ip_proto, dst_port ORDER BY packets DESC LIMIT 10"),
    ("Application headers: the DNS question and the HTTP requests, as the collector decoded them",
     "SELECT direction, multiIf(dns_qname != '', 'DNS', tls_sni != '', 'TLS', 'HTTP') AS app, "
     "multiIf(dns_qname != '', concat(dns_qname, ' type ', toString(dns_qtype), "
     "if(bitAnd(dns_flags, 0x8000) != 0, concat(' -> rcode ', toString(dns_rcode), ', ', toString(dns_answers), "
     "' answer(s)'), ' (query)')), http_method != '', concat(http_method, ' http://', http_host, http_path, "
     "'  [', http_user_agent, ']'), tls_sni != '', concat('SNI ', tls_sni), "
     "concat('HTTP status ', toString(http_status))) AS what, count() AS n "
     "FROM hdrlog.packets WHERE host = '{host}' AND ts >= fromUnixTimestamp64Nano({since}) "
     "AND (dns_qname != '' OR http_method != '' OR http_status != 0 OR tls_sni != '') "
     "GROUP BY direction, app, what ORDER BY app, direction"),
]

CLIENT_SCRIPT = r"""
import socket, struct, subprocess, sys, urllib.request
v4, v6 = sys.argv[1], sys.argv[2]
for url in (f"http://{v4}:8080/demo/ipv4", f"http://[{v6}]:8080/demo/ipv6"):
    urllib.request.urlopen(url, timeout=5).read()
# A DNS question for example.org, type A, answered by the demo's resolver.
query = struct.pack("!HHHHHH", 0x4d2, 0x0100, 1, 0, 0, 0) + b"\x07example\x03org\x00" + struct.pack("!HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
s.sendto(query, (v4, 53)); s.recvfrom(512); s.close()
# UDP to a closed port: the kernel answers with ICMP port unreachable.
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b"anyone?", (v4, 9)); s.close()
subprocess.run(["ping", "-c", "3", "-i", "0.2", "-q", v4], check=True, stdout=subprocess.DEVNULL)
subprocess.run(["ping", "-6", "-c", "3", "-i", "0.2", "-q", v6], check=True, stdout=subprocess.DEVNULL)
"""


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = f"hello from the demo, you asked for {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class _HTTP6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


def serve_dns(sock: socket.socket, stop: threading.Event, answer: Callable[[bytes], bytes]) -> None:
    """Until ``stop`` is set, reply to each DNS message on the UDP socket ``sock`` with ``answer(message)``."""
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            data, peer = sock.recvfrom(512)
        except socket.timeout:
            continue
        if len(data) >= 12:  # a DNS header at least
            sock.sendto(answer(data), peer)


def _a_record(query: bytes) -> bytes:
    """The answer to any question: one A record, 198.18.255.1 (a test address)."""
    return (query[:2] + b"\x81\x80" + query[4:6] + b"\x00\x01\x00\x00\x00\x00" + query[12:]
            + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + bytes([198, 18, 255, 1]))


def _say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def _wait_for_port(hostport: str, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    host, port = hostport.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: the {what} exited early with code {proc.returncode} (its log is above)")
        try:
            socket.create_connection((host, int(port)), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"demo: the {what} did not open {hostport} within {timeout:.0f}s")


def _wait_for_attach(ifname: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until the collector's classifier sits on both hooks (BCC compiles it first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: the collector exited early with code {proc.returncode} (its log is above)")
        hooks = [" ".join(bpfsys.tcx_program_names(ifname, d)) +  # tcx links, or tc filters on old kernels
                 subprocess.run(["tc", "filter", "show", "dev", ifname, d], capture_output=True, text=True).stdout
                 for d in ("ingress", "egress")]
        if all("hdrlog_" in h for h in hooks):
            return
        time.sleep(0.2)
    raise SystemExit(f"demo: the collector did not attach to {ifname} within {timeout:.0f}s")


def _stop(proc: subprocess.Popen, what: str) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise SystemExit(f"demo: the {what} did not stop within 30s after SIGTERM")
    if proc.returncode != 0:
        raise SystemExit(f"demo: the {what} exited with code {proc.returncode}")


def _count(host: str, since: int) -> int:
    out = sqlclient.run(f"SELECT count() FROM hdrlog.packets WHERE host = '{host}' "
                        f"AND ts >= fromUnixTimestamp64Nano({since})", fmt="TabSeparated", url=SQL_URL)
    return int(out.strip() or 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hdrlog.dev.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clickhouse", help="store URL (default: the server's default embedded store)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("demo: run as root (it builds network namespaces and loads eBPF)")
    hdrlog = [sys.executable, "-m", "hdrlog"]
    host_id = f"demo-{socket.gethostname()}"
    with ExitStack() as stack:
        lab = stack.enter_context(Lab(prefix="hld"))
        client = lab.add_host("client")
        _say(f"lab host {client.netns}: {client.addr4} / {client.addr6}, monitored on {client.peer_ifname}")

        stop_servers = threading.Event()
        for cls, addr in ((http.server.ThreadingHTTPServer, client.peer_addr4), (_HTTP6, client.peer_addr6)):
            web = cls((addr, 8080), _Quiet)
            threading.Thread(target=web.serve_forever, daemon=True).start()
            stack.callback(web.server_close)
            stack.callback(web.shutdown)
        dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dns.bind((client.peer_addr4, 53))
        stack.callback(dns.close)
        resolver = threading.Thread(target=serve_dns, args=(dns, stop_servers, _a_record), daemon=True)
        resolver.start()
        stack.callback(resolver.join)  # runs before dns.close: the thread is done with the socket
        stack.callback(stop_servers.set)

        server_cmd = [*hdrlog, "server", "run", "--insecure", "--listen", GRPC, "--sql-listen",
                      SQL_URL.removeprefix("http://")]
        if args.clickhouse:
            server_cmd += ["--clickhouse", args.clickhouse]
        _say("starting: " + " ".join(server_cmd[2:]))
        server = subprocess.Popen(server_cmd)
        stack.callback(lambda: server.poll() is None and server.kill())
        _wait_for_port(GRPC, server, "server")
        _wait_for_port(SQL_URL.removeprefix("http://"), server, "server's SQL endpoint")

        collector_cmd = [*hdrlog, "collector", "run", "--insecure", "--server", GRPC, "--iface",
                         client.peer_ifname, "--host-id", host_id, "--batch-interval", "0.5"]
        _say("starting: " + " ".join(collector_cmd[2:]))
        collector = subprocess.Popen(collector_cmd)
        stack.callback(lambda: collector.poll() is None and collector.kill())
        since = time.time_ns()
        _wait_for_attach(client.peer_ifname, collector)

        _say("sending traffic: HTTP over IPv4 and IPv6, a DNS query, UDP to a closed port, ping and ping -6")
        lab.run(client, "/usr/bin/python3", "-c", CLIENT_SCRIPT, client.peer_addr4, client.peer_addr6)

        # Wait until the count stops moving: every record is then queryable.
        last, stable_since, deadline = -1, time.monotonic(), time.monotonic() + 30
        while time.monotonic() < deadline:
            now = _count(host_id, since)
            if now != last:
                last, stable_since = now, time.monotonic()
            elif now > 0 and time.monotonic() - stable_since > 2:
                break
            time.sleep(0.5)
        _say(f"{last} packet headers logged for host {host_id} in this run; asking SQL while ingest runs:")
        for title, sql in QUERIES:
            print(f"\n-- {title}", flush=True)
            sys.stdout.buffer.write(sqlclient.run(sql.format(host=host_id, since=since), fmt="PrettyCompact", url=SQL_URL))
            sys.stdout.flush()
        print()
        _stop(collector, "collector")
        _stop(server, "server")
    _say("lab removed; the data stays: try  .venv/bin/hdrlog sql \"SELECT count() FROM hdrlog.packets\"")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
