"""The store: every ClickHouse access of the server, through clickhouse-connect.

``Store(url)`` is inert; ``open()`` connects (embedded chDB for ``chdb:///PATH``,
a ClickHouse server for ``http(s)://...``), ``migrate()`` applies the schema,
``insert()`` writes one Arrow table, ``committed_watermarks()`` reads which
batch seqs are durably stored per collector (for exactly-once, see ``writer.py``) and
``query()`` runs one read-only statement for the SQL endpoint.

All methods block; the asyncio side calls them in threads. The writer uses one
client (one chDB connection handle, serialized by its own lock); each SQL
worker thread gets its own read-only client (a separate chDB handle with
``readonly = 1``, which chDB runs concurrently with the writer's inserts), so a
slow SELECT never holds up an insert.

``Store(url, server_memory_bytes=N)`` starts the embedded engine with
``max_server_memory_usage = N`` (a startup argument of chDB's engine, given on
the first connection; every handle shares the one engine and its limit).
``sql_settings`` are SET on each SQL handle before ``readonly = 1``: the
limits a query gets when it names none (it may name lower ones, see sql.limits.Limits). ``cancel(marker)`` kills the running
SQL-endpoint queries whose text starts with ``marker`` (``KILL QUERY`` on a
separate control handle; chDB runs it concurrently with the query).
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import time
import threading
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlparse

import pyarrow as pa

import clickhouse_connect
from clickhouse_connect.driver.exceptions import ClickHouseError, OperationalError

from hdrlog.server import schema
from hdrlog.clickhouse import engine_messages_logged, error_code, redact
from hdrlog.clickhouse import one_line as short_message
from hdrlog.server.cluster import Layout
from hdrlog.server.sql.errors import engine_name as errors_name

log = logging.getLogger("hdrlog.server")

# rollup_log's state of a summary row: the (collector_id, seq, day)s of pruned intents (prune_rollup_log).
JOURNAL_SUMMARY = 3
PARAMETER_SLICE = 50  # list items per query parameter of the journal's reads (see rollup_groups)

# ClickHouse error codes that mean "this data can never be inserted as it is":
# retrying cannot help, so the batch is rejected with the reason (Vector's rule).
PERMANENT_CODES = frozenset({
    6,    # CANNOT_PARSE_TEXT
    16,   # NO_SUCH_COLUMN_IN_TABLE
    27,   # CANNOT_PARSE_INPUT_ASSERTION_FAILED
    33,   # CANNOT_READ_ALL_DATA
    43,   # ILLEGAL_TYPE_OF_ARGUMENT
    44,   # ILLEGAL_COLUMN
    53,   # TYPE_MISMATCH
    69,   # ARGUMENT_OUT_OF_BOUND
    70,   # CANNOT_CONVERT_TYPE
    72,   # CANNOT_PARSE_NUMBER
    117,  # INCORRECT_DATA
    131,  # TOO_LARGE_STRING_SIZE
    190,  # SIZES_OF_ARRAYS_DONT_MATCH
    321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    349,  # CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
})


class StoreError(Exception):
    """An insert or query failed. ``permanent`` is True when retrying cannot help."""

    def __init__(self, message: str, *, code: int = 0, permanent: bool = False, name: str = ""):
        super().__init__(message)
        self.code = code
        self.permanent = permanent
        self.name = name  # the engine's name for the code ("UNKNOWN_TABLE"), when its message gave one


def _as_text(value: Any) -> str:
    """A setting's value compared as ClickHouse would read it: 60 == 60.0 == '60'."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return repr(int(number)) if number.is_integer() else repr(number)


def quote_value(value: str) -> str:
    """A setting's value as a SQL string literal (ClickHouse converts it to the setting's type)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def classify(exc: BaseException) -> StoreError:
    """Decide in one place whether a failure is retried (transient) or not (permanent)."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, (pa.ArrowException, TypeError, ValueError)) and not isinstance(exc, ClickHouseError):
        return StoreError(f"{type(exc).__name__}: {exc}", permanent=True)
    code = error_code(exc)
    if isinstance(exc, OperationalError):
        return StoreError(short_message(exc), code=code, permanent=False)
    return StoreError(short_message(exc), code=code, permanent=code in PERMANENT_CODES)


class StoredSeqs:
    """The set of batch_seqs with rows stored, as sorted disjoint inclusive ranges [lo, hi].

    A collector's seqs are nearly dense, so this is one range per key in the normal case; each
    hole (a batch dropped from a full spool, a flush not stored yet) costs one more range.
    """

    __slots__ = ("los", "his")

    def __init__(self, ranges: list[tuple[int, int]] | None = None):
        self.los: list[int] = []
        self.his: list[int] = []
        for lo, hi in sorted(ranges or []):
            if self.his and lo <= self.his[-1] + 1:
                self.his[-1] = max(self.his[-1], hi)
            else:
                self.los.append(lo)
                self.his.append(hi)

    def __contains__(self, seq: int) -> bool:
        i = bisect.bisect_right(self.los, seq) - 1
        return i >= 0 and seq <= self.his[i]

    def add(self, seq: int) -> None:
        i = bisect.bisect_right(self.los, seq) - 1
        if i >= 0 and seq <= self.his[i]:
            return
        joins_left = i >= 0 and self.his[i] == seq - 1
        joins_right = i + 1 < len(self.los) and self.los[i + 1] == seq + 1
        if joins_left and joins_right:
            self.his[i] = self.his[i + 1]
            del self.los[i + 1], self.his[i + 1]
        elif joins_left:
            self.his[i] = seq
        elif joins_right:
            self.los[i + 1] = seq
        else:
            self.los.insert(i + 1, seq)
            self.his.insert(i + 1, seq)

    @property
    def max(self) -> int:
        return self.his[-1] if self.his else -1

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self.los, self.his))

    def __repr__(self) -> str:
        return f"StoredSeqs({self.ranges()})"


def _runs(seqs: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct seqs -> ranges of consecutive ones."""
    out: list[tuple[int, int]] = []
    for x in seqs:
        if out and x == out[-1][1] + 1:
            out[-1] = (out[-1][0], x)
        else:
            out.append((x, x))
    return out


@dataclass
class Watermarks:
    """The batch_seqs durably stored, per (collector_id, table) and UTC day (toDate of the time column)."""

    by_key: dict[tuple[str, str], dict[int, StoredSeqs]]


def _local_conn(client: Any) -> Any:
    """The chDB connection under a clickhouse-connect chDB client, or None (another client or version)."""
    handle = getattr(getattr(client, "_backend", None), "_handle", None)
    conn = getattr(handle, "conn", None)
    return conn if conn is not None and hasattr(conn, "query") and hasattr(handle, "lock") else None


def _insert_local(client: Any, table: str, data: pa.Table, settings: Mapping[str, Any]) -> None:
    """INSERT an Arrow table into the embedded engine through chDB's ``Python()`` table function,
    which reads the Arrow buffers in-process.

    clickhouse-connect's chDB backend serializes every ``insert_arrow`` to an Arrow IPC temporary
    file and runs ``INSERT ... FROM INFILE`` (measured: the serialization and the file were 7-10% and
    7-9% of the server's time). This is the same engine, same settings and same deduplication, on
    the client's own chDB handle and under its lock (one call at a time per handle). The remote
    path (``http(s)://``) keeps ``insert_arrow``. ``Python(hdrlog_rows)`` names this frame's local:
    chDB resolves it off the calling frame, so concurrent calls on other threads see their own."""
    handle = client._backend._handle  # noqa: SLF001 - chDB-only, checked by _local_conn
    hdrlog_rows = data  # noqa: F841 - read by the engine through Python(hdrlog_rows)
    columns = ", ".join(f"`{name}`" for name in data.column_names)
    clause = ", ".join(f"{k} = {_setting_literal(v)}" for k, v in settings.items())
    sql = f"INSERT INTO {table} ({columns}) SELECT * FROM Python(hdrlog_rows) SETTINGS {clause}"
    with handle.lock:
        try:
            handle.conn.query(sql, "TabSeparated")
        except Exception as exc:  # noqa: BLE001 - the client's own mapping to ClickHouse errors
            raise client._backend._wrap_exception(exc) from None  # noqa: SLF001


def _setting_literal(value: Any) -> str:
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


class Store:
    def __init__(self, url: str, *, server_memory_bytes: int = 0, sql_settings: Mapping[str, Any] | None = None,
                 cluster: str = "", cluster_rehearsal: bool = False):
        self.url = url
        # --cluster NAME: replicated local tables behind Distributed ones (server/cluster.py)
        self.layout = Layout(cluster, rehearsal=cluster_rehearsal) if cluster else None
        self.embedded = url.startswith("chdb:")
        self.server_memory_bytes = server_memory_bytes
        self.sql_settings = dict(sql_settings or {})
        self._control: Any = None
        self._rollup_client: Any = None  # the rollup worker's own handle (writer.py)
        self._control_lock = threading.Lock()
        self._client: Any = None
        self._local = threading.local()
        self._readers: list[Any] = []
        self._readers_lock = threading.Lock()
        self._known_settings: frozenset[str] | None = None
        self._ingress: Any = None   # the SQL endpoint's write user's handle (raw_insert)
        self._ingress_lock = threading.Lock()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------

    def _connect(self, engine_options: Mapping[str, str] | None = None) -> Any:
        if self.embedded:
            path = urlparse(self.url).path
            if path:
                import os
                os.makedirs(path, exist_ok=True)
            if engine_options:
                return clickhouse_connect.get_client(dsn=self.url, chdb_options=dict(engine_options))
            return clickhouse_connect.get_client(dsn=self.url)
        return clickhouse_connect.get_client(dsn=self.url)

    def open(self) -> None:
        # The first connection starts the embedded engine: its startup arguments hold for every handle.
        options = {"max_server_memory_usage": str(self.server_memory_bytes)} \
            if self.embedded and self.server_memory_bytes else None
        try:
            with engine_messages_logged():
                self._client = self._connect(options)
        except Exception as exc:  # noqa: BLE001 - one clear line for the operator
            raise StoreError(f"unable to open ClickHouse at {redact(self.url)}: {short_message(exc)}") from None

    def migrate(self) -> list[int]:
        try:
            return schema.migrate(self._ddl())
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"unable to apply the schema: {short_message(exc)}") from None

    def apply_ttl(self, days: dict[str, int]) -> list[str]:
        """Set each table's age limit (schema.apply_ttl); returns the tables changed."""
        try:
            return schema.apply_ttl(self._ddl(), days)
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"unable to set the tables' TTL: {short_message(exc)}") from None

    def _ddl(self) -> Any:
        """The client's command(), in the cluster's form of each statement with --cluster."""
        return self.layout.wrap(self._client.command) if self.layout is not None else self._client.command

    def new_client(self) -> Any:
        """A separate client that may write (its own chDB handle): for the scheduled reports."""
        if self._closed:
            raise StoreError("store is closed")
        return self._connect()

    def close(self) -> None:
        self._closed = True
        with self._readers_lock:
            readers, self._readers = self._readers, []
        with self._control_lock:
            control, self._control = self._control, None
            rollup_client, self._rollup_client = self._rollup_client, None
        for extra in (control, rollup_client):
            if extra is not None:
                readers.append(extra)
        with self._ingress_lock:
            ingress, self._ingress = self._ingress, None
        if ingress is not None:
            readers.append(ingress)
        for client in readers:
            try:
                client.close()
            except Exception:  # noqa: BLE001
                log.debug("closing a SQL client failed", exc_info=True)
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None

    # -- ingest ------------------------------------------------------------

    def insert(self, table: str, data: pa.Table, token: str) -> int:
        """Insert one Arrow table into hdrlog.<table> as one block per partition.

        ``token`` is passed as ``insert_deduplication_token``: repeating the
        same insert (a retry after an ambiguous failure) stores nothing twice.
        """
        return self._insert(self._client, table, data, token)

    def _insert(self, client: Any, table: str, data: pa.Table, token: str) -> int:
        if client is None:
            raise StoreError("store is closed")
        rows = data.num_rows
        settings = {
            "insert_deduplication_token": token,
            "insert_deduplicate": 1,
            # Synchronous: the Ack promises the rows are stored, and chDB defaults to async_insert = 1
            # (whose deduplication is off unless async_insert_deduplicate).
            "async_insert": 0,
            # One block per partition: keep the whole flush in one part so it is atomic.
            "max_insert_block_size": max(rows, 1_048_449),
        }
        if self.embedded:
            # In-process (``_insert_local``): the source hands over Arrow chunks of its own size, so
            # they are squashed into one block of all the rows (emitted at ``rows``, never on bytes).
            settings.update(min_insert_block_size_rows=max(rows, 1), min_insert_block_size_bytes=1 << 62,
                            max_block_size=max(rows, 65_409))
        else:
            # A Native body of one block: no squashing needed.
            settings.update(min_insert_block_size_rows=0, min_insert_block_size_bytes=0)
        if self.layout is not None:  # into a Distributed table: return once the shard has stored the rows
            settings["distributed_foreground_insert"] = 1
        local = self.embedded and _local_conn(client) is not None
        # One Arrow record batch, whichever path: with no squashing every record batch is a block of
        # its own, so a table of N chunks became N parts per table it reaches (a rollup INSERT of 8
        # flushes' chunks made 24 parts across the three rollup tables, ~5x its cost). And the
        # deduplication token of a block squashed from several chunks is not that of the same rows
        # in one chunk (measured: the rollup views' targets then stored a repeat twice), while the
        # same rows come back chunked differently (a recovery, another server, the other path).
        if any(col.num_chunks > 1 for col in data.columns):
            data = data.combine_chunks()
        try:
            if local:
                _insert_local(client, f"{schema.DATABASE}.{table}", data, settings)
            else:
                client.insert_arrow(f"{schema.DATABASE}.{table}", data, settings=settings)
        except Exception as exc:  # noqa: BLE001
            raise classify(exc) from None
        return rows

    def _ingress_client(self) -> Any:
        if self._ingress is None:
            if self._closed:
                raise StoreError("store is closed")
            self._ingress = self._connect()
        return self._ingress

    def raw_insert(self, table: str, columns: list[str] | None, data: bytes, fmt: str,
                   settings: Mapping[str, str]) -> int:
        """Insert ``data`` (Arrow / ArrowStream / Native bytes) into hdrlog.<table>, for the SQL endpoint's write
        user (sql/insert.py), on a handle of its own; returns the rows written (0 when deduplicated)."""
        with self._ingress_lock:
            try:
                summary = self._ingress_client().raw_insert(f"{schema.DATABASE}.{table}", columns, data,
                                                            dict(settings), fmt)
            except Exception as exc:  # noqa: BLE001
                raise classify(exc) from None
        return int(getattr(summary, "written_rows", 0) or 0)

    def query_rows(self, sql: str, parameters: Mapping[str, Any] | None = None) -> list[tuple]:
        """A catalogue read for the write path (the tables that take INSERTs), on the write user's handle."""
        with self._ingress_lock:
            try:
                return list(self._ingress_client().query(sql, parameters=dict(parameters or {})).result_rows)
            except Exception as exc:  # noqa: BLE001
                raise StoreError(short_message(exc), code=error_code(exc)) from None

    def insert_rollup(self, data: pa.Table, token: str) -> None:
        """Rollup rows (server/rollup.py) into rollup_in, on the rollup handle (concurrent with the
        next flush's packets INSERT). Never a permanent failure: the server made these rows."""
        try:
            self._insert(self._rollup_handle(), "rollup_in", data, token)
        except StoreError as exc:
            raise StoreError(str(exc), code=exc.code, permanent=False) from None

    def _rollup_handle(self) -> Any:
        if self._closed:
            raise StoreError("store is closed")
        with self._control_lock:
            if self._rollup_client is None:
                self._rollup_client = self._connect()
            return self._rollup_client

    def log_rollup(self, token: str, state: int, batches: list[tuple[str, int, int]], *,
                   rollup: bool = False, members: list[str] | None = None) -> None:
        """One journal row of the rollups (rollup_log): a flush's intent (state 0, with its
        (collector_id, seq, day) list), its end (state 1), or a group of flushes rolled up in one
        INSERT (state 2, ``members``). Never a permanent failure: the server wrote it, so the
        retry decides (writer.py)."""
        self._log_rows([(token, state, batches, members or [])], f"{token}-log{state}", rollup)

    def _journal_client(self, rollup: bool) -> Any:
        """The rollup worker's handle (``rollup``: a remote session takes one query at a time) or the main one."""
        if rollup:
            return self._rollup_handle()
        if self._client is None:
            raise StoreError("store is closed")
        return self._client

    def log_rollups(self, intents: list[tuple[str, list[tuple[str, int, int]]]]) -> None:
        """The intents (state 0) of several flushes or batches, in one journal INSERT."""
        name = intents[0][0] if len(intents) == 1 else \
            "hdrlog-i-" + hashlib.sha256("|".join(sorted(t for t, _ in intents)).encode()).hexdigest()[:40]
        self._log_rows([(t, 0, batches, []) for t, batches in intents], f"{name}-log0", False)

    def end_rollups(self, tokens: list[str]) -> None:
        """The journal's end of these flushes, in one INSERT (all of them or none)."""
        name = tokens[0] if len(tokens) == 1 else \
            "hdrlog-e-" + hashlib.sha256("|".join(sorted(tokens)).encode()).hexdigest()[:40]
        self._log_rows([(t, 1, [], []) for t in tokens], f"{name}-log1", True)

    def _log_rows(self, rows: list[tuple[str, int, list[tuple[str, int, int]], list[str]]], dedup: str,
                  rollup: bool) -> None:
        if self._client is None:
            raise StoreError("store is closed")
        data = pa.table({"token": pa.array([r[0] for r in rows], pa.string()),
                         "state": pa.array([r[1] for r in rows], pa.uint8()),
                         "collector_ids": pa.array([[b[0] for b in r[2]] for r in rows], pa.list_(pa.string())),
                         "seqs": pa.array([[b[1] for b in r[2]] for r in rows], pa.list_(pa.uint64())),
                         "days": pa.array([[b[2] for b in r[2]] for r in rows], pa.list_(pa.uint32())),
                         "members": pa.array([r[3] for r in rows], pa.list_(pa.string()))})
        client = self._rollup_handle() if rollup else self._client
        settings = {"insert_deduplication_token": dedup, "insert_deduplicate": 1, "async_insert": 0}
        try:
            if self.embedded and _local_conn(client) is not None:
                _insert_local(client, f"{schema.DATABASE}.rollup_log", data, settings)
            else:
                client.insert_arrow(f"{schema.DATABASE}.rollup_log", data, settings=settings)
        except Exception as exc:  # noqa: BLE001
            err = classify(exc)
            raise StoreError(str(err), code=err.code, permanent=False) from None

    def rollup_groups(self, tokens: list[str], *, rollup: bool = False) -> list[tuple[str, list[str]]]:
        """The journaled groups (state 2) with a member among ``tokens``: (group token, members)."""
        if not tokens:
            return []
        found: dict[str, list[str]] = {}
        # In slices: measured, ~100 tokens as one query parameter through the SQL endpoint's HTTP
        # interface came back as a syntax error (a restarted server with many open journal entries
        # then failed to start; tests/test_scaleout.py).
        for i in range(0, len(tokens), PARAMETER_SLICE):
            try:
                rows = self._journal_client(rollup).query(
                    f"SELECT token, any(members) FROM {schema.DATABASE}.rollup_log WHERE state = 2 "
                    "AND hasAny(members, {t:Array(String)}) GROUP BY token ORDER BY token",
                    parameters={"t": tokens[i:i + PARAMETER_SLICE]}).result_rows
            except Exception as exc:  # noqa: BLE001
                raise StoreError(f"unable to read the rollup journal: {short_message(exc)}") from None
            for g, members in rows:
                found[str(g)] = [str(m) for m in members]
        return sorted(found.items())

    def unfinished_rollups(self, *, rollup: bool = False,
                           since: int = 0) -> list[tuple[str, list[tuple[str, int, int]], int]]:
        """Flushes (or batches) whose intent is journaled but not their end:
        (token, [(collector_id, seq, day)], seconds since the last intent was journaled).

        ``since`` > 0: only tokens with an intent journaled in the last ``since`` seconds (a shared
        store's sweep, every few seconds: its cost follows the journal's recent rows, found by the
        minmax index on ``at``, not its age). Their ends are looked up whatever their age (by the
        primary key): an end older than the window still closes a repeated intent."""
        recent = (f"AND token IN (SELECT token FROM {schema.DATABASE}.rollup_log WHERE state = 0 "
                  f"AND at >= now() - INTERVAL {int(since)} SECOND) ") if since > 0 else ""
        try:
            rows = self._journal_client(rollup).query(
                f"SELECT token, anyIf(collector_ids, state = 0), anyIf(seqs, state = 0), anyIf(days, state = 0), "
                "toInt64(dateDiff('second', maxIf(at, state = 0), now())) "
                f"FROM {schema.DATABASE}.rollup_log WHERE state IN (0, 1) {recent}"
                "GROUP BY token HAVING countIf(state = 1) = 0 ORDER BY token").result_rows
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"unable to read the rollup journal: {short_message(exc)}") from None
        return [(str(t), [(str(c), int(q), int(d)) for c, q, d in zip(ids, seqs, days)], int(age))
                for t, ids, seqs, days, age in rows]

    def stored_packets(self, batches: list[tuple[str, int, int]], columns: tuple[str, ...], *,
                       rollup: bool = False) -> pa.Table:
        """The stored packets rows of the given (collector_id, seq, day)s, as Arrow (the rollups' recovery)."""
        if not batches:
            return pa.table({})
        parts = []
        for i in range(0, len(batches), PARAMETER_SLICE):  # in slices, as in rollup_groups
            try:
                parts.append(self._journal_client(rollup).query_arrow(
                    f"SELECT {', '.join(columns)} FROM {schema.DATABASE}.packets "
                    "WHERE (collector_id, batch_seq, toUInt32(toDate(ts))) IN {keys:Array(Tuple(String, UInt64, UInt32))}",
                    parameters={"keys": batches[i:i + PARAMETER_SLICE]}))
            except Exception as exc:  # noqa: BLE001
                raise StoreError(f"unable to read packets back for the rollups: {short_message(exc)}") from None
        parts = [p for p in parts if p.num_rows] or parts[:1]
        return parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="permissive")

    def unjournaled_packets(self) -> list[tuple[str, int, int]]:
        """The (collector_id, seq, day)s with packets rows stored that no rollup journal intent names
        (state 0, or the summary of pruned intents, state 3: ``prune_rollup_log``): stored batches
        whose rollup was never journaled (writer.py, "Rollups"). One scan of packets'
        (collector_id, batch_seq, ts) and of the journal, as roaring bitmaps per (collector_id,
        day); only the differences come back."""
        try:
            rows = self._client.query(
                "SELECT p.c, p.d, bitmapToArray(bitmapAndnot(p.b, j.b)) FROM "
                "(SELECT collector_id AS c, toUInt32(toDate(ts)) AS d, groupBitmapState(batch_seq) AS b "
                f"FROM {schema.DATABASE}.packets GROUP BY c, d) AS p "
                "LEFT JOIN (SELECT c, d, groupBitmapState(s) AS b "
                f"FROM {schema.DATABASE}.rollup_log ARRAY JOIN collector_ids AS c, seqs AS s, days AS d "
                f"WHERE state IN (0, {JOURNAL_SUMMARY}) GROUP BY c, d) AS j ON p.c = j.c AND p.d = j.d "
                "WHERE bitmapAndnotCardinality(p.b, j.b) > 0 ORDER BY p.c, p.d").result_rows
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"unable to read the rollup journal: {short_message(exc)}") from None
        return [(str(c), int(q), int(d)) for c, d, seqs in rows for q in seqs]

    def prune_rollup_log(self, keep: int, *, rollup: bool = False, wait: bool = False) -> int:
        """Drop the rollup journal's entries that no recovery can need any more (writer.py, "The journal's
        retention"): the rows of every token that has an end and whose rows are all older than ``keep``
        seconds, and the group rows (state 2) as old whose members have no intent left. Their intents'
        (collector_id, seq, day)s are first written as summary rows (state 3, one per collector and day),
        which ``unjournaled_packets`` reads as intents: a pruned batch is never taken for an unjournaled one.

        Three statements, each safe alone (a crash in between leaves rows for the next prune, never an
        open-looking intent): (1) the summary, (2) the intents deleted, (3) the ends without an intent
        and the groups without members' intents deleted. A token can only leave the set of (1), never
        join it (a row journaled later is younger than the cutoff), so (2) deletes no intent that (1) did
        not summarize, however ClickHouse evaluates its subquery while it mutates. (2) and (3) are
        mutations (``wait``: until done, else they run on in the background, in order; ends whose intents
        were still there when (3) ran go at the next prune). (3) also drops the summary rows of days
        that packets has no part of any more (its TTL). Returns the summary rows written."""
        db = schema.DATABASE
        client = self._journal_client(rollup)
        try:
            cutoff = int(client.command(f"SELECT toUInt32(now()) - {int(keep)}"))
            before = f"toDateTime({cutoff}, 'UTC')"
            settled = (f"SELECT token FROM {db}.rollup_log WHERE state IN (0, 1) GROUP BY token "
                       f"HAVING countIf(state = 1) > 0 AND max(at) < {before}")
            n = int(client.query(
                f"SELECT uniqExact(c, d) FROM {db}.rollup_log ARRAY JOIN collector_ids AS c, days AS d "
                f"WHERE state = 0 AND token IN ({settled})").result_rows[0][0])
            if n:
                client.command(
                    f"INSERT INTO {db}.rollup_log (token, state, collector_ids, seqs, days, members) "
                    f"SELECT concat('hdrlog-s-', hex(cityHash64(c, d, {cutoff}))), {JOURNAL_SUMMARY}, "
                    "arrayMap(x -> c, s), s, arrayMap(x -> d, s), [] "
                    f"FROM (SELECT c, d, arraySort(groupUniqArray(q)) AS s FROM {db}.rollup_log "
                    "ARRAY JOIN collector_ids AS c, seqs AS q, days AS d "
                    f"WHERE state = 0 AND token IN ({settled}) GROUP BY c, d)",
                    settings={"insert_deduplicate": 0, "distributed_foreground_insert": 1})
            sync = {"mutations_sync": 2 if wait else 0, "allow_nondeterministic_mutations": 1}
            ddl = self.layout.wrap(lambda sql: client.command(sql, settings=sync)) if self.layout else \
                (lambda sql: client.command(sql, settings=sync))
            # Each mutation only when it has rows to delete (a mutation is queued and run part by part).
            a = f"state = 0 AND token IN ({settled})"
            if int(client.command(f"SELECT count() FROM {db}.rollup_log WHERE {a}")):
                ddl(f"ALTER TABLE {db}.rollup_log DELETE WHERE {a}")
            intents = f"SELECT token FROM {db}.rollup_log WHERE state = 0"
            # Summary rows of days that packets holds no part of any more (its TTL dropped them): no batch
            # of theirs is stored, so none can be taken for an unjournaled one.
            parts, packets = (f"clusterAllReplicas({self.layout.cluster}, system.parts)", "packets_local") \
                if self.layout else ("system.parts", "packets")
            b = (f"(at < {before} AND ((state = 1 AND token NOT IN ({intents})) OR (state = 2 AND token IN ("
                 f"SELECT token FROM {db}.rollup_log ARRAY JOIN members AS m WHERE state = 2 GROUP BY token "
                 f"HAVING countIf(m IN ({intents})) = 0)))) OR (state = {JOURNAL_SUMMARY} AND NOT hasAny(days, "
                 f"(SELECT groupUniqArray(toUInt32(toDate(partition))) FROM {parts} "
                 f"WHERE database = '{db}' AND table = '{packets}' AND active)))")
            if int(client.command(f"SELECT count() FROM {db}.rollup_log WHERE {b}")):
                ddl(f"ALTER TABLE {db}.rollup_log DELETE WHERE {b}")
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"unable to prune the rollup journal: {short_message(exc)}") from None
        return n

    def committed_watermarks(self) -> Watermarks:
        """Which batch_seqs have rows stored, per (collector_id, table, day), read from the tables.

        One scan per table gives min, max and the number of distinct seqs per key (a roaring
        bitmap: seqs are dense integers); where max - min + 1 equals that number the key is one
        range, the normal case. Only for the keys with holes are their distinct seqs fetched.
        """
        out: dict[tuple[str, str], dict[int, StoredSeqs]] = {}
        for table, ts in schema.PARTITION_TS.items():
            day = f"toUInt32(toDate({ts}))"
            try:
                rows = self._client.query(
                    f"SELECT collector_id, {day} AS day, min(batch_seq), max(batch_seq), groupBitmap(batch_seq) "
                    f"FROM {schema.DATABASE}.{table} GROUP BY collector_id, day").result_rows
                holey = sorted({str(r[0]) for r in rows if int(r[3]) - int(r[2]) + 1 != int(r[4])})
                detail = self._client.query(
                    f"SELECT collector_id, {day} AS day, arraySort(groupUniqArray(batch_seq)) "
                    f"FROM {schema.DATABASE}.{table} WHERE collector_id IN {{ids:Array(String)}} "
                    "GROUP BY collector_id, day", parameters={"ids": holey}).result_rows if holey else []
            except Exception as exc:  # noqa: BLE001
                raise StoreError(f"unable to read the stored seqs from {table}: {short_message(exc)}") from None
            for collector_id, d, lo, hi, n in rows:
                if int(hi) - int(lo) + 1 == int(n):
                    out.setdefault((str(collector_id), table), {})[int(d)] = StoredSeqs([(int(lo), int(hi))])
            for collector_id, d, seqs in detail:
                marks = out.setdefault((str(collector_id), table), {})
                if int(d) not in marks:
                    marks[int(d)] = StoredSeqs(_runs([int(x) for x in seqs]))
        return Watermarks(out)

    def stored_seqs(self, collector_id: str, host: str, since: int) -> dict[str, dict[int, StoredSeqs]]:
        """The batch_seqs >= ``since`` that have rows stored for one collector, per table and day.

        What another server may have stored since this one last looked (several servers in front of one
        ClickHouse). ``host`` is the primary key's prefix, so only that host's granules are read; the same
        min / max / distinct count per key as ``committed_watermarks``, the seqs themselves only where a
        key has holes. One query for all tables.
        """
        parts = []
        for table, ts in schema.PARTITION_TS.items():
            parts.append(
                f"SELECT '{table}' AS t, toUInt32(toDate({ts})) AS day, min(batch_seq) AS lo, max(batch_seq) AS hi, "
                f"groupBitmap(batch_seq) AS n FROM {schema.DATABASE}.{table} "
                "WHERE host = {h:String} AND collector_id = {c:String} AND batch_seq >= {s:UInt64} GROUP BY day")
        params = {"h": host, "c": collector_id, "s": int(since)}
        out: dict[str, dict[int, StoredSeqs]] = {}
        try:
            rows = self._client.query(" UNION ALL ".join(parts), parameters=params).result_rows
            holey = {(str(t), int(d)) for t, d, lo, hi, n in rows if int(hi) - int(lo) + 1 != int(n)}
            for t, d, lo, hi, n in rows:
                if (str(t), int(d)) not in holey:
                    out.setdefault(str(t), {})[int(d)] = StoredSeqs([(int(lo), int(hi))])
            for table in sorted({t for t, _ in holey}):
                ts = schema.PARTITION_TS[table]
                detail = self._client.query(
                    f"SELECT toUInt32(toDate({ts})) AS day, arraySort(groupUniqArray(batch_seq)) "
                    f"FROM {schema.DATABASE}.{table} "
                    "WHERE host = {h:String} AND collector_id = {c:String} AND batch_seq >= {s:UInt64} GROUP BY day",
                    parameters=params).result_rows
                for d, seqs in detail:
                    if (table, int(d)) in holey:
                        out.setdefault(table, {})[int(d)] = StoredSeqs(_runs([int(x) for x in seqs]))
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"unable to read the stored seqs of {collector_id}: {short_message(exc)}") from None
        return out

    def count(self, table: str, where: str = "1") -> int:
        return int(self._client.command(f"SELECT count() FROM {schema.DATABASE}.{table} WHERE {where}"))

    # -- SQL endpoint (worker threads) ---------------------------------------

    def _reader(self, level: int = 1) -> Any:
        attr = "client" if level == 1 else f"client{level}"
        client = getattr(self._local, attr, None)
        if client is None:
            if self._closed:
                raise StoreError("store is closed")
            client = self._read_only(self._connect(), {}, level)
            with self._readers_lock:
                self._readers.append(client)
            setattr(self._local, attr, client)
        return client

    def server_setting(self, name: str) -> str:
        """A server setting of the engine as it runs (system.server_settings), '' when unknown."""
        rows = self._reader().query("SELECT value FROM system.server_settings WHERE name = {n:String}",
                                    parameters={"n": name}).result_rows
        return str(rows[0][0]) if rows else ""

    def cancel(self, marker: str) -> None:
        """KILL the running queries whose text starts with ``marker`` (a prefix the SQL endpoint put there)."""
        with self._control_lock:
            if self._closed:
                return
            if self._control is None:
                self._control = self._connect()
            try:
                self._control.command("KILL QUERY WHERE startsWith(query, {m:String}) ASYNC",
                                      parameters={"m": marker})
            except Exception as exc:  # noqa: BLE001 - the time limit still ends the query
                log.warning("server: cannot cancel SQL queries %r: %s", marker, short_message(exc))

    def running(self, marker: str) -> int:
        """How many queries whose text starts with ``marker`` the engine is running now (system.processes)."""
        with self._control_lock:
            if self._closed:
                return 0
            if self._control is None:
                self._control = self._connect()
            try:
                return int(self._control.command("SELECT count() FROM system.processes WHERE startsWith(query, "
                                                 "{m:String})", parameters={"m": marker}))
            except Exception as exc:  # noqa: BLE001 - a scrape must not fail for it
                log.debug("server: cannot count running SQL queries: %s", short_message(exc))
                return -1

    def known_settings(self) -> frozenset[str]:
        if self._known_settings is None:
            # On the writer's client: the SQL handles' result and read limits would cut the list short.
            try:
                rows = self._client.query("SELECT name FROM system.settings").result_rows
            except Exception as exc:  # noqa: BLE001
                raise StoreError(short_message(exc, limit=1000), code=error_code(exc) or 1000) from None
            self._known_settings = frozenset(r[0] for r in rows)
        return self._known_settings

    def query(self, sql: str, *, database: str | None = None, settings: Mapping[str, str] | None = None,
              parameters: Mapping[str, str] | None = None, readonly: int = 1) -> bytes:
        """Run one statement (already checked read-only by the caller) and return the raw output bytes.

        ``readonly = 2`` (the write user's reads, sql/insert.py): a handle that reads only but on which settings
        may change, so system.settings shows the insert settings as changeable, as a real ClickHouse does."""
        known = self.known_settings()
        # Only what differs from the handle's defaults (the limits) needs a handle of its own.
        use = {k: v for k, v in (settings or {}).items()
               if k in known and k != "readonly" and _as_text(self.sql_settings.get(k)) != _as_text(v)}
        # Under readonly = 1 a handle cannot change a setting, so a query with settings gets a
        # handle of its own that takes them before it turns read-only (about 1 ms with chDB).
        client = self._read_only(self._connect(), use, readonly) if use and self.embedded else self._reader(readonly)
        # A chDB handle keeps its last USE, so always name the database.
        client.database = database or "default"
        try:
            return client.raw_query(sql, parameters=dict(parameters) if parameters else None,
                                    settings=use if use and not self.embedded else None, use_database=True)
        except Exception as exc:  # noqa: BLE001
            raise StoreError(short_message(exc, limit=1000), code=error_code(exc) or 1000,
                             name=errors_name(str(exc))) from None
        finally:
            if client is not getattr(self._local, "client" if readonly == 1 else f"client{readonly}", None):
                client.close()

    def stream(self, sql: str, fmt: str, *, database: str | None = None, settings: Mapping[str, str] | None = None,
               parameters: Mapping[str, str] | None = None, whole: bool = False,
               readonly: int = 1) -> "ResultStream":
        """Start one statement (already checked read-only by the caller); its output comes in chunks.

        Embedded, the chunks are chDB's streaming result (``send_query``): one chunk per block, so the server
        never holds the whole answer. ``parameters`` reach the engine as they came (ClickHouse's HTTP way:
        each value in its type's text format, ``\\N`` for NULL), not formatted again by a client library.
        A remote ClickHouse answers through clickhouse-connect in one piece. The stream must be consumed
        or closed on the thread that started it. ``readonly = 2``: the write user's reads (sql/insert.py),
        on handles where settings may change, as in ``query``.
        """
        known = self.known_settings()
        use = {k: v for k, v in (settings or {}).items()
               if k in known and k != "readonly" and _as_text(self.sql_settings.get(k)) != _as_text(v)}
        if not self.embedded:
            client = self._reader(readonly)
            client.database = database or "default"
            binds = {f"param_{k}": v for k, v in (parameters or {}).items()}  # raw, as the HTTP interface takes them
            try:
                out = client.raw_query(sql, settings={**use, **binds} or None, use_database=True)
            except Exception as exc:  # noqa: BLE001
                raise StoreError(short_message(exc, limit=1000), code=error_code(exc) or 1000) from None
            return ResultStream.whole(out)
        own = bool(use)
        conn = self._raw_reader(use, readonly) if own else self._raw_local(readonly)
        try:
            db = database or "default"
            if getattr(conn, "_hdrlog_db", None) != db:
                conn.query(f"USE {db}")
                conn._hdrlog_db = db  # type: ignore[attr-defined]
            return ResultStream(conn, sql, fmt, dict(parameters or {}), close_conn=own, whole=whole)
        except Exception as exc:  # noqa: BLE001
            if own:
                conn.close()
            raise StoreError(short_message(exc, limit=1000), code=error_code(exc) or 1000,
                             name=errors_name(str(exc))) from None

    def _raw_conn(self) -> Any:
        import chdb
        path = os.path.realpath(urlparse(self.url).path or ":memory:")
        return chdb.connect(path)

    def _raw_local(self, level: int = 1) -> Any:
        attr = "raw" if level == 1 else f"raw{level}"
        conn = getattr(self._local, attr, None)
        if conn is None:
            if self._closed:
                raise StoreError("store is closed")
            conn = self._raw_reader({}, level)
            with self._readers_lock:
                self._readers.append(conn)
            setattr(self._local, attr, conn)
        return conn

    def _raw_reader(self, settings: Mapping[str, str], level: int = 1) -> Any:
        """A chDB handle of its own for SQL readers: the limits and ``settings``, then readonly = 1
        (2 for the write user's reads: no writes, but settings may change)."""
        conn = self._raw_conn()
        try:
            for key, value in {**self.sql_settings, **settings}.items():
                conn.query(f"SET {key} = {quote_value(value)}")
            conn.query("SET allow_introspection_functions = 0")
            conn.query(f"SET readonly = {2 if level == 2 else 1}")
        except Exception:
            conn.close()
            raise
        return conn

    def _read_only(self, client: Any, settings: Mapping[str, str], level: int = 1) -> Any:
        """Make ``client`` a SQL reader: ``settings`` first, then readonly = 1 (no writes, no SET,
        no SETTINGS, no table functions but numbers/values/generateRandom) and no introspection."""
        settings = {**self.sql_settings, **settings}
        if not self.embedded:
            for key, value in settings.items():
                client.set_client_setting(key, str(value))
            current = getattr(client, "server_settings", {}).get("readonly")
            if current is not None and current.readonly and str(current.value) != "0":
                return client  # this user is read-only on the server already (e.g. an hdrlog write user's reads)
            client.set_client_setting("readonly", "1")
            return client
        for key, value in settings.items():
            client.command(f"SET {key} = {quote_value(value)}")
        client.command("SET allow_introspection_functions = 0")
        client.command(f"SET readonly = {2 if level == 2 else 1}")
        return client

    def parse(self, sql: str, parameters: Mapping[str, str] | None = None) -> str:
        """Run the SQL guard's own statements (formatQuery, EXPLAIN AST, catalogue reads) on this
        thread's read-only guard handle; the TabSeparated text (nothing appended: a FORMAT clause would
        become part of the statement that EXPLAIN AST shows). The guard's handle has readonly = 1 but not
        the query limits: its catalogue reads (system.functions) are the endpoint's, not a client's, and
        the parameters reach the engine as the client sent them, as in ``stream``."""
        try:
            if self.embedded:
                conn = getattr(self._local, "guard", None)
                if conn is None:
                    if self._closed:
                        raise StoreError("store is closed")
                    conn = self._raw_conn()
                    conn.query("SET allow_introspection_functions = 0")
                    conn.query("SET readonly = 1")
                    with self._readers_lock:
                        self._readers.append(conn)
                    self._local.guard = conn
                return conn.query(sql, "TabSeparated", params=dict(parameters or {})).bytes().decode("utf-8", "replace")
            client = self._reader()
            client.database = "default"
            binds = {f"param_{k}": v for k, v in (parameters or {}).items()}
            out = client.raw_query(sql, settings=binds or None, use_database=True)
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise StoreError(short_message(exc, limit=1000), code=error_code(exc) or 1000,
                             name=errors_name(str(exc))) from None
        return out.decode("utf-8", "replace")


class ResultStream:
    """One running statement's output: iterate for the chunks (bytes), then read ``summary``.

    ``summary`` holds the engine's own figures: read_rows, read_bytes and elapsed_ns from chDB's progress
    (the same fields ClickHouse puts in X-ClickHouse-Summary), result_rows and result_bytes counted here.
    ``progress`` is the latest progress the engine reported while the query ran (None before any).
    ``cancel()`` stops the query from any thread; ``close()`` (on the consuming thread) frees it.
    """

    def __init__(self, conn: Any, sql: str, fmt: str, parameters: dict[str, str], *, close_conn: bool,
                 whole: bool = False):
        self._conn = conn
        self._close_conn = close_conn
        self.progress: dict[str, int] | None = None
        self.summary: dict[str, int] = {"read_rows": 0, "read_bytes": 0, "elapsed_ns": 0, "result_rows": 0,
                                        "result_bytes": 0}
        self._started = time.monotonic_ns()
        self._cancelled = False
        self._done = False
        self._whole: bytes | None = None
        self._sr: Any = None
        if conn is None:
            return
        conn.set_progress_callback(self._on_progress)
        try:
            if whole:
                result = conn.query(sql, fmt, params=parameters)
                self._whole = result.bytes()
                self.summary.update(read_rows=int(result.storage_rows_read()),
                                    read_bytes=int(result.storage_bytes_read()),
                                    elapsed_ns=int(result.elapsed() * 1e9), result_rows=int(result.rows_read()),
                                    result_bytes=len(self._whole))
                self._done = True
                self._release()
            else:
                self._sr = conn.send_query(sql, fmt, params=parameters)
        except Exception:
            self._release()
            raise

    @classmethod
    def whole(cls, out: bytes) -> "ResultStream":
        self = cls(None, "", "", {}, close_conn=False)
        self._whole = out
        self.summary["result_bytes"] = len(out)
        return self

    def _on_progress(self, progress: Any) -> None:
        if isinstance(progress, dict):
            self.progress = {k: int(v) for k, v in progress.items() if isinstance(v, (int, float))}

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        if self._whole is not None:
            out, self._whole = self._whole, None
            if out:
                return out
        if self._sr is None or self._done:
            raise StopIteration
        try:
            chunk = self._sr.fetch()
        except Exception as exc:  # noqa: BLE001
            self._finish()
            raise StoreError(short_message(exc, limit=1000), code=error_code(exc) or 1000,
                             name=errors_name(str(exc))) from None
        if chunk is None:
            self._finish()
            raise StopIteration
        data = chunk.bytes()
        self.summary["result_rows"] += int(chunk.rows_read())
        self.summary["result_bytes"] += len(data)
        self.summary["read_rows"] = max(self.summary["read_rows"], int(chunk.storage_rows_read()))
        self.summary["read_bytes"] = max(self.summary["read_bytes"], int(chunk.storage_bytes_read()))
        return data

    def _finish(self) -> None:
        self._done = True
        progress = self.progress or {}
        for key in ("read_rows", "read_bytes"):
            self.summary[key] = max(self.summary[key], int(progress.get(key, 0)))
        self.summary["elapsed_ns"] = int(progress.get("elapsed_ns", 0)) or time.monotonic_ns() - self._started
        self._release()

    def cancel(self) -> None:
        self._cancelled = True
        sr = self._sr
        if sr is not None and not self._done:
            try:
                sr.cancel()
            except Exception:  # noqa: BLE001 - KILL QUERY by the marker still ends it
                log.debug("cancelling a streaming query failed", exc_info=True)

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.set_progress_callback(None)
        except Exception:  # noqa: BLE001
            pass
        if self._close_conn:
            conn.close()

    def close(self) -> None:
        if self._sr is not None and not self._done:
            self._done = True
            try:
                self._sr.close()
            except Exception:  # noqa: BLE001
                log.debug("closing a streaming query failed", exc_info=True)
        if self._conn is not None:
            self._finish()
