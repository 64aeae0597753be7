"""scripts/check-clean.sh, the last step of `make test`: with --before/--since it fails on what a run
left behind, and names (without failing) what an earlier, killed run had already left."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pytest

from hdrlog.dev.lab import delete_netns, run

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check-clean.sh"


def check_clean(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          cwd=SCRIPT.parents[1])


@pytest.fixture
def namespaces():
    made: list[str] = []

    def make() -> str:
        name = f"hlcc-{secrets.token_hex(3)}"
        run("ip", "netns", "add", name)
        made.append(name)
        return name

    yield make
    for name in made:
        delete_netns(name)


def test_only_what_appeared_after_the_snapshot_fails_the_run(namespaces, tmp_path):
    snapshot = tmp_path / "before"
    earlier = namespaces()  # an earlier, killed run's leftover
    assert check_clean("--before", str(snapshot)).returncode == 0
    assert earlier in snapshot.read_text()
    ours = namespaces()
    r = check_clean("--since", str(snapshot))
    assert r.returncode == 1, r.stderr
    left = r.stderr.split("left behind:", 1)[1]
    assert f"namespace {ours}" in left and earlier not in left
    assert f"namespace {earlier}" in r.stderr.split("left behind:", 1)[0]  # named as already here
    assert not snapshot.exists()  # --since consumes its snapshot


def test_a_run_that_cleans_up_passes_even_on_a_dirty_machine(namespaces, tmp_path):
    snapshot = tmp_path / "before"
    earlier = namespaces()
    assert check_clean("--before", str(snapshot)).returncode == 0
    delete_netns(ours := namespaces())
    r = check_clean("--since", str(snapshot))
    assert r.returncode == 0, r.stderr
    assert earlier in r.stderr and ours not in r.stderr + r.stdout
    assert "nothing left behind" in r.stdout


def test_without_a_snapshot_everything_of_ours_fails(namespaces):
    name = namespaces()
    r = check_clean()
    assert r.returncode == 1 and f"namespace {name}" in r.stderr
    assert check_clean("--nonsense").returncode == 2
