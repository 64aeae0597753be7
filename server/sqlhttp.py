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

Credentials are checked on the request's head, before any body byte is read
or decoded: a refused request is answered and its connection closed. Failed
logins are rate-limited per client address (an IPv6 /64): after
``auth_failure_burst`` failures an address gets HTTP 429 (code 516) without a
check until it has earned a failure back (``auth_failures_per_minute``); the
table of addresses holds at most ``MAX_AUTH_PEERS`` entries (least recently
seen dropped first). Compressed bodies (gzip, deflate, lz4, zstd when
installed) are decoded incrementally in a thread with an output cap of
``MAX_BODY_BYTES`` (HTTP 413 beyond it).

With ``--sql-write-user`` a second user may also INSERT into hdrlog tables
(``sqlinsert.py``, which says how it is wired); it reads like the SQL user.

The HTTP side is a small asyncio server on the ingest event loop (HTTP/1.1,
keep-alive, Content-Length or chunked bodies); queries run in a small thread
pool on their own chDB handles, so a slow query never stalls ingest.

Limits (``Limits``, from the server config; docs/security.md "Limits"): at most
``max_concurrent`` queries run, at most ``max_queued`` wait up to
``queue_timeout`` seconds, any more get HTTP 503 (code 202,
TOO_MANY_SIMULTANEOUS_QUERIES). Each query runs with ``max_memory_usage``,
``max_execution_time``, ``max_rows_to_read``, ``max_result_rows`` and
``max_result_bytes`` at most the configured caps: a client may lower them with
URL parameters (a higher or 0 value is lowered to the cap); naming them in the
query text is refused (164). A query's text starts with a marker comment
(``/* hdrlog-sql ID */``), by which it is killed (``KILL QUERY``) when its client
disconnects, when it outlives its time cap by ``WATCHDOG_GRACE`` seconds, and
when the server stops.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import time
import uuid
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from hdrlog.server import sqlguard
from hdrlog.server.sqlinsert import INSERT_SETTINGS, InsertEndpoint
from hdrlog.server.metrics import ServerMetrics
from hdrlog.server.store import Store, StoreError

log = logging.getLogger("hdrlog.server")

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
KEEPALIVE_SECONDS = 30.0
AUTH_FAILURE_PAUSE = 0.25  # seconds before answering a failed login: slows guessing down
MAX_AUTH_PEERS = 10_000  # client addresses the login rate limiter remembers (least recently seen dropped first)
DISCONNECT_POLL = 0.1  # seconds between checks, while a query runs, that its client is still connected
WATCHDOG_GRACE = 5.0  # seconds past its max_execution_time after which a query is killed from outside
SQL_THREAD_NICE = 10  # os_thread_priority of SQL query threads, at least (a client may only raise it)
QUERY_MARKER = "/* hdrlog-sql "  # every query's text starts with it and its id: what KILL QUERY matches
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
    241: "MEMORY_LIMIT_EXCEEDED", 158: "TOO_MANY_ROWS", 202: "TOO_MANY_SIMULTANEOUS_QUERIES",
    394: "QUERY_WAS_CANCELLED", 396: "TOO_MANY_ROWS_OR_BYTES", 1000: "POCO_EXCEPTION", 1002: "UNKNOWN_EXCEPTION",
}
# ClickHouse's HTTP status per exception code (src/Server/HTTPHandler.cpp), the ones that matter here.
_STATUS_400 = {6, 27, 36, 41, 42, 43, 44, 46, 47, 48, 53, 62, 69, 70, 72, 73, 115, 117, 130, 184, 190, 215, 386, 395}
_STATUS_403 = {164, 192, 193, 195, 196, 497, 516}
_STATUS_404 = {60, 81, 82}

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            411: "Length Required", 413: "Payload Too Large", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
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


# -- limits ------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """What one query and one client may take (ServerConfig's sql_* keys)."""

    max_concurrent: int = 4
    max_queued: int = 16
    queue_timeout: float = 10.0
    max_memory_usage: int = 1 << 30
    max_execution_time: float = 60.0
    max_rows_to_read: int = 5_000_000_000
    max_result_rows: int = 10_000_000
    max_result_bytes: int = 256 << 20
    auth_failure_burst: int = 10
    auth_failures_per_minute: float = 6.0

    def caps(self) -> dict[str, int | float]:
        """The settings every query runs with, at most these values."""
        return {"max_memory_usage": self.max_memory_usage, "max_execution_time": self.max_execution_time,
                "max_rows_to_read": self.max_rows_to_read, "max_result_rows": self.max_result_rows,
                "max_result_bytes": self.max_result_bytes}

    def defaults(self) -> dict[str, int | float]:
        """What a SQL handle is set to before any query: the caps, and niced query threads."""
        return {**self.caps(), "os_thread_priority": SQL_THREAD_NICE}


def capped_settings(settings: dict[str, str], limits: Limits) -> dict[str, str]:
    """The client's settings with each limit at most its cap (a higher value, 0 = unlimited, or none: the cap)."""
    out = dict(settings)
    for name, cap in limits.caps().items():
        raw = out.get(name)
        value = cap
        if raw is not None and raw.strip():
            try:
                asked = float(raw)
            except ValueError:
                raise SqlError(36, f"bad value {raw[:40]!r} for setting {name}: expected a number") from None
            if 0 < asked < cap:
                value = asked
        out[name] = repr(float(value)) if name == "max_execution_time" else str(int(value))
    # Query threads run niced (Linux nice 10): ingest's threads win the CPU when both want it.
    try:
        nice = int(float(out.get("os_thread_priority", "0")))
    except ValueError:
        nice = 0
    out["os_thread_priority"] = str(min(19, max(SQL_THREAD_NICE, nice)))
    return out


class AuthFailureLimiter:
    """A token bucket of failed logins per client address, in bounded memory.

    Each address starts with ``burst`` tokens; a failed login takes one; tokens come back at
    ``per_minute``. With no token left the address is refused without a check. IPv6 addresses count per /64
    (one host usually has the whole prefix). At most ``max_peers`` addresses are remembered; the least recently
    seen is forgotten first (it then starts again with a full bucket).
    """

    def __init__(self, burst: int, per_minute: float, max_peers: int = MAX_AUTH_PEERS):
        self.burst = float(burst)
        self.rate = per_minute / 60.0
        self.max_peers = max_peers
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.refused: dict[str, int] = {}

    @staticmethod
    def key(peer: str) -> str:
        try:
            addr = ipaddress.ip_address(peer)
        except ValueError:
            return peer
        if isinstance(addr, ipaddress.IPv6Address):
            if addr.ipv4_mapped is not None:
                return str(addr.ipv4_mapped)
            return str(ipaddress.IPv6Network((addr, 64), strict=False))
        return str(addr)

    def _tokens(self, key: str, now: float) -> float:
        tokens, then = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - then) * self.rate)

    def limited(self, key: str, now: float) -> bool:
        """True when ``key`` has no failure left: refuse without checking."""
        if key not in self._buckets:
            return False
        return self._tokens(key, now) < 1.0

    def failed(self, key: str, now: float) -> None:
        self._buckets[key] = (self._tokens(key, now) - 1.0, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_peers:
            self._buckets.popitem(last=False)

    def retry_after(self, key: str, now: float) -> int:
        return max(1, int((1.0 - self._tokens(key, now)) / self.rate + 0.999))

    def __len__(self) -> int:
        return len(self._buckets)


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
    def __init__(self, store: Store, metrics: ServerMetrics, host: str, port: int, *, limits: Limits | None = None,
                 credentials: tuple[str, str] | None = None, inserts: InsertEndpoint | None = None):
        self.store = store
        self.inserts = inserts  # the write user's INSERTs (sqlinsert.py); None: reads only
        self.guard = sqlguard.SqlGuard(store.parse, store.known_settings)
        self._credentials = (_digest(credentials[0]), _digest(credentials[1])) if credentials else None
        self._last_auth_log = 0.0
        self._last_limit_log = 0.0
        self.metrics = metrics
        self.host = host
        self.port = port
        self.limits = limits or Limits()
        self.workers = self.limits.max_concurrent
        self._auth_limiter = AuthFailureLimiter(self.limits.auth_failure_burst, self.limits.auth_failures_per_minute)
        self._server: asyncio.base_events.Server | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._conns: set[asyncio.Task] = set()
        self._slots: asyncio.Semaphore | None = None
        self._waiting = 0
        self._running: set[str] = set()  # markers of the queries on a worker
        self._stopping = False

    async def start(self) -> int:
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="hdrlog-sql")
        self._slots = asyncio.Semaphore(self.workers)
        self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                  limit=MAX_HEADER_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        self._stopping = True
        if self._running:
            # Running queries are killed, not waited for: a stop never waits on an analyst's query.
            await asyncio.to_thread(self.store.cancel, QUERY_MARKER)
        if self._server is not None:
            self._server.close()
            for task in list(self._conns):
                task.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        if self._pool is not None:
            await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
            self._pool = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        peer = writer.get_extra_info("peername")
        peer_key = AuthFailureLimiter.key(str(peer[0])) if isinstance(peer, tuple) and peer else ""
        try:
            while True:
                try:
                    req = await asyncio.wait_for(_read_head(reader, max(
                        MAX_BODY_BYTES, self.inserts.max_body_bytes if self.inserts else 0)), KEEPALIVE_SECONDS)
                except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return
                except _BadRequest as exc:
                    await _send(writer, exc.status, _error_body(SqlError(1, str(exc))),
                                {"X-ClickHouse-Exception-Code": "1"}, keep_alive=False)
                    return
                if req is None:
                    return
                keep_alive = req.headers.get("connection", "").lower() != "close" and req.version == "HTTP/1.1"
                early = await self._before_body(req, peer_key)
                writer_ = early is None and self._writer(req)
                if early is None and not writer_ and int(req.headers.get("content-length", "0") or 0) > MAX_BODY_BYTES:
                    early = _error(SqlError(1, f"query larger than {MAX_BODY_BYTES} bytes"), 413)
                cap = self.inserts.max_body_bytes if writer_ and self.inserts else MAX_BODY_BYTES
                if early is not None:
                    # Answered on the head alone: an unread body makes the connection unusable.
                    keep_alive = keep_alive and not _has_body(req)
                    status, body, headers = early
                else:
                    try:
                        req.body = await asyncio.wait_for(_read_body(reader, req, cap), KEEPALIVE_SECONDS)
                        encoding = req.headers.get("content-encoding", "").lower()
                        if req.body and encoding and encoding != "identity":
                            req.body = await asyncio.to_thread(_decompress, req.body, encoding, cap)
                    except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                        return
                    except _BadRequest as exc:
                        await _send(writer, exc.status, _error_body(SqlError(1, str(exc))),
                                    {"X-ClickHouse-Exception-Code": "1"}, keep_alive=False)
                        return
                    params = dict(parse_qsl(urlsplit(req.target).query, keep_blank_values=True))
                    insert = self.inserts.split(params.get("query", ""), req.body) \
                        if writer_ and self.inserts and req.method == "POST" else None
                    answer = await self.inserts.run(*insert, params) if insert and self.inserts \
                        else await self._respond(req, reader, readonly=2 if writer_ else 1)
                    if answer is None:  # the client went away; its query was cancelled
                        return
                    status, body, headers = answer
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

    async def _before_body(self, req: Request, peer_key: str) -> tuple[int, bytes, dict[str, str]] | None:
        """The answer decided on the request's head (ping, bad path or method, refused login), or None."""
        url = urlsplit(req.target)
        if url.path in ("/ping", "/replicas_status"):
            return 200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"}
        if url.path not in ("/", ""):
            return _error(SqlError(1, f"no handler for {url.path!r}: use / or /ping"), 404)
        if req.method not in ("GET", "POST", "HEAD"):
            return _error(SqlError(1, f"HTTP method {req.method} is not supported: use GET or POST"), 405)
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        if not params.get("query", "").strip() and not (req.method == "POST" and _has_body(req)):
            return 200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"}
        refused = self._authenticate(req, params, peer_key)
        if refused is not None:
            await asyncio.sleep(AUTH_FAILURE_PAUSE)
            return refused
        return None

    async def _respond(self, req: Request, reader: asyncio.StreamReader,
                       readonly: int = 1) -> tuple[int, bytes, dict[str, str]] | None:
        url = urlsplit(req.target)
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        body = req.body.decode("utf-8", "replace") if req.method == "POST" else ""
        query = params.get("query", "")
        if query and body:
            query = query + "\n" + body
        else:
            query = query or body
        if not query.strip():
            return 200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"}
        query_id = params.get("query_id") or str(uuid.uuid4())
        try:
            settings = capped_settings(
                {k: v for k, v in params.items() if k not in TRANSPORT_PARAMS and not k.startswith("param_")
                 and not (readonly == 2 and k in INSERT_SETTINGS)},  # the write user's client sends them on reads too
                self.limits)
        except SqlError as exc:
            self.metrics.sql_queries.labels("refused").inc()
            return _error(exc, query_id=query_id)
        parameters = {k[len("param_"):]: v for k, v in params.items() if k.startswith("param_")}
        try:
            await self._admit()
        except SqlError as exc:
            self.metrics.sql_queries.labels("overloaded").inc()
            status, out, headers = _error(exc, 503, query_id=query_id)
            headers["Retry-After"] = "1"
            return status, out, headers
        loop = asyncio.get_running_loop()
        assert self._pool is not None and self._slots is not None
        try:
            # The engine's own parser decides what may run (sqlguard); the statement it returns is what runs.
            stmt = await loop.run_in_executor(self._pool, lambda: self.guard.check(
                query, default_format=params.get("default_format") or req.headers.get("x-clickhouse-format"),
                database=params.get("database") or req.headers.get("x-clickhouse-database"),
                settings=settings, parameters=parameters))
        except (sqlguard.SqlError, StoreError, RuntimeError) as exc:
            self._slots.release()
            if isinstance(exc, sqlguard.SqlError):
                self.metrics.sql_queries.labels("refused").inc()
                return _error(SqlError(exc.code, str(exc)), query_id=query_id)
            if isinstance(exc, StoreError):  # the engine's catalogue could not be read
                self.metrics.sql_queries.labels("error").inc()
                return _error(SqlError(exc.code or 1000, _tidy(str(exc))), query_id=query_id)
            return _error(SqlError(1002, f"server is stopping ({exc})"), 503, query_id=query_id)
        fmt = stmt.fmt
        marker = f"{QUERY_MARKER}{uuid.uuid4()} */"
        sql = f"{marker}\n{stmt.sql}"
        settings = stmt.settings
        try:
            fut = loop.run_in_executor(self._pool, lambda: self.store.query(
                sql, database=stmt.database, settings=settings, parameters=parameters, readonly=readonly))
        except RuntimeError as exc:  # the pool is shutting down
            self._slots.release()
            return _error(SqlError(1002, f"server is stopping ({exc})"), 503, query_id=query_id)
        self._running.add(marker)

        def finished(_f: asyncio.Future) -> None:
            self._running.discard(marker)
            if not _f.cancelled():
                _f.exception()  # retrieved: a cancelled query's error is expected, not news
            assert self._slots is not None
            self._slots.release()  # the slot is free only when the engine is done with the query

        fut.add_done_callback(finished)
        deadline = loop.time() + float(settings["max_execution_time"]) + WATCHDOG_GRACE
        killed = ""
        try:
            while not fut.done():
                await asyncio.wait({fut}, timeout=DISCONNECT_POLL)
                if fut.done():
                    break
                if killed:
                    continue
                if reader.at_eof() or reader.exception() is not None:
                    killed = "disconnected"
                elif loop.time() > deadline:
                    killed = "overran"
                if killed:
                    log.info("server: SQL query %s %s; cancelling it", query_id[:64],
                             "lost its client" if killed == "disconnected" else "outlived its time limit")
                    self.metrics.sql_queries.labels("cancelled").inc()
                    await asyncio.to_thread(self.store.cancel, marker)
                    if killed == "disconnected":
                        return None
            out = fut.result()
        except StoreError as exc:
            self.metrics.sql_queries.labels("error").inc()
            return _error(SqlError(exc.code or 1000, _tidy(str(exc))), query_id=query_id)
        except RuntimeError as exc:
            return _error(SqlError(1002, f"server is stopping ({exc})"), 503, query_id=query_id)
        except asyncio.CancelledError:
            if not fut.done():
                await asyncio.shield(asyncio.to_thread(self.store.cancel, marker))
            raise
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

    def _writer(self, req: Request) -> bool:
        """The request carries the write user's credentials (sqlinsert.py): it may INSERT, with a larger body."""
        if self.inserts is None:
            return False
        given = credentials_of(req, dict(parse_qsl(urlsplit(req.target).query, keep_blank_values=True)))
        return given is not None and self.inserts.is_writer(*given)

    async def _admit(self) -> None:
        """Wait for a worker in a bounded queue; SqlError 202 when the queue is full or the wait too long."""
        assert self._slots is not None
        if self._stopping:
            raise SqlError(202, "the server is stopping")
        lim = self.limits
        if self._slots.locked() and self._waiting >= lim.max_queued:
            raise SqlError(202, f"Too many simultaneous queries: {lim.max_concurrent} running and {self._waiting} "
                                f"waiting (sql_max_concurrent_queries, sql_max_queued_queries); retry later")
        self._waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), lim.queue_timeout)
        except asyncio.TimeoutError:
            raise SqlError(202, f"Too many simultaneous queries: no worker free within {lim.queue_timeout:g} s "
                                f"(sql_max_concurrent_queries, sql_queue_timeout); retry later") from None
        finally:
            self._waiting -= 1

    def _authenticate(self, req: Request, params: dict[str, str],
                      peer_key: str = "") -> tuple[int, bytes, dict[str, str]] | None:
        """None when the request may run; else the 401/403/429 answer."""
        if self._credentials is None:  # reads are open (--insecure): only a wrong write login is refused
            given = credentials_of(req, params)
            if self.inserts is None or given is None or given[0] != self.inserts.user:
                return None
        now = time.monotonic()
        limiter = self._auth_limiter
        if peer_key and limiter.limited(peer_key, now):
            self.metrics.sql_queries.labels("rate_limited").inc()
            refused = limiter.refused.get(peer_key, 0) + 1
            limiter.refused[peer_key] = refused
            if len(limiter.refused) > limiter.max_peers:
                limiter.refused.clear()
            if now - self._last_limit_log >= 1.0:
                self._last_limit_log = now
                log.warning("server: SQL logins from %s rate-limited after %d failures (%d refused unchecked; "
                            "sql_auth_failure_burst, sql_auth_failures_per_minute)", peer_key,
                            self.limits.auth_failure_burst, refused)
            wait = limiter.retry_after(peer_key, now)
            status, body, headers = _error(SqlError(
                516, f"Authentication failed: too many failed logins from {peer_key}; retry in {wait} s"), 429)
            headers["Retry-After"] = str(wait)
            return status, body, headers
        given = credentials_of(req, params)
        if given is None:
            self.metrics.sql_queries.labels("unauthenticated").inc()
            status, body, headers = _error(SqlError(
                194, "Authentication required: this endpoint asks for a user and password "
                     "(http://USER:PASSWORD@host:port, X-ClickHouse-User/X-ClickHouse-Key headers, "
                     "or user/password URL parameters)"), 401)
            headers["WWW-Authenticate"] = 'Basic realm="hdrlog", charset="UTF-8"'
            return status, body, headers
        if self._credentials is None:
            if self.inserts is not None and self.inserts.is_writer(*given):
                return None
        else:
            user_ok = hmac.compare_digest(_digest(given[0]), self._credentials[0])
            password_ok = hmac.compare_digest(_digest(given[1]), self._credentials[1])
            # The write user (sqlinsert.py) may read too: a server's start and its stored-seq reads are SELECTs.
            if (user_ok & password_ok) or (self.inserts is not None and self.inserts.is_writer(*given)):
                return None
        self.metrics.sql_queries.labels("unauthenticated").inc()
        if peer_key:
            limiter.failed(peer_key, now)
        if now - self._last_auth_log >= 1.0:
            self._last_auth_log = now
            log.warning("server: SQL login failed for user %r from %s", given[0][:64], peer_key or "?")
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


def _has_body(req: Request) -> bool:
    if req.headers.get("transfer-encoding", "").lower() == "chunked":
        return True
    return req.headers.get("content-length", "0").strip() not in ("", "0")


async def _read_head(reader: asyncio.StreamReader, cap: int = MAX_BODY_BYTES) -> Request | None:
    """The request line and headers (the body is read after the credentials are checked)."""
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
    if "content-length" in headers and headers.get("transfer-encoding", "").lower() != "chunked":
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise _BadRequest(400, "bad Content-Length") from None
        if length < 0:
            raise _BadRequest(400, "bad Content-Length")
        if length > cap:
            raise _BadRequest(413, f"query larger than {cap} bytes")
    return Request(method, target, version, headers, b"")


async def _read_body(reader: asyncio.StreamReader, req: Request, cap: int = MAX_BODY_BYTES) -> bytes:
    """The body as sent (at most ``cap`` bytes), still encoded."""
    headers = req.headers
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
            if total > cap:
                raise _BadRequest(413, f"query larger than {cap} bytes")
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        return b"".join(chunks)
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return b""


def _inflate(body: bytes, wbits: int, cap: int) -> bytes:
    """zlib/gzip (every gzip member) into at most ``cap`` bytes, incrementally."""
    out = bytearray()
    data = body
    while data:
        d = zlib.decompressobj(wbits)
        while not d.eof:
            chunk = d.decompress(data, cap + 1 - len(out))
            out += chunk
            if len(out) > cap:
                raise _BadRequest(413, f"decoded query larger than {cap} bytes")
            data = d.unconsumed_tail
            if not chunk and not data:
                break
        if not d.eof:
            raise _BadRequest(400, "cannot decode body: truncated stream")
        data = d.unused_data if wbits == 31 else b""
    return bytes(out)


def _decompress(body: bytes, encoding: str, cap: int = MAX_BODY_BYTES) -> bytes:
    """Decode a Content-Encoding into at most ``cap`` bytes (HTTP 413 beyond). Blocks: run it in a thread."""
    try:
        if encoding in ("gzip", "x-gzip"):
            return _inflate(body, 31, cap)
        if encoding == "deflate":
            return _inflate(body, 15, cap)
        if encoding == "lz4":
            import lz4.frame
            d = lz4.frame.LZ4FrameDecompressor()
            out = d.decompress(body, max_length=cap + 1)
            if len(out) > cap:
                raise _BadRequest(413, f"decoded query larger than {cap} bytes")
            return out
        if encoding == "zstd":
            try:
                import zstandard
            except ImportError:
                raise _BadRequest(400, "zstd bodies need the zstandard module; send gzip, deflate or lz4") from None
            import io
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)) as reader:
                out = reader.read(cap + 1)
            if len(out) > cap:
                raise _BadRequest(413, f"decoded query larger than {cap} bytes")
            return out
    except _BadRequest:
        raise
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
