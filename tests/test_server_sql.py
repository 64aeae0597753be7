"""The read-only SQL endpoint: curl-style GET/POST, clickhouse-connect's HTTP client, refusals, short errors."""

from __future__ import annotations

import http.client
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import clickhouse_connect
import pytest

from tests.support import ServerThread, batch, config, http_response


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerThread(config(tmp_path_factory.mktemp("sql") / "store")).start()
    try:
        srv.send([batch(1, 100), batch(2, 100)])
        yield srv
    finally:
        srv.stop()


def get(srv, query: str, **params) -> tuple[int, dict, bytes]:
    return http_response(f"{srv.sql_url}/?{urllib.parse.urlencode({'query': query, **params})}")


def post(srv, body: str, path: str = "/") -> tuple[int, dict, bytes]:
    return http_response(urllib.request.Request(srv.sql_url + path, data=body.encode(), method="POST"))


def test_get_post_ping_and_formats(server):
    assert get(server, "SELECT count() FROM hdrlog.packets")[2] == b"200\n"
    assert post(server, "SELECT count() FROM hdrlog.packets WHERE batch_seq = 2")[2] == b"100\n"
    status, headers, body = get(server, "SELECT batch_seq, count() AS n FROM hdrlog.packets GROUP BY batch_seq "
                                        "ORDER BY batch_seq FORMAT JSONEachRow")
    assert status == 200 and headers["X-ClickHouse-Format"] == "JSONEachRow"
    assert body == b'{"batch_seq":1,"n":100}\n{"batch_seq":2,"n":100}\n'
    assert get(server, "SELECT count() AS n FROM packets", database="hdrlog", default_format="CSVWithNames")[2] == \
        b'"n"\n200\n'
    # ?query= prefix plus body, and a trailing semicolon
    qs = urllib.parse.urlencode({"query": "SELECT count()"})
    assert post(server, "FROM hdrlog.packets;", path=f"/?{qs}")[2] == b"200\n"
    with urllib.request.urlopen(server.sql_url + "/ping", timeout=10) as r:
        assert r.read() == b"Ok.\n"
    with urllib.request.urlopen(server.sql_url + "/", timeout=10) as r:
        assert r.read() == b"Ok.\n"
    # settings as URL parameters; unknown ones are ignored
    assert get(server, "SELECT 1", max_result_rows="10", no_such_setting_xyz="1")[2] == b"1\n"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl(server):
    out = subprocess.run(["curl", "-sS", f"{server.sql_url}/?query=SELECT+count()+FROM+hdrlog.packets"],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout == "200\n"
    out = subprocess.run(["curl", "-sS", "--data-binary", "SELECT uniqExact(host) FROM hdrlog.packets",
                          server.sql_url + "/"], capture_output=True, text=True, timeout=30)
    assert out.stdout == "1\n"


def test_clickhouse_connect_http_client(server):
    client = clickhouse_connect.get_client(host="127.0.0.1", port=server.server.sql_port, interface="http",
                                           database="hdrlog")
    try:
        rows = client.query("SELECT count(), min(toUnixTimestamp64Nano(ts)), any(direction) FROM packets "
                            "WHERE batch_seq = {s:UInt64}", parameters={"s": 1}).result_rows
        assert rows[0][0] == 100 and rows[0][2] in ("ingress", "egress")
        table = client.query_arrow("SELECT ts, src_ip, dst_ip, direction, dns_qname FROM packets ORDER BY ts LIMIT 5")
        assert table.num_rows == 5 and table.column_names == ["ts", "src_ip", "dst_ip", "direction", "dns_qname"]
        assert client.command("SELECT count() FROM packets") == 200
        with pytest.raises(Exception) as err:
            client.command("DROP TABLE packets")
        assert "164" in str(err.value) and "read-only" in str(err.value)
    finally:
        client.close()


@pytest.mark.parametrize("sql, code", [
    ("DROP TABLE hdrlog.packets", 164),
    ("INSERT INTO hdrlog.packets (ifname) VALUES ('x')", 164),
    ("ALTER TABLE hdrlog.packets DELETE WHERE 1", 164),
    ("SELECT 1; DROP TABLE hdrlog.packets", 62),
    ("SELECT 1; SELECT 2", 62),
    ("SELECT * FROM file('/etc/passwd', 'LineAsString')", 164),
    ("SELECT file('/etc/passwd')", 164),
    ("SELECT * FROM url('http://127.0.0.1:1/', 'CSV')", 164),
    ("SELECT * FROM remote('127.0.0.1', system.one)", 164),
    ("SELECT * FROM s3('http://x/y', 'CSV')", 164),
    ("SELECT 1 INTO OUTFILE '/tmp/x'", 164),
    ("SYSTEM FLUSH LOGS", 164),
    ("OPTIMIZE TABLE hdrlog.packets FINAL", 164),
    ("SET max_threads = 1", 164),
    ("CREATE TABLE t (a UInt8) ENGINE = Memory", 164),
    ("SELECT 1 SETTINGS readonly = 0", 164),
])
def test_writes_and_escapes_are_refused(server, sql, code):
    status, headers, body = post(server, sql)
    assert status in (400, 403), (status, body)
    assert headers["X-ClickHouse-Exception-Code"] == str(code)
    text = body.decode()
    assert text.startswith(f"Code: {code}. DB::Exception: ")
    assert text.endswith("(READONLY)\n" if code == 164 else "(SYNTAX_ERROR)\n")
    assert "Traceback" not in text and len(text) < 400
    assert get(server, "SELECT count() FROM hdrlog.packets")[2] == b"200\n"  # nothing changed


def test_strings_and_comments_do_not_fool_the_check(server):
    assert post(server, "SELECT 'DROP TABLE x; file(1)' AS s -- ; DROP\n")[2] == b"DROP TABLE x; file(1)\n"
    assert post(server, "/* DROP; */ SELECT 1 /* ; */")[2] == b"1\n"
    assert post(server, "SELECT 'a' AS format FORMAT JSONEachRow")[2] == b'{"format":"a"}\n'
    assert post(server, "SELECT URLHierarchy('http://a/b')[1]")[2] == b"http://a/\n"
    for bad in ("SELECT 1 ; ; SELECT 2", "select * from FILE('x')", "WITH 1 AS a SELECT * FROM s3Cluster('c', 'u')"):
        assert post(server, bad)[0] in (400, 403)


def test_bad_sql_gets_a_short_clear_error(server):
    status, headers, body = get(server, "SELEC 1")
    assert status == 400 and headers["X-ClickHouse-Exception-Code"] == "62"
    assert body.decode().startswith("Code: 62. DB::Exception: Syntax error") and len(body) < 300
    status, headers, body = get(server, "SELECT FROM WHERE")
    assert status == 400 and headers["X-ClickHouse-Exception-Code"] == "62"
    assert "Expected one of" not in body.decode() and len(body) < 600
    status, headers, body = get(server, "SELECT no_such_column FROM hdrlog.packets")
    assert status == 400 and headers["X-ClickHouse-Exception-Code"] == "47"
    assert b"no_such_column" in body and b"Traceback" not in body
    status, headers, body = get(server, "SELECT 1 FROM hdrlog.no_such_table")
    assert status == 404 and headers["X-ClickHouse-Exception-Code"] == "60"


def test_keep_alive_and_malformed_http(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server.sql_port, timeout=10)
    for _ in range(3):
        conn.request("GET", "/?query=SELECT+1")
        resp = conn.getresponse()
        assert resp.read() == b"1\n"
    conn.close()
    import socket
    with socket.create_connection(("127.0.0.1", server.server.sql_port), timeout=10) as s:
        s.sendall(b"NONSENSE\r\n\r\n")
        answer = s.recv(100)  # aiohttp answers an unparsable request line in HTTP/1.0 (it names no version)
        assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.0 400")), answer


def test_sql_does_not_stall_ingest(server):
    """A long query on the endpoint runs on its own chDB handle while batches keep being acked."""
    done = threading.Event()

    def slow():
        get(server, "SELECT sum(number) FROM numbers(2000000000)")
        done.set()

    t = threading.Thread(target=slow)
    t.start()
    try:
        time.sleep(0.2)
        start = time.monotonic()
        acks = server.send([batch(1000 + i, 50, collector_id="during-sql") for i in range(5)])
        elapsed = time.monotonic() - start
        assert all(a.status == 0 for a in acks)
        assert not done.is_set() or elapsed < 1.0, "ingest waited for the SQL query"
    finally:
        t.join(60)
