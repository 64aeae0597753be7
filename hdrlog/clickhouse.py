"""Every ClickHouse client of hdrlog goes through here: connect, redact, one-line errors.

``connect(url)`` gives a clickhouse-connect client for ``chdb:///PATH`` (the embedded
engine) or ``http(s)://[user:password@]host:port`` (hdrlog's SQL endpoint or a real
ClickHouse); ``redact(url)`` hides the password for messages and logs; ``one_line(exc)``
is the engine's own error once (no client-library wrapper, no nested "DB::Exception", no
version or stack trace), or a network failure's gist; ``error_code(exc)`` its code.
Used by ``hdrlog sql``, the server's store and the reports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from typing import Any
from urllib.parse import unquote, urlsplit

from hdrlog.errors import UserError

log = logging.getLogger("hdrlog")

_NETWORK_GISTS = ("Connection refused", "Name or service not known", "timed out", "No route to host")


def connect(url: str, *, user: str = "", password: str | None = None, **kwargs: Any) -> Any:
    """A clickhouse-connect client; ``user``/``password`` apply when the URL carries none."""
    import clickhouse_connect

    parts = urlsplit(url)
    if parts.scheme == "chdb":
        try:
            import chdb  # noqa: F401  (the embedded store comes with the server extra)
        except ImportError:
            raise UserError(f"cannot open {url!r}: the embedded store needs hdrlog's server extra "
                            f"(pip install 'hdrlog[server]'); ask a server with --url instead") from None
        return clickhouse_connect.get_client(dsn=url, **kwargs)
    if parts.scheme in ("http", "https"):
        options = dict(connect_timeout=5, send_receive_timeout=300)
        options.update(kwargs)
        return clickhouse_connect.get_client(
            host=parts.hostname or "127.0.0.1", port=parts.port or (8443 if parts.scheme == "https" else 8123),
            username=unquote(parts.username or "") or user or "default",
            password=unquote(parts.password) if parts.password is not None else (password or ""),
            secure=parts.scheme == "https", **options)
    raise UserError(f"cannot use {redact(url)!r}: expected chdb:///PATH or http(s)://host:port")


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    return parts._replace(netloc=parts.netloc.replace(":" + parts.password + "@", ":***@")).geturl()


def one_line(exc: BaseException, limit: int = 400, *, code: bool = False) -> str:
    """The engine's message once; with ``code``, prefixed 'Code: N. ' as ClickHouse prints it."""
    text = " ".join(str(exc).split())
    for marker in (" (version ", "Stack trace"):
        cut = text.find(marker)
        if cut > 0:
            text = text[:cut]
    # Wrappers nest: "HTTPDriver ... received ClickHouse error code N ... Code: N. DB::Exception: Code: N. ..."
    inner = text.rfind("DB::Exception: ")
    if inner >= 0:
        text = text[inner + len("DB::Exception: "):]
        if code and error_code(exc):
            text = f"Code: {error_code(exc)}. {text}"
    else:
        gist = next((g for g in _NETWORK_GISTS if g in text), None)
        if gist:
            text = gist.lower()
        elif "is locked" in text or "Resource temporarily unavailable" in text:
            text = "the store is open in another process (a running server?): ask it with --url"
        text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_code(exc: BaseException) -> int:
    """The ClickHouse error code of ``exc`` (0 when it has none)."""
    value = getattr(exc, "code", None)
    if isinstance(value, int) and value:
        return value
    found = re.findall(r"Code: (\d+)", str(exc))
    return int(found[-1]) if found else 0


@contextlib.contextmanager
def engine_messages_logged():
    """What the embedded engine prints on stderr while it loads and starts (fd 2: a notice with a 40-line
    stack trace, e.g. "Cannot use cgroups reader" inside a network namespace, where no cgroup memory file
    is visible) becomes one log line per message instead."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")
    for line in text.splitlines():
        if line and not line[0].isdigit() and not line.startswith(" "):  # not a stack frame
            log.info("the embedded engine says: %s", line.split(", Stack trace")[0][:300])
