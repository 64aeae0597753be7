"""The collector captures as a non-root user holding only CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON
(docs/security.md), and each of the three is needed: without any one of them it cannot start."""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.support import CollectorProcess, ServerProcess, wait_until
from tests.test_faults import only, send

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs Linux eBPF")

NOBODY = 65534
CAPS = {"bpf": 39, "net_admin": 12, "perfmon": 38}


def as_nobody_with(caps: list[str]) -> list[str]:
    spec = ",".join(["-all"] + [f"+{c}" for c in caps])
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            f"--inh-caps={spec}", f"--ambient-caps={spec}", f"--bounding-set={spec}", "--"]


@pytest.fixture(autouse=True)
def checkout_reachable_by_nobody():
    """nobody must reach the checkout and its .venv to import hdrlog. A clone under a private
    directory (mktemp -d makes 0700 ones) is not: grant search (o+x, not read) on exactly the
    directories above it that lack it, for this test only."""
    repo = Path(__file__).resolve().parents[1]
    dirs = {p for top in (repo, Path(sys.executable).parent) for p in (top, *top.parents)}
    granted = []
    try:
        for d in sorted(dirs):
            mode = d.stat().st_mode
            if not mode & stat.S_IXOTH:
                os.chmod(d, stat.S_IMODE(mode) | stat.S_IXOTH)
                granted.append((d, stat.S_IMODE(mode)))
        yield
    finally:
        for d, mode in reversed(granted):
            os.chmod(d, mode)


@pytest.fixture
def workdir():
    """A directory nobody may write (pytest's tmp_path sits under a root-only 0700 directory)."""
    d = Path(tempfile.mkdtemp(prefix="hdrlog-nonroot-", dir="/tmp"))
    os.chmod(d, 0o777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_collector_captures_as_nobody_with_the_three_capabilities(lab, workdir):
    server = ServerProcess(f"chdb://{workdir}/store", workdir)
    server.start()
    host = lab.add_host("a")
    collector = CollectorProcess(server.address, [host.peer_ifname], "nonroot", workdir, *only(41020),
                                 prefix=as_nobody_with(list(CAPS)))
    try:
        collector.start()
        status = dict(line.split(":\t", 1) for line in open(f"/proc/{collector.proc.pid}/status").read().splitlines()
                      if ":\t" in line)
        assert status["Uid"].split()[0] == str(NOBODY)
        assert int(status["CapEff"], 16) == sum(1 << bit for bit in CAPS.values()), status["CapEff"]
        assert send(lab, host, 41020, 500, 1000).wait(60) == 0
        wait_until(lambda: server.count("dst_port = 41020") >= 500, 30, "500 rows")
        time.sleep(0.5)
        assert server.count("dst_port = 41020 AND host = 'nonroot'") == 500
        assert collector.stop() == 0  # detaches its filters without root too
    finally:
        collector.stop()
        server.stop()


@pytest.mark.parametrize("missing", list(CAPS))
def test_without_any_one_of_them_it_cannot_start(lab, workdir, missing):
    host = lab.add_host("a")
    collector = CollectorProcess("127.0.0.1:1", [host.peer_ifname], f"no-{missing}", workdir,
                                 prefix=as_nobody_with([c for c in CAPS if c != missing]))
    try:
        with pytest.raises(AssertionError, match="collector exited"):
            collector.start(timeout=60)
    finally:
        collector.stop()
