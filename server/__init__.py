"""hdrlog server: receive → validate → insert → ack, plus the read-only SQL endpoint.

The entry point is ``serve(config)``; ``Server`` is the component it runs.
"""

from hdrlog.server.app import Server, serve
from hdrlog.server.config import ServerConfig

__all__ = ["Server", "ServerConfig", "serve"]
