"""Traffic for the lab benchmarks: a pcap of a plausible mix, replayed with tcpreplay.

The pcap holds ``flows`` TCP connections (SYN, SYN-ACK, ``data`` data segments of
``payload`` bytes and their ACKs, FIN, FIN-ACK) interleaved round-robin, plus one DNS
query and response every ``dns_every`` packets. Sources are the lab host's own
address; destinations are made-up hosts of the lab host's /24 (inside
198.18.0.0/15), sent to a MAC no interface owns, so the root namespace drops the
frames right after the TC ingress hook the collector watches: nothing answers,
nothing is forwarded, and nothing leaves the lab.

``replay(lab, host, pcap, ...)`` runs tcpreplay inside the lab host's namespace
onto its ``eth0`` (the monitored veth's other end) and returns what tcpreplay
says it sent, and at what rate. ``serve_tcp`` is the other side of real lab
traffic: a TCP service in the root namespace, on a lab host's peer address.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

NOWHERE_MAC = "02:48:4c:00:00:fe"  # locally administered; no interface here has it


@dataclass
class Replay:
    packets: int
    seconds: float
    pps: float
    failed: int


def write_pcap(path: str, src_mac: str, src4: str, *, flows: int = 64, data: int = 200, payload: int = 1200,
               dns_every: int = 50) -> int:
    """Write the mix to ``path``; returns its number of packets.

    scapy builds one frame of each kind per flow; data segments and ACKs are that
    frame with seq/ack patched in (their TCP checksum is not recomputed: nothing
    checks it, the frames are dropped right after the hook). Fast enough for a
    busy 2-core machine (about a second for 20k frames).
    """
    from scapy.all import DNS, DNSQR, IP, TCP, UDP, Ether

    net = ipaddress.ip_interface(f"{src4}/24").network
    eth = Ether(src=src_mac, dst=NOWHERE_MAC)
    body = b"\x5a" * payload

    def patched(frame: bytes, seq: int, ack: int) -> bytes:
        b = bytearray(frame)
        struct.pack_into("!II", b, 14 + 20 + 4, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF)
        return bytes(b)

    per_flow = []
    for i in range(flows):
        dst = str(net.network_address + 100 + i % 100)
        sport, dport = 40000 + i, (443, 80, 5201, 22)[i % 4]
        c, s = IP(src=src4, dst=dst), IP(src=dst, dst=src4)
        data_t = bytes(eth / c / TCP(sport=sport, dport=dport, flags="PA", seq=0, ack=5001) / body)
        ack_t = bytes(eth / s / TCP(sport=dport, dport=sport, flags="A", seq=5001, ack=0))
        seq = [bytes(eth / c / TCP(sport=sport, dport=dport, flags="S", seq=1000, options=[("MSS", 1460)])),
               bytes(eth / s / TCP(sport=dport, dport=sport, flags="SA", seq=5000, ack=1001))]
        for k in range(data):
            seq.append(patched(data_t, 1001 + k * payload, 5001))
            if k % 2:
                seq.append(patched(ack_t, 5001, 1001 + (k + 1) * payload))
        seq.append(bytes(eth / c / TCP(sport=sport, dport=dport, flags="FA", seq=1001 + data * payload, ack=5001)))
        seq.append(bytes(eth / s / TCP(sport=dport, dport=sport, flags="FA", seq=5001, ack=1002 + data * payload)))
        per_flow.append(seq)
    dns = str(net.network_address + 53)
    frames: list[bytes] = []
    q = 0
    for k in range(max(len(f) for f in per_flow)):
        for f in per_flow:
            if k >= len(f):
                continue
            frames.append(f[k])
            if len(frames) % dns_every == 0:
                q += 1
                name, port = f"host{q % 500}.example.org", 30000 + q % 20000
                frames.append(bytes(eth / IP(src=src4, dst=dns) / UDP(sport=port, dport=53) /
                                    DNS(id=q & 0xFFFF, rd=1, qd=DNSQR(qname=name))))
                frames.append(bytes(eth / IP(src=dns, dst=src4) / UDP(sport=53, dport=port) /
                                    DNS(id=q & 0xFFFF, qr=1, rd=1, ra=1, qd=DNSQR(qname=name))))
    with open(path, "wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))  # pcap, Ethernet
        for n, fr in enumerate(frames):
            out.write(struct.pack("<IIII", n // 1000, (n % 1000) * 1000, len(fr), len(fr)))
            out.write(fr)
    return len(frames)


_ACTUAL = re.compile(r"Actual:\s+(\d+) packets .*? sent in ([\d.]+) seconds")
_FAILED = re.compile(r"Failed packets:\s+(\d+)")


def replay(lab, host, pcap: str, *, pps: float | None = None, loops: int = 1, limit: int | None = None,
           timeout: float = 300) -> Replay:
    """tcpreplay ``pcap`` onto the host's eth0: at ``pps`` packets/s, or as fast as it goes (None)."""
    cmd = ["tcpreplay", "-q", "-i", host.ifname, "--preload-pcap", f"--loop={loops}"]
    cmd += [f"--pps={pps:.0f}"] if pps else ["--topspeed"]
    if limit:
        cmd.append(f"--limit={limit}")
    p = lab.run(host, *cmd, pcap, timeout=timeout)
    out = p.stdout + p.stderr
    m = _ACTUAL.search(out)
    if not m:
        raise RuntimeError(f"tcpreplay: no 'Actual:' line in its output:\n{out}")
    n, secs = int(m.group(1)), float(m.group(2))
    f = _FAILED.search(out)
    return Replay(packets=n, seconds=secs, pps=n / secs if secs else 0.0, failed=int(f.group(1)) if f else 0)


def serve_tcp(addr: str, port: int, handle, stop: threading.Event, backlog: int = 64) -> threading.Thread:
    """A TCP service on addr:port until ``stop`` is set: each connection goes to ``handle(conn)`` on a thread
    of its own, and is closed after it (an OSError ends that connection only); returns the accepting thread."""
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((addr, port))
    ls.listen(backlog)
    ls.settimeout(0.2)

    def one(c: socket.socket) -> None:
        try:
            handle(c)
        except OSError:
            pass
        finally:
            c.close()

    def loop() -> None:
        while not stop.is_set():
            try:
                c, _ = ls.accept()
            except socket.timeout:
                continue
            threading.Thread(target=one, args=(c,), daemon=True).start()
        ls.close()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def link_stats(ifname: str) -> dict[str, int]:
    """rx/tx packets and drops of a root-namespace interface (sysfs counters)."""
    base = f"/sys/class/net/{ifname}/statistics/"
    out = {}
    for k in ("rx_packets", "rx_dropped", "tx_packets", "tx_dropped"):
        with open(base + k) as f:
            out[k] = int(f.read())
    return out


@contextlib.contextmanager
def rig(prefix: str = "hb"):
    """A lab host with the mix pcap, and a real ``hdrlog server`` on a fresh chDB store.

    Yields (lab, host, server, pcap path, work dir, pcap packets). Everything is
    stopped and removed on the way out, also on error.
    """
    from hdrlog.dev.lab import Lab
    from hdrlog.dev.processes import ServerProcess

    with tempfile.TemporaryDirectory(prefix="hdrlog-bench-") as tmp, Lab(prefix) as lab:
        work = Path(tmp)
        host = lab.add_host("gen")
        pcap = str(work / "mix.pcap")
        n = write_pcap(pcap, host.mac, host.addr4)
        server = ServerProcess(f"chdb://{work}/store", work)
        try:
            server.start()
            yield lab, host, server, pcap, work, n
        finally:
            server.stop()


def collector(server, host, work: Path, name: str, *extra: str):
    """A started ``hdrlog collector`` on the host's root-side veth, connected to ``server``."""
    from hdrlog.dev.processes import CollectorProcess, wait_until

    c = CollectorProcess(server.address, [host.peer_ifname], name, work, *extra)
    try:
        c.start()
        wait_until(lambda: "server=up" in c.log(), 60, f"collector {name} connected")
    except BaseException:
        c.stop()
        raise
    return c


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
