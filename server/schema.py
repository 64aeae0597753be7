"""The SQL schema (database ``hdrlog``) and its versioned migrations.

``MIGRATIONS`` is an append-only list of ``(version, [ddl, ...])``. A migration's
text never changes once released: later changes are new entries. Every statement
is idempotent (``IF NOT EXISTS``), so a migration interrupted half-way is simply
applied again; a version is recorded in ``hdrlog.schema_version`` only after all
its statements ran.

Every data table carries three server-side columns besides the registry's
(``hdrlog.proto.columns``): ``host``, ``collector_id`` and ``batch_seq``. The last
two make ingest exactly-once (see ``writer.py``) and cost almost nothing on disk
(LowCardinality / Delta codecs on long runs of equal values).

All data tables are partitioned by UTC day of their time column (``PARTITION_TS``);
the writer relies on that (its watermarks are kept per day, see ``writer.py``).
"""

from __future__ import annotations

import logging
from typing import Callable

from hdrlog.proto import columns as registry

log = logging.getLogger("hdrlog.server")

DATABASE = "hdrlog"

# The time column each table is partitioned by (toDate of it, UTC).
PARTITION_TS = {"packets": "ts", "flows": "start_ts", "collector_stats": "ts"}

_TABLE_SETTINGS = "SETTINGS non_replicated_deduplication_window = 10000, index_granularity = 8192"

_PACKETS_V1 = f"""
CREATE TABLE IF NOT EXISTS {DATABASE}.packets
(
    ts              DateTime64(9, 'UTC') CODEC(Delta, ZSTD(1)),
    host            LowCardinality(String),
    collector_id    LowCardinality(String),
    batch_seq       UInt64 CODEC(Delta, ZSTD(1)),
    ifname          LowCardinality(String),
    direction       LowCardinality(String),
    sample_rate     UInt32,
    wire_len        UInt32,
    eth_src         UInt64,
    eth_dst         UInt64,
    vlan_id         UInt16,
    eth_type        UInt16,
    ip_version      UInt8,
    src_ip          IPv6,
    dst_ip          IPv6,
    ip_proto        UInt8,
    ttl             UInt8,
    dscp            UInt8,
    ecn             UInt8,
    ip_id           UInt32,
    frag_offset     UInt16,
    more_fragments  UInt8,
    dont_fragment   UInt8,
    flow_label      UInt32,
    src_port        UInt16,
    dst_port        UInt16,
    tcp_flags       UInt16,
    tcp_seq         UInt32,
    tcp_ack         UInt32,
    tcp_window      UInt16,
    tcp_mss         UInt16,
    tcp_wscale      UInt8,
    udp_len         UInt16,
    icmp_type       UInt8,
    icmp_code       UInt8,
    dns_id          UInt16,
    dns_qname       String CODEC(ZSTD(1)),
    dns_qtype       UInt16,
    dns_rcode       UInt8,
    http_method     LowCardinality(String),
    http_host       String CODEC(ZSTD(1)),
    http_path       String CODEC(ZSTD(1)),
    http_status     UInt16,
    tls_sni         String CODEC(ZSTD(1)),
    parse_flags     UInt16
)
ENGINE = MergeTree
PARTITION BY toDate(ts)
ORDER BY (host, ts)
{_TABLE_SETTINGS}
"""

_FLOWS_V1 = f"""
CREATE TABLE IF NOT EXISTS {DATABASE}.flows
(
    start_ts        DateTime64(9, 'UTC') CODEC(Delta, ZSTD(1)),
    end_ts          DateTime64(9, 'UTC') CODEC(Delta, ZSTD(1)),
    host            LowCardinality(String),
    collector_id    LowCardinality(String),
    batch_seq       UInt64 CODEC(Delta, ZSTD(1)),
    ifname          LowCardinality(String),
    direction       LowCardinality(String),
    ip_version      UInt8,
    src_ip          IPv6,
    dst_ip          IPv6,
    ip_proto        UInt8,
    src_port        UInt16,
    dst_port        UInt16,
    packets         UInt64,
    bytes           UInt64,
    tcp_flags       UInt16,
    sample_rate     UInt32
)
ENGINE = MergeTree
PARTITION BY toDate(start_ts)
ORDER BY (host, start_ts)
{_TABLE_SETTINGS}
"""

_COLLECTOR_STATS_V1 = f"""
CREATE TABLE IF NOT EXISTS {DATABASE}.collector_stats
(
    ts              DateTime64(9, 'UTC') CODEC(Delta, ZSTD(1)),
    host            LowCardinality(String),
    collector_id    LowCardinality(String),
    batch_seq       UInt64 CODEC(Delta, ZSTD(1)),
    interval_ms     UInt32,
    counter         LowCardinality(String),
    value           UInt64
)
ENGINE = MergeTree
PARTITION BY toDate(ts)
ORDER BY (host, counter, ts)
{_TABLE_SETTINGS}
"""

SCHEMA_VERSION_DDL = f"""
CREATE TABLE IF NOT EXISTS {DATABASE}.schema_version
(
    version     UInt32,
    applied_at  DateTime64(3, 'UTC') DEFAULT now64(3),
    description String
)
ENGINE = MergeTree
ORDER BY version
"""

# (version, description, statements). Append only; never edit a released entry.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "packets, flows and collector_stats", [_PACKETS_V1, _FLOWS_V1, _COLLECTOR_STATS_V1]),
    # Inserted parts (up to a few hundred thousand rows) stay compact: one file instead of two per
    # column. Measured here on 100k-row packet batches: 2.5x the insert rate of wide parts.
    # Merges turn parts wide once they pass 256 MiB, where wide reads better.
    (2, "compact parts for inserts", [
        f"ALTER TABLE {DATABASE}.{t} MODIFY SETTING min_bytes_for_wide_part = 268435456, "
        "min_rows_for_wide_part = 0" for t in ("packets", "flows", "collector_stats")]),
    # App-layer header elements beyond the contract's (issue 3): decoded by the collector from
    # the payload bytes the classifier copies for DNS / HTTP / TLS candidates.
    (3, "packets: dns_flags, dns_answers, http_user_agent, tls_version, tls_offered_versions, tls_alpn", [
        f"ALTER TABLE {DATABASE}.packets ADD COLUMN IF NOT EXISTS dns_flags UInt16",
        f"ALTER TABLE {DATABASE}.packets ADD COLUMN IF NOT EXISTS dns_answers UInt16",
        f"ALTER TABLE {DATABASE}.packets ADD COLUMN IF NOT EXISTS http_user_agent String CODEC(ZSTD(1))",
        f"ALTER TABLE {DATABASE}.packets ADD COLUMN IF NOT EXISTS tls_version UInt16",
        f"ALTER TABLE {DATABASE}.packets ADD COLUMN IF NOT EXISTS tls_offered_versions LowCardinality(String)",
        f"ALTER TABLE {DATABASE}.packets ADD COLUMN IF NOT EXISTS tls_alpn LowCardinality(String)",
    ]),
]

LATEST_VERSION = MIGRATIONS[-1][0]


# ClickHouse type for a registry wire dtype, for columns added to the registry after a migration.
_DTYPE_SQL = {"u1": "UInt8", "<u2": "UInt16", "<u4": "UInt32", "<u8": "UInt64", "<i8": "Int64",
              "V16": "IPv6", "str": "String"}


def column_type(table: str, name: str, dtype: str) -> str:
    """The SQL type of a registry column (the same rules as the DDL above)."""
    if name in ("ts", "start_ts", "end_ts"):
        return "DateTime64(9, 'UTC')"
    if name == "direction":
        return "LowCardinality(String)"
    return _DTYPE_SQL[dtype]


def applied_versions(command: Callable[[str], object]) -> set[int]:
    out = command(f"SELECT arrayStringConcat(groupArray(toString(version)), ',') FROM {DATABASE}.schema_version")
    text = out if isinstance(out, str) else ",".join(map(str, out)) if isinstance(out, (list, tuple)) else str(out)
    return {int(v) for v in text.split(",") if v.strip()}


def migrate(command: Callable[[str], object]) -> list[int]:
    """Create the database and apply missing migrations; returns the versions applied now."""
    command(f"CREATE DATABASE IF NOT EXISTS {DATABASE}")
    command(SCHEMA_VERSION_DDL)
    done = applied_versions(command)
    applied: list[int] = []
    for version, description, statements in MIGRATIONS:
        if version in done:
            continue
        for ddl in statements:
            command(ddl)
        safe = description.replace("\\", "\\\\").replace("'", "\\'")
        command(f"INSERT INTO {DATABASE}.schema_version (version, description) VALUES ({version}, '{safe}')")
        log.info("server: schema migration %d applied (%s)", version, description)
        applied.append(version)
    sync_columns(command)
    return applied


def sync_columns(command: Callable[[str], object]) -> list[str]:
    """Add registry columns that the tables lack (a column added to the wire contract).

    Columns are only ever added (``ADD COLUMN IF NOT EXISTS``, existing rows read 0 / ''),
    never changed or dropped: renames and type changes need a versioned migration.
    Returns the ``table.column`` names added.
    """
    added: list[str] = []
    for table, specs in registry.TABLES.items():
        out = command(f"SELECT arrayStringConcat(groupArray(name), ',') FROM system.columns "
                      f"WHERE database = '{DATABASE}' AND table = '{table}'")
        text = out if isinstance(out, str) else ",".join(map(str, out)) if isinstance(out, (list, tuple)) else str(out)
        have = set(text.split(","))
        for spec in specs:
            if spec.name not in have:
                command(f"ALTER TABLE {DATABASE}.{table} ADD COLUMN IF NOT EXISTS {spec.name} "
                        f"{column_type(table, spec.name, spec.dtype)}")
                log.info("server: column %s.%s added (new in the column registry)", table, spec.name)
                added.append(f"{table}.{spec.name}")
    return added
