"""The read-only, ClickHouse-compatible HTTP SQL endpoint (``--sql-listen``), on aiohttp.

aiohttp does HTTP (keep-alive, ``Expect: 100-continue``, chunked bodies and answers, limits on the
request head); this module keeps ClickHouse's semantics:

- ``GET /?query=...``, ``POST /`` with the query in the body, or a ``?query=`` prefix followed by the
  body, or ``multipart/form-data`` fields ``query`` and ``param_NAME`` (body.form_fields); ``GET /``
  and ``/ping`` answer ``Ok.``;
- ``default_format`` (or ``X-ClickHouse-Format``) and a ``FORMAT`` clause; ``database`` (or
  ``X-ClickHouse-Database``); URL parameters that name allowlisted settings are applied, unknown ones
  ignored; ``param_NAME`` values reach the engine as ClickHouse's HTTP interface passes them (each in its
  type's text format: ``it\\'s``, ``['x','y']``, ``\\N`` for NULL);
- answers stream (chunked) as the engine makes blocks, with ``X-ClickHouse-Summary`` (the engine's
  read_rows, read_bytes, elapsed_ns), ``X-ClickHouse-Progress`` when ``send_progress_in_http_headers=1``,
  ``enable_http_compression=1`` + ``Accept-Encoding`` and ``compress=1`` (encode.py);
- errors as ClickHouse shapes them (errors.py), with the engine's own names.

Only SELECT, WITH, SHOW, DESCRIBE/DESC, EXISTS and EXPLAIN run, one statement per request, decided by
``guard`` with the engine's own parser; what runs is the engine's canonical text of the checked statement,
on chDB handles with ``readonly = 1``.

Credentials (unless ``--insecure`` without ``--sql-user``) are checked on the request's head, before any
body byte is read or decoded — also before ``100 Continue`` is sent: a refused request is answered and its
connection closed unread. No credentials is HTTP 401 (code 194), wrong ones 403 (code 516), each after a
short pause; failed logins are rate-limited per address (limits.AuthFailureLimiter, HTTP 429). Bodies are
capped at ``MAX_BODY_BYTES`` and decoded in a thread with the same output cap (body.py).

With ``--sql-write-user`` a second user may also INSERT into hdrlog tables (insert.py, which says what it
may send): its credentials are checked on the head like the SQL user's, and only once they verify does its
body get the larger cap (``insert.MAX_INSERT_BYTES``); an INSERT from it is split off and run before the
read path, anything else it sends is a read like the SQL user's, on handles with ``readonly = 2`` (so its
client sees the insert settings as changeable) and with those insert settings dropped from its reads.

Limits (limits.Limits): at most ``max_concurrent`` queries run, at most ``max_queued`` wait up to
``queue_timeout`` seconds, more get HTTP 503 (code 202). A query's text starts with a marker comment
(``/* hdrlog-sql ID */``) by which it is killed (``KILL QUERY``) when its client disconnects, when it
outlives its time cap by ``WATCHDOG_GRACE`` seconds, and when the server stops.

Over 400 lines on purpose: the request's path (head → credentials → body → guard → worker → streamed
answer) reads top to bottom in one file; its parts with no HTTP in them live beside it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from hdrlog.server.metrics import ServerMetrics
from hdrlog.server.sql import encode, guard
from hdrlog.server.sql.body import MAX_BODY_BYTES, BadRequest, decompress, form_fields
from hdrlog.server.sql.errors import SqlError, tidy
from hdrlog.server.sql.insert import INSERT_SETTINGS, InsertEndpoint
from hdrlog.server import native
from hdrlog.server.sql.limits import AuthFailureLimiter, Limits, capped_settings
from hdrlog.server.store import Store, StoreError

log = logging.getLogger("hdrlog.server")

MAX_HEADER_BYTES = 64 * 1024
KEEPALIVE_SECONDS = 30.0
AUTH_FAILURE_PAUSE = 0.25  # seconds before answering a failed login: slows guessing down
DISCONNECT_POLL = 0.1  # seconds between checks, while a query runs, that its client is still connected
WATCHDOG_GRACE = 5.0  # seconds past its max_execution_time after which a query is killed from outside
QUERY_MARKER = "/* hdrlog-sql "  # every query's text starts with it and its id: what KILL QUERY matches
HEAD_BUFFER = 4 << 20  # bytes of answer held before the headers go out: small answers get a Content-Length
HANDOFF_BYTES = 1 << 20  # encoded bytes a query's thread gathers before handing them to the loop
QUEUE_CHUNKS = 4  # engine chunks in flight between the query's thread and the client: bounds memory
PROGRESS_INTERVAL_MS = 100  # http_headers_progress_interval_ms default

# Transport parameters of ClickHouse's HTTP interface (not settings).
TRANSPORT_PARAMS = frozenset({
    "query", "database", "default_format", "query_id", "session_id", "session_timeout", "session_check",
    "compress", "decompress", "buffer_size", "wait_end_of_query", "user", "password", "quota_key", "role",
    "client_protocol_version", "send_progress_in_http_headers", "http_headers_progress_interval_ms",
    "enable_http_compression", "readonly", "max_query_size_http", "add_http_cors_header",
})

_CONTENT_TYPES = {
    "tabseparated": "text/tab-separated-values; charset=UTF-8", "tsv": "text/tab-separated-values; charset=UTF-8",
    "csv": "text/csv; charset=UTF-8; header=absent", "csvwithnames": "text/csv; charset=UTF-8; header=present",
    "json": "application/json; charset=UTF-8", "jsoncompact": "application/json; charset=UTF-8",
    "jsoneachrow": "application/x-ndjson; charset=UTF-8", "jsonstrings": "application/json; charset=UTF-8",
    "native": "application/octet-stream", "rowbinary": "application/octet-stream",
    "arrow": "application/octet-stream", "arrowstream": "application/octet-stream",
    "parquet": "application/octet-stream",
}
_END = object()


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


def _utf8(header_value: str) -> str:
    """Header values arrive as latin-1 text; clients send UTF-8 bytes."""
    try:
        return header_value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return header_value


def credentials_of(headers: Any, params: dict[str, str]) -> tuple[str, str] | None:
    """(user, password) as a ClickHouse client sends them, or None when it sent none."""
    user = headers.get("x-clickhouse-user")
    if user is not None:
        return _utf8(user), _utf8(headers.get("x-clickhouse-key", ""))
    auth = headers.get("authorization", "")
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


def _error(exc: SqlError, status: int | None = None, *, query_id: str = "") -> web.Response:
    headers = {"X-ClickHouse-Exception-Code": str(exc.code)}
    if query_id:
        headers["X-ClickHouse-Query-Id"] = query_id
    return web.Response(status=status or exc.status, body=exc.body(), headers=headers,
                        content_type="text/plain", charset="UTF-8")


def _ok_text() -> web.Response:
    return web.Response(body=b"Ok.\n", content_type="text/plain", charset="UTF-8")


def _store_error(exc: StoreError) -> SqlError:
    return SqlError(exc.code or 1000, tidy(str(exc)), exc.name)


def _has_body(request: web.Request) -> bool:
    return request.body_exists


async def _read_body(request: web.Request, cap: int, timeout: float = 30.0) -> bytes:
    """The body as sent (still encoded), at most ``cap`` bytes (BadRequest 413 beyond, before reading more),
    within ``timeout`` seconds plus one per MiB read (BadRequest 408 after: a body trickled a byte at a time
    cannot hold its connection)."""
    length = request.content_length
    if length is not None and length > cap:
        raise BadRequest(413, f"query larger than {cap} bytes")
    out = bytearray()
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        left = start + timeout + len(out) / (1 << 20) - loop.time()
        try:
            if left <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(request.content.readany(), left)
        except asyncio.TimeoutError:
            raise BadRequest(408, f"the request's body did not arrive within {timeout:g} s (+1 s per MiB; "
                                  f"sql_request_timeout): {len(out)} bytes read") from None
        if not chunk:
            return bytes(out)
        out += chunk
        if len(out) > cap:
            raise BadRequest(413, f"query larger than {cap} bytes")


class _Gate(asyncio.Protocol):
    """A new connection, admitted or refused on its peer's address as soon as it is made: refused ones
    are closed at once, nothing read; an admitted one is handed to aiohttp's handler."""

    def __init__(self, admit):
        self._admit = admit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        handler = self._admit(transport)
        if handler is None:
            transport.abort()  # type: ignore[attr-defined]
            return
        transport.set_protocol(handler)
        handler.connection_made(transport)


class _Run:
    """One query between its worker thread and its handler: a bounded queue of encoded chunks."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue(QUEUE_CHUNKS)
        self.stop = threading.Event()
        self.stream: Any = None

    def put(self, item: Any) -> bool:
        """From the worker: hand one item over, waiting while the client is slow; False once stopped."""
        fut = asyncio.run_coroutine_threadsafe(self.queue.put(item), self.loop)
        while True:
            try:
                fut.result(timeout=DISCONNECT_POLL)
                return not self.stop.is_set()
            except TimeoutError:
                if self.stop.is_set():
                    fut.cancel()
                    return False
            except Exception:  # noqa: BLE001 - the loop is gone (the server stops)
                return False


class SqlEndpoint:
    def __init__(self, store: Store, metrics: ServerMetrics, host: str, port: int, *, limits: Limits | None = None,
                 credentials: tuple[str, str] | None = None, inserts: InsertEndpoint | None = None):
        self.store = store
        self.inserts = inserts  # the write user's INSERTs (insert.py); None: reads only
        self.guard = guard.SqlGuard(store.parse, store.known_settings)
        self._credentials = (_digest(credentials[0]), _digest(credentials[1])) if credentials else None
        self._last_auth_log = 0.0
        self._last_limit_log = 0.0
        self.metrics = metrics
        self.host = host
        self.port = port
        self.limits = limits or Limits()
        self.workers = self.limits.max_concurrent
        self._auth_limiter = AuthFailureLimiter(self.limits.auth_failure_burst, self.limits.auth_failures_per_minute)
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.base_events.Server | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._slots: asyncio.Semaphore | None = None
        self._waiting = 0
        self._running: dict[str, _Run] = {}  # marker -> the query on a worker
        self._stopping = False

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> int:
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="hdrlog-sql")
        self._slots = asyncio.Semaphore(self.workers)
        # Bodies are read by _read_body with the cap of the request's verified user, not client_max_size.
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_route("*", "/{tail:.*}", self._handle, expect_handler=self._expect)
        # auto_decompress off: bodies are decoded in a thread with an output cap (body.py), after the
        # credentials; lingering_time 0: an unread body (a refused request) is never read, the connection closes.
        # keepalive_timeout is also the head's deadline: aiohttp closes a connection whose next request's
        # head has not arrived that long after its connection or its previous answer (slowloris included).
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0,
                                     keepalive_timeout=min(KEEPALIVE_SECONDS, self.limits.request_timeout), auto_decompress=False, lingering_time=0,
                                     max_line_size=MAX_HEADER_BYTES, max_field_size=MAX_HEADER_BYTES)
        await self._runner.setup()
        handlers = self._runner.server
        assert handlers is not None
        cap, per_address = self.limits.max_connections, self.limits.max_connections_per_address
        open_connections, by_address, address_of = [0], {}, {}
        # Counted when each connection is made (before aiohttp registers it: one accept round makes many
        # connections first), in all and per client address (an IPv6 /64); past a cap a new one is closed.
        forget = handlers.connection_lost

        def connection_lost(handler, exc=None) -> None:
            open_connections[0] -= 1
            key = address_of.pop(handler, "")
            if by_address.get(key, 0) > 1:
                by_address[key] -= 1
            else:
                by_address.pop(key, None)
            forget(handler, exc)
        handlers.connection_lost = connection_lost  # type: ignore[method-assign]

        def admit(transport: asyncio.BaseTransport):
            peer = transport.get_extra_info("peername")
            key = AuthFailureLimiter.key(str(peer[0])) if isinstance(peer, tuple) and peer else ""
            if open_connections[0] >= cap:
                self._connection_refused(f"{open_connections[0]} connections open (sql_max_connections)")
                return None
            if by_address.get(key, 0) >= per_address:
                self._connection_refused(f"{by_address[key]} connections open from {key} "
                                         f"(sql_max_connections_per_address)")
                return None
            open_connections[0] += 1
            by_address[key] = by_address.get(key, 0) + 1
            handler = handlers()
            address_of[handler] = key
            return handler
        self._listener = await asyncio.get_running_loop().create_server(
            lambda: _Gate(admit), self.host or None, self.port, reuse_address=True)
        self.port = self._listener.sockets[0].getsockname()[1]
        return self.port

    def _connection_refused(self, why: str) -> None:
        if self.metrics is not None:
            self.metrics.sql_connections_refused.inc()
        now = time.monotonic()
        if now - self._last_limit_log >= 60:
            self._last_limit_log = now
            log.warning("sql: %s; new ones are closed at once", why)

    async def stop(self) -> None:
        self._stopping = True
        for run in list(self._running.values()):
            run.stop.set()
        if self._running:
            # Running queries are killed, not waited for: a stop never waits on an analyst's query.
            await asyncio.to_thread(self.store.cancel, QUERY_MARKER)
        if self._listener is not None:
            self._listener.close()  # no new connections; the runner closes the open ones
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._pool is not None:
            await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
            self._pool = None

    # -- before the body -----------------------------------------------------

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: the head is judged first; only a request that may run gets ``100``."""
        early = await self._before_body(request)
        if early is not None:
            return early
        request["hdrlog_checked"] = True
        cap = self._body_cap(request)
        if request.content_length is not None and request.content_length > cap:
            resp = _error(SqlError(1, f"query larger than {cap} bytes"), 413)  # no 100: the body stays unsent
            resp.force_close()
            return resp
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return None
        return web.HTTPExpectationFailed(text=f"Unknown Expect: {request.headers.get('Expect', '')[:40]}")

    async def _before_body(self, request: web.Request) -> web.StreamResponse | None:
        """The answer decided on the request's head (ping, bad path or method, refused login), or None."""
        path = request.path
        if path in ("/ping", "/replicas_status"):
            return _ok_text()
        if path not in ("/", ""):
            return _error(SqlError(1, f"no handler for {path!r}: use / or /ping"), 404)
        if request.method not in ("GET", "POST", "HEAD"):
            return _error(SqlError(1, f"HTTP method {request.method} is not supported: use GET or POST"), 405)
        params = dict(request.query)
        if not params.get("query", "").strip() and not (request.method == "POST" and _has_body(request)):
            return _ok_text()
        refused = self._authenticate(request, params)
        if refused is not None:
            await asyncio.sleep(AUTH_FAILURE_PAUSE)
            return refused
        return None

    def _body_cap(self, request: web.Request) -> int:
        """The body cap of this request's user: the write user's larger one only once it verified (head)."""
        if self.inserts is not None and request.get("hdrlog_writer"):
            return self.inserts.max_body_bytes
        return MAX_BODY_BYTES

    def _authenticate(self, request: web.Request, params: dict[str, str]) -> web.Response | None:
        """None when the request may run (``request["hdrlog_writer"]`` set when it is the write user's);
        else the 401/403/429 answer."""
        given = credentials_of(request.headers, params)
        if self._credentials is None and (self.inserts is None or given is None or given[0] != self.inserts.user):
            return None  # reads are open (--insecure without --sql-user): only a login as the write user is checked
        peer = request.transport.get_extra_info("peername") if request.transport else None
        peer_key = AuthFailureLimiter.key(str(peer[0])) if isinstance(peer, tuple) and peer else ""
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
            resp = _error(SqlError(516, f"Authentication failed: too many failed logins from {peer_key}; "
                                        f"retry in {wait} s"), 429)
            resp.headers["Retry-After"] = str(wait)
            return resp
        if given is None:
            self.metrics.sql_queries.labels("unauthenticated").inc()
            resp = _error(SqlError(
                194, "Authentication required: this endpoint asks for a user and password "
                     "(http://USER:PASSWORD@host:port, X-ClickHouse-User/X-ClickHouse-Key headers, "
                     "or user/password URL parameters)"), 401)
            resp.headers["WWW-Authenticate"] = 'Basic realm="hdrlog", charset="UTF-8"'
            return resp
        # The write user (insert.py) may read too: a server's start and its stored-seq reads are SELECTs.
        if self.inserts is not None and self.inserts.is_writer(*given):
            request["hdrlog_writer"] = True
            return None
        if self._credentials is not None:
            user_ok = hmac.compare_digest(_digest(given[0]), self._credentials[0])
            password_ok = hmac.compare_digest(_digest(given[1]), self._credentials[1])
            if user_ok & password_ok:
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

    # -- the request -----------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if not request.get("hdrlog_checked"):
            early = await self._before_body(request)
            if early is not None:
                return early
        writer = self.inserts is not None and bool(request.get("hdrlog_writer"))
        cap = self._body_cap(request)  # the write user's larger cap only once its credentials verified (head)
        try:
            body = await _read_body(request, cap, self.limits.request_timeout) if request.method == "POST" else b""
            encoding = request.headers.get("Content-Encoding", "").lower()
            if body and encoding and encoding != "identity":
                body = await asyncio.to_thread(decompress, body, encoding, cap)
        except BadRequest as exc:
            resp = _error(SqlError(1, str(exc)), exc.status)
            resp.force_close()
            return resp
        if writer and self.inserts is not None and request.method == "POST":
            params = dict(request.query)
            insert = self.inserts.split(params.get("query", ""), body)
            if insert is not None:
                status, out, headers = await self.inserts.run(*insert, params)
                return web.Response(status=status, body=out, headers=headers)
        return await self._respond(request, body, readonly=2 if writer else 1)

    async def _respond(self, request: web.Request, raw_body: bytes, readonly: int = 1) -> web.StreamResponse:
        """A read: guard, worker, streamed answer. ``readonly = 2`` for the write user's reads (insert.py)."""
        params = dict(request.query)
        content_type = request.headers.get("Content-Type", "")
        if raw_body and content_type.lower().startswith("multipart/form-data"):
            # the query and its param_ values as form fields (clickhouse-connect past ~4 KB of parameters)
            try:
                params.update(await asyncio.to_thread(form_fields, content_type, raw_body))
            except BadRequest as exc:
                return _error(SqlError(1, str(exc)), exc.status)
            raw_body = b""
        body = raw_body.decode("utf-8", "replace")
        query = params.get("query", "")
        query = query + "\n" + body if query and body else query or body
        if not query.strip():
            return _ok_text()
        # query_id: chDB gives every query an id of its own (no way to set it); the client's is echoed.
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
        try:  # Native at a client's revision (Grafana/clickhouse-go): a bad value is refused before the query runs
            native.client_revision(params.get("client_protocol_version"))
        except native.NativeError as exc:
            return _error(SqlError(exc.code, str(exc)), query_id=query_id)
        compress = params.get("compress", "0").strip()
        if compress not in ("0", "1", ""):
            return _error(SqlError(36, f"compress={compress[:8]!r}: expected 0 or 1"), query_id=query_id)
        if params.get("decompress", "0").strip() == "1":
            return _error(SqlError(1, "decompress=1 (a body in ClickHouse's compressed blocks) is not supported "
                                      "here: send the query plain or with Content-Encoding"), query_id=query_id)
        try:
            await self._admit()
        except SqlError as exc:
            self.metrics.sql_queries.labels("overloaded").inc()
            resp = _error(exc, 503, query_id=query_id)
            resp.headers["Retry-After"] = "1"
            return resp
        loop = asyncio.get_running_loop()
        assert self._pool is not None and self._slots is not None
        try:
            # The engine's own parser decides what may run (guard); the statement it returns is what runs.
            stmt = await loop.run_in_executor(self._pool, lambda: self.guard.check(
                query, default_format=params.get("default_format") or request.headers.get("X-ClickHouse-Format"),
                database=params.get("database") or request.headers.get("X-ClickHouse-Database"),
                settings=settings, parameters=parameters))
        except (SqlError, StoreError, RuntimeError) as exc:
            self._slots.release()
            if isinstance(exc, SqlError):
                self.metrics.sql_queries.labels("refused").inc()
                return _error(exc, query_id=query_id)
            if isinstance(exc, StoreError):  # the engine's catalogue could not be read
                self.metrics.sql_queries.labels("error").inc()
                return _error(_store_error(exc), query_id=query_id)
            return _error(SqlError(1002, f"server is stopping ({exc})"), 503, query_id=query_id)
        fmt = stmt.fmt
        marker = f"{QUERY_MARKER}{uuid.uuid4()} */"
        sql = f"{marker}\n{stmt.sql}"
        run = _Run(loop)
        encoder = encode.Encoder(fmt, params, request.headers.get("Accept-Encoding", ""))
        # chDB streams SELECTs only (SHOW, DESCRIBE, EXISTS, EXPLAIN answer in one piece, and are small).
        select = stmt.sql.lstrip().upper().startswith(("SELECT", "WITH", "("))
        whole = not (select and encode.streamable(fmt)) or request.method == "HEAD" \
            or params.get("wait_end_of_query") == "1"

        def work() -> None:
            """On a worker: run the query, hand its encoded chunks over; its end or error last."""
            try:
                stream = self.store.stream(sql, fmt, database=stmt.database, settings=stmt.settings,
                                           parameters=parameters, whole=whole, readonly=readonly)
            except StoreError as exc:
                run.put(exc)
                return
            run.stream = stream
            try:
                # Small outputs are handed over together with the end: one wake-up of the loop per answer.
                pending: list[bytes] = []
                size = 0
                for chunk in stream:
                    out = encoder.feed(chunk)
                    if out:
                        pending.append(out)
                        size += len(out)
                    if size >= HANDOFF_BYTES:
                        if not run.put(b"".join(pending)):
                            stream.cancel()
                            return
                        pending, size = [], 0
                pending.append(encoder.finish())
                run.put((_END, stream.summary, b"".join(pending)))
            except StoreError as exc:
                run.put(exc)
            except Exception as exc:  # noqa: BLE001 - a bug here must end the answer, not hang it
                log.exception("server: SQL answer failed")
                run.put(StoreError(f"{type(exc).__name__}: {exc}", code=1002))
            finally:
                stream.close()

        try:
            fut = loop.run_in_executor(self._pool, work)
        except RuntimeError as exc:  # the pool is shutting down
            self._slots.release()
            return _error(SqlError(1002, f"server is stopping ({exc})"), 503, query_id=query_id)
        self._running[marker] = run
        self.metrics.sql_running.inc()

        def finished(_f: asyncio.Future) -> None:
            self._running.pop(marker, None)
            self.metrics.sql_running.dec()
            if not _f.cancelled():
                _f.exception()  # retrieved: a cancelled query's error is expected, not news
            assert self._slots is not None
            self._slots.release()  # the slot is free only when the engine is done with the query

        fut.add_done_callback(finished)
        deadline = loop.time() + float(stmt.settings["max_execution_time"]) + WATCHDOG_GRACE
        progress_every = _interval(params) if params.get("send_progress_in_http_headers") == "1" else 0.0
        progress: list[str] = []
        last_progress = 0.0
        killed = ""

        async def next_item() -> Any:
            """The worker's next item; None once the query was cancelled (client gone, time over)."""
            nonlocal killed, last_progress
            while True:
                if not run.queue.empty():
                    return run.queue.get_nowait()
                getter = loop.create_task(run.queue.get())
                done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL)
                if done:
                    return getter.result()
                getter.cancel()
                if progress_every and run.stream is not None and run.stream.progress \
                        and loop.time() - last_progress >= progress_every:
                    last_progress = loop.time()
                    progress.append(_progress_header(run.stream.progress))
                transport = request.transport
                if transport is None or transport.is_closing():
                    killed = "disconnected"
                elif loop.time() > deadline:
                    killed = "overran"
                if killed:
                    log.info("server: SQL query %s %s; cancelling it", query_id[:64],
                             "lost its client" if killed == "disconnected" else "outlived its time limit")
                    self.metrics.sql_queries.labels("cancelled").inc()
                    run.stop.set()
                    await asyncio.shield(asyncio.to_thread(self.store.cancel, marker))
                    return None

        async def send(write) -> None:
            """One write to the client, within the query's deadline: a client that stops reading mid-answer
            must not hold its worker past max_execution_time (+ WATCHDOG_GRACE), as ClickHouse's own
            time limit counts the time spent sending too."""
            nonlocal killed
            try:
                await asyncio.wait_for(write, max(0.001, deadline - loop.time()))
            except asyncio.TimeoutError:
                killed = "stalled"
                log.info("server: SQL query %s: its client stopped reading the answer past its time limit; "
                         "cancelling it", query_id[:64])
                self.metrics.sql_queries.labels("cancelled").inc()
                run.stop.set()
                await asyncio.shield(asyncio.to_thread(self.store.cancel, marker))
                if request.transport is not None:
                    request.transport.abort()
                raise ConnectionResetError("the client stopped reading") from None

        def progress_lines() -> list[str]:
            """The progress seen while the query ran; at least the latest, when the client asked for it."""
            stream = run.stream
            if progress_every and stream is not None:
                last = stream.progress or {**stream.summary}
                line = _progress_header(last)
                if not progress or progress[-1] != line:
                    progress.append(line)
            return progress

        resp: web.StreamResponse | None = None
        try:
            held: list[bytes] = []
            size = 0
            while True:
                item = await next_item()
                if item is None:
                    if resp is None and killed == "overran":
                        return _error(SqlError(159, "Timeout exceeded: the query outlived max_execution_time"),
                                      query_id=query_id)
                    raise ConnectionResetError("the client went away")
                if isinstance(item, StoreError):
                    self.metrics.sql_queries.labels("error").inc()
                    err = _store_error(item)
                    if resp is None:
                        return _error(err, query_id=query_id)
                    # Mid-answer: the status is sent; write the error and cut the connection short, so the
                    # client sees a broken answer (never a truncated one that looks whole).
                    await send(resp.write(b"\n" + err.body()))
                    if request.transport is not None:
                        request.transport.close()  # flushes what was written, then closes
                    return resp
                if isinstance(item, tuple) and item and item[0] is _END:
                    summary, tail = item[1], item[2]
                    self.metrics.sql_queries.labels("ok").inc()
                    if resp is not None and tail:
                        await send(resp.write(tail))
                    elif tail:
                        held.append(tail)
                    if resp is None:
                        headers = self._headers(fmt, query_id, summary, encoder, progress_lines())
                        return web.Response(body=b"".join(held), headers=headers)
                    await send(resp.write_eof())
                    return resp
                if resp is None:
                    held.append(item)
                    size += len(item)
                    if size < HEAD_BUFFER:
                        continue
                    stream = run.stream
                    summary = dict(stream.summary) if stream is not None else {}
                    if stream is not None and stream.progress:
                        summary.update({k: stream.progress.get(k, summary.get(k, 0))
                                        for k in ("read_rows", "read_bytes", "elapsed_ns")})
                    resp = web.StreamResponse(headers=self._headers(fmt, query_id, summary, encoder, progress_lines()))
                    resp.enable_chunked_encoding()
                    await send(resp.prepare(request))
                    for part in held:
                        await send(resp.write(part))
                    held.clear()
                    continue
                await send(resp.write(item))
        except (ConnectionError, asyncio.CancelledError):
            run.stop.set()
            if not fut.done():
                await asyncio.shield(asyncio.to_thread(self.store.cancel, marker))
            raise
        finally:
            run.stop.set()

    def _headers(self, fmt: str, query_id: str, summary: dict[str, int], encoder: encode.Encoder,
                 progress: list[str]) -> Any:
        from multidict import CIMultiDict

        headers: CIMultiDict[str] = CIMultiDict()
        headers["Content-Type"] = _CONTENT_TYPES.get(fmt.lower(), "text/plain; charset=UTF-8")
        headers["X-ClickHouse-Format"] = fmt
        headers["X-ClickHouse-Timezone"] = "UTC"
        headers["X-ClickHouse-Query-Id"] = query_id
        headers["X-ClickHouse-Server-Display-Name"] = "hdrlog"
        for line in progress:
            headers.add("X-ClickHouse-Progress", line)
        headers["X-ClickHouse-Summary"] = json.dumps({k: str(v) for k, v in summary.items()}, separators=(",", ":"))
        if encoder.content_encoding:
            headers["Content-Encoding"] = encoder.content_encoding
        return headers

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


def _interval(params: dict[str, str]) -> float:
    try:
        return max(0.01, float(params.get("http_headers_progress_interval_ms", PROGRESS_INTERVAL_MS)) / 1000)
    except ValueError:
        return PROGRESS_INTERVAL_MS / 1000


def _progress_header(progress: dict[str, int]) -> str:
    keys = ("read_rows", "read_bytes", "written_rows", "written_bytes", "total_rows_to_read", "result_rows",
            "result_bytes", "elapsed_ns")
    return json.dumps({k: str(progress.get(k, 0)) for k in keys}, separators=(",", ":"))
