"""The SQL endpoint's HTTP layer: the hand-written asyncio server (before) against aiohttp (now), same run.

Each server runs in its own process on its own chDB store (``--serve old|new``): ``old`` is
``server/sqlhttp.py`` and ``server/sqlguard.py`` as they were at ``OLD_COMMIT`` (read with ``git show``
into a temporary folder), ``new`` is ``hdrlog.server.sql``. The driver, in this process, keeps
``CLIENTS`` keep-alive connections (http.client, one thread each) busy for ``SECONDS`` per workload and
counts answers per second and the latency of each: ``SELECT 1`` (the per-request cost) and a ~2 MB
TabSeparated answer (the body path). Rounds alternate old/new; medians are printed with new/old ratios.
These machines are noisy: only the ratios of the same run mean something.

    python -m bench.sql_http [--seconds 5] [--rounds 2] [--clients 4]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

OLD_COMMIT = "9ce70e7"  # the integration branch before the SQL endpoint moved onto aiohttp
ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = {"SELECT 1": "SELECT 1",
             "2 MB answer": "SELECT number, toString(number) FROM numbers(200000)"}


def serve(kind: str, store_dir: str, port_file: str) -> None:
    from hdrlog.server.metrics import ServerMetrics
    from hdrlog.server.store import Store

    if kind == "old":
        tmp = Path(tempfile.mkdtemp())
        for name in ("sqlhttp", "sqlguard"):
            src = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:server/{name}.py"],
                                 capture_output=True, text=True, check=True).stdout
            src = src.replace("from hdrlog.server import sqlguard", "import old_sqlguard as sqlguard")
            (tmp / f"old_{name}.py").write_text(src)
        sys.path.insert(0, str(tmp))
        import old_sqlhttp as mod  # type: ignore[import-not-found]
        limits = mod.Limits()
    else:
        from hdrlog.server.sql import http as mod
        from hdrlog.server.sql.limits import Limits
        limits = Limits()
    store = Store(f"chdb://{store_dir}", sql_settings=limits.defaults())
    store.open()
    store.migrate()

    async def main() -> None:
        endpoint = mod.SqlEndpoint(store, ServerMetrics(), "127.0.0.1", 0, limits=limits)
        port = await endpoint.start()
        Path(port_file).write_text(str(port))
        await asyncio.Event().wait()

    asyncio.run(main())


def drive(port: int, query: str, seconds: float, clients: int) -> tuple[float, float, float]:
    """(answers/s, p50 ms, p99 ms) for ``clients`` keep-alive connections over ``seconds``."""
    path = "/?" + urllib.parse.urlencode({"query": query})
    latencies: list[float] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        while time.monotonic() < end:
            t = time.perf_counter()
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            mine.append(time.perf_counter() - t)
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    latencies.sort()
    return (len(latencies) / took, latencies[len(latencies) // 2] * 1e3,
            latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3)


def run(seconds: float, rounds: int, clients: int) -> str:
    procs, ports = {}, {}
    tmp = Path(tempfile.mkdtemp())
    try:
        for kind in ("old", "new"):
            port_file = tmp / f"{kind}.port"
            procs[kind] = subprocess.Popen([sys.executable, "-m", "bench.sql_http", "--serve", kind,
                                            str(tmp / f"store-{kind}"), str(port_file)], cwd=ROOT,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(600):
                if port_file.exists() and port_file.read_text():
                    break
                time.sleep(0.1)
            ports[kind] = int(port_file.read_text())
        for kind in ports:  # warm up: the guard's catalogue, the handles
            drive(ports[kind], "SELECT 1", 0.5, 1)
        results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        for _ in range(rounds):
            for name, query in WORKLOADS.items():
                for kind in ("old", "new"):
                    results.setdefault((name, kind), []).append(drive(ports[kind], query, seconds, clients))
        lines = [f"SQL endpoint HTTP layer, {clients} keep-alive clients, {rounds} x {seconds:g} s per cell",
                 "", "| workload | old q/s | new q/s | q/s new/old | old p50 ms | new p50 ms | old p99 ms | "
                     "new p99 ms | p50 new/old |", "|---|---|---|---|---|---|---|---|---|"]
        for name in WORKLOADS:
            old = [statistics.median(x) for x in zip(*results[(name, "old")])]
            new = [statistics.median(x) for x in zip(*results[(name, "new")])]
            lines.append(f"| {name} | {old[0]:.0f} | {new[0]:.0f} | {new[0] / old[0]:.2f} | {old[1]:.2f} | "
                         f"{new[1]:.2f} | {old[2]:.2f} | {new[2]:.2f} | {new[1] / old[1]:.2f} |")
        return "\n".join(lines)
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--serve", nargs=3, metavar=("KIND", "STORE", "PORT_FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(*args.serve)
        return
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    print(run(args.seconds, args.rounds, args.clients))


if __name__ == "__main__":
    main()
