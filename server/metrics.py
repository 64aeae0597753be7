"""Everything that moves gets a counter: the server's Prometheus metrics, in one place.

Each ``Server`` owns a private registry (several servers can run in one process,
as in the tests). Names follow ``hdrlog_server_<name>_<unit>_total`` for
counters; labels stay low-cardinality (a rejection *kind*, a table name).
``ServerMetrics`` also keeps plain totals for the one-line status log.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from hdrlog.metrics_http import MetricsHttp, add_standard_metrics

log = logging.getLogger("hdrlog.server")

NS = "hdrlog_server"


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        add_standard_metrics(r, "server")
        self.batches_received = Counter(f"{NS}_batches_received", "Batches read from collector streams", registry=r)
        self.batches_rejected = Counter(f"{NS}_batches_rejected", "Batches answered REJECTED, by reason kind",
                                        ["reason"], registry=r)
        self.batches_retry = Counter(f"{NS}_batches_retry", "Acks answered RETRY (store unavailable)", registry=r)
        self.batches_acked = Counter(f"{NS}_batches_acked", "Batches answered OK", registry=r)
        self.duplicates = Counter(f"{NS}_duplicate_batches", "Resent batches whose rows were already stored",
                                  registry=r)
        self.joined = Counter(f"{NS}_joined_batches", "Resent batches that joined a pending copy of themselves",
                              registry=r)
        self.rows_received = Counter(f"{NS}_received_rows", "Rows in accepted batches, by table", ["table"],
                                     registry=r)
        self.rows_inserted = Counter(f"{NS}_inserted_rows", "Rows inserted into ClickHouse, by table", ["table"],
                                     registry=r)
        self.bytes_received = Counter(f"{NS}_received_bytes", "Serialized Batch bytes received", registry=r)
        self.inserts = Counter(f"{NS}_inserts", "INSERT statements that succeeded", registry=r)
        self.insert_errors = Counter(f"{NS}_insert_errors", "INSERT statements that failed, by kind",
                                     ["kind"], registry=r)
        self.insert_seconds = Histogram(f"{NS}_insert_duration_seconds", "Time per INSERT statement",
                                        buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.rollup_folded_keys = Counter(f"{NS}_rollup_folded_keys",
                                          "Rollup keys summed into an other row (rollup_max_keys reached)",
                                          ["table"], registry=r)
        self.pending_rows = Gauge(f"{NS}_pending_rows", "Rows accepted and not yet inserted", registry=r)
        self.streams = Gauge(f"{NS}_open_streams", "Open collector streams", registry=r)
        self.backpressure_seconds = Counter(f"{NS}_backpressure_seconds",
                                            "Time streams waited for room in the pending buffer", registry=r)
        self.sql_running = Gauge(f"{NS}_sql_queries_running", "SQL queries on a worker (the engine runs them)",
                                 registry=r)
        self.sql_queries = Counter(f"{NS}_sql_queries", "SQL endpoint requests, by outcome", ["outcome"],
                                   registry=r)
        self.sql_connections_refused = Counter(f"{NS}_sql_connections_refused", "SQL endpoint connections "
                                               "closed at once: sql_max_connections were open", registry=r)
        self.engine_memory_limit = Gauge(f"{NS}_engine_memory_limit_bytes", "The embedded engine's "
                                         "max_server_memory_usage as it runs (its system.server_settings)",
                                         registry=r)
        # Set to read the engine's own process list at scrape time (the server wires it to the store).
        self.sql_engine_queries = Gauge(f"{NS}_sql_engine_queries", "SQL-endpoint queries the engine runs now "
                                        "(its system.processes; -1 when it cannot be read)", registry=r)
        self.seq_refreshes = Counter(f"{NS}_stored_seq_reads", "Reads of one collector's stored seqs from "
                                     "ClickHouse (a stream's first batch, when other servers share the store)",
                                     registry=r)
        self.sql_inserts = Counter(f"{NS}_sql_inserts", "INSERTs on the SQL endpoint's write user, by outcome",
                                   ["outcome"], registry=r)
        self.sql_inserted_rows = Counter(f"{NS}_sql_inserted_rows", "Rows inserted through the SQL endpoint's "
                                         "write user, by table", ["table"], registry=r)
        # Plain totals for the status line.
        self.total_batches = 0
        self.total_rows = 0
        self.total_dup = 0
        self.total_rejected = 0
        self.open_streams = 0
        self.total_bytes = 0  # serialized Batch bytes received (the wire's share, for the status line)
        self._http: MetricsHttp | None = None
        self.port: int | None = None

    # -- recorders ---------------------------------------------------------

    def received(self, nbytes: int) -> None:
        self.batches_received.inc()
        self.bytes_received.inc(nbytes)
        self.total_batches += 1
        self.total_bytes += nbytes

    def rejected(self, kind: str) -> None:
        self.batches_rejected.labels(kind).inc()
        self.total_rejected += 1

    def duplicate(self) -> None:
        self.duplicates.inc()
        self.total_dup += 1

    def inserted(self, table: str, rows: int, seconds: float) -> None:
        self.rows_inserted.labels(table).inc(rows)
        self.inserts.inc()
        self.insert_seconds.observe(seconds)
        self.total_rows += rows

    def stream_opened(self) -> None:
        self.open_streams += 1
        self.streams.set(self.open_streams)

    def stream_closed(self) -> None:
        self.open_streams -= 1
        self.streams.set(self.open_streams)

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (tests assert counters)."""
        got = self.registry.get_sample_value(name, labels or None)
        return 0.0 if got is None else got

    # -- exposition ----------------------------------------------------------

    def start_http(self, host: str, port: int) -> int:
        self._http = MetricsHttp(self.registry, host, port)
        self.port = self._http.start()
        return self.port

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.stop()
            self._http = None
