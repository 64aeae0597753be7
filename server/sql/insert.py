"""INSERTs on the ClickHouse-compatible HTTP endpoint, for the write user (``--sql-write-user``).

A server that owns an embedded store can take the rows of other hdrlog servers
(``hdrlog server run --clickhouse http://WRITER:PASSWORD@THIS:PORT``): several
stateless servers in front of one store, through the very clickhouse-connect
code that talks to a real ClickHouse (docs/scale.md). Off unless a write user is
configured; that user is distinct from the read-only SQL user.

What the write user may do:

- ``INSERT INTO hdrlog.<table> [(col, ...)] FORMAT Arrow|ArrowStream|Native``
  and nothing else that writes: one statement, into an existing table of the
  ``hdrlog`` database whose engine is a MergeTree, or ``rollup_in`` (the Null table whose
  views fill the rollups; no views, no other database,
  no ``SELECT`` / ``VALUES`` / ``INFILE`` / ``SETTINGS`` clause in the text). The
  statement comes the two ways clickhouse-connect sends it: in the ``query`` URL
  parameter with the data as the body, or at the head of the body followed by a
  newline and the data.
- Settings: only those in ``INSERT_SETTINGS`` are passed on (URL parameters,
  as ClickHouse takes them); ``insert_deduplication_token`` among them, so a
  repeated insert stores nothing twice (the tables' deduplication window).
  Others are ignored, as the read path ignores unknown URL parameters.
- Everything else (``SELECT version()``, ``system.settings``, the stored-seq
  and schema reads a server makes at start) is a read and goes the read-only
  path with its guard and limits, exactly as for the SQL user.

Wiring (framework-neutral, so any HTTP front can mount it): the front
authenticates the request's head, and when ``is_writer(user, password)`` holds
it reads the body with ``MAX_INSERT_BYTES`` as its cap (instead of the query cap),
decodes its Content-Encoding, and calls ``split(url_query, body)``: a
``(statement, data)`` pair for an INSERT, else None (then it is a read, run as
usual). ``await run(statement, data, params)`` answers ``(status, body, headers)``
in ClickHouse's shape (errors as ``Code: N. DB::Exception: ...`` with
``X-ClickHouse-Exception-Code``, errors.py). The front is ``http.SqlEndpoint`` (aiohttp): it checks
the credentials on the head before any body byte is read, and gives the larger cap to the write user only.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import threading
import uuid
from typing import Any

from hdrlog.server import schema
from hdrlog.server.metrics import ServerMetrics
from hdrlog.server.sql.errors import SqlError, engine_name, tidy
from hdrlog.server.store import Store, StoreError

log = logging.getLogger("hdrlog.server")

MAX_INSERT_BYTES = 512 << 20  # one INSERT's body, decoded (a per-batch insert is a few MB)
FORMATS = {"arrow": "Arrow", "arrowstream": "ArrowStream", "native": "Native"}
# URL parameters passed on to the INSERT as settings; any other is ignored.
INSERT_SETTINGS = frozenset({
    "insert_deduplication_token", "insert_deduplicate", "deduplicate_blocks_in_dependent_materialized_views",
    "max_insert_block_size", "min_insert_block_size_rows", "min_insert_block_size_bytes",
    "input_format_arrow_skip_columns_with_unsupported_types_in_schema_inference", "input_format_null_as_default",
    "insert_null_as_default", "date_time_input_format", "max_partitions_per_insert_block",
    "cast_string_to_dynamic_use_inference",  # clickhouse-connect sets it (and date_time_input_format) on every request
})
# Null tables that take INSERTs all the same: rollup_in stages the server's rollups into their views
# (server/rollup.py), which another server sends here like any table's rows.
STAGING_TABLES = frozenset({"rollup_in"})
_IDENT = r"(?:`[A-Za-z_][A-Za-z0-9_]*`|[A-Za-z_][A-Za-z0-9_]*)"
_INSERT = re.compile(
    rf"^\s*INSERT\s+INTO\s+(?:TABLE\s+)?(?:(?P<db>{_IDENT})\s*\.\s*)?(?P<table>{_IDENT})\s*"
    rf"(?:\((?P<cols>\s*{_IDENT}(?:\s*,\s*{_IDENT})*\s*)\))?\s*FORMAT\s+(?P<fmt>[A-Za-z]+)[ \t]*(?:\r?\n|$)",
    re.IGNORECASE)
_HEAD = 64 * 1024  # how far into a body the statement may reach


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


def _bare(ident: str) -> str:
    return ident.strip("`")


def _answer_error(exc: SqlError, status: int) -> tuple[int, bytes, dict[str, str]]:
    return status, exc.body(), {"Content-Type": "text/plain; charset=UTF-8",
                                "X-ClickHouse-Exception-Code": str(exc.code)}


class InsertEndpoint:
    """The write user's INSERTs into the embedded store (see the module's docstring for the wiring)."""

    max_body_bytes = MAX_INSERT_BYTES

    def __init__(self, store: Store, metrics: ServerMetrics, credentials: tuple[str, str]):
        self.store = store
        self.metrics = metrics
        self.user = credentials[0]
        self._credentials = (_digest(credentials[0]), _digest(credentials[1]))
        self._tables: dict[str, str] = {}   # table -> engine, for the hdrlog tables that may take rows
        self._tables_lock = threading.Lock()

    def is_writer(self, user: str, password: str) -> bool:
        """Constant-time check of the write user's credentials."""
        user_ok = hmac.compare_digest(_digest(user), self._credentials[0])
        password_ok = hmac.compare_digest(_digest(password), self._credentials[1])
        return bool(user_ok & password_ok)

    @staticmethod
    def split(url_query: str, body: bytes) -> tuple[str, bytes] | None:
        """(INSERT statement, data) when the request is an INSERT, else None (a read).

        The statement is the ``query`` URL parameter with the body as data, or the head of the body up to the
        newline after its FORMAT name (ClickHouse's HTTP interface concatenates the two)."""
        if url_query.strip():
            if re.match(r"\s*INSERT\b", url_query, re.IGNORECASE):
                return url_query, body
            return None
        head = body[:_HEAD].decode("latin-1")
        if not re.match(r"\s*INSERT\b", head, re.IGNORECASE):
            return None
        m = _INSERT.match(head)
        if m is None:
            return head.split("\n", 1)[0], b""  # refused by run() with the reason
        return head[:m.end()], body[m.end():]

    def _allowed_tables(self) -> dict[str, str]:
        with self._tables_lock:
            if not self._tables:
                rows = self.store.query_rows(
                    "SELECT name, engine FROM system.tables WHERE database = {d:String}", {"d": schema.DATABASE})
                self._tables = {str(n): str(e) for n, e in rows
                                if (str(e).endswith("MergeTree") or str(n) in STAGING_TABLES)
                                and str(n) != "schema_version"}
            return self._tables

    def _check(self, statement: str, params: dict[str, str]) -> tuple[str, list[str] | None, str]:
        m = _INSERT.match(statement.rstrip() + "\n")
        if m is None:
            raise SqlError(62, "only INSERT INTO hdrlog.<table> [(columns)] FORMAT Arrow|ArrowStream|Native "
                                  "may be sent by the write user (one statement, data in the body)", "SYNTAX_ERROR")
        database = _bare(m.group("db")) if m.group("db") else params.get("database") or "default"
        table = _bare(m.group("table"))
        if database != schema.DATABASE:
            raise SqlError(164, f"the write user inserts into {schema.DATABASE}.* only, not {database}.{table}",
                              "READONLY")
        fmt = FORMATS.get(m.group("fmt").lower())
        if fmt is None:
            raise SqlError(73, f"format {m.group('fmt')} is not taken here: send Arrow, ArrowStream or Native",
                              "UNKNOWN_FORMAT")
        try:
            tables = self._allowed_tables()
        except StoreError as exc:
            raise SqlError(exc.code or 1000, tidy(str(exc)), exc.name or engine_name(str(exc))) from None
        if table not in tables:
            raise SqlError(60, f"table {schema.DATABASE}.{table} does not exist or takes no INSERTs here "
                                  f"(tables that do: {', '.join(sorted(tables))})", "UNKNOWN_TABLE")
        cols = [_bare(c.strip()) for c in m.group("cols").split(",")] if m.group("cols") else None
        return table, cols, fmt

    async def run(self, statement: str, data: bytes, params: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        """Check and run one INSERT; ClickHouse's answer shape."""
        query_id = params.get("query_id") or str(uuid.uuid4())
        try:
            table, cols, fmt = await asyncio.to_thread(self._check, statement, params)
        except SqlError as exc:
            self.metrics.sql_inserts.labels("refused").inc()
            status = 403 if exc.code == 164 else 404 if exc.code == 60 else 400
            return _answer_error(exc, status)
        settings = {k: v for k, v in params.items() if k in INSERT_SETTINGS}
        try:
            written = await asyncio.to_thread(self.store.raw_insert, table, cols, data, fmt, settings)
        except StoreError as exc:
            self.metrics.sql_inserts.labels("error").inc()
            status = 400 if exc.permanent else 500
            return _answer_error(SqlError(exc.code or 1000, tidy(str(exc)), exc.name or engine_name(str(exc))), status)
        self.metrics.sql_inserts.labels("ok").inc()
        self.metrics.sql_inserted_rows.labels(table).inc(written)
        summary: dict[str, Any] = {"written_rows": str(written), "written_bytes": str(len(data))}
        return 200, b"", {"Content-Type": "text/plain; charset=UTF-8", "X-ClickHouse-Query-Id": query_id,
                          "X-ClickHouse-Summary": json.dumps(summary), "X-ClickHouse-Server-Display-Name": "hdrlog"}
