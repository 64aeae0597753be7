"""Collectors that lost records (a drop_<reason> counter above zero in the window). Sampled-out and
filtered packets are what the user asked for: they are reported as coverage in the notes, never as a
finding.
"""

from __future__ import annotations

from hdrlog.report.detectors import Detector, Finding, Ctx, sev


# Counters of records the configuration chose not to keep (sampling, filters): coverage, not loss.
# They mirror the collector's DELIBERATE_DROPS (collector/app.py); tests/test_report.py checks both.
DELIBERATE_DROPS = ("drop_sampled_out", "drop_filtered")


def detect(ctx: Ctx) -> list[Finding]:
    """Collectors that lost records (a drop_<reason> counter above zero in the window).

    Sampled-out and filtered packets are what the user asked for: they are reported as
    coverage in the notes, never as a finding."""
    if "collector_stats" not in ctx.tables:
        ctx.notes.append("collector drops: no collector_stats table")
        return []
    rows = ctx.query(f"""
        SELECT host, counter, sum(value) AS dropped,
               (SELECT sum(value) FROM hdrlog.collector_stats AS s WHERE s.host = c.host AND {ctx.win('s.ts')}
                AND s.counter = 'seen') AS seen,
               toUnixTimestamp(minIf(ts, value > 0)) AS first, toUnixTimestamp(maxIf(ts, value > 0)) AS last
        FROM hdrlog.collector_stats AS c
        WHERE {ctx.win('c.ts')} AND startsWith(counter, 'drop_')
        GROUP BY host, counter HAVING dropped > 0""")
    out = []
    coverage: dict[str, dict[str, int]] = {}
    for r in rows:
        dropped, seen = int(r["dropped"]), int(r["seen"] or 0)
        if r["counter"] in DELIBERATE_DROPS:
            coverage.setdefault(r["host"], {"seen": seen})[r["counter"][5:]] = dropped
            continue
        share = dropped / seen if seen else 1.0
        out.append(Finding(
            "collector_drops", sev(share, [(0.1, "high"), (0.01, "medium")], "low"), "host:counter",
            f"{r['host']}:{r['counter']}", f"{r['host']} dropped {dropped} records ({r['counter'][5:]}); "
            f"{share:.1%} of {seen} seen", host=r["host"], score=dropped, first_seen=r["first"], last_seen=r["last"],
            evidence={"counter": r["counter"], "dropped": dropped, "seen": seen, "share": round(share, 4)}))
    for host in sorted(coverage):
        c = coverage[host]
        parts = ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in sorted(c.items()) if name != "seen")
        ctx.notes.append(f"coverage: {host} saw {c['seen']} packets; not logged as rows by configuration: {parts} "
                         "(sampling and filters, not loss)")
    return ctx.cap(out, "collector_drops")


DETECTOR = Detector("collector_drops", detect, order=110)
