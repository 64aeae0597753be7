"""Inside the isolated corpus namespace: replay captures with tcpreplay while Capture is attached.

Run as ``ip netns exec NS python -m tests.corpus.replay_capture --iface va --out DIR FILE...``
(tests/corpus/lab.py does). For every file it runs ``tcpreplay --intf1=IFACE --topspeed``, then
sends one marker frame (EtherType 0x88B5 from MARKER_SRC, the file's index in the payload) and
polls the capture until the marker's record arrives: everything before it belongs to the file.
Per file it writes ``DIR/NNNN.npz`` (the decoded columns of the egress records on IFACE, the
marker excluded) and one JSON line in ``DIR/results.jsonl`` (tcpreplay's output and exit
code, record count, counter deltas, whether the marker was seen in time). SIGTERM stops it
cleanly: the capture is detached before the process exits.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from hdrlog.collector.capture import Capture, CaptureConfig
from hdrlog.proto.columns import PACKETS

MARKER_SRC = 0x024844FFFFFE
MARKER_TYPE = 0x88B5  # IEEE local experimental EtherType
MARKER_WAIT_S = 15.0
TCPREPLAY_TIMEOUT_S = 120.0

_stop = False


def _on_term(_sig, _frame):
    global _stop
    _stop = True


def marker_frame(index: int) -> bytes:
    return (b"\xff" * 6 + MARKER_SRC.to_bytes(6, "big") + MARKER_TYPE.to_bytes(2, "big")
            + index.to_bytes(4, "big")).ljust(60, b"\0")


def concat(chunks: list[dict]) -> dict[str, np.ndarray]:
    out = {}
    for c in PACKETS:
        parts = [ch[c.name] for ch in chunks]
        if c.is_string:
            out[c.name] = np.array([s for p in parts for s in p], dtype=object)
        else:
            out[c.name] = np.concatenate(parts) if parts else np.zeros(0, dtype=c.dtype)
    return out


def take(cols: dict, mask: np.ndarray) -> dict:
    return {k: (v[mask] if isinstance(v, np.ndarray) else [s for s, m in zip(v, mask) if m]) for k, v in cols.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iface", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dns-ports", default="53,5353,5355")
    ap.add_argument("--ready", help="file to create once the capture is attached")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    out = Path(args.out)
    cap = Capture(CaptureConfig(ifaces=[args.iface], ringbuf_bytes=64 << 20,
                                dns_ports=[int(p) for p in args.dns_ports.split(",")]))
    cap.start()
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((args.iface, 0))
    try:
        if args.ready:
            Path(args.ready).write_text(str(os.getpid()))
        results = open(out / "results.jsonl", "w")
        for index, path in enumerate(args.files):
            if _stop:
                break
            before = cap.counters()
            t0 = time.monotonic()
            try:
                p = subprocess.run(["tcpreplay", f"--intf1={args.iface}", "--topspeed", path],
                                   capture_output=True, text=True, timeout=TCPREPLAY_TIMEOUT_S)
                rc, text = p.returncode, p.stdout + p.stderr
            except subprocess.TimeoutExpired as e:
                rc, text = -1, f"tcpreplay timed out after {e.timeout}s"
            sock.send(marker_frame(index))
            chunks: list[dict] = []
            seen_marker = False
            deadline = time.monotonic() + MARKER_WAIT_S
            while not seen_marker and time.monotonic() < deadline and not _stop:
                cols = cap.poll(50)
                if cols is None:
                    continue
                mine = (np.asarray([n == args.iface for n in cols["ifname"]])) & (cols["direction"] == 2)
                marker = mine & (cols["eth_src"] == MARKER_SRC) & (cols["eth_type"] == MARKER_TYPE)
                if marker.any():
                    seen_marker = True
                    first = int(np.flatnonzero(marker)[0])
                    mine[first:] = False  # the marker and anything after it (nothing should be)
                chunks.append(take(cols, mine))
            after = cap.counters()
            cols = concat(chunks)
            np.savez(out / f"{index:04d}.npz", **cols)
            results.write(json.dumps({
                "index": index, "file": path, "tcpreplay_rc": rc, "tcpreplay": text[-4000:],
                "records": int(len(cols["ts"])), "marker": seen_marker, "seconds": round(time.monotonic() - t0, 3),
                "counters": {k: after[k] - before.get(k, 0) for k in after},
            }) + "\n")
            results.flush()
        results.close()
    finally:
        sock.close()
        cap.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
