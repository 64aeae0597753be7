"""The collector, in the order a record travels:

capture.py (the component: load, attach, poll, drain; bpf/build.py compiles the C)
  attach.py (tc / tcx / clsact, orphans) · handover.py (restarts under systemd) · bpfsys.py, fdstore.py
  ringbuf.py (ring-buffer readers) → records.py (decode packet records; appdecode.py, appheaders.py,
  tls.py for app-layer fields) · flows.py (flow maps) · connections.py (connection map) · filters.py
→ batcher.py (columnar batches) → spool.py (on disk until acked) → sender.py (gRPC stream, Outbox)
app.py runs them; config.py declares every setting; metrics.py counts.
"""
