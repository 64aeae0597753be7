"""`hdrlog sql`: one read-only query through clickhouse-connect, printed in a ClickHouse format.

Where it asks, in order: --url (the server's SQL endpoint or a real ClickHouse),
--clickhouse (an embedded chDB store that no server holds, or ClickHouse), then
HDRLOG_SQL_URL / HDRLOG_CLICKHOUSE, then the local server endpoint and the
default embedded store. When nothing answers it says, in one line each, what it
tried and why that failed.
"""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import unquote, urlsplit

import clickhouse_connect
from clickhouse_connect.driver.exceptions import ClickHouseError

from hdrlog.cli import UserError

DEFAULT_SQL_URL = "http://127.0.0.1:7623"
FORMAT_CLAUSE = re.compile(r"\bFORMAT\s+\w+\s*;?\s*$", re.IGNORECASE)
# readonly=2: no writes, but clickhouse-connect may still set its own session settings.
READ_ONLY = {"readonly": 2}


def default_store() -> str:
    from hdrlog.server.config import default_clickhouse

    return default_clickhouse()


def connect(url: str):
    """A clickhouse-connect client for chdb:///PATH or http(s)://[user:pw@]host:port."""
    parts = urlsplit(url)
    if parts.scheme == "chdb":
        try:
            import chdb  # noqa: F401  (the embedded store comes with the server extra)
        except ImportError:
            raise UserError(f"cannot open {url!r}: the embedded store needs hdrlog's server extra "
                            f"(pip install 'hdrlog[server]'); ask a server with --url instead") from None
        return clickhouse_connect.get_client(dsn=url)
    if parts.scheme in ("http", "https"):
        return clickhouse_connect.get_client(
            host=parts.hostname or "127.0.0.1", port=parts.port or (8443 if parts.scheme == "https" else 8123),
            username=unquote(parts.username or "") or "default", password=unquote(parts.password or ""),
            secure=parts.scheme == "https", connect_timeout=5, send_receive_timeout=300)
    raise UserError(f"cannot use {url!r}: expected chdb:///PATH or http(s)://host:port")


def _short(exc: Exception) -> str:
    """One line: ClickHouse's message without its version suffix, or the network failure's gist."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    for gist in ("Connection refused", "Name or service not known", "timed out", "No route to host"):
        if gist in text:
            return gist.lower()
    if "is locked" in text or "Resource temporarily unavailable" in text:
        return "the store is open in another process (a running server?): ask it with --url"
    text = re.sub(r"\s*\(version [^)]*\)\s*$", "", text)
    return text[:400]


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    return parts._replace(netloc=parts.netloc.replace(":" + parts.password + "@", ":***@")).geturl()


def run(query: str, *, fmt: str, url: str | None = None, clickhouse: str | None = None) -> bytes:
    query = query.strip()
    if not query:
        raise UserError("empty query")
    if url or clickhouse:
        targets = [url or clickhouse]
    elif os.environ.get("HDRLOG_SQL_URL") or os.environ.get("HDRLOG_CLICKHOUSE"):
        targets = [os.environ.get("HDRLOG_SQL_URL") or os.environ["HDRLOG_CLICKHOUSE"]]
    else:
        targets = [DEFAULT_SQL_URL, default_store()]
    # clickhouse-connect logs its own retries; the one line below says it all.
    for noisy in ("clickhouse_connect", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    failures = []
    for target in targets:
        try:
            client = connect(target)  # type: ignore[arg-type]
        except UserError:
            raise
        except Exception as exc:
            if re.search(r"\bcode: (516|194)\b", str(exc)):  # reachable, but the credentials are refused
                raise UserError(f"{redact(target)}: authentication failed: check the user and password in the URL "
                                "(http://USER:PASSWORD@host:port)") from None
            failures.append(f"{redact(target)}: {_short(exc)}")
            continue
        # A server that is read-only already (hdrlog's endpoint runs readonly = 1) refuses any change.
        ro = getattr(client, "server_settings", {}).get("readonly")
        settings = None if ro is not None and str(getattr(ro, "value", "0")) != "0" else READ_ONLY
        try:
            if FORMAT_CLAUSE.search(query):
                return client.raw_query(query, settings=settings)
            return client.raw_query(query, fmt=fmt, settings=settings)
        except ClickHouseError as exc:
            raise UserError(_short(exc)) from None
        finally:
            client.close()
    raise UserError("no store reachable: " + "; ".join(failures))
