"""Anomaly reports, a component of their own beside the server and the collector.

``config`` (ReportConfig) -> ``connection`` (the store, read-only endpoint or writable) ->
``build`` (run the ``detectors`` over a window, record the findings) -> ``render`` (HTML,
Markdown, JSON) -> ``deliver`` (file, webhook, mail). ``scheduler`` runs it inside the
server (``--report-every``); ``hdrlog report`` runs it once.
"""
