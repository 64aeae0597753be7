"""One source probing many (address, port) pairs, few of which answered with a SYN-ACK. Probes: TCP
packets without ACK and RST (SYN, NULL, FIN, XMAS probes), and UDP packets from a higher to a lower
port (client to service).
"""

from __future__ import annotations

from hdrlog.report.detectors import Detector, ip, Finding, Ctx, sev


def detect(ctx: Ctx) -> list[Finding]:
    """One source probing many (address, port) pairs, few of which answered with a SYN-ACK.

    Probes: TCP packets without ACK and RST (SYN, NULL, FIN, XMAS probes), and UDP packets from a
    higher to a lower port (client to service).
    """
    cfg = ctx.cfg
    rows = ctx.query(f"""
        SELECT {ip('src_ip')} AS source, any(host) AS host, uniqExact(dst_ip, dst_port) AS probed,
               uniqExact(dst_ip) AS targets, sum(sample_rate) AS probes, toUnixTimestamp(min(ts)) AS first,
               toUnixTimestamp(max(ts)) AS last, arraySort(groupUniqArray(12)(dst_port)) AS ports,
               groupUniqArray(5)({ip('dst_ip')}) AS target_list, groupUniqArray(ip_proto) AS protos
        FROM hdrlog.packets
        WHERE {ctx.win()} AND ((ip_proto = 6 AND bitAnd(tcp_flags, 0x14) = 0)
                               OR (ip_proto = 17 AND src_port > dst_port))
        GROUP BY src_ip HAVING probed >= {cfg.scan_min_ports}""")
    if not rows:
        return []
    answered = {r["scanner"]: r["answered"] for r in ctx.query(f"""
        SELECT {ip('dst_ip')} AS scanner, uniqExact(src_ip, src_port) AS answered
        FROM hdrlog.packets
        WHERE {ctx.win()} AND ip_proto = 6 AND bitAnd(tcp_flags, 0x12) = 0x12
          AND {ip('dst_ip')} IN ({", ".join(repr(r["source"]) for r in rows)})
        GROUP BY dst_ip""")}
    out = []
    for r in rows:
        got = int(answered.get(r["source"], 0))
        ratio = got / max(int(r["probed"]), 1)
        if ratio >= 0.3:
            continue  # most probes were answered: a busy client, not a scan
        probed = int(r["probed"])
        out.append(Finding(
            "port_scan", sev(probed, [(1000, "critical"), (200, "high")], "medium"), "ip", r["source"],
            f"{r['source']} probed {probed} address:port pairs on {r['targets']} host(s); {got} answered",
            host=r["host"], score=probed, first_seen=r["first"], last_seen=r["last"],
            evidence={"probed_pairs": probed, "targets": int(r["targets"]), "probes": int(r["probes"]),
                      "answered_with_syn_ack": got, "sample_ports": list(r["ports"]),
                      "sample_targets": list(r["target_list"]), "protocols": list(r["protos"])}))
    return ctx.cap(out, "port_scan")


DETECTOR = Detector("port_scan", detect, order=10)
