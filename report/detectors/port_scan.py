"""One source probing many (address, port) pairs, few of which answered.

From ``connections`` where the hosts have them (exact, every attempt): connections that failed
in Zeek's terms -- S0 (no answer), REJ (refused), RSTOS0/RSTRH/SH/SHR (half open), or set up and
reset with no payload either way (a SYN scan's open ports: "ShR") -- plus UDP S0. From
``packets`` for the other hosts (older stores, packets mode): TCP packets without ACK and RST
(SYN, NULL, FIN, XMAS probes) and UDP packets from a higher to a lower port.
"""

from __future__ import annotations

from hdrlog.report.detectors import Ctx, Detector, Finding, connections_then_packets, ip, sev


# A connection attempt that failed (the state after the whole connection, Zeek's vocabulary).
FAILED = ("(conn_state IN ('S0', 'REJ', 'RSTOS0', 'RSTRH', 'SH', 'SHR') "
          "OR (conn_state IN ('RSTO', 'RSTR', 'OTH') AND orig_bytes = 0 AND resp_bytes = 0))")


def detect(ctx: Ctx) -> list[Finding]:
    """One source probing many (address, port) pairs, few of which answered (module doc)."""
    return ctx.cap(connections_then_packets(ctx, _from_connections, _from_packets), "port_scan")


def _from_connections(ctx: Ctx) -> list[Finding]:
    cfg = ctx.cfg
    rows = ctx.query(f"""
        SELECT {ip('orig_ip')} AS source, any(host) AS host, uniqExact(resp_ip, resp_port) AS pairs,
               uniqExactIf((resp_ip, resp_port), {FAILED}) AS probed, uniqExactIf(resp_ip, {FAILED}) AS targets,
               countIf({FAILED}) AS attempts, countIf(conn_state = 'S0') AS unanswered,
               countIf(conn_state = 'REJ') AS refused,
               toUnixTimestamp(min(start_ts)) AS first, toUnixTimestamp(max(end_ts)) AS last,
               arraySort(groupUniqArrayIf(12)(resp_port, {FAILED})) AS ports,
               groupUniqArrayIf(5)({ip('resp_ip')}, {FAILED}) AS target_list, groupUniqArray(ip_proto) AS protos
        FROM (SELECT * FROM hdrlog.connections
              WHERE {ctx.win('start_ts')} AND ip_proto IN (6, 17)
              ORDER BY uid, final DESC, end_ts DESC LIMIT 1 BY uid)
        WHERE ip_proto = 6 OR conn_state = 'S0'
        GROUP BY orig_ip HAVING probed >= {cfg.scan_min_ports}""")
    out = []
    for r in rows:
        probed, pairs = int(r["probed"]), int(r["pairs"])
        answered = pairs - probed
        if answered / max(pairs, 1) >= 0.3:
            continue  # most attempts succeeded: a busy client, not a scan
        out.append(Finding(
            "port_scan", sev(probed, [(1000, "critical"), (200, "high")], "medium"), "ip", r["source"],
            f"{r['source']} probed {probed} address:port pairs on {r['targets']} host(s); {answered} answered",
            host=r["host"], score=probed, first_seen=r["first"], last_seen=r["last"],
            evidence={"source": "connections", "probed_pairs": probed, "targets": int(r["targets"]),
                      "failed_connections": int(r["attempts"]), "unanswered_S0": int(r["unanswered"]),
                      "refused_REJ": int(r["refused"]), "answered_pairs": answered,
                      "sample_ports": list(r["ports"]), "sample_targets": list(r["target_list"]),
                      "protocols": list(r["protos"])}))
    return out


def _from_packets(ctx: Ctx, hosts: str) -> list[Finding]:
    cfg = ctx.cfg
    rows = ctx.query(f"""
        SELECT {ip('src_ip')} AS source, any(host) AS at_host, uniqExact(dst_ip, dst_port) AS probed,
               uniqExact(dst_ip) AS targets, sum(sample_rate) AS probes, toUnixTimestamp(min(ts)) AS first,
               toUnixTimestamp(max(ts)) AS last, arraySort(groupUniqArray(12)(dst_port)) AS ports,
               groupUniqArray(5)({ip('dst_ip')}) AS target_list, groupUniqArray(ip_proto) AS protos
        FROM hdrlog.packets
        WHERE {ctx.win()} AND {hosts} AND ((ip_proto = 6 AND bitAnd(tcp_flags, 0x14) = 0)
                               OR (ip_proto = 17 AND src_port > dst_port))
        GROUP BY src_ip HAVING probed >= {cfg.scan_min_ports}""")
    if not rows:
        return []
    answered = {r["scanner"]: r["answered"] for r in ctx.query(f"""
        SELECT {ip('dst_ip')} AS scanner, uniqExact(src_ip, src_port) AS answered
        FROM hdrlog.packets
        WHERE {ctx.win()} AND {hosts} AND ip_proto = 6 AND bitAnd(tcp_flags, 0x12) = 0x12
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
            host=r["at_host"], score=probed, first_seen=r["first"], last_seen=r["last"],
            evidence={"source": "packets", "probed_pairs": probed, "targets": int(r["targets"]), "probes": int(r["probes"]),
                      "answered_with_syn_ack": got, "sample_ports": list(r["ports"]),
                      "sample_targets": list(r["target_list"]), "protocols": list(r["protos"])}))
    return out


DETECTOR = Detector("port_scan", detect, order=10)
