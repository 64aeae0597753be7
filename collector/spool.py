"""The durable spool: every batch is on disk before it is sent, and leaves only when acked.

Layout of the spool directory::

    state.json            {"collector_id": ..., "host_id": ..., "seq_reserved": N}
    batches/<seq>.batch   one closed Batch each: header + serialized protobuf
    lock                  flock()ed while a collector uses the spool (one collector per spool)
    tally                 two little-endian uint64 in a shared mapping: records read from the
                          ring buffer, and records written into spooled batches (this run)

A batch file is written to a temporary name, fsynced and renamed, so after a
crash a file is either whole or absent; the header's CRC32 catches what a disk
or a hand did to it afterwards (a bad file is dropped and counted). Seqs are
handed out from a block reserved in state.json (fsynced once per block), so a
restarted collector never reuses a seq the server may have stored, and keeps
its collector_id, which is what lets the server drop resent batches.

When the spool would grow past ``max_bytes`` the oldest batches are dropped,
counted and logged: the newest data is worth more to someone debugging now.

What a crash costs, and how it is counted: records are durable once their batch
is written here (at the latest ``batch_interval`` after they were read). The
records read but not yet spooled live in the collector's memory only. Their
number is kept in ``tally``, a file mapped ``MAP_SHARED``: the collector updates it
with plain memory stores (no syscall, no fsync), and the kernel's page cache keeps
those stores when the process is SIGKILLed (not when the machine loses power).
The next run reads ``read - spooled`` from it (``lost_at_crash``), logs it and
counts it in ``collector_stats`` as ``drop_lost_at_crash``. What no process can
count: records still in the kernel ring buffer at the kill, and packets that
crossed the interface while no collector ran.
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import struct
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hdrlog.proto import ingest_pb2

log = logging.getLogger("hdrlog.collector")

MAGIC = b"HLB1"
HEADER = struct.Struct("<4sIII")  # magic, crc32 of payload, rows, payload length
SEQ_BLOCK = 1000
TALLY_READ, TALLY_SPOOLED = 0, 1


class SpoolError(OSError):
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
        self.lost_at_crash = 0  # records the previous run had read but not spooled when it died
        self.tally: np.ndarray | None = None  # [records read, records spooled], shared mapping
        self._lock_fd: int | None = None
        self._unlogged_drops = 0
        self._next_full_log = 0.0
        self._full_log_every = 5.0  # doubles up to 10 minutes while the spool stays full
        self._tally_map: mmap.mmap | None = None

    def __len__(self) -> int:
        return len(self.items)

    # -- opening ---------------------------------------------------------------------------
    def open(self) -> list[SpooledBatch]:
        """Read state and list the batches left by an earlier run, oldest first."""
        try:
            self.batches_dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SpoolError(f"spool {self.dir}: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.close()
            raise SpoolError(f"spool {self.dir} is in use by another collector; "
                             "give each collector its own --spool") from None
        state = self._read_state()
        self.collector_id = state.get("collector_id") or f"{self.host_id}/{uuid.uuid4().hex[:12]}"
        self._next_seq = int(state.get("seq_reserved", 0)) + 1
        owner = state.get("host_id", self.host_id)
        if owner != self.host_id:
            if any(p.suffix == ".batch" for p in self.batches_dir.iterdir()):
                self.close()
                raise SpoolError(f"spool {self.dir} holds unsent batches of host {owner!r}, not {self.host_id!r}: "
                                 "start with --host-id " + owner + " to send them, or move the spool away")
            log.info("spool %s: host changed from %r to %r, starting a new collector identity",
                     self.dir, owner, self.host_id)
            self.collector_id = f"{self.host_id}/{uuid.uuid4().hex[:12]}"
        self._open_tally()
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

    def _open_tally(self) -> None:
        """Map the tally file; what it holds from the previous run becomes ``lost_at_crash``."""
        path = self.dir / "tally"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size != 16:
                    os.ftruncate(fd, 16)
                self._tally_map = mmap.mmap(fd, 16, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
        except OSError as exc:
            raise SpoolError(f"spool {path}: {exc.strerror}") from None
        self.tally = np.frombuffer(self._tally_map, dtype="<u8")
        read, spooled = int(self.tally[TALLY_READ]), int(self.tally[TALLY_SPOOLED])
        self.lost_at_crash = max(0, read - spooled)
        if self.lost_at_crash:
            log.error("spool %s: the previous run stopped without writing its last %d records to the spool "
                      "(killed or crashed); counted as drop_lost_at_crash", self.dir, self.lost_at_crash)
        self.tally[:] = 0

    def count_read(self, records: int) -> None:
        """Records read from the ring buffer (call from the capture thread, the only writer of this slot)."""
        if self.tally is not None:
            self.tally[TALLY_READ] += records

    def close(self) -> None:
        """Release the lock and the tally mapping. The batches stay for the next run."""
        if self.tally is not None:
            self.tally = None
        if self._tally_map is not None:
            try:
                self._tally_map.close()
            except BufferError:  # a view is still alive somewhere; the mapping dies with the process
                pass
            self._tally_map = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

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
            json.dump({"collector_id": self.collector_id, "host_id": self.host_id,
                       "seq_reserved": self._reserved}, f)
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
        if self.tally is not None:
            self.tally[TALLY_SPOOLED] += rows
        if dropped:
            self._unlogged_drops += sum(b.rows for b in dropped)
            now = time.monotonic()
            if now >= self._next_full_log:
                log.warning("spool %s full (spool_max_bytes=%d): dropped the oldest batches, %d records so far "
                            "(%d since the last warning); the server is unreachable or slow — raise "
                            "spool_max_bytes or check it", self.dir, self.max_bytes, self.dropped_rows,
                            self._unlogged_drops)
                self._unlogged_drops = 0
                self._full_log_every = min(self._full_log_every * 2, 600.0)
                self._next_full_log = now + self._full_log_every
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
