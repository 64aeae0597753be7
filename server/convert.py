"""Validate a received Batch and turn its columns into Arrow tables, without per-row Python.

Fixed-width columns become Arrow arrays over the message's own bytes (zero
copy); string columns are Arrow StringArrays over the sent values/offsets,
checked for UTF-8 by Arrow; ``V16`` addresses become FixedSizeBinary(16), which
ClickHouse reads into ``IPv6``; ``*_ts`` int64 nanoseconds become
timestamp('ns', 'UTC') for ``DateTime64(9, 'UTC')``; ``direction`` 1/2 becomes a
dictionary array over ('', 'ingress', 'egress') for ``LowCardinality(String)``, ``tunnel_type`` 0..4 one
over ('', 'vxlan', 'geneve', 'gre', 'ipip').
The server-side columns ``host``, ``collector_id`` (one-entry dictionaries, int32 indices) and
``batch_seq`` are added here.

Any problem raises ``BatchError`` with a one-line reason naming the column and a
short ``kind`` used as a metric label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from hdrlog.proto import columns as registry
from hdrlog.proto import ingest_pb2
from hdrlog.server.schema import PARTITION_TS

NS_PER_DAY = 86_400 * 1_000_000_000
# toDate() covers days 0 .. 65535 (1970-01-01 .. 2149-06-06); outside it wraps.
MAX_DAY = 65_535
# A table claiming more rows than this is refused before anything is allocated.
MAX_ROWS = 10_000_000
# Bytes the compressed columns of one batch may inflate to, unless the caller says (ingest.py
# passes max_message_bytes).
DEFAULT_INFLATE_LIMIT = 64 << 20

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+=/-]{0,254}$")
_DIRECTIONS = pa.array(["", registry.DIRECTIONS[1], registry.DIRECTIONS[2]])
_TUNNEL_TYPES = pa.array(list(registry.TUNNEL_TYPES))
_TIME_COLUMNS = {"ts", "start_ts", "end_ts", "first_seen", "last_seen"}  # DateTime64(9) from UTC ns


class BatchError(ValueError):
    """The batch is invalid and will never be stored; str() is the reason for the Ack."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


@dataclass
class TableRows:
    """One table of one batch, ready to insert."""

    name: str
    data: pa.Table
    days: np.ndarray  # per row: UTC day number of the partition column

    @property
    def rows(self) -> int:
        return self.data.num_rows


def check_name(kind: str, value: str) -> None:
    if not value:
        raise BatchError(kind, f"{kind} is empty")
    if not _NAME_RE.match(value):
        shown = value if len(value) <= 64 else value[:61] + "..."
        raise BatchError(kind, f"{kind} {shown!r} is not allowed (letters, digits and ._:@+=/- up to 255 characters)")


def _server_string(value: str, rows: int) -> pa.DictionaryArray:
    """One value for every row, as a one-entry dictionary with int32 indices.

    The width matters: a flush concatenates the batches of every collector, and Arrow unifies
    their dictionaries into one whose indices must address every distinct value (int8 stopped at
    128 collectors per flush; int32 holds any fleet).
    """
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype=np.int32)), pa.array([value]))


def convert_table(msg: ingest_pb2.Table, host: str, collector_id: str, seq: int,
                  inflater: registry.Inflater | None = None) -> TableRows:
    """One Table message -> Arrow table in the SQL column order of the registry plus server columns."""
    if msg.rows > MAX_ROWS:
        raise BatchError("columns", f"table {msg.name!r} claims {msg.rows} rows (at most {MAX_ROWS} per batch)")
    try:
        cols, _ignored = registry.decode_table(msg, inflater or registry.Inflater(DEFAULT_INFLATE_LIMIT))
    except registry.InflateError as exc:
        raise BatchError("inflate", str(exc)) from None
    except registry.ColumnError as exc:
        raise BatchError("unknown_table" if "unknown table" in str(exc) else "columns", str(exc)) from None
    rows = int(msg.rows)
    arrays: dict[str, pa.Array] = {}
    for spec in registry.TABLES[msg.name]:
        value = cols[spec.name]
        where = f"column {msg.name}.{spec.name}"
        if spec.is_string:
            data, offsets = value  # type: ignore[misc]
            arr = pa.StringArray.from_buffers(rows, pa.py_buffer(offsets), pa.py_buffer(data))
            try:
                arr.validate(full=True)
            except pa.ArrowInvalid as exc:
                raise BatchError("utf8", f"{where} is not valid UTF-8 ({exc})") from None
            arrays[spec.name] = arr
        elif spec.name in _TIME_COLUMNS:
            ts = np.asarray(value)
            arrays[spec.name] = pa.Array.from_buffers(pa.timestamp("ns", "UTC"), rows, [None, pa.py_buffer(ts)])
        elif spec.name == "direction":
            d = np.asarray(value)
            if rows and int(d.max()) > 2:
                bad = int(np.argmax(d > 2))
                raise BatchError("columns", f"{where} has value {int(d[bad])} at row {bad} "
                                            "(allowed: 1 = ingress, 2 = egress, 0 = unknown)")
            arrays[spec.name] = pa.DictionaryArray.from_arrays(pa.Array.from_buffers(
                pa.uint8(), rows, [None, pa.py_buffer(d)]), _DIRECTIONS)
        elif spec.name == "tunnel_type":
            d = np.asarray(value)
            top = len(registry.TUNNEL_TYPES) - 1
            if rows and int(d.max()) > top:
                bad = int(np.argmax(d > top))
                raise BatchError("columns", f"{where} has value {int(d[bad])} at row {bad} (allowed: 0 .. {top}, "
                                            f"{', '.join(f'{i} = {n or chr(39) * 2}' for i, n in enumerate(registry.TUNNEL_TYPES))})")
            arrays[spec.name] = pa.DictionaryArray.from_arrays(pa.Array.from_buffers(
                pa.uint8(), rows, [None, pa.py_buffer(d)]), _TUNNEL_TYPES)
        elif spec.dtype == "V16":
            raw = np.asarray(value).view(np.uint8)
            arrays[spec.name] = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), rows, [None, pa.py_buffer(raw)])
        else:
            arrays[spec.name] = pa.array(np.asarray(value))
    ts_name = PARTITION_TS[msg.name]
    ts = np.asarray(cols[ts_name])
    days = ts // NS_PER_DAY if rows else np.zeros(0, dtype=np.int64)
    if rows and (int(days.min()) < 0 or int(days.max()) > MAX_DAY):
        bad = int(np.argmax((days < 0) | (days > MAX_DAY)))
        raise BatchError("columns", f"column {msg.name}.{ts_name} has {int(ts[bad])} ns at row {bad}, "
                                    "outside 1970-01-01 .. 2149-06-06 UTC")
    arrays["host"] = _server_string(host, rows)
    arrays["collector_id"] = _server_string(collector_id, rows)
    arrays["batch_seq"] = pa.array(np.full(rows, seq, dtype=np.uint64))
    return TableRows(msg.name, pa.table(arrays), days)


def convert_batch(batch: ingest_pb2.Batch, host: str, inflate_limit: int = DEFAULT_INFLATE_LIMIT) -> list[TableRows]:
    """Validate a whole Batch; returns its non-empty tables (a table may appear once).

    Compressed columns inflate to at most ``inflate_limit`` bytes for the whole batch (the server
    passes ``max_message_bytes``: a compressed batch holds no more than an uncompressed one may)."""
    check_name("collector_id", batch.collector_id)
    check_name("host", host)
    inflater = registry.Inflater(inflate_limit)
    out: list[TableRows] = []
    seen: set[str] = set()
    for msg in batch.tables:
        if msg.name in seen:
            raise BatchError("columns", f"table {msg.name!r} appears twice in the batch")
        seen.add(msg.name)
        tr = convert_table(msg, host, batch.collector_id, batch.seq, inflater)
        if tr.rows:
            out.append(tr)
    return out
