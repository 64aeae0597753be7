"""The coalescing writer: batches from all streams → one INSERT per table per flush → acks.

Flushing
    Accepted batches wait in one FIFO queue. A flush starts when ``flush_rows``
    rows are queued or the oldest batch is ``flush_interval`` old (or at stop). It
    takes the whole queue, concatenates each table's Arrow tables and runs one
    INSERT per table, one flush at a time, so flushes are stored in FIFO order.
    Only after the INSERT returned are the waiting streams answered ``OK``.

Exactly-once
    Every row carries ``collector_id`` and ``batch_seq``. For each
    (collector_id, table, UTC day) the writer keeps the *set* of seqs that have
    rows stored for that key (``store.StoredSeqs``: ranges, one per run of
    consecutive seqs). At start it is read from the tables themselves
    (``Store.committed_watermarks``: min, max and distinct count per key, the
    distinct seqs only where there are holes), so it survives SIGKILL: the data
    is the only state.

    Why "seq is in the set" means "all of that batch's rows for that (table,
    day) are stored": the tables are partitioned by that same UTC day, and each
    flush inserts one block per partition (block size settings in
    ``Store.insert``); a block becomes one part, stored atomically. A batch's
    rows for one (table, day) are all in one block of one INSERT, so they are
    stored all together or not at all, and any row of them being there means
    all are. That needs nothing about order: not that flushes are stored in the
    order they were taken, not that a collector sends its seqs in order, not
    what a process remembers. (Keeping the set per day, not per table, covers a
    flush that spans midnight and dies between its two partitions.)

    An earlier version kept only ``max(batch_seq)`` per key and argued that
    the stored seqs are always a prefix of the seqs sent. That was false: a
    flush given up at stop (the store's disk full), with a newer, smaller flush
    of the same collector stored behind it, left a hole under the maximum, and
    the resent seqs in the hole were acked as duplicates and never stored (issue
    11; tests/test_exactly_once.py reproduces it on a real full filesystem).

    A received batch therefore: drops the rows of every (table, day) whose set
    holds its seq (acked ``OK, duplicate=true`` if nothing is left);
    joins the pending entry when the same (collector_id, seq) is still queued or
    being inserted (a resend on a new stream while the old one is in flight), so
    its rows are never queued twice; otherwise is queued. The sets grow only
    after an INSERT returned. When a flush is given up in an unknown state (an
    unexpected error), the next flush first re-reads the sets from the tables and
    drops whatever that attempt did store. Belt and braces: every INSERT also
    carries an ``insert_deduplication_token`` derived from its content (the
    (collector, seq, rows) list and days), so a retried INSERT whose first
    attempt did land (an ambiguous failure) is dropped by ClickHouse.

    What it rests on: one (collector_id, seq) names one batch's rows. Under mTLS
    only the certificate's holder can write under its collector_ids (ingest.py).
    Under ``--insecure`` anyone can: a forged batch under another collector's
    id takes exactly the seqs it names (the real batch with that seq is then
    taken for a duplicate) and no other, a huge seq included
    (docs/security.md, "Exactly once").

Across servers
    Several servers may write one ClickHouse (docs/scale.md); a collector fails
    over between them and resends what was unacked, so two servers can hold the
    same batch, even at the same moment (the old one's INSERT still running when
    the new one gets the resend). Two things then keep every row once, whichever
    server received a batch:

    - Per-batch tokens (``dedup_scope = batch``): each (batch, table, day) is its
      own INSERT with a token made of (collector_id, seq, table, day, rows), the
      same on every server however the flushes were coalesced, so ClickHouse
      drops the second copy (``non_replicated_deduplication_window``, or
      ``replicated_deduplication_window`` on a cluster). The price is a part per
      batch instead of a part per flush (measured in docs/scale.md).
    - Stored seqs read from ClickHouse, not process memory: on a stream's first
      batch of a collector (and on any batch below the lowest seq read so far on
      that stream), the writer reads that collector's stored seqs >= that seq
      (``Store.stored_seqs``, by the host prefix of the primary key) and adds them
      to its sets before deciding what to keep. A collector sends one stream at a
      time, in seq order, so what another server stored before this stream began
      is known; a copy still in flight elsewhere is what the tokens catch.

    ``dedup_scope = auto`` (the default) is ``batch`` when the store is shared: a
    remote ClickHouse, or an embedded one that takes INSERTs from other servers
    (``sql_write_user``); else ``flush`` (one process owns the data: its memory
    is the whole truth, and one part per flush is cheaper).

Rollups
    The per-minute rollups are the server's (server/rollup.py), not materialized views, and
    they are derived data: a flush's Ack waits for its packets, not for its rollup.

    One process owning the store (``dedup_scope = flush``, not shared): each flush goes (1) the
    packets INSERT, (2) to the rollup worker with its (collector_id, seq, day)s, which
    aggregates it at once (its Arrow rows are let go) and gathers the flushes of up to
    ``ROLLUP_EVERY`` seconds (at most ``ROLLUP_GROUP_MAX`` flushes, ``ROLLUP_GROUP_ROWS`` rollup
    rows) into one group, then, on its own chDB handle while the next flushes insert: (3) the
    group's intent into ``rollup_log`` (state 0 under the group's token -- the flush token for a
    group of one -- with every (collector_id, seq, day) of its flushes), (4) its rollup INSERT
    into ``rollup_in`` under ``<group token>-rollup``, (5) its end. The journal costs three small
    INSERTs per rollup INSERT, not two per flush (an intent before each flush's packets cost 4-7%
    of the server's time, measured with py-spy). After a crash or an unknown failure (at the next
    start, or before the next flush): an intent without an end is rolled up again from its
    stored rows under the same token (ClickHouse drops a rollup that had landed, stores one that
    had not); and the stored batches that no intent names (a SIGKILL between (1) and (3)) are
    found from the data (``Store.unjournaled_packets``: the packets' batch seqs per collector
    and day as bitmaps, less the journal's) and rolled up as new groups of
    ``ROLLUP_RECOVER_BATCHES``, each journaled before its INSERT. The aggregation is
    deterministic (the same rows give the same result, in any order). Migration 13 names the
    batches stored before this scheme as rolled up (they were, by the views or the per-flush
    journal), so a store of an older server is not rolled up twice.

    Flushes journaled before their packets (a shared store forced to ``dedup_scope = flush``;
    journals of older servers): (1) the flush's intent, (2) the packets INSERT, (3) the
    worker, which stores a group under ``<flush token>-rollup`` for one flush or, for several,
    after a group row naming them (state 2), under ``<group token>-rollup``; (4) their ends. A
    flush with an intent and no end is rolled up again grouped as the journal says. A flush
    whose packets were refused for good gets its end at once (it stands for nothing; its
    batches are stored one by one, each journaled on its own).

Rollups across servers
    With ``dedup_scope = batch`` a flush's grouping is this server's own, so its
    rollups must not depend on it: each (batch, day) of packets is journaled, inserted
    and rolled up on its own, under tokens made from that batch alone (the intent
    under its packets token, the rollup under ``<batch token>-rollup``), and the
    rollup worker does not gather them into groups (one rollup INSERT per batch, as
    there is one packets INSERT per batch). The aggregation is deterministic, so two
    servers holding the same batch make the same rollup under the same token, and
    ClickHouse keeps one copy whichever server grouped what (tests/test_scaleout.py
    races two writers on the same batches).

    The journal (``rollup_log``) is shared too, so a recovery meets other servers'
    entries. Rolling one up again is harmless (same token). One whose packets are not
    stored (yet) is left open while younger than ``ROLLUP_ABANDONED`` (its server may
    be inserting them right now) and ended after that (that server gave up; a resend
    to another server journals its own intent under the same token). Each server on a
    shared store also sweeps the journal every ``ROLLUP_SWEEP`` seconds for open entries
    at least that old: a server killed between a batch's packets and its rollup is not
    necessarily restarted, and another one finishes its work.

    What remains: a batch first stored more than ``ROLLUP_ABANDONED`` after an abandoned
    intent of it, by a server that then dies between its packets and rollup INSERTs,
    loses its rollup (the end written for the abandoned intent hides the new intent).
    And a rollup repeated after the tables' deduplication window (10,000 blocks) is
    stored twice, as a repeated packets INSERT would be.

The journal's retention
    Without a bound ``rollup_log`` grows by a few rows per flush (per batch on a shared store)
    forever, and every recovery reads it all. What a recovery can still need of it:

    - an intent without an end (``unfinished_rollups``): until its end, whatever its age (a store
      nobody started for a month still has its interrupted rollups). Never dropped;
    - a token's end, as long as another intent of that token may still be journaled: only a copy of
      the same batch (or flush) racing on another server that had not seen it stored (a resend is
      otherwise dropped by the stored seqs, which come from the data and never forget, not from the
      journal). That copy journals its intent when it is flushed, within seconds, or minutes of an
      outage, of the original; ``ROLLUP_LOG_KEEP`` (7 days) is far past that. A copy later still
      (a server cut off from the store for a week while holding a batch) is past what the raw tables'
      deduplication window (10,000 blocks, minutes to hours of a busy fleet) catches too: its packets
      would be stored twice as well, the limit already stated above;
    - a group row (state 2), while a member has an intent left;
    - every intent's (collector_id, seq, day)s, for ``unjournaled_packets``, as long as their packets
      are stored: a batch no intent names is rolled up again. So a pruned intent's batches are
      first written as a summary row (state 3, one per collector and day, seqs only).

    Hence no TTL: a TTL cannot tell an open intent from an ended one. ``Store.prune_rollup_log``
    drops, every ``ROLLUP_PRUNE_EVERY`` (and ``ROLLUP_PRUNE_FIRST`` after start), from the rollup
    worker, the tokens with an end whose rows are all older than ``ROLLUP_LOG_KEEP``, the ends and
    groups left without intents, after the summary; so the journal holds about 8 days of rows, the
    open intents and the summaries (a row per collector and day per prune). A shared store's sweep
    (every ``ROLLUP_SWEEP`` seconds) reads only the intents of the last ``ROLLUP_SWEEP_WINDOW`` (an
    index on ``at``, migration 15), and the ends of those tokens whatever their age; every half
    window one sweep, and every start, reads every open intent.

Failures
    A transient failure (connection, timeout, too many parts, ...) is retried with
    capped, jittered exponential backoff; tables already inserted by the flush
    are not sent again. After ``RETRY_ACK_AFTER`` failed attempts the waiting
    streams are answered ``RETRY`` (the batch stays queued; a resend joins it).
    A permanent failure (type / data errors, decided in ``store.classify``) is
    not retried: the flush is split into single batches and the one(s) that fail
    are answered ``REJECTED`` with the reason; the others are stored.

Memory
    At most ``max_pending_rows`` (default 4 x ``flush_rows``) rows are queued or
    in flight; ``submit()`` waits for room, which stops the stream from reading
    (gRPC flow control pushes back to the collector). One batch larger than the
    cap is still accepted when nothing else is pending. A stream calls ``reserve(rows)``
    before converting a batch (so the wait comes before the allocation, not after) and
    hands the reservation to ``submit(..., reserved=rows)``, or gives it back with
    ``release(rows)`` when the batch is refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from hdrlog.drops import DropWarning, backoff_delay
from hdrlog.proto import ingest_pb2
from hdrlog.server.config import ServerConfig
from hdrlog.server.convert import TableRows
from hdrlog.server.metrics import ServerMetrics
from hdrlog.server import rollup
from hdrlog.server.store import Store, StoredSeqs, StoreError

log = logging.getLogger("hdrlog.server")

OK = ingest_pb2.Ack.OK
REJECTED = ingest_pb2.Ack.REJECTED
RETRY = ingest_pb2.Ack.RETRY

BACKOFF_START = 0.2
BACKOFF_CAP = 10.0
RETRY_ACK_AFTER = 3      # failed attempts before waiting streams get RETRY
STOP_ATTEMPTS = 3        # attempts per flush once stopping, before answering RETRY and giving up
# Steps of a flush's packets besides the INSERT itself, kept in its ``done`` set (see "Rollups").
ROLLUP_INTENT, ROLLUP_INSERT, ROLLUP_END = "packets:intent", "packets:rollup", "packets:end"
ROLLUP_GROUP = "rollup:group"
ROLLUP_QUEUE = 64        # flushes whose rollup may wait for the rollup worker before a flush waits
ROLLUP_EVERY = 5.0       # seconds the rollup worker gathers flushes into one rollup INSERT (the rollups' delay)
ROLLUP_GROUP_MAX = 64    # flushes in one rollup INSERT at most
ROLLUP_GROUP_ROWS = 262_144  # rollup rows (partial aggregates) in one rollup INSERT at most (memory)
ROLLUP_RECOVER_BATCHES = 256  # unjournaled batches rolled up together by a recovery
ROLLUP_SWEEP = 10        # seconds between a shared store's journal sweeps, and the age they pick up
ROLLUP_ABANDONED = 600   # seconds after which a shared store's journal entry without stored rows is given up
ROLLUP_SWEEP_WINDOW = 3600  # seconds back a sweep looks for intents (every half of it, a sweep reads them all)
ROLLUP_LOG_KEEP = 7 * 86400  # seconds an ended journal entry is kept (see "The journal's retention")
ROLLUP_PRUNE_EVERY = 86400   # seconds between two prunes of the journal (the first soon after start)
ROLLUP_PRUNE_FIRST = 60      # seconds after start of the first prune


@dataclass
class Outcome:
    status: int
    rows: int = 0
    duplicate: bool = False
    error: str = ""


@dataclass
class _Entry:
    collector_id: str
    seq: int
    tables: list[TableRows]
    days: dict[str, np.ndarray]          # table -> unique days of its rows
    rows: int
    created: float
    waiters: list[asyncio.Future] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, int]:
        return (self.collector_id, self.seq)


def _resolve(waiters: list[asyncio.Future], outcome: Outcome) -> None:
    """Answer every waiter. A resend that joined a pending copy is told it was a duplicate."""
    joined = Outcome(OK, rows=0, duplicate=True) if outcome.status == OK else outcome
    for i, fut in enumerate(waiters):
        if not fut.done():
            fut.set_result(outcome if i == 0 else joined)
    waiters.clear()


class Writer:
    def __init__(self, store: Store, config: ServerConfig, metrics: ServerMetrics):
        self.store = store
        self.config = config
        self.metrics = metrics
        self._queue: list[_Entry] = []
        self._index: dict[tuple[str, int], _Entry] = {}   # queued and in-flight entries
        self._queued_rows = 0
        self._inflight_rows = 0
        self._wm: dict[tuple[str, str], dict[int, StoredSeqs]] = {}   # (collector, table) -> day -> seqs
        self._reread_needed = False
        self._reserved_rows = 0   # rows of batches being converted (reserve() .. submit())
        self.shared = config.store_shared()          # other servers may write the same tables
        self.per_batch = config.per_batch_tokens()   # a token per (batch, table, day), see "Across servers"
        # One process owns the data: the rollup journal is written per rollup INSERT, not per flush (see "Rollups").
        self.journal_per_group = not self.per_batch and not self.shared
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._stopping = False
        self._draining = False
        self._task: asyncio.Task | None = None
        # Flushes whose packets are stored and whose rollup is not yet: (data, token), for the worker.
        self._rollups: asyncio.Queue = asyncio.Queue(maxsize=ROLLUP_QUEUE)
        self._rollup_task: asyncio.Task | None = None
        self._rollup_hurry = 0  # > 0 while someone waits for the rollups (no gathering then)
        self._full_sweep = time.monotonic()  # the start's recovery read every open intent
        self._warn_folded = DropWarning(
            log, f"server: rollup keys past rollup_max_keys={config.rollup_max_keys} per host-minute and flush",
            "raise rollup_max_keys to keep more of them apart", unit="keys")
        self._warn_rejected = DropWarning(log, "server: batches refused by ClickHouse (answered REJECTED)",
                                          "the reason names the column to fix", level=logging.ERROR)

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        marks = await asyncio.to_thread(self.store.committed_watermarks)
        self._wm = marks.by_key
        await asyncio.to_thread(self._recover_rollups)
        self._rollup_task = asyncio.create_task(self._rollup_worker(), name="hdrlog-rollups")
        self._task = asyncio.create_task(self._run(), name="hdrlog-writer")

    async def stop(self) -> None:
        """Flush everything queued (bounded retries if the store fails), answer every waiter, end."""
        self._stopping = True
        self._wake.set()
        self._room.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._rollup_task is not None:
            await self._rollups.put(None)
            await self._rollup_task
            self._rollup_task = None

    def flush_now(self) -> None:
        """From now on, flush whatever is queued without waiting for the thresholds (shutdown)."""
        self._draining = True
        self._wake.set()

    @property
    def pending_rows(self) -> int:
        return self._queued_rows + self._inflight_rows + self._reserved_rows

    def watermark(self, collector_id: str, table: str) -> int:
        """Largest seq stored for a collector and table (-1 when none)."""
        days = self._wm.get((collector_id, table))
        return max(seqs.max for seqs in days.values()) if days else -1

    async def refresh(self, collector_id: str, host: str, since: int) -> str:
        """Add to the sets what ClickHouse holds for ``collector_id`` at seqs >= ``since`` (another server
        may have stored them). '' when done, else why it could not be read."""
        try:
            marks = await asyncio.to_thread(self.store.stored_seqs, collector_id, host, since)
        except StoreError as exc:
            log.warning("server: %s", exc)
            return str(exc)
        self.metrics.seq_refreshes.inc()
        for table, days in marks.items():
            known = self._wm.setdefault((collector_id, table), {})
            for day, seqs in days.items():
                have = known.get(day)
                known[day] = seqs if have is None else StoredSeqs(have.ranges() + seqs.ranges())
        return ""

    # -- accepting ---------------------------------------------------------

    async def reserve(self, rows: int) -> None:
        """Wait (backpressure) until ``rows`` more fit in the pending buffer, and hold them.

        Called before a batch is converted, so a full buffer stops a stream before it
        allocates; the rows stay counted as pending until ``submit(reserved=rows)`` or
        ``release(rows)``.
        """
        started = None
        while not self._stopping and self.pending_rows and self.pending_rows + rows > self.config.pending_rows_cap:
            started = started or time.monotonic()
            self._room.clear()
            await self._room.wait()
        if started is not None:
            self.metrics.backpressure_seconds.inc(time.monotonic() - started)
        self._reserved_rows += rows

    def release(self, rows: int) -> None:
        """Give back a reservation whose batch will not be submitted (refused, or the stream ended)."""
        self._reserved_rows -= rows
        self._room.set()

    async def submit(self, collector_id: str, seq: int, tables: list[TableRows], reserved: int = 0) -> asyncio.Future:
        """Queue a validated batch; the future resolves to its Outcome once stored (or not).

        Waits (backpressure) while the pending buffer is full; ``reserved`` rows held by
        ``reserve()`` for this batch are handed over first.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        if reserved:
            self.release(reserved)
        rows = sum(t.rows for t in tables)
        started = None
        while (not self._stopping and self.pending_rows and self.pending_rows + rows > self.config.pending_rows_cap
               and (collector_id, seq) not in self._index):
            started = started or time.monotonic()
            self._room.clear()
            await self._room.wait()
        if started is not None:
            self.metrics.backpressure_seconds.inc(time.monotonic() - started)
        # From here to the end: no await, so the index and watermarks cannot move under us.
        entry = self._index.get((collector_id, seq))
        if entry is not None:
            # If the first copy was already answered (RETRY), this one becomes the first.
            if entry.waiters:
                self.metrics.joined.inc()
                self.metrics.duplicate()
            entry.waiters.append(fut)
            return fut
        if self._stopping:
            fut.set_result(Outcome(RETRY, error="server is shutting down; resend later"))
            return fut
        kept, skipped = self._unstored(collector_id, seq, tables)
        if not kept:
            if skipped:
                self.metrics.duplicate()
            fut.set_result(Outcome(OK, rows=0, duplicate=bool(skipped)))
            return fut
        for tr in kept:
            self.metrics.rows_received.labels(tr.name).inc(tr.rows)
        entry = _Entry(collector_id, seq, kept, {t.name: _unique_days(t.days) for t in kept},
                       sum(t.rows for t in kept), time.monotonic(), [fut])
        self._queue.append(entry)
        self._index[entry.key] = entry
        self._queued_rows += entry.rows
        self.metrics.pending_rows.set(self.pending_rows)
        if self._queued_rows >= self.config.flush_rows:
            self._wake.set()
        elif len(self._queue) == 1:
            self._wake.set()  # start the age timer
        return fut

    def _unstored(self, collector_id: str, seq: int, tables: list[TableRows]) -> tuple[list[TableRows], int]:
        """The rows of a batch on the (table, day)s where its seq is not stored yet; and how many
        tables were stored whole."""
        kept: list[TableRows] = []
        skipped = 0
        for tr in tables:
            marks = self._wm.get((collector_id, tr.name))
            if marks:
                stored = np.array([d for d, seqs in marks.items() if seq in seqs], dtype=np.int64)
                if stored.size:
                    mask = np.isin(tr.days, stored)
                    if mask.all():
                        skipped += 1
                        continue
                    if mask.any():
                        keep = ~mask
                        tr = TableRows(tr.name, tr.data.filter(pa.array(keep)), tr.days[keep])
            kept.append(tr)
        return kept, skipped

    async def _reread(self, entries: list[_Entry]) -> list[_Entry]:
        """After a flush was given up in an unknown state: reload what is stored from the tables,
        and drop from ``entries`` what a lost attempt did store after all (data is the only state)."""
        try:
            marks = await asyncio.to_thread(self.store.committed_watermarks)
            await self._recover()
        except StoreError as exc:
            log.warning("server: cannot re-read the stored seqs (%s); answering RETRY", exc)
            for e in entries:
                self._forget(e, Outcome(RETRY, error=f"store unavailable: {exc}"))
            return []
        self._wm = marks.by_key
        self._reread_needed = False
        left = []
        for e in entries:
            kept, _ = self._unstored(e.collector_id, e.seq, e.tables)
            if not kept:
                self.metrics.duplicate()
                self._forget(e, Outcome(OK, rows=0, duplicate=True))
                continue
            e.tables, e.days = kept, {t.name: _unique_days(t.days) for t in kept}
            e.rows = sum(t.rows for t in kept)
            left.append(e)
        return left

    # -- flushing ----------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            age = time.monotonic() - self._queue[0].created
            if not (self._stopping or self._draining) and self._queued_rows < self.config.flush_rows and age < self.config.flush_interval:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.config.flush_interval - age)
                except asyncio.TimeoutError:
                    pass
                continue
            entries, self._queue = self._queue, []
            self._inflight_rows, self._queued_rows = self._queued_rows, 0
            try:
                if self._reread_needed:
                    entries = await self._reread(entries)
                if entries:
                    await self._flush(entries)
            except Exception:  # noqa: BLE001 - the writer must survive anything
                log.exception("server: flush failed unexpectedly; answering RETRY")
                self._reread_needed = True  # some of it may be stored: the next flush asks the tables
                for e in entries:
                    self._forget(e, Outcome(RETRY, error="internal error while storing; resend later"))
            finally:
                self._inflight_rows = 0
                self.metrics.pending_rows.set(self.pending_rows)
                self._room.set()

    async def _flush(self, entries: list[_Entry], done: set[str] | None = None) -> None:
        """Store ``entries`` (retrying), or split them to find the one a permanent error belongs to.

        ``done`` names the tables this group already stored (they are not sent again).
        """
        done = set() if done is None else done
        attempt = 0
        while True:
            try:
                await self._insert(entries, done)
                break
            except StoreError as exc:
                if exc.permanent:
                    self.metrics.insert_errors.labels("permanent").inc()
                    if ROLLUP_INTENT in done and "packets" not in done:
                        # The group's packets were refused: its journal entry stands for nothing (the
                        # single batches below journal their own), so close it before they store.
                        await self._close_intent(entries)
                        done.discard(ROLLUP_INTENT)
                    if len(entries) > 1:
                        log.warning("server: insert refused (%s); storing the %d batches one by one", exc, len(entries))
                        for e in entries:
                            await self._flush([e], set(done))
                        return
                    e = entries[0]
                    if self.per_batch:
                        # Its journaled (batch, day)s will never be stored: end them (same token on any server).
                        await self._close_intent([e], done)
                    self._warn_rejected.dropped(e.rows, f"the last: {e.collector_id}/{e.seq}: {exc}")
                    self.metrics.rejected("insert")
                    self._forget(e, Outcome(REJECTED, error=f"ClickHouse refused the rows: {exc}"))
                    return
                attempt += 1
                self.metrics.insert_errors.labels("transient").inc()
                delay = backoff_delay(attempt, BACKOFF_START, BACKOFF_CAP)
                if self._stopping and attempt >= STOP_ATTEMPTS:
                    log.error("server: insert failed %d times while stopping (%s); %d batches not stored, "
                              "collectors will resend them", attempt, exc, len(entries))
                    for e in entries:
                        self._forget(e, Outcome(RETRY, error=f"not stored: {exc}"))
                    return
                log.warning("server: insert failed (%s); retry %d in %.1fs", exc, attempt, delay)
                if attempt == RETRY_ACK_AFTER:
                    for e in entries:
                        self.metrics.batches_retry.inc(len(e.waiters))
                        _resolve(e.waiters, Outcome(RETRY, error=f"store unavailable: {exc}"))
                await self._sleep(delay)
        for e in entries:
            for tr in e.tables:
                marks = self._wm.setdefault((e.collector_id, tr.name), {})
                for day in e.days[tr.name].tolist():
                    marks.setdefault(day, StoredSeqs()).add(e.seq)
            self.metrics.batches_acked.inc(len(e.waiters))
            self._forget(e, Outcome(OK, rows=e.rows))

    async def _insert(self, entries: list[_Entry], done: set[str]) -> None:
        if self.per_batch:
            await self._insert_per_batch(entries, done)
            return
        by_table: dict[str, list[tuple[_Entry, TableRows]]] = {}
        for e in entries:
            for tr in e.tables:
                by_table.setdefault(tr.name, []).append((e, tr))
        for table, parts in by_table.items():
            if table in done and (table != "packets" or ROLLUP_END in done):
                continue
            # In a thread: the event loop keeps reading and converting the next batches meanwhile.
            data = await asyncio.to_thread(concat, [tr.data for _, tr in parts])
            token = _token(table, parts)
            if table == "packets":
                await self._insert_packets(data, token, parts, done)
                continue
            t0 = time.monotonic()
            await asyncio.to_thread(self.store.insert, table, data, token)
            self.metrics.inserted(table, data.num_rows, time.monotonic() - t0)
            done.add(table)

    async def _insert_per_batch(self, entries: list[_Entry], done: set[str]) -> None:
        """One INSERT per (batch, table, day), each with its own token: deduplicable on its own, whichever
        server sends it and whatever else was in the flush. ``done`` holds the blocks already stored.

        packets: the intents of every (batch, day) first (one journal INSERT), then each block, then
        each block's rollup handed to the worker on its own (see "Rollups across servers")."""
        blocks: list[tuple[str, TableRows, str, pa.Table, str, tuple[str, int, int]]] = []
        for e in entries:
            for tr in e.tables:
                days = e.days[tr.name]
                for day in days.tolist():
                    key = f"{tr.name}\x00{e.collector_id}\x00{e.seq}\x00{day}"
                    if key in done and (tr.name != "packets" or f"{key}:end" in done):
                        continue
                    data = tr.data if days.size == 1 else tr.data.filter(pa.array(tr.days == day))
                    token = batch_token(e.collector_id, e.seq, tr.name, day, data.num_rows)
                    blocks.append((key, tr, token, data, tr.name, (e.collector_id, e.seq, int(day))))
        intents = [(token, [where]) for key, _tr, token, _d, table, where in blocks
                   if table == "packets" and f"{key}:intent" not in done]
        if intents:
            await asyncio.to_thread(self.store.log_rollups, intents)
            done.update(f"{block[0]}:intent" for block in blocks if block[4] == "packets")
        for key, _tr, token, data, table, _where in blocks:
            if key not in done:
                t0 = time.monotonic()
                await asyncio.to_thread(self.store.insert, table, data, token)
                self.metrics.inserted(table, data.num_rows, time.monotonic() - t0)
                done.add(key)
            if table == "packets" and f"{key}:end" not in done:
                await self._rollups.put((data, token, None))  # rolled up alone, under <token>-rollup
                done.add(f"{key}:end")

    async def _insert_packets(self, data: pa.Table, token: str, parts: list[tuple[_Entry, TableRows]],
                              done: set[str]) -> None:
        """packets, journaled, then its rollup handed to the rollup worker (see "Rollups" above)."""
        journal = _journal(parts)
        if ROLLUP_INTENT not in done and not self.journal_per_group:
            await asyncio.to_thread(self.store.log_rollup, token, 0, journal)
            done.add(ROLLUP_INTENT)
        if "packets" not in done:
            t0 = time.monotonic()
            await asyncio.to_thread(self.store.insert, "packets", data, token)
            self.metrics.inserted("packets", data.num_rows, time.monotonic() - t0)
            done.add("packets")
        if ROLLUP_END not in done:
            # Waits while the worker is ROLLUP_QUEUE flushes behind. Journaled by the worker, per rollup INSERT.
            await self._rollups.put((data, token, journal if self.journal_per_group else None))
            done.add(ROLLUP_END)

    async def caught_up(self) -> None:
        """Until every flush queued so far has its rollup stored (tests, benchmarks, recovery)."""
        self._rollup_hurry += 1
        try:
            await self._rollups.join()
        finally:
            self._rollup_hurry -= 1

    async def _rollup_worker(self) -> None:
        """Rolls up the flushes' packets on the store's second handle, while the next flushes
        insert. Each flush is aggregated as it comes (its Arrow rows are let go at once); the
        partial aggregates of the flushes that arrive within ``ROLLUP_EVERY`` seconds go into one
        rollup INSERT (a group: its parts and views cost per INSERT, not per row). Retried until
        stored; once stopping, at most STOP_ATTEMPTS times (the journal then has those flushes
        without an end, and the next start rolls them up)."""
        group: list[tuple[str, pa.Table, list | None]] = []   # (flush token, its rollup rows, its journal or None)
        group_rows = 0
        since = 0.0
        # Per-batch tokens: every batch's rollup alone, under its own token (see "Rollups across servers").
        group_max = 1 if self.per_batch else ROLLUP_GROUP_MAX
        next_sweep = time.monotonic() + ROLLUP_SWEEP
        next_prune = time.monotonic() + ROLLUP_PRUNE_FIRST
        while True:
            if not group:
                if time.monotonic() >= next_prune and not self._stopping:
                    await asyncio.to_thread(self._prune)
                    next_prune = time.monotonic() + ROLLUP_PRUNE_EVERY
                # A shared store: other servers' interrupted rollups too, every ROLLUP_SWEEP seconds.
                if self.shared and time.monotonic() >= next_sweep and not self._stopping:
                    await asyncio.to_thread(self._sweep)
                    next_sweep = time.monotonic() + ROLLUP_SWEEP
                wake = min(next_prune, next_sweep) if self.shared else next_prune
                try:
                    item = await asyncio.wait_for(self._rollups.get(), max(0.01, wake - time.monotonic()))
                except asyncio.TimeoutError:
                    continue
            elif not self._rollups.empty() and len(group) < group_max and group_rows < ROLLUP_GROUP_ROWS:
                item = self._rollups.get_nowait()
            else:
                hurry = (self._stopping or self._draining or self._rollup_hurry or len(group) >= group_max
                         or group_rows >= ROLLUP_GROUP_ROWS)
                left = 0.0 if hurry else since + ROLLUP_EVERY - time.monotonic()
                item = False  # False: store the group now
                if left > 0:
                    try:
                        item = await asyncio.wait_for(self._rollups.get(), left)
                    except asyncio.TimeoutError:
                        pass
            if item:
                data, token, journal = item
                try:
                    rows = await asyncio.to_thread(self._aggregate, data)
                except Exception:  # noqa: BLE001 - a bug here must not stop the worker
                    log.exception("server: cannot roll up flush %s; its journal entry stays open for the next start",
                                  token)
                    self._rollups.task_done()
                    continue
                if not group:
                    since = time.monotonic()
                group.append((token, rows, journal))
                group_rows += rows.num_rows
                continue  # task_done once its rollup is stored
            if group:
                await self._store_group(group)
                for _ in group:
                    self._rollups.task_done()
                group, group_rows = [], 0
            if item is None:
                self._rollups.task_done()
                return

    def _aggregate(self, data: pa.Table) -> pa.Table:
        rows, folded = rollup.rollup_rows(data, self.config.rollup_max_keys)
        if folded:
            self.metrics.rollup_folded_keys.labels("rollups").inc(folded)
            self._warn_folded.dropped(folded, "summed into other = 1 rows, totals kept")
        return rows

    async def _store_group(self, group: list[tuple[str, pa.Table, list | None]]) -> None:
        done: set[str] = set()
        attempt = 0
        while True:
            try:
                await asyncio.to_thread(self._roll_up, group, done)
                return
            except Exception as exc:  # noqa: BLE001 - server-made rows: always worth a retry
                attempt += 1
                self.metrics.insert_errors.labels("rollup").inc()
                if self._stopping and attempt >= STOP_ATTEMPTS:
                    log.error("server: rollup of %d flushes failed %d times while stopping (%s); the next "
                              "start rolls them up from the stored rows", len(group), attempt, exc)
                    return
                delay = backoff_delay(attempt, BACKOFF_START, BACKOFF_CAP)
                log.warning("server: rollup insert failed (%s); retry %d in %.1fs", exc, attempt, delay)
                await self._sleep(delay)

    def _roll_up(self, group: list[tuple[str, pa.Table, list | None]], done: set[str]) -> None:
        """Blocking: one group's rollup rows, then the journal's end of its flushes.

        Flushes journaled before their packets (``journal`` None): a group of one inserts under
        ``<flush token>-rollup``; a larger group is journaled first (state 2, its members), then
        inserted under ``<group token>-rollup``, so a recovery rolls the same flushes up together
        under the same token (see ``_recover_rollups``).

        Flushes not journaled yet (one process owns the store, see "Rollups"): the group's intent
        first (state 0 under the group's token, with every (collector_id, seq, day) of its flushes),
        then the rollup under ``<group token>-rollup``, then its one end: three small INSERTs per
        rollup INSERT instead of two journal INSERTs per flush."""
        tokens = [t for t, _r, _j in group]
        name = tokens[0] if len(tokens) == 1 else _group_token(tokens)
        fresh = [j for _t, _r, j in group if j is not None]
        if fresh and ROLLUP_INTENT not in done:
            self.store.log_rollup(name, 0, [b for j in fresh for b in j], rollup=True)
            done.add(ROLLUP_INTENT)
        elif len(tokens) > 1 and ROLLUP_GROUP not in done and not fresh:
            self.store.log_rollup(name, 2, [], rollup=True, members=tokens)
            done.add(ROLLUP_GROUP)
        if ROLLUP_INSERT not in done:
            rows = [r for _t, r, _j in group if r.num_rows]
            if rows:
                self.store.insert_rollup(pa.concat_tables(rows), f"{name}-rollup")
            done.add(ROLLUP_INSERT)
        if ROLLUP_END not in done:
            self.store.end_rollups([name] if fresh else tokens)
            done.add(ROLLUP_END)

    async def _recover(self) -> None:
        """Wait for the rollup worker to finish what it holds, then recover from the journal."""
        await self.caught_up()
        await asyncio.to_thread(self._recover_rollups)

    def _sweep(self) -> None:
        """On a shared store, from the rollup worker every ``ROLLUP_SWEEP`` seconds (on its handle: one query
        at a time per session): roll up the journal's entries at least that old and still open, whichever
        server wrote them (one that died is not necessarily restarted to do it, servers being stateless). A
        live server ends its own within seconds; a repeat of one is dropped by its token."""
        full = time.monotonic() - self._full_sweep >= ROLLUP_SWEEP_WINDOW / 2
        try:
            self._recover_rollups(ROLLUP_SWEEP, on_rollup_handle=True, window=0 if full else ROLLUP_SWEEP_WINDOW)
            if full:
                self._full_sweep = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - the next sweep tries again
            log.warning("server: rollup journal sweep failed (%s); next in %.0fs", exc, ROLLUP_SWEEP)

    def _prune(self) -> None:
        """From the rollup worker, every ``ROLLUP_PRUNE_EVERY``: the journal's prune (see "The journal's
        retention"). A failure is logged and waits for the next time (the journal only grows meanwhile)."""
        try:
            n = self.store.prune_rollup_log(ROLLUP_LOG_KEEP, rollup=True)
            log.info("server: rollup journal pruned of entries ended over %d days ago (%d summary rows)",
                     ROLLUP_LOG_KEEP // 86400, n)
        except Exception as exc:  # noqa: BLE001 - the next prune tries again
            log.warning("server: rollup journal prune failed (%s); next in %.0fh (a server writing through "
                        "another's SQL endpoint cannot: that one prunes)", exc, ROLLUP_PRUNE_EVERY / 3600)

    def _recover_rollups(self, min_age: int = 0, on_rollup_handle: bool = False, window: int = 0) -> int:
        """Roll up again the stored rows of every flush journaled without an end (a crash or an
        unknown failure between its packets INSERT and its rollup's), grouped as they were (the
        group rows of the journal) and under the same tokens: a rollup that did land is dropped by
        ClickHouse, one that did not is stored. Blocking.

        On a shared store the journal holds other servers' entries too: one whose packets are not
        stored and that is younger than ``ROLLUP_ABANDONED`` is left open (its server may be
        inserting them right now; see "Rollups across servers"). ``window`` > 0: only the intents
        journaled in its last seconds (the sweeps)."""
        h = on_rollup_handle
        unfinished = [u for u in self.store.unfinished_rollups(rollup=h, since=window) if u[2] >= min_age]
        pending = {t: batches for t, batches, _age in unfinished}
        ages = {t: age for t, _batches, age in unfinished}
        groups = self.store.rollup_groups(list(pending), rollup=h)
        todo = [[m for m in members if m in pending] for _g, members in groups]
        grouped = {m for members in todo for m in members}
        todo += [[t] for t in pending if t not in grouped]
        recovered = 0
        for members in todo:
            group = [(t, self.store.stored_packets(pending[t], rollup.SOURCE_COLUMNS, rollup=h) if pending[t]
                      else pa.table({}))
                     for t in members]
            if self.shared and any(data.num_rows == 0 and pending[t] and ages[t] < ROLLUP_ABANDONED
                                   for t, data in group):
                continue
            self._roll_up([(t, self._aggregate(data) if data.num_rows else data, None) for t, data in group],
                          {ROLLUP_GROUP})
            recovered += len(members)
        if self.journal_per_group and not on_rollup_handle:
            recovered += self._roll_up_unjournaled()
        if recovered:
            log.info("server: rolled up %d interrupted flushes again", recovered)
        return recovered

    def _roll_up_unjournaled(self) -> int:
        """Roll up the stored packets of batches that no journal intent names: a flush whose packets
        were stored and whose group the rollup worker had not journaled yet (a SIGKILL, an unknown
        failure). Each ``ROLLUP_RECOVER_BATCHES`` of them: journaled as one group (state 0, under a
        token of their (collector_id, seq, day)s), rolled up from their stored rows, ended; a crash in
        between leaves an intent, rolled up again by the next start under the same token."""
        pending = self.store.unjournaled_packets()
        for i in range(0, len(pending), ROLLUP_RECOVER_BATCHES):
            part = pending[i:i + ROLLUP_RECOVER_BATCHES]
            name = _recover_token(part)
            data = self.store.stored_packets(part, rollup.SOURCE_COLUMNS)
            rows = self._aggregate(data) if data.num_rows else data
            self._roll_up([(name, rows, part)], set())
        if pending:
            log.info("server: rolled up %d stored batches that had no rollup yet", len(pending))
        return len(pending)

    async def _close_intent(self, entries: list[_Entry], done: set[str] | None = None) -> None:
        """End the journal entry of a flush whose packets were refused for good; with per-batch tokens,
        of each of its (batch, day)s journaled and not stored (``done`` says which)."""
        if self.per_batch:
            tokens = []
            for e in entries:
                for tr in e.tables:
                    if tr.name != "packets":
                        continue
                    for day in e.days[tr.name].tolist():
                        key = f"packets\x00{e.collector_id}\x00{e.seq}\x00{day}"
                        if f"{key}:intent" in (done or ()) and key not in (done or ()):
                            rows = tr.rows if e.days[tr.name].size == 1 else int((tr.days == day).sum())
                            tokens.append(batch_token(e.collector_id, e.seq, "packets", day, rows))
            if not tokens:
                return
        else:
            parts = [(e, tr) for e in entries for tr in e.tables if tr.name == "packets"]
            tokens = [_token("packets", parts)]
        attempt = 0
        while True:
            try:
                await asyncio.to_thread(self.store.end_rollups, tokens)
                return
            except StoreError as exc:
                attempt += 1
                log.warning("server: cannot close the rollup journal entry (%s); retry %d", exc, attempt)
                await self._sleep(backoff_delay(attempt, BACKOFF_START, BACKOFF_CAP))

    async def _sleep(self, delay: float) -> None:
        """Backoff that a stop interrupts (the flush then gets its bounded last attempts)."""
        try:
            await asyncio.wait_for(self._stop_event_wait(), delay)
        except asyncio.TimeoutError:
            pass

    async def _stop_event_wait(self) -> None:
        while not self._stopping:
            self._wake.clear()
            await self._wake.wait()

    def _forget(self, entry: _Entry, outcome: Outcome) -> None:
        self._index.pop(entry.key, None)
        _resolve(entry.waiters, outcome)


def _unique_days(days: np.ndarray) -> np.ndarray:
    """``np.unique(days)``; a batch's rows are nearly always of one day, which two reductions tell
    without the sort (np.unique was 4% of the server's time)."""
    if days.size and days.min() == days.max():
        return days[:1].copy()
    return np.unique(days)


def concat(tables: list[pa.Table]) -> pa.Table:
    """The tables of one flush as one table of single chunks (one block per partition).

    Dictionary columns whose chunks carry different dictionaries (``host``, ``collector_id``: one
    per batch) are unified by ``combine_chunks``; the unified dictionary holds every distinct value
    of the flush, so narrow indices are widened to int32 first, whatever convert.py produced.
    """
    if len(tables) == 1:
        return tables[0]
    data = pa.concat_tables(tables)
    for i, f in enumerate(data.schema):
        if not pa.types.is_dictionary(f.type) or f.type.index_type.bit_width >= 32:
            continue
        chunks = data.column(i).chunks
        if any(not c.dictionary.equals(chunks[0].dictionary) for c in chunks[1:]):
            wide = pa.dictionary(pa.int32(), f.type.value_type)
            data = data.set_column(i, f.name, data.column(i).cast(wide))
    return data.combine_chunks()


def _journal(parts: list[tuple[_Entry, TableRows]]) -> list[tuple[str, int, int]]:
    """(collector_id, seq, day) of every batch's rows in a flush: what its rollup stands for."""
    return [(e.collector_id, e.seq, int(d)) for e, tr in parts for d in e.days[tr.name].tolist()]


def _recover_token(batches: list[tuple[str, int, int]]) -> str:
    """The token of a recovery's group of unjournaled batches: the same for the same batches."""
    text = "|".join(f"{c}\x00{q}\x00{d}" for c, q, d in sorted(batches))
    return "hdrlog-r-" + hashlib.sha256(text.encode()).hexdigest()[:40]


def _group_token(tokens: list[str]) -> str:
    """The token of a group of flushes' rollups: the same for the same flushes, in any order."""
    return "hdrlog-g-" + hashlib.sha256("|".join(sorted(tokens)).encode()).hexdigest()[:40]


def _token(table: str, parts: list[tuple[_Entry, TableRows]]) -> str:
    """Deterministic for the same content: same batches, same rows, same days."""
    h = hashlib.sha256(table.encode())
    for e, tr in parts:
        h.update(f"|{e.collector_id}\x00{e.seq}\x00{tr.rows}".encode())
        h.update(e.days[table].tobytes())
    return "hdrlog-" + h.hexdigest()[:40]


def batch_token(collector_id: str, seq: int, table: str, day: int, rows: int) -> str:
    """The token of one batch's rows for one (table, day): the same on every server, whatever it coalesced."""
    h = hashlib.sha256(f"{table}\x00{collector_id}\x00{seq}\x00{day}\x00{rows}".encode())
    return "hdrlog-b-" + h.hexdigest()[:40]
