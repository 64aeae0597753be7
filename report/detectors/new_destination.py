"""External addresses (outside internal_nets) sent to in the window and never in the baseline days."""

from __future__ import annotations

from hdrlog.report.detectors import Detector, ip, Finding, Ctx, internal_sql, has_history


def detect(ctx: Ctx) -> list[Finding]:
    """External addresses (outside internal_nets) sent to in the window and never in the baseline days."""
    rows = ctx.query(f"""
        SELECT {ip('dst_ip')} AS destination, any(host) AS host, sum(packets) AS packets, sum(bytes) AS bytes,
               groupUniqArray(5)({ip('src_ip')}) AS sources, toUnixTimestamp(min(minute)) AS first,
               toUnixTimestamp(max(minute)) AS last
        FROM hdrlog.pairs_1m
        WHERE {ctx.win_minutes()} AND NOT {internal_sql(ctx, 'dst_ip')} AND dst_ip NOT IN (
            SELECT DISTINCT dst_ip FROM hdrlog.pairs_1m WHERE {ctx.history('minute', minutes=True)})
        GROUP BY dst_ip
        ORDER BY bytes DESC""")
    if not has_history(ctx):
        return []
    out = [Finding(
        "new_destination", "low", "ip", r["destination"],
        f"first traffic to external {r['destination']}: {r['packets']} packets from {', '.join(r['sources'])}",
        host=r["host"], score=int(r["bytes"]), first_seen=r["first"], last_seen=r["last"] + 60,
        evidence={"packets": int(r["packets"]), "bytes": int(r["bytes"]), "sources": list(r["sources"])})
        for r in rows]
    return ctx.cap(out, "new_destination")


DETECTOR = Detector("new_destination", detect, order=60, needs="pairs_1m")
