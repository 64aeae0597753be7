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


# A host installed without the server extra (`pip install hdrlog`, what collector hosts get):
# chDB and pyarrow cannot be imported. The collector's commands work; the server's say what to install.
WITHOUT_SERVER_EXTRA = """
import sys
sys.modules["chdb"] = None  # import chdb / pyarrow now raise ImportError, as if not installed
sys.modules["pyarrow"] = None
from hdrlog.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_without_server_extra(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HDRLOG[0], "-c", WITHOUT_SERVER_EXTRA, *args], capture_output=True, text=True, timeout=120)


def test_without_the_server_extra_collector_commands_work_and_server_ones_say_what_to_install(tmp_path):
    p = run_without_server_extra("collector", "run", "--insecure", "--server", "127.0.0.1:1", "--iface", "nosuch0")
    assert p.returncode == 1 and last_line(p).endswith("interface 'nosuch0' does not exist")
    p = run_without_server_extra("server", "run", "--insecure", "--clickhouse", f"chdb://{tmp_path}/s")
    assert p.returncode == 1
    assert last_line(p) == ("hdrlog: hdrlog server run needs hdrlog's server extra (pyarrow and chdb not "
                            "installed): pip install 'hdrlog[server]'")
    for args in (["sql", "--clickhouse", f"chdb://{tmp_path}/s", "SELECT 1"],
                 ["report", "--clickhouse", f"chdb://{tmp_path}/s"]):
        p = run_without_server_extra(*args)
        assert p.returncode == 1 and "the embedded store needs hdrlog's server extra" in last_line(p), p.stderr
    assert not (tmp_path / "s").exists()
