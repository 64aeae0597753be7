"""The per-minute rollups, computed by the server from each flush (not by materialized views).

Stage of the path: receive → validate → convert → **roll up** → write → store.

Until schema migration 10 three materialized views grouped every INSERT into ``packets`` by
minute, ports and address pairs inside ClickHouse, and their cost grew with the number of
groups: a port scan or a random-source flood (every row its own group) cut ingest to a fifth.
Now the writer hands each flush's packets (already Arrow columns) to ``rollup_rows``, which
groups them here with Arrow's hash group-by and returns a small table of partial aggregates,
one row per rollup key, for ``hdrlog.rollup_in`` (a ``Null`` table); three light views move its
rows into ``packets_1m``, ``pairs_1m`` and ``services_1m`` (the ``uniq`` states are made there,
from the key's list of distinct ports or clients). One INSERT per flush, with its own deduplication token; exactly-once
across a crash is the writer's job (``writer.py``, "Rollups").

Bounded cost. Each rollup table keeps, per (host, minute) and flush, at most ``max_keys`` keys: when a flush has more, the ``max_keys`` with the most packets (ties by
key) keep their own rows, exact for that flush, and the rest of that minute's traffic in the
flush is summed into one row with ``other = 1`` (addresses ``::``, port 0, protocol 0, direction
''), whose ``folded_keys`` says how many keys it stands for (pairs_1m, services_1m; packets_1m,
a SummingMergeTree that sums only its measures, counts them in the server's metric only). Sums over a minute, ``other`` rows included,
always equal the raw table's. The choice is deterministic (the same rows give the same
table, whatever their order), which the crash recovery relies on.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

NS_PER_MINUTE = 60 * 1_000_000_000
DEFAULT_MAX_KEYS = 5_000
KIND_PACKETS, KIND_PAIRS, KIND_SERVICES = 0, 1, 2

# The columns of hdrlog.rollup_in (server/schema.py), in order, with their Arrow types.
STAGE_SCHEMA = pa.schema([
    ("kind", pa.uint8()),
    ("minute", pa.uint32()),
    ("host", pa.string()),
    ("direction", pa.string()),
    ("src_ip", pa.binary(16)),
    ("dst_ip", pa.binary(16)),
    ("ip_proto", pa.uint8()),
    ("port", pa.uint16()),
    ("ports", pa.list_(pa.uint16())),
    ("clients", pa.list_(pa.binary(16))),
    ("other", pa.uint8()),
    ("folded_keys", pa.uint64()),
    ("packets", pa.uint64()),
    ("bytes", pa.uint64()),
    ("records", pa.uint64()),
    ("syns", pa.uint64()),
    ("synacks", pa.uint64()),
    ("rsts", pa.uint64()),
])
# The raw packets columns a rollup reads (the crash recovery selects just these).
SOURCE_COLUMNS = ("ts", "host", "direction", "sample_rate", "wire_len", "ip_version", "src_ip", "dst_ip",
                  "ip_proto", "src_port", "dst_port", "tcp_flags")


def _np(col) -> np.ndarray:
    return np.asarray(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)


def _source(data: pa.Table) -> dict[str, object]:
    """The columns the rollups need, as numpy (fixed width) or Arrow string arrays."""
    rows = data.num_rows
    ts = data.column("ts")
    ts = ts.cast(pa.int64()) if not pa.types.is_integer(ts.type) else ts
    out: dict[str, object] = {"minute": (_np(ts) // NS_PER_MINUTE * 60).astype(np.uint32)}
    for name in ("host", "direction"):
        col = data.column(name)
        out[name] = col.cast(pa.string()) if col.type != pa.string() else col
    for name in ("src_ip", "dst_ip"):
        col = data.column(name).combine_chunks()
        if col.type != pa.binary(16):
            col = col.cast(pa.binary(16))
        out[name] = col
    for name in ("sample_rate", "wire_len", "ip_version", "ip_proto", "src_port", "dst_port", "tcp_flags"):
        out[name] = _np(data.column(name))
    out["rows"] = rows
    return out


def _group(table: pa.Table, keys: list[str], sums: list[str], distinct: str = "") -> pa.Table:
    """Group ``table`` by ``keys``, sum ``sums`` and list the ``distinct`` values of one column
    (columns keep their names; the list is named ``values``)."""
    aggs = [(s, "sum") for s in sums] + ([(distinct, "distinct")] if distinct else [])
    g = table.group_by(keys, use_threads=False).aggregate(aggs)
    return g.rename_columns([c[:-4] if c.endswith("_sum") else "values" if c.endswith("_distinct") else c
                             for c in g.column_names])


def _codes(col) -> np.ndarray:
    """Sortable numbers for a key column, the same whatever the rows' order: strings by their
    rank among the column's distinct values, numbers as they are."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        values = pc.unique(col)
        values = values.take(pc.sort_indices(values))
        return _np(pc.index_in(col, value_set=values)).astype(np.int64)
    return _np(col)


def _halves(col) -> tuple[np.ndarray, np.ndarray]:
    """A FixedSizeBinary(16) column as two big-endian uint64 (their order is the bytes' order)."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    raw = np.frombuffer(col.buffers()[1], dtype=">u8", count=2 * (col.offset + len(col)))[2 * col.offset:]
    return raw[0::2], raw[1::2]


def _bound(keyed: pa.Table, key: list[str], max_keys: int, sums: list[str]) -> tuple[pa.Table, int]:
    """Keep at most ``max_keys`` rows (one per key) per (host, minute) of ``keyed``; fold the rest
    of each such minute into one ``other`` row (key columns zero, ``values`` empty,
    ``folded_keys`` = how many). Returns the table and the number of keys folded."""
    if keyed.num_rows <= max_keys:
        return keyed, 0
    host, minute = _codes(keyed.column("host")), _np(keyed.column("minute")).astype(np.int64)
    hm = (host << 32) | minute
    _, counts = np.unique(hm, return_counts=True)
    if int(counts.max()) <= max_keys:
        return keyed, 0
    # Rank the keys inside each (host, minute): most packets first, then by key (deterministic).
    packets = _np(keyed.column("packets")).astype(np.uint64)
    tie: list[np.ndarray] = []
    for k in key:
        if k in ("host", "minute"):
            continue
        col = keyed.column(k)
        tie += list(_halves(col)) if col.type == pa.binary(16) else [_codes(col)]
    order = np.lexsort([*reversed(tie), np.iinfo(np.uint64).max - packets, minute, host])
    g = hm[order]
    new_group = np.ones(len(g), dtype=bool)
    new_group[1:] = g[1:] != g[:-1]
    starts = np.flatnonzero(new_group)
    pos = np.arange(len(g)) - np.repeat(starts, np.diff(np.append(starts, len(g))))
    # Back to the rows' own order as a mask (no take of the whole table: 3% of a scan's time).
    keep = np.empty(len(g), dtype=bool)
    keep[order] = pos < max_keys
    kept = keyed.filter(pa.array(keep))
    folded = keyed.filter(pa.array(~keep))
    other = _group(folded.select(["host", "minute"] + sums).append_column(
        "folded_keys", pa.array(np.ones(folded.num_rows, np.uint64))), ["host", "minute"], sums + ["folded_keys"])
    n = other.num_rows
    cols = {}
    for f in kept.schema:
        if f.name in other.column_names:
            cols[f.name] = other.column(f.name).cast(f.type)
        elif f.name == "other":
            cols[f.name] = pa.array(np.ones(n, np.uint8))
        elif f.name == "values":
            cols[f.name] = pa.array([[]] * n, f.type)
        else:
            cols[f.name] = _zeros(f.type, n)
    return pa.concat_tables([kept, pa.table(cols, schema=kept.schema)]), int(folded.num_rows)


def _zeros(t: pa.DataType, n: int) -> pa.Array:
    """``n`` zero values of an Arrow type: 0, '' or ::."""
    if t == pa.binary(16):
        return pa.FixedSizeBinaryArray.from_buffers(t, n, [None, pa.py_buffer(bytes(16 * n))])
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pa.array([""] * n, t)
    if pa.types.is_list(t):
        return pa.array([[]] * n, t)
    return pa.array(np.zeros(n, t.to_pandas_dtype()), t)


def _stage(kind: int, t: pa.Table) -> pa.Table:
    """``t``'s columns completed to STAGE_SCHEMA (absent ones are 0 / '' / :: / [])."""
    n = t.num_rows
    if "values" in t.column_names:
        t = t.rename_columns(["ports" if c == "values" and kind == KIND_PAIRS else
                              "clients" if c == "values" else c for c in t.column_names])
    cols = []
    for f in STAGE_SCHEMA:
        if f.name == "kind":
            cols.append(pa.array(np.full(n, kind, np.uint8)))
        elif f.name in t.column_names:
            cols.append(t.column(f.name).cast(f.type))
        else:
            cols.append(_zeros(f.type, n))
    return pa.Table.from_arrays(cols, schema=STAGE_SCHEMA)


def _marks(t: pa.Table) -> pa.Table:
    n = t.num_rows
    return t.append_column("other", pa.array(np.zeros(n, np.uint8))) \
            .append_column("folded_keys", pa.array(np.zeros(n, np.uint64)))


def rollup_rows(data: pa.Table, max_keys: int = DEFAULT_MAX_KEYS) -> tuple[pa.Table, int]:
    """The partial aggregates of one flush's ``packets`` rows, as rows of ``hdrlog.rollup_in``
    (one per key); and how many (key, flush) pairs were folded into ``other`` rows."""
    s = _source(data)
    rate = s["sample_rate"].astype(np.uint64)
    wire = s["wire_len"].astype(np.uint64) * rate
    proto, sport, dport, flags = s["ip_proto"], s["src_port"], s["dst_port"], s["tcp_flags"]
    tcp = proto == 6
    syn = tcp & ((flags & 0x12) == 0x02)
    synack = tcp & ((flags & 0x12) == 0x12)
    rst = tcp & ((flags & 0x04) != 0)
    port = np.where((sport == 0) | (dport == 0), np.maximum(sport, dport), np.minimum(sport, dport)).astype(np.uint16)
    base = {"minute": pa.array(s["minute"]), "host": s["host"], "ip_proto": pa.array(proto)}
    # packets_1m: by direction, protocol and service port (a scan makes every port one).
    key = ["minute", "host", "direction", "ip_proto", "port"]
    sums = ["packets", "bytes", "records"]
    p1 = _group(pa.table({**base, "direction": s["direction"], "port": pa.array(port),
                          "packets": pa.array(rate), "bytes": pa.array(wire),
                          "records": pa.array(np.ones(s["rows"], np.uint64))}), key, sums)
    p1, folded = _bound(_marks(p1), key, max_keys, sums)
    out = [_stage(KIND_PACKETS, p1)]
    # pairs_1m: one row per pair with its distinct destination ports (the view makes the uniq state).
    ip = s["ip_version"] != 0
    if ip.any():
        key = ["minute", "host", "src_ip", "dst_ip", "ip_proto"]
        sums = ["packets", "bytes", "syns", "synacks", "rsts"]
        pairs = pa.table({**base, "src_ip": s["src_ip"], "dst_ip": s["dst_ip"], "port": pa.array(dport),
                          "packets": pa.array(rate), "bytes": pa.array(wire),
                          "syns": pa.array(np.where(syn, rate, 0)), "synacks": pa.array(np.where(synack, rate, 0)),
                          "rsts": pa.array(np.where(rst, rate, 0))}).filter(pa.array(ip))
        keyed, n = _bound(_marks(_group(pairs, key, sums, "port")), key, max_keys, sums)
        folded += n
        out.append(_stage(KIND_PAIRS, keyed))
    # services_1m: a SYN-ACK from (ip, port), or a UDP reply from a low port; with its distinct clients.
    svc = synack | ((proto == 17) & (sport != 0) & (sport < dport) & (sport < 32768))
    if svc.any():
        key = ["minute", "host", "src_ip", "ip_proto", "port"]
        t = pa.table({**base, "src_ip": s["src_ip"], "port": pa.array(sport), "client": s["dst_ip"],
                      "packets": pa.array(rate)}).filter(pa.array(svc))
        keyed, n = _bound(_marks(_group(t, key, ["packets"], "client")), key, max_keys, ["packets"])
        folded += n
        out.append(_stage(KIND_SERVICES, keyed))
    return pa.concat_tables(out), folded
