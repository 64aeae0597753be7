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
PARTITION_TS = {"packets": "ts", "flows": "start_ts", "connections": "start_ts", "collector_stats": "ts",
                "dns_names": "first_seen"}

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

# -- issue 7: a schema worth querying ------------------------------------------------------
# Codecs measured by bench/schema_bench.py (BENCHMARKS.md): small integers in narrow ranges take
# T64 (bit-transposed, drops unused high bits) then ZSTD; addresses, MACs and random numbers take
# ZSTD; names repeat a lot and take LowCardinality (a dictionary per part). A codec change is
# metadata only (new parts and merges use it); a LowCardinality change rewrites the column once.
_PACKETS_CODECS = {
    **{c: "UInt8 CODEC(T64, ZSTD(1))" for c in (
        "ip_version", "ip_proto", "ttl", "dscp", "ecn", "more_fragments", "dont_fragment", "tcp_wscale",
        "icmp_type", "icmp_code", "dns_rcode")},
    **{c: "UInt16 CODEC(T64, ZSTD(1))" for c in (
        "vlan_id", "eth_type", "frag_offset", "src_port", "dst_port", "tcp_flags", "tcp_window", "tcp_mss",
        "udp_len", "dns_qtype", "http_status", "parse_flags", "dns_flags", "dns_answers", "tls_version")},
    "dns_id": "UInt16 CODEC(ZSTD(1))",
    **{c: "UInt32 CODEC(T64, ZSTD(1))" for c in ("sample_rate", "wire_len")},
    **{c: "UInt32 CODEC(ZSTD(1))" for c in ("ip_id", "flow_label", "tcp_seq", "tcp_ack")},
    **{c: "UInt64 CODEC(ZSTD(1))" for c in ("eth_src", "eth_dst")},
    **{c: "IPv6 CODEC(ZSTD(1))" for c in ("src_ip", "dst_ip")},
    **{c: "LowCardinality(String) CODEC(ZSTD(1))" for c in ("dns_qname", "http_host", "tls_sni", "http_user_agent")},
}
_FLOWS_CODECS = {
    **{c: "UInt8 CODEC(T64, ZSTD(1))" for c in ("ip_version", "ip_proto")},
    **{c: "UInt16 CODEC(T64, ZSTD(1))" for c in ("src_port", "dst_port", "tcp_flags")},
    **{c: "UInt64 CODEC(T64, ZSTD(1))" for c in ("packets", "bytes")},
    "sample_rate": "UInt32 CODEC(T64, ZSTD(1))",
    **{c: "IPv6 CODEC(ZSTD(1))" for c in ("src_ip", "dst_ip")},
}
# Skip indexes for "a time range plus an address or a port" when the host is not given (the
# primary key (host, ts) serves "time range plus host"). Bloom filters over 4 granules (32k rows):
# measured on the bench's data, a lookup of one address or port reads a fraction of the granules.
_SKIP_INDEXES = {
    "packets": [("idx_src_ip", "src_ip", "bloom_filter(0.01)", 4), ("idx_dst_ip", "dst_ip", "bloom_filter(0.01)", 4),
                ("idx_src_port", "src_port", "bloom_filter(0.01)", 4), ("idx_dst_port", "dst_port", "bloom_filter(0.01)", 4)],
    "flows": [("idx_src_ip", "src_ip", "bloom_filter(0.01)", 4), ("idx_dst_ip", "dst_ip", "bloom_filter(0.01)", 4),
              ("idx_dst_port", "dst_port", "bloom_filter(0.01)", 4)],
}


def _codec_ddl(table: str, codecs: dict[str, str]) -> list[str]:
    return [f"ALTER TABLE {DATABASE}.{table} MODIFY COLUMN IF EXISTS {c} {t}" for c, t in codecs.items()]


def _index_ddl(table: str) -> list[str]:
    out = []
    for name, expr, kind, gran in _SKIP_INDEXES[table]:
        out.append(f"ALTER TABLE {DATABASE}.{table} ADD INDEX IF NOT EXISTS {name} {expr} TYPE {kind} GRANULARITY {gran}")
        out.append(f"ALTER TABLE {DATABASE}.{table} MATERIALIZE INDEX IF EXISTS {name}")
    return out


# Per-minute rollups. Filled by materialized views on every insert into packets until migration 10;
# since then the server computes them per flush (server/rollup.py, see below). Counts are weighted
# by sample_rate (estimated packets on the wire); `records` counts logged rows.
# `port` is the service side by the usual heuristic: the lower of the two ports (0 without L4).
ROLLUP_TABLES = ("packets_1m", "pairs_1m", "services_1m")
_ROLLUP_SETTINGS = "SETTINGS non_replicated_deduplication_window = 10000"

_PACKETS_1M = f"""
CREATE TABLE IF NOT EXISTS {DATABASE}.packets_1m
(
    minute      DateTime('UTC') CODEC(Delta, ZSTD(1)),
    host        LowCardinality(String),
    direction   LowCardinality(String),
    ip_proto    UInt8,
    port        UInt16,
    packets     UInt64 CODEC(T64, ZSTD(1)),
    bytes       UInt64 CODEC(T64, ZSTD(1)),
    records     UInt64 CODEC(T64, ZSTD(1))
)
ENGINE = SummingMergeTree((packets, bytes, records))
PARTITION BY toDate(minute)
ORDER BY (host, minute, direction, ip_proto, port)
{_ROLLUP_SETTINGS}
"""

_PACKETS_1M_MV = f"""
CREATE MATERIALIZED VIEW IF NOT EXISTS {DATABASE}.packets_1m_mv TO {DATABASE}.packets_1m AS
SELECT toStartOfMinute(ts) AS minute, host, direction, ip_proto,
       if(src_port = 0 OR dst_port = 0, greatest(src_port, dst_port), least(src_port, dst_port)) AS port,
       sum(toUInt64(sample_rate)) AS packets, sum(toUInt64(wire_len) * sample_rate) AS bytes, count() AS records
FROM {DATABASE}.packets
GROUP BY minute, host, direction, ip_proto, port
"""

# Connections by pair: TCP SYNs (connection attempts), SYN-ACKs (accepted), RSTs, and how many
# distinct destination ports the pair used (uniqMerge(dst_ports) to read it).
_PAIRS_1M = f"""
CREATE TABLE IF NOT EXISTS {DATABASE}.pairs_1m
(
    minute      DateTime('UTC') CODEC(Delta, ZSTD(1)),
    host        LowCardinality(String),
    src_ip      IPv6 CODEC(ZSTD(1)),
    dst_ip      IPv6 CODEC(ZSTD(1)),
    ip_proto    UInt8,
    packets     SimpleAggregateFunction(sum, UInt64),
    bytes       SimpleAggregateFunction(sum, UInt64),
    syns        SimpleAggregateFunction(sum, UInt64),
    synacks     SimpleAggregateFunction(sum, UInt64),
    rsts        SimpleAggregateFunction(sum, UInt64),
    dst_ports   AggregateFunction(uniq, UInt16)
)
ENGINE = AggregatingMergeTree
PARTITION BY toDate(minute)
ORDER BY (host, minute, src_ip, dst_ip, ip_proto)
{_ROLLUP_SETTINGS}
"""

_PAIRS_1M_MV = f"""
CREATE MATERIALIZED VIEW IF NOT EXISTS {DATABASE}.pairs_1m_mv TO {DATABASE}.pairs_1m AS
SELECT toStartOfMinute(ts) AS minute, host, src_ip, dst_ip, ip_proto,
       sum(toUInt64(sample_rate)) AS packets, sum(toUInt64(wire_len) * sample_rate) AS bytes,
       sumIf(toUInt64(sample_rate), ip_proto = 6 AND bitAnd(tcp_flags, 0x12) = 0x02) AS syns,
       sumIf(toUInt64(sample_rate), ip_proto = 6 AND bitAnd(tcp_flags, 0x12) = 0x12) AS synacks,
       sumIf(toUInt64(sample_rate), ip_proto = 6 AND bitAnd(tcp_flags, 0x04) != 0) AS rsts,
       uniqState(dst_port) AS dst_ports
FROM {DATABASE}.packets
WHERE ip_version != 0
GROUP BY minute, host, src_ip, dst_ip, ip_proto
"""

# Services that answered: a TCP SYN-ACK from (ip, port), or a UDP packet from a port below the
# peer's one and below 32768 (a reply from a service, by the usual heuristic).
_SERVICES_1M = f"""
CREATE TABLE IF NOT EXISTS {DATABASE}.services_1m
(
    minute      DateTime('UTC') CODEC(Delta, ZSTD(1)),
    host        LowCardinality(String),
    ip          IPv6 CODEC(ZSTD(1)),
    ip_proto    UInt8,
    port        UInt16,
    replies     SimpleAggregateFunction(sum, UInt64),
    clients     AggregateFunction(uniq, IPv6)
)
ENGINE = AggregatingMergeTree
PARTITION BY toDate(minute)
ORDER BY (host, minute, ip, ip_proto, port)
{_ROLLUP_SETTINGS}
"""

_SERVICES_1M_MV = f"""
CREATE MATERIALIZED VIEW IF NOT EXISTS {DATABASE}.services_1m_mv TO {DATABASE}.services_1m AS
SELECT toStartOfMinute(ts) AS minute, host, src_ip AS ip, ip_proto, src_port AS port,
       sum(toUInt64(sample_rate)) AS replies, uniqState(dst_ip) AS clients
FROM {DATABASE}.packets
WHERE (ip_proto = 6 AND bitAnd(tcp_flags, 0x12) = 0x12)
   OR (ip_proto = 17 AND src_port != 0 AND src_port < dst_port AND src_port < 32768)
GROUP BY minute, host, ip, ip_proto, port
"""

# One row per finding of a report (hdrlog report, or the server's --report-every).
_ANOMALIES = f"""
CREATE TABLE IF NOT EXISTS {DATABASE}.anomalies
(
    report_id     String,
    report_ts     DateTime64(3, 'UTC'),
    window_start  DateTime64(3, 'UTC'),
    window_end    DateTime64(3, 'UTC'),
    detector      LowCardinality(String),
    severity      LowCardinality(String),
    subject_kind  LowCardinality(String),
    subject       String,
    host          LowCardinality(String),
    title         String,
    score         Float64,
    first_seen    DateTime64(3, 'UTC'),
    last_seen     DateTime64(3, 'UTC'),
    evidence      String CODEC(ZSTD(3))
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(report_ts)
ORDER BY (report_ts, detector, subject)
"""

MIGRATIONS += [
    (4, "codecs, LowCardinality names and skip indexes on packets and flows",
     _codec_ddl("packets", _PACKETS_CODECS) + _codec_ddl("flows", _FLOWS_CODECS)
     + _index_ddl("packets") + _index_ddl("flows")),
    (5, "per-minute rollups: packets_1m, pairs_1m, services_1m and their materialized views",
     [_PACKETS_1M, _PAIRS_1M, _SERVICES_1M,
      _PACKETS_1M_MV, _PAIRS_1M_MV, _SERVICES_1M_MV]),
    (6, "anomalies (findings of hdrlog report)", [_ANOMALIES]),
    # Issue 14: the inner VLAN tag (QinQ and deeper), and which app-layer values were cut
    # (bits in collector/appheaders.py TRUNC_*, documented in docs/sql.md).
    (7, "packets: vlan_inner_id, truncated", [
        f"ALTER TABLE {DATABASE}.packets ADD COLUMN IF NOT EXISTS vlan_inner_id UInt16 CODEC(T64, ZSTD(1))",
        f"ALTER TABLE {DATABASE}.packets ADD COLUMN IF NOT EXISTS truncated UInt16 CODEC(T64, ZSTD(1))",
    ]),
]

# -- issue 13: connections ------------------------------------------------------------------
# One row per connection and interface with Zeek's semantics. A connection that lives across
# interim intervals has several rows with the same uid (final = 0, cumulative), then one final
# row. Plain MergeTree and exactly-once like the other tables (no ReplacingMergeTree: a merge
# must never be what makes a count right). Latest state of each connection:
#   SELECT * FROM hdrlog.connections WHERE final = 1                       -- ended ones
#   SELECT uid, argMax(orig_bytes, (end_ts, final)) ... GROUP BY uid       -- ended or still open
# Partitioned by start_ts, so every row of a connection is in its first day's partition.
_CONNECTIONS_V1 = f"""
CREATE TABLE IF NOT EXISTS {DATABASE}.connections
(
    start_ts        DateTime64(9, 'UTC') CODEC(Delta, ZSTD(1)),
    end_ts          DateTime64(9, 'UTC') CODEC(Delta, ZSTD(1)),
    host            LowCardinality(String),
    collector_id    LowCardinality(String),
    batch_seq       UInt64 CODEC(Delta, ZSTD(1)),
    ifname          LowCardinality(String),
    uid             String CODEC(ZSTD(1)),
    final           UInt8,
    ip_version      UInt8 CODEC(T64, ZSTD(1)),
    ip_proto        UInt8 CODEC(T64, ZSTD(1)),
    orig_ip         IPv6 CODEC(ZSTD(1)),
    orig_port       UInt16 CODEC(T64, ZSTD(1)),
    resp_ip         IPv6 CODEC(ZSTD(1)),
    resp_port       UInt16 CODEC(T64, ZSTD(1)),
    orig_pkts       UInt64 CODEC(T64, ZSTD(1)),
    resp_pkts       UInt64 CODEC(T64, ZSTD(1)),
    orig_ip_bytes   UInt64 CODEC(T64, ZSTD(1)),
    resp_ip_bytes   UInt64 CODEC(T64, ZSTD(1)),
    orig_bytes      UInt64 CODEC(T64, ZSTD(1)),
    resp_bytes      UInt64 CODEC(T64, ZSTD(1)),
    conn_state      LowCardinality(String),
    history         LowCardinality(String),
    handshake_rtt_us UInt32 CODEC(T64, ZSTD(1)),
    orig_retrans    UInt32 CODEC(T64, ZSTD(1)),
    resp_retrans    UInt32 CODEC(T64, ZSTD(1)),
    zero_windows    UInt32 CODEC(T64, ZSTD(1)),
    community_id    String CODEC(ZSTD(1)),
    INDEX idx_orig_ip orig_ip TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_resp_ip resp_ip TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_resp_port resp_port TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_uid uid TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = MergeTree
PARTITION BY toDate(start_ts)
ORDER BY (host, start_ts)
{_TABLE_SETTINGS}, min_bytes_for_wide_part = 268435456, min_rows_for_wide_part = 0
"""

MIGRATIONS += [
    (8, "connections (one row per connection, Zeek's conn_state and history)", [_CONNECTIONS_V1]),
]

# -- issue 14: names and fingerprints ---------------------------------------------------------
# Passive DNS: one row per interface, client, name and address per collector interval (first and
# last response in it). Latest mapping of a name:
#   SELECT address, max(last_seen), argMax(ttl, last_seen) FROM hdrlog.dns_names WHERE name = 'x' GROUP BY address
_DNS_NAMES_V1 = f"""
CREATE TABLE IF NOT EXISTS {DATABASE}.dns_names
(
    first_seen      DateTime64(9, 'UTC') CODEC(Delta, ZSTD(1)),
    last_seen       DateTime64(9, 'UTC') CODEC(Delta, ZSTD(1)),
    host            LowCardinality(String),
    collector_id    LowCardinality(String),
    batch_seq       UInt64 CODEC(Delta, ZSTD(1)),
    ifname          LowCardinality(String),
    client_ip       IPv6 CODEC(ZSTD(1)),
    name            String CODEC(ZSTD(1)),
    address         IPv6 CODEC(ZSTD(1)),
    ttl             UInt32 CODEC(T64, ZSTD(1)),
    responses       UInt32 CODEC(T64, ZSTD(1)),
    INDEX idx_name name TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_address address TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = MergeTree
PARTITION BY toDate(first_seen)
ORDER BY (host, name, first_seen)
{_TABLE_SETTINGS}
"""

MIGRATIONS += [
    (9, "names and fingerprints: dns_names; packets dns_answer_records, dns_rtt_us, ja4, quic_version; "
        "connections resp_name, tls_sni, tls_alpn, ja4, http_host", [
        _DNS_NAMES_V1,
        f"ALTER TABLE {DATABASE}.packets ADD COLUMN IF NOT EXISTS dns_answer_records String CODEC(ZSTD(1))",
        f"ALTER TABLE {DATABASE}.packets ADD COLUMN IF NOT EXISTS dns_rtt_us UInt32 CODEC(T64, ZSTD(1))",
        f"ALTER TABLE {DATABASE}.packets ADD COLUMN IF NOT EXISTS ja4 LowCardinality(String)",
        f"ALTER TABLE {DATABASE}.packets ADD COLUMN IF NOT EXISTS quic_version UInt32 CODEC(T64, ZSTD(1))",
        f"ALTER TABLE {DATABASE}.connections ADD COLUMN IF NOT EXISTS resp_name String CODEC(ZSTD(1))",
        f"ALTER TABLE {DATABASE}.connections ADD COLUMN IF NOT EXISTS tls_sni String CODEC(ZSTD(1))",
        f"ALTER TABLE {DATABASE}.connections ADD COLUMN IF NOT EXISTS tls_alpn LowCardinality(String)",
        f"ALTER TABLE {DATABASE}.connections ADD COLUMN IF NOT EXISTS ja4 LowCardinality(String)",
        f"ALTER TABLE {DATABASE}.connections ADD COLUMN IF NOT EXISTS http_host String CODEC(ZSTD(1))",
    ]),
]

# Community ID on packets and flows (issue 13 item 4): the key they join connections on.
MIGRATIONS += [
    (10, "packets and flows: community_id", [
        f"ALTER TABLE {DATABASE}.packets ADD COLUMN IF NOT EXISTS community_id String CODEC(ZSTD(1))",
        f"ALTER TABLE {DATABASE}.flows ADD COLUMN IF NOT EXISTS community_id String CODEC(ZSTD(1))",
    ]),
]

# -- issue 16: rollups off the insert path ---------------------------------------------------
# The server groups each flush itself (server/rollup.py) and inserts the partial aggregates into
# rollup_in, a Null table: three light views move them into the rollup tables (the uniq states
# are made there, from one row per distinct value). The views on packets go: their cost grew with
# the number of groups (a scan made every row one); rollup_in carries one row per rollup key, with
# its distinct destination ports (pairs) or clients (services) as arrays. The rollups gain `other` (1 on
# the row that stands for the keys a flush folded when it had more than the server's
# rollup_max_keys in one minute, see docs/sql.md), pairs_1m and services_1m also `folded_keys`
# (how many; packets_1m sums only its measures). rollup_log is the
# writer's journal: a flush's intent before its packets INSERT, its end after the rollup INSERT;
# a start finds the flushes without an end and rolls their stored rows up again (writer.py). It has
# no TTL: the server prunes it (migration 15's comment).
_ROLLUP_IN = f"""
CREATE TABLE IF NOT EXISTS {DATABASE}.rollup_in
(
    kind        UInt8,
    minute      DateTime('UTC'),
    host        LowCardinality(String),
    direction   LowCardinality(String),
    src_ip      IPv6,
    dst_ip      IPv6,
    ip_proto    UInt8,
    port        UInt16,
    ports       Array(UInt16),
    clients     Array(IPv6),
    other       UInt8,
    folded_keys UInt64,
    packets     UInt64,
    bytes       UInt64,
    records     UInt64,
    syns        UInt64,
    synacks     UInt64,
    rsts        UInt64
)
ENGINE = Null
"""

_PACKETS_1M_MV2 = f"""
CREATE MATERIALIZED VIEW IF NOT EXISTS {DATABASE}.packets_1m_in TO {DATABASE}.packets_1m AS
SELECT minute, host, direction, ip_proto, port, other, packets, bytes, records
FROM {DATABASE}.rollup_in WHERE kind = 0
"""

_PAIRS_1M_MV2 = f"""
CREATE MATERIALIZED VIEW IF NOT EXISTS {DATABASE}.pairs_1m_in TO {DATABASE}.pairs_1m AS
SELECT minute, host, src_ip, dst_ip, ip_proto, other,
       sum(packets) AS packets, sum(bytes) AS bytes, sum(syns) AS syns, sum(synacks) AS synacks,
       sum(rsts) AS rsts, uniqMergeState(arrayReduce('uniqState', ports)) AS dst_ports,
       sum(folded_keys) AS folded_keys
FROM {DATABASE}.rollup_in WHERE kind = 1
GROUP BY minute, host, src_ip, dst_ip, ip_proto, other
"""

_SERVICES_1M_MV2 = f"""
CREATE MATERIALIZED VIEW IF NOT EXISTS {DATABASE}.services_1m_in TO {DATABASE}.services_1m AS
SELECT minute, host, src_ip AS ip, ip_proto, port, other,
       sum(packets) AS replies, uniqMergeState(arrayReduce('uniqState', clients)) AS clients,
       sum(folded_keys) AS folded_keys
FROM {DATABASE}.rollup_in WHERE kind = 2
GROUP BY minute, host, ip, ip_proto, port, other
"""

_ROLLUP_LOG = f"""
CREATE TABLE IF NOT EXISTS {DATABASE}.rollup_log
(
    at            DateTime('UTC') DEFAULT now(),
    token         String,
    state         UInt8,
    collector_ids Array(String),
    seqs          Array(UInt64),
    days          Array(UInt32),
    members       Array(String)
)
ENGINE = MergeTree
ORDER BY (token, state)
"""

MIGRATIONS += [
    (11, "rollups computed by the server: rollup_in and its views, other/folded_keys, rollup_log; "
        "the materialized views on packets dropped", [
        f"DROP VIEW IF EXISTS {DATABASE}.packets_1m_mv",
        f"DROP VIEW IF EXISTS {DATABASE}.pairs_1m_mv",
        f"DROP VIEW IF EXISTS {DATABASE}.services_1m_mv",
        f"ALTER TABLE {DATABASE}.packets_1m ADD COLUMN IF NOT EXISTS other UInt8, "
        "MODIFY ORDER BY (host, minute, direction, ip_proto, port, other)",
        f"ALTER TABLE {DATABASE}.pairs_1m ADD COLUMN IF NOT EXISTS other UInt8, "
        "ADD COLUMN IF NOT EXISTS folded_keys SimpleAggregateFunction(sum, UInt64), "
        "MODIFY ORDER BY (host, minute, src_ip, dst_ip, ip_proto, other)",
        f"ALTER TABLE {DATABASE}.services_1m ADD COLUMN IF NOT EXISTS other UInt8, "
        "ADD COLUMN IF NOT EXISTS folded_keys SimpleAggregateFunction(sum, UInt64), "
        "MODIFY ORDER BY (host, minute, ip, ip_proto, port, other)",
        _ROLLUP_IN, _PACKETS_1M_MV2, _PAIRS_1M_MV2, _SERVICES_1M_MV2, _ROLLUP_LOG,
    ]),
]

# -- issue 14 item 5: tunnels ---------------------------------------------------------------
# A decapsulated packet's L3/L4 columns are the inner packet's; these say which tunnel it came in
# and its outer endpoints. Connections and flows are the inner flow's, keyed with the tunnel type
# and id (tenants of an overlay reuse addresses). tunnel_type travels as a number and is stored
# by name ('' when not tunnelled), like direction.
_TUNNEL_TYPE = "LowCardinality(String)"
MIGRATIONS += [
    (12, "tunnels: packets tunnel_type, tunnel_id, tunnel_flags, tunnel_vlan_id, outer_src_ip, outer_dst_ip; "
         "connections tunnel_type, tunnel_id, outer_orig_ip, outer_resp_ip; flows tunnel_type, tunnel_id", [
        f"ALTER TABLE {DATABASE}.packets ADD COLUMN IF NOT EXISTS tunnel_type {_TUNNEL_TYPE}, "
        "ADD COLUMN IF NOT EXISTS tunnel_id UInt32 CODEC(T64, ZSTD(1)), "
        "ADD COLUMN IF NOT EXISTS tunnel_flags UInt8 CODEC(T64, ZSTD(1)), "
        "ADD COLUMN IF NOT EXISTS tunnel_vlan_id UInt16 CODEC(T64, ZSTD(1)), "
        "ADD COLUMN IF NOT EXISTS outer_src_ip IPv6 CODEC(ZSTD(1)), "
        "ADD COLUMN IF NOT EXISTS outer_dst_ip IPv6 CODEC(ZSTD(1))",
        f"ALTER TABLE {DATABASE}.connections ADD COLUMN IF NOT EXISTS tunnel_type {_TUNNEL_TYPE}, "
        "ADD COLUMN IF NOT EXISTS tunnel_id UInt32 CODEC(T64, ZSTD(1)), "
        "ADD COLUMN IF NOT EXISTS outer_orig_ip IPv6 CODEC(ZSTD(1)), "
        "ADD COLUMN IF NOT EXISTS outer_resp_ip IPv6 CODEC(ZSTD(1))",
        f"ALTER TABLE {DATABASE}.flows ADD COLUMN IF NOT EXISTS tunnel_type {_TUNNEL_TYPE}, "
        "ADD COLUMN IF NOT EXISTS tunnel_id UInt32 CODEC(T64, ZSTD(1))",
    ]),
]

# -- issue 16: the rollup journal per rollup INSERT ------------------------------------------
# A server that owns its store journals a rollup when it stores it (one intent per rollup INSERT, after
# the flushes' packets), and a start rolls up the stored batches that no intent names (writer.py,
# "Rollups"). Batches stored before that (by materialized views before migration 11, or journaled per
# flush since) are rolled up already: they are named here once, as finished entries (an intent and
# its end per collector and day), so no start takes them for unjournaled ones.
MIGRATIONS += [
    (13, "rollup journal per rollup INSERT: the batches stored until now named as rolled up", [
        f"INSERT INTO {DATABASE}.rollup_log (token, state, collector_ids, seqs, days, members) "
        "SELECT concat('hdrlog-m13-', hex(cityHash64(collector_id, day))), state, "
        "arrayMap(x -> collector_id, s), s, arrayMap(x -> day, s), [] "
        "FROM (SELECT collector_id, toUInt32(toDate(ts)) AS day, arraySort(groupUniqArray(batch_seq)) AS s "
        f"FROM {DATABASE}.packets GROUP BY collector_id, day) ARRAY JOIN [0, 1] AS state",
    ]),
]

# -- tunnels in passive DNS -------------------------------------------------------------------
# A name resolved inside a tunnel belongs to that tenant's client: its dns_names rows carry the
# tunnel type and id of the response (collector/names.py keys them so), as connections do.
MIGRATIONS += [
    (14, "dns_names tunnel_type, tunnel_id", [
        f"ALTER TABLE {DATABASE}.dns_names ADD COLUMN IF NOT EXISTS tunnel_type {_TUNNEL_TYPE}, "
        "ADD COLUMN IF NOT EXISTS tunnel_id UInt32 CODEC(T64, ZSTD(1))",
    ]),
]

# -- the rollup journal's retention -----------------------------------------------------------
# rollup_log gets no TTL: a TTL cannot tell an intent still open (a recovery needs it, whatever its
# age) from an ended one. The server prunes it instead (Store.prune_rollup_log, writer.py "The
# journal's retention": ended entries after 7 days, their batches kept as summary rows, state 3).
# The index lets a sweep read only the recent intents (at >= now() - window) in a table sorted by token.
# Not materialized on the parts already there: measured, with MATERIALIZE INDEX here (a mutation, even
# of an empty table) tests/test_exactly_once.py's disk-full case failed each time and passed without it
# (the cause not pinned down). Parts inserted since have it, a merge builds it; a part from before
# keeps, after the first prune, only the rows the prune keeps (a mutation does not build it).
MIGRATIONS += [
    (15, "rollup_log: minmax index on at (the sweeps read the recent intents; the server prunes the journal)", [
        f"ALTER TABLE {DATABASE}.rollup_log ADD INDEX IF NOT EXISTS at_minmax at TYPE minmax GRANULARITY 1",
    ]),
]

# Tables whose age limit the user sets (server config ttl_<table>_days), with their time column.
# connections: end_ts (when it was last seen), not the partition's start_ts: a part goes only when
# all its rows are older, so the final row of a long-lived connection keeps its day's part.
TTL_COLUMNS = {"packets": "ts", "flows": "start_ts", "connections": "end_ts", "collector_stats": "ts", "packets_1m": "minute",
               "pairs_1m": "minute", "services_1m": "minute", "anomalies": "report_ts"}


def current_ttl(command: Callable[[str], object], table: str) -> str:
    """The table's TTL clause as ClickHouse shows it ('' when none)."""
    out = command(f"SELECT create_table_query FROM system.tables WHERE database = '{DATABASE}' AND name = '{table}'")
    text = out if isinstance(out, str) else " ".join(map(str, out)) if isinstance(out, (list, tuple)) else str(out)
    import re
    m = re.search(r"\bTTL (.*?)(?: SETTINGS |$)", text)
    return m.group(1).strip() if m else ""


def apply_ttl(command: Callable[[str], object], days: dict[str, int]) -> list[str]:
    """Set each table's age limit (days; 0 = keep forever). Only changed tables are altered.

    Rows older than the limit go when ClickHouse merges or checks TTLs; data tables are
    partitioned by day and set ``ttl_only_drop_parts``, so a whole day goes at once, cheaply.
    Returns the tables changed.
    """
    changed = []
    for table, n in days.items():
        col = TTL_COLUMNS[table]
        have = current_ttl(command, table)
        want = f"toDateTime({col}) + toIntervalDay({n})" if n > 0 else ""
        if have == want:
            continue
        if n > 0:
            drop_parts = "1" if table != "anomalies" else "0"
            command(f"ALTER TABLE {DATABASE}.{table} MODIFY SETTING ttl_only_drop_parts = {drop_parts}")
            command(f"ALTER TABLE {DATABASE}.{table} MODIFY TTL toDateTime({col}) + INTERVAL {n} DAY "
                    "SETTINGS materialize_ttl_after_modify = 0")
        else:
            command(f"ALTER TABLE {DATABASE}.{table} REMOVE TTL")
        log.info("server: %s keeps %s", table, f"{n} days" if n > 0 else "rows forever")
        changed.append(table)
    return changed


LATEST_VERSION = max(v for v, _, _ in MIGRATIONS)  # not the last one: another branch adds 12


# ClickHouse type for a registry wire dtype, for columns added to the registry after a migration.
_DTYPE_SQL = {"u1": "UInt8", "<u2": "UInt16", "<u4": "UInt32", "<u8": "UInt64", "<i8": "Int64",
              "V16": "IPv6", "str": "String"}


def column_type(table: str, name: str, dtype: str) -> str:
    """The SQL type of a registry column (the same rules as the DDL above)."""
    if name in ("ts", "start_ts", "end_ts", "first_seen", "last_seen"):
        return "DateTime64(9, 'UTC')"
    if name in ("direction", "tunnel_type"):
        return "LowCardinality(String)"
    return _DTYPE_SQL[dtype]


def applied_versions(command: Callable[[str], object]) -> set[int]:
    out = command(f"SELECT arrayStringConcat(groupArray(toString(version)), ',') FROM {DATABASE}.schema_version")
    text = out if isinstance(out, str) else ",".join(map(str, out)) if isinstance(out, (list, tuple)) else str(out)
    return {int(v) for v in text.split(",") if v.strip()}


def migrate(command: Callable[[str], object]) -> list[int]:
    """Create the database and apply missing migrations; returns the versions applied now."""
    try:  # a store that is up to date needs no DDL (a server that may only INSERT and read, docs/scale.md)
        done = applied_versions(command)
    except Exception:  # noqa: BLE001 - no schema_version table yet: create it
        done = set()
    if LATEST_VERSION not in done or any(v not in done for v, _, _ in MIGRATIONS):
        command(f"CREATE DATABASE IF NOT EXISTS {DATABASE}")
        command(SCHEMA_VERSION_DDL)
        done = applied_versions(command)
    applied: list[int] = []
    for version, description, statements in sorted(MIGRATIONS, key=lambda m: m[0]):
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
