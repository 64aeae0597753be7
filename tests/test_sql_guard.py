"""The read-only SQL endpoint cannot be walked out of (issue 11): every known vector against a real
`hdrlog server run` on a chDB store in tmp_path, over HTTP, plus a grammar fuzz of quoting around
forbidden names. A secret marker file stands for /etc/shadow, a loopback listener for the services
an SSRF would reach; the tests assert the marker never comes back, no file is written, nothing
connects to the listener and no second statement runs."""

from __future__ import annotations

import socket
import threading
import time
import urllib.parse
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import ServerProcess, http_response

MARKER = "hdrlog-secret-marker-7f3a"


class Listener:
    """A loopback TCP port that counts connections (an SSRF target)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("sqlguard")
    secret = d / "secret.txt"
    secret.write_text(MARKER + "\n")
    (d / "out").mkdir()
    listener = Listener()
    srv = ServerProcess(f"chdb://{d / 'store'}", d)
    srv.start()
    try:
        yield srv, d, listener
    finally:
        srv.stop()
        listener.close()


def ask(srv, query: str, headers: dict | None = None, **params) -> tuple[int, str]:
    qs = urllib.parse.urlencode(params)
    req = urllib.request.Request(f"{srv.sql_url}/?{qs}", data=query.encode(), headers=headers or {})
    status, _, body = http_response(req)
    return status, body.decode(errors="replace")


def assert_refused(srv, d, listener, query, headers=None, codes=(164,), **params):
    before = listener.connections
    status, body = ask(srv, query, headers, **params)
    assert MARKER not in body, body
    assert status in (400, 403), (query, status, body)
    assert any(body.startswith(f"Code: {c}. DB::Exception: ") for c in codes), (query, body)
    assert "\n" not in body.rstrip("\n") and len(body) < 1200
    assert not any((d / "out").iterdir()), "a file was written"
    assert listener.connections == before, "the endpoint connected out"
    return body


def vectors(d, port):
    secret = d / "secret.txt"
    out = d / "out"
    loop = f"127.0.0.1:{port}"
    return [
        # quoted function names
        f"SELECT * FROM `file`('{secret}', 'LineAsString')",
        f'SELECT * FROM "file"(\'{secret}\', \'LineAsString\')',
        f"SELECT * FROM `FILE`('{secret}', 'LineAsString')",
        f"SELECT `file`('{secret}')",
        f"SELECT * FROM `url`('http://{loop}/', 'LineAsString')",
        f"SELECT * FROM `s3`('http://{loop}/b/k', 'LineAsString')",
        f"SELECT * FROM `remote`('{loop}', system.one)",
        f"SELECT * FROM `mysql`('{loop}', 'db', 't', 'u', 'p')",
        f"SELECT * FROM `postgresql`('{loop}', 'db', 't', 'u', 'p')",
        f"SELECT * FROM `redis`('{loop}', 'k', 'k String')",
        f"SELECT * FROM `s3Cluster`('default', 'http://{loop}/b/k', 'LineAsString')",
        f"SELECT * FROM `urlCluster`('default', 'http://{loop}/', 'LineAsString')",
        # a file as a table (clickhouse-local's Filesystem database under `default`)
        f"SELECT * FROM default.`{secret}`",
        f"SELECT * FROM '{secret}'",
        f"DESCRIBE TABLE file('{secret}')",
        f"DESCRIBE TABLE default.`{secret}`",
        f"EXPLAIN ESTIMATE SELECT * FROM file('{secret}', 'LineAsString')",
        f"EXPLAIN QUERY TREE SELECT * FROM file('{secret}', 'LineAsString')",
        f"SELECT 1 WHERE 1 IN (SELECT * FROM `file`('{secret}', 'LineAsString'))",
        f"WITH x AS (SELECT * FROM `file`('{secret}', 'LineAsString')) SELECT * FROM x",
        f"SELECT * FROM view(SELECT * FROM file('{secret}', 'LineAsString'))",
        "SELECT * FROM merge('system', '^one$')",
        "SELECT * FROM input('a String')",
        # dollar-quote tricks: the engine reads $x$ as an identifier
        f"SELECT 'x' AS $x$ INTO OUTFILE '{out}/o1.txt' TRUNCATE",
        f"SELECT 'x' AS $x$ INTO OUTFILE '{out}/o2.txt' TRUNCATE FORMAT CSV",
        f"EXPLAIN SELECT 1 INTO OUTFILE '{out}/o3.txt'",
        f"SELECT 1 AS $x$; INSERT INTO FUNCTION file('{out}/o4.csv', 'CSV') SELECT 1",
        f"SELECT 1 AS $x$; INSERT INTO FUNCTION url('http://{loop}/', 'CSV') SELECT 1",
        "SELECT 1 AS $x$; KILL QUERY WHERE 1",
        "SELECT 1 AS $x$; CREATE TEMPORARY TABLE tt (a UInt8)",
        "SELECT 1 AS $x$; DROP TABLE hdrlog.packets",
        # writes that readonly=2 let through
        f"INSERT INTO FUNCTION file('{out}/o5.csv', 'CSV') SELECT 1",
        "KILL QUERY WHERE 1",
        "CREATE TEMPORARY TABLE tt (a UInt8)",
        "EXPLAIN PIPELINE INSERT INTO hdrlog.packets SELECT * FROM hdrlog.packets",
        # functions that reach outside the tables
        f"SELECT file('{secret}')",
        "SELECT dictGet('d', 'a', 1)",
        "SELECT joinGet('system.query_log', 'query', 1)",
        "SELECT getServerSetting('path')",
        "SELECT hasColumnInTable('system', 'query_log', 'query')",
        "SELECT addressToSymbol(toUInt64(1))",
        "SELECT logTrace('x')",
        # tables that leak
        "SELECT query FROM system.processes",
        "SELECT * FROM system.query_log",
        "SELECT * FROM system.zookeeper WHERE path = '/'",
        "SELECT * FROM system.server_settings",
        "SELECT * FROM system.users",
        "SELECT 1 WHERE 'x' IN system.processes",
        "SHOW PROCESSLIST",
        "SHOW GRANTS",
        "SHOW USERS",
        "SHOW CREATE TABLE system.query_log",
        # settings in the text
        "SELECT 1 SETTINGS readonly = 0",
        "SELECT 1 SETTINGS max_threads = 1",
    ]


def test_every_vector_is_refused(env):
    srv, d, listener = env
    for query in vectors(d, listener.port):
        assert_refused(srv, d, listener, query, codes=(164, 62, 60))
    assert srv.count() == 0  # nothing inserted, and the server still answers
    assert srv.sql("SELECT 1 AS a") == [{"a": 1}]


def test_format_injection_is_refused(env):
    srv, d, listener = env
    out = d / "out"
    evil = f"Null; INSERT INTO FUNCTION file('{out}/f1.csv', 'CSV') SELECT 1"
    assert_refused(srv, d, listener, "SELECT 1", headers={"X-ClickHouse-Format": evil}, codes=(73,))
    assert_refused(srv, d, listener, "SELECT 1", default_format=evil, codes=(73,))
    assert_refused(srv, d, listener, "SELECT 1", default_format="Null\nSELECT 2", codes=(73,))
    assert_refused(srv, d, listener, "SELECT 1", default_format="CapnProto", codes=(73,))
    assert_refused(srv, d, listener, "SELECT 1 FORMAT `Null; DROP TABLE hdrlog.packets`", codes=(73,))
    # one allowlisted name, any case, works
    assert ask(srv, "SELECT 1 AS a", default_format="jsoneachrow") == (200, '{"a":1}\n')
    assert ask(srv, "SELECT 1 AS a", headers={"X-ClickHouse-Format": "CSVWithNames"}) == (200, '"a"\n1\n')


def test_settings_parameters_allowlisted(env):
    srv, d, listener = env
    assert ask(srv, "SELECT number FROM numbers(10)", max_result_rows="3", result_overflow_mode="break",
               no_such_setting_xyz="1")[0] == 200
    assert ask(srv, "SELECT getSetting('max_threads')", max_threads="3") == (200, "3\n")
    assert ask(srv, "SELECT getSetting('readonly')") == (200, "1\n")
    for name, value in [("readonly", "0"), ("allow_ddl", "1"), ("allow_introspection_functions", "1"),
                        ("output_format_schema", f"{d}/out/schema.capnp")]:
        status, body = ask(srv, "SELECT getSetting('readonly')", **{name: value})
        assert body in ("1\n",) or body.startswith("Code: 164."), (name, body)
    assert not any((d / "out").iterdir())


def test_legitimate_queries_still_work(env):
    srv, d, listener = env
    ok = {
        "SELECT 1": "1\n",
        "select version() = version()": "1\n",
        "SELECT count() FROM hdrlog.packets": "0\n",
        "SELECT count() FROM packets": "0\n",
        "SELECT count() FROM `numbers`(5)": "5\n",
        "SELECT sum(number) FROM numbers_mt(10) WHERE number IN (SELECT number FROM numbers(5))": "10\n",
        "WITH t AS (SELECT number AS n FROM numbers(3)) SELECT max(n) FROM t": "2\n",
        "SELECT countIf(number > 1), quantile(0.5)(number), sumArray([number]), uniqExactState(number) IS NOT NULL "
        "FROM numbers(4)": "2\t1.5\t6\t1\n",
        "SELECT arrayMap(x -> x * 2, [1, 2]), 1::UInt8, CAST(2 AS String), toIntervalDay(1) = INTERVAL 1 DAY": "[2,4]\t1\t2\t1\n",
        "SELECT 'DROP TABLE x; file(1)' AS s -- ; DROP\n": "DROP TABLE x; file(1)\n",
        "/* DROP; */ SELECT URLHierarchy('http://a/b')[1] /* ; */": "http://a/\n",
        "SELECT 1 AS \"Packets per second\" FORMAT JSONEachRow": '{"Packets per second":1}\n',
        "SELECT name FROM system.tables WHERE database = 'hdrlog' AND name = 'packets'": "packets\n",
        "SELECT count() > 0 FROM system.settings": "1\n",
        "SELECT count() > 0 FROM system.functions WHERE name = 'file'": "1\n",
        "EXISTS TABLE hdrlog.packets": "1\n",
        "SELECT number FROM numbers(2) UNION ALL SELECT 5 ORDER BY 1": "0\n1\n5\n",
        "SELECT count() FROM hdrlog.packets p JOIN hdrlog.flows f ON p.host = f.host": "0\n",
        "SELECT row_number() OVER (ORDER BY number) FROM numbers(1)": "1\n",
    }
    for query, want in ok.items():
        assert ask(srv, query) == (200, want), query
    assert ask(srv, "SELECT {n:UInt64} + 1, {s:String}", param_n="41", param_s="a'b") == (200, "42\ta\\'b\n")
    for query in ("SHOW TABLES", "SHOW DATABASES", "DESCRIBE hdrlog.packets", "SHOW CREATE TABLE hdrlog.packets",
                  "EXPLAIN SELECT 1", "EXPLAIN AST SELECT 1", "EXPLAIN SYNTAX SELECT 1", "SHOW FUNCTIONS LIKE 'plus'",
                  "DESC (SELECT 1 AS a)", "SELECT version(), timezone()"):
        status, body = ask(srv, query)
        assert status == 200 and body, (query, body)
    assert "packets" in ask(srv, "SHOW TABLES")[1]
    # unqualified names resolve in hdrlog; other databases are not served
    assert ask(srv, "SELECT count() FROM packets", database="default") == (200, "0\n")
    assert ask(srv, "SELECT 1", database="system")[1].startswith("Code: 81.")


def test_errors_are_one_clear_line(env):
    srv, d, listener = env
    status, body = ask(srv, "SELEC 1")
    assert status == 400 and body.startswith("Code: 62. DB::Exception: Syntax error") and "formatQuery" not in body
    status, body = ask(srv, "SELECT 1; SELECT 2")
    assert status == 400 and "Multi-statements are not allowed" in body and body.endswith("(SYNTAX_ERROR)\n")
    status, body = ask(srv, "")
    assert status == 200  # ClickHouse answers an empty query with Ok.


# -- grammar fuzz -------------------------------------------------------------

FORBIDDEN_TF = ["file", "url", "s3", "remote", "mysql", "postgresql", "redis", "s3Cluster", "urlCluster",
                "input", "merge", "view", "executable", "hdfs", "azureBlobStorage", "sqlite", "mongodb", "odbc",
                "jdbc", "fileCluster", "cluster", "dictionary", "iceberg", "deltaLake", "python", "format",
                "mergeTreeIndex", "loop", "filesystem", "zeros"]
ALLOWED_TF = ["numbers", "numbers_mt"]


def quoted(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name, name.upper(), name.lower(), f"`{name}`", f'"{name}"', f"`{name.upper()}`"])


def spacing() -> st.SearchStrategy[str]:
    return st.sampled_from([" ", "  ", "\n", "\t", " /* ; */ ", " -- c\n", "\r\n", " /* $x$ */ ", "\u00a0", "\x0c"])


@st.composite
def statement(draw, secret: str, loop: str, outdir: str):
    """A statement with a forbidden table function, scalar call, clause or tail, dressed in quoting."""
    s = draw(spacing())
    kind = draw(st.sampled_from(["tf", "scalar", "outfile", "multi", "subquery", "cte", "in"]))
    tf = draw(quoted(draw(st.sampled_from(FORBIDDEN_TF))))
    args = draw(st.sampled_from([f"'{secret}', 'LineAsString'", f"'http://{loop}/', 'LineAsString'",
                                 f"'{loop}', system.one", f"'{secret}'"]))
    alias = draw(st.sampled_from(["", " AS $x$", " AS `$x$`", " AS \"a;b\"", " AS ünï"]))
    select = draw(st.sampled_from(["SELECT", "select", "SeLeCt", "(SELECT"]))
    close = ")" if select == "(SELECT" else ""
    if kind == "tf":
        return f"{select}{s}*{s}FROM{s}{tf}({args}){alias}{close}"
    if kind == "scalar":
        fn = draw(quoted(draw(st.sampled_from(["file", "dictGet", "joinGet", "getServerSetting", "url"]))))
        return f"{select}{s}{fn}({args}){alias}{close}"
    if kind == "outfile":
        n = draw(st.integers(0, 10**6))
        return f"{select}{s}1{alias}{s}INTO{s}OUTFILE{s}'{outdir}/f{n}'{close}"
    if kind == "multi":
        tail = draw(st.sampled_from([f"INSERT INTO FUNCTION file('{outdir}/m.csv','CSV') SELECT 1",
                                     "KILL QUERY WHERE 1", "CREATE TEMPORARY TABLE t (a UInt8)",
                                     "DROP TABLE hdrlog.packets", f"SELECT * FROM file('{secret}','LineAsString')"]))
        return f"{select}{s}1{alias}{close};{s}{tail}"
    if kind == "subquery":
        return f"SELECT * FROM ({select}{s}*{s}FROM{s}{tf}({args}){close})"
    if kind == "cte":
        return f"WITH{s}q AS (SELECT * FROM {tf}({args})) SELECT * FROM q"
    return f"SELECT 1 WHERE 'x' IN ({select} * FROM {tf}({args}){close})"


@st.composite
def harmless(draw):
    s = draw(spacing())
    tf = draw(quoted(draw(st.sampled_from(ALLOWED_TF))))
    n = draw(st.integers(1, 50))
    alias = draw(st.sampled_from(["", " AS n", " AS `$x$`", " AS \"a b\""]))
    return f"SELECT{s}count(){s}FROM{s}{tf}({n}){alias}", f"{n}\n"


def test_fuzz_forbidden_constructs_are_refused(env):
    srv, d, listener = env

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(statement(str(d / "secret.txt"), f"127.0.0.1:{listener.port}", str(d / "out")))
    def check(query):
        assert_refused(srv, d, listener, query, codes=(164, 62, 46))

    check()
    assert srv.count() == 0


def test_fuzz_allowlisted_constructs_run(env):
    srv, d, listener = env

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(harmless())
    def check(case):
        query, want = case
        status, body = ask(srv, query)
        assert MARKER not in body
        if "numbers" in query:  # the name as the engine spells it (table functions are case-sensitive)
            assert (status, body) == (200, want), query
        else:
            assert status == 200 and body == want or body.startswith("Code: "), (query, body)

    check()


def test_guard_latency(env, capsys):
    """The guard's cost per query as a ratio to a bare SELECT 1 through the endpoint (printed, not asserted)."""
    srv, d, listener = env
    n = 50
    ask(srv, "SELECT 1")
    start = time.perf_counter()
    for _ in range(n):
        ask(srv, "SELECT 1")
    bare = (time.perf_counter() - start) / n
    q = ("SELECT host, count() AS n, uniqExact(dst_ip) FROM hdrlog.packets WHERE ts > now() - INTERVAL 1 HOUR "
         "AND dst_port IN (53, 443) GROUP BY host ORDER BY n DESC LIMIT 10")
    start = time.perf_counter()
    for _ in range(n):
        ask(srv, q)
    typical = (time.perf_counter() - start) / n
    with capsys.disabled():
        print(f"\nSQL endpoint: SELECT 1 {bare * 1000:.2f} ms/query, a Grafana-style aggregate "
              f"{typical * 1000:.2f} ms/query (guard included in both)")


PROBE = r'''
import json, sys, chdb
d = sys.argv[1]
c = chdb.connect(d + "/store")
c.query("SET allow_introspection_functions = 0")
c.query("SET readonly = 1")
def run(sql):
    try:
        return "ok:" + c.query(sql, "TabSeparated").bytes().decode()
    except Exception as exc:
        return "err:" + str(exc)[:200]
probes = {
    "insert_function": f"INSERT INTO FUNCTION file('{d}/out/i.csv', 'CSV') SELECT 1",
    "temporary_table": "CREATE TEMPORARY TABLE t (a UInt8)",
    "system": "SYSTEM FLUSH LOGS",
    "set": "SET max_threads = 1",
    "settings_clause": "SELECT 1 SETTINGS max_threads = 1",
    "lower_readonly": "SET readonly = 0",
    "file_table_function": f"SELECT * FROM file('{d}/secret.txt', 'LineAsString')",
    "url_table_function": "SELECT * FROM url('http://127.0.0.1:1/', 'LineAsString')",
    "default_path": f"SELECT * FROM default.`{d}/secret.txt`",
    "zeros": "SELECT * FROM zeros(1)",
    "numbers": "SELECT count() FROM numbers(3)",
    "into_outfile": f"SELECT 1 INTO OUTFILE '{d}/out/o.txt'",
    "kill": "KILL QUERY WHERE 0",
    "multi": "SELECT 1; SELECT 2",
    "scalar_file": f"SELECT file('{d}/secret.txt')",
    "introspection": "SELECT getSetting('allow_introspection_functions')",
}
print(json.dumps({k: run(v) for k, v in probes.items()}))
'''


def test_what_chdb_itself_honours_under_readonly_1(tmp_path):
    """The table in docs/security.md: what a readonly = 1 handle refuses on its own, and what only the guard does."""
    import json
    import subprocess
    import sys
    (tmp_path / "secret.txt").write_text(MARKER + "\n")
    (tmp_path / "out").mkdir()
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for refused in ("insert_function", "temporary_table", "system", "set", "settings_clause", "lower_readonly",
                    "file_table_function", "url_table_function", "default_path", "zeros"):
        assert got[refused].startswith("err:") and "164" in got[refused], (refused, got[refused])
    assert got["numbers"] == "ok:3\n"
    assert got["introspection"] == "ok:false\n"
    # not refused by the engine: the guard is the only thing that stops these
    assert got["into_outfile"].startswith("ok:") and (tmp_path / "out" / "o.txt").exists()
    assert got["kill"].startswith("ok:")
    assert got["multi"] == "ok:1\n2\n"
    assert MARKER in got["scalar_file"]
