"""The /metrics endpoint of one component, and the metrics every component exports.

``MetricsHttp(registry, host, port)`` is inert; ``start()`` serves the registry at
``/metrics`` only (anything else is 404) from a thread, ``stop()`` ends and joins it.
``add_standard_metrics`` puts the process's own figures (CPU seconds, resident memory,
open fds: ``process_*``), the Python runtime and ``hdrlog_build_info`` into a registry.
Series ``*_created`` are not exported: they double every counter and no query uses them.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import prometheus_client
from prometheus_client import CollectorRegistry, Gauge, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder

from hdrlog import __version__

prometheus_client.disable_created_metrics()


def add_standard_metrics(registry: CollectorRegistry, component: str) -> None:
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    info = Gauge("hdrlog_build_info", "Always 1; labels name the running hdrlog", ["version", "component"],
                 registry=registry)
    info.labels(__version__, component).set(1)


class MetricsHttp:
    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        self.registry, self.host, self.port = registry, host, port
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Listen and serve; returns the bound port (``port`` 0 picks a free one)."""
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                body = encoder(registry)
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # scrapes are not news
                pass

        server_class = ThreadingHTTPServer
        if ":" in self.host:
            server_class = type("ThreadingHTTPServer6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
        self._http = server_class((self.host, self.port), Handler)
        self._http.daemon_threads = True
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, name="hdrlog-metrics", daemon=True)
        self._thread.start()
        return self.port

    def stop(self) -> None:
        if self._http is None:
            return
        self._http.shutdown()
        self._http.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._http = self._thread = None
