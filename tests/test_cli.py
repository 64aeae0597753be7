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


def test_sql_never_answers_from_a_store_it_was_not_given(tmp_path):
    """Nothing on the default endpoint: say so and what to try, never open the default store instead."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("HDRLOG_SQL_URL", "HDRLOG_CLICKHOUSE")}
    p = subprocess.run([*HDRLOG, "sql", "SELECT 1"], capture_output=True, text=True, timeout=120, env=env,
                       cwd=tmp_path)
    assert p.returncode == 1 and p.stdout == "", p.stdout
    assert p.stderr.startswith("hdrlog: no server answers at http://127.0.0.1:7623") and "--clickhouse" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


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


def test_no_option_prefix_matching_and_no_value_echoed():
    """`--sql-password x` once became `--sql-password-file x`, and the error printed the password."""
    r = subprocess.run([*HDRLOG, "server", "run", "--insecure", "--sql-password", "hunter2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "--sql-password" in r.stderr and "hunter2" not in r.stderr, r.stderr


def test_help_names_arguments_by_their_keys():
    out = subprocess.run([*HDRLOG, "collector", "run", "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "--host-id HOST_ID" in out and "--batch-interval DURATION" in out
    out = subprocess.run([*HDRLOG, "server", "run", "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "--report-every REPORT_EVERY" in out and " Z\n" not in out and "CONNECTION " not in out


def test_check_validates_a_config_and_exits(tmp_path):
    good = subprocess.run([*HDRLOG, "server", "check", "--insecure", "--flush-interval", "500ms"],
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0 and "configuration OK" in good.stdout, good.stderr
    bad = subprocess.run([*HDRLOG, "server", "check", "--insecure", "--status-interval", "soon"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--status-interval" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    good = subprocess.run([*HDRLOG, "collector", "check", "--insecure", "--server", "127.0.0.1:1", "--iface", "lo"],
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0 and "interfaces matching now: lo" in good.stdout, good.stderr
    bad = subprocess.run([*HDRLOG, "collector", "check", "--insecure", "--iface", "lo"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "server" in bad.stderr


def test_log_lines_carry_an_rfc3339_time_or_under_journald_a_priority(tmp_path):
    """Not under journald: '2026-12-01T11:25:15.123+00:00 WARNING ...'. Under it (JOURNAL_STREAM names our
    stderr): no time of our own, and '<4>' so that `journalctl -p warning` selects the line."""
    import os
    import re

    p = run("collector", "run", "--insecure", "--server", "127.0.0.1:1", "--iface", "nosuch0")
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}([+-]\d\d:\d\d|Z) (WARNING|ERROR)", p.stderr), p.stderr
    err = tmp_path / "stderr"
    with open(err, "w") as f:
        st = os.fstat(f.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        subprocess.run([*HDRLOG, "collector", "run", "--insecure", "--server", "127.0.0.1:1", "--iface", "nosuch0"],
                       stdout=subprocess.DEVNULL, stderr=f, env=env, timeout=120)
    lines = err.read_text().splitlines()
    assert lines and all(re.match(r"^<[2-7]>", line) for line in lines), lines
    assert any(line.startswith("<3>collector: unable to start") for line in lines), lines
    assert any(line.startswith("<4>--insecure") for line in lines), lines


def test_print_bpf_shows_the_configs_flags():
    """--print-bpf prints what this config compiles (tunnel ports, types); a config that does not validate
    gets the defaults' source and a line saying why."""
    p = run("collector", "run", "--insecure", "--server", "127.0.0.1:1", "--iface", "lo", "--vxlan-ports",
            "14789,4789", "--tunnels", "vxlan,gre", "--print-bpf")
    assert p.returncode == 0, p.stderr
    first = p.stdout.splitlines()[0]
    assert "-DHDRLOG_IS_VXLAN_PORT(p)=((p)==4789||(p)==14789)" in first and "-DHDRLOG_TUNNEL_IPIP=0" in first
    assert "-DHDRLOG_IS_GENEVE_PORT(p)=(0)" in first
    p = run("collector", "run", "--print-bpf")
    assert p.returncode == 0 and "-DHDRLOG_IS_VXLAN_PORT(p)=((p)==4789||(p)==8472)" in p.stdout.splitlines()[0]
    assert "the config does not validate" in p.stderr
