"""The server names the peer of every failed TLS handshake, in its own log format, and bounded.

A real ``hdrlog server run`` with mTLS; clients from distinct loopback addresses (127.0.0.2, …) so
each peer is known exactly: one with a certificate from another CA, one speaking plaintext gRPC
bytes, one that connects and says nothing past the handshake deadline, and one that retries in a
loop (its failures are counted, not logged one by one). gRPC C-core's raw lines never reach the log.
"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import time

import pytest

from hdrlog.server.corelog import Translator
from tests.support import ServerProcess

RAW_CORE_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ ", re.M)


@pytest.fixture
def tls_server(tmp_path, certs):
    server = ServerProcess(f"chdb://{tmp_path}/store", tmp_path, "--handshake-timeout", "1", pki=certs)
    server.start()
    yield server
    server.stop()


def _connect_from(source: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def _tls_client(source: str, port: int, cert_dir) -> int:
    """A TLS handshake with a client certificate the server's CA did not sign; the client's port."""
    ctx = ssl.create_default_context(cafile=str(cert_dir.parent / "ca.crt"))
    ctx.load_cert_chain(str(cert_dir / "host-a.crt"), str(cert_dir / "host-a.key"))
    ctx.set_alpn_protocols(["h2"])
    sock = _connect_from(source, port)
    local_port = sock.getsockname()[1]
    try:
        with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            tls.recv(1)  # TLS 1.3: the server's verdict on our certificate arrives after the handshake
    except (ssl.SSLError, OSError):
        pass
    return local_port


def _plaintext_client(source: str, port: int) -> int:
    sock = _connect_from(source, port)
    local_port = sock.getsockname()[1]
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # what a collector started with --insecure sends
    try:
        sock.recv(100)
    except OSError:
        pass
    sock.close()
    return local_port


def _wait_for(server: ServerProcess, pattern: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, server.log())
        if found:
            return found.group(0)
        time.sleep(0.2)
    raise AssertionError(f"no log line matching {pattern!r}:\n{server.log()[-3000:]}")


def test_failed_handshakes_are_logged_with_the_peer(tls_server, certs):
    port = tls_server.grpc_port
    other_ca_port = _tls_client("127.0.0.2", port, certs / "other")
    plain_port = _plaintext_client("127.0.0.3", port)
    silent = _connect_from("127.0.0.4", port)
    silent_port = silent.getsockname()[1]
    try:
        line = _wait_for(tls_server, rf"TLS handshake from 127\.0\.0\.2:{other_ca_port} failed: .*")
        assert "not signed by our CA" in line
        line = _wait_for(tls_server, rf"TLS handshake from 127\.0\.0\.3:{plain_port} failed: .*")
        assert "does not speak TLS" in line
        line = _wait_for(tls_server, rf"TLS handshake from 127\.0\.0\.4:{silent_port} failed: .*")
        assert "in time" in line
    finally:
        silent.close()
    # the same process still serves: a collector's certificate completes the handshake
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    ctx.load_cert_chain(str(certs / "host-a.crt"), str(certs / "host-a.key"))
    ctx.set_alpn_protocols(["h2"])
    with ctx.wrap_socket(_connect_from("127.0.0.5", port), server_hostname="127.0.0.1") as tls:
        assert tls.selected_alpn_protocol() == "h2"
    log = tls_server.log()
    assert not RAW_CORE_LINE.search(log), "a raw gRPC C-core line reached the log"
    assert "127.0.0.5" not in log  # a good handshake is not a finding


def test_a_client_failing_in_a_loop_is_one_line_and_a_count(tls_server):
    ports = [_plaintext_client("127.0.0.6", tls_server.grpc_port) for _ in range(40)]
    _wait_for(tls_server, rf"TLS handshake from 127\.0\.0\.6:{ports[0]} failed")
    time.sleep(1.5)
    lines = [line for line in tls_server.log().splitlines() if "TLS handshake from 127.0.0.6" in line]
    assert len(lines) == 1, lines


def test_the_translator_child_ends_with_the_server(tmp_path, certs):
    server = ServerProcess(f"chdb://{tmp_path}/store", tmp_path, pki=certs)
    server.start()
    try:
        children = subprocess.run(["pgrep", "-f", "-P", str(server.proc.pid), "hdrlog.server.corelog"],
                                  capture_output=True, text=True).stdout.split()
        assert len(children) == 1, "the server runs one translator child"
    finally:
        server.stop()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and subprocess.run(["kill", "-0", children[0]],
                                                         capture_output=True).returncode == 0:
        time.sleep(0.1)
    assert subprocess.run(["kill", "-0", children[0]], capture_output=True).returncode != 0
    assert "stopped" in server.log()  # the last lines went through the pipe and reached the log


def test_translator_budget_counts_what_it_holds_back():
    """The overall budget, on the core's real record shape (grpc 1.85's handshaker trace)."""
    clock = [0.0]
    said: list[str] = []
    t = Translator(emit=lambda level, msg: said.append(msg), now=lambda: clock[0])
    for i in range(25):
        t.feed(f"I1201 14:23:19.506338   21525 handshaker.cc:155] CallNextHandshakerLocked: error=UNKNOWN: "
               f"Ssl handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:"
               f"OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification context")
        t.feed("=== Source Location Trace: ===")
        t.feed("src/core/util/status_helper.cc:68")
        t.feed(f" shutdown=false index=2, args={{endpoint=0x7f, args={{grpc.internal.endpoint_peer_address="
               f"ipv4:198.18.0.{i}:4000{i % 10}, grpc.x=1}}}}")
    t.flush()
    assert len(said) == 10 and all("failed: it does not speak TLS" in s for s in said)
    clock[0] = 11.0
    t.flush()
    assert said[-1].startswith("server: 15 more failed TLS handshakes")


def test_a_stalled_translator_never_stalls_the_server(tls_server, certs):
    """The child stopped (SIGSTOP) while broken handshakes write far more than the pipe holds: the
    server's gRPC threads must not block in write(); handshakes and SQL still answer."""
    import os
    import signal

    child = subprocess.run(["pgrep", "-f", "-P", str(tls_server.proc.pid), "hdrlog.server.corelog"],
                           capture_output=True, text=True).stdout.split()
    assert len(child) == 1
    os.kill(int(child[0]), signal.SIGSTOP)
    try:
        for i in range(1500):  # ~10 trace lines, ~3 KB each: several MiB against a 1 MiB pipe
            _plaintext_client(f"127.0.1.{i % 250 + 1}", tls_server.grpc_port)
        ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        ctx.load_cert_chain(str(certs / "host-a.crt"), str(certs / "host-a.key"))
        ctx.set_alpn_protocols(["h2"])
        with ctx.wrap_socket(_connect_from("127.0.0.9", tls_server.grpc_port), server_hostname="127.0.0.1") as tls:
            assert tls.selected_alpn_protocol() == "h2"
        assert tls_server.http("/ping") == "Ok.\n"
    finally:
        os.kill(int(child[0]), signal.SIGCONT)
    _wait_for(tls_server, r"TLS handshake from 127\.0\.1\.\d+:\d+ failed")
