"""Nobody let in: mTLS identities on the ingest stream, credentials on the SQL endpoint.

A real server (in a thread, over loopback) with certificates from `hdrlog pki`: a collector's
certificate name is the only host it may write rows for; no certificate, an expired one, one
from another CA, and plaintext are refused at the handshake. The SQL endpoint asks for a user
and password the ClickHouse ways and compares them in constant time.
"""

from __future__ import annotations

import subprocess
import threading
import time
import urllib.parse
import urllib.request

import grpc
import pytest

from hdrlog import pki
from hdrlog.config import ConfigError
from hdrlog.proto import ingest_pb2, ingest_pb2_grpc
from hdrlog.server import ServerConfig
from tests.support import HDRLOG, ServerThread, basic_auth, batch, config, http_response

OK, REJECTED = ingest_pb2.Ack.OK, ingest_pb2.Ack.REJECTED
USER, PASSWORD = "analyst", "s3cret: with spaces & ünïcode"


def tls_config(store, certs, **kw) -> ServerConfig:
    """The test server's config (tests.support.config) with mTLS from ``certs`` and SQL credentials."""
    tls = dict(insecure=False, tls_cert=str(certs / "central.crt"), tls_key=str(certs / "central.key"),
               tls_ca=str(certs / "ca.crt"), sql_user=USER, sql_password=PASSWORD)
    return config(store, **{**tls, **kw})


@pytest.fixture(scope="module")
def server(certs, tmp_path_factory):
    srv = ServerThread(tls_config(tmp_path_factory.mktemp("store") / "store", certs)).start()
    try:
        yield srv
    finally:
        srv.stop()


def channel(srv, certs, name: str | None, ca_dir=None) -> grpc.Channel:
    ca_dir = ca_dir or certs
    creds = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.crt").read_bytes(),
        private_key=(ca_dir / f"{name}.key").read_bytes() if name else None,
        certificate_chain=(ca_dir / f"{name}.crt").read_bytes() if name else None)
    return grpc.secure_channel(srv.target, creds)


def send(ch: grpc.Channel, batches, timeout: float = 20) -> list[ingest_pb2.Ack]:
    with ch:
        return list(ingest_pb2_grpc.IngestStub(ch).Stream(iter(batches), timeout=timeout))


def rows_by_host(srv) -> dict[str, int]:
    return dict(srv.query("SELECT host, count() FROM hdrlog.packets GROUP BY host"))


def test_a_collector_writes_rows_for_its_own_host_only(server, certs):
    acks = send(channel(server, certs, "host-a"), [
        batch(1, 7, host="host-a", collector_id="host-a/1"),
        batch(2, 5, host="host-b", collector_id="host-a/1"),           # another host's rows
        batch(3, 5, host="host-a", collector_id="host-b/1"),           # another collector's watermarks
        batch(4, 3, host="host-a", collector_id="host-a/1"),
    ])
    by_seq = {a.seq: a for a in acks}
    assert by_seq[1].status == OK and by_seq[4].status == OK
    assert by_seq[2].status == REJECTED
    assert "host 'host-b' does not match the client certificate's name 'host-a'" in by_seq[2].error
    assert by_seq[3].status == REJECTED and "collector_id 'host-b/1' is not under" in by_seq[3].error
    # host B's own certificate still works, and nothing A sent landed under B
    assert [a.status for a in send(channel(server, certs, "host-b"),
                                   [batch(1, 2, host="host-b", collector_id="host-b/1")])] == [OK]
    assert rows_by_host(server) == {"host-a": 10, "host-b": 2}
    assert server.server.metrics.value("hdrlog_server_batches_rejected_total", reason="identity") == 2


@pytest.mark.parametrize("who", ["no certificate", "expired", "other CA", "plaintext"])
def test_the_handshake_refuses(server, certs, who):
    if who == "plaintext":
        ch = grpc.insecure_channel(server.target)
    elif who == "other CA":
        ch = channel(server, certs, "host-a", ca_dir=certs / "other")
    else:
        ch = channel(server, certs, None if who == "no certificate" else "expired")
    with pytest.raises(grpc.RpcError) as err:
        send(ch, [batch(1, 3, host="host-a", collector_id="host-a/x")], timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    assert "host-a/x" not in str(server.query("SELECT groupUniqArray(collector_id) FROM hdrlog.packets"))


# -- the SQL endpoint ----------------------------------------------------------

def http(srv, query: str, *, headers=None, params=None, auth=None) -> tuple[int, str, dict]:
    qs = {"query": query, **(params or {})}
    req = urllib.request.Request(srv.sql_url + "/?" + urllib.parse.urlencode(qs), headers=dict(headers or {}))
    if auth is not None:
        req.add_header("Authorization", basic_auth(*auth))
    status, got_headers, body = http_response(req, timeout=20)
    return status, body.decode(), got_headers


def test_sql_asks_for_credentials_the_clickhouse_ways(server):
    status, body, headers = http(server, "SELECT 1")
    assert status == 401 and "REQUIRED_PASSWORD" in body and headers["X-ClickHouse-Exception-Code"] == "194"
    assert headers["WWW-Authenticate"].startswith("Basic")
    for wrong in ((USER, "nope"), ("root", PASSWORD), ("", "")):
        status, body, headers = http(server, "SELECT 1", auth=wrong)
        assert status == 403 and "AUTHENTICATION_FAILED" in body and headers["X-ClickHouse-Exception-Code"] == "516"
    assert http(server, "SELECT 1", auth=(USER, PASSWORD))[:2] == (200, "1\n")
    assert http(server, "SELECT 2", headers={"X-ClickHouse-User": USER,
                                             "X-ClickHouse-Key": PASSWORD.encode().decode("latin-1")})[:2] == (200, "2\n")
    assert http(server, "SELECT 3", params={"user": USER, "password": PASSWORD})[:2] == (200, "3\n")
    assert http(server, "SELECT 4", params={"user": USER, "password": "x"})[0] == 403
    # still read-only behind the login
    status, body, _ = http(server, "DROP TABLE hdrlog.packets", auth=(USER, PASSWORD))
    assert status == 403 and "READONLY" in body
    with urllib.request.urlopen(server.sql_url + "/ping", timeout=10) as r:
        assert r.read() == b"Ok.\n"


def test_hdrlog_sql_with_user_and_password_in_the_url(server):
    url = urllib.parse.urlsplit(server.sql_url)
    good = f"http://{USER}:{urllib.parse.quote(PASSWORD, safe='')}@{url.netloc}"
    out = subprocess.run([*HDRLOG, "sql", "--url", good, "SELECT 40 + 2"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "42", out.stderr
    bad = subprocess.run([*HDRLOG, "sql", "--url", f"http://{USER}:wrong@{url.netloc}", "SELECT 1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "authentication failed" in bad.stderr and "Traceback" not in bad.stderr
    assert "wrong" not in bad.stderr  # the password is not echoed
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_config_rules_for_tls_and_sql_credentials(tmp_path, certs):
    store = f"chdb://{tmp_path}/s"
    tls = dict(tls_cert=str(certs / "central.crt"), tls_key=str(certs / "central.key"), tls_ca=str(certs / "ca.crt"))
    cases = [
        (dict(), "insecure"),                                               # neither TLS nor --insecure
        (dict(**tls), "sql_user"),                                          # TLS but an open SQL endpoint
        (dict(**tls, sql_user="u"), "sql_password_file"),                   # user without password
        (dict(**tls, sql_password="p"), "sql_user"),                        # password without user
        (dict(**tls, sql_user="u", sql_password="p", sql_password_file=str(tmp_path / "pw")), "sql_password_file"),
        (dict(**tls, sql_user="u", sql_password_file=str(tmp_path / "missing")), "sql_password_file"),
        (dict(**tls, sql_user="bad user", sql_password="p"), "sql_user"),
    ]
    (tmp_path / "pw").write_text("from-file\n")
    for kw, key in cases:
        with pytest.raises(ConfigError) as err:
            ServerConfig(clickhouse=store, **kw).validate()
        assert err.value.key == key, (kw, err.value)
    ok = ServerConfig(clickhouse=store, **tls, sql_user="u", sql_password_file=str(tmp_path / "pw"))
    ok.validate()
    assert ok.sql_credentials() == ("u", "from-file")
    ServerConfig(clickhouse=store, **tls, sql_listen="").validate()   # no SQL endpoint, no credentials needed
    ServerConfig(clickhouse=store, insecure=True).validate()            # a lab: open
    # the password is never a flag
    help_text = subprocess.run([*HDRLOG, "server", "run", "--help"], capture_output=True, text=True).stdout
    assert "--sql-password-file" in help_text and "--sql-password " not in help_text
    assert "--sql-password=" not in help_text


def test_one_certificate_cannot_take_every_stream_slot(server, certs):
    """With mTLS each host may hold max_streams_per_host streams; the others are refused while
    other hosts are still served."""
    srv = server
    ingest = srv.server.ingest
    assert ingest.max_streams_per_host == 16  # the default, from the config
    ingest.max_streams_per_host = 3  # (one chDB store per process: this module's server, limit lowered)
    held: list = []
    quiet = threading.Event()

    def idle():  # a request stream that sends nothing and stays open until the test ends
        quiet.wait(30)
        return
        yield

    try:
        def open_stream(name: str):
            ch = channel(srv, certs, name)
            held.append(ch)
            return ingest_pb2_grpc.IngestStub(ch).Stream(idle(), timeout=30)

        calls = [open_stream("host-a") for _ in range(3)]  # one channel each
        deadline = time.monotonic() + 20
        while ingest.open_by_identity.get("host-a", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ingest.open_by_identity.get("host-a") == 3
        with pytest.raises(grpc.RpcError) as refused:
            list(open_stream("host-a"))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many streams open for 'host-a' (3)" in refused.value.details()
        # Another host is unaffected, and nothing host-a held was disturbed.
        assert [a.status for a in send(channel(srv, certs, "host-b"),
                                       [batch(1, 2, host="host-b", collector_id="host-b/1")])] == [OK]
        assert ingest.open_by_identity.get("host-a") == 3
        assert srv.server.metrics.value("hdrlog_server_batches_rejected_total", reason="too_many_streams_per_host") == 1
        for c in calls:
            c.cancel()
    finally:
        quiet.set()
        for ch in held:
            ch.close()
        ingest.max_streams_per_host = 16


def test_the_collector_takes_its_host_id_from_its_certificate(tmp_path, certs):
    """Under mTLS the identity is the certificate: no --host-id means its name; another name is refused."""
    from hdrlog.collector.config import CollectorConfig

    tls = dict(tls_cert=str(certs / "host-a.crt"), tls_key=str(certs / "host-a.key"), tls_ca=str(certs / "ca.crt"))
    c = CollectorConfig(server="127.0.0.1:1", iface=["lo"], spool="", **tls)
    c.validate()
    assert c.host_id == "host-a"   # not this machine's hostname
    CollectorConfig(server="127.0.0.1:1", iface=["lo"], spool="", host_id="host-a", **tls).validate()
    with pytest.raises(ConfigError) as err:
        CollectorConfig(server="127.0.0.1:1", iface=["lo"], spool="", host_id="web-01", **tls).validate()
    assert err.value.key == "host_id" and "'host-a'" in str(err.value)
    # the command line: one line, exit 2, before anything starts
    bad = subprocess.run([*HDRLOG, "collector", "run", "--server", "127.0.0.1:1", "--iface", "lo", "--spool", "",
                          "--host-id", "web-01", "--tls-cert", tls["tls_cert"], "--tls-key", tls["tls_key"],
                          "--tls-ca", tls["tls_ca"]], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "host_id" in bad.stderr, bad.stderr
    (tmp_path / "not-a-cert.crt").write_text("hello\n")
    with pytest.raises(ConfigError) as err:
        CollectorConfig(server="127.0.0.1:1", iface=["lo"], spool="", **{**tls, "tls_cert": str(tmp_path / "not-a-cert.crt")}).validate()
    assert err.value.key == "tls_cert"


def test_a_batch_refused_for_identity_is_kept_and_the_sender_stops(server, certs):
    """Resending cannot fix an identity refusal, and dropping it would lose data silently: keep it, stop, say so."""
    import asyncio

    from hdrlog.collector.sender import Sender
    from hdrlog.collector.spool import Outbox

    async def go():
        creds = grpc.ssl_channel_credentials(
            root_certificates=(certs / "ca.crt").read_bytes(), private_key=(certs / "host-a.key").read_bytes(),
            certificate_chain=(certs / "host-a.crt").read_bytes())
        box = Outbox(max_rows=1000)
        box.put(batch(1, 4, host="host-a", collector_id="host-a/refused"), 4)
        box.put(batch(2, 4, host="web-01", collector_id="web-01/refused"), 4)  # not host-a's to write
        sender = Sender(server.target, box, credentials=creds)
        sender.start()
        try:
            for _ in range(200):
                if sender.refused:
                    break
                await asyncio.sleep(0.05)
        finally:
            await sender.stop()
        return sender, box

    sender, box = asyncio.run(go())
    assert "identity" in sender.refused and "web-01" in sender.refused
    # seq 2 kept, never counted as rejected (seq 1's OK may come after the refusal: it is resent, harmlessly)
    assert 2 in box and sender.counters.rows_rejected == 0 and sender.counters.batches_rejected == 0


def test_hdrlog_sql_takes_the_password_from_the_environment_or_a_file(server, tmp_path):
    import os

    url = server.sql_url
    env = {**os.environ, "HDRLOG_SQL_PASSWORD": PASSWORD}
    out = subprocess.run([*HDRLOG, "sql", "--url", url, "--user", USER, "SELECT 6 * 7"], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "42", out.stderr
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    env = {k: v for k, v in os.environ.items() if k != "HDRLOG_SQL_PASSWORD"}
    out = subprocess.run([*HDRLOG, "sql", "--url", url, "--user", USER, "--password-file", str(tmp_path / "pw"),
                          "SELECT 6 * 7"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "42", out.stderr
    # the engine's own error, once, without the client library's wrapper around it
    out = subprocess.run([*HDRLOG, "sql", "--url", url, "--user", USER, "--password-file", str(tmp_path / "pw"),
                          "SELEC 1"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1 and out.stderr.startswith("hdrlog: Code: 62. "), out.stderr
    assert "HTTPDriver" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_tls_mistakes_are_one_sentence_at_start(tmp_path, certs):
    """A key that is not the certificate's, an expired certificate, the wrong CA: refused by the config, named."""
    from hdrlog.collector.config import CollectorConfig

    other = certs / "other"
    cases = [
        (dict(tls_key=str(certs / "host-b.key")), "tls_key", "is not the private key of the certificate"),
        (dict(tls_cert=str(certs / "expired.crt"), tls_key=str(certs / "expired.key")), "tls_cert", "expired on"),
        (dict(tls_ca=str(other / "ca.crt")), "tls_ca", "did not sign the certificate"),
    ]
    base = dict(tls_cert=str(certs / "host-a.crt"), tls_key=str(certs / "host-a.key"), tls_ca=str(certs / "ca.crt"))
    for change, key, needle in cases:
        with pytest.raises(ConfigError) as err:
            CollectorConfig(server="127.0.0.1:1", iface=["lo"], spool="", **{**base, **change}).validate()
        assert err.value.key == key and needle in str(err.value), (change, err.value)
        with pytest.raises(ConfigError) as err:
            tls_config(tmp_path / "s", certs, **{k.replace("host-a", "central"): v for k, v in change.items()},
                       **({} if "tls_cert" in change else {"tls_cert": str(certs / "central.crt")})).validate()
        assert err.value.key == key, (change, err.value)


def test_the_collector_names_a_server_name_its_certificate_does_not_cover(server, certs, tmp_path):
    from hdrlog.collector import tls
    from hdrlog.collector.config import CollectorConfig

    base = dict(iface=["lo"], spool="", tls_cert=str(certs / "host-a.crt"), tls_key=str(certs / "host-a.key"),
                tls_ca=str(certs / "ca.crt"))
    port = server.server.grpc_port
    good = CollectorConfig(server=f"127.0.0.1:{port}", **base)
    good.validate()
    assert tls.check_server(good) == ""
    # a server whose certificate is for another address than the one the collector dials
    import shutil

    for f in ("ca.key", "ca.crt"):
        shutil.copy(certs / f, tmp_path / f)
    pki.issue(tmp_path, "elsewhere", server=True, sans=["198.18.0.1", "central.example"])
    # (a plain TLS listener with that certificate: the check is one handshake, as gRPC makes it)
    import socket
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs / "ca.crt"))
    ctx.load_cert_chain(tmp_path / "elsewhere.crt", tmp_path / "elsewhere.key")
    listener = socket.create_server(("127.0.0.1", 0))

    def accept():
        for _ in range(2):
            conn, _ = listener.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        wrong = CollectorConfig(server=f"127.0.0.1:{listener.getsockname()[1]}", **base)
        wrong.validate()
        problem = tls.check_server(wrong)
    finally:
        listener.close()
        t.join(5)
    assert "not '127.0.0.1'" in problem and "198.18.0.1" in problem and "central.example" in problem, problem
    other_ca = CollectorConfig(server=f"127.0.0.1:{port}", iface=["lo"], spool="",
                               tls_cert=str(certs / "other" / "host-a.crt"), tls_key=str(certs / "other" / "host-a.key"),
                               tls_ca=str(certs / "other" / "ca.crt"))
    other_ca.validate()
    assert "does not verify" in tls.check_server(other_ca)
