"""Grafana's ClickHouse data source against the real endpoint (issue 15, "Grafana" and "A Grafana dashboard").

- Native at ``client_protocol_version``: the bytes a real ``hdrlog server run`` answers are decoded by
  clickhouse-driver (PyPI; an independent implementation of ClickHouse's Native block reader,
  ``clickhouse_driver/streams/native.py`` ``BlockInputStream.read``) at that revision, and checked
  against the layout clickhouse-go decodes (``lib/proto/block.go``, ``Block.Decode`` / ``decodeBlockInfo``)
  and the bytes ClickHouse's Native format spec shows for ``SELECT 1`` at a revision >= 54454.
- The discovery SQL of grafana/clickhouse-datasource (``src/data/CHDatasource.ts``: ``fetchDatabases``,
  ``fetchTables``, ``fetchColumnsFromTable``, ``fetchSqlFunctions``, ``fetchTags``/``getTagSource``,
  ``canUseAdhocFilters``; ``pkg/plugin/driver.go`` ``CheckMinServerVersion``) and clickhouse-go's HTTP
  hello (``conn_http.go`` ``queryHello``) run with credentials and answer sensibly, in Native at 54460.
- ``dashboards/hdrlog.json`` type-checks against Grafana's published ``Dashboard`` type (npm
  ``@grafana/schema``, checked by ``tsc``), and every panel's SQL, macros expanded as the plugin's
  ``pkg/macros/macros.go`` does, runs against the endpoint on a store with traffic and answers rows.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from bench import synth
from hdrlog.server import native
from hdrlog.server.store import Store
from tests.support import ServerProcess, basic_auth, http_response
from tests.test_report import NS, Filler

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "dashboards" / "hdrlog.json"
GRAFANA_REVISION = 54460  # clickhouse-go's ClientTCPProtocolVersion (client_info.go), sent by Grafana
USER, PASSWORD = ServerProcess.SQL_USER, ServerProcess.SQL_PASSWORD
TYPES_QUERY = """SELECT toUInt64(number) AS n, toInt8(-1) AS i8, toDateTime64(number, 9, 'UTC') AS ts,
 toIPv6('2001:db8::1') AS ip, toString(number) AS s, toLowCardinality(toString(number % 3)) AS lc,
 toFixedString('ab', 2) AS fs, [number, 1] AS arr, if(number % 2 = 0, NULL, number) AS nul, map('k', number) AS m,
 (number, 'x') AS t, CAST((1, 'y') AS Tuple(a UInt8, b String)) AS nt, [toLowCardinality('z')] AS alc,
 toLowCardinality(toNullable(if(number = 1, NULL, 'w'))) AS lcn, toDecimal64(1.5, 3) AS d,
 CAST('a' AS Enum8('a' = 1, 'b c' = 2)) AS e, toUUID('00000000-0000-0000-0000-000000000001') AS u
 FROM numbers(5)"""


# -- an independent decoder: clickhouse-driver's Native block reader -----------------------------

class _Sock:
    def __init__(self, data: bytes):
        self.data = io.BytesIO(data)

    def recv_into(self, buf, n=0):
        view = memoryview(buf)
        return self.data.readinto(view[:n or len(view)])


def driver_decode(data: bytes, revision: int) -> list[tuple[list[tuple[str, str]], list[tuple]]]:
    """Every block of ``data`` as clickhouse-driver reads it at ``revision``: (names and types, rows)."""
    from clickhouse_driver.bufferedreader import BufferedSocketReader
    from clickhouse_driver.client import Client
    from clickhouse_driver.connection import ServerInfo
    from clickhouse_driver.context import Context
    from clickhouse_driver.streams.native import BlockInputStream

    ctx = Context()
    ctx.server_info = ServerInfo("hdrlog", 26, 9, 2, 54515, "UTC", "hdrlog", revision)
    ctx.settings = {}
    ctx.client_settings = Client("localhost").connection.context.client_settings  # the driver's defaults
    reader = BufferedSocketReader(_Sock(data), 1 << 16)
    blocks = []
    while True:
        try:
            block = BlockInputStream(reader, ctx).read()
        except EOFError:
            return blocks
        blocks.append((block.columns_with_types, block.get_rows()))


def go_header(data: bytes, revision: int) -> list[tuple[str, str]]:
    """The first block's (name, type) pairs read as clickhouse-go's ``Block.Decode`` reads them
    (lib/proto/block.go): decodeBlockInfo when revision > 0 (field 1, bool, field 2, int32, end 0),
    then columns and rows, then per column name, type and, at revision >= 54454, a bool that must be 0."""
    pos = 0

    def uvarint() -> int:
        nonlocal pos
        shift = value = 0
        while True:
            b = data[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7

    def string() -> str:
        nonlocal pos
        n = uvarint()
        pos += n
        return data[pos - n:pos].decode()

    if revision > 0:
        assert uvarint() == 1 and data[pos] == 0
        pos += 1
        assert uvarint() == 2 and data[pos:pos + 4] == b"\xff\xff\xff\xff"
        pos += 4
        assert uvarint() == 0, "decodeBlockInfo reads exactly fields 1 and 2, then 0"
    columns, rows = uvarint(), uvarint()
    assert rows > 0
    out = [(string(), string())]
    if revision >= 54454:
        assert data[pos] == 0, "clickhouse-go refuses custom serialization"
    return out + [("columns", str(columns))]


# -- the endpoint on a store with traffic -----------------------------------------------------------

def _fill(store: Store, now: float) -> None:
    fill = Filler(store)
    start = now - 3000
    for host, cols in synth.packets(20_000, start_ns=int(start * NS), seconds=2900, hosts=3, seed=5).items():
        fill.packets(host, cols)
    names = [f"n{i}.example.org" for i in range(20)]
    fill.crafted("host-00", [{"src_ip": "198.18.0.10", "dst_ip": "198.19.0.53", "ip_proto": 17, "src_port": 40000 + i,
                              "dst_port": 53, "dns_qname": n, "dns_qtype": 1} for i, n in enumerate(names)]
                 + [{"src_ip": "198.19.0.53", "dst_ip": "198.18.0.10", "ip_proto": 17, "src_port": 53,
                     "dst_port": 40000 + i, "dns_qname": n, "dns_qtype": 1, "dns_flags": 0x8183, "dns_rcode": 3}
                    for i, n in enumerate(names[:5])], now - 900, 60)
    fill.crafted("host-01", [{"src_ip": "198.18.1.10", "dst_ip": "198.19.0.80", "ip_proto": 6, "src_port": 50000 + i,
                              "dst_port": 443, "tcp_flags": 0x18, "tls_sni": f"api{i % 3}.example.com",
                              "tls_alpn": "h2"} for i in range(30)], now - 600, 60)
    n = 12
    states = ["S0", "REJ", "SF", "RSTO", "S0", "SF", "SH", "REJ", "SF", "S0", "RSTR", "SF"]
    fill._send("host-00", "connections", {
        "start_ts": np.array([int((now - 1200 + i) * NS) for i in range(n)], dtype="<i8"),
        "end_ts": np.array([int((now - 1100 + i) * NS) for i in range(n)], dtype="<i8"),
        "ifname": ["eth0"] * n, "uid": [f"C{i}" for i in range(n)], "final": np.ones(n, dtype="u1"),
        "ip_version": np.full(n, 4, dtype="u1"), "ip_proto": np.full(n, 6, dtype="u1"),
        "orig_ip": np.array([synth.v16("198.18.0.10")] * n, dtype="V16"),
        "orig_port": np.arange(40000, 40000 + n, dtype="<u2"),
        "resp_ip": np.array([synth.v16(f"198.19.0.{1 + i % 3}") for i in range(n)], dtype="V16"),
        "resp_port": np.array([22, 443, 80] * 4, dtype="<u2"), "conn_state": states})
    fill._send("host-02", "collector_stats", {
        "ts": np.array([int((now - 700) * NS)] * 5, dtype="<i8"), "interval_ms": np.full(5, 1000, dtype="<u4"),
        "counter": ["seen", "logged", "drop_ringbuf_full", "drop_sampled_out", "drop_filtered"],
        "value": np.array([10_000, 9_000, 100, 800, 100], dtype="<u8")})
    t = datetime.fromtimestamp(now - 300, timezone.utc)
    store.insert("anomalies", pa.table({
        "report_id": ["r1", "r1"], "report_ts": pa.array([t, t], pa.timestamp("ms", "UTC")),
        "window_start": pa.array([t, t], pa.timestamp("ms", "UTC")),
        "window_end": pa.array([t, t], pa.timestamp("ms", "UTC")),
        "detector": ["port_scan", "dns_tunnel"], "severity": ["high", "medium"], "subject_kind": ["ip", "domain"],
        "subject": ["198.19.9.9", "tunnel.example.net"], "host": ["host-00", "host-02"],
        "title": ["port scan", "DNS tunnel"], "score": [9.5, 4.0],
        "first_seen": pa.array([t, t], pa.timestamp("ms", "UTC")), "last_seen": pa.array([t, t], pa.timestamp("ms", "UTC")),
        "evidence": ["{}", "{}"]}), "grafana-anomalies")


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    """A real ``hdrlog server run`` (SQL user and password) on a store filled through the server's conversion."""
    tmp = tmp_path_factory.mktemp("grafana")
    url = f"chdb://{tmp}/store"
    now = time.time()
    store = Store(url)
    store.open()
    store.migrate()
    _fill(store, now)
    store.close()
    srv = ServerProcess(url, tmp, "--sql-user", USER)
    srv.env = {"HDRLOG_SQL_PASSWORD": PASSWORD}
    srv.pki = Path("/nonexistent")  # only so that srv.http() sends the credentials
    srv.start()
    srv.now = now
    try:
        yield srv
    finally:
        srv.stop()


def query(srv, sql: str, **params: str) -> tuple[int, dict[str, str], bytes]:
    """POST ``sql`` the way clickhouse-go's HTTP transport does (basic auth, settings in the URL)."""
    req = urllib.request.Request(f"{srv.sql_url}/?{urllib.parse.urlencode(params)}", data=sql.encode(), method="POST")
    req.add_header("Authorization", basic_auth(USER, PASSWORD))
    return http_response(req, timeout=60)


def grafana(srv, sql: str) -> list[tuple]:
    """``sql`` as Grafana's data source sends it (Native at 54460), rows as clickhouse-driver decodes them."""
    status, _, body = query(srv, sql, default_format="Native", client_protocol_version=str(GRAFANA_REVISION))
    assert status == 200, body[:500]
    return [row for _, rows in driver_decode(body, GRAFANA_REVISION) for row in rows]


# -- Native at the client's revision ----------------------------------------------------------------

def test_select_1_matches_clickhouse_spec_bytes():
    """ClickHouse's Native format spec: ``SELECT 1`` at a revision >= 54454 is BlockInfo (01 00 02 ff ff ff ff 00),
    1 column, 1 row, "1", "UInt8", has_custom_serialization 0, the byte 01; from 54480 BlockInfo gains 03 00."""
    rev0 = b"\x01\x01\x011\x05UInt8\x01"
    assert native.to_client_revision(rev0, 54460) == b"\x01\x00\x02\xff\xff\xff\xff\x00\x01\x01\x011\x05UInt8\x00\x01"
    assert native.to_client_revision(rev0, 54453) == b"\x01\x00\x02\xff\xff\xff\xff\x00\x01\x01\x011\x05UInt8\x01"
    assert native.to_client_revision(rev0, 54480) == \
        b"\x01\x00\x02\xff\xff\xff\xff\x03\x00\x00\x01\x01\x011\x05UInt8\x00\x01"
    assert native.to_client_revision(rev0, 0) == rev0


@pytest.mark.parametrize("revision", [54405, 54453, 54454, GRAFANA_REVISION, 54479])
def test_native_at_revision_over_http_decodes_in_an_independent_reader(endpoint, revision):
    status, headers, rev0 = query(endpoint, TYPES_QUERY + " FORMAT Native")
    assert status == 200, rev0[:300]
    status, headers, body = query(endpoint, TYPES_QUERY + " FORMAT Native", client_protocol_version=str(revision))
    assert status == 200, body[:300]
    assert headers["X-ClickHouse-Format"] == "Native"
    assert body != rev0
    assert driver_decode(body, revision) == driver_decode(rev0, 0)  # same names, types and values
    assert go_header(body, revision)[0] == ("n", "UInt64")
    with pytest.raises(Exception):  # and the revision-0 bytes are what a client at this revision misreads
        assert driver_decode(rev0, revision) == driver_decode(rev0, 0)


def test_lowcardinality_is_removed_for_clients_older_than_54405(endpoint):
    _, _, rev0 = query(endpoint, TYPES_QUERY + " FORMAT Native")
    status, _, body = query(endpoint, TYPES_QUERY + " FORMAT Native", client_protocol_version="54404")
    assert status == 200
    [(types, rows)] = driver_decode(body, 54404)
    [(types0, rows0)] = driver_decode(rev0, 0)
    assert rows == rows0
    assert dict(types)["lc"] == "String" and dict(types)["alc"] == "Array(String)"
    assert dict(types)["lcn"] == "Nullable(String)" and dict(types0)["lcn"] == "LowCardinality(Nullable(String))"


def test_hdrlog_tables_at_grafana_revision(endpoint):
    """Every column of hdrlog's tables, several blocks, through the revision Grafana asks for."""
    for table in ("packets", "connections", "collector_stats", "anomalies", "flows"):
        _, _, rev0 = query(endpoint, f"SELECT * FROM hdrlog.{table} ORDER BY 1 LIMIT 30000 FORMAT Native")
        _, _, body = query(endpoint, f"SELECT * FROM hdrlog.{table} ORDER BY 1 LIMIT 30000 FORMAT Native",
                           client_protocol_version=str(GRAFANA_REVISION))
        assert driver_decode(body, GRAFANA_REVISION) == driver_decode(rev0, 0), table


def test_bad_client_protocol_version_is_a_clear_error(endpoint):
    status, headers, body = query(endpoint, "SELECT 1 FORMAT Native", client_protocol_version="abc")
    assert status == 400 and headers["X-ClickHouse-Exception-Code"] == "72"
    assert b"client_protocol_version" in body
    status, _, body = query(endpoint, "SELECT 1 FORMAT JSONEachRow", client_protocol_version="54460")
    assert status == 200 and json.loads(body) == {"1": 1}  # only Native depends on the revision


# -- the plugin's discovery queries -----------------------------------------------------------------

def test_grafana_discovery_queries(endpoint):
    # clickhouse-go's HTTP hello (conn_http.go queryHello), decoded at its hard-coded revision
    [(name, version, revision, tz)] = grafana(endpoint, "SELECT displayName(), version(), revision(), timezone()")
    assert version.count(".") >= 2 and revision >= 54454 and tz
    [(v,)] = grafana(endpoint, "SELECT version()")  # CheckMinServerVersion, canUseAdhocFilters
    assert int(v.split(".")[0]) >= 22
    databases = {r[0] for r in grafana(endpoint, "SHOW DATABASES")}  # fetchDatabases
    assert "hdrlog" in databases
    tables = {r[0] for r in grafana(endpoint, 'SHOW TABLES FROM "hdrlog"')}  # fetchTables(db)
    assert {"packets", "flows", "connections", "collector_stats", "anomalies"} <= tables
    for sql in ("SHOW TABLES FROM hdrlog FORMAT JSONEachRow", "SHOW TABLES FORMAT JSONEachRow"):
        status, _, body = query(endpoint, sql, database="hdrlog")  # a FORMAT after the database still counts
        assert status == 200 and {"name": "packets"} in [json.loads(x) for x in body.splitlines()], body[:300]
    columns = {r[0]: r[1] for r in grafana(endpoint, 'DESC TABLE "hdrlog"."packets"')}  # fetchColumnsFromTable
    assert columns["ts"] == "DateTime64(9, 'UTC')" and columns["src_ip"] == "IPv6"
    assert {r[0] for r in grafana(endpoint, 'DESC TABLE "hdrlog"."connections"')} >= {"conn_state", "uid"}
    functions = grafana(endpoint, """
      SELECT
        name, is_aggregate, case_insensitive, alias_to, origin, description,
        syntax, arguments, returned_value, examples, categories
      FROM system.functions
      LIMIT 10000
    """)  # fetchSqlFunctions
    assert len(functions) > 500 and "toStartOfInterval" in {f[0] for f in functions}
    tags = grafana(endpoint, "SELECT name, type, table FROM system.columns WHERE database IN ('hdrlog')")  # getTagSource
    assert ("conn_state", "LowCardinality(String)", "connections") in tags or \
        any(t[0] == "conn_state" and t[2] == "connections" for t in tags)
    one = grafana(endpoint, "SELECT name, type, table FROM system.columns WHERE database IN ('hdrlog') "
                            "AND table = 'packets'")
    assert {t[0] for t in one} == set(columns)
    assert grafana(endpoint, "SELECT name, type, table FROM system.columns WHERE database = 'hdrlog' "
                             "AND table = 'anomalies'")  # fetchTags with $__adhoc_column
    assert len(grafana(endpoint, "SELECT name, type, table FROM system.columns")) > len(tags)  # fetchTags default
    assert "hdrlog" in {r[0] for r in grafana(endpoint, "SELECT name FROM system.databases;")}  # shipped dashboards
    assert "packets" in {r[0] for r in grafana(endpoint, "SELECT name FROM system.tables WHERE database IN ('hdrlog')")}


# -- the dashboard ------------------------------------------------------------------------------------

def _npm_dir() -> Path:
    """@grafana/schema and typescript from the npm registry, in a cache kept between runs."""
    npm = shutil.which("npm")
    assert npm, "npm is needed to fetch @grafana/schema (Debian: apt-get install nodejs npm)"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hdrlog-tests" / "grafana-schema"
    pins = {"@grafana/schema": "13.2.3", "typescript": "5.9.3"}
    if not (cache / "node_modules" / "@grafana" / "schema" / "package.json").exists() or \
            not (cache / "node_modules" / ".bin" / "tsc").exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([npm, "install", "--no-audit", "--no-fund", "--silent", "--prefix", str(cache),
                        *[f"{k}@{v}" for k, v in pins.items()]], check=True, timeout=600)
    return cache


def test_dashboard_matches_grafanas_published_dashboard_type(tmp_path):
    """The JSON as an object literal typed ``Dashboard`` (@grafana/schema): tsc rejects a wrong or unknown field."""
    cache = _npm_dir()
    text = DASHBOARD.read_text()
    dash = json.loads(text)
    check = cache / "check-hdrlog.ts"
    check.write_text('import type { Dashboard, Panel, RowPanel } from "@grafana/schema";\n'
                     f"const dashboard: Dashboard = {text};\n"
                     f"const panels: Array<Panel | RowPanel> = {json.dumps(dash['panels'])};\n"
                     "export { dashboard, panels };\n")
    out = subprocess.run([str(cache / "node_modules" / ".bin" / "tsc"), "--noEmit", "--strict", "--skipLibCheck",
                          "--moduleResolution", "bundler", "--module", "esnext", "--target", "es2022", str(check)],
                         capture_output=True, text=True, cwd=cache, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    # and the same check does catch a mistake
    bad = dict(dash, refresh=5, panels=[dict(dash["panels"][1], gridPos={"h": "8"})])
    check.write_text(f'import type {{ Dashboard }} from "@grafana/schema";\nconst d: Dashboard = {json.dumps(bad)};\n'
                     "export { d };\n")
    out = subprocess.run([str(cache / "node_modules" / ".bin" / "tsc"), "--noEmit", "--strict", "--skipLibCheck",
                          "--moduleResolution", "bundler", "--module", "esnext", "--target", "es2022", str(check)],
                         capture_output=True, text=True, cwd=cache, timeout=300)
    assert out.returncode != 0


def expand_macros(sql: str, start: float, end: float, interval_s: float, variables: dict[str, list[str]]) -> str:
    """What Grafana sends for ``sql``: the frontend replaces ``${var:singlequote}``; the plugin's
    pkg/macros/macros.go then expands $__timeFilter / $__timeInterval / $__fromTime / $__toTime / $__interval_s."""
    for name, values in variables.items():
        sql = sql.replace(f"${{{name}:singlequote}}", ", ".join("'" + v.replace("'", "\\'") + "'" for v in values))
    f, t, secs = int(start), int(end), max(int(interval_s), 1)
    sql = re.sub(r"\$__timeFilter\(([^)]*)\)",
                 lambda m: f"{m[1]} >= toDateTime({f}) AND {m[1]} <= toDateTime({t})", sql)  # TimeFilter
    sql = re.sub(r"\$__timeInterval\(([^)]*)\)",
                 lambda m: f"toStartOfInterval(toDateTime({m[1]}), INTERVAL {secs} second)", sql)  # TimeInterval
    sql = sql.replace("$__fromTime", f"toDateTime({f})").replace("$__toTime", f"toDateTime({t})")
    sql = sql.replace("$__interval_s", str(secs))
    assert "$__" not in sql and "${" not in sql, sql
    return sql


def test_every_panel_query_runs_against_the_endpoint(endpoint):
    dash = json.loads(DASHBOARD.read_text())
    start, end = endpoint.now - 3600, endpoint.now + 60
    [host_var] = [v for v in dash["templating"]["list"] if v["name"] == "host"]
    hosts = [r[0] for r in grafana(endpoint, expand_macros(host_var["query"], start, end, 60, {}))]
    assert hosts == ["host-00", "host-01", "host-02"]
    titles = set()
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        titles.add(panel["title"])
        [target] = panel["targets"]
        assert target["datasource"]["type"] == "grafana-clickhouse-datasource"
        assert target["editorType"] == "sql" and target["format"] == (0 if panel["type"] == "timeseries" else 1)
        sql = expand_macros(target["rawSql"], start, end, 60, {"host": hosts})
        rows = grafana(endpoint, sql)
        assert rows, f"{panel['title']}: no rows for\n{sql}"
        if panel["type"] == "timeseries":
            assert all(isinstance(r[0], datetime) for r in rows), panel["title"]
    assert {"Packets by host", "Top talkers", "Failed connections by state", "Top DNS names",
            "TLS server names (SNI)", "Collector drops by reason", "Coverage by host",
            "Findings of the anomaly reports"} <= titles
