"""Benchmark: BPF run time per packet of the TC classifier, by packet kind and payload-copy size.

Run as root from the repository: ``.venv/bin/python -m bench.payload_copy [--sizes 0,256,512,1024,2048]``.
A size may end in ``:nocont`` to build without the TLS continuation copy (HDRLOG_TLS_CONT=0, the
classifier before issue 14 but for its VLAN walk and method peek): ``--sizes 1024:nocont,2048``
compares the old default with the new one. For each HDRLOG_PAYLOAD_BYTES it loads the classifier on a lab veth, turns on
kernel.bpf_stats_enabled (restored afterwards), sends a few thousand frames of each
kind from inside the lab namespace and reads run_time_ns / run_cnt from the program's
fdinfo. Prints ns per packet and the ratio to the first size (the baseline, measured
in the same run: these machines are noisy). Size 0 means "no payload copy".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from scapy.all import IP, TCP, UDP, Ether, Raw
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.tls.extensions import ServerName, TLS_Ext_ServerName
from scapy.layers.tls.handshake import TLSClientHello
from scapy.layers.tls.record import TLS

from bench.bpfrun import prog_stats
from hdrlog.collector import capture as capmod
from hdrlog.collector.capture import Capture, CaptureConfig
from hdrlog.dev.lab import Lab
from tests import gapframes

SEND = """
import json, socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
frames = [bytes.fromhex(h) for h in json.load(open(sys.argv[1]))]
for _ in range(int(sys.argv[2])):
    for f in frames:
        s.send(f)
"""


def frames(h) -> dict[str, bytes]:
    eth = Ether(src="02:48:44:00:00:01", dst=h.peer_mac)
    ip = IP(src=h.addr4, dst=h.peer_addr4)
    hello = TLS(msg=[TLSClientHello(ciphers=list(range(0x1301, 0x1301 + 40)),
                                    ext=[TLS_Ext_ServerName(servernames=[ServerName(servername=b"bench.example.org")])])])
    return {
        "tcp-ack": bytes(eth / ip / TCP(sport=40000, dport=443, flags="A")),
        "tcp-bulk-1400": bytes(eth / ip / TCP(sport=40000, dport=443, flags="PA") / Raw(b"\x17\x03\x03" + b"x" * 1397)),
        "dns-query": bytes(eth / ip / UDP(sport=40000, dport=53) / DNS(rd=1, qd=DNSQR(qname="www.bench.example.org"))),
        "http-get": bytes(eth / ip / TCP(sport=40000, dport=80, flags="PA")
                          / Raw(b"GET /index.html HTTP/1.1\r\nHost: bench.example.org\r\nUser-Agent: bench\r\n\r\n")),
        "tls-hello": bytes(eth / ip / TCP(sport=40000, dport=443, flags="PA") / Raw(bytes(hello) + b"\0" * 400)),
        # A post-quantum ClientHello's first segment (1,448 of its 1,646 bytes): copied whole, and
        # (with the continuation copy) remembered in tls_cont; then bulk data of another connection
        # while that entry waits, so every such packet pays the tls_cont lookup.
        "pq-hello-seg1": bytes(eth / ip / TCP(sport=40001, dport=443, flags="PA", seq=1000)
                               / Raw(gapframes.pq_client_hello()[:1448])),
        "bulk-while-pending": bytes(eth / ip / TCP(sport=40002, dport=443, flags="PA")
                                    / Raw(b"\x17\x03\x03" + b"x" * 1397)),
    }


def measure(lab, host, spec: str, kinds: dict[str, bytes], reps: int, tmp: str) -> dict[str, float]:
    size, _, variant = spec.partition(":")
    size = int(size)
    cfg = CaptureConfig(ifaces=[host.peer_ifname])
    if hasattr(cfg, "payload_bytes"):
        cfg.payload_bytes = size
    elif size:
        raise SystemExit("this tree has no payload copy (CaptureConfig.payload_bytes)")
    cap = Capture(cfg)
    real_cflags = capmod.cflags
    if variant == "nocont":
        capmod.cflags = lambda c: real_cflags(c) + ["-DHDRLOG_TLS_CONT=0"]
    try:
        cap.start()
    finally:
        capmod.cflags = real_cflags
    out = {}
    try:
        fd = cap._fns["ingress"].fd
        for kind, frame in kinds.items():
            path = os.path.join(tmp, "f.json")
            with open(path, "w") as f:
                json.dump([frame.hex()], f)
            t0, n0 = prog_stats(fd)
            lab.run(host, sys.executable, "-c", SEND, path, str(reps), timeout=300)
            while cap.poll(50):  # drain so the ring never fills
                pass
            t1, n1 = prog_stats(fd)
            out[kind] = (t1 - t0) / max(1, n1 - n0)
    finally:
        cap.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0,256,512,1024,2048")
    ap.add_argument("--reps", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3, help="alternate sizes this many times; keep the median")
    args = ap.parse_args()
    sizes = args.sizes.split(",")
    with open("/proc/sys/kernel/bpf_stats_enabled") as f:
        old = f.read().strip()
    try:
        with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
            f.write("1")
        with Lab() as lab, tempfile.TemporaryDirectory() as tmp:
            host = lab.add_host("bench")
            kinds = frames(host)
            runs: dict[str, list[dict[str, float]]] = {s: [] for s in sizes}
            for _ in range(args.rounds):
                for s in sizes:
                    runs[s].append(measure(lab, host, s, kinds, args.reps, tmp))
    finally:
        with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
            f.write(old)
    med = {s: {k: sorted(r[k] for r in runs[s])[len(runs[s]) // 2] for k in kinds} for s in sizes}
    base = med[sizes[0]]
    print(f"BPF run time per packet, ns (median of {args.rounds}); ratio to payload_bytes={sizes[0]}")
    print(f"{'kind':20}" + "".join(f"{'bytes=' + str(s):>20}" for s in sizes))
    for k in kinds:
        print(f"{k:20}" + "".join(f"{med[s][k]:9.0f} ({med[s][k] / base[k]:5.2f}x)  " for s in sizes))


if __name__ == "__main__":
    main()
