"""The collector's Prometheus metrics, read from its counters at scrape time.

Names follow ``hdrlog_collector_<name>_<unit>_total``. Every record not kept has
a reason label on ``hdrlog_collector_dropped_records_total``, the same reasons as
the drop_<reason> rows of collector_stats.
"""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from hdrlog.metrics_http import add_standard_metrics

NS = "hdrlog_collector"


class CollectorMetrics(Collector):
    def __init__(self, counters: Callable[[], dict[str, int]], sending: Callable[[], dict[str, float]],
                 maps: Callable[[], dict[str, tuple[int, int]]] = dict):
        self._counters = counters
        self._sending = sending
        self._maps = maps  # map name -> (entries, capacity)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        add_standard_metrics(self.registry, "collector")

    def collect(self) -> Iterator:
        c = self._counters()
        yield CounterMetricFamily(f"{NS}_seen_packets", "Packets the classifier ran on", value=c.get("seen", 0))
        yield CounterMetricFamily(f"{NS}_logged_records", "Header records decoded in user space",
                                  value=c.get("logged", 0))
        yield CounterMetricFamily(f"{NS}_truncated_records", "Records whose headers were cut short",
                                  value=c.get("truncated", 0))
        yield CounterMetricFamily(f"{NS}_flowed_packets", "Packets counted into an in-kernel flow",
                                  value=c.get("flowed", 0))
        yield CounterMetricFamily(f"{NS}_flow_map_full_packets", "Packets that found the flow map full "
                                  "(logged as rows instead; raise flow_entries)", value=c.get("flow_map_full", 0))
        dropped = CounterMetricFamily(f"{NS}_dropped_records", "Records not kept, by reason", labels=["reason"])
        for name, value in sorted(c.items()):
            if name.startswith("drop_"):
                dropped.add_metric([name[len("drop_"):]], value)
        yield dropped
        fill = self._maps()
        entries = GaugeMetricFamily(f"{NS}_map_entries", "Entries in a kernel map (conn: at its last read; "
                                    "flow: at the end of the last interval)", labels=["map"])
        capacity = GaugeMetricFamily(f"{NS}_map_capacity", "Entries a kernel map holds before it refuses new ones "
                                     "(conn_entries, flow_entries)", labels=["map"])
        for name, (n, cap) in sorted(fill.items()):
            entries.add_metric([name], n)
            capacity.add_metric([name], cap)
        yield entries
        yield capacity
        s = self._sending()
        for name, doc in (("sent_rows", "Rows written to the server stream (resends included)"),
                          ("acked_rows", "Rows the server acknowledged as stored"),
                          ("reconnects", "Times the stream to the server was re-established"),
                          ("server_switches", "Times the collector moved to another of its servers (failover)")):
            yield CounterMetricFamily(f"{NS}_{name}", doc, value=s.get(name, 0))
        yield GaugeMetricFamily(f"{NS}_unacked_rows", "Rows waiting for the server's ack", value=s.get("unacked_rows", 0))
        yield GaugeMetricFamily(f"{NS}_server_connected", "1 while the stream to the server is up",
                                value=s.get("connected", 0))
        yield GaugeMetricFamily(f"{NS}_spool_degraded", "1 while the spool's disk refuses batches "
                                "(full, read-only, failing) and they are held in memory", value=s.get("spool_degraded", 0))
        for name, doc in (("spool_corrupt_files", "Spooled batch files dropped because they failed their checks"),
                          ("spool_write_errors", "Batch writes the spool's disk refused")):
            yield CounterMetricFamily(f"{NS}_{name}", doc, value=c.get(name, 0))
