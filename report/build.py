"""`hdrlog report`: run the detectors over a window, record the findings, render and deliver them.

Where a report can write
    The findings go to ``hdrlog.anomalies`` whenever the report runs on a connection that
    may write: inside the server (``--report-every``, the usual way with the embedded chDB
    store, which only the server may open) or with ``hdrlog report --clickhouse URL``
    (a ClickHouse server, or a chDB path that no server holds). Through the server's SQL
    endpoint (``--url``), which is read-only by design, the report is produced and
    delivered but not recorded, and it says so.

Steps
    ``build(query, cfg)`` runs every detector (``detectors.registry()``) and returns a
    ``Report``; ``record(report, insert)`` writes the findings; ``render.render(report,
    fmt)`` makes HTML, Markdown or JSON; ``deliver.deliver(report, cfg)`` writes the file,
    POSTs the webhook and sends the mail, each optional; ``run(cfg, conn)`` does all of it on
    a connection (``connection.py``). ``scheduler.ReportScheduler`` runs it in the server every
    ``report_every`` seconds, on the clock (a 1 h period runs at :00).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from hdrlog.report import detectors
from hdrlog.report.config import ReportConfig
from hdrlog.report.connection import Connection
from hdrlog.report.detectors import SEVERITY_RANK, Ctx, Finding

log = logging.getLogger("hdrlog.report")

ANOMALY_COLUMNS = ["report_id", "report_ts", "window_start", "window_end", "detector", "severity", "subject_kind",
                   "subject", "host", "title", "score", "first_seen", "last_seen", "evidence"]


@dataclass
class Report:
    report_id: str
    title: str
    generated_at: float
    start: float
    end: float
    baseline_days: int
    findings: list[Finding]
    notes: list[str] = field(default_factory=list)
    detectors_run: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    undelivered: list[str] = field(default_factory=list)  # deliveries (file, webhook, mail) that failed
    overview: dict[str, Any] = field(default_factory=dict)
    recorded: bool = False
    source: str = ""

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in reversed(list(SEVERITY_RANK))}
        for f in self.findings:
            out[f.severity] += 1
        return out

    def summary(self) -> str:
        """One line: what was found, or plainly that nothing was."""
        window = f"{iso(self.start)} to {iso(self.end)}"
        if not self.findings:
            return (f"No anomalies found from {window}: {len(self.detectors_run)} detectors ran against the same "
                    f"hours of the previous {self.baseline_days} days.")
        parts = [f"{n} {s}" for s, n in self.counts().items() if n]
        n = len(self.findings)
        return f"{n} finding{'s' if n != 1 else ''} from {window} ({', '.join(parts)})."

    def as_dict(self) -> dict[str, Any]:
        return {"report_id": self.report_id, "title": self.title, "generated_at": iso(self.generated_at),
                "window": {"start": iso(self.start), "end": iso(self.end)},
                "baseline": {"days": self.baseline_days, "kind": "same hours of previous days"},
                "summary": self.summary(), "counts": self.counts(),
                "findings": [f.as_dict() for f in self.findings], "notes": self.notes,
                "detectors_run": self.detectors_run, "detectors_failed": self.failed,
                "recorded_in_anomalies": self.recorded, "overview": self.overview}


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def window(cfg: ReportConfig, now: float | None = None) -> tuple[int, int]:
    """(start_ms, end_ms) of the window the config asks for."""
    if cfg.until:
        end = datetime.fromisoformat(cfg.until.replace("Z", "+00:00"))
        if end.tzinfo is None:
            end = end.replace(tzinfo=timezone.utc)
        end_ms = int(end.timestamp() * 1000)
    else:
        end_ms = int((time.time() if now is None else now) * 1000)
    return end_ms - int(cfg.since_seconds * 1000), end_ms


def build(query: Callable[[str], list[dict[str, Any]]], cfg: ReportConfig, *, now: float | None = None,
          source: str = "") -> Report:
    """Run every detector; a detector that fails is named in the report, the others still run."""
    start_ms, end_ms = window(cfg, now)
    tables = {r["name"] for r in query("SELECT name FROM system.tables WHERE database = 'hdrlog'")}
    ctx = Ctx(query, cfg, start_ms, end_ms, tables=tables)
    report = Report(uuid.uuid4().hex[:16], cfg.title, time.time(), start_ms / 1000, end_ms / 1000,
                    cfg.baseline_days, [], source=source)
    if "packets" not in tables:
        report.notes.append("no hdrlog.packets table: nothing to judge (has the server ever started on this store?)")
        return report
    for detector in detectors.registry():
        name = detector.name
        if detector.needs and detector.needs not in tables:
            report.notes.append(f"{name}: skipped, table hdrlog.{detector.needs} is missing "
                                "(run hdrlog server migrate)")
            continue
        t0 = time.perf_counter()
        try:
            report.findings += detector.detect(ctx)
            report.detectors_run.append(name)
        except Exception as exc:  # noqa: BLE001 - one broken detector must not hide the others
            from hdrlog.clickhouse import one_line as short_message
            report.failed[name] = short_message(exc)
            log.warning("report: detector %s failed: %s", name, short_message(exc))
        log.debug("report: %s took %.2fs", name, time.perf_counter() - t0)
    report.findings.sort(key=lambda f: (-SEVERITY_RANK[f.severity], f.detector, -f.score))
    report.notes += ctx.notes
    report.overview = overview(ctx)
    return report


def overview(ctx: Ctx) -> dict[str, Any]:
    """Context for the reader: packets per host over the window, top sources and ports."""
    from hdrlog.report.detectors import ip
    bucket = max(1000, ctx.length_ms // 60)
    n = max(1, -(-ctx.length_ms // bucket))
    series: dict[str, list[float]] = {}
    for r in ctx.query(f"""
            SELECT host, intDiv(toUnixTimestamp64Milli(ts) - {ctx.start_ms}, {bucket}) AS b, sum(sample_rate) AS p
            FROM hdrlog.packets WHERE {ctx.win()} GROUP BY host, b ORDER BY host, b"""):
        b = int(r["b"])
        if 0 <= b < n:
            series.setdefault(r["host"], [0.0] * n)[b] = float(r["p"])
    top_sources = [(r["source"], int(r["packets"])) for r in ctx.query(f"""
        SELECT {ip('src_ip')} AS source, sum(sample_rate) AS packets FROM hdrlog.packets
        WHERE {ctx.win()} AND ip_version != 0 GROUP BY src_ip ORDER BY packets DESC LIMIT 10""")]
    top_ports = [(f"{r['proto']}/{r['port']}", int(r["packets"])) for r in ctx.query(f"""
        SELECT multiIf(ip_proto = 6, 'tcp', ip_proto = 17, 'udp', toString(ip_proto)) AS proto, dst_port AS port,
               sum(sample_rate) AS packets FROM hdrlog.packets
        WHERE {ctx.win()} AND dst_port != 0 GROUP BY ip_proto, dst_port ORDER BY packets DESC LIMIT 10""")]
    return {"bucket_seconds": bucket / 1000, "start": ctx.start_ms / 1000, "packets_by_host": series,
            "top_sources": top_sources, "top_dst_ports": top_ports}


def record(report: Report, insert: Callable[[str, list[list[Any]], list[str]], None]) -> int:
    """Write the findings to hdrlog.anomalies; returns the rows written."""
    if not report.findings:
        return 0
    def dt(ts: float) -> datetime:
        return datetime.fromtimestamp(ts, timezone.utc)
    rows = [[report.report_id, dt(report.generated_at), dt(report.start), dt(report.end), f.detector, f.severity,
             f.subject_kind, f.subject, f.host, f.title, float(f.score), dt(f.first_seen or report.start),
             dt(f.last_seen or report.end), detectors.evidence_json(f)] for f in report.findings]
    insert("hdrlog.anomalies", rows, ANOMALY_COLUMNS)
    report.recorded = True
    return len(rows)


def run(cfg: ReportConfig, conn: Connection, *, now: float | None = None) -> Report:
    """Build, record (when the connection may write), deliver. Returns the report."""
    from hdrlog.report import deliver

    report = build(conn.query, cfg, now=now, source=conn.label)
    if conn.writable:
        if "anomalies" not in {r["name"] for r in conn.query(
                "SELECT name FROM system.tables WHERE database = 'hdrlog' AND name = 'anomalies'")}:
            report.notes.append("findings not recorded: table hdrlog.anomalies is missing (run hdrlog server migrate)")
        else:
            record(report, conn.insert)
    elif report.findings:
        report.notes.append("findings not recorded in hdrlog.anomalies: the SQL endpoint is read-only; run the "
                            "report with --clickhouse, or let the server run it (--report-every)")
    deliver.deliver(report, cfg)
    return report
