"""Hosts that reported in this window or the one before but sent nothing for silent_after."""

from __future__ import annotations

from hdrlog.report.detectors import Detector, t, Finding, Ctx


def _human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def detect(ctx: Ctx) -> list[Finding]:
    """Hosts that reported in this window or the one before but sent nothing for silent_after."""
    silent_ms = int(ctx.cfg.silent_seconds * 1000)
    lo = ctx.start_ms - ctx.length_ms
    rng = f"ts >= {t(lo)} AND ts < {t(ctx.end_ms)}"
    stats = f"UNION ALL SELECT host, max(ts) AS last, groupUniqArray(collector_id) AS ids FROM hdrlog.collector_stats " \
            f"WHERE {rng} GROUP BY host" if "collector_stats" in ctx.tables else ""
    rows = ctx.query(f"""
        SELECT host, toUnixTimestamp64Milli(max(last)) AS last_ms, arrayDistinct(arrayFlatten(groupArray(ids))) AS collectors
        FROM (SELECT host, max(ts) AS last, groupUniqArray(collector_id) AS ids FROM hdrlog.packets
              WHERE {rng} GROUP BY host {stats})
        GROUP BY host HAVING last_ms < {ctx.end_ms - silent_ms}""")
    out = []
    for r in rows:
        quiet = (ctx.end_ms - int(r["last_ms"])) / 1000
        out.append(Finding(
            "silent_host", "high", "host", r["host"], f"{r['host']} has sent nothing for {_human(quiet)}",
            host=r["host"], score=quiet, first_seen=int(r["last_ms"]) / 1000, last_seen=int(r["last_ms"]) / 1000,
            evidence={"last_seen": int(r["last_ms"]) / 1000, "silent_seconds": round(quiet, 1),
                      "collectors": list(r["collectors"])}))
    return ctx.cap(out, "silent_host")


DETECTOR = Detector("silent_host", detect, order=100)
