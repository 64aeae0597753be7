"""Per host: packets in the window against the same hours of previous days (robust z-score)."""

from __future__ import annotations

import math
import statistics

from hdrlog.report.detectors import Detector, Finding, Ctx, sev, DAY_MS


def robust_z(value: float, baseline: list[float], floor: float) -> tuple[float, float, float]:
    """(z, median, scale): z = (value - median) / max(1.4826 * MAD, 5% of the median, floor)."""
    med = statistics.median(baseline)
    mad = statistics.median([abs(x - med) for x in baseline])
    scale = max(1.4826 * mad, 0.05 * med, floor)
    return (value - med) / scale, med, scale


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


def detect(ctx: Ctx) -> list[Finding]:
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
            "traffic_" + kind, sev(abs(z), [(4 * cfg.spike_z, "high")], "medium"), "host", host,
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


DETECTOR = Detector("traffic_change", detect, order=40)
