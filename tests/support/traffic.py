"""Paced UDP load from a lab host to its peer, for the capture, fault and restart tests."""

from __future__ import annotations

import subprocess

# Packet i (its payload: i, 4 bytes big-endian) goes to port base + i // block: the port tells which
# packets were sent first. 50 source ports, so that flows spread over the collector's maps.
SENDER = r"""
import socket, sys, time
dst, base, n, rate, block = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(50)]
for i, s in enumerate(socks):
    s.bind(("0.0.0.0", 30000 + i))
start = time.monotonic()
for i in range(n):
    socks[i % 50].sendto(i.to_bytes(4, "big"), (dst, base + i // block))
    ahead = start + (i + 1) / rate - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
"""


def send_udp(lab, host, base: int, n: int, rate: float, block: int = 10**9) -> subprocess.Popen:
    """Start sending ``n`` UDP packets from the lab ``host`` to its peer at ``rate`` a second, packet i
    to port base + i // block (all to ``base`` unless ``block`` is given)."""
    return lab.popen(host, "/usr/bin/python3", "-c", SENDER, host.peer_addr4, str(base), str(n), str(rate), str(block))
