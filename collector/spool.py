"""The durable spool: every batch is on disk before it is sent, and leaves only when acked.

Layout of the spool directory::

    state.json            {"collector_id": ..., "seq_reserved": N}
    batches/<seq>.batch   one closed Batch each: header + serialized protobuf

A batch file is written to a temporary name, fsynced and renamed, so after a
crash a file is either whole or absent; the header's CRC32 catches what a disk
or a hand did to it afterwards (a bad file is dropped and counted). Seqs are
handed out from a block reserved in state.json (fsynced once per block), so a
restarted collector never reuses a seq the server may have stored, and keeps
its collector_id, which is what lets the server drop resent batches.

When the spool would grow past ``max_bytes`` the oldest batches are dropped,
counted and logged: the newest data is worth more to someone debugging now.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

from hdrlog.proto import ingest_pb2

log = logging.getLogger("hdrlog.collector")

MAGIC = b"HLB1"
HEADER = struct.Struct("<4sIII")  # magic, crc32 of payload, rows, payload length
SEQ_BLOCK = 1000


class SpoolError(RuntimeError):
    """The spool directory cannot be used; the message names the path."""


@dataclass
class SpooledBatch:
    seq: int
    rows: int
    nbytes: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, directory: str | os.PathLike[str], max_bytes: int, host_id: str):
        self.dir = Path(directory)
        self.batches_dir = self.dir / "batches"
        self.max_bytes = max_bytes
        self.host_id = host_id
        self.collector_id = ""
        self._next_seq = 1
        self._reserved = 0
        self.items: dict[int, SpooledBatch] = {}  # seq -> on-disk batch, insertion = seq order
        self.bytes = 0
        self.dropped_rows = 0  # rows dropped because the spool was full
        self.corrupt_files = 0

    # -- opening ---------------------------------------------------------------------------
    def open(self) -> list[SpooledBatch]:
        """Read state and list the batches left by an earlier run, oldest first."""
        try:
            self.batches_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"spool {self.dir}: {exc.strerror}") from None
        state = self._read_state()
        self.collector_id = state.get("collector_id") or f"{self.host_id}/{uuid.uuid4().hex[:12]}"
        self._next_seq = int(state.get("seq_reserved", 0)) + 1
        found: list[SpooledBatch] = []
        for path in self.batches_dir.iterdir():
            if path.suffix == ".tmp":
                path.unlink(missing_ok=True)  # a write the crash interrupted
                continue
            try:
                seq = int(path.stem)
                rows, nbytes = self._check(path)
            except (ValueError, OSError) as exc:
                self.corrupt_files += 1
                log.error("spool: dropping unreadable %s: %s", path, exc)
                path.unlink(missing_ok=True)
                continue
            found.append(SpooledBatch(seq, rows, nbytes))
        found.sort(key=lambda b: b.seq)
        for b in found:
            self.items[b.seq] = b
            self.bytes += b.nbytes
            self._next_seq = max(self._next_seq, b.seq + 1)
        self._reserve()
        return found

    def _read_state(self) -> dict:
        path = self.dir / "state.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise SpoolError(f"spool {path}: unreadable state ({exc}); move it away to start afresh") from None

    def _reserve(self) -> None:
        """Persist a block of seqs before using any of it."""
        self._reserved = self._next_seq + SEQ_BLOCK - 1
        tmp = self.dir / "state.json.tmp"
        with open(tmp, "w") as f:
            json.dump({"collector_id": self.collector_id, "seq_reserved": self._reserved}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / "state.json")
        _fsync_dir(self.dir)

    def next_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        if seq >= self._reserved:
            self._reserve()
        return seq

    # -- batches ---------------------------------------------------------------------------
    def _path(self, seq: int) -> Path:
        return self.batches_dir / f"{seq:020d}.batch"

    @staticmethod
    def _check(path: Path) -> tuple[int, int]:
        data = path.read_bytes()
        if len(data) < HEADER.size:
            raise ValueError("shorter than its header")
        magic, crc, rows, length = HEADER.unpack_from(data)
        if magic != MAGIC or length != len(data) - HEADER.size:
            raise ValueError("bad header")
        if zlib.crc32(data[HEADER.size:]) != crc:
            raise ValueError("checksum mismatch")
        return rows, len(data)

    def write(self, batch: ingest_pb2.Batch, rows: int) -> list[SpooledBatch]:
        """Store a batch durably; returns the oldest batches dropped to make room."""
        payload = batch.SerializeToString()
        data = HEADER.pack(MAGIC, zlib.crc32(payload), rows, len(payload)) + payload
        dropped: list[SpooledBatch] = []
        while self.items and self.bytes + len(data) > self.max_bytes:
            oldest = next(iter(self.items.values()))
            self.remove(oldest.seq)
            self.dropped_rows += oldest.rows
            dropped.append(oldest)
        path = self._path(batch.seq)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.batches_dir)
        self.items[batch.seq] = SpooledBatch(batch.seq, rows, len(data))
        self.bytes += len(data)
        return dropped

    def load(self, seq: int) -> ingest_pb2.Batch:
        data = self._path(seq).read_bytes()
        batch = ingest_pb2.Batch()
        batch.ParseFromString(data[HEADER.size:])
        return batch

    def remove(self, seq: int) -> None:
        item = self.items.pop(seq, None)
        if item is not None:
            self.bytes -= item.nbytes
            self._path(seq).unlink(missing_ok=True)
