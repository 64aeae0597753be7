"""Exactly-once at fleet size and under the faults of issue 11, against the real server process.

- 1,000 collectors streaming at once over real gRPC (one TCP connection each, from one grpc.aio
  process), plaintext with 1,000 host names and under mTLS with a few certificates: every batch of
  every collector is acked OK and stored exactly once (counts per collector in the store).
- The store's filesystem fills (a small tmpfs in the server's own mount namespace), the server is
  stopped with SIGTERM while full, restarted, space freed, the collector resends: every acked seq
  is stored, no row twice.
- ``--insecure``: a forged batch under another collector's id, with a huge seq, does not make the
  victim's later batches "duplicates".

Every server a test starts is stopped by the test (also on failure); a mount lives only in the
namespace of the process that made it, so it goes with that process.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from hdrlog import pki
from hdrlog.proto import ingest_pb2, ingest_pb2_grpc
from tests.support import HDRLOG, ServerProcess, wait_until
from tests.test_server_helpers import batch, packets_table

OK, REJECTED, RETRY = ingest_pb2.Ack.OK, ingest_pb2.Ack.REJECTED, ingest_pb2.Ack.RETRY
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@pytest.fixture
def procs():
    """Every server a test starts, stopped at the end (also on failure)."""
    started: list[ServerProcess] = []
    yield started
    for p in reversed(started):
        p.stop()


# -- fleet size -------------------------------------------------------------------------------

async def _collector(target: str, creds, batches: list[ingest_pb2.Batch]) -> list[ingest_pb2.Ack]:
    """One collector: its own connection, one stream, every batch, half-close, all acks."""
    options = OWN_CONNECTION + [("grpc.max_receive_message_length", 64 << 20)]
    channel = (grpc.aio.secure_channel(target, creds, options=options) if creds is not None
               else grpc.aio.insecure_channel(target, options=options))
    async with channel:
        call = ingest_pb2_grpc.IngestStub(channel).Stream(iter(batches), timeout=120)
        return [ack async for ack in call]


async def _fleet(target: str, fleet: list[tuple[object, list[ingest_pb2.Batch]]]) -> list:
    return await asyncio.gather(*(_collector(target, creds, bs) for creds, bs in fleet), return_exceptions=True)


def _credentials(certs: Path, name: str):
    return grpc.ssl_channel_credentials(root_certificates=(certs / "ca.crt").read_bytes(),
                                        private_key=(certs / f"{name}.key").read_bytes(),
                                        certificate_chain=(certs / f"{name}.crt").read_bytes())


@pytest.mark.parametrize("security", ["insecure", "mtls"])
def test_1000_collectors_at_once_every_batch_acked_and_stored_once(tmp_path, procs, security):
    n_collectors, per_collector, rows = 1000, 3, 20
    tables = [packets_table(rows, seed) for seed in range(per_collector)]
    if security == "mtls":
        certs = tmp_path / "pki"
        pki.init_ca(certs)
        pki.issue(certs, "central", server=True, sans=["127.0.0.1"])
        hosts = [f"fleet-{k}" for k in range(4)]  # a few certificates, 250 collectors under each
        for h in hosts:
            pki.issue(certs, h)
        creds = {h: _credentials(certs, h) for h in hosts}
        ids = [(hosts[i % len(hosts)], f"{hosts[i % len(hosts)]}/{i}") for i in range(n_collectors)]
        extra = ["--max-streams-per-host", str(n_collectors)]
    else:
        certs, creds, extra = None, {}, []
        ids = [(f"fleet-{i}", f"fleet-{i}") for i in range(n_collectors)]  # insecure: identities are the ids
    server = ServerProcess(f"chdb://{tmp_path}/store", tmp_path, "--flush-interval", "0.2", "--flush-rows", "100000",
                           *extra, pki=certs)
    procs.append(server)
    server.start()
    fleet = [(creds.get(host), [batch(s, tables=[tables[s - 1]], host=host, collector_id=cid)
                                for s in range(1, per_collector + 1)]) for host, cid in ids]
    t0 = time.monotonic()
    results = asyncio.run(_fleet(server.address, fleet))
    elapsed = time.monotonic() - t0
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} streams failed, e.g. {errors[0]!r}"
    acks = [a for r in results for a in r]
    bad = [a for a in acks if (a.status, a.rows, a.duplicate) != (OK, rows, False)]
    assert len(acks) == n_collectors * per_collector and not bad, (len(acks), len(bad), bad[:3])
    stored = {r["c"]: (int(r["n"]), int(r["s"])) for r in server.sql(
        "SELECT collector_id AS c, count() AS n, uniqExact(batch_seq) AS s FROM hdrlog.packets GROUP BY c")}
    assert stored == {cid: (per_collector * rows, per_collector) for _, cid in ids}
    if security == "insecure":
        assert int(server.sql("SELECT uniqExact(host) AS h FROM hdrlog.packets")[0]["h"]) == n_collectors
    log = server.log()
    failures = log.count("flush failed") + log.count("insert failed") + log.count("insert refused")
    assert failures == 0, log[-3000:]
    print(f"FLEET {security}: {n_collectors} collectors, {len(acks)} batches acked OK, "
          f"{failures} flush failures, {elapsed:.1f} s")
