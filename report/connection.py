"""The report's connection to the store: rows as dicts, inserts where the connection may write."""

from __future__ import annotations

from typing import Any

from hdrlog.report.config import ReportConfig


class Connection:
    """A clickhouse-connect client for the report: rows as dicts, inserts where allowed."""

    def __init__(self, client: Any, *, writable: bool, label: str):
        self.client, self.writable, self.label = client, writable, label

    def query(self, sql: str) -> list[dict[str, Any]]:
        return list(self.client.query(sql).named_results())

    def insert(self, table: str, rows: list[list[Any]], columns: list[str]) -> None:
        self.client.insert(table, rows, column_names=columns)

    def close(self) -> None:
        self.client.close()


def connect(cfg: ReportConfig) -> Connection:
    """--clickhouse (may write) or --url (read-only endpoint); with neither, the local endpoint."""
    from hdrlog import clickhouse, sqlclient

    if cfg.clickhouse:
        url, writable = cfg.clickhouse, True
    else:
        url, writable = cfg.sql_url or sqlclient.DEFAULT_SQL_URL, False
    return Connection(clickhouse.connect(url), writable=writable, label=clickhouse.redact(url))
