"""The roll-out, proven on a booted fleet: the acceptance tests of the Ansible issue.

One server and three collector machines (systemd-nspawn, systemd as PID 1, sshd, each
in its own network namespace on a lab bridge) get hdrlog from the real playbooks over
SSH. The tests run in file order and build on each other: deploy, redeploy (changed=0),
check mode, a rolling upgrade while traffic flows, a rollout stopped by a failing host,
and the uninstall. Traffic is UDP from each collector host to the server with one
source port per datagram, so every datagram is one identifiable row and loss and
duplicates are counted exactly.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import urllib.error
import urllib.request
import sys
import time
from pathlib import Path

import pytest

from conftest import record
from lab import PLAYBOOKS, REPO, Lab, PlaybookResult, snapshot_source

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs Linux, root and systemd-nspawn")

BASE_VERSION = re.search(r'(?m)^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
V2 = f"{BASE_VERSION}+e2e.2"
V3 = f"{BASE_VERSION}+e2e.3"
WHEELHOUSE = Path("/var/cache/hdrlog-lab/wheelhouse")  # dependency wheels are reused across runs
VENV_PY = "/opt/hdrlog/venv/bin/python"


# The lab's inventory variables (group_vars of "all"): mTLS (hdrlog_pki_dir, under the lab's
# run directory, is added in the first deploy), the SQL endpoint's credentials, the machines'
# interface, the SQL endpoint reachable from the test. In the inventory, not in extra vars, so
# that a host_vars entry can still override them (the failing-host test).
SQL_USER = "e2e"
SQL_PASSWORD = secrets.token_urlsafe(18)
LAB_GROUP_VARS = {
    "hdrlog_server_sql_user": SQL_USER,
    "hdrlog_server_sql_password": SQL_PASSWORD,
    "hdrlog_collector_ifaces": ["host0"],
    "hdrlog_server_sql_listen": "0.0.0.0:7623",
    "hdrlog_wheelhouse_dir": str(WHEELHOUSE),
    "hdrlog_wheelhouse_pip_args": f"--find-links {WHEELHOUSE}",
}
# The builds fixture sets this when the cached wheelhouse already holds every dependency.
OFFLINE_PIP_ARGS: dict = {}


def lab_vars(**extra) -> dict:
    """Extra vars of one run (which source to build, rebuild or not)."""
    return {**OFFLINE_PIP_ARGS, **extra}


def wheelhouse_is_complete(src: Path) -> bool:
    """True when pip resolves SRC[server] and every dependency from the cached wheelhouse alone.

    Then the playbooks build with --no-index: resolving against the configured package
    indexes too costs ~12 s of CPU per build here and finds the same wheels (they were
    built from those indexes); the hdrlog wheel is still built from source every time.
    On a first run, or after a dependency change, the wheelhouse lacks something and the
    build resolves against the indexes as a user's does.
    """
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check",
                          "--ignore-installed", "--no-index", "--no-build-isolation", "--find-links", str(WHEELHOUSE),
                          f"{src}[server]"], capture_output=True, text=True, timeout=300)
    return res.returncode == 0


def tail(r: PlaybookResult, n: int = 60) -> str:
    return "\n".join(r.output.splitlines()[-n:])


def wait_until(pred, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
        except Exception as exc:  # the endpoint may be restarting
            last = exc
        if last is True or (last and not isinstance(last, Exception)):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def installed_version(fleet: Lab, host: str) -> str:
    return fleet.ssh(host, f"{VENV_PY} -c 'import importlib.metadata as m; print(m.version(\"hdrlog\"))'").stdout.strip()


def unit_state(fleet: Lab, host: str, unit: str) -> str:
    return fleet.ssh(host, f"systemctl is-active {unit}", check=False).stdout.strip()


def udp_rows(fleet: Lab, host: str, dport: int) -> dict[int, int]:
    """src_port -> number of rows, for the datagrams host sent to the server's dport."""
    out = fleet.sql(f"SELECT src_port, count() FROM hdrlog.packets WHERE host = '{host}' AND dst_port = {dport} "
                    f"AND ip_proto = 17 AND direction = 'egress' GROUP BY src_port FORMAT TabSeparated")
    return {int(a): int(b) for a, b in (line.split("\t") for line in out.splitlines() if line.strip())}


def send_and_count(fleet: Lab, hosts: list[str], dport: int, n: int = 40, rate: float = 100) -> None:
    """Each host sends n datagrams; every one must show up exactly once under its own host name."""
    for h in hosts:
        wait_until(lambda h=h: fleet.attached(h), 60, f"{h}'s collector to attach to host0")
    for h in hosts:
        fleet.start_udp(h, dport, 20000, n, rate)
    for h in hosts:
        wait_until(lambda h=h: fleet.done_udp(h, dport), 60, f"{h} to send its datagrams")
    for h in hosts:
        rows = wait_until(lambda h=h: (lambda r: r if sum(r.values()) >= n else None)(udp_rows(fleet, h, dport)),
                          60, f"{n} rows from {h} in hdrlog.packets")
        time.sleep(0)
        assert sorted(rows) == list(range(20000, 20000 + n)), f"{h}: ports {sorted(rows)[:5]}..."
        assert set(rows.values()) == {1}, f"{h}: duplicated rows {[p for p, c in rows.items() if c > 1]}"


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Three source trees of the project: as it is (v1), and re-versioned v2 and v3."""
    base = tmp_path_factory.mktemp("src")
    trees = {
        "v1": snapshot_source(base / "v1"),
        "v2": snapshot_source(base / "v2", V2),
        "v3": snapshot_source(base / "v3", V3),
    }
    # The three differ only in their version: one probe answers for all of them. Without build
    # isolation too, since its setuptools would come from an index (the controller's is used).
    OFFLINE_PIP_ARGS.clear()
    if WHEELHOUSE.is_dir() and wheelhouse_is_complete(trees["v1"]):
        OFFLINE_PIP_ARGS["hdrlog_wheelhouse_pip_args"] = f"--no-index --no-build-isolation --find-links {WHEELHOUSE}"
    print(f"e2e: wheelhouse {WHEELHOUSE}: {'complete, builds with --no-index' if OFFLINE_PIP_ARGS else 'incomplete, builds against the package indexes'}",
          file=sys.stderr)
    return trees


# -- lint (no lab needed) -------------------------------------------------------------------

def test_ansible_lint_production_profile_is_clean(stopwatch):
    lint = Path(sys.executable).parent / "ansible-lint"
    with stopwatch("ansible-lint --profile production"):
        res = subprocess.run([str(lint), "--profile", "production", "--nocolor", "."], cwd=PLAYBOOKS,
                             capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]


# -- deploy ---------------------------------------------------------------------------------

def test_site_on_a_fresh_fleet_starts_every_service_and_logs_each_host(fleet, builds):
    fleet.write_inventory(group_vars={**LAB_GROUP_VARS, "hdrlog_pki_dir": str(fleet.dir / "pki")})
    r = fleet.playbook("site.yml", lab_vars(hdrlog_wheelhouse_source=str(builds["v1"]),
                                            hdrlog_wheelhouse_rebuild=True))
    record("site.yml on the fresh fleet (wheelhouse build + install)", r.seconds)
    assert r.rc == 0, tail(r)
    assert not r.failed_hosts(), r.recap
    assert unit_state(fleet, "hl-server", "hdrlog-server") == "active"
    for m in fleet.collectors:
        assert unit_state(fleet, m.name, "hdrlog-collector") == "active", \
            fleet.ssh(m, "journalctl -u hdrlog-collector --no-pager | tail -30", check=False).stdout
        assert installed_version(fleet, m.name) == BASE_VERSION
    # Only the server host gets the server extra (chDB, pyarrow): collectors neither install it
    # nor receive its wheels.
    has_chdb = "/opt/hdrlog/venv/bin/python -c 'import chdb, pyarrow' 2>/dev/null && echo yes || echo no"
    assert fleet.ssh("hl-server", has_chdb).stdout.strip() == "yes"
    for m in fleet.collectors:
        assert fleet.ssh(m, has_chdb).stdout.strip() == "no", m.name
        wheels = fleet.ssh(m, "ls /opt/hdrlog/wheelhouse").stdout.split()
        assert wheels and not [w for w in wheels if w.startswith(("chdb", "pyarrow", "pandas"))], wheels
    # The collector runs as its own user with only its capabilities; the server with none.
    show = fleet.ssh("hl-col1", "systemctl show -p User -p NoNewPrivileges -p ProtectSystem "
                                "-p CapabilityBoundingSet hdrlog-collector").stdout
    assert "User=hdrlog" in show and "NoNewPrivileges=yes" in show and "ProtectSystem=strict" in show, show
    assert "cap_sys_admin" not in show, show
    pid_user = fleet.ssh("hl-server", "ps -o user= -p $(systemctl show -p MainPID --value hdrlog-server)").stdout
    assert pid_user.strip() == "hdrlog"
    assert_server_least_privilege(fleet)
    # mTLS on both ends, and the SQL endpoint turns away a request without the credentials.
    conf = fleet.ssh("hl-server", "cat /etc/hdrlog/server.yaml; stat -c '%a %U' /etc/hdrlog/sql-password").stdout
    assert "insecure: false" in conf and "tls_ca:" in conf and f"sql_user: {SQL_USER}" in conf, conf
    assert "600 hdrlog" in conf and SQL_PASSWORD not in conf, conf
    conf = fleet.ssh("hl-col1", "cat /etc/hdrlog/collector.yaml").stdout
    assert "insecure: false" in conf and "tls_cert:" in conf, conf
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(f"http://{fleet.server.ipv4}:7623/?query=SELECT%201", timeout=10)
    assert denied.value.code in (401, 403), denied.value
    send_and_count(fleet, [m.name for m in fleet.collectors], dport=9001)


def assert_server_least_privilege(fleet: Lab) -> None:
    """The running server: not root, no capabilities, cannot read /etc/shadow, can write its store
    and nothing else (checked as its user inside its own mount namespace), a memory ceiling, and a
    private key only its user can read."""
    pid = fleet.ssh("hl-server", "systemctl show -p MainPID --value hdrlog-server").stdout.strip()
    status = fleet.ssh("hl-server", f"grep -E '^(Uid|CapEff|CapBnd|NoNewPrivs):' /proc/{pid}/status").stdout
    fields = dict(re.split(r":\s+", line, maxsplit=1) for line in status.splitlines())
    assert "0" not in fields["Uid"].split(), status
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0 and fields["NoNewPrivs"] == "1", status
    show = fleet.ssh("hl-server", "systemctl show -p MemoryMax -p LimitNOFILE -p ReadWritePaths hdrlog-server").stdout
    assert "ReadWritePaths=/var/lib/hdrlog/clickhouse" in show and "LimitNOFILE=65536" in show, show
    memory_max = re.search(r"MemoryMax=(\S+)", show).group(1)
    assert memory_max.isdigit(), show  # a byte count (75% of the host's RAM), not infinity

    def as_server(cmd: str):
        return fleet.ssh("hl-server", f"nsenter --target={pid} --mount -- setpriv --reuid=$(id -u hdrlog) "
                                      f"--regid=$(id -g hdrlog) --clear-groups -- sh -c '{cmd}'", check=False)

    shadow = as_server("cat /etc/shadow")
    assert shadow.returncode != 0 and "Permission denied" in shadow.stderr + shadow.stdout, shadow
    wrote = as_server("touch /var/lib/hdrlog/clickhouse/probe && rm /var/lib/hdrlog/clickhouse/probe")
    assert wrote.returncode == 0, wrote
    # (/tmp and /var/tmp are writable but the service's own, PrivateTmp=.)
    for outside in ("/var/lib/hdrlog/probe", "/etc/hdrlog/probe", "/opt/hdrlog/probe", "/usr/local/probe"):
        wrote = as_server(f"touch {outside}")
        assert wrote.returncode != 0 and "Read-only file system" in wrote.stderr + wrote.stdout, (outside, wrote)
    key = fleet.ssh("hl-server", "stat -c '%a %U' /etc/hdrlog/tls/server.key").stdout.strip()
    assert key == "600 hdrlog", key


def test_second_site_run_changes_nothing(fleet, builds):
    r = fleet.playbook("site.yml", lab_vars(hdrlog_wheelhouse_source=str(builds["v1"])))
    record("site.yml again (idempotence)", r.seconds)
    assert r.rc == 0, tail(r)
    assert set(r.recap) >= {"localhost", "hl-server", "hl-col1", "hl-col2", "hl-col3"}, r.recap
    assert r.changed() == {h: 0 for h in r.recap}, tail(r, 120)


def test_check_mode_on_the_deployed_fleet_reports_no_change(fleet, builds):
    r = fleet.playbook("site.yml", lab_vars(hdrlog_wheelhouse_source=str(builds["v1"])), "--check", "--diff")
    record("site.yml --check --diff", r.seconds)
    assert r.rc == 0, tail(r)
    assert r.changed() == {h: 0 for h in r.recap}, tail(r, 120)


# -- upgrade --------------------------------------------------------------------------------

def _positions(output: str, task: str, status: str) -> dict[str, int]:
    """Line number at which each host reported `status` for the task named `task`."""
    pos: dict[str, int] = {}
    current = None
    for i, line in enumerate(output.splitlines()):
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            current = line
        elif current and task in current:
            m = re.match(rf"^{status}: \[([^\]\s]+)", line)  # "[host]" or "[host -> delegate(...)]"
            if m:
                pos.setdefault(m.group(1), i)
    return pos


def test_rolling_upgrade_while_traffic_flows_loses_and_duplicates_nothing(fleet, builds):
    dport, rate = 9002, 20.0
    collectors = [m.name for m in fleet.collectors]
    for h in collectors:
        wait_until(lambda h=h: fleet.attached(h), 60, f"{h}'s collector to attach to host0")
    for h in collectors:  # runs until stopped: 20 datagrams a second, one source port each
        fleet.start_udp(h, dport, 20000, 20000, rate)
    time.sleep(2)
    r = fleet.playbook("upgrade.yml", lab_vars(hdrlog_wheelhouse_source=str(builds["v2"]),
                                               hdrlog_wheelhouse_rebuild=True))
    record("upgrade.yml to a new build, traffic flowing", r.seconds)
    time.sleep(2)
    for h in collectors:
        fleet.ssh(h, f"touch /run/hdrlog-e2e-udp-{dport}.stop")
    sent = {}
    for h in collectors:
        wait_until(lambda h=h: fleet.done_udp(h, dport), 30, f"{h}'s sender to stop")
        sent[h] = int(fleet.ssh(h, f"cat /run/hdrlog-e2e-udp-{dport}.done").stdout)
    assert r.rc == 0, tail(r, 120)

    # One host at a time: each collector restarts only after the previous one passed the gate.
    restarts = _positions(r.output, "Restart hdrlog-collector", "changed")
    gates = _positions(r.output, "records keep arriving", "ok")
    assert set(restarts) == set(gates) == set(collectors), (restarts, gates)
    order = sorted(collectors, key=lambda h: restarts[h])
    for a, b in zip(order, order[1:]):
        assert restarts[a] < gates[a] < restarts[b], (restarts, gates)
    for h in ["hl-server", *collectors]:
        assert installed_version(fleet, h) == V2

    # Every datagram is one row: none twice, none missing, also those sent while the host's own
    # collector restarted (systemd kept its capture running; the new collector took it over).
    # Settled: no host's rows change over 3 s (late resends would show up as duplicates).
    # All hosts in the same window, not one window after another.
    def settled():
        a = {h: udp_rows(fleet, h, dport) for h in collectors}
        time.sleep(3)
        b = {h: udp_rows(fleet, h, dport) for h in collectors}
        return b if a == b and all(b.values()) else None
    settled_rows = wait_until(settled, 60, "every host's rows to settle")
    for h in collectors:
        rows = settled_rows[h]
        dups = {p: c for p, c in rows.items() if c > 1}
        assert not dups, f"{h}: duplicated rows for source ports {sorted(dups)[:20]}"
        missing = sorted(set(range(20000, 20000 + sent[h])) - set(rows))
        extra = sorted(set(rows) - set(range(20000, 20000 + sent[h])))
        assert not extra, f"{h}: rows for datagrams never sent: {extra[:20]}"
        assert not missing, f"{h}: {len(missing)} datagrams never stored: {missing[:10]}...{missing[-10:]}"
        took_over = fleet.ssh(h, "journalctl -u hdrlog-collector --no-pager -o cat | "
                                 "grep -c 'took over from the previous collector without a gap'", check=False)
        assert int(took_over.stdout.strip() or 0) >= 1, f"{h}: the new collector did not take the capture over"
        record(f"upgrade: {h} sent {sent[h]}, logged {len(rows)}, missing 0", 0.0)


def test_a_host_failing_mid_upgrade_stops_the_rollout_and_the_others_keep_serving(fleet, builds):
    # hl-col2 gets a collector that cannot capture anything (no such interface): its gate fails.
    fleet.write_inventory(host_vars={"hl-col2": {"hdrlog_collector_ifaces": ["hlnosuch0"]}})
    try:
        r = fleet.playbook("upgrade.yml", lab_vars(hdrlog_wheelhouse_source=str(builds["v3"]),
                                                   hdrlog_wheelhouse_rebuild=True, hdrlog_upgrade_gate_seconds=20))
    finally:
        fleet.write_inventory(host_vars={})
    record("upgrade.yml with hl-col2 failing (rollout stops)", r.seconds)
    assert r.rc != 0, tail(r)
    assert r.failed_hosts() == ["hl-col2"], r.recap
    assert "hl-col3" not in r.recap or r.recap["hl-col3"].get("ok", 0) == 0, r.recap
    # Before the failure: upgraded. After it: untouched, still the old build. Both serving.
    assert installed_version(fleet, "hl-col1") == V3
    assert installed_version(fleet, "hl-col3") == V2
    for h in ("hl-col1", "hl-col3"):
        assert unit_state(fleet, h, "hdrlog-collector") == "active"
    assert unit_state(fleet, "hl-server", "hdrlog-server") == "active"
    send_and_count(fleet, ["hl-col1", "hl-col3"], dport=9003)


# -- uninstall ------------------------------------------------------------------------------

def test_uninstall_leaves_no_unit_process_filter_or_file(fleet):
    r = fleet.playbook("uninstall.yml", {"hdrlog_uninstall_remove_data": True})
    record("uninstall.yml", r.seconds)
    assert r.rc == 0, tail(r)
    for m in fleet.machines:
        left = fleet.ssh(m, "ls -d /etc/systemd/system/hdrlog* /opt/hdrlog /etc/hdrlog /var/lib/hdrlog 2>/dev/null; "
                            "systemctl list-units --all --no-legend 'hdrlog*'; "
                            "pgrep -a -f 'hdrlog (server|collector)'; getent passwd hdrlog; "
                            "tc qdisc show dev host0 | grep clsact; true").stdout
        assert left.strip() == "", f"{m.name} still has: {left}"
        assert fleet.hooks(m) == {"ingress": [], "egress": []}, f"{m.name}: programs still attached"
    again = fleet.playbook("uninstall.yml", {"hdrlog_uninstall_remove_data": True})
    assert again.rc == 0 and again.changed() == {h: 0 for h in again.recap}, tail(again)
