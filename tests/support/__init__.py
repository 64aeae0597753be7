"""Test support, for tests only (nothing outside tests/ imports it).

- processes: the real ``hdrlog server`` and ``hdrlog collector`` as processes (hdrlog.dev.processes,
  shared with the benchmarks and the demo), free ports, waiting;
- inproc: a Server in a thread of the test process (``ServerThread``) and its config;
- batches: Batch builders over the wire contract's encoder, a stream that returns acks, and MiniCollector
  (keeps each batch until it is acked; resends);
- http: an HTTP request's status, headers and body, error statuses included (the SQL endpoint tests);
- traffic: paced UDP load from a lab host (``send_udp``).
"""

from hdrlog.dev.processes import (HDRLOG, CollectorProcess, Process, ServerProcess, free_port, hdrlog_hooks,
                                  hdrlog_tc_filters, wait_until)
from tests.support.batches import NS_DAY, T0, MiniCollector, batch, ip16, packet_columns, packets_table, stream_acks
from tests.support.http import basic_auth, http_response
from tests.support.inproc import ServerThread, config
from tests.support.traffic import send_udp

__all__ = ["HDRLOG", "NS_DAY", "T0", "CollectorProcess", "MiniCollector", "Process", "ServerProcess", "ServerThread",
           "basic_auth", "batch", "config", "free_port", "hdrlog_hooks", "hdrlog_tc_filters", "http_response", "ip16",
           "packet_columns", "packets_table", "send_udp", "stream_acks", "wait_until"]
