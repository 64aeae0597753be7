"""Many connection attempts towards one address and port, few handshakes completed.

From ``connections`` where the hosts have them: a burst of S0 (SYNs nobody answered) or of
attempts the originator never acknowledged (a SYN-ACK came, no ACK: SYN cookies, spoofed
sources) towards one service. From ``packets`` for the other hosts (older stores, packets
mode): SYNs against clients' ACKs after the SYN.
"""

from __future__ import annotations

from hdrlog.report.detectors import Ctx, Detector, Finding, connections_then_packets, ip, sev

# An attempt the originator never completed: it sent a SYN, then neither an ACK nor data (history
# letters are upper case for the originator): S0 "S", REJ "Sr", SYN cookies or spoofed "Sh"...
HALF_OPEN = "(position(history, 'S') > 0 AND position(history, 'A') = 0 AND position(history, 'D') = 0)"


def detect(ctx: Ctx) -> list[Finding]:
    """Many connection attempts towards one address and port, few completed (module doc)."""
    return ctx.cap(connections_then_packets(ctx, _from_connections, _from_packets), "syn_flood")


def _subject(target: str, port: int) -> str:
    return f"{target}:{port}" if ":" not in target else f"[{target}]:{port}"


def _from_connections(ctx: Ctx) -> list[Finding]:
    cfg = ctx.cfg
    rows = ctx.query(f"""
        SELECT {ip('resp_ip')} AS target, resp_port AS port, any(host) AS host,
               count() AS attempts, countIf({HALF_OPEN}) AS half_open, countIf(conn_state = 'S0') AS unanswered,
               sumIf(orig_pkts, {HALF_OPEN}) AS syns, uniqExactIf(orig_ip, {HALF_OPEN}) AS sources,
               groupUniqArrayIf(5)({ip('orig_ip')}, {HALF_OPEN}) AS sample_sources,
               toUnixTimestamp(minIf(start_ts, {HALF_OPEN})) AS first,
               toUnixTimestamp(maxIf(start_ts, {HALF_OPEN})) AS last
        FROM (SELECT * FROM hdrlog.connections
              WHERE {ctx.win('start_ts')} AND ip_proto = 6
              ORDER BY uid, final DESC, end_ts DESC LIMIT 1 BY uid)
        GROUP BY resp_ip, resp_port HAVING half_open >= {cfg.flood_min_syns}""")
    out = []
    for r in rows:
        attempts = max(int(r["attempts"]), 1)
        done = attempts - int(r["half_open"])
        if done / attempts >= 0.2:
            continue
        syns = int(r["syns"])
        seconds = max(r["last"] - r["first"], 1)
        subject = _subject(r["target"], int(r["port"]))
        out.append(Finding(
            "syn_flood", sev(int(r["half_open"]), [(10 * cfg.flood_min_syns, "critical")], "high"), "ip:port",
            subject, f"{r['half_open']} half-open connections to {subject} from {r['sources']} source(s); "
                     f"{done} of {attempts} handshakes completed",
            host=r["host"], score=int(r["half_open"]), first_seen=r["first"], last_seen=r["last"],
            evidence={"source": "connections", "syns": syns, "half_open": int(r["half_open"]),
                      "unanswered_S0": int(r["unanswered"]),
                      "attempts_per_second": round(int(r["half_open"]) / seconds, 1),
                      "sources": int(r["sources"]), "handshakes_completed": done, "attempts": attempts,
                      "sample_sources": list(r["sample_sources"])}))
    return out


def _from_packets(ctx: Ctx, hosts: str) -> list[Finding]:
    cfg = ctx.cfg
    rows = ctx.query(f"""
        SELECT {ip('dst_ip')} AS target, dst_port AS port, any(host) AS at_host,
               sumIf(sample_rate, bitAnd(tcp_flags, 0x12) = 0x02) AS syns,
               uniqExactIf((src_ip, src_port), bitAnd(tcp_flags, 0x12) = 0x02) AS attempts,
               uniqExactIf((src_ip, src_port), bitAnd(tcp_flags, 0x17) = 0x10) AS established,
               uniqExactIf(src_ip, bitAnd(tcp_flags, 0x12) = 0x02) AS sources,
               groupUniqArrayIf(5)({ip('src_ip')}, bitAnd(tcp_flags, 0x12) = 0x02) AS sample_sources,
               toUnixTimestamp(minIf(ts, bitAnd(tcp_flags, 0x12) = 0x02)) AS first,
               toUnixTimestamp(maxIf(ts, bitAnd(tcp_flags, 0x12) = 0x02)) AS last
        FROM hdrlog.packets
        WHERE {ctx.win()} AND {hosts} AND ip_proto = 6
        GROUP BY dst_ip, dst_port HAVING syns >= {cfg.flood_min_syns}""")
    out = []
    for r in rows:
        attempts = max(int(r["attempts"]), 1)
        done = min(int(r["established"]), attempts)
        if done / attempts >= 0.2:
            continue
        syns = int(r["syns"])
        seconds = max(r["last"] - r["first"], 1)
        subject = _subject(r["target"], int(r["port"]))
        out.append(Finding(
            "syn_flood", sev(syns, [(10 * cfg.flood_min_syns, "critical")], "high"), "ip:port", subject,
            f"{syns} SYNs to {subject} from {r['sources']} source(s); {done} of {attempts} handshakes completed",
            host=r["at_host"], score=syns, first_seen=r["first"], last_seen=r["last"],
            evidence={"source": "packets", "syns": syns, "syns_per_second": round(syns / seconds, 1),
                      "sources": int(r["sources"]), "handshakes_completed": done, "attempts": attempts,
                      "sample_sources": list(r["sample_sources"])}))
    return out


DETECTOR = Detector("syn_flood", detect, order=20)
