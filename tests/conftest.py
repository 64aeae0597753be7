"""Shared fixtures. Keep this small: one fixture per shared resource."""

from __future__ import annotations

import pytest

from hdrlog.dev.lab import Lab
from tests.support import ServerProcess


@pytest.fixture
def lab():
    """A network-namespace lab (hdrlog.dev.lab.Lab), torn down after the test even on failure."""
    with Lab() as lab:
        yield lab


@pytest.fixture
def server(tmp_path):
    """A real ``hdrlog server`` (plaintext, loopback) on a fresh embedded store, stopped after the test."""
    proc = ServerProcess(f"chdb://{tmp_path}/store", tmp_path)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def procs():
    """Append every server and collector a test starts; all are stopped after it (also on failure)."""
    started: list = []
    yield started
    for p in reversed(started):
        p.stop()
