"""Anomaly detectors: SQL over the report window, judged against a baseline.

The window is ``[start, end)``. The baseline is the same hours on each of the previous
``baseline_days`` days (``Ctx.base``); detectors that ask "is this new?" use everything in
those days (``Ctx.history``), read from the per-minute rollups where they can. Every
detector returns ``Finding`` objects with a severity, a subject (an address, a host, a
domain, ``address:port``) and the evidence the SQL found, and adds a note when it could not
judge (no baseline yet, a table missing). Counts are weighted by ``sample_rate``.

Each detector is one function ``detect_<name>(ctx) -> list[Finding]`` listed in ``DETECTORS``.
"""

from __future__ import annotations

import ipaddress
import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

from hdrlog.server.reportconfig import ReportConfig

DAY_MS = 86_400_000
SEVERITY_RANK = {"info": 0, "low": 1, "medium": 2, "high": 3, "critical": 4}


def ip(expr: str) -> str:
    """SQL: an IPv6 column as text, IPv4-mapped addresses shown as plain IPv4."""
    return f"replaceRegexpOne(IPv6NumToString({expr}), '^::ffff:', '')"


def t(ms: int) -> str:
    return f"fromUnixTimestamp64Milli(toInt64({int(ms)}), 'UTC')"


@dataclass
class Finding:
    detector: str
    severity: str
    subject_kind: str  # ip, ip:port, host, domain, host:counter
    subject: str
    title: str
    host: str = ""
    score: float = 0.0
    first_seen: float = 0.0  # unix seconds
    last_seen: float = 0.0
    evidence: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"detector": self.detector, "severity": self.severity, "subject_kind": self.subject_kind,
                "subject": self.subject, "host": self.host, "title": self.title, "score": round(self.score, 3),
                "first_seen": self.first_seen, "last_seen": self.last_seen, "evidence": self.evidence}


@dataclass
class Ctx:
    query: Callable[[str], list[dict[str, Any]]]
    cfg: ReportConfig
    start_ms: int
    end_ms: int
    notes: list[str] = field(default_factory=list)
    tables: set[str] = field(default_factory=set)

    @property
    def length_ms(self) -> int:
        return self.end_ms - self.start_ms

    def win(self, col: str = "ts") -> str:
        return f"({col} >= {t(self.start_ms)} AND {col} < {t(self.end_ms)})"

    def win_minutes(self, col: str = "minute") -> str:
        return f"({col} >= toStartOfMinute({t(self.start_ms)}) AND {col} < {t(self.end_ms)})"

    def base(self, col: str = "ts") -> str:
        """The same hours on each of the previous baseline_days days."""
        parts = [f"({col} >= {t(self.start_ms - k * DAY_MS)} AND {col} < {t(self.end_ms - k * DAY_MS)})"
                 for k in range(1, self.cfg.baseline_days + 1)]
        return "(" + " OR ".join(parts) + ")"

    def history(self, col: str = "ts", minutes: bool = False) -> str:
        lo = self.start_ms - self.cfg.baseline_days * DAY_MS
        start = f"toStartOfMinute({t(self.start_ms)})" if minutes else t(self.start_ms)
        return f"({col} >= {t(lo)} AND {col} < {start})"

    def cap(self, findings: list[Finding], detector: str) -> list[Finding]:
        findings.sort(key=lambda f: (-SEVERITY_RANK[f.severity], -f.score))
        if len(findings) > self.cfg.max_findings:
            self.notes.append(f"{detector}: {len(findings) - self.cfg.max_findings} more findings not listed "
                              f"(max_findings = {self.cfg.max_findings})")
            findings = findings[: self.cfg.max_findings]
        return findings


def _sev(value: float, steps: list[tuple[float, str]], default: str) -> str:
    for limit, sev in steps:
        if value >= limit:
            return sev
    return default


# -- scans and floods --------------------------------------------------------------------------

def detect_port_scan(ctx: Ctx) -> list[Finding]:
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
            "port_scan", _sev(probed, [(1000, "critical"), (200, "high")], "medium"), "ip", r["source"],
            f"{r['source']} probed {probed} address:port pairs on {r['targets']} host(s); {got} answered",
            host=r["host"], score=probed, first_seen=r["first"], last_seen=r["last"],
            evidence={"probed_pairs": probed, "targets": int(r["targets"]), "probes": int(r["probes"]),
                      "answered_with_syn_ack": got, "sample_ports": list(r["ports"]),
                      "sample_targets": list(r["target_list"]), "protocols": list(r["protos"])}))
    return ctx.cap(out, "port_scan")


def detect_syn_flood(ctx: Ctx) -> list[Finding]:
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
            "syn_flood", _sev(syns, [(10 * cfg.flood_min_syns, "critical")], "high"), "ip:port", subject,
            f"{syns} SYNs to {subject} from {r['sources']} source(s); {done} of {attempts} handshakes completed",
            host=r["host"], score=syns, first_seen=r["first"], last_seen=r["last"],
            evidence={"syns": syns, "syns_per_second": round(syns / seconds, 1), "sources": int(r["sources"]),
                      "handshakes_completed": done, "attempts": attempts,
                      "sample_sources": list(r["sample_sources"])}))
    return ctx.cap(out, "syn_flood")


def detect_tcp_flags(ctx: Ctx) -> list[Finding]:
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
        "tcp_flags", _sev(int(r["probed"]), [(20, "high")], "medium"), "ip", r["source"],
        f"{r['packets']} {r['kind']} packets from {r['source']} to {r['probed']} address:port pair(s)",
        host=r["host"], score=int(r["packets"]), first_seen=r["first"], last_seen=r["last"],
        evidence={"kind": r["kind"], "packets": int(r["packets"]), "probed_pairs": int(r["probed"]),
                  "sample_targets": list(r["targets"]), "sample_ports": list(r["ports"])}) for r in rows]
    return ctx.cap(out, "tcp_flags")


# -- volume -------------------------------------------------------------------------------------

def robust_z(value: float, baseline: list[float], floor: float) -> tuple[float, float, float]:
    """(z, median, scale): z = (value - median) / max(1.4826 * MAD, 5% of the median, floor)."""
    med = statistics.median(baseline)
    mad = statistics.median([abs(x - med) for x in baseline])
    scale = max(1.4826 * mad, 0.05 * med, floor)
    return (value - med) / scale, med, scale


def detect_traffic_change(ctx: Ctx) -> list[Finding]:
    """Per host: packets in the window against the same hours of previous days (robust z-score)."""
    cfg = ctx.cfg
    if ctx.length_ms > DAY_MS:
        ctx.notes.append("traffic spike/drop: skipped, the window is longer than a day")
        return []
    e, length = ctx.end_ms, ctx.length_ms
    rows = ctx.query(f"""
        SELECT host, k, sum(sample_rate) AS packets FROM (
            SELECT host, sample_rate, toUnixTimestamp64Milli(ts) AS t, intDiv({e} - t - 1, {DAY_MS}) AS k
            FROM hdrlog.packets WHERE {ctx.win()} OR {ctx.base()})
        WHERE ({e} - t) - k * {DAY_MS} <= {length}
        GROUP BY host, k""")
    by_host: dict[str, dict[int, float]] = {}
    days_with_data: set[int] = set()
    for r in rows:
        by_host.setdefault(r["host"], {})[int(r["k"])] = float(r["packets"])
        if int(r["k"]) > 0:
            days_with_data.add(int(r["k"]))
    if len(days_with_data) < cfg.min_baseline_days:
        ctx.notes.append(f"traffic spike/drop: not judged, {len(days_with_data)} of the previous "
                         f"{cfg.baseline_days} days have data for these hours (needs {cfg.min_baseline_days})")
        return []
    days = sorted(days_with_data)
    out = []
    for host, counts in by_host.items():
        base = [counts.get(k, 0.0) for k in days]
        now = counts.get(0, 0.0)
        z, med, scale = robust_z(now, base, floor=max(10.0, cfg.spike_min_packets / 10))
        if abs(z) < cfg.spike_z or abs(now - med) < cfg.spike_min_packets:
            continue
        kind = "spike" if z > 0 else "drop"
        ratio = now / med if med else float("inf")
        out.append(Finding(
            "traffic_" + kind, _sev(abs(z), [(4 * cfg.spike_z, "high")], "medium"), "host", host,
            f"{host}: {int(now)} packets, {'%.1fx' % ratio if med else 'none in the baseline,'} the usual "
            f"{int(med)} for these hours (z = {z:+.1f})",
            host=host, score=abs(z),
            first_seen=ctx.start_ms / 1000, last_seen=ctx.end_ms / 1000,
            evidence={"packets": int(now), "baseline_median": med, "baseline_days": {str(k): counts.get(k, 0.0)
                      for k in days}, "robust_z": round(z, 2), "scale": round(scale, 1)}))
    out = ctx.cap(out, "traffic_change")
    for f in out:
        f.evidence["series"] = _series(ctx, f.subject, days)
    return out


def _series(ctx: Ctx, host: str, days: list[int]) -> dict[str, list]:
    """Packets per bucket (60 buckets) in the window, and the baseline days' median per bucket."""
    bucket = max(1000, ctx.length_ms // 60)
    e = ctx.end_ms
    safe = host.replace("\\", "\\\\").replace("'", "\\'")
    rows = ctx.query(f"""
        SELECT k, b, sum(sample_rate) AS packets FROM (
            SELECT sample_rate, toUnixTimestamp64Milli(ts) AS t, intDiv({e} - t - 1, {DAY_MS}) AS k,
                   intDiv(t + k * {DAY_MS} - {ctx.start_ms}, {bucket}) AS b
            FROM hdrlog.packets WHERE host = '{safe}' AND ({ctx.win()} OR {ctx.base()}))
        WHERE ({e} - t) - k * {DAY_MS} <= {ctx.length_ms}
        GROUP BY k, b""")
    n = int(math.ceil(ctx.length_ms / bucket))
    grid = {k: [0.0] * n for k in [0, *days]}
    for r in rows:
        k, b = int(r["k"]), int(r["b"])
        if k in grid and 0 <= b < n:
            grid[k][b] = float(r["packets"])
    base = [statistics.median(grid[k][i] for k in days) for i in range(n)] if days else [0.0] * n
    return {"start": ctx.start_ms / 1000, "bucket_seconds": bucket / 1000, "current": grid[0], "baseline": base}


# -- things that are new -----------------------------------------------------------------------

def detect_new_service(ctx: Ctx) -> list[Finding]:
    """An (address, protocol, port) that answered (TCP SYN-ACK, UDP reply) and never did in the baseline days."""
    rows = ctx.query(f"""
        SELECT {ip('ip')} AS server, ip_proto, port, any(host) AS host, sum(replies) AS replies,
               uniqMerge(clients) AS clients, toUnixTimestamp(min(minute)) AS first,
               toUnixTimestamp(max(minute)) AS last
        FROM hdrlog.services_1m
        WHERE {ctx.win_minutes()} AND (ip, ip_proto, port) NOT IN (
            SELECT ip, ip_proto, port FROM hdrlog.services_1m WHERE {ctx.history('minute', minutes=True)})
        GROUP BY ip, ip_proto, port""")
    if not _has_history(ctx):
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


def _internal_sql(ctx: Ctx, expr: str) -> str:
    """SQL: the address is internal (configured networks), multicast, broadcast or unspecified."""
    conds = [f"isIPAddressInRange({ip(expr)}, '{net}')"
             for net in [*ctx.cfg.internal_nets, "224.0.0.0/4", "255.255.255.255/32", "0.0.0.0/32", "ff00::/8", "::/128"]]
    for net in ctx.cfg.internal_nets:
        ipaddress.ip_network(net, strict=False)  # validated already; never pasted unchecked
    return "(" + " OR ".join(conds) + ")"


def _has_history(ctx: Ctx) -> bool:
    """Is there anything in the baseline days at all? (Without it, everything would be 'new'.)"""
    key = "_history_rows"
    cached = getattr(ctx, key, None)
    if cached is None:
        rows = ctx.query(f"SELECT count() AS n FROM hdrlog.packets_1m WHERE {ctx.history('minute', minutes=True)}")
        cached = int(rows[0]["n"]) if rows else 0
        setattr(ctx, key, cached)
        if not cached:
            ctx.notes.append(f"new services / destinations: not judged, nothing stored in the previous "
                             f"{ctx.cfg.baseline_days} days to compare with")
    return bool(cached)


def detect_new_destination(ctx: Ctx) -> list[Finding]:
    """External addresses (outside internal_nets) sent to in the window and never in the baseline days."""
    rows = ctx.query(f"""
        SELECT {ip('dst_ip')} AS destination, any(host) AS host, sum(packets) AS packets, sum(bytes) AS bytes,
               groupUniqArray(5)({ip('src_ip')}) AS sources, toUnixTimestamp(min(minute)) AS first,
               toUnixTimestamp(max(minute)) AS last
        FROM hdrlog.pairs_1m
        WHERE {ctx.win_minutes()} AND NOT {_internal_sql(ctx, 'dst_ip')} AND dst_ip NOT IN (
            SELECT DISTINCT dst_ip FROM hdrlog.pairs_1m WHERE {ctx.history('minute', minutes=True)})
        GROUP BY dst_ip
        ORDER BY bytes DESC""")
    if not _has_history(ctx):
        return []
    out = [Finding(
        "new_destination", "low", "ip", r["destination"],
        f"first traffic to external {r['destination']}: {r['packets']} packets from {', '.join(r['sources'])}",
        host=r["host"], score=int(r["bytes"]), first_seen=r["first"], last_seen=r["last"] + 60,
        evidence={"packets": int(r["packets"]), "bytes": int(r["bytes"]), "sources": list(r["sources"])})
        for r in rows]
    return ctx.cap(out, "new_destination")


# -- DNS ----------------------------------------------------------------------------------------

_DOMAIN = "if(cutToFirstSignificantSubdomain(dns_qname) = '', dns_qname, cutToFirstSignificantSubdomain(dns_qname))"
_QUERY = "dns_qname != '' AND bitAnd(dns_flags, 0x8000) = 0"
_NXDOMAIN = "dns_qname != '' AND bitAnd(dns_flags, 0x8000) != 0 AND dns_rcode = 3"


def detect_dns_nxdomain(ctx: Ctx) -> list[Finding]:
    """A burst of NXDOMAIN answers to one client, against its usual count for these hours."""
    cfg = ctx.cfg
    rows = ctx.query(f"""
        SELECT {ip('dst_ip')} AS client, any(host) AS host, count() AS nxdomain, uniqExact(dns_qname) AS names,
               topK(3)({_DOMAIN}) AS domains, toUnixTimestamp(min(ts)) AS first, toUnixTimestamp(max(ts)) AS last
        FROM hdrlog.packets WHERE {ctx.win()} AND {_NXDOMAIN}
        GROUP BY dst_ip HAVING nxdomain >= {cfg.nxdomain_min}""")
    if not rows:
        return []
    usual = {r["client"]: float(r["n"]) / cfg.baseline_days for r in ctx.query(f"""
        SELECT {ip('dst_ip')} AS client, count() AS n FROM hdrlog.packets
        WHERE {ctx.base()} AND {_NXDOMAIN} AND {ip('dst_ip')} IN ({", ".join(repr(r["client"]) for r in rows)})
        GROUP BY dst_ip""")}
    out = []
    for r in rows:
        n, base = int(r["nxdomain"]), usual.get(r["client"], 0.0)
        if n < 5 * base:
            continue
        out.append(Finding(
            "dns_nxdomain", _sev(n, [(10 * cfg.nxdomain_min, "high")], "medium"), "ip", r["client"],
            f"{n} NXDOMAIN answers to {r['client']} ({r['names']} names, mostly {', '.join(r['domains'])}); "
            f"usually {base:.0f} in these hours", host=r["host"], score=n, first_seen=r["first"], last_seen=r["last"],
            evidence={"nxdomain": n, "names": int(r["names"]), "top_domains": list(r["domains"]),
                      "baseline_per_day": round(base, 1)}))
    return ctx.cap(out, "dns_nxdomain")


def detect_dns_names(ctx: Ctx) -> list[Finding]:
    """Domains with many distinct subdomains, or long / random-looking labels (tunnels, DGA, exfiltration)."""
    cfg = ctx.cfg
    label = "splitByChar('.', dns_qname)[1]"
    odd = (f"(length({label}) >= {cfg.dns_long_label} OR (length({label}) >= 16 AND "
           f"arrayReduce('entropy', splitByString('', {label})) >= 3.5))")
    rows = ctx.query(f"""
        SELECT {_DOMAIN} AS domain, any(host) AS host, uniqExact(dns_qname) AS names, count() AS queries,
               uniqExactIf(dns_qname, {odd}) AS odd_names, max(length({label})) AS longest_label,
               round(avg(arrayReduce('entropy', splitByString('', {label}))), 2) AS entropy,
               groupUniqArray(5)({ip('src_ip')}) AS clients, anyIf(dns_qname, {odd}) AS example,
               toUnixTimestamp(min(ts)) AS first, toUnixTimestamp(max(ts)) AS last
        FROM hdrlog.packets WHERE {ctx.win()} AND {_QUERY}
        GROUP BY domain HAVING names >= {cfg.dns_min_names} OR odd_names >= 10""")
    if not rows:
        return []
    usual = {r["domain"]: int(r["n"]) for r in ctx.query(f"""
        SELECT domain, max(n) AS n FROM (
            SELECT {_DOMAIN} AS domain, intDiv({ctx.end_ms} - toUnixTimestamp64Milli(ts) - 1, {DAY_MS}) AS k,
                   uniqExact(dns_qname) AS n
            FROM hdrlog.packets WHERE {ctx.base()} AND {_QUERY}
              AND {_DOMAIN} IN ({", ".join(repr(r["domain"]) for r in rows)})
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
                "dns_long_names", _sev(odd_n, [(10 * 10, "high")], "medium"), "domain", r["domain"],
                f"{odd_n} long or random-looking names under {r['domain']} (e.g. {r['example'][:60]}) from "
                f"{', '.join(r['clients'])}", host=r["host"], score=odd_n, first_seen=r["first"],
                last_seen=r["last"], evidence=ev))
        if names >= cfg.dns_min_names and names > 3 * before:
            out.append(Finding(
                "dns_many_subdomains", _sev(names, [(10 * cfg.dns_min_names, "high")], "medium"), "domain",
                r["domain"], f"{names} distinct names under {r['domain']} (at most {before} on previous days)",
                host=r["host"], score=names, first_seen=r["first"], last_seen=r["last"], evidence=ev))
    return ctx.cap(out, "dns_names")


# -- IP header oddities ------------------------------------------------------------------------

def detect_ttl(ctx: Ctx) -> list[Finding]:
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


# -- the fleet ----------------------------------------------------------------------------------

def detect_silent_hosts(ctx: Ctx) -> list[Finding]:
    """Hosts that reported in this window or the one before but sent nothing for silent_after."""
    silent_ms = int(ctx.cfg.silent_seconds * 1000)
    lo = ctx.start_ms - ctx.length_ms
    rng = f"ts >= {t(lo)} AND ts < {t(ctx.end_ms)}"
    stats = f"UNION ALL SELECT host, max(ts) AS last, groupUniqArray(collector_id) AS ids FROM hdrlog.collector_stats " \
            f"WHERE {rng} GROUP BY host" if "collector_stats" in ctx.tables else ""
    rows = ctx.query(f"""
        SELECT host, toUnixTimestamp64Milli(max(last)) AS last_ms, arrayDistinct(arrayFlatten(groupArray(ids))) AS collectors
        FROM (SELECT host, max(ts) AS last, groupUniqArray(collector_id) AS ids FROM hdrlog.packets
              WHERE {rng} GROUP BY host {stats})
        GROUP BY host HAVING last_ms < {ctx.end_ms - silent_ms}""")
    out = []
    for r in rows:
        quiet = (ctx.end_ms - int(r["last_ms"])) / 1000
        out.append(Finding(
            "silent_host", "high", "host", r["host"], f"{r['host']} has sent nothing for {_human(quiet)}",
            host=r["host"], score=quiet, first_seen=int(r["last_ms"]) / 1000, last_seen=int(r["last_ms"]) / 1000,
            evidence={"last_seen": int(r["last_ms"]) / 1000, "silent_seconds": round(quiet, 1),
                      "collectors": list(r["collectors"])}))
    return ctx.cap(out, "silent_host")


# Counters of records the configuration chose not to keep (sampling, filters): coverage, not loss.
# They mirror the collector's DELIBERATE_DROPS (collector/app.py); tests/test_report.py checks both.
DELIBERATE_DROPS = ("drop_sampled_out", "drop_filtered")


def detect_collector_drops(ctx: Ctx) -> list[Finding]:
    """Collectors that lost records (a drop_<reason> counter above zero in the window).

    Sampled-out and filtered packets are what the user asked for: they are reported as
    coverage in the notes, never as a finding."""
    if "collector_stats" not in ctx.tables:
        ctx.notes.append("collector drops: no collector_stats table")
        return []
    rows = ctx.query(f"""
        SELECT host, counter, sum(value) AS dropped,
               (SELECT sum(value) FROM hdrlog.collector_stats AS s WHERE s.host = c.host AND {ctx.win('s.ts')}
                AND s.counter = 'seen') AS seen,
               toUnixTimestamp(minIf(ts, value > 0)) AS first, toUnixTimestamp(maxIf(ts, value > 0)) AS last
        FROM hdrlog.collector_stats AS c
        WHERE {ctx.win('c.ts')} AND startsWith(counter, 'drop_')
        GROUP BY host, counter HAVING dropped > 0""")
    out = []
    coverage: dict[str, dict[str, int]] = {}
    for r in rows:
        dropped, seen = int(r["dropped"]), int(r["seen"] or 0)
        if r["counter"] in DELIBERATE_DROPS:
            coverage.setdefault(r["host"], {"seen": seen})[r["counter"][5:]] = dropped
            continue
        share = dropped / seen if seen else 1.0
        out.append(Finding(
            "collector_drops", _sev(share, [(0.1, "high"), (0.01, "medium")], "low"), "host:counter",
            f"{r['host']}:{r['counter']}", f"{r['host']} dropped {dropped} records ({r['counter'][5:]}); "
            f"{share:.1%} of {seen} seen", host=r["host"], score=dropped, first_seen=r["first"], last_seen=r["last"],
            evidence={"counter": r["counter"], "dropped": dropped, "seen": seen, "share": round(share, 4)}))
    for host in sorted(coverage):
        c = coverage[host]
        parts = ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in sorted(c.items()) if name != "seen")
        ctx.notes.append(f"coverage: {host} saw {c['seen']} packets; not logged as rows by configuration: {parts} "
                         "(sampling and filters, not loss)")
    return ctx.cap(out, "collector_drops")


def _human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


DETECTORS: list[tuple[str, Callable[[Ctx], list[Finding]]]] = [
    ("port_scan", detect_port_scan),
    ("syn_flood", detect_syn_flood),
    ("tcp_flags", detect_tcp_flags),
    ("traffic_change", detect_traffic_change),
    ("new_service", detect_new_service),
    ("new_destination", detect_new_destination),
    ("dns_nxdomain", detect_dns_nxdomain),
    ("dns_names", detect_dns_names),
    ("ttl", detect_ttl),
    ("silent_host", detect_silent_hosts),
    ("collector_drops", detect_collector_drops),
]


def evidence_json(f: Finding) -> str:
    return json.dumps(f.evidence, sort_keys=True, default=str)
