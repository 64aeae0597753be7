"""The read-only, ClickHouse-compatible HTTP SQL endpoint (``--sql-listen``).

chDB lets one process open a store, so the server that writes it also answers
SQL about it. The endpoint speaks enough of ClickHouse's HTTP interface for
curl and clickhouse-connect's HTTP client:

- ``GET /?query=...``, ``POST /`` with the query in the body, or a ``?query=``
  prefix followed by the body; ``GET /`` and ``/ping`` answer ``Ok.``;
- ``default_format`` (or the ``X-ClickHouse-Format`` header) and a ``FORMAT``
  clause in the query; ``database`` (or ``X-ClickHouse-Database``); any other
  URL parameter that names a ClickHouse setting is applied, unknown ones are
  ignored;
- errors as ClickHouse shapes them: HTTP 400/403/404/500, header
  ``X-ClickHouse-Exception-Code``, body ``Code: N. DB::Exception: ... (NAME)``.

Only SELECT, WITH, SHOW, DESCRIBE/DESC, EXISTS and EXPLAIN run, one statement
per request, decided by ``sqlguard`` with the engine's own parser (allowlists
of statements, tables, table functions, settings and output formats; refusals
are code 164, READONLY). What runs is the engine's canonical text of the checked
statement, on chDB handles with ``readonly = 1``.

Unless the server runs ``--insecure`` without ``--sql-user``, every query needs
the configured user and password, given the ClickHouse ways: HTTP basic auth
(``http://user:password@host:port``), the ``X-ClickHouse-User`` /
``X-ClickHouse-Key`` headers, or ``user`` / ``password`` URL parameters. They are
compared in constant time; no credentials is HTTP 401 (code 194,
REQUIRED_PASSWORD), wrong ones HTTP 403 (code 516, AUTHENTICATION_FAILED), each
after a short pause. ``/ping`` answers without credentials, as ClickHouse's does.

The HTTP side is a small asyncio server on the ingest event loop (HTTP/1.1,
keep-alive, Content-Length or chunked bodies); queries run in a small thread
pool on their own chDB handles, so a slow query never stalls ingest.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from hdrlog.server import sqlguard
from hdrlog.server.metrics import ServerMetrics
from hdrlog.server.store import Store, StoreError

log = logging.getLogger("hdrlog.server")

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
KEEPALIVE_SECONDS = 30.0
AUTH_FAILURE_PAUSE = 0.25  # seconds before answering a failed login: slows guessing down
DEFAULT_FORMAT = "TabSeparated"

# Transport parameters of ClickHouse's HTTP interface (not settings).
TRANSPORT_PARAMS = frozenset({
    "query", "database", "default_format", "query_id", "session_id", "session_timeout", "session_check",
    "compress", "decompress", "buffer_size", "wait_end_of_query", "user", "password", "quota_key", "role",
    "client_protocol_version", "send_progress_in_http_headers", "http_headers_progress_interval_ms",
    "enable_http_compression", "readonly", "max_query_size_http", "add_http_cors_header",
})

ERROR_NAMES = {
    1: "UNSUPPORTED_METHOD", 27: "CANNOT_PARSE_INPUT_ASSERTION_FAILED", 36: "BAD_ARGUMENTS", 46: "UNKNOWN_FUNCTION",
    47: "UNKNOWN_IDENTIFIER", 60: "UNKNOWN_TABLE", 62: "SYNTAX_ERROR", 73: "UNKNOWN_FORMAT",
    81: "UNKNOWN_DATABASE", 115: "UNKNOWN_SETTING", 159: "TIMEOUT_EXCEEDED", 164: "READONLY",
    194: "REQUIRED_PASSWORD", 516: "AUTHENTICATION_FAILED",
    241: "MEMORY_LIMIT_EXCEEDED", 1000: "POCO_EXCEPTION", 1002: "UNKNOWN_EXCEPTION",
}
# ClickHouse's HTTP status per exception code (src/Server/HTTPHandler.cpp), the ones that matter here.
_STATUS_400 = {6, 27, 36, 41, 42, 43, 44, 46, 47, 48, 53, 62, 69, 70, 72, 73, 115, 117, 130, 184, 190, 215, 386, 395}
_STATUS_403 = {164, 192, 193, 195, 196, 497, 516}
_STATUS_404 = {60, 81, 82}

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            411: "Length Required", 413: "Payload Too Large", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}

_CONTENT_TYPES = {
    "tabseparated": "text/tab-separated-values; charset=UTF-8", "tsv": "text/tab-separated-values; charset=UTF-8",
    "csv": "text/csv; charset=UTF-8; header=absent", "csvwithnames": "text/csv; charset=UTF-8; header=present",
    "json": "application/json; charset=UTF-8", "jsoncompact": "application/json; charset=UTF-8",
    "jsoneachrow": "application/x-ndjson; charset=UTF-8", "jsonstrings": "application/json; charset=UTF-8",
    "native": "application/octet-stream", "rowbinary": "application/octet-stream",
    "arrow": "application/octet-stream", "arrowstream": "application/octet-stream",
    "parquet": "application/octet-stream",
}


class SqlError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code

    @property
    def name(self) -> str:
        return ERROR_NAMES.get(self.code, "UNKNOWN_EXCEPTION")


# -- HTTP --------------------------------------------------------------------

@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


def _utf8(header_value: str) -> str:
    """Header values arrive as latin-1 text; clients send UTF-8 bytes."""
    try:
        return header_value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return header_value


def credentials_of(req: "Request", params: dict[str, str]) -> tuple[str, str] | None:
    """(user, password) as a ClickHouse client sends them, or None when it sent none."""
    user = req.headers.get("x-clickhouse-user")
    if user is not None:
        return _utf8(user), _utf8(req.headers.get("x-clickhouse-key", ""))
    auth = req.headers.get("authorization", "")
    if auth[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(auth[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return "", "\0invalid"
        user, _, password = decoded.partition(":")
        return user, password
    if "user" in params or "password" in params:
        return params.get("user", "default"), params.get("password", "")
    return None


class SqlEndpoint:
    def __init__(self, store: Store, metrics: ServerMetrics, host: str, port: int, *, workers: int = 4,
                 credentials: tuple[str, str] | None = None):
        self.store = store
        self.guard = sqlguard.SqlGuard(store.parse, store.known_settings)
        self._credentials = (_digest(credentials[0]), _digest(credentials[1])) if credentials else None
        self._last_auth_log = 0.0
        self.metrics = metrics
        self.host = host
        self.port = port
        self.workers = workers
        self._server: asyncio.base_events.Server | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._conns: set[asyncio.Task] = set()

    async def start(self) -> int:
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="hdrlog-sql")
        self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                  limit=MAX_HEADER_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._conns):
                task.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        if self._pool is not None:
            # Running queries finish on their own handles; nothing new starts.
            await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
            self._pool = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            while True:
                try:
                    req = await asyncio.wait_for(_read_request(reader), KEEPALIVE_SECONDS)
                except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return
                except _BadRequest as exc:
                    await _send(writer, exc.status, _error_body(SqlError(1, str(exc))),
                                {"X-ClickHouse-Exception-Code": "1"}, keep_alive=False)
                    return
                if req is None:
                    return
                keep_alive = req.headers.get("connection", "").lower() != "close" and req.version == "HTTP/1.1"
                status, body, headers = await self._respond(req)
                await _send(writer, status, body, headers, keep_alive=keep_alive,
                            head=req.method == "HEAD")
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # noqa: BLE001 - one connection's trouble is logged, never fatal
            log.exception("server: SQL endpoint connection failed")
        finally:
            if task is not None:
                self._conns.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except Exception:  # noqa: BLE001
                pass

    async def _respond(self, req: Request) -> tuple[int, bytes, dict[str, str]]:
        url = urlsplit(req.target)
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        if url.path in ("/ping", "/replicas_status"):
            return 200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"}
        if url.path not in ("/", ""):
            return _error(SqlError(1, f"no handler for {url.path!r}: use / or /ping"), 404)
        if req.method not in ("GET", "POST", "HEAD"):
            return _error(SqlError(1, f"HTTP method {req.method} is not supported: use GET or POST"), 405)
        body = req.body.decode("utf-8", "replace") if req.method == "POST" else ""
        query = params.get("query", "")
        if query and body:
            query = query + "\n" + body
        else:
            query = query or body
        if not query.strip():
            return 200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"}
        refused = self._authenticate(req, params)
        if refused is not None:
            self.metrics.sql_queries.labels("unauthenticated").inc()
            await asyncio.sleep(AUTH_FAILURE_PAUSE)
            return refused
        query_id = params.get("query_id") or str(uuid.uuid4())
        settings = {k: v for k, v in params.items() if k not in TRANSPORT_PARAMS and not k.startswith("param_")}
        parameters = {k[len("param_"):]: v for k, v in params.items() if k.startswith("param_")}
        loop = asyncio.get_running_loop()
        try:
            assert self._pool is not None
            stmt = await loop.run_in_executor(self._pool, lambda: self.guard.check(
                query, default_format=params.get("default_format") or req.headers.get("x-clickhouse-format"),
                database=params.get("database") or req.headers.get("x-clickhouse-database"),
                settings=settings, parameters=parameters))
        except sqlguard.SqlError as exc:
            self.metrics.sql_queries.labels("refused").inc()
            return _error(SqlError(exc.code, str(exc)), query_id=query_id)
        except StoreError as exc:  # the engine's catalogue could not be read
            self.metrics.sql_queries.labels("error").inc()
            return _error(SqlError(exc.code or 1000, _tidy(str(exc))), query_id=query_id)
        except RuntimeError as exc:  # the pool is shutting down
            return _error(SqlError(1002, f"server is stopping ({exc})"), 503, query_id=query_id)
        fmt = stmt.fmt
        try:
            out = await loop.run_in_executor(self._pool, lambda: self.store.query(
                stmt.sql, database=stmt.database, settings=stmt.settings, parameters=parameters))
        except StoreError as exc:
            self.metrics.sql_queries.labels("error").inc()
            return _error(SqlError(exc.code or 1000, _tidy(str(exc))), query_id=query_id)
        except RuntimeError as exc:  # the pool is shutting down
            return _error(SqlError(1002, f"server is stopping ({exc})"), 503, query_id=query_id)
        self.metrics.sql_queries.labels("ok").inc()
        headers = {
            "Content-Type": _CONTENT_TYPES.get(fmt.lower(), "text/plain; charset=UTF-8"),
            "X-ClickHouse-Format": fmt,
            "X-ClickHouse-Timezone": "UTC",
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Server-Display-Name": "hdrlog",
            "X-ClickHouse-Summary": json.dumps({"result_bytes": str(len(out))}),
        }
        return 200, out, headers


    def _authenticate(self, req: Request, params: dict[str, str]) -> tuple[int, bytes, dict[str, str]] | None:
        """None when the request may run; else the 401/403 answer."""
        if self._credentials is None:
            return None
        given = credentials_of(req, params)
        if given is None:
            status, body, headers = _error(SqlError(
                194, "Authentication required: this endpoint asks for a user and password "
                     "(http://USER:PASSWORD@host:port, X-ClickHouse-User/X-ClickHouse-Key headers, "
                     "or user/password URL parameters)"), 401)
            headers["WWW-Authenticate"] = 'Basic realm="hdrlog", charset="UTF-8"'
            return status, body, headers
        user_ok = hmac.compare_digest(_digest(given[0]), self._credentials[0])
        password_ok = hmac.compare_digest(_digest(given[1]), self._credentials[1])
        if user_ok & password_ok:
            return None
        now = time.monotonic()
        if now - self._last_auth_log >= 1.0:
            self._last_auth_log = now
            log.warning("server: SQL login failed for user %r", given[0][:64])
        shown = given[0][:64] or "default"
        return _error(SqlError(516, f"{shown}: Authentication failed: password is incorrect, "
                                    "or there is no user with such name"))


def _tidy(message: str) -> str:
    """Shorten ClickHouse's syntax errors: drop the long 'Expected one of' list."""
    message = re.sub(r"^Code: \d+\. (DB::Exception: )?", "", message)
    message = re.sub(r"\s*\([A-Z_]+\)\s*$", "", message)
    cut = message.find(" Expected one of:")
    if cut < 0:
        cut = message.find(". Expected one of:")
    if cut > 0:
        message = message[:cut].rstrip(".,;: ")
    return message if len(message) <= 500 else message[:497] + "..."


def _error_body(exc: SqlError) -> bytes:
    return f"Code: {exc.code}. DB::Exception: {str(exc).rstrip('. ')}. ({exc.name})\n".encode()


def _error(exc: SqlError, status: int | None = None, *, query_id: str = "") -> tuple[int, bytes, dict[str, str]]:
    if status is None:
        status = 400 if exc.code in _STATUS_400 else 403 if exc.code in _STATUS_403 else \
            404 if exc.code in _STATUS_404 else 500
    headers = {"Content-Type": "text/plain; charset=UTF-8", "X-ClickHouse-Exception-Code": str(exc.code)}
    if query_id:
        headers["X-ClickHouse-Query-Id"] = query_id
    return status, _error_body(exc), headers


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise _BadRequest(400, "incomplete HTTP request") from None
    except asyncio.LimitOverrunError:
        raise _BadRequest(431, "HTTP header too large") from None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400, "malformed HTTP request line")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise _BadRequest(400, "malformed HTTP header")
        headers[name.strip().lower()] = value.strip()
    body = b""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks: list[bytes] = []
        total = 0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise _BadRequest(400, "malformed chunked body") from None
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                break
            total += size
            if total > MAX_BODY_BYTES:
                raise _BadRequest(413, f"query larger than {MAX_BODY_BYTES} bytes")
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(chunks)
    elif "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise _BadRequest(400, "bad Content-Length") from None
        if length > MAX_BODY_BYTES:
            raise _BadRequest(413, f"query larger than {MAX_BODY_BYTES} bytes")
        body = await reader.readexactly(length)
    encoding = headers.get("content-encoding", "").lower()
    if body and encoding and encoding != "identity":
        body = _decompress(body, encoding)
    return Request(method, target, version, headers, body)


def _decompress(body: bytes, encoding: str) -> bytes:
    import gzip
    import zlib
    try:
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
        if encoding in ("zstd", "lz4"):
            if encoding == "zstd":
                import zstandard
                return zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_BODY_BYTES)
            import lz4.frame
            return lz4.frame.decompress(body)
    except Exception as exc:  # noqa: BLE001
        raise _BadRequest(400, f"cannot decode {encoding} body: {exc}") from None
    raise _BadRequest(400, f"unsupported Content-Encoding {encoding!r}")


async def _send(writer: asyncio.StreamWriter, status: int, body: bytes, headers: dict[str, str], *,
                keep_alive: bool, head: bool = False) -> None:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    headers = dict(headers)
    headers["Content-Length"] = str(len(body))
    headers["Connection"] = "Keep-Alive" if keep_alive else "close"
    if keep_alive:
        headers["Keep-Alive"] = f"timeout={int(KEEPALIVE_SECONDS)}"
    lines += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if not head:
        writer.write(body)
    await writer.drain()
