"""Fixtures for the Ansible end-to-end tests: one booted fleet per session, torn down always.

The fleet (tests/e2e/lab.py) is one server and three collector machines booted with
systemd-nspawn; the tests run the real playbooks against it over SSH. Wall times of
the image build, the boot and every playbook run are printed at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import lab as fleetlab  # noqa: E402  (tests/e2e/lab.py)

TIMINGS: list[tuple[str, float]] = []


def record(what: str, seconds: float) -> None:
    TIMINGS.append((what, seconds))


def _missing_prerequisites() -> str:
    if os.geteuid() != 0:
        return "the fleet lab needs root (systemd-nspawn, bridges, overlay mounts)"
    missing = [t for t in ("debootstrap", "systemd-nspawn", "ssh", "ssh-keygen") if not shutil.which(t)]
    if missing:
        return f"missing {', '.join(missing)}: run scripts/install-os.sh (make install does)"
    if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "ansible-playbook")):
        return "ansible-core is not installed in this virtualenv (pip install ansible-core ansible-lint)"
    return ""


@pytest.fixture(scope="session")
def fleet(request):
    """A booted fleet (hl-server + hl-col1..3), powered off and removed after the session."""
    why = _missing_prerequisites()
    if why:
        pytest.fail(why, pytrace=False)
    lab = fleetlab.Lab(collectors=3, log=lambda m: print(m, file=sys.stderr))
    def close():
        t0 = time.monotonic()
        lab.close()
        record("lab teardown (power off, unmount, remove)", time.monotonic() - t0)
    request.addfinalizer(close)  # registered before start(): a failed boot is cleaned up too
    lab.start()
    for what, seconds in lab.timings.items():
        record(what, seconds)
    yield lab


def pytest_terminal_summary(terminalreporter):
    if not TIMINGS:
        return
    terminalreporter.section("hdrlog fleet lab: wall times")
    for what, seconds in TIMINGS:
        terminalreporter.write_line(f"{seconds:8.1f} s  {what}")


@pytest.fixture
def stopwatch():
    """``with stopwatch("site.yml fresh"):`` records the wall time in the session summary."""
    class _Watch:
        def __init__(self, what: str):
            self.what = what

        def __enter__(self):
            self.t0 = time.monotonic()
            return self

        def __exit__(self, *exc):
            record(self.what, time.monotonic() - self.t0)
    return _Watch
