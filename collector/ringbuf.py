"""Bulk consumer of a BPF ring buffer: no Python call per record.

BCC's ``open_ring_buffer`` calls back into Python once per record (about 4 µs
each here). This reader maps the ring buffer into the process the way libbpf
does and walks it with numpy instead:

* the map fd at offset 0 maps one read-write page whose first u64 is
  ``consumer_pos``; at offset PAGE one read-only page whose first u64 is
  ``producer_pos``, followed by the data area (``max_entries`` bytes) mapped
  twice in a row, so a run of records that wraps around the end is still
  contiguous in our mapping;
* every record starts with an 8-byte header: u32 ``len`` carrying
  ``BPF_RINGBUF_BUSY_BIT`` (reserved, not yet submitted) and
  ``BPF_RINGBUF_DISCARD_BIT`` (discarded), then u32 ``pg_off``; the next record
  starts at the 8-byte-aligned end of this one;
* the kernel writes a record's header before it publishes ``producer_pos``
  (store-release), and clears BUSY with an atomic exchange at submit; so every
  header between ``consumer_pos`` and ``producer_pos`` is valid and the record
  behind it is complete once BUSY is clear. x86's ordered loads make the plain
  numpy reads below acquire loads.

Almost every hdrlog record is a fixed-size header (``record_size``), so runs
of records sit at a fixed stride. ``read()`` takes a strided view of the
headers of such a run, finds the first busy one (or one of another length)
with one vectorised pass, copies the record bodies before it out with one
numpy copy, drops discarded ones with a mask, and at the end advances
``consumer_pos`` with a single store. A longer record (the fixed header plus a
payload tail, bpf/types.h) goes through a short scalar path: its fixed part
joins the others, its tail is returned apart as ``(index, bytes)``. A shorter
one (none are expected) is stepped over and counted in ``odd``. Wakeups come from ``epoll`` on the map fd,
which the kernel signals (adaptive wakeup) when a record is submitted into an
empty ring. A reader that keeps up is therefore woken for nearly every record,
and one called again at once finds only the few records that came meanwhile;
so ``read()`` lets records gather: ``gather_s`` (10 ms by default) after a
wakeup, and otherwise until ``gather_s`` has passed since its last read, unless
the ring is already a quarter full. That bounds reads to about 100/s whatever
the record rate: measured with bench/collector_cpu.py, without it the per-read
overhead, not the decode, was most of the collector's CPU at 40k packets/s
(it adds at most 10 ms to a record's path; batches wait 1 s).

``CallbackReader`` is the other consumer (``reader: callback``): BCC calls back once
per record and the raw bytes are copied out, behind the same ``read(timeout_ms) ->
(bytes, count, tails)`` seam; ``open_reader()`` picks one of the two. The mmap reader
is the default (bench/consumer.py measures both).
"""

from __future__ import annotations

import ctypes
import mmap
import select
import time

import numpy as np

PAGE_SIZE = mmap.PAGESIZE
BPF_MAP_TYPE_RINGBUF = 27
BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SIZE = 8
LEN_MASK = ~(BUSY_BIT | DISCARD_BIT) & 0xFFFFFFFF
GATHER_S = 0.01  # after a wakeup, let records gather this long before reading


def map_info(map_fd: int) -> dict[str, int]:
    """map_type, max_entries, ... of a BPF map, from /proc/self/fdinfo."""
    out: dict[str, int] = {}
    with open(f"/proc/self/fdinfo/{map_fd}") as f:
        for line in f:
            key, _, value = line.partition(":")
            value = value.strip()
            if value.isdigit():
                out[key.strip()] = int(value)
    return out


class RingBufReader:
    """Reads fixed-size records from a BPF ring buffer map in bulk.

    ``read(timeout_ms)`` returns ``(buf, count, tails)``: ``buf`` is a 1-D uint8
    numpy array of ``count * record_size`` bytes (packed records, ready for
    ``np.frombuffer(buf, RECORD_DTYPE)``), or ``b""`` when nothing came within
    the timeout; ``tails`` holds ``(index, bytes)`` for records longer than
    ``record_size``. Not thread-safe: one reader thread per ring buffer.
    """

    def __init__(self, map_fd: int, record_size: int, max_records: int = 1 << 16, gather_s: float = GATHER_S):
        info = map_info(map_fd)
        if info.get("map_type") != BPF_MAP_TYPE_RINGBUF:
            raise ValueError(f"fd {map_fd} is not a BPF ring buffer map (map_type={info.get('map_type')})")
        if record_size <= 0 or record_size > 1 << 20:
            raise ValueError(f"record_size={record_size!r}: must be from 1 to 1 MiB")
        self.size = info["max_entries"]  # data area bytes, a power of two of pages
        self.record_size = record_size
        self.slot = (record_size + HDR_SIZE + 7) & ~7  # header + record, 8-byte aligned
        self.max_records = max_records
        self.gather_s = gather_s
        self._last_read = 0.0
        self.odd = 0  # records of another size, stepped over (should stay 0)
        self.discarded = 0  # records the program discarded (bpf_ringbuf_discard)
        self._mask = self.size - 1
        self._fd = map_fd
        self._cons_mm = mmap.mmap(map_fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._data_mm = mmap.mmap(map_fd, PAGE_SIZE + 2 * self.size, access=mmap.ACCESS_READ, offset=PAGE_SIZE)
        self._cons = np.frombuffer(self._cons_mm, dtype="<u8", count=1)
        self._prod = np.frombuffer(self._data_mm, dtype="<u8", count=1)
        self._data = np.frombuffer(self._data_mm, dtype=np.uint8, offset=PAGE_SIZE)
        self._data32 = np.frombuffer(self._data_mm, dtype="<u4", offset=PAGE_SIZE)
        self._ep = select.epoll()
        self._ep.register(map_fd, select.EPOLLIN)

    # -- positions -------------------------------------------------------------------------
    @property
    def consumer_pos(self) -> int:
        return int(self._cons[0])

    @property
    def producer_pos(self) -> int:
        return int(self._prod[0])

    def pending_bytes(self) -> int:
        return self.producer_pos - self.consumer_pos

    # -- reading ---------------------------------------------------------------------------
    def read(self, timeout_ms: int) -> tuple[np.ndarray | bytes, int, list[tuple[int, bytes]]]:
        """Records available now, or waiting up to ``timeout_ms`` for the first ones.

        Returns ``(fixed, count, tails)``: the first ``record_size`` bytes of
        ``count`` records packed in ``fixed`` (a 1-D uint8 array, or b"" when
        none came), and ``[(index, bytes)]`` with what longer records carry
        beyond ``record_size`` (the payload tails of bpf/types.h).
        """
        if timeout_ms == 0:
            return self._consume()
        if self.pending_bytes() == 0:
            self._ep.poll(timeout_ms / 1000 if timeout_ms > 0 else -1)
            woken = True
        else:
            woken = False
        if self.gather_s > 0 and 0 < self.pending_bytes() < self.size // 4:
            # Let a batch gather (see the top): a full interval after a wakeup, else what is left of
            # it since the last read, so a reader that keeps up still reads about 1/gather_s times a second.
            wait = self.gather_s if woken else self._last_read + self.gather_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        self._last_read = time.monotonic()
        return self._consume()

    def _consume(self) -> tuple[np.ndarray | bytes, int, list[tuple[int, bytes]]]:
        cons = int(self._cons[0])
        prod = int(self._prod[0])
        parts: list[np.ndarray] = []
        tails: list[tuple[int, bytes]] = []
        total = 0
        slot, rsize, words = self.slot, self.record_size, self.slot // 4
        window = 256  # records scanned per vector step; grows while runs are clean
        data = self._data
        while cons < prod and total < self.max_records:
            start = cons & self._mask
            n = min((prod - cons) // slot, self.max_records - total, window)
            ok = 0
            if n:
                hdr = self._data32[start // 4 : start // 4 + n * words : words].copy()
                stop = np.flatnonzero((hdr & (BUSY_BIT | LEN_MASK)) != rsize)
                ok = int(stop[0]) if stop.size else n
            if ok:
                body = data[start : start + ok * slot].reshape(ok, slot)[:, HDR_SIZE : HDR_SIZE + rsize]
                keep = (hdr[:ok] & DISCARD_BIT) == 0
                if keep.all():
                    # Always a copy: the producer reuses this space once consumer_pos moves
                    # (ascontiguousarray would hand out a view of the map for a single record).
                    parts.append(body.copy())
                    total += ok
                else:
                    kept = body[keep]
                    self.discarded += ok - len(kept)
                    parts.append(kept)
                    total += len(kept)
                cons += ok * slot
                window = min(window * 2, 1 << 16) if ok == n else max(64, ok)
                continue
            # One record that is busy, or of another size, at `start`: the scalar path.
            word = int(self._data32[start // 4])
            if word & BUSY_BIT:
                break
            length = word & LEN_MASK
            if word & DISCARD_BIT:
                self.discarded += 1
            elif length > rsize:  # a record with a tail: fixed part with the others, tail apart
                body = start + HDR_SIZE
                parts.append(data[body : body + rsize].copy())
                tails.append((total, data[body + rsize : body + length].tobytes()))
                total += 1
            else:
                self.odd += 1
            cons += (length + HDR_SIZE + 7) & ~7
            window = 64
        if cons != int(self._cons[0]):
            self._cons[0] = cons  # hand the space back to the producer
        if not total:
            return b"", 0, []
        out = parts[0] if len(parts) == 1 else np.concatenate([p.reshape(-1) for p in parts])
        return out.reshape(-1), total, tails

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        """Unmap; the map fd stays with its owner (BCC)."""
        if self._ep is None:
            return
        self._ep.close()
        self._ep = None
        del self._cons, self._prod, self._data, self._data32
        for mm in (self._cons_mm, self._data_mm):
            try:
                mm.close()
            except BufferError:  # a view is still held somewhere; unmapped when it goes
                pass



class CallbackReader:
    """Ring-buffer consumer through BCC's per-record callback: copies raw bytes out."""

    def __init__(self, bpf, map_name: str, record_size: int):
        self._bpf = bpf
        self._chunks: list[bytes] = []
        self._payloads: list[tuple[int, bytes]] = []
        self.odd = 0  # records shorter than the fixed header (should stay 0)
        chunks = self._chunks
        payloads = self._payloads
        size = record_size
        string_at = ctypes.string_at

        def on_record(_ctx, data, n):
            if n == size:
                chunks.append(string_at(data, size))
            elif n > size:
                payloads.append((len(chunks), string_at(data + size, n - size)))
                chunks.append(string_at(data, size))
            else:
                self.odd += 1
            return 0

        self._cb = on_record  # keep a reference: BCC holds only a C pointer
        bpf[map_name.encode()].open_ring_buffer(on_record)

    def read(self, timeout_ms: int) -> tuple[bytes, int, list[tuple[int, bytes]]]:
        """(fixed headers joined, how many, [(index, payload bytes)]) of what arrived."""
        self._bpf.ring_buffer_poll(timeout_ms)
        if not self._chunks:
            return b"", 0, []
        raw = b"".join(self._chunks)
        n = len(self._chunks)
        payloads = list(self._payloads)
        self._chunks.clear()
        self._payloads.clear()
        return raw, n, payloads

    def close(self) -> None:
        """Nothing to unmap: BCC owns the ring buffer's consumer."""


def open_reader(kind: str, bpf, map_name: str, record_size: int):
    """The ring-buffer consumer of this kind: "mmap" (RingBufReader) or "callback"."""
    if kind == "callback":
        return CallbackReader(bpf, map_name, record_size)
    return RingBufReader(bpf[map_name.encode()].map_fd, record_size)
