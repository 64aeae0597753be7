"""Serve a Prometheus registry over HTTP at /metrics, and stop serving it cleanly."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, start_http_server


class MetricsHttp:
    """The /metrics endpoint of one component; ``stop()`` joins its thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        self._http, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self._http.server_address[1]

    def stop(self) -> None:
        if self._http is None:
            return
        self._http.shutdown()
        self._http.server_close()
        if isinstance(self._thread, threading.Thread):
            self._thread.join(timeout=5)
        self._http = None
