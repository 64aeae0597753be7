"""The SQL endpoint with the clients people bring (issue 15): a real server process, real HTTP over sockets.

clickhouse-connect (plain, pandas, Arrow, its SQLAlchemy dialect), the Node.js ``@clickhouse/client`` (from
npm into tests/node/node_modules) and curl, each signed in with the credentials the README's server asks for.
Query parameters the ClickHouse HTTP way, response compression (HTTP and ClickHouse's compressed blocks),
summary and progress headers, the engine's error names, streamed answers in bounded memory, and
``Expect: 100-continue`` without curl's one-second wait.
"""

from __future__ import annotations

import gzip
import http.client
import json
import shutil
import struct
import subprocess
import threading
import time
import urllib.parse
import zlib
from pathlib import Path

import pytest

from hdrlog import pki
from tests.support import ServerProcess
from tests.test_sql_limits import code, request, rss

MiB = 1 << 20
NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    d = tmp_path_factory.mktemp("sqlclients")
    (d / "pki").mkdir()
    pki.init_ca(d / "pki")
    pki.issue(d / "pki", "central", server=True, sans=["127.0.0.1", "localhost"])
    proc = ServerProcess(f"chdb://{d}/store", d, "--sql-max-result-bytes", str(4 << 30), pki=d / "pki")
    proc.start()
    yield proc
    proc.stop(timeout=30)


PARAM_QUERY = "SELECT {s:String} AS s, {a:Array(String)} AS a, {n:Nullable(String)} AS n FORMAT JSONEachRow"
PARAM_ROW = {"s": "it's", "a": ["x", "y"], "n": None}


def test_query_parameters_the_http_way(srv):
    """param_s=it\\'s is it's, param_a=['x','y'] an Array(String), \\N a NULL: values in their type's text format."""
    status, headers, body = request(srv, PARAM_QUERY, param_s="it\\'s", param_a="['x','y']", param_n="\\N")
    assert status == 200, body
    assert json.loads(body) == PARAM_ROW


def connect_client(srv, **kw):
    import clickhouse_connect
    return clickhouse_connect.get_client(host="127.0.0.1", port=srv.sql_port, username=srv.SQL_USER,
                                         password=srv.SQL_PASSWORD, interface="http", **kw)


def test_clickhouse_connect_parameters_pandas_arrow(srv):
    client = connect_client(srv)
    try:
        rows = client.query("SELECT {s:String} AS s, {a:Array(String)} AS a, {n:Nullable(String)} AS n",
                            parameters={"s": "it's", "a": ["x", "y"], "n": None}).result_rows
        assert rows == [("it's", ["x", "y"], None)]
        df = client.query_df("SELECT number AS n, toString(number) AS s FROM numbers(1000) WHERE n < {k:UInt32}",
                             parameters={"k": 10})
        assert list(df["n"]) == list(range(10)) and df["s"].iloc[9] == "9"
        table = client.query_arrow("SELECT number, [toString(number)] AS a FROM numbers(100000)")
        assert table.num_rows == 100000 and table.column("number")[99999].as_py() == 99999
    finally:
        client.close()


def test_clickhouse_connect_sqlalchemy_dialect(srv):
    import sqlalchemy as sa
    engine = sa.create_engine(f"clickhousedb://{srv.SQL_USER}:{srv.SQL_PASSWORD}@127.0.0.1:{srv.sql_port}/hdrlog")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count() FROM numbers(1234)")).scalar() == 1234
        assert "packets" in sa.inspect(conn).get_table_names()
    engine.dispose()


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_official_client(srv):
    if not (NODE_DIR / "node_modules" / "@clickhouse" / "client").exists():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=NODE_DIR, check=True,
                       timeout=300)
    out = subprocess.run(["node", "params.mjs", srv.sql_url, srv.SQL_USER, srv.SQL_PASSWORD], cwd=NODE_DIR,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["rows"] == [PARAM_ROW]
    assert got["summary"] and "read_rows" in json.loads(got["summary"])


def _lz4(data: bytes) -> bytes:
    import lz4.frame
    return lz4.frame.decompress(data)


def _br(data: bytes) -> bytes:
    import brotli
    return brotli.decompress(data)


def _zstd(data: bytes) -> bytes:
    import io
    import zstandard
    return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()


DECODERS = {"gzip": gzip.decompress, "deflate": zlib.decompress, "br": _br, "zstd": _zstd, "lz4": _lz4}


@pytest.mark.parametrize("method", sorted(DECODERS))
def test_http_compression(srv, method):
    query = "SELECT number, toString(number) FROM numbers(200000)"
    _, headers, plain = request(srv, query)
    assert "content-encoding" not in headers  # not asked for: plain, as ClickHouse does
    status, headers, body = request(srv, query, enable_http_compression="1",
                                    headers={"Accept-Encoding": f"{method}, identity"})
    assert status == 200 and headers.get("content-encoding") == method
    assert len(body) < len(plain) * 0.7 and DECODERS[method](body) == plain


def read_compressed_blocks(data: bytes) -> bytes:
    """ClickHouse's compressed block framing, each block's CityHash128 checked (clickhouse-cityhash)."""
    import lz4.block
    import zstandard
    from clickhouse_cityhash.cityhash import CityHash128
    out, pos = bytearray(), 0
    while pos < len(data):
        lo, hi = struct.unpack_from("<QQ", data, pos)
        method, size, raw_size = struct.unpack_from("<BII", data, pos + 16)
        block = data[pos + 16: pos + 16 + size]
        assert CityHash128(block) == (hi << 64) | lo, "checksum"
        payload = block[9:]
        if method == 0x82:
            out += lz4.block.decompress(payload, uncompressed_size=raw_size)
        elif method == 0x90:
            out += zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw_size)
        else:
            assert method == 0x02
            out += payload
        pos += 16 + size
    return bytes(out)


def test_compress_1_is_clickhouse_compressed_blocks(srv):
    query = "SELECT number, toString(number) FROM numbers(300000)"
    _, _, plain = request(srv, query)
    status, headers, body = request(srv, query, compress="1")
    assert status == 200 and body != plain
    assert read_compressed_blocks(body) == plain
    status, headers, _ = request(srv, query, compress="2")
    assert status == 400 and code(headers) == 36


def test_summary_progress_query_id_and_engine_error_names(srv):
    status, headers, body = request(srv, "SELECT count() FROM numbers(1000000)", query_id="my-query-1",
                                    send_progress_in_http_headers="1")
    assert (status, body) == (200, b"1000000\n")
    assert headers["x-clickhouse-query-id"] == "my-query-1"
    summary = json.loads(headers["x-clickhouse-summary"])
    assert int(summary["read_rows"]) == 1_000_000 and int(summary["read_bytes"]) == 8_000_000
    assert int(summary["elapsed_ns"]) > 0
    assert "x-clickhouse-progress" in headers and "read_rows" in json.loads(headers["x-clickhouse-progress"])
    # Codes the endpoint never raises itself keep the engine's name.
    for sql, (want_code, name) in {"SELECT toInt32('x')": (6, "CANNOT_PARSE_TEXT"),
                                   "SELECT throwIf(1)": (395, "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO")}.items():
        status, headers, body = request(srv, sql)
        assert code(headers) == want_code and body.rstrip().endswith(f"({name})".encode()), body


def stream_answer(srv, rows: int) -> tuple[int, int]:
    """Read a ``rows``-row TabSeparated answer slowly; (bytes read, the server's peak RSS meanwhile)."""
    query = f"SELECT number, repeat(toString(number % 10), 100) FROM numbers({rows})"
    qs = urllib.parse.urlencode({"query": query, "max_result_bytes": str(4 << 30)})
    conn = http.client.HTTPConnection("127.0.0.1", srv.sql_port, timeout=120)
    peak = [rss(srv.proc.pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss(srv.proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        conn.request("GET", "/?" + qs, headers={"X-ClickHouse-User": srv.SQL_USER,
                                               "X-ClickHouse-Key": srv.SQL_PASSWORD})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked"
        total = lines = 0
        while True:
            chunk = resp.read(1 << 20)
            if not chunk:
                break
            total += len(chunk)
            lines += chunk.count(b"\n")
            time.sleep(0.001)  # a client slower than the engine: the server must not buffer ahead
    finally:
        stop.set()
        sampler.join()
        conn.close()
    assert lines == rows
    return total, peak[0]


def test_large_result_streams_in_bounded_memory(srv):
    """Answers stream (chunked) and the server never holds one: a 620 MiB answer after a 207 MiB one takes
    the server's RSS no higher (the engine's arenas warm up once, by ~150 MB in a bare chDB process too;
    the hand-written server grew by 4x the answer and kept most of it)."""
    base = rss(srv.proc.pid)
    small, peak_small = stream_answer(srv, 2_000_000)
    large, peak_large = stream_answer(srv, 6_000_000)
    print(f"\nserver RSS {base / MiB:.0f} MiB; streaming {small / MiB:.0f} MiB: peak {peak_small / MiB:.0f} MiB; "
          f"then {large / MiB:.0f} MiB: peak {peak_large / MiB:.0f} MiB")
    assert large > 3 * small - MiB
    assert peak_large - peak_small < 64 * MiB, "the larger answer took more memory: it is being held"
    assert peak_large - base < 320 * MiB
    # Without asking, a query gets the default max_result_bytes (64 MiB): the answer ends in the engine's
    # error and the connection is cut (no closing chunk), so the client cannot take it for a whole answer.
    with pytest.raises(http.client.IncompleteRead) as cut:
        request(srv, "SELECT number, repeat(toString(number % 10), 100) FROM numbers(2000000)")
    assert b"(TOO_MANY_ROWS_OR_BYTES)" in cut.value.partial[-400:]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_expect_100_continue_does_not_wait(srv, tmp_path):
    """curl sends ``Expect: 100-continue`` for a large body and waits up to 1 s for the 100: it must come at once."""
    big = tmp_path / "query.sql"
    # Larger than the engine's max_query_size (256 KiB): answered with a syntax error once read, which is
    # all this needs — a SELECT is never that long, curl's Expect is about the wait before the body.
    big.write_bytes(b"SELECT 42 /* " + b"x" * (2 * MiB) + b" */")
    url = f"http://{srv.SQL_USER}:{srv.SQL_PASSWORD}@127.0.0.1:{srv.sql_port}/"

    def timed(*extra: str) -> tuple[float, str, str]:
        t = time.monotonic()
        out = subprocess.run(["curl", "-sS", "-v", "--data-binary", f"@{big}", *extra, url],
                             capture_output=True, text=True, timeout=60)
        return time.monotonic() - t, out.stdout, out.stderr

    times = {}
    for _ in range(2):
        for name, extra in (("expect", ()), ("no-expect", ("-H", "Expect:"))):
            took, out, err = timed(*extra)
            assert out.startswith("Code: 62.") and "Max query size exceeded" in out, err[-2000:]
            assert "Done waiting for 100-continue" not in err
            times[name] = min(times.get(name, 99.0), took)
            if name == "expect":
                assert "Expect: 100-continue" in err and "HTTP/1.1 100 Continue" in err
    print(f"\ncurl 2 MiB POST: with Expect {times['expect']:.3f} s, without {times['no-expect']:.3f} s")
    assert times["expect"] < times["no-expect"] * 2 + 0.3  # no ~1 s wait for the 100
    # Wrong credentials: refused on the head, no 100 Continue, the body never sent.
    took, out, err = timed("-u", "tester:wrong")
    assert "403" in err and "100 Continue" not in err


def test_large_parameters_as_form_fields(srv, tmp_path):
    """Past ~4 KB of bind parameters clickhouse-connect sends the query and its param_ values as
    multipart/form-data fields, as ClickHouse reads them (before: the form body ran as SQL text and
    came back as a syntax error); curl -F does the same. A file part (external data) is refused."""
    tokens = [f"it's-{i:032x}" for i in range(2000)]  # ~90 KB of parameter
    client = connect_client(srv)
    try:
        rows = client.query("SELECT length({t:Array(String)}) AS n, {t:Array(String)}[2000] AS last, {s:String} AS s",
                            parameters={"t": tokens, "s": "tab\there"}).result_rows
    finally:
        client.close()
    assert rows == [(2000, tokens[-1], "tab\there")]
    url = f"http://{srv.SQL_USER}:{srv.SQL_PASSWORD}@127.0.0.1:{srv.sql_port}/"
    out = subprocess.run(["curl", "-sS", "-F", "query=SELECT {x:UInt8} + 1", "-F", "param_x=41", url],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout == "42\n", out.stderr
    data = tmp_path / "t.tsv"
    data.write_text("1\n")
    out = subprocess.run(["curl", "-sS", "-F", "query=SELECT * FROM t", "-F", f"t=@{data}", url],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.startswith("Code: 1.") and "external data" in out.stdout, out.stdout
