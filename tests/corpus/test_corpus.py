"""Corpus test: replay tcpdump's captures through the classifier and agree with tshark.

``make test`` runs ``runner.SUBSET`` (a fixed, representative list, about a minute);
``HDRLOG_CORPUS=full`` (``make corpus``) runs every capture. Prints the per-field
agreement table, the frames the kernel would not send and every disagreement.
Asserted: no robustness problem (no crash, no stall, every frame that crossed the
veth has its record or a counted ring-buffer drop), and on the full run at least
99.9 % agreement per field.
"""

from __future__ import annotations

import os

import pytest

from tests.corpus import runner

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="eBPF and network namespaces need root")

FULL = os.environ.get("HDRLOG_CORPUS") == "full"


def test_corpus_agrees_with_tshark(tmp_path, capsys):
    available = {p.name for p in runner.CORPUS.glob("*.pcap")}
    if not available:
        pytest.skip(f"no corpus at {runner.CORPUS}")
    files = sorted(available) if FULL else [f for f in runner.SUBSET if f in available]
    report = runner.run(files, tmp_path, timeout=1800 if FULL else 110)
    with capsys.disabled():
        print("\n" + report.summary())
    assert not report.problems, "\n".join(report.problems[:50])
    assert report.crossed > 0
    if FULL:
        for name in runner.oracle.COMPARED:
            n, a = report.compared[name], report.agree[name]
            assert not n or a / n >= 0.999, f"{name}: {a}/{n} agree with tshark"
