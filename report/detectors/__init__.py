"""Anomaly detectors: SQL over the report window, judged against a baseline.

The window is ``[start, end)``. The baseline is the same hours on each of the previous
``baseline_days`` days (``Ctx.base``); detectors that ask "is this new?" use everything in
those days (``Ctx.history``), read from the per-minute rollups where they can. Every
detector returns ``Finding`` objects with a severity, a subject (an address, a host, a
domain, ``address:port``) and the evidence the SQL found, and adds a note when it could not
judge (no baseline yet, a table missing). Counts are weighted by ``sample_rate``.

Each detector is one module of this package that defines ``DETECTOR = Detector(name,
detect, order)``: ``detect(ctx) -> list[Finding]``. ``registry()`` finds them all, so adding
a detector is adding one file. This module holds what they share: ``Finding``, the window
``Ctx`` and SQL helpers.
"""

from __future__ import annotations

import importlib
import ipaddress
import json
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

from hdrlog.report.config import ReportConfig

DAY_MS = 86_400_000
SEVERITY_RANK = {"info": 0, "low": 1, "medium": 2, "high": 3, "critical": 4}


def ip(expr: str) -> str:
    """SQL: an IPv6 column as text, IPv4-mapped addresses shown as plain IPv4."""
    return f"replaceRegexpOne(IPv6NumToString({expr}), '^::ffff:', '')"


def t(ms: int) -> str:
    return f"fromUnixTimestamp64Milli(toInt64({int(ms)}), 'UTC')"


@dataclass
class Finding:
    detector: str
    severity: str
    subject_kind: str  # ip, ip:port, host, domain, host:counter
    subject: str
    title: str
    host: str = ""
    score: float = 0.0
    first_seen: float = 0.0  # unix seconds
    last_seen: float = 0.0
    evidence: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"detector": self.detector, "severity": self.severity, "subject_kind": self.subject_kind,
                "subject": self.subject, "host": self.host, "title": self.title, "score": round(self.score, 3),
                "first_seen": self.first_seen, "last_seen": self.last_seen, "evidence": self.evidence}


@dataclass
class Ctx:
    query: Callable[[str], list[dict[str, Any]]]
    cfg: ReportConfig
    start_ms: int
    end_ms: int
    notes: list[str] = field(default_factory=list)
    tables: set[str] = field(default_factory=set)

    @property
    def length_ms(self) -> int:
        return self.end_ms - self.start_ms

    def win(self, col: str = "ts") -> str:
        return f"({col} >= {t(self.start_ms)} AND {col} < {t(self.end_ms)})"

    def win_minutes(self, col: str = "minute") -> str:
        return f"({col} >= toStartOfMinute({t(self.start_ms)}) AND {col} < {t(self.end_ms)})"

    def base(self, col: str = "ts") -> str:
        """The same hours on each of the previous baseline_days days."""
        parts = [f"({col} >= {t(self.start_ms - k * DAY_MS)} AND {col} < {t(self.end_ms - k * DAY_MS)})"
                 for k in range(1, self.cfg.baseline_days + 1)]
        return "(" + " OR ".join(parts) + ")"

    def history(self, col: str = "ts", minutes: bool = False) -> str:
        lo = self.start_ms - self.cfg.baseline_days * DAY_MS
        start = f"toStartOfMinute({t(self.start_ms)})" if minutes else t(self.start_ms)
        return f"({col} >= {t(lo)} AND {col} < {start})"

    def cap(self, findings: list[Finding], detector: str) -> list[Finding]:
        findings.sort(key=lambda f: (-SEVERITY_RANK[f.severity], -f.score))
        if len(findings) > self.cfg.max_findings:
            self.notes.append(f"{detector}: {len(findings) - self.cfg.max_findings} more findings not listed "
                              f"(max_findings = {self.cfg.max_findings})")
            findings = findings[: self.cfg.max_findings]
        return findings


def sev(value: float, steps: list[tuple[float, str]], default: str) -> str:
    for limit, sev in steps:
        if value >= limit:
            return sev
    return default


def internal_sql(ctx: Ctx, expr: str) -> str:
    """SQL: the address is internal (configured networks), multicast, broadcast or unspecified."""
    conds = [f"isIPAddressInRange({ip(expr)}, '{net}')"
             for net in [*ctx.cfg.internal_nets, "224.0.0.0/4", "255.255.255.255/32", "0.0.0.0/32", "ff00::/8", "::/128"]]
    for net in ctx.cfg.internal_nets:
        ipaddress.ip_network(net, strict=False)  # validated already; never pasted unchecked
    return "(" + " OR ".join(conds) + ")"


def has_history(ctx: Ctx) -> bool:
    """Is there anything in the baseline days at all? (Without it, everything would be 'new'.)"""
    key = "_history_rows"
    cached = getattr(ctx, key, None)
    if cached is None:
        rows = ctx.query(f"SELECT count() AS n FROM hdrlog.packets_1m WHERE {ctx.history('minute', minutes=True)}")
        cached = int(rows[0]["n"]) if rows else 0
        setattr(ctx, key, cached)
        if not cached:
            ctx.notes.append(f"new services / destinations: not judged, nothing stored in the previous "
                             f"{ctx.cfg.baseline_days} days to compare with")
    return bool(cached)


def connection_hosts(ctx: Ctx) -> list[str]:
    """Hosts with connection rows in the window: detectors judge their connections (exact) and
    the packets of the other hosts only (older stores, packets mode)."""
    cached = getattr(ctx, "_connection_hosts", None)
    if cached is None:
        cached = []
        if "connections" in ctx.tables:
            cached = [r["host"] for r in ctx.query(
                f"SELECT DISTINCT host FROM hdrlog.connections WHERE {ctx.win('start_ts')}")]
        setattr(ctx, "_connection_hosts", cached)
    return cached


def not_hosts(hosts: list[str]) -> str:
    """SQL: host is none of ``hosts`` (names quoted as ClickHouse string literals)."""
    if not hosts:
        return "1"
    quoted = ", ".join("'" + h.replace("\\", "\\\\").replace("'", "\\'") + "'" for h in hosts)
    return f"host NOT IN ({quoted})"


def connections_then_packets(ctx: Ctx, from_connections: Callable[[Ctx], list[Finding]],
                             from_packets: Callable[[Ctx, str], list[Finding]]) -> list[Finding]:
    """Findings from the connections of the hosts that have them, then from the other hosts' packets
    (``from_packets(ctx, host_condition)``); a subject found both ways is reported once, from connections."""
    hosts = connection_hosts(ctx)
    out = from_connections(ctx) if hosts else []
    seen = {f.subject for f in out}
    return out + [f for f in from_packets(ctx, not_hosts(hosts)) if f.subject not in seen]


DOMAIN = "if(cutToFirstSignificantSubdomain(dns_qname) = '', dns_qname, cutToFirstSignificantSubdomain(dns_qname))"
QUERY = "dns_qname != '' AND bitAnd(dns_flags, 0x8000) = 0"
NXDOMAIN = "dns_qname != '' AND bitAnd(dns_flags, 0x8000) != 0 AND dns_rcode = 3"


def evidence_json(f: Finding) -> str:
    return json.dumps(f.evidence, sort_keys=True, default=str)


@dataclass(frozen=True)
class Detector:
    name: str
    detect: Callable[[Ctx], list[Finding]]
    order: int              # where it runs and is listed among the others
    needs: str = ""         # a table it cannot run without (skipped with a note when missing)


def registry() -> list[Detector]:
    """Every detector module of this package, in order."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        detector = getattr(module, "DETECTOR", None)
        if isinstance(detector, Detector):
            found.append(detector)
    return sorted(found, key=lambda d: d.order)
