"""Domains with many distinct subdomains, or long / random-looking labels (tunnels, DGA, exfiltration)."""

from __future__ import annotations

from hdrlog.report.detectors import Detector, ip, Finding, Ctx, sev, DOMAIN, QUERY, DAY_MS


def detect(ctx: Ctx) -> list[Finding]:
    """Domains with many distinct subdomains, or long / random-looking labels (tunnels, DGA, exfiltration)."""
    cfg = ctx.cfg
    label = "splitByChar('.', dns_qname)[1]"
    odd = (f"(length({label}) >= {cfg.dns_long_label} OR (length({label}) >= 16 AND "
           f"arrayReduce('entropy', splitByString('', {label})) >= 3.5))")
    rows = ctx.query(f"""
        SELECT {DOMAIN} AS domain, any(host) AS host, uniqExact(dns_qname) AS names, count() AS queries,
               uniqExactIf(dns_qname, {odd}) AS odd_names, max(length({label})) AS longest_label,
               round(avg(arrayReduce('entropy', splitByString('', {label}))), 2) AS entropy,
               groupUniqArray(5)({ip('src_ip')}) AS clients, anyIf(dns_qname, {odd}) AS example,
               toUnixTimestamp(min(ts)) AS first, toUnixTimestamp(max(ts)) AS last
        FROM hdrlog.packets WHERE {ctx.win()} AND {QUERY}
        GROUP BY domain HAVING names >= {cfg.dns_min_names} OR odd_names >= 10""")
    if not rows:
        return []
    usual = {r["domain"]: int(r["n"]) for r in ctx.query(f"""
        SELECT domain, max(n) AS n FROM (
            SELECT {DOMAIN} AS domain, intDiv({ctx.end_ms} - toUnixTimestamp64Milli(ts) - 1, {DAY_MS}) AS k,
                   uniqExact(dns_qname) AS n
            FROM hdrlog.packets WHERE {ctx.base()} AND {QUERY}
              AND {DOMAIN} IN ({", ".join(repr(r["domain"]) for r in rows)})
            GROUP BY domain, k)
        GROUP BY domain""")}
    out = []
    for r in rows:
        names, odd_n, before = int(r["names"]), int(r["odd_names"]), usual.get(r["domain"], 0)
        ev = {"names": names, "queries": int(r["queries"]), "odd_names": odd_n, "longest_label": int(r["longest_label"]),
              "mean_label_entropy_bits": r["entropy"], "clients": list(r["clients"]), "example": r["example"],
              "baseline_max_names_per_day": before}
        if odd_n >= 10:
            out.append(Finding(
                "dns_long_names", sev(odd_n, [(10 * 10, "high")], "medium"), "domain", r["domain"],
                f"{odd_n} long or random-looking names under {r['domain']} (e.g. {r['example'][:60]}) from "
                f"{', '.join(r['clients'])}", host=r["host"], score=odd_n, first_seen=r["first"],
                last_seen=r["last"], evidence=ev))
        if names >= cfg.dns_min_names and names > 3 * before:
            out.append(Finding(
                "dns_many_subdomains", sev(names, [(10 * cfg.dns_min_names, "high")], "medium"), "domain",
                r["domain"], f"{names} distinct names under {r['domain']} (at most {before} on previous days)",
                host=r["host"], score=names, first_seen=r["first"], last_seen=r["last"], evidence=ev))
    return ctx.cap(out, "dns_names")


DETECTOR = Detector("dns_names", detect, order=80)
