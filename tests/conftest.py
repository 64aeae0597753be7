"""Shared fixtures. Keep this small: one fixture per shared resource."""

from __future__ import annotations

import datetime as dt

import pytest

from hdrlog import pki
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


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A test PKI: a CA signing central (server, 127.0.0.1 and localhost), host-a, host-b and an expired
    one; other/ is another CA with its own host-a."""
    d = tmp_path_factory.mktemp("pki")
    pki.init_ca(d)
    pki.issue(d, "central", server=True, sans=["127.0.0.1", "localhost"])
    pki.issue(d, "host-a")
    pki.issue(d, "host-b")
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
    pki.issue(d, "expired", not_before=old, days=1)
    other = d / "other"
    pki.init_ca(other, name="some other CA")
    pki.issue(other, "host-a")
    return d
