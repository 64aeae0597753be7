"""The command line fails in one clear line naming the bad input, never with a traceback."""

from __future__ import annotations

import subprocess

from tests.support import HDRLOG, free_port


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*HDRLOG, *args], capture_output=True, text=True, timeout=120)


def last_line(p: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in p.stderr, p.stderr
    return p.stderr.strip().splitlines()[-1]


def test_sql_names_the_store_it_could_not_reach():
    port = free_port()
    p = run("sql", "--url", f"http://127.0.0.1:{port}", "SELECT 1")
    assert p.returncode == 1
    assert p.stderr.strip() == f"hdrlog: no store reachable: http://127.0.0.1:{port}: connection refused"


def test_sql_against_an_embedded_store(tmp_path):
    p = run("sql", "--clickhouse", f"chdb://{tmp_path}/store", "--format", "CSV", "SELECT 40 + 2 AS answer")
    assert p.returncode == 0 and p.stdout.strip() == "42", p.stderr


def test_collector_names_a_missing_interface():
    p = run("collector", "run", "--insecure", "--server", "127.0.0.1:1", "--iface", "nosuch0")
    assert p.returncode == 1
    assert last_line(p).endswith("collector: unable to start: capture ifaces: interface 'nosuch0' does not exist")


def test_server_refuses_plaintext_without_insecure():
    p = run("server", "run", "--clickhouse", "chdb:///tmp/never-opened")
    assert p.returncode == 2 and "--insecure" in last_line(p) and len(p.stderr.strip().splitlines()) == 1
