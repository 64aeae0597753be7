"""A report as HTML (one self-contained page, charts as inline SVG), Markdown or JSON."""

from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from typing import Any

from hdrlog.report.build import Report, iso

SEVERITY_COLORS = {"critical": "#7b1fa2", "high": "#c62828", "medium": "#ef6c00", "low": "#f9a825", "info": "#607d8b"}
PALETTE = ["#1565c0", "#2e7d32", "#c62828", "#6a1b9a", "#ef6c00", "#00838f", "#5d4037", "#ad1457"]


def render(report: Report, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report.as_dict(), indent=2, default=str) + "\n"
    if fmt == "md":
        return markdown(report)
    return page(report)


# -- Markdown -------------------------------------------------------------------------------------

def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(report: Report) -> str:
    out = [f"# {report.title}", "", f"Window: {iso(report.start)} to {iso(report.end)}; baseline: the same hours "
           f"of the previous {report.baseline_days} days.", "", f"**{report.summary()}**", ""]
    if report.findings:
        out += ["| severity | detector | subject | host | finding |", "|---|---|---|---|---|"]
        out += [f"| {f.severity} | {f.detector} | `{_md(f.subject)}` | {_md(f.host)} | {_md(f.title)} |"
                for f in report.findings]
        out += ["", "## Evidence", ""]
        for i, f in enumerate(report.findings, 1):
            out.append(f"### {i}. {f.severity.upper()} {f.detector}: {f.subject}")
            out.append("")
            out.append(f.title)
            out.append("")
            for k, v in f.evidence.items():
                if k != "series":
                    out.append(f"- {k}: {_md(json.dumps(v, default=str) if isinstance(v, (list, dict)) else v)}")
            out.append("")
    if report.notes or report.failed:
        out += ["## Notes", ""]
        out += [f"- {_md(n)}" for n in report.notes]
        out += [f"- detector {k} failed: {_md(v)}" for k, v in report.failed.items()]
        out.append("")
    out.append(f"_Report {report.report_id}, generated {iso(report.generated_at)}; detectors: "
               f"{', '.join(report.detectors_run)}._")
    return "\n".join(out) + "\n"


# -- SVG charts ----------------------------------------------------------------------------------

def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def svg_bars(items: list[tuple[str, float]], *, width: int = 460, title: str = "") -> str:
    """Horizontal bars, labels left, values right."""
    if not items:
        return ""
    row, left, right = 20, 170, 70
    h = row * len(items) + (24 if title else 6)
    top = 22 if title else 4
    vmax = max(v for _, v in items) or 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" role="img" aria-label="{_e(title)}">']
    if title:
        parts.append(f'<text x="0" y="14" class="ct">{_e(title)}</text>')
    for i, (label, v) in enumerate(items):
        y = top + i * row
        w = max(1, (width - left - right) * v / vmax)
        parts.append(f'<text x="{left - 6}" y="{y + 13}" text-anchor="end" class="cl">{_e(label[:28])}</text>'
                     f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="{row - 6}" fill="#1565c0" rx="2"/>'
                     f'<text x="{left + w + 4:.1f}" y="{y + 13}" class="cl">{_num(v)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_lines(series: dict[str, list[float]], *, start: float, step: float, width: int = 720, height: int = 190,
              title: str = "", dashed: frozenset[str] = frozenset()) -> str:
    """Time series on one chart, with a legend; x is time from ``start`` by ``step`` seconds."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return ""
    left, right, top, bottom = 56, 12, 26, 34
    pw, ph = width - left - right, height - top - bottom
    n = max(len(v) for v in series.values())
    vmax = max(max(v) for v in series.values()) or 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 18 * ((len(series) + 3) // 4)}" '
             f'role="img" aria-label="{_e(title)}">', f'<text x="0" y="14" class="ct">{_e(title)}</text>',
             f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#999"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#999"/>']
    for frac in (0, 0.5, 1):
        y = top + ph * (1 - frac)
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" class="cl">{_num(vmax * frac)}</text>')
    for frac in (0, 0.5, 1):
        x = left + pw * frac
        label = datetime.fromtimestamp(start + step * (n - 1) * frac, timezone.utc).strftime("%H:%M:%S")
        anchor = "start" if frac == 0 else "end" if frac == 1 else "middle"
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="{anchor}" class="cl">{label}</text>')
    for i, (name, values) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        pts = " ".join(f"{left + pw * j / max(n - 1, 1):.1f},{top + ph * (1 - v / vmax):.1f}" for j, v in enumerate(values))
        dash = ' stroke-dasharray="5,4"' if name in dashed else ""
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{pts}"/>')
        lx, ly = left + (i % 4) * (pw // 4), height + 4 + 18 * (i // 4)
        parts.append(f'<rect x="{lx}" y="{ly}" width="12" height="4" fill="{color}"/>'
                     f'<text x="{lx + 16}" y="{ly + 6}" class="cl">{_e(name[:24])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _num(v: float) -> str:
    v = float(v)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.1f}{suffix}"
    return f"{v:.0f}" if v == int(v) else f"{v:.1f}"


# -- HTML -------------------------------------------------------------------------------------------

CSS = """
body{font-family:"DejaVu Sans",Arial,sans-serif;margin:24px;color:#212121;max-width:1100px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:13px}.summary{font-size:16px;margin:14px 0;padding:10px 14px;border-radius:6px;
background:#e8f5e9;border:1px solid #a5d6a7}.summary.bad{background:#fff3e0;border-color:#ffcc80}
.cards{display:flex;gap:10px;margin:8px 0}.card{padding:8px 14px;border-radius:6px;color:#fff;min-width:80px}
.card b{font-size:20px;display:block}table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #eee;vertical-align:top}th{background:#f5f5f5}
.sev{color:#fff;padding:1px 7px;border-radius:10px;font-size:12px}code{font-size:12px}
.finding{border:1px solid #e0e0e0;border-radius:6px;padding:10px 14px;margin:10px 0}
.finding h3{font-size:14px;margin:0 0 6px}.ev{font-size:12px;color:#333}.ev td{padding:2px 8px}
.charts{display:flex;flex-wrap:wrap;gap:24px}.ct{font-size:13px;font-weight:bold}.cl{font-size:11px;fill:#333}
.notes{font-size:12px;color:#555}
"""


def _sev(s: str) -> str:
    return f'<span class="sev" style="background:{SEVERITY_COLORS[s]}">{s}</span>'


def page(report: Report) -> str:
    counts = report.counts()
    bad = bool(report.findings)
    h = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(report.title)}</title>"
         f"<style>{CSS}</style></head><body>",
         f"<h1>{_e(report.title)}</h1>",
         f'<div class="meta">Window {iso(report.start)} &rarr; {iso(report.end)} &middot; baseline: the same hours of '
         f"the previous {report.baseline_days} days &middot; report {report.report_id}</div>",
         f'<div class="summary{" bad" if bad else ""}" id="summary">{_e(report.summary())}</div>']
    if bad:
        h.append('<div class="cards">' + "".join(
            f'<div class="card" style="background:{SEVERITY_COLORS[s]}"><b>{n}</b>{s}</div>'
            for s, n in counts.items() if n) + "</div>")
        h.append('<h2>Findings</h2><table id="findings"><tr><th>severity</th><th>detector</th><th>subject</th>'
                 "<th>host</th><th>finding</th></tr>")
        for f in report.findings:
            h.append(f"<tr><td>{_sev(f.severity)}</td><td>{_e(f.detector)}</td><td><code>{_e(f.subject)}</code></td>"
                     f"<td>{_e(f.host)}</td><td>{_e(f.title)}</td></tr>")
        h.append("</table>")
        by_detector: dict[str, int] = {}
        for f in report.findings:
            by_detector[f.detector] = by_detector.get(f.detector, 0) + 1
        h.append('<div class="charts">' + svg_bars(sorted(by_detector.items(), key=lambda x: -x[1]),
                                                   title="Findings by detector") + "</div>")
    ov = report.overview
    if ov.get("packets_by_host"):
        h.append("<h2>Traffic in the window</h2><div class=\"charts\">")
        h.append(svg_lines(ov["packets_by_host"], start=ov["start"], step=ov["bucket_seconds"],
                           title=f"Packets per {ov['bucket_seconds']:g} s, by host"))
        h.append(svg_bars(ov.get("top_sources", []), title="Top sources (packets)"))
        h.append(svg_bars(ov.get("top_dst_ports", []), title="Top destination ports (packets)"))
        h.append("</div>")
    if bad:
        h.append("<h2>Evidence</h2>")
        for i, f in enumerate(report.findings, 1):
            h.append(f'<div class="finding"><h3>{i}. {_sev(f.severity)} {_e(f.detector)}: <code>{_e(f.subject)}</code>'
                     f"</h3><div>{_e(f.title)}</div>")
            ev = f.evidence
            series = ev.get("series")
            if series:
                h.append(svg_lines({"this window": series["current"], "baseline median": series["baseline"]},
                                   start=series["start"], step=series["bucket_seconds"], dashed=frozenset({"baseline median"}),
                                   title=f"{f.subject}: packets per {series['bucket_seconds']:g} s"))
            h.append('<table class="ev">' + "".join(
                f"<tr><td>{_e(k)}</td><td>{_e(json.dumps(v, default=str) if isinstance(v, (list, dict)) else v)}</td></tr>"
                for k, v in ev.items() if k != "series") + "</table></div>")
    if report.notes or report.failed:
        h.append('<h2>Notes</h2><ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in report.notes)
                 + "".join(f"<li>detector {_e(k)} failed: {_e(v)}</li>" for k, v in report.failed.items()) + "</ul>")
    h.append(f'<p class="notes">Generated {iso(report.generated_at)} from {_e(report.source)}; detectors: '
             f"{_e(', '.join(report.detectors_run))}; findings "
             f"{'recorded in hdrlog.anomalies' if report.recorded else 'not recorded'}.</p></body></html>")
    return "\n".join(h) + "\n"
