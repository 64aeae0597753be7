"""The schema on a ClickHouse cluster (``--cluster NAME``): replicated local tables behind Distributed ones.

``Layout(cluster)`` rewrites each statement ``schema.migrate`` / ``apply_ttl`` / ``sync_columns`` issues, so
the one list of migrations serves both shapes (``Layout.wrap(command)``):

- ``CREATE DATABASE hdrlog`` and every DDL get ``ON CLUSTER <name>``;
- a data table ``hdrlog.T`` becomes ``hdrlog.T_local`` with the Replicated form of its engine
  (``ReplicatedMergeTree('/clickhouse/tables/{shard}/hdrlog/T_local', '{replica}')``, Summing and
  Aggregating alike; the ``{shard}`` / ``{replica}`` macros come from each node's config) and
  ``replicated_deduplication_window`` for ``non_replicated_deduplication_window``; plus
  ``hdrlog.T`` = ``Distributed(<name>, hdrlog, T_local, cityHash64(host))``: the name every reader and the
  writer use. Sharding by host keeps one batch's rows (one host's) on one shard, in one block, so a
  batch is still stored whole or not at all and its token deduplicates it there;
- ``ALTER TABLE hdrlog.T`` goes to ``T_local`` (and column changes to the Distributed table too);
- materialized views read ``T_local`` and write ``X_local`` on each shard (a view over a Distributed
  table would not see the shards' inserts);
- ``hdrlog.schema_version`` is one replicated table on every node (no ``{shard}`` in its path).

The writer inserts into the Distributed tables with ``distributed_foreground_insert = 1``: the INSERT
returns once the shard stored the rows, so an ack still means stored.

``Layout(cluster, rehearsal=True)`` writes the same layout without ``ON CLUSTER`` and with the
non-replicated engines: what one node without ZooKeeper/Keeper can run (tests/test_scaleout.py runs it
in chDB with a one-shard cluster from a config file). docs/scale.md says what only a real cluster shows.
"""

from __future__ import annotations

import re
from typing import Callable

from hdrlog.server.schema import DATABASE

SHARDING_KEY = "cityHash64(host)"
# Tables without a host column, and what shards them instead (the rollup journal: by its token).
UNSHARDED_BY_HOST = {"rollup_log": "cityHash64(token)"}
_DROP_VIEW = re.compile(r"^\s*DROP VIEW IF EXISTS (\S+)$")
_DB = re.escape(DATABASE)
_CREATE_TABLE = re.compile(rf"^\s*CREATE TABLE IF NOT EXISTS {_DB}\.(\w+)\s*\(", re.S)
_CREATE_MV = re.compile(rf"^\s*CREATE MATERIALIZED VIEW IF NOT EXISTS {_DB}\.(\w+) TO {_DB}\.(\w+) AS", re.S)
_ALTER = re.compile(rf"^\s*ALTER TABLE {_DB}\.(\w+) (.*)$", re.S)
_ENGINE = re.compile(r"ENGINE = (Summing|Aggregating|Replacing)?MergeTree(\((?:[^()]|\([^()]*\))*\))?")
_TABLES_BY_NAME = re.compile(rf"(FROM system\.tables WHERE database = '{_DB}' AND name = ')(\w+)(')")


class Layout:
    def __init__(self, cluster: str, *, rehearsal: bool = False):
        self.cluster = cluster
        self.rehearsal = rehearsal
        self.on = "" if rehearsal else f" ON CLUSTER {cluster}"

    def engine(self, table: str, kind: str, args: str, *, sharded: bool = True) -> str:
        if self.rehearsal:
            return f"ENGINE = {kind}MergeTree{args}"
        path = f"/clickhouse/tables/{{shard}}/{DATABASE}/{table}" if sharded else f"/clickhouse/tables/{DATABASE}/{table}"
        inner = args[1:-1] if args else ""
        extra = f", {inner}" if inner else ""
        return f"ENGINE = Replicated{kind}MergeTree('{path}', '{{replica}}'{extra})"

    def statements(self, sql: str) -> list[str]:
        """The cluster form of one statement (one or two statements; reads pass unchanged)."""
        text = sql.strip()
        if re.match(rf"^CREATE DATABASE IF NOT EXISTS {_DB}$", text):
            return [text + self.on]
        m = _CREATE_TABLE.match(text)
        if m:
            table = m.group(1)
            if table == "schema_version":
                body = text.replace(f"{DATABASE}.schema_version", f"{DATABASE}.schema_version{self.on}", 1)
                return [_ENGINE.sub(lambda e: self.engine(table, e.group(1) or "", e.group(2) or "", sharded=False),
                                    body, count=1)]
            local = f"{table}_local"
            body = text.replace(f"{DATABASE}.{table}", f"{DATABASE}.{local}{self.on}", 1)
            body = _ENGINE.sub(lambda e: self.engine(local, e.group(1) or "", e.group(2) or ""), body, count=1)
            if not self.rehearsal:
                body = body.replace("non_replicated_deduplication_window", "replicated_deduplication_window")
            key = SHARDING_KEY if table not in UNSHARDED_BY_HOST else UNSHARDED_BY_HOST[table]
            dist = (f"CREATE TABLE IF NOT EXISTS {DATABASE}.{table}{self.on} AS {DATABASE}.{local} "
                    f"ENGINE = Distributed({self.cluster}, {DATABASE}, {local}, {key})")
            return [body, dist]
        m = _CREATE_MV.match(text)
        if m:
            view, target = m.group(1), m.group(2)
            head = f"CREATE MATERIALIZED VIEW IF NOT EXISTS {DATABASE}.{view}{self.on} TO {DATABASE}.{target}_local AS"
            rest = re.sub(rf"\bFROM {_DB}\.(\w+)", lambda f: f"FROM {DATABASE}.{f.group(1)}_local", text[m.end():])
            return [head + rest]
        m = _DROP_VIEW.match(text)
        if m:
            return [f"DROP VIEW IF EXISTS {m.group(1)}{self.on}"]
        m = _ALTER.match(text)
        if m:
            table, rest = m.group(1), m.group(2)
            if table == "schema_version":
                return [f"ALTER TABLE {DATABASE}.schema_version{self.on} {rest}"]
            out = [f"ALTER TABLE {DATABASE}.{table}_local{self.on} {rest}"]
            if re.match(r"(ADD|MODIFY) COLUMN\b", rest):
                # The Distributed table has the same columns (its type may change; codecs live on the shards).
                bare = re.sub(r" CODEC\(.*\)$", "", rest)
                # ... and no sorting key: that is the shards' (a Distributed table has none to modify).
                bare = re.sub(r",\s*MODIFY ORDER BY \(.*\)$", "", bare, flags=re.S)
                out.append(f"ALTER TABLE {DATABASE}.{table}{self.on} {bare}")
            return out
        # apply_ttl reads a table's TTL from system.tables: the local table's, where it is set.
        return [_TABLES_BY_NAME.sub(lambda t: f"{t.group(1)}{t.group(2)}_local{t.group(3)}", text)
                if text.startswith("SELECT") else sql]

    def wrap(self, command: Callable[[str], object]) -> Callable[[str], object]:
        """``command`` that runs the cluster form of each statement; returns the last one's result."""
        def run(sql: str) -> object:
            result: object = None
            for stmt in self.statements(sql):
                result = command(stmt)
            return result
        return run
