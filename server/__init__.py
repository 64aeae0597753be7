"""hdrlog server: receive → validate → insert → ack, plus the read-only SQL endpoint.

The entry point is ``serve(config)``; ``Server`` is the component it runs. Both
load on first use: the CLI imports this package for its flags on hosts that run
only a collector, without the server extra (chDB, pyarrow).
"""

__all__ = ["Server", "ServerConfig", "serve"]


def __getattr__(name: str):
    if name in ("Server", "serve"):
        from hdrlog.server import app

        return getattr(app, name)
    if name == "ServerConfig":
        from hdrlog.server.config import ServerConfig

        return ServerConfig
    raise AttributeError(f"module 'hdrlog.server' has no attribute {name!r}")
