"""Batching: column chunks from capture become numbered Batch messages.

A batch closes when it holds ``batch_rows`` records or when its first record is
``batch_interval`` seconds old, whichever comes first. Every closed batch gets
the next ``seq`` of this collector incarnation; the sender keeps it until the
server acknowledges it. Columns are zstd-compressed at ``compress_level`` (the
collector's ``batch_compression``; proto/ingest.proto, Compression).
"""

from __future__ import annotations

import time
from typing import Callable, Mapping

import numpy as np

from hdrlog.proto import columns, ingest_pb2

ColumnChunk = Mapping[str, object]


def concat_columns(table: str, chunks: list[ColumnChunk]) -> tuple[dict[str, object], int]:
    """Join column chunks of one table into one set of columns."""
    out: dict[str, object] = {}
    rows = sum(len(chunk[columns.TABLES[table][0].name]) for chunk in chunks)  # type: ignore[arg-type]
    for spec in columns.TABLES[table]:
        parts = [chunk[spec.name] for chunk in chunks]
        if spec.is_string:
            joined: list[str] = []
            for part in parts:
                joined.extend(part)  # type: ignore[arg-type]
            out[spec.name] = joined
        else:
            out[spec.name] = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return out, rows


class Batcher:
    """Collects chunks per table and emits Batch messages through ``emit``."""

    def __init__(self, *, collector_id: str, host: str, batch_rows: int, batch_interval: float,
                 emit: Callable[[ingest_pb2.Batch, int], None], first_seq: int = 1, compress_level: int = 0,
                 seq_source: Callable[[], int] | None = None,
                 id_source: Callable[[], str] | None = None,
                 on_records: Callable[[int], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.collector_id = collector_id
        self.host = host
        self.batch_rows = batch_rows
        self.batch_interval = batch_interval
        self.compress_level = compress_level  # zstd level of the columns (0 = none; columns.encode_table)
        self._emit = emit
        self._clock = clock
        self.next_seq = first_seq
        self._seq_source = seq_source  # the spool's persistent seqs, when there is one
        self._id_source = id_source  # and its collector_id, read after each seq (a seq can change it)
        self._on_records = on_records  # told how many header/flow records entered the open batch
        self._chunks: dict[str, list[ColumnChunk]] = {}
        self._rows = 0
        self._opened_at: float | None = None

    @property
    def pending_rows(self) -> int:
        return self._rows

    def add(self, table: str, chunk: ColumnChunk) -> None:
        rows = len(chunk[columns.TABLES[table][0].name])  # type: ignore[arg-type]
        if rows == 0:
            return
        if self._opened_at is None:
            self._opened_at = self._clock()
        self._chunks.setdefault(table, []).append(chunk)
        self._rows += rows
        if self._on_records is not None and table != "collector_stats":
            self._on_records(rows)
        if self._rows >= self.batch_rows:
            self.flush()

    def flush_if_due(self) -> None:
        if self._opened_at is not None and self._clock() - self._opened_at >= self.batch_interval:
            self.flush()

    def seconds_until_due(self) -> float:
        if self._opened_at is None:
            return self.batch_interval
        return max(0.0, self._opened_at + self.batch_interval - self._clock())

    def flush(self) -> None:
        """Close the open batch (if it holds anything) and hand it to ``emit``."""
        if not self._chunks:
            return
        seq = self._seq_source() if self._seq_source is not None else self.next_seq
        if self._id_source is not None:
            self.collector_id = self._id_source()
        batch = ingest_pb2.Batch(collector_id=self.collector_id, host=self.host, seq=seq,
                                 created_unix_ns=time.time_ns())
        records = 0  # header and flow records; collector_stats rows are bookkeeping, not counted
        for table, chunks in self._chunks.items():
            cols, n = concat_columns(table, chunks)
            batch.tables.append(columns.encode_table(table, cols, n, level=self.compress_level))
            if table != "collector_stats":
                records += n
        self.next_seq = seq + 1
        self._chunks = {}
        self._rows = 0
        self._opened_at = None
        self._emit(batch, records)
