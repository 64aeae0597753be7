"""`hdrlog sql`: one read-only query through clickhouse-connect, printed in a ClickHouse format.

Where it asks: --url (the server's SQL endpoint or a real ClickHouse), or
--clickhouse (an embedded chDB store that no server holds, or ClickHouse), or
HDRLOG_SQL_URL / HDRLOG_CLICKHOUSE, or else the local server's endpoint. It never
falls back to another store on its own: an answer always comes from the store the
user named (or the local server), and when that does not answer it says so in one
line with what to try.

Credentials: in the URL (http://USER:PASSWORD@host:port), or the user there or in
--user / HDRLOG_SQL_USER and the password from HDRLOG_SQL_PASSWORD or
--password-file FILE, so that it need not sit in shell history.
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


def connect(url: str, *, user: str = "", password: str | None = None):
    """A clickhouse-connect client for chdb:///PATH or http(s)://[user:pw@]host:port.

    ``user``/``password`` apply when the URL carries none."""
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
            username=unquote(parts.username or "") or user or "default",
            password=unquote(parts.password) if parts.password is not None else (password or ""),
            secure=parts.scheme == "https", connect_timeout=5, send_receive_timeout=300)
    raise UserError(f"cannot use {url!r}: expected chdb:///PATH or http(s)://host:port")


_ENGINE_ERROR = re.compile(r"Code: (\d+)\. (?:DB::Exception: )?(.*)", re.DOTALL)


def _short(exc: Exception) -> str:
    """One line: the engine's own error (code, message, name) without clickhouse-connect's wrapper
    ("HTTPDriver for ... received ClickHouse error code N") or version suffix; or the network failure's gist."""
    full = str(exc).strip()
    m = _ENGINE_ERROR.search(full)
    if m:
        message = " ".join(m.group(2).split())
        message = re.sub(r"\s*\(version [^)]*\)\s*$", "", message)
        return f"Code: {m.group(1)}. {message}"[:600]
    text = full.splitlines()[0] if full else type(exc).__name__
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


def password_from(password_file: str | None) -> str | None:
    """The password from --password-file, else HDRLOG_SQL_PASSWORD, else None."""
    if password_file:
        try:
            with open(password_file, encoding="utf-8") as f:
                return f.read().rstrip("\r\n")
        except OSError as exc:
            raise UserError(f"--password-file {password_file}: {exc.strerror}") from None
    return os.environ.get("HDRLOG_SQL_PASSWORD")


def run(query: str, *, fmt: str, url: str | None = None, clickhouse: str | None = None,
        user: str | None = None, password_file: str | None = None) -> bytes:
    query = query.strip()
    if not query:
        raise UserError("empty query")
    named = url or clickhouse or os.environ.get("HDRLOG_SQL_URL") or os.environ.get("HDRLOG_CLICKHOUSE")
    targets = [named or DEFAULT_SQL_URL]
    user = user or os.environ.get("HDRLOG_SQL_USER", "")
    password = password_from(password_file)
    # clickhouse-connect logs its own retries; the one line below says it all.
    for noisy in ("clickhouse_connect", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    failures = []
    for target in targets:
        try:
            client = connect(target, user=user, password=password)  # type: ignore[arg-type]
        except UserError:
            raise
        except Exception as exc:
            if re.search(r"\bcode: (516|194)\b", str(exc)):  # reachable, but the credentials are refused
                raise UserError(f"{redact(target)}: authentication failed: check the user and password (in the URL, "
                                "--user, HDRLOG_SQL_PASSWORD or --password-file)") from None
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
    if not named:
        raise UserError(f"no server answers at {DEFAULT_SQL_URL} ({failures[0].split(': ', 1)[-1]}): give --url "
                        f"for another server, or --clickhouse chdb://{default_store()} to open a store no server holds")
    raise UserError("no store reachable: " + "; ".join(failures))
