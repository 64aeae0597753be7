"""What one query and one client may take: ``Limits`` (ServerConfig's sql_* keys), the settings a query
runs with (``capped_settings``), and the per-address rate limit of failed logins (``AuthFailureLimiter``).

docs/security.md "Limits" explains each. A client may lower a limit with a URL parameter, never raise it
above its cap; ``max_result_bytes`` has a default below its cap (``default_result_bytes``) that a client
may raise up to the cap, so one careless query cannot hold a large answer in the server's memory.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass

from hdrlog.server.sql.errors import SqlError

MAX_AUTH_PEERS = 10_000  # client addresses the login rate limiter remembers (least recently seen dropped first)
SQL_THREAD_NICE = 10  # os_thread_priority of SQL query threads, at least (a client may only raise it)


@dataclass(frozen=True)
class Limits:
    """What one query and one client may take (ServerConfig's sql_* keys)."""

    max_concurrent: int = 4
    max_queued: int = 16
    max_connections: int = 256
    max_connections_per_address: int = 64
    request_timeout: float = 30.0  # seconds for a request's head, and again for its body (+1 s per MiB)
    queue_timeout: float = 10.0
    max_memory_usage: int = 1 << 30
    max_execution_time: float = 60.0
    max_rows_to_read: int = 5_000_000_000
    max_result_rows: int = 10_000_000
    max_result_bytes: int = 256 << 20
    default_result_bytes: int = 64 << 20  # max_result_bytes of a query that names none (at most the cap)
    auth_failure_burst: int = 10
    auth_failures_per_minute: float = 6.0

    def caps(self) -> dict[str, int | float]:
        """The settings every query runs with, at most these values."""
        return {"max_memory_usage": self.max_memory_usage, "max_execution_time": self.max_execution_time,
                "max_rows_to_read": self.max_rows_to_read, "max_result_rows": self.max_result_rows,
                "max_result_bytes": self.max_result_bytes}

    def unasked(self) -> dict[str, int | float]:
        """What a query runs with when it names a limit not at all: the caps, but the default result size."""
        return {**self.caps(), "max_result_bytes": min(self.default_result_bytes, self.max_result_bytes)}

    def defaults(self) -> dict[str, int | float]:
        """What a SQL handle is set to before any query: the unasked limits, and niced query threads."""
        return {**self.unasked(), "os_thread_priority": SQL_THREAD_NICE}


def capped_settings(settings: dict[str, str], limits: Limits) -> dict[str, str]:
    """The client's settings with each limit at most its cap (a higher value or 0 = unlimited: the cap; none:
    the default, which is the cap but for max_result_bytes)."""
    out = dict(settings)
    unasked = limits.unasked()
    for name, cap in limits.caps().items():
        raw = out.get(name)
        value = unasked[name]
        if raw is not None and raw.strip():
            value = cap
            try:
                asked = float(raw)
            except ValueError:
                raise SqlError(36, f"bad value {raw[:40]!r} for setting {name}: expected a number") from None
            if 0 < asked < cap:
                value = asked
        out[name] = repr(float(value)) if name == "max_execution_time" else str(int(value))
    # Query threads run niced (Linux nice 10): ingest's threads win the CPU when both want it.
    try:
        nice = int(float(out.get("os_thread_priority", "0")))
    except ValueError:
        nice = 0
    out["os_thread_priority"] = str(min(19, max(SQL_THREAD_NICE, nice)))
    return out


class AuthFailureLimiter:
    """A token bucket of failed logins per client address, in bounded memory.

    Each address starts with ``burst`` tokens; a failed login takes one; tokens come back at
    ``per_minute``. With no token left the address is refused without a check. IPv6 addresses count per /64
    (one host usually has the whole prefix). At most ``max_peers`` addresses are remembered; the least recently
    seen is forgotten first (it then starts again with a full bucket).
    """

    def __init__(self, burst: int, per_minute: float, max_peers: int = MAX_AUTH_PEERS):
        self.burst = float(burst)
        self.rate = per_minute / 60.0
        self.max_peers = max_peers
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.refused: dict[str, int] = {}

    @staticmethod
    def key(peer: str) -> str:
        try:
            addr = ipaddress.ip_address(peer)
        except ValueError:
            return peer
        if isinstance(addr, ipaddress.IPv6Address):
            if addr.ipv4_mapped is not None:
                return str(addr.ipv4_mapped)
            return str(ipaddress.IPv6Network((addr, 64), strict=False))
        return str(addr)

    def _tokens(self, key: str, now: float) -> float:
        tokens, then = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - then) * self.rate)

    def limited(self, key: str, now: float) -> bool:
        """True when ``key`` has no failure left: refuse without checking."""
        if key not in self._buckets:
            return False
        return self._tokens(key, now) < 1.0

    def failed(self, key: str, now: float) -> None:
        self._buckets[key] = (self._tokens(key, now) - 1.0, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_peers:
            self._buckets.popitem(last=False)

    def retry_after(self, key: str, now: float) -> int:
        return max(1, int((1.0 - self._tokens(key, now)) / self.rate + 0.999))

    def __len__(self) -> int:
        return len(self._buckets)


