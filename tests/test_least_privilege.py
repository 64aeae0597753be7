"""The collector captures as a non-root user holding only CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON
(docs/security.md), and each of the three is needed: without any one of them it cannot start.
The server runs as a non-root user with no capability, under the restrictions of its unit
(emulated without systemd), writing only its store."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.support import HDRLOG, CollectorProcess, ServerProcess, send_udp, wait_until
from tests.test_faults import only

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


def _scratch_dir(parent: str, mode: int):
    """A fresh directory under ``parent`` with ``mode``, removed afterwards (a fixture's body)."""
    d = Path(tempfile.mkdtemp(prefix="hdrlog-nonroot-", dir=parent))
    os.chmod(d, mode)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def workdir():
    """A directory nobody may write (pytest's tmp_path sits under a root-only 0700 directory)."""
    yield from _scratch_dir("/tmp", 0o777)


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
        assert send_udp(lab, host, 41020, 500, 1000).wait(60) == 0
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


# -- the server: the unit's restrictions, without systemd ---------------------------------------------------

def server_sandbox(store: Path) -> list[str]:
    """What hdrlog-server.service does, emulated: a private mount namespace where / is read-only
    (ProtectSystem=strict) but the store (ReadWritePaths=), a private /tmp and /dev/shm (PrivateTmp,
    PrivateDevices), then user nobody with no capabilities at all and no_new_privs.

    A checkout under /tmp (``git clone`` into ``mktemp -d``) would vanish under the private /tmp: it is
    carried into it read-only, through a scratch mount that is gone before the server starts."""
    repo = Path(__file__).resolve().parents[1]
    keep_old_tmp = carry_checkout = ""
    if repo.is_relative_to("/tmp"):
        keep_old_tmp = "mount -t tmpfs tmpfs /mnt && mkdir /mnt/old && mount --bind /tmp /mnt/old && "
        rel = repo.relative_to("/tmp")
        carry_checkout = (f"mkdir -p /tmp/{rel} && mount --bind /mnt/old/{rel} /tmp/{rel} && "
                          f"mount -o remount,bind,ro /tmp/{rel} && umount -l /mnt && ")
    script = (f"mount --make-rprivate / && mount --bind {store} {store} && {keep_old_tmp}"
              f"mount -t tmpfs -o mode=1777 tmpfs /tmp && {carry_checkout}mount -t tmpfs -o mode=1777 tmpfs /dev/shm && "
              "mount -o remount,bind,ro / && "
              f'exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups --no-new-privs '
              '--inh-caps=-all --bounding-set=-all -- "$@"')
    return ["unshare", "--mount", "--", "sh", "-c", script, "sh", *HDRLOG]


def as_the_server(pid: int, command: str) -> subprocess.CompletedProcess:
    """``command`` as the server's user, in the server's mount namespace."""
    return subprocess.run(["nsenter", f"--target={pid}", "--mount", "--", "setpriv", f"--reuid={NOBODY}",
                           f"--regid={NOBODY}", "--clear-groups", "--bounding-set=-all", "--", "sh", "-c", command],
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def var_workdir():
    """Like workdir, but under /var/tmp (the sandbox mounts a private /tmp over /tmp) and 0755."""
    yield from _scratch_dir("/var/tmp", 0o755)


def test_server_runs_as_nobody_without_capabilities_writing_only_its_store(var_workdir):
    workdir = var_workdir
    from hdrlog import pki
    from tests.test_ingest_guard import credentials, one_batch
    from tests.support import batch

    certs = workdir / "pki"
    pki.init_ca(certs)
    pki.issue(certs, "central", server=True, sans=["127.0.0.1"])
    pki.issue(certs, "host-a")
    os.chmod(certs, 0o755)
    for f in certs.iterdir():
        os.chmod(f, 0o644)
    key = certs / "central.key"
    os.chown(key, NOBODY, NOBODY)
    os.chmod(key, 0o600)  # readable by the server's user only, as the role installs it
    store = workdir / "store"
    store.mkdir()
    os.chown(store, NOBODY, NOBODY)
    server = ServerProcess(f"chdb://{store}", workdir, pki=certs, command=server_sandbox(store))
    try:
        server.start()
        pid = server.proc.pid
        status = dict(line.split(":\t", 1) for line in open(f"/proc/{pid}/status").read().splitlines()
                      if ":\t" in line)
        assert status["Uid"].split() == [str(NOBODY)] * 4
        assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0, status
        assert status["NoNewPrivs"].strip() == "1"
        # It does its job: an mTLS batch is acked and stored.
        ack = one_batch(server.address, credentials(certs, "host-a"), batch(1, 10, collector_id="host-a/1",
                                                                            host="host-a"), timeout=30)
        assert ack is not None and ack.rows == 10, ack
        assert server.count("host = 'host-a'") == 10
        # Its user, where it runs: cannot read /etc/shadow, can write its store and nothing else.
        shadow = as_the_server(pid, "cat /etc/shadow")
        assert shadow.returncode != 0 and "Permission denied" in shadow.stderr, shadow
        assert as_the_server(pid, f"touch {store}/probe && rm {store}/probe").returncode == 0
        for outside in (workdir / "probe", Path("/var/tmp/hdrlog-probe"), Path("/etc/hdrlog-probe"),
                        Path(__file__).parent / "probe"):
            wrote = as_the_server(pid, f"touch {outside}")
            assert wrote.returncode != 0 and "Read-only file system" in wrote.stderr, (outside, wrote)
            assert not outside.exists()
        # The private key is readable by the server's user and nobody else unprivileged.
        assert as_the_server(pid, f"head -c 10 {key}").returncode == 0
        other = subprocess.run(["setpriv", "--reuid=1", "--regid=1", "--clear-groups", "--bounding-set=-all",
                                "--", "cat", str(key)], capture_output=True, text=True, timeout=30)
        assert other.returncode != 0 and "Permission denied" in other.stderr, other
    finally:
        server.stop()
