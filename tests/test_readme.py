"""The README's "Running it yourself" commands and docs/sql-endpoint.md's curl lines, run as printed.

Two namespaces joined by a veth pair: "central" answers at 198.18.100.10 (the address the README's
server certificate names) and runs the server, `hdrlog sql`, `hdrlog report` and curl (127.0.0.1 is
its own); "web-01" runs the collector on its eth0 — its certificate says web-01, its hostname is this
machine's (the case that once lost every row). Nothing of it touches the root namespace's addresses.
Only the environment differs from a real machine: the server's store and the collector's spool live
under the test's directory (HDRLOG_SERVER_CLICKHOUSE, HDRLOG_COLLECTOR_SPOOL), never /var/lib/hdrlog.
"""

from __future__ import annotations

import json
import secrets
import os
import re
import signal
import subprocess
import sys
from pathlib import Path


from hdrlog.dev.lab import delete_netns, kill_all, run
from tests.support import wait_until

ROOT = Path(__file__).resolve().parent.parent
SERVER_ADDR = "198.18.100.10"  # the README's --san
HOST_ADDR = "198.18.100.2"


def shell_blocks(path: Path, after: str = "") -> list[str]:
    """The ```sh (or bare ```) fenced blocks of a Markdown file, from the heading ``after`` on."""
    text = path.read_text()
    if after:
        text = text[text.index(after):]
    return re.findall(r"^```(?:sh)?\n(.*?)^```", text, flags=re.M | re.S)


def commands(block: str) -> list[str]:
    """One command per entry: continuation lines joined, comments and blank lines dropped."""
    out, current = [], ""
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            out.append(current.strip())
            current = ""
    return out


def test_readme_commands_run_as_printed(tmp_path):
    block = shell_blocks(ROOT / "README.md", "## Running it yourself")[0]
    cmds = commands(block)
    kinds = [c.split(" run")[0].split()[-1] if " run" in c else c.split()[1] for c in cmds]
    assert kinds == ["pki", "pki", "pki", "server", "collector", "sql", "report"], cmds

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
           "HDRLOG_SERVER_CLICKHOUSE": f"chdb://{tmp_path}/store", "HDRLOG_COLLECTOR_SPOOL": str(tmp_path / "spool")}
    env.pop("HDRLOG_SQL_URL", None)
    procs: list[subprocess.Popen] = []
    tag = secrets.token_hex(3)
    central, web = f"hlrd-c-{tag}", f"hlrd-w-{tag}"

    def central_run(cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", central, "sh", "-c", cmd], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=timeout)

    def popen(ns: str, cmd: str, log: str) -> subprocess.Popen:
        # exec env: the command is the process (its exit code is ours), VAR=value prefixes still work
        p = subprocess.Popen(["ip", "netns", "exec", ns, "sh", "-c", f"exec env {cmd}"], cwd=tmp_path, env=env,
                             stdout=open(tmp_path / log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    made: list[str] = []
    try:
        for ns in (central, web):
            run("ip", "netns", "add", ns)
            made.append(ns)
        run("ip", "link", "add", "eth0", "netns", web, "type", "veth", "peer", "name", "eth0", "netns", central)
        for ns, addr in ((central, SERVER_ADDR), (web, HOST_ADDR)):
            run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        for c in cmds[:3]:  # the PKI
            p = subprocess.run(c, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, (c, p.stderr)
        popen(central, cmds[3], "server.log")

        def sql_up() -> bool:
            return central_run("curl -s http://127.0.0.1:7623/ping", timeout=10).stdout == "Ok.\n"
        wait_until(lambda: sql_up() or procs[0].poll() is not None, 90, "the README's server")
        assert procs[0].poll() is None, (tmp_path / "server.log").read_text()[-3000:]

        popen(web, cmds[4], "collector.log")
        wait_until(lambda: "capturing on" in (tmp_path / "collector.log").read_text()
                   or procs[1].poll() is not None, 90, "the README's collector")
        assert procs[1].poll() is None, (tmp_path / "collector.log").read_text()[-3000:]
        assert "host_id" not in (tmp_path / "collector.log").read_text()  # no identity trouble
        run("ip", "netns", "exec", web, "ping", "-c", "5", "-i", "0.2", SERVER_ADDR)

        def rows() -> dict:
            p = central_run(cmds[5])
            assert p.returncode == 0, (cmds[5], p.stderr)
            return {r["host"]: int(r["count()"]) for r in map(json.loads, p.stdout.splitlines())}
        got = wait_until(lambda: rows().get("web-01", 0) >= 10 and rows(), 60, "web-01's rows in SQL")
        assert set(got) == {"web-01"}, got   # the certificate's name, not this machine's hostname
        p = central_run(cmds[6], timeout=180)
        assert p.returncode == 0, (cmds[6], p.stderr)
        reports = list((tmp_path / "reports").glob("*.html"))
        assert len(reports) == 1 and "<html" in reports[0].read_text().lower()

        # docs/sql-endpoint.md's curl lines against the same server (the README's credentials)
        curls = [c for b in shell_blocks(ROOT / "docs" / "sql-endpoint.md") for c in commands(b)
                 if c.startswith("curl ")]
        assert len(curls) >= 5, curls
        for c in curls:
            p = central_run(c.split("#")[0])
            out = p.stdout
            # (an empty answer is a right one for a table with no rows yet: the ping's connection is still open)
            assert p.returncode == 0 and "DB::Exception" not in out, (c, out[:300], p.stderr)
            if "param_s=" in c:
                assert out.strip() == "it's", out
    finally:
        for proc in reversed(procs):  # a clean stop first: the collector detaches, the server stores
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    pass
        codes = [proc.returncode for proc in procs]
        kill_all(procs)
        for ns in made:
            delete_netns(ns)
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in ("server", "collector")}
    assert codes == [0, 0], (codes, logs)
    for name, text in logs.items():  # one line per message: no engine stack trace, no Python traceback
        assert "Stack trace" not in text and "Traceback" not in text, (name, text[:3000])

