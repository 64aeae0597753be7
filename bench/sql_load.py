"""Ingest under SQL load: rows/s acked over gRPC while the worst SQL queries run, against none.

One in-process server (``hdrlog.server.Server``: gRPC ingest, writer, SQL endpoint, one embedded chDB
store, as deployed) on loopback. A collector-like client streams packets Batches of ``ROWS`` rows
(``bench.server_stages.make_batch``) with up to ``IN_FLIGHT`` unacknowledged, and counts the rows
acked per second. Phases of ``SECONDS`` alternate, ``ROUNDS`` times, with the same client:

- ``quiet``: no SQL (the baseline);
- ``worst``: the SQL endpoint kept full with the issue's worst queries, each re-sent as soon as it is
  answered, by ``SQL_CLIENTS`` clients: the groupArray memory bomb over numbers(2e9), an endless
  CROSS JOIN (killed by max_execution_time), a full scan sorting every stored packet, and a flood of
  ``SELECT 1`` beyond the queue (answered 503);
- ``abandon``: clients that send the endless query and hang up at once, over and over.

The server runs with its default limits except a shorter ``sql_max_execution_time`` (10 s, so a
phase sees queries end and restart). Medians per phase are printed with their ratio to ``quiet``;
these machines are noisy, so only the ratios measured in the same run mean something.

    python -m bench.sql_load [--seconds 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import socket

import grpc

ROWS, IN_FLIGHT, SECONDS, ROUNDS, SQL_CLIENTS = 10_000, 4, 8.0, 2, 8
WORST = [
    "SELECT length(groupArray(number)) FROM numbers(2e9)",
    "SELECT count() FROM numbers(3e6) AS a CROSS JOIN numbers(3e6) AS b WHERE a.number + b.number = 1",
    "SELECT * FROM hdrlog.packets ORDER BY tcp_seq DESC, src_ip LIMIT 10 OFFSET 100000 FORMAT Null",
    "SELECT 1",
]


class Load:
    """Threads that keep the SQL endpoint busy until stopped; counts answers by HTTP status."""

    def __init__(self, url: str, kind: str):
        self.url, self.kind = url, kind
        self.stop = threading.Event()
        self.statuses: dict[int, int] = {}
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(SQL_CLIENTS)]

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _run(self, i: int) -> None:
        while not self.stop.is_set():
            if self.kind == "abandon":
                host, port = urllib.parse.urlsplit(self.url).netloc.split(":")
                with socket.create_connection((host, int(port)), timeout=10) as s:
                    s.sendall(f"GET /?{urllib.parse.urlencode({'query': WORST[1]})} HTTP/1.1\r\nHost: x\r\n\r\n"
                              .encode())
                    time.sleep(0.5)
                self.statuses[0] = self.statuses.get(0, 0) + 1
                continue
            query = WORST[i % len(WORST)]
            try:
                with urllib.request.urlopen(f"{self.url}/?{urllib.parse.urlencode({'query': query})}",
                                            timeout=120) as r:
                    r.read()
                    status = r.status
            except urllib.error.HTTPError as e:
                e.read()
                status = e.code
            except OSError:
                status = -1
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status == 503:
                time.sleep(0.05)


class Ingest:
    """A collector-like stream: batches sent with at most IN_FLIGHT unacked; acked rows counted."""

    def __init__(self, target: str):
        from bench.server_stages import make_batch

        self.batch = make_batch(1, ROWS, collector_id="sqlload")
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 256 << 20)])
        self.acked_rows = 0
        self.credit = threading.Semaphore(IN_FLIGHT)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _requests(self):
        seq = 0
        while not self.done.is_set():
            if not self.credit.acquire(timeout=0.5):
                continue
            seq += 1
            self.batch.seq = seq
            yield self.batch

    def _run(self) -> None:
        from hdrlog.proto import ingest_pb2_grpc

        stub = ingest_pb2_grpc.IngestStub(self.channel)
        try:
            for ack in stub.Stream(self._requests()):
                self.acked_rows += ack.rows
                self.credit.release()
        except grpc.RpcError:
            if not self.done.is_set():
                raise

    def rate(self, seconds: float) -> float:
        start, t = self.acked_rows, time.perf_counter()
        time.sleep(seconds)
        return (self.acked_rows - start) / (time.perf_counter() - t)


def run(seconds: float, rounds: int) -> dict[str, list[float]]:
    from hdrlog.server.app import Server
    from hdrlog.server.config import ServerConfig

    rates: dict[str, list[float]] = {"quiet": [], "worst": [], "abandon": []}
    statuses: dict[str, dict[int, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ServerConfig(listen="127.0.0.1:0", sql_listen="127.0.0.1:0", clickhouse=f"chdb://{tmp}/store",
                           insecure=True, status_interval=0, sql_max_execution_time=10)
        cfg.validate()
        server = Server(cfg)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(120)
        url = f"http://127.0.0.1:{server.sql_port}"
        ingest = Ingest(f"127.0.0.1:{server.grpc_port}")
        ingest.thread.start()
        try:
            ingest.rate(seconds)  # warm-up: parts and partitions created, rows to scan
            for r in range(rounds):
                order = ["quiet", "worst", "abandon"] if r % 2 == 0 else ["abandon", "worst", "quiet"]
                for phase in order:
                    if phase == "quiet":
                        rates[phase].append(ingest.rate(seconds))
                        continue
                    with Load(url, phase) as load:
                        time.sleep(1.0)  # the load is under way
                        rates[phase].append(ingest.rate(seconds))
                    for k, v in load.statuses.items():
                        statuses.setdefault(phase, {})[k] = statuses.setdefault(phase, {}).get(k, 0) + v
        finally:
            ingest.done.set()
            ingest.thread.join(30)
            ingest.channel.close()
            asyncio.run_coroutine_threadsafe(server.stop(grace=1), loop).result(120)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
    run.statuses = statuses  # type: ignore[attr-defined]
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=SECONDS, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    ns = parser.parse_args()
    rates = run(ns.seconds, ns.rounds)
    base = statistics.median(rates["quiet"])
    print(f"{'phase':10} {'acked rows/s':>14} {'ratio':>7}  rounds   SQL answers by HTTP status (0 = abandoned)")
    for phase, values in rates.items():
        med = statistics.median(values)
        answers = getattr(run, "statuses", {}).get(phase, {})
        print(f"{phase:10} {med:14,.0f} {med / base:7.2f}  {' '.join(f'{v:,.0f}' for v in values):>14}   "
              f"{dict(sorted(answers.items()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
