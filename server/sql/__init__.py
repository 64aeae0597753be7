"""The SQL endpoint: a read-only, ClickHouse-compatible HTTP interface to the store.

The path of a request, one module each:

- ``http``    the aiohttp app: routes, credentials before the body, limits wiring, streaming answers;
- ``body``    the request body, decoded with an output cap off the event loop;
- ``limits``  what one query and one client may take, and the failed-login rate limit;
- ``guard``   may this statement run, decided by the engine's own parser; what exactly runs;
- ``encode``  the engine's chunks into the client's bytes (joined, Native hook, compressed);
- ``errors``  ClickHouse's error shape, with the engine's own names;
- ``insert``  the write user's ``INSERT ... FORMAT Arrow|Native`` (``--sql-write-user``, off by default).

docs/sql-endpoint.md describes it for users.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Limits", "SqlEndpoint"]


def __getattr__(name: str) -> Any:  # lazy: store.py imports sql.errors, and http imports the store
    if name == "SqlEndpoint":
        from hdrlog.server.sql.http import SqlEndpoint
        return SqlEndpoint
    if name == "Limits":
        from hdrlog.server.sql.limits import Limits
        return Limits
    raise AttributeError(name)
