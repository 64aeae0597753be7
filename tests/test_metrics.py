"""The /metrics endpoints: process figures, build info, every drop reason, no *_created series, only /metrics."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from hdrlog.collector.metrics import CollectorMetrics
from hdrlog.metrics_http import MetricsHttp
from hdrlog.server.metrics import ServerMetrics


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read().decode()


@pytest.mark.parametrize("component", ["collector", "server"])
def test_standard_metrics_and_only_metrics_served(component):
    if component == "collector":
        counters = {"seen": 10, "logged": 7, "flowed": 3, "drop_ringbuf_full": 2, "drop_spool_full": 1}
        registry = CollectorMetrics(lambda: counters, lambda: {"sent_rows": 5},
                                    lambda: {"conn": (1200, 65536), "flow": (7, 65536)}).registry
    else:
        registry = ServerMetrics().registry
    http = MetricsHttp(registry, "127.0.0.1", 0)
    port = http.start()
    try:
        text = scrape(port)
        with pytest.raises(urllib.error.HTTPError) as err:
            scrape(port, "/")
        assert err.value.code == 404
    finally:
        http.stop()
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"):
        assert f"\n{name} " in text, name
    assert f'hdrlog_build_info{{component="{component}",version=' in text
    assert "_created" not in text
    if component == "collector":
        assert 'hdrlog_collector_dropped_records_total{reason="ringbuf_full"} 2.0' in text
        assert 'hdrlog_collector_dropped_records_total{reason="spool_full"} 1.0' in text
        assert "hdrlog_collector_flowed_packets_total 3.0" in text
        assert 'hdrlog_collector_map_entries{map="conn"} 1200.0' in text
        assert 'hdrlog_collector_map_capacity{map="flow"} 65536.0' in text


def test_status_lines_grow_rarer_while_nothing_changes():
    from hdrlog.logs import StatusLines

    s = StatusLines(5.0, max_gap=40.0)
    logged = [t for t in range(0, 200, 5) if s.due("idle", float(t))]
    assert logged == [0, 5, 15, 35, 75, 115, 155, 195]   # gaps 5, 10, 20, 40, 40, ...
    assert s.due("busy", 196.0) and s.due("busier", 197.0)  # a change is always logged at once
