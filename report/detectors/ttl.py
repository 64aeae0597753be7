"""Sources whose TTL moved (usual value changed by 3+) or spread (many values where there were 1-2)."""

from __future__ import annotations

from hdrlog.report.detectors import Detector, ip, Finding, Ctx


def detect(ctx: Ctx) -> list[Finding]:
    """Sources whose TTL moved (usual value changed by 3+) or spread (many values where there were 1-2)."""
    rows = ctx.query(f"""
        SELECT {ip('src_ip')} AS source, any(host) AS host, count() AS packets, topK(1)(ttl)[1] AS usual_ttl,
               uniqExact(ttl) AS ttls, arraySort(groupUniqArray(10)(ttl)) AS values
        FROM hdrlog.packets WHERE {ctx.win()} AND ip_version != 0 AND NOT (ip_proto = 58 AND ttl = 255)
        GROUP BY src_ip HAVING packets >= 20""")
    if not rows:
        return []
    before = {r["source"]: r for r in ctx.query(f"""
        SELECT {ip('src_ip')} AS source, count() AS packets, topK(1)(ttl)[1] AS usual_ttl, uniqExact(ttl) AS ttls
        FROM hdrlog.packets WHERE {ctx.base()} AND ip_version != 0 AND NOT (ip_proto = 58 AND ttl = 255)
          AND src_ip IN (SELECT src_ip FROM hdrlog.packets WHERE {ctx.win()} GROUP BY src_ip HAVING count() >= 20)
        GROUP BY src_ip HAVING packets >= 20""")}
    out = []
    for r in rows:
        b = before.get(r["source"])
        if b is None:
            continue
        moved = abs(int(r["usual_ttl"]) - int(b["usual_ttl"])) >= 3
        spread = int(r["ttls"]) >= 5 and int(b["ttls"]) <= 2
        if not (moved or spread):
            continue
        what = (f"usual TTL {b['usual_ttl']} became {r['usual_ttl']}" if moved else
                f"{r['ttls']} different TTLs where there were {b['ttls']}")
        out.append(Finding(
            "ttl", "medium" if spread else "low", "ip", r["source"], f"{r['source']}: {what}", host=r["host"],
            score=int(r["packets"]), first_seen=ctx.start_ms / 1000, last_seen=ctx.end_ms / 1000,
            evidence={"packets": int(r["packets"]), "ttls_now": list(r["values"]), "usual_ttl_now": int(r["usual_ttl"]),
                      "usual_ttl_before": int(b["usual_ttl"]), "distinct_ttls_before": int(b["ttls"])}))
    return ctx.cap(out, "ttl")


DETECTOR = Detector("ttl", detect, order=90)
