"""The durable spool: every batch is on disk before it is sent, and leaves only when acked.

Stage of the path: capture → decode → batch → **spool** → send. ``Spool`` is the directory;
``Outbox`` (at the end) is what the sender drains: the batches not acked yet, on disk and in memory.

Layout of the spool directory::

    state.json            {"collector_id": ..., "host_id": ..., "seq_reserved": N}
    batches/<seq>.batch   one closed Batch each: header + serialized protobuf
    lock                  flock()ed while a collector uses the spool (one collector per spool)
    tally                 two little-endian uint64 in a shared mapping: records read from the
                          ring buffer, and records written into spooled batches (this run)

A batch file is written to a temporary name, fsynced and renamed, so after a
crash a file is either whole or absent; the header's CRC32 catches what a disk
or a hand did to it afterwards: it is checked at open and on every read back,
and a bad file is removed, skipped and counted (``drop_spool_corrupt``, by the
records its header names; ``spool_corrupt_files``). Seqs are
handed out from a block reserved in state.json (fsynced once per block), so a
restarted collector never reuses a seq the server may have stored, and keeps
its collector_id, which is what lets the server drop resent batches.

When the spool would grow past ``max_bytes`` the oldest batches are dropped,
counted and logged: the newest data is worth more to someone debugging now.

When the disk refuses (full, read-only, failing), the spool is *degraded*: a
write raises ``SpoolUnwritable`` after cleaning up, the outbox keeps the batch in
memory (bounded by ``max_unacked_rows``, the oldest dropped and counted as
``drop_unacked_full``), a warning is logged on a doubling interval, and the next
batch tries the disk again; the first write that succeeds logs the recovery and
the batches memory held are spooled. Seqs past the block state.json reserves, when
the disk refuses a new block, go out under a fresh collector_id (a later run would
start from that block again under the old one). Nothing the disk does raises out of the
spool: removing an acked file, reserving seqs and opening a read-only spool
(its batches are read and sent, new ones held in memory) all degrade instead.

What a crash costs, and how it is counted: records are durable once their batch
is written here (at the latest ``batch_interval`` after they were read). The
records read but not yet spooled live in the collector's memory only. Their
number is kept in ``tally``, a file mapped ``MAP_SHARED``: the collector updates it
with plain memory stores (no syscall, no fsync), and the kernel's page cache keeps
those stores when the process is SIGKILLed (not when the machine loses power).
"Spooled" here means accounted for: written to a batch file, or (degraded) acked
from memory or dropped and counted. The next run reads ``read - spooled`` from it (``lost_at_crash``), logs it and
counts it in ``collector_stats`` as ``drop_lost_at_crash``. What no process can
count: records still in the kernel ring buffer at the kill, and packets that
crossed the interface while no collector ran.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import mmap
import os
import struct
import uuid
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hdrlog.drops import DropWarning, Every
from hdrlog.proto import ingest_pb2

log = logging.getLogger("hdrlog.collector")

MAGIC = b"HLB1"
HEADER = struct.Struct("<4sIII")  # magic, crc32 of payload, rows, payload length
SEQ_BLOCK = 1000
TALLY_READ, TALLY_SPOOLED = 0, 1


@dataclass
class SpooledBatch:
    seq: int
    rows: int
    nbytes: int


# What the spool does at start when it cannot create its directory: these errors are the
# disk's (degrade, run from memory); the others (EACCES, ENOTDIR, ...) are configuration.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG})


class SpoolError(OSError):
    """The spool directory cannot be used; the message names the path."""


class SpoolUnwritable(OSError):
    """The disk refused a batch; ``dropped``: the oldest batches removed before the attempt."""

    def __init__(self, message: str, dropped: list[SpooledBatch]):
        super().__init__(message)
        self.dropped = dropped


class SpoolCorrupt(ValueError):
    """A batch file fails its checks; ``rows``: what its header claims (0 when the header is bad)."""

    def __init__(self, message: str, rows: int = 0):
        super().__init__(message)
        self.rows = rows


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
        self._reserved = 0  # the last seq state.json reserves
        self._fresh_id = False  # collector_id is a fresh one state.json does not know yet
        self.items: dict[int, SpooledBatch] = {}  # seq -> on-disk batch, insertion = seq order
        self.bytes = 0
        self.dropped_rows = 0  # rows dropped because the spool was full
        self.corrupt_files = 0  # batch files that failed their checks (at open or read back)
        self.corrupt_rows = 0  # the records their headers named
        self.write_errors = 0  # writes the disk refused (each batch then lives in memory)
        self.degraded = ""  # why the disk refuses, while it does ("" = spooling)
        self.lost_at_crash = 0  # records the previous run had read but not spooled when it died
        self.tally: np.ndarray | None = None  # [records read, records spooled], shared mapping
        self._lock_fd: int | None = None
        self._warn_full = DropWarning(log, f"spool {self.dir} full (spool_max_bytes={max_bytes}), oldest batches",
                                      "the server is unreachable or slow: raise spool_max_bytes or check it")
        self._tally_map: mmap.mmap | None = None
        self._warn_unwritable = Every()
        self._warn_remove = Every()
        self._warn_corrupt = Every()

    def __len__(self) -> int:
        return len(self.items)

    # -- opening ---------------------------------------------------------------------------
    def open(self) -> list[SpooledBatch]:
        """Read state and list the batches left by an earlier run, oldest first.

        Raises SpoolError for what the operator must fix (a spool in use, another host's batches,
        an unreadable state.json, a directory it may not create). A disk that is full or
        read-only does not stop it: it opens degraded (see the module's docstring)."""
        try:
            self.batches_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno not in DISK_ERRNOS:
                raise SpoolError(f"spool {self.dir}: {exc.strerror}") from None
            self._unwritable("cannot create the spool directory", exc)
        self._lock()
        state = self._read_state()
        self.collector_id = state.get("collector_id") or f"{self.host_id}/{uuid.uuid4().hex[:12]}"
        self._next_seq = int(state.get("seq_reserved", 0)) + 1
        owner = state.get("host_id", self.host_id)
        if owner != self.host_id:
            if self.batches_dir.is_dir() and any(p.suffix == ".batch" for p in self.batches_dir.iterdir()):
                self.close()
                raise SpoolError(f"spool {self.dir} holds unsent batches of host {owner!r}, not {self.host_id!r}: "
                                 "start with --host-id " + owner + " to send them, or move the spool away")
            log.info("spool %s: host changed from %r to %r, starting a new collector identity",
                     self.dir, owner, self.host_id)
            self.collector_id = f"{self.host_id}/{uuid.uuid4().hex[:12]}"
        self._open_tally()
        found: list[SpooledBatch] = []
        for path in (self.batches_dir.iterdir() if self.batches_dir.is_dir() else ()):
            if path.suffix == ".tmp":
                self._unlink(path)  # a write the crash interrupted
                continue
            try:
                seq = int(path.stem)
                data = path.read_bytes()
                rows = self._verify(data)
            except (ValueError, OSError) as exc:
                self._count_corrupt(path, exc, getattr(exc, "rows", 0))
                self._unlink(path)
                continue
            found.append(SpooledBatch(seq, rows, len(data)))
        found.sort(key=lambda b: b.seq)
        for b in found:
            self.items[b.seq] = b
            self.bytes += b.nbytes
            self._next_seq = max(self._next_seq, b.seq + 1)
        self._try_reserve()  # when the disk refuses, next_seq() moves to a fresh identity
        return found

    def _lock(self) -> None:
        """flock() the lock file, so one collector uses this spool. On a read-only disk an existing
        lock file is opened read-only (flock works on it); without one, the spool runs unlocked."""
        path = self.dir / "lock"
        try:
            self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            if exc.errno not in DISK_ERRNOS and not self.degraded:
                raise SpoolError(f"spool {self.dir}: {exc.strerror}") from None
            try:
                self._lock_fd = os.open(path, os.O_RDONLY)
            except OSError:
                log.warning("spool %s: no lock file and the disk refuses one (%s): nothing stops a second "
                            "collector on this spool meanwhile", self.dir, exc.strerror)
                return
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.close()
            raise SpoolError(f"spool {self.dir} is in use by another collector; "
                             "give each collector its own --spool") from None

    def _open_tally(self) -> None:
        """Map the tally file; what it holds from the previous run becomes ``lost_at_crash``.

        The file's blocks are allocated (fallocate), never sparse: a store into a mapped page
        the disk cannot back would kill the process with SIGBUS. When the disk refuses the
        tally, this run counts no crash loss (logged); the old tally waits for a run that can."""
        path = self.dir / "tally"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size != 16:
                    os.ftruncate(fd, 16)
                try:
                    os.posix_fallocate(fd, 0, 16)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    os.pwrite(fd, os.pread(fd, 16, 0).ljust(16, b"\0"), 0)
                self._tally_map = mmap.mmap(fd, 16, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno not in DISK_ERRNOS and not self.degraded:
                raise SpoolError(f"spool {path}: {exc.strerror}") from None
            self._unwritable("cannot map the tally; this run cannot count what a crash would lose", exc)
            return
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

    def count_accounted(self, records: int) -> None:
        """Records that never reached a batch file but need no crash count: acked from memory, or
        dropped and counted under another reason (call from the event loop)."""
        if self.tally is not None:
            self.tally[TALLY_SPOOLED] += records

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
        reserved = self._next_seq + SEQ_BLOCK - 1
        tmp = self.dir / "state.json.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"collector_id": self.collector_id, "host_id": self.host_id,
                           "seq_reserved": reserved}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / "state.json")
            _fsync_dir(self.dir)
        except OSError:
            self._unlink(tmp)
            raise
        self._reserved = reserved
        self._fresh_id = False

    def _try_reserve(self) -> bool:
        try:
            self._reserve()
            return True
        except OSError as exc:
            self._unwritable("cannot reserve seqs in state.json", exc)
            return False

    def next_seq(self) -> int:
        """The next seq; read ``collector_id`` after it (a seq the disk cannot reserve changes it)."""
        seq = self._next_seq
        self._next_seq += 1
        if seq >= self._reserved and not self._try_reserve() and seq > self._reserved and not self._fresh_id:
            # Past the block state.json holds, and the disk refuses a new one: a later run would start
            # from that block again, under this id. A fresh identity (in memory) keeps every
            # (collector_id, seq) unique; it becomes the spool's when the disk takes state.json again.
            self.collector_id = f"{self.host_id}/{uuid.uuid4().hex[:12]}"
            self._fresh_id = True
            log.warning("spool %s: cannot reserve seqs on disk; new batches go out as collector %s",
                        self.dir, self.collector_id)
        return seq

    # -- the disk refusing -------------------------------------------------------------------
    def _unwritable(self, what: str, exc: OSError) -> None:
        """The disk refused: degrade (the caller keeps the data in memory), warn on a doubling interval."""
        first = not self.degraded
        if first or exc.errno != errno.ENOENT:  # (ENOENT: the directory the first error did not let us make)
            self.degraded = exc.strerror or str(exc)
        if first or self._warn_unwritable.due():
            log.error("spool %s: %s: %s; running from memory (at most max_unacked_rows records, the oldest "
                      "beyond that dropped and counted as drop_unacked_full), trying the disk again with every "
                      "batch (%d failed writes so far) — free space on it or fix it", self.dir, what,
                      self.degraded, self.write_errors)

    def _recovered(self) -> None:
        log.warning("spool %s: the disk takes batches again (after %d failed writes; it said: %s): "
                    "spooling again", self.dir, self.write_errors, self.degraded)
        self.degraded = ""
        self._warn_unwritable.reset()
        if self._next_seq > self._reserved:
            self._try_reserve()

    def _unlink(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            if self._warn_remove.due():
                log.warning("spool %s: cannot remove %s (%s; %d more not logged): it is sent again after a "
                            "restart, which the server's dedup makes harmless", self.dir, path.name,
                            exc.strerror, self._warn_remove.held)
                self._warn_remove.held = 0

    def _count_corrupt(self, path: Path, exc: Exception, rows: int) -> None:
        self.corrupt_files += 1
        self.corrupt_rows += rows
        if self._warn_corrupt.due():
            log.error("spool: dropping bad batch file %s (%s): %d records lost, counted as drop_spool_corrupt "
                      "(%d bad files so far)", path, exc, rows, self.corrupt_files)

    # -- batches ---------------------------------------------------------------------------
    def _path(self, seq: int) -> Path:
        return self.batches_dir / f"{seq:020d}.batch"

    @staticmethod
    def _verify(data: bytes) -> int:
        """The records a batch file holds; SpoolCorrupt when it fails a check."""
        if len(data) < HEADER.size:
            raise SpoolCorrupt("shorter than its header")
        magic, crc, rows, length = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise SpoolCorrupt("bad header")
        if length != len(data) - HEADER.size:
            raise SpoolCorrupt(f"{len(data) - HEADER.size} bytes of payload, the header says {length}", rows)
        if zlib.crc32(data[HEADER.size:]) != crc:
            raise SpoolCorrupt("checksum mismatch", rows)
        return rows

    def write(self, batch: ingest_pb2.Batch, rows: int) -> list[SpooledBatch]:
        """Store a batch durably; returns the oldest batches dropped to make room.

        Raises SpoolUnwritable (carrying those dropped) when the disk refuses: nothing of the
        attempt is left on disk, and the spool is degraded until a write succeeds."""
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
        try:
            if self.degraded:
                self.batches_dir.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(self.batches_dir)
        except OSError as exc:
            self.write_errors += 1
            self._unlink(tmp)
            self._unlink(path)  # renamed but not durable: the batch lives in memory, not twice
            self._unwritable(f"cannot write batch {batch.seq}", exc)
            self._log_full(dropped)
            raise SpoolUnwritable(f"spool {self.dir}: {exc.strerror or exc}", dropped) from None
        if self.degraded:
            self._recovered()
        self.items[batch.seq] = SpooledBatch(batch.seq, rows, len(data))
        self.bytes += len(data)
        if self.tally is not None:
            self.tally[TALLY_SPOOLED] += rows
        self._log_full(dropped)
        return dropped

    def _log_full(self, dropped: list[SpooledBatch]) -> None:
        if dropped:
            self._warn_full.dropped(sum(b.rows for b in dropped), "counted as drop_spool_full")

    def load(self, seq: int) -> ingest_pb2.Batch:
        """Read a batch back, checked: OSError when the disk cannot, SpoolCorrupt when the file is bad."""
        data = self._path(seq).read_bytes()
        self._verify(data)
        batch = ingest_pb2.Batch()
        try:
            batch.ParseFromString(data[HEADER.size:])
        except Exception as exc:  # protobuf's DecodeError is no ValueError
            raise SpoolCorrupt(f"does not parse: {exc}") from None
        if batch.seq != seq:
            raise SpoolCorrupt(f"holds seq {batch.seq}")
        return batch

    def discard_corrupt(self, seq: int, exc: Exception) -> None:
        """A batch that failed its checks on reading back: count its records (drop_spool_corrupt), remove it."""
        item = self.items.get(seq)
        self._count_corrupt(self._path(seq), exc, item.rows if item else getattr(exc, "rows", 0))
        self.remove(seq)

    def remove(self, seq: int) -> None:
        item = self.items.pop(seq, None)
        if item is not None:
            self.bytes -= item.nbytes
            self._unlink(self._path(seq))


class Outbox:
    """Batches waiting for their ack, oldest first.

    Without a spool the batches live in memory, at most ``max_rows`` records; beyond
    that the oldest are dropped (``memory_dropped_rows``, drop_unacked_full). With a
    spool (``hdrlog.collector.spool``) every batch is on disk before it is offered to
    the sender, the spool's byte limit decides what is dropped (the oldest), and memory
    holds only the bodies of at most ``CACHED_BATCHES`` batches not yet sent: a resend,
    or a backlog built while the server was away, is read back from disk one batch at a
    time, checked; a bad file is skipped and counted (drop_spool_corrupt).

    When the spool's disk refuses a batch (full, read-only, failing) the batch is kept
    in memory instead, under the same ``max_rows`` bound as without a spool, and every
    later batch tries the disk again: the first that succeeds writes the batches memory
    held (oldest first) to disk too, and the outbox is back to spooling.
    """

    CACHED_BATCHES = 8

    def __init__(self, max_rows: int, spool=None):
        self.max_rows = max_rows
        self.spool = spool
        # seq -> (body or None when only on disk, rows, on disk)
        self._items: OrderedDict[int, tuple[ingest_pb2.Batch | None, int, bool]] = OrderedDict()
        self._cached = 0  # bodies in memory of batches also on disk
        self._memory_rows = 0  # records of batches held in memory only
        self.rows = 0
        self.memory_dropped_rows = 0  # dropped because memory was full (drop_unacked_full)
        self.unreadable_rows = 0  # spooled batches that could not be read back (disk trouble)
        self.last_dropped: list[int] = []  # seqs the last put() dropped to make room
        self.discarded: list[int] = []  # seqs get() dropped (bad or unreadable file), until the owner clears it
        self.changed = asyncio.Event()
        self._warn_memory = DropWarning(log, f"outbox memory full (max_unacked_rows={max_rows}), oldest batches",
                                        "fix the spool's disk or raise max_unacked_rows", level=logging.ERROR)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def memory_rows(self) -> int:
        """Records of batches held in memory only (the spool's disk refused them)."""
        return self._memory_rows

    def restore(self, spooled) -> None:
        """Batches an earlier run left in the spool, sent first (they have the lowest seqs)."""
        for b in spooled:
            self._items[b.seq] = (None, b.rows, True)
            self.rows += b.rows
        self.changed.set()

    def put(self, batch: ingest_pb2.Batch, rows: int) -> int:
        """Add a batch; returns how many rows of older batches had to be dropped to fit
        (their seqs are in ``last_dropped``). Never raises for the disk's sake."""
        self.last_dropped = []
        dropped = 0
        if self.spool is not None and self._spool_memory():
            try:
                dropped += self._dropped_by_spool(self.spool.write(batch, rows))
            except SpoolUnwritable as exc:
                dropped += self._dropped_by_spool(exc.dropped)
            else:
                self._items[batch.seq] = (batch, rows, True)
                self._cached += 1
                self._uncache()
                self.rows += rows
                self.changed.set()
                return dropped
        dropped += self._make_room(rows)
        self._items[batch.seq] = (batch, rows, False)
        self._memory_rows += rows
        self.rows += rows
        self.changed.set()
        return dropped

    def _spool_memory(self) -> bool:
        """Write the batches memory holds to the spool, oldest first; True when none is left in memory."""
        if not self._memory_rows:
            return True
        for seq, (body, rows, disk) in list(self._items.items()):
            if disk or seq not in self._items:
                continue
            try:
                self._dropped_by_spool(self.spool.write(body, rows))
            except SpoolUnwritable as exc:
                self._dropped_by_spool(exc.dropped)
                return False
            if seq in self._items:
                self._items[seq] = (body, rows, True)
                self._memory_rows -= rows
                self._cached += 1
        self._uncache()
        return True

    def _dropped_by_spool(self, batches) -> int:
        """The spool removed its oldest batches to stay under its limit (drop_spool_full, counted there)."""
        n = 0
        for old in batches:
            self.last_dropped.append(old.seq)
            n += self._drop(old.seq)
        return n

    def _make_room(self, rows: int) -> int:
        """Drop the oldest batches held in memory only until ``rows`` more fit under max_rows."""
        dropped = 0
        for seq in [s for s, item in self._items.items() if not item[2]]:
            if self._memory_rows + rows <= self.max_rows:
                break
            self.last_dropped.append(seq)
            n = self._drop(seq)
            dropped += n
        if dropped:
            self.memory_dropped_rows += dropped
            if self.spool is not None:
                self.spool.count_accounted(dropped)
                self._warn_memory.dropped(dropped, f"spool {self.spool.dir} unwritable ({self.spool.degraded}); "
                                                   "counted as drop_unacked_full")
        return dropped

    def _uncache(self) -> None:
        while self._cached > self.CACHED_BATCHES:
            for seq, (body, r, disk) in self._items.items():  # uncache the oldest cached body
                if body is not None and disk:
                    self._items[seq] = (None, r, True)
                    self._cached -= 1
                    break

    def _drop(self, seq: int) -> int:
        item = self._items.pop(seq, None)
        if item is None:
            return 0
        body, rows, disk = item
        if body is not None and disk and self.spool is not None:
            self._cached -= 1
        if not disk:
            self._memory_rows -= rows
        self.rows -= rows
        return rows

    def pop(self, seq: int) -> int | None:
        """The batch was acked (or rejected): forget it, on disk too."""
        item = self._items.get(seq)
        if item is None:
            return None
        rows = self._drop(seq)
        if self.spool is not None:
            if item[2]:
                self.spool.remove(seq)
            else:
                self.spool.count_accounted(rows)
        self.changed.set()
        return rows

    def __contains__(self, seq: int) -> bool:
        return seq in self._items

    def seqs_after(self, seq: int) -> list[int]:
        return [s for s in self._items if s > seq]

    def get(self, seq: int) -> tuple[ingest_pb2.Batch, int] | None:
        """The batch to send, read back from the spool when it is not in memory; None when gone
        (acked, dropped, or its file unreadable or bad: counted, and the rest goes on)."""
        item = self._items.get(seq)
        if item is None:
            return None
        body, rows, disk = item
        if body is not None:
            if self.spool is not None and disk:  # sent once: from now on it lives on disk only
                self._items[seq] = (None, rows, True)
                self._cached -= 1
            return body, rows
        try:
            return self.spool.load(seq), rows
        except SpoolCorrupt as exc:
            self._drop(seq)
            self.spool.discard_corrupt(seq, exc)
            self.discarded.append(seq)
        except OSError as exc:
            log.error("spool: cannot read back batch %d (%s); %d records lost, counted as drop_spool_unreadable",
                      seq, exc, rows)
            self._drop(seq)
            self.spool.remove(seq)
            self.unreadable_rows += rows
            self.discarded.append(seq)
        self.changed.set()
        return None

    def after(self, seq: int) -> list[tuple[int, ingest_pb2.Batch, int]]:
        """Unacked batches with a seq above ``seq``, in order (bodies read from the spool if needed)."""
        out = []
        for s in self.seqs_after(seq):
            got = self.get(s)
            if got is not None:
                out.append((s, got[0], got[1]))
        return out
