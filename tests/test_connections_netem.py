"""Connections through delay and loss: the real capture (eBPF, auto mode) on A's end of the
user-space bridge (tests/bridge.py; this kernel has no netem), real stacks in A and B.

One bridge lab and one capture (tests/conncap.py, inside A's namespace on ``eth0``) serve the
module; each test restarts the bridge with its own delay and loss and picks its connections
out of the capture's rows by port. What each test asserts:

* ``handshake_rtt_us`` is within ±25% of the configured RTT (2 x 20 ms through the bridge),
  IPv4 and IPv6 -- the one timing ratio the issue asks for, measured against the configured
  delay (the capture sits on A: SYN out, SYN-ACK in 40 ms later, the ACK out at once);
* a lossy transfer (every 20th data segment A→B dropped by the bridge): the application's
  bytes arrive exactly, ``orig_retrans`` >= the frames the bridge dropped (each lost segment is
  sent again, and the capture sees every send at A), ``orig_bytes`` equals the bytes the
  application sent exactly (sequence numbers, not the sum of payloads: the retransmissions
  would add ~5%);
* packets and IP bytes equal the frames on the wire, both when every skb is one frame
  (gso_max_segs 1) and with GSO (TCP's default on egress: one skb is skb->gso_segs frames);
* ``community_id`` equals Corelight's reference (PyPI ``communityid``), given the tuple as the
  applications used it, for TCP, UDP and ICMP echo over IPv4 and TCP, UDP, ICMPv6 echo over IPv6.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import communityid as ref
import pytest

from tests.bridge import REPO, BridgeLab, Loss, tcp_payload

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="eBPF and network namespaces need root")

ONE_WAY = 0.020  # seconds: a 40 ms RTT


class NsCapture:
    """tests/conncap.py in a namespace; ``rows`` grows as it prints."""

    def __init__(self, lab: BridgeLab, side: str, iface: str = "eth0", *args: str):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.proc = lab.popen(side, sys.executable, "-m", "tests.conncap", "--iface", iface, *args,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=REPO, env=env)
        self.rows: list[dict] = []
        self.events: list[dict] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if not self.ready.wait(180) or not any(e.get("ready") for e in self.events):
            self.proc.kill()
            raise RuntimeError(f"capture did not start: {self.proc.stderr.read()[-3000:]}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            obj = json.loads(line)
            with self.lock:
                if "uid" in obj:
                    self.rows.append(obj)
                else:
                    self.events.append(obj)
            if obj.get("ready"):
                self.ready.set()
        self.ready.set()

    def final(self, pred, timeout: float = 20.0) -> list[dict]:
        """Final rows matching ``pred``, once at least one is there (or the timeout passed)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                got = [r for r in self.rows if r["final"] and pred(r)]
            if got or time.monotonic() > deadline:
                return got
            time.sleep(0.2)

    def stop(self) -> dict:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("stop\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass
            self.proc.wait(60)
        self.reader.join(10)
        done = [e for e in self.events if e.get("done")]
        return done[0] if done else {}


@pytest.fixture(scope="module")
def netlab():
    with BridgeLab() as lab:
        cap = NsCapture(lab, "a", "eth0", "--tcp-timeout", "5", "--udp-timeout", "2", "--icmp-timeout", "2",
                        "--linger", "0.3")
        try:
            yield lab, cap
        finally:
            done = cap.stop()
            counters = done.get("counters", {})
            assert counters.get("conn_map_full", 0) == 0, counters


SERVER = r"""
import socket, sys
addr, port, reply = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ls = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((addr, port))
ls.listen(1)
print("listening", flush=True)
c, _ = ls.accept()
n = 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    n += len(b)
c.sendall(str(n).encode().ljust(reply, b"."))
c.close()
"""

CLIENT = r"""
import json, socket, struct, sys
src, dst, cport, sport, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET)
s.bind((src, cport))
s.settimeout(60)
s.connect((dst, sport))
s.sendall(bytes(size))
s.shutdown(socket.SHUT_WR)
got = b""
while True:
    b = s.recv(1 << 16)
    if not b:
        break
    got += b
info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
s.close()
print(json.dumps({"reply": len(got), "received": int(got.rstrip(b".")), "total_retrans": struct.unpack_from("I", info, 100)[0]}))
"""


def _transfer(lab: BridgeLab, family: str, cport: int, sport: int, size: int, reply: int = 64) -> dict:
    src = lab.a.addr4 if family == "ipv4" else lab.a.addr6
    dst = lab.b.addr4 if family == "ipv4" else lab.b.addr6
    server = lab.popen("b", sys.executable, "-c", SERVER, dst, str(sport), str(reply), stdout=subprocess.PIPE,
                       text=True)
    assert server.stdout.readline().strip() == "listening"
    out = lab.run("a", sys.executable, "-c", CLIENT, src, dst, str(cport), str(sport), str(size), timeout=120).stdout
    assert server.wait(30) == 0
    return json.loads(out)


def _one_final(cap: NsCapture, port: int, proto: int = 6) -> dict:
    got = cap.final(lambda r: port in (r["orig_port"], r["resp_port"]) and r["ip_proto"] == proto)
    assert len(got) == 1, got
    return got[0]


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_handshake_rtt_follows_the_bridge_delay(netlab, family):
    lab, cap = netlab
    cport, sport = (48101, 48001) if family == "ipv4" else (48102, 48002)
    br = lab.start_bridge(ONE_WAY)
    result = _transfer(lab, family, cport, sport, 2000)
    stats = br.stop()
    assert result["received"] == 2000
    row = _one_final(cap, sport)
    rtt_us = 2 * ONE_WAY * 1e6
    ratio = row["handshake_rtt_us"] / rtt_us
    print(f"RTT {family}: configured {rtt_us / 1e3:.0f} ms, handshake_rtt_us {row['handshake_rtt_us']} "
          f"(ratio {ratio:.3f}); bridge {stats}")
    assert 0.75 <= ratio <= 1.25, (row["handshake_rtt_us"], rtt_us)
    assert (row["conn_state"], row["orig_port"], row["resp_port"]) == ("SF", cport, sport)
    assert (row["orig_bytes"], row["resp_bytes"]) == (2000, 64)
    assert row["orig_ip"] == (lab.a.addr4 if family == "ipv4" else lab.a.addr6)
    assert row["ip_version"] == (4 if family == "ipv4" else 6)
    # the connection lasted at least two RTTs (handshake, data + reply, close) at this interface
    assert row["end_ts"] - row["start_ts"] >= 2 * rtt_us * 1000 * 0.95


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_lossy_transfer_counts_retransmissions_and_exact_bytes(netlab, family):
    lab, cap = netlab
    cport, sport = (48111, 48011) if family == "ipv4" else (48112, 48012)
    size, every = 600_000, 20
    br = lab.start_bridge(0.002, loss=Loss.every(every, "a>b", match=tcp_payload))
    result = _transfer(lab, family, cport, sport, size)
    stats = br.stop()
    assert result["received"] == size, result
    dropped = stats["a>b"]["dropped"]
    assert dropped >= size // 1500 // every - 2, stats
    assert stats["b>a"]["dropped"] == 0 and stats["kernel_drops"] == 0, stats
    row = _one_final(cap, sport)
    print(f"LOSS {family}: sent {size} B, bridge dropped {dropped} of {stats['a>b']['received']} frames A>B, "
          f"sender TCP_INFO total_retrans {result['total_retrans']}, orig_retrans {row['orig_retrans']}, "
          f"resp_retrans {row['resp_retrans']}, orig_pkts {row['orig_pkts']}, orig_bytes {row['orig_bytes']}, "
          f"history {row['history']}, state {row['conn_state']}")
    assert row["orig_bytes"] == size  # by sequence numbers: the retransmitted bytes are not counted twice
    assert row["resp_bytes"] == 64
    assert row["orig_retrans"] > 0 and row["orig_retrans"] >= dropped, (row, stats)
    assert row["orig_retrans"] <= result["total_retrans"] + 2, (row, result)  # not every re-sent ACK is one
    assert row["resp_retrans"] == 0
    assert row["conn_state"] == "SF"
    assert "T" in row["history"]  # Zeek's letter for a retransmission by the originator
    # A's egress hook sees every skb A sent (the lost frames too), a GSO skb being several frames
    assert row["orig_pkts"] <= stats["a>b"]["received"], (row, stats)
    assert row["resp_pkts"] <= stats["b>a"]["forwarded"], (row, stats)


UDP_PING = r"""
import socket, sys
src, dst, cport, sport = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
srv = sys.argv[5] == "server"
s = socket.socket(fam, socket.SOCK_DGRAM)
s.settimeout(10)
if srv:
    s.bind((dst, sport))
    print("listening", flush=True)
    data, peer = s.recvfrom(2048)
    s.sendto(data * 2, peer)
else:
    s.bind((src, cport))
    s.sendto(b"c" * 33, (dst, sport))
    print(len(s.recvfrom(2048)[0]))
"""


def _reference(proto: int, saddr: str, daddr: str, sport: int, dport: int) -> str:
    if proto == 1:
        tpl = ref.FlowTuple.make_icmp(saddr, daddr, sport, dport)
    elif proto == 58:
        tpl = ref.FlowTuple.make_icmp6(saddr, daddr, sport, dport)
    else:
        tpl = ref.FlowTuple(proto, saddr, daddr, sport, dport)
    return ref.CommunityID(seed=0).calc(tpl)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_community_id_matches_the_reference(netlab, family):
    lab, cap = netlab
    k = 0 if family == "ipv4" else 1
    src, dst = (lab.a.addr4, lab.b.addr4) if family == "ipv4" else (lab.a.addr6, lab.b.addr6)
    lab.start_bridge(0.0)
    t0 = time.time_ns()
    tcp_c, tcp_s, udp_c, udp_s = 48121 + k, 48021 + k, 48131 + k, 48031 + k
    _transfer(lab, family, tcp_c, tcp_s, 100)
    srv = lab.popen("b", sys.executable, "-c", UDP_PING, src, dst, str(udp_c), str(udp_s), "server",
                    stdout=subprocess.PIPE, text=True)
    assert srv.stdout.readline().strip() == "listening"
    assert lab.run("a", sys.executable, "-c", UDP_PING, src, dst, str(udp_c), str(udp_s), "client").stdout.strip() == "66"
    assert srv.wait(10) == 0
    lab.run("a", "ping", "-n", "-c", "2", "-i", "0.2", dst)
    icmp = 1 if family == "ipv4" else 58
    echo = 8 if family == "ipv4" else 128
    tcp = _one_final(cap, tcp_s, 6)
    udp = _one_final(cap, udp_s, 17)
    pings = cap.final(lambda r: r["ip_proto"] == icmp and r["start_ts"] >= t0 and r["orig_ip"] == src
                      and r["orig_port"] == echo)
    assert len(pings) == 1, pings
    ping = pings[0]
    want = {
        "tcp": _reference(6, src, dst, tcp_c, tcp_s),
        "udp": _reference(17, src, dst, udp_c, udp_s),
        "icmp": _reference(icmp, src, dst, echo, 0),  # the echo request as ping sent it: type, code 0
    }
    got = {"tcp": tcp["community_id"], "udp": udp["community_id"], "icmp": ping["community_id"]}
    print(f"community_id {family}: {got}")
    assert got == want
    assert (tcp["orig_port"], tcp["resp_port"], udp["orig_port"], udp["resp_port"]) == (tcp_c, tcp_s, udp_c, udp_s)
    assert (udp["conn_state"], udp["orig_bytes"], udp["resp_bytes"]) == ("SF", 33, 66)
    # Zeek's ICMP ports: orig_p = the type, resp_p = its counterpart (echo reply: 0, ICMPv6 129)
    assert (ping["orig_pkts"], ping["resp_pkts"], ping["resp_port"]) == (2, 2, 0 if icmp == 1 else 129)


def _wire_counts(lab: BridgeLab, cap: NsCapture, cport: int, sport: int, gso_max_segs: int | None) -> tuple[dict, dict]:
    """A 600 kB transfer through a plain bridge: (the final row, the bridge's counters)."""
    if gso_max_segs is not None:
        lab.run("a", "ip", "link", "set", "eth0", "gso_max_segs", str(gso_max_segs))
    try:
        br = lab.start_bridge(0.002)
        assert _transfer(lab, "ipv4", cport, sport, 600_000)["received"] == 600_000
        stats = br.stop()
    finally:
        lab.run("a", "ip", "link", "set", "eth0", "gso_max_segs", "65535")
    return _one_final(cap, sport), stats



def test_packets_and_ip_bytes_equal_the_wire_with_single_segment_skbs(netlab):
    """gso_max_segs 1 on A: every skb at the egress hook is one frame on the wire, so the
    originator's packets and IP bytes equal the bridge's count of A's frames exactly (the bridge
    counts Ethernet frames: 14 bytes more each)."""
    row, stats = _wire_counts(*netlab, 48141, 48041, 1)
    a_b = stats["a>b"]
    assert (row["orig_pkts"], row["orig_ip_bytes"]) == (a_b["received"], a_b["bytes"] - 14 * a_b["received"])
    assert row["orig_bytes"] == 600_000


def test_packets_and_ip_bytes_equal_the_wire_with_gso(netlab):
    """GSO on (TCP's default on egress): an skb at the hook is many frames on the wire, and the
    tracker counts skb->gso_segs packets and every further frame's IP and TCP headers."""
    row, stats = _wire_counts(*netlab, 48142, 48042, None)
    a_b = stats["a>b"]
    print(f"GSO: orig_pkts {row['orig_pkts']} vs {a_b['received']} frames on the wire; orig_ip_bytes "
          f"{row['orig_ip_bytes']} vs {a_b['bytes'] - 14 * a_b['received']}")
    assert row["orig_bytes"] == 600_000  # sequence numbers: right either way
    assert (row["orig_pkts"], row["orig_ip_bytes"]) == (a_b["received"], a_b["bytes"] - 14 * a_b["received"])
