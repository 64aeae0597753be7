"""Many SYNs towards one address and port, few handshakes completed (client ACK after SYN)."""

from __future__ import annotations

from hdrlog.report.detectors import Detector, ip, Finding, Ctx, sev


def detect(ctx: Ctx) -> list[Finding]:
    """Many SYNs towards one address and port, few handshakes completed (client ACK after SYN)."""
    cfg = ctx.cfg
    rows = ctx.query(f"""
        SELECT {ip('dst_ip')} AS target, dst_port AS port, any(host) AS host,
               sumIf(sample_rate, bitAnd(tcp_flags, 0x12) = 0x02) AS syns,
               uniqExactIf((src_ip, src_port), bitAnd(tcp_flags, 0x12) = 0x02) AS attempts,
               uniqExactIf((src_ip, src_port), bitAnd(tcp_flags, 0x17) = 0x10) AS established,
               uniqExactIf(src_ip, bitAnd(tcp_flags, 0x12) = 0x02) AS sources,
               groupUniqArrayIf(5)({ip('src_ip')}, bitAnd(tcp_flags, 0x12) = 0x02) AS sample_sources,
               toUnixTimestamp(minIf(ts, bitAnd(tcp_flags, 0x12) = 0x02)) AS first,
               toUnixTimestamp(maxIf(ts, bitAnd(tcp_flags, 0x12) = 0x02)) AS last
        FROM hdrlog.packets
        WHERE {ctx.win()} AND ip_proto = 6
        GROUP BY dst_ip, dst_port HAVING syns >= {cfg.flood_min_syns}""")
    out = []
    for r in rows:
        attempts = max(int(r["attempts"]), 1)
        done = min(int(r["established"]), attempts)
        if done / attempts >= 0.2:
            continue
        syns = int(r["syns"])
        seconds = max(r["last"] - r["first"], 1)
        subject = f"{r['target']}:{r['port']}" if ":" not in r["target"] else f"[{r['target']}]:{r['port']}"
        out.append(Finding(
            "syn_flood", sev(syns, [(10 * cfg.flood_min_syns, "critical")], "high"), "ip:port", subject,
            f"{syns} SYNs to {subject} from {r['sources']} source(s); {done} of {attempts} handshakes completed",
            host=r["host"], score=syns, first_seen=r["first"], last_seen=r["last"],
            evidence={"syns": syns, "syns_per_second": round(syns / seconds, 1), "sources": int(r["sources"]),
                      "handshakes_completed": done, "attempts": attempts,
                      "sample_sources": list(r["sample_sources"])}))
    return ctx.cap(out, "syn_flood")


DETECTOR = Detector("syn_flood", detect, order=20)
