"""Delivery of a report: a file or directory, a webhook (JSON POST) and mail (SMTP), each optional.

A failed delivery is logged with what was lost and does not stop the others. The webhook is
retried twice (connection errors and 5xx) with a short backoff; 4xx is not retried.
"""

from __future__ import annotations

import json
import logging
import os
import smtplib
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from email.message import EmailMessage
from pathlib import Path

from hdrlog.report import render
from hdrlog.report.build import Report
from hdrlog.report.config import ReportConfig

log = logging.getLogger("hdrlog.report")

EXTENSIONS = {"html": "html", "md": "md", "json": "json"}
WEBHOOK_ATTEMPTS = 3


class DeliveryError(RuntimeError):
    """One delivery failed; the message says which and why."""


def deliver(report: Report, cfg: ReportConfig) -> list[str]:
    """Write / POST / mail as configured; returns one line per delivery made. Raises nothing."""
    done: list[str] = []
    errors: list[str] = []
    text = render.render(report, cfg.format)
    try:
        done.append(write(text, cfg.out, cfg.format, report.generated_at))
    except OSError as exc:
        errors.append(f"report not written to {cfg.out}: {exc.strerror or exc}")
    if cfg.webhook and (report.findings or cfg.mail_always):
        try:
            done.append(post(report, cfg.webhook, cfg.webhook_timeout))
        except DeliveryError as exc:
            errors.append(str(exc))
    if cfg.smtp_host and (report.findings or cfg.mail_always):
        try:
            done.append(mail(report, cfg))
        except DeliveryError as exc:
            errors.append(str(exc))
    for e in errors:
        log.error("report: %s", e)
    report.notes.extend(errors)
    report.undelivered.extend(errors)
    return done


def write(text: str, out: str, fmt: str, generated_at: float) -> str:
    if not out or out == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return "standard output"
    path = Path(out)
    if out.endswith("/") or path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        stamp = datetime.fromtimestamp(generated_at, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = path / f"hdrlog-report-{stamp}.{EXTENSIONS[fmt]}"
    if path.exists() and not path.is_file():
        # A device or pipe (/dev/stdout, a FIFO): write into it; renaming over it would replace it.
        with open(path, "w") as f:
            f.write(text)
        return str(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers never see half a report
    return str(path)


def post(report: Report, url: str, timeout: float) -> str:
    body = json.dumps(report.as_dict(), default=str).encode()
    last = ""
    for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
        req = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "hdrlog-report"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return f"webhook {url}: HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
            if exc.code < 500:
                break
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        if attempt < WEBHOOK_ATTEMPTS:
            log.warning("report: webhook %s failed (%s); retry %d in %ds", url, last, attempt, attempt)
            time.sleep(attempt)
    raise DeliveryError(f"webhook {url} not delivered: {last}")


def mail(report: Report, cfg: ReportConfig) -> str:
    msg = EmailMessage()
    counts = report.counts()
    worst = next((s for s, n in counts.items() if n), "")
    msg["Subject"] = (f"[hdrlog] {len(report.findings)} findings ({worst} and below)" if report.findings
                      else "[hdrlog] no anomalies") + f", {render.iso(report.start)} to {render.iso(report.end)}"
    msg["From"] = cfg.mail_from
    msg["To"] = ", ".join(cfg.mail_to)
    msg.set_content(render.markdown(report))
    msg.add_alternative(render.page(report), subtype="html")
    try:
        with smtplib.SMTP(cfg.smtp_host, cfg.smtp_port, timeout=30) as smtp:
            if cfg.smtp_starttls:
                smtp.starttls()
            if cfg.smtp_user:
                smtp.login(cfg.smtp_user, cfg.smtp_password)
            smtp.send_message(msg)
    except (smtplib.SMTPException, OSError) as exc:
        raise DeliveryError(f"mail to {', '.join(cfg.mail_to)} via {cfg.smtp_host}:{cfg.smtp_port} not sent: {exc}") from None
    return f"mail to {', '.join(cfg.mail_to)}"
