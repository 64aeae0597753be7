"""A fleet of booted Debian 12 machines for the Ansible end-to-end tests.

The lab is real in the ways that matter to a roll-out: every host is a
``systemd-nspawn -b`` container with systemd as PID 1, sshd, its own network
namespace and its own root filesystem, reached by Ansible over SSH exactly as a
fleet is. The hosts have no route out of the lab; what they install comes from
their image (OS packages) and from the controller (the wheelhouse).

- The root filesystem is built once with debootstrap and cached under
  ``/var/cache/hdrlog-lab/rootfs-<hash>``; the hash covers the suite, mirror,
  package list and image customisation, so a changed list rebuilds.
- Each machine gets an overlayfs over the cached image (upper and work dirs in
  the run directory), so a boot costs seconds and the image is never modified.
- One bridge in the root namespace carries a free /24 of 198.18.0.0/15 (and a
  /64 of 2001:db8::/32); the bridge holds .1, the server .10, collectors .11 on.
  The hosts get no default route.
- ``close()`` powers every machine off (SIGTERM to nspawn = orderly poweroff,
  SIGKILL after a grace period), unmounts the overlays, removes the bridge and
  the run directory. It runs from the pytest finalizer and from atexit, also
  when the test failed or the build was interrupted.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from hdrlog.dev.lab import LabBase, LabError, free_subnet, run
from tests.support import hdrlog_tc_filters

REPO = Path(__file__).resolve().parents[2]
PLAYBOOKS = REPO / "playbooks"
CACHE_DIR = Path(os.environ.get("HDRLOG_LAB_CACHE", "/var/cache/hdrlog-lab"))
RUN_BASE = Path(os.environ.get("HDRLOG_LAB_RUN", "/var/tmp"))
SUITE = "bookworm"
MIRROR = os.environ.get("HDRLOG_LAB_MIRROR", "http://deb.debian.org/debian")
# What a fleet host has from its own apt: the base system, sshd, Python for Ansible
# (python3-apt for the apt module), BCC and its kernel headers, tools the tests use.
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "libpam-systemd", "openssh-server", "sudo",
    "python3", "python3-venv", "python3-apt", "python3-packaging",
    "python3-bpfcc", "python3-pyroute2", "linux-headers-amd64",
    "iproute2", "iputils-ping", "curl", "procps", "ca-certificates", "netbase", "less",
)
IMAGE_REVISION = 1  # bump when customise_image() changes
LAB_NET4 = ipaddress.ip_network("198.18.0.0/15")
LAB_NET6 = ipaddress.ip_network("2001:db8::/32")
CAPABILITIES = "CAP_BPF,CAP_NET_ADMIN,CAP_SYS_ADMIN,CAP_PERFMON,CAP_SYS_RESOURCE"
SYSCALLS = "bpf perf_event_open"
SSH_OPTS = (
    "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=3",
)


def _run(*cmd: str, check: bool = True, timeout: float | None = 120, **kw) -> subprocess.CompletedProcess:
    """The lab runner with the fleet's longer default timeout (machines boot, playbooks run)."""
    return run(*cmd, check=check, timeout=timeout, **kw)


# -- the cached image -----------------------------------------------------------------------

def image_key() -> str:
    text = json.dumps([SUITE, MIRROR, sorted(PACKAGES), IMAGE_REVISION])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def customise_image(root: Path) -> None:
    """Make the debootstrapped tree a bootable, SSH-reachable lab host (no per-host state)."""
    # systemd-networkd configures host0 from a per-machine file; never wait for "online".
    _run("chroot", str(root), "systemctl", "enable", "systemd-networkd.service")
    _run("chroot", str(root), "systemctl", "mask", "systemd-networkd-wait-online.service")
    # Per-machine identity: an empty machine-id makes nspawn hand each boot its own.
    (root / "etc/machine-id").write_text("")
    with contextlib.suppress(FileNotFoundError):
        (root / "var/lib/dbus/machine-id").unlink()
    with contextlib.suppress(FileNotFoundError):
        (root / "etc/hostname").unlink()
    (root / "etc/ssh/sshd_config.d/hdrlog-lab.conf").write_text(
        "# hdrlog lab: root by key only, no DNS lookups (there is no DNS)\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n")
    # Nothing to resolve and no network out: keep apt from trying when the role does not ask.
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    (root / "etc/resolv.conf").write_text("")
    (root / "etc/apt/apt.conf.d/99hdrlog-lab").write_text('APT::Install-Recommends "false";\n')


def ensure_image(log=print) -> tuple[Path, float]:
    """The cached root filesystem, built now if missing. Returns (path, seconds spent building)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    final = CACHE_DIR / f"rootfs-{image_key()}"
    marker = final / ".hdrlog-lab-complete"
    if marker.exists():
        return final, 0.0
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs must not build the same image at once
        if marker.exists():
            return final, 0.0
        t0 = time.monotonic()
        tmp = CACHE_DIR / f"rootfs-{image_key()}.partial"
        if tmp.exists():
            shutil.rmtree(tmp)
        log(f"lab: building the Debian {SUITE} image with debootstrap into {final} (once; cached)")
        try:
            _run("debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(tmp), MIRROR,
                 timeout=1800)
            customise_image(tmp)
            (tmp / ".hdrlog-lab-complete").write_text(json.dumps({"packages": sorted(PACKAGES)}) + "\n")
            tmp.rename(final)
        except BaseException:
            _unmount_below(tmp)  # debootstrap mounts proc and sys inside the target
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final, time.monotonic() - t0


def _children(pid: int) -> list[int]:
    """Direct children of a process (for nspawn: the machine's PID 1)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _tree(pid: int) -> list[str]:
    """Every process below pid, as 'pid state command' (why a machine does not power off)."""
    out, todo = [], _children(pid)
    while todo:
        p = todo.pop(0)
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        out.append(f"{p} {state} {cmd[:120]}")
        todo += _children(p)
    return out


def _check_dev_null(when: str) -> None:
    """systemd-nspawn copies /dev/null into each machine and refuses to boot when it is a file.

    Seen here once: a report written to /dev/null by an atomic rename replaced the device
    (server/deliver.py no longer renames over non-regular files). Say so plainly rather
    than fail later inside nspawn.
    """
    import stat as _stat
    if not _stat.S_ISCHR(os.stat("/dev/null").st_mode):
        raise LabError(f"/dev/null is not a character device {when} (something replaced it with a file); "
                       "restore it: rm /dev/null && mknod -m 666 /dev/null c 1 3")


def _unmount_below(path: Path) -> None:
    """Unmount everything mounted at or below ``path``, deepest first."""
    prefix = str(path.resolve())
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].encode().decode("unicode_escape") for line in f]
    for mp in sorted((p for p in points if p == prefix or p.startswith(prefix + "/")), key=len, reverse=True):
        if _run("umount", mp, check=False).returncode != 0:
            _run("umount", "-l", mp, check=False)


# -- the network ----------------------------------------------------------------------------

def _pick_subnet() -> int:
    """A /24 number k inside 198.18.0.0/15 that no interface uses (198.18.100.0/24 first)."""
    return free_subnet(order=[100] + list(range(101, 512)) + list(range(1, 100)))


# -- machines ---------------------------------------------------------------------------------

@dataclass
class Machine:
    name: str          # inventory name and hostname (the collector's host_id)
    group: str         # inventory group
    ipv4: str          # address without prefix
    ipv6: str
    machine: str       # nspawn machine name (unique per run)
    dir: Path          # run directory: upper/, work/, merged/, console.log
    proc: subprocess.Popen | None = None
    mounted: bool = False

    @property
    def root(self) -> Path:
        return self.dir / "merged"


@dataclass
class PlaybookResult:
    rc: int
    output: str
    seconds: float
    recap: dict[str, dict[str, int]] = field(default_factory=dict)

    def changed(self) -> dict[str, int]:
        return {h: r.get("changed", 0) for h, r in self.recap.items()}

    def failed_hosts(self) -> list[str]:
        return sorted(h for h, r in self.recap.items() if r.get("failed", 0) or r.get("unreachable", 0))


RECAP_RE = re.compile(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$")


def parse_recap(output: str) -> dict[str, dict[str, int]]:
    recap: dict[str, dict[str, int]] = {}
    in_recap = False
    for line in output.splitlines():
        if line.startswith("PLAY RECAP"):
            in_recap = True
            continue
        if in_recap:
            m = RECAP_RE.match(line.strip())
            if m:
                recap[m.group(1)] = {k: int(v) for k, v in (kv.split("=") for kv in m.group(2).split())}
    return recap


class Lab(LabBase):
    """``with Lab(collectors=3) as lab:`` one server and N collector hosts, booted and reachable."""

    def __init__(self, collectors: int = 3, log=print):
        self.log = log
        self.run_id = secrets.token_hex(2)
        self.dir = RUN_BASE / f"hdrlog-lab-{self.run_id}"
        self.bridge = f"hlbr{self.run_id}"
        self.machines: list[Machine] = []
        self.n_collectors = collectors
        self.timings: dict[str, float] = {}
        self.subnet = 0
        self._closed = False
        self._bridge_up = False
        atexit.register(self.close)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        _check_dev_null("before the lab starts")
        image, build_s = ensure_image(self.log)
        self.timings["image build (debootstrap, uncached)" if build_s else "image build (cached)"] = build_s
        t0 = time.monotonic()
        self.dir.mkdir(parents=True)
        self.key = self.dir / "id_ed25519"
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"hdrlog-lab-{self.run_id}", "-f", str(self.key))
        self.subnet = _pick_subnet()
        base4 = LAB_NET4.network_address + (self.subnet << 8)
        self.gateway4 = str(base4 + 1)
        self.prefix6 = f"2001:db8:{self.subnet:x}::"
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self._bridge_up = True
        _run("ip", "addr", "add", f"{self.gateway4}/24", "dev", self.bridge)
        _run("ip", "addr", "add", f"{self.prefix6}1/64", "dev", self.bridge, "nodad")
        _run("ip", "link", "set", self.bridge, "up")
        names = [("hl-server", "hdrlog_servers")] + [(f"hl-col{i}", "hdrlog_collectors")
                                                     for i in range(1, self.n_collectors + 1)]
        for i, (name, group) in enumerate(names):
            m = Machine(name=name, group=group, ipv4=str(base4 + 10 + i), ipv6=f"{self.prefix6}{10 + i:x}",
                        machine=f"hl{self.run_id}{name.split('-')[1]}", dir=self.dir / name)
            self.machines.append(m)
            self._boot(m, image)
        for m in self.machines:
            self._wait_ssh(m)
        self.timings["lab boot (4 machines to sshd)" if len(self.machines) == 4 else
                     f"lab boot ({len(self.machines)} machines to sshd)"] = time.monotonic() - t0
        self.write_inventory()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Ansible's SSH master connections (ControlPersist) first: no session left open in a
        # machine that halts, and no ssh process of the lab outliving it.
        for sock in sorted((self.dir / "cp").glob("*")) if (self.dir / "cp").is_dir() else []:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                _run("ssh", "-o", f"ControlPath={sock}", "-O", "exit", "hdrlog-lab", check=False, timeout=10)
        for m in self.machines:  # orderly poweroff for all at once, then wait
            if m.proc and m.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    m.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        for m in self.machines:
            if m.proc:
                try:
                    # 15 s for all together: a clean poweroff takes under a second here; seen
                    # several times, a machine left with only PID 1 and journald, halting for
                    # good (it is discarded anyway: killing it loses nothing).
                    m.proc.wait(timeout=max(1.0, 15 - (time.monotonic() - t0)))
                except subprocess.TimeoutExpired:
                    # The machine's PID 1 is not in nspawn's process group: killing it ends every
                    # process of the machine (its PID namespace), then nspawn exits by itself.
                    self.log(f"lab: {m.name} did not power off in time; killing it; still running: "
                             + "; ".join(_tree(m.proc.pid))[:3000]
                             + "\nconsole: " + (m.dir / "console.log").read_text(errors="replace")[-1500:])
                    for pid in _children(m.proc.pid):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(m.proc.pid, signal.SIGKILL)
                    m.proc.wait(timeout=10)
            if m.mounted:
                if _run("umount", str(m.root), check=False).returncode != 0:
                    _run("umount", "-l", str(m.root), check=False)
                m.mounted = False
        t1 = time.monotonic()
        if self._bridge_up:
            _run("ip", "link", "del", self.bridge, check=False)
            self._bridge_up = False
        if self.dir.exists():
            _run("rm", "-rf", "--one-file-system", str(self.dir), check=False, timeout=600)  # faster than rmtree
        self.log(f"lab: powered off in {t1 - t0:.1f} s, removed in {time.monotonic() - t1:.1f} s")
        try:
            _check_dev_null("after the lab was removed")
        except LabError as exc:  # not ours to fail on (seen: another test wrote a report to /dev/null)
            self.log(f"lab: WARNING: {exc}")

    # -- machines ---------------------------------------------------------------------------
    def _boot(self, m: Machine, image: Path) -> None:
        for d in ("upper", "work", "merged"):
            (m.dir / d).mkdir(parents=True)
        _run("mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={image},upperdir={m.dir / 'upper'},workdir={m.dir / 'work'}", str(m.root))
        m.mounted = True
        r = m.root
        (r / "etc/hostname").write_text(m.name + "\n")
        hosts = "127.0.0.1 localhost\n::1 localhost\n" + "".join(
            f"{x.ipv4} {x.name}\n" for x in self.machines) + f"127.0.1.1 {m.name}\n"
        (r / "etc/hosts").write_text(hosts)
        (r / "etc/systemd/network/10-host0.network").write_text(
            "[Match]\nName=host0\n\n[Network]\n"
            f"Address={m.ipv4}/24\nAddress={m.ipv6}/64\n"
            "LinkLocalAddressing=ipv6\nIPv6AcceptRA=no\nDHCP=no\n")
        # No logind session (and so no user@0.service) per SSH login. Seen here: the user manager
        # stops 10 s after the last session ends, and on this host (cgroups v1) that stop hangs
        # until its 120 s timeout ("Processes still around after final SIGKILL"); a login in
        # the meantime waits for it: Ansible's first connection to a machine stalled 41-77 s in
        # the fresh deploy, and a machine halting with it pending did not power off. The roles
        # use system units only; nothing of hdrlog needs a user session.
        session = r / "etc/pam.d/common-session"
        session.write_text("".join(line for line in session.read_text().splitlines(keepends=True)
                                   if "pam_systemd.so" not in line))
        ssh = r / "root/.ssh"
        ssh.mkdir(mode=0o700, exist_ok=True)
        (ssh / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        os.chmod(ssh / "authorized_keys", 0o600)
        cmd = [
            "systemd-nspawn", "--boot", "--quiet", f"--directory={r}", f"--machine={m.machine}",
            f"--hostname={m.name}", "--register=no", "--keep-unit", "--console=passive",
            f"--network-bridge={self.bridge}", "--resolv-conf=off", "--timezone=off", "--link-journal=no",
            f"--capability={CAPABILITIES}", f"--system-call-filter={SYSCALLS}",
        ]
        console = open(m.dir / "console.log", "wb")
        m.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        console.close()

    def _wait_ssh(self, m: Machine, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m.proc and m.proc.poll() is not None:
                raise LabError(f"{m.name}: systemd-nspawn exited {m.proc.returncode}: "
                               f"{(m.dir / 'console.log').read_text(errors='replace')[-2000:]}")
            if self.ssh(m, "systemctl is-active ssh", check=False, timeout=5).returncode == 0:
                return
            time.sleep(0.5)
        raise LabError(f"{m.name}: no SSH on {m.ipv4} after {timeout:.0f}s")

    def ssh(self, m: Machine | str, command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        m = self[m] if isinstance(m, str) else m
        try:
            res = subprocess.run(["ssh", *SSH_OPTS, "-i", str(self.key), f"root@{m.ipv4}", command],
                                 capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            if check:
                raise
            return subprocess.CompletedProcess(command, 255, "", "timeout")
        if check and res.returncode != 0:
            raise LabError(f"{m.name}$ {command} -> {res.returncode}: {res.stderr.strip()} {res.stdout.strip()}")
        return res

    def __getitem__(self, name: str) -> Machine:
        for m in self.machines:
            if m.name == name:
                return m
        raise KeyError(name)

    @property
    def server(self) -> Machine:
        return self.machines[0]

    @property
    def collectors(self) -> list[Machine]:
        return self.machines[1:]

    # -- Ansible ----------------------------------------------------------------------------
    def write_inventory(self, group_vars: dict | None = None, host_vars: dict | None = None) -> Path:
        """inventory.yml (JSON is YAML) and ansible.cfg in the run directory."""
        if group_vars is not None:
            self.group_vars = group_vars
        if host_vars is not None:
            self.host_vars = host_vars
        gv = getattr(self, "group_vars", {})
        hv = getattr(self, "host_vars", {})
        groups: dict[str, dict] = {}
        for m in self.machines:
            groups.setdefault(m.group, {"hosts": {}})["hosts"][m.name] = {"ansible_host": m.ipv4, **hv.get(m.name, {})}
        inv = {"all": {"vars": {"ansible_user": "root", "ansible_ssh_private_key_file": str(self.key),
                                "ansible_python_interpreter": "/usr/bin/python3", **gv},
                       "children": groups}}
        self.inventory = self.dir / "inventory.yml"
        self.inventory.write_text(json.dumps(inv, indent=2))
        self.ansible_cfg = self.dir / "ansible.cfg"
        self.ansible_cfg.write_text(
            "[defaults]\nhost_key_checking = False\nforks = 8\ninterpreter_python = /usr/bin/python3\n"
            "roles_path = " + str(PLAYBOOKS / "roles") + "\n"
            "callback_plugins = " + str(Path(__file__).resolve().parent / "callback_plugins") + "\n"
            "callbacks_enabled = tasktimes\n"
            f"local_tmp = {self.dir}/ansible-local\n"
            # Facts once per lab: the first play that meets a host gathers them (as a user's
            # first run does), later runs read them from the lab's cache (the machines' OS,
            # kernel and architecture, all the roles read, do not change during a session).
            "gathering = smart\nfact_caching = jsonfile\n"
            f"fact_caching_connection = {self.dir}/facts\nfact_caching_timeout = 86400\n"
            "[ssh_connection]\npipelining = True\n"
            f"control_path_dir = {self.dir}/cp\n"
            "ssh_args = -o ControlMaster=auto -o ControlPersist=300s -o UserKnownHostsFile=/dev/null "
            "-o StrictHostKeyChecking=no -o LogLevel=ERROR\n")
        return self.inventory

    def ansible_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(ANSIBLE_CONFIG=str(self.ansible_cfg), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
                   ANSIBLE_HOME=str(self.dir / "ansible-home"), PYTHONUNBUFFERED="1")
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        return env

    def playbook(self, name: str, extra_vars: dict | None = None, *args: str, timeout: float = 1200) -> PlaybookResult:
        """Run playbooks/NAME against the fleet; the full output lands in the run directory."""
        self._runs = getattr(self, "_runs", 0) + 1
        ev = self.dir / f"extra-vars-{self._runs}.json"
        ev.write_text(json.dumps(extra_vars or {}))
        log_path = self.dir / f"ansible-{self._runs:02d}-{name.replace('.yml', '')}.log"
        cmd = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(self.inventory),
               str(PLAYBOOKS / name), "-e", f"@{ev}", *args]
        t0 = time.monotonic()
        res = subprocess.run(cmd, cwd=PLAYBOOKS, env=self.ansible_env(), capture_output=True, text=True,
                             timeout=timeout)
        seconds = time.monotonic() - t0
        out = res.stdout + ("\n--- stderr ---\n" + res.stderr if res.stderr.strip() else "")
        log_path.write_text(f"$ {' '.join(cmd)}\n{out}")
        keep = RUN_BASE / "hdrlog-lab-last-logs"  # survives close(): read it after a failure
        keep.mkdir(exist_ok=True)
        shutil.copy(log_path, keep / log_path.name)
        return PlaybookResult(rc=res.returncode, output=out, seconds=seconds, recap=parse_recap(res.stdout))

    # -- the fleet's data -------------------------------------------------------------------
    def sql(self, query: str, timeout: float = 30) -> str:
        """Ask the server's SQL endpoint (the lab sets sql_listen to the server's lab address), with the
        inventory's hdrlog_server_sql_user/_password when set."""
        url = f"http://{self.server.ipv4}:7623/?" + urllib.parse.urlencode({"query": query})
        req = urllib.request.Request(url)
        gv = getattr(self, "group_vars", {})
        if gv.get("hdrlog_server_sql_user"):  # the inventory's credentials, as HTTP basic auth
            token = f"{gv['hdrlog_server_sql_user']}:{gv.get('hdrlog_server_sql_password', '')}"
            req.add_header("Authorization", "Basic " + base64.b64encode(token.encode()).decode())
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read().decode()

    def count(self, where: str) -> int:
        return int(self.sql(f"SELECT count() FROM hdrlog.packets WHERE {where}").strip() or 0)

    def start_udp(self, m: Machine | str, dport: int, src_base: int, n: int, rate: float) -> None:
        """Send N UDP datagrams from host M to the server, datagram i from source port src_base+i.

        Touching /run/hdrlog-e2e-udp-DPORT.stop on M ends it early; the .done file holds the
        number actually sent.

        The distinct source port makes every datagram one identifiable row, so a test can
        count loss and duplicates exactly. Runs in the background on M; done_udp() says when
        it finished.
        """
        m = self[m] if isinstance(m, str) else m
        script = (
            "import socket,sys,time\n"
            f"dst,dport,base,n,rate={self.server.ipv4!r},{dport},{src_base},{n},{rate}\n"
            "import os\n"
            f"stop='/run/hdrlog-e2e-udp-{dport}.stop'\n"
            "t0=time.monotonic(); sent=0\n"
            "for i in range(n):\n"
            "    if os.path.exists(stop): break\n"
            "    s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            "    s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            "    s.bind(('0.0.0.0',base+i)); s.sendto(b'hdrlog-e2e',(dst,dport)); s.close(); sent+=1\n"
            "    d=t0+(i+1)/rate-time.monotonic()\n"
            "    time.sleep(d) if d>0 else None\n"
            f"open('/run/hdrlog-e2e-udp-{dport}.done','w').write(str(sent))\n")
        # Not under /run: the machine's own tmpfs hides what is written there from outside.
        (m.root / f"root/hdrlog-e2e-udp-{dport}.py").write_text(script)
        self.ssh(m, f"rm -f /run/hdrlog-e2e-udp-{dport}.done /run/hdrlog-e2e-udp-{dport}.stop; "
                    f"nohup python3 /root/hdrlog-e2e-udp-{dport}.py >/dev/null 2>&1 </dev/null &")

    def hooks(self, m: Machine | str, ifname: str = "host0") -> dict[str, list[str]]:
        """hdrlog's programs on each TC hook of the host's interface, as its kernel reports them:
        tcx links (through a copy of collector/bpfsys.py, which needs only the standard library)
        and tc filters."""
        m = self[m] if isinstance(m, str) else m
        shutil.copy(REPO / "collector" / "bpfsys.py", m.root / "root/hdrlog_e2e_bpfsys.py")
        tcx = ("import sys; sys.path.insert(0, '/root'); import hdrlog_e2e_bpfsys as b; "
               f"[print(d, n) for d in ('ingress', 'egress') for n in b.tcx_program_names('{ifname}', d)]")
        out = self.ssh(m, f'python3 -c "{tcx}"; echo ---; tc filter show dev {ifname} ingress; echo ---; '
                          f'tc filter show dev {ifname} egress', check=False).stdout
        links, tc_in, tc_out = (out.split("---") + ["", "", ""])[:3]
        found: dict[str, list[str]] = {"ingress": [], "egress": []}
        for line in links.splitlines():
            direction, _, name = line.partition(" ")
            if direction in found and name.startswith("hdrlog"):
                found[direction].append(f"tcx {name}")
        for direction, text in (("ingress", tc_in), ("egress", tc_out)):
            found[direction] += hdrlog_tc_filters(text)
        return found

    def attached(self, m: Machine | str, ifname: str = "host0") -> bool:
        """True when hdrlog's classifier sits on both TC hooks of the host's interface."""
        hooks = self.hooks(m, ifname)
        return bool(hooks["ingress"] and hooks["egress"])

    def done_udp(self, m: Machine | str, dport: int) -> bool:
        return self.ssh(m, f"test -e /run/hdrlog-e2e-udp-{dport}.done", check=False).returncode == 0


def snapshot_source(dest: Path, version: str | None = None) -> Path:
    """Copy the project's source tree (no VCS, venv, build output or tests), optionally re-versioned."""
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis",
        "tests", "var", "demo-data", "playbooks", "*.pyc"))
    if version:
        py = dest / "pyproject.toml"
        text, n = re.subn(r'(?m)^version\s*=\s*"[^"]+"', f'version = "{version}"', py.read_text(), count=1)
        if n != 1:
            raise LabError("no version line in pyproject.toml")
        py.write_text(text)
    return dest
