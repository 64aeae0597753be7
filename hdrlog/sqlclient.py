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

from clickhouse_connect.driver.exceptions import ClickHouseError

from hdrlog.clickhouse import connect, one_line, redact
from hdrlog.errors import UserError

DEFAULT_SQL_URL = "http://127.0.0.1:7623"
FORMAT_CLAUSE = re.compile(r"\bFORMAT\s+\w+\s*;?\s*$", re.IGNORECASE)
# readonly=2: no writes, but clickhouse-connect may still set its own session settings.
READ_ONLY = {"readonly": 2}


def default_store() -> str:
    from hdrlog.server.config import default_clickhouse

    return default_clickhouse()


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
            failures.append(f"{redact(target)}: {one_line(exc, code=True)}")
            continue
        # A server that is read-only already (hdrlog's endpoint runs readonly = 1) refuses any change.
        ro = getattr(client, "server_settings", {}).get("readonly")
        settings = None if ro is not None and str(getattr(ro, "value", "0")) != "0" else READ_ONLY
        try:
            if FORMAT_CLAUSE.search(query):
                return client.raw_query(query, settings=settings)
            return client.raw_query(query, fmt=fmt, settings=settings)
        except ClickHouseError as exc:
            raise UserError(one_line(exc, code=True)) from None
        finally:
            client.close()
    if not named:
        raise UserError(f"no server answers at {DEFAULT_SQL_URL} ({failures[0].split(': ', 1)[-1]}): give --url "
                        f"for another server, or --clickhouse chdb://{default_store()} to open a store no server holds")
    raise UserError("no store reachable: " + "; ".join(failures))
