"""A burst of NXDOMAIN answers to one client, against its usual count for these hours."""

from __future__ import annotations

from hdrlog.report.detectors import Detector, ip, Finding, Ctx, sev, DOMAIN, NXDOMAIN


def detect(ctx: Ctx) -> list[Finding]:
    """A burst of NXDOMAIN answers to one client, against its usual count for these hours."""
    cfg = ctx.cfg
    rows = ctx.query(f"""
        SELECT {ip('dst_ip')} AS client, any(host) AS host, count() AS nxdomain, uniqExact(dns_qname) AS names,
               topK(3)({DOMAIN}) AS domains, toUnixTimestamp(min(ts)) AS first, toUnixTimestamp(max(ts)) AS last
        FROM hdrlog.packets WHERE {ctx.win()} AND {NXDOMAIN}
        GROUP BY dst_ip HAVING nxdomain >= {cfg.nxdomain_min}""")
    if not rows:
        return []
    usual = {r["client"]: float(r["n"]) / cfg.baseline_days for r in ctx.query(f"""
        SELECT {ip('dst_ip')} AS client, count() AS n FROM hdrlog.packets
        WHERE {ctx.base()} AND {NXDOMAIN} AND {ip('dst_ip')} IN ({", ".join(repr(r["client"]) for r in rows)})
        GROUP BY dst_ip""")}
    out = []
    for r in rows:
        n, base = int(r["nxdomain"]), usual.get(r["client"], 0.0)
        if n < 5 * base:
            continue
        out.append(Finding(
            "dns_nxdomain", sev(n, [(10 * cfg.nxdomain_min, "high")], "medium"), "ip", r["client"],
            f"{n} NXDOMAIN answers to {r['client']} ({r['names']} names, mostly {', '.join(r['domains'])}); "
            f"usually {base:.0f} in these hours", host=r["host"], score=n, first_seen=r["first"], last_seen=r["last"],
            evidence={"nxdomain": n, "names": int(r["names"]), "top_domains": list(r["domains"]),
                      "baseline_per_day": round(base, 1)}))
    return ctx.cap(out, "dns_nxdomain")


DETECTOR = Detector("dns_nxdomain", detect, order=70)
