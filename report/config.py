"""Configuration of `hdrlog report` (and of the reports the server schedules with --report-every).

One dataclass: each field is a flag (``--since``), an environment variable (``HDRLOG_SINCE``)
and a key of the ``report:`` section of the config file. Thresholds have named defaults.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from hdrlog.config import ConfigError, doc_field, parse_duration

FORMATS = ("html", "md", "json")
DEFAULT_SINCE = "1h"
DEFAULT_BASELINE_DAYS = 7
DEFAULT_MIN_BASELINE_DAYS = 3
DEFAULT_SILENT_AFTER = "10m"
DEFAULT_INTERNAL_NETS = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "127.0.0.0/8",
                         "169.254.0.0/16", "fc00::/7", "fe80::/10", "::1/128"]
SEVERITIES = ("info", "low", "medium", "high", "critical")

@dataclass
class ReportConfig:
    sql_url: str = doc_field("", "read-only SQL endpoint or ClickHouse HTTP URL to query (findings are not recorded "
                                 "through the read-only endpoint); also --url")
    clickhouse: str = doc_field("", "store to open directly, chdb:///PATH (no server may hold it) or "
                                    "http(s)://...; findings are also written to hdrlog.anomalies")
    since: str = doc_field(DEFAULT_SINCE, "the window: this long up to now (90s, 15m, 1h, 2d)")
    until: str = doc_field("", "end of the window, ISO 8601 UTC such as 2026-01-31T12:00:00 ('' = now)")
    baseline_days: int = doc_field(DEFAULT_BASELINE_DAYS,
                                   "the baseline: the same hours on this many previous days (and, for 'new' "
                                   "detectors, everything in those days)")
    min_baseline_days: int = doc_field(DEFAULT_MIN_BASELINE_DAYS,
                                       "traffic spike/drop needs at least this many baseline days with data")
    format: str = doc_field("html", "html, md or json")
    out: str = doc_field("", "file to write, or a directory (one file per report); '' = standard output")
    webhook: str = doc_field("", "POST the JSON report to this http(s) URL ('' = off)")
    webhook_timeout: float = doc_field(10.0, "seconds before a webhook POST gives up", duration=True)
    smtp_host: str = doc_field("", "mail the report through this SMTP server ('' = off)")
    smtp_port: int = doc_field(25, "SMTP port")
    smtp_starttls: bool = doc_field(False, "STARTTLS before sending")
    smtp_user: str = doc_field("", "SMTP login; the password from HDRLOG_SMTP_PASSWORD or --smtp-password-file")
    smtp_password_file: str = doc_field("", "file holding the SMTP password")
    mail_from: str = doc_field("hdrlog@localhost", "sender address")
    mail_to: list[str] = doc_field([], "recipient address (repeatable)")
    mail_always: bool = doc_field(False, "mail and POST also when nothing was found")
    internal_nets: list[str] = doc_field(DEFAULT_INTERNAL_NETS,
                                         "networks that are not 'external' for the new-destination detector")
    silent_after: str = doc_field(DEFAULT_SILENT_AFTER, "a host with no rows for this long is reported silent")
    scan_min_ports: int = doc_field(50, "port scan: distinct (address, port) probed by one source")
    flood_min_syns: int = doc_field(1000, "SYN flood: SYNs towards one address and port")
    spike_z: float = doc_field(3.5, "traffic spike/drop: robust z-score (median/MAD) at which a host is flagged")
    spike_min_packets: int = doc_field(1000, "traffic spike/drop: smallest change in packets worth a finding")
    nxdomain_min: int = doc_field(30, "DNS: NXDOMAIN answers to one client worth a finding")
    dns_min_names: int = doc_field(50, "DNS: distinct names under one domain worth a finding")
    dns_long_label: int = doc_field(30, "DNS: a label this long (or shorter but random-looking) is suspicious")
    odd_flags_min: int = doc_field(3, "TCP NULL / XMAS / SYN+FIN packets from one source worth a finding")
    max_findings: int = doc_field(20, "at most this many findings per detector (the rest are counted)")
    title: str = doc_field("hdrlog anomaly report", "report title")

    @property
    def since_seconds(self) -> float:
        return parse_duration("since", self.since)

    @property
    def silent_seconds(self) -> float:
        return parse_duration("silent_after", self.silent_after)

    @property
    def smtp_password(self) -> str:
        if self.smtp_password_file:
            with open(self.smtp_password_file) as fh:
                return fh.read().strip()
        return os.environ.get("HDRLOG_SMTP_PASSWORD", "")

    def validate(self) -> None:
        if self.sql_url and self.clickhouse:
            raise ConfigError("sql_url", self.sql_url, "give either --url/--sql-url or --clickhouse, not both")
        for key in ("sql_url", "webhook"):
            v = getattr(self, key)
            if v and not v.startswith(("http://", "https://")):
                raise ConfigError(key, v, "expected an http(s):// URL")
        if self.clickhouse and not self.clickhouse.startswith(("chdb:///", "http://", "https://")):
            raise ConfigError("clickhouse", self.clickhouse, "expected chdb:///PATH or http(s)://...")
        parse_duration("since", self.since)
        parse_duration("silent_after", self.silent_after)
        if self.until:
            from datetime import datetime
            try:
                datetime.fromisoformat(self.until.replace("Z", "+00:00"))
            except ValueError:
                raise ConfigError("until", self.until, "expected ISO 8601 such as 2026-01-31T12:00:00") from None
        if self.format not in FORMATS:
            raise ConfigError("format", self.format, f"expected one of {', '.join(FORMATS)}")
        if not 1 <= self.baseline_days <= 90:
            raise ConfigError("baseline_days", self.baseline_days, "expected 1 to 90 days")
        if not 1 <= self.min_baseline_days <= self.baseline_days:
            raise ConfigError("min_baseline_days", self.min_baseline_days, "expected 1 to baseline_days")
        for key in ("scan_min_ports", "flood_min_syns", "spike_min_packets", "nxdomain_min", "dns_min_names",
                    "dns_long_label", "odd_flags_min", "max_findings"):
            if getattr(self, key) < 1:
                raise ConfigError(key, getattr(self, key), "expected an integer >= 1")
        if self.spike_z <= 0:
            raise ConfigError("spike_z", self.spike_z, "expected a number > 0")
        if not 1 <= self.smtp_port <= 65535:
            raise ConfigError("smtp_port", self.smtp_port, "expected a port 1-65535")
        if self.smtp_host and not self.mail_to:
            raise ConfigError("mail_to", self.mail_to, "smtp_host is set: give at least one --mail-to address")
        for net in self.internal_nets:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ConfigError("internal_nets", net, "expected a network such as 10.0.0.0/8 or fc00::/7") from None
