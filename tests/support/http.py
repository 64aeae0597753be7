"""HTTP for the tests of the SQL endpoint: what came back, error statuses included."""

from __future__ import annotations

import base64
import urllib.error
import urllib.request


def http_response(req: urllib.request.Request | str, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of the request ``req``, also for an error status (urlopen raises on those)."""
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def basic_auth(user: str, password: str) -> str:
    """The value of an ``Authorization`` header for HTTP basic authentication."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
