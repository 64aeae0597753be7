"""TCP flag combinations no normal stack sends: NULL, XMAS (FIN+PSH+URG), SYN+FIN."""

from __future__ import annotations

from hdrlog.report.detectors import Detector, ip, Finding, Ctx, sev


def detect(ctx: Ctx) -> list[Finding]:
    """TCP flag combinations no normal stack sends: NULL, XMAS (FIN+PSH+URG), SYN+FIN."""
    rows = ctx.query(f"""
        SELECT {ip('src_ip')} AS source, multiIf(bitAnd(tcp_flags, 0x3f) = 0, 'NULL',
                   bitAnd(tcp_flags, 0x29) = 0x29, 'XMAS', 'SYN+FIN') AS kind,
               any(host) AS host, sum(sample_rate) AS packets, uniqExact(dst_ip, dst_port) AS probed,
               groupUniqArray(5)({ip('dst_ip')}) AS targets, arraySort(groupUniqArray(12)(dst_port)) AS ports,
               toUnixTimestamp(min(ts)) AS first, toUnixTimestamp(max(ts)) AS last
        FROM hdrlog.packets
        WHERE {ctx.win()} AND ip_proto = 6 AND bitAnd(parse_flags, 0x204) = 0
          AND (bitAnd(tcp_flags, 0x3f) = 0 OR bitAnd(tcp_flags, 0x29) = 0x29 OR bitAnd(tcp_flags, 0x03) = 0x03)
        GROUP BY src_ip, kind HAVING packets >= {ctx.cfg.odd_flags_min}""")
    out = [Finding(
        "tcp_flags", sev(int(r["probed"]), [(20, "high")], "medium"), "ip", r["source"],
        f"{r['packets']} {r['kind']} packets from {r['source']} to {r['probed']} address:port pair(s)",
        host=r["host"], score=int(r["packets"]), first_seen=r["first"], last_seen=r["last"],
        evidence={"kind": r["kind"], "packets": int(r["packets"]), "probed_pairs": int(r["probed"]),
                  "sample_targets": list(r["targets"]), "sample_ports": list(r["ports"])}) for r in rows]
    return ctx.cap(out, "tcp_flags")


DETECTOR = Detector("tcp_flags", detect, order=30)
