"""An (address, protocol, port) that answered (TCP SYN-ACK, UDP reply) and never did in the baseline
days.
"""

from __future__ import annotations

from hdrlog.report.detectors import Detector, ip, Finding, Ctx, has_history


def detect(ctx: Ctx) -> list[Finding]:
    """An (address, protocol, port) that answered (TCP SYN-ACK, UDP reply) and never did in the baseline days."""
    rows = ctx.query(f"""
        SELECT {ip('ip')} AS server, ip_proto, port, any(host) AS host, sum(replies) AS replies,
               uniqMerge(clients) AS clients, toUnixTimestamp(min(minute)) AS first,
               toUnixTimestamp(max(minute)) AS last
        FROM hdrlog.services_1m
        WHERE {ctx.win_minutes()} AND (ip, ip_proto, port) NOT IN (
            SELECT ip, ip_proto, port FROM hdrlog.services_1m WHERE {ctx.history('minute', minutes=True)})
        GROUP BY ip, ip_proto, port""")
    if not has_history(ctx):
        return []
    out = []
    for r in rows:
        proto = {6: "tcp", 17: "udp"}.get(int(r["ip_proto"]), str(r["ip_proto"]))
        clients = int(r["clients"])
        subject = f"{r['server']}:{r['port']}" if ":" not in r["server"] else f"[{r['server']}]:{r['port']}"
        out.append(Finding(
            "new_service", "medium" if clients > 1 else "low", "ip:port", subject,
            f"{proto}/{r['port']} on {r['server']} answered {clients} client(s); not seen in the previous "
            f"{ctx.cfg.baseline_days} days", host=r["host"], score=int(r["replies"]),
            first_seen=r["first"], last_seen=r["last"] + 60,
            evidence={"protocol": proto, "replies": int(r["replies"]), "clients": clients}))
    return ctx.cap(out, "new_service")


DETECTOR = Detector("new_service", detect, order=50, needs="services_1m")
