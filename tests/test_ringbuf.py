"""The bulk ring-buffer reader (collector/ringbuf.py) against a real BPF program.

A tiny socket-filter program on a loopback UDP socket of the test writes one
numbered record per datagram (and drops the datagram) into a small ring buffer, so the test
decides exactly what the kernel produces: bursts that wrap around the ring,
discarded records, records of another size, a full ring. The reader must hand
back exactly the submitted records, in order, and BCC's own callback consumer
must agree.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="eBPF needs root")

RECORD = 112
PAGES = 4  # 16 KiB: 136 slots of 120 bytes, so wrap-around comes quickly

PROG = r"""
struct rec { u64 seq; u64 tgid; u8 fill[%(fill)d]; };
struct odd { u64 seq; u64 tgid; };
struct longer { struct rec r; u8 tail[40]; };
BPF_RINGBUF_OUTPUT(rb, %(pages)d);
/* Key: 0 a tag copied into records, 1 mode (0 submit, 1 discard every 3rd, 2 an odd-size record
 * after every 5th, 3 every 4th record carries a 40-byte tail), 2 next seq, 3 records dropped because the ring was full. */
BPF_ARRAY(ctl, u64, 4);

int on_datagram(struct __sk_buff *skb)
{
    u32 k0 = 0, k1 = 1, k2 = 2, k3 = 3;
    u64 *tgid = ctl.lookup(&k0), *mode = ctl.lookup(&k1), *seq = ctl.lookup(&k2), *full = ctl.lookup(&k3);
    if (!tgid || !mode || !seq || !full)
        return 0;
    u64 s = __sync_fetch_and_add(seq, 1);
    if (*mode == 3 && s %% 4 == 1) {
        struct longer *l = rb.ringbuf_reserve(sizeof(struct longer));
        if (!l) {
            __sync_fetch_and_add(full, 1);
            return 0;
        }
        l->r.seq = s;
        l->r.tgid = *tgid;
        __builtin_memset(l->r.fill, (u8)s, sizeof(l->r.fill));
        __builtin_memset(l->tail, (u8)(s + 1), sizeof(l->tail));
        rb.ringbuf_submit(l, 0);
        return 0;
    }
    struct rec *r = rb.ringbuf_reserve(sizeof(struct rec));
    if (!r) {
        __sync_fetch_and_add(full, 1);
        return 0;
    }
    r->seq = s;
    r->tgid = *tgid;
    __builtin_memset(r->fill, (u8)s, sizeof(r->fill));
    if (*mode == 1 && s %% 3 == 2) {
        rb.ringbuf_discard(r, 0);
        return 0;
    }
    rb.ringbuf_submit(r, 0);
    if (*mode == 2 && s %% 5 == 4) {
        struct odd *o = rb.ringbuf_reserve(sizeof(struct odd));
        if (o) {
            o->seq = s;
            o->tgid = 0;
            rb.ringbuf_submit(o, 0);
        }
    }
    return 0;
}
"""

DTYPE = np.dtype([("seq", "<u8"), ("tgid", "<u8"), ("fill", "u1", (RECORD - 16,))])


SO_ATTACH_BPF = 50
_sock: dict[str, socket.socket] = {}


@pytest.fixture
def prog():
    from bcc import BPF

    bpf = BPF(text=(PROG % {"fill": RECORD - 16, "pages": PAGES}).encode())
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        ctl = bpf[b"ctl"]
        ctl[ctl.Key(0)] = ctl.Leaf(os.getpid())
        fn = bpf.load_func(b"on_datagram", BPF.SOCKET_FILTER)
        rx.bind(("127.0.0.1", 0))
        rx.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, fn.fd)
        tx.connect(rx.getsockname())
        _sock["tx"] = tx
        yield bpf
    finally:
        _sock.clear()
        tx.close()
        rx.close()
        bpf.cleanup()


def set_mode(bpf, mode: int) -> None:
    ctl = bpf[b"ctl"]
    ctl[ctl.Key(1)] = ctl.Leaf(mode)


def ctl_value(bpf, key: int) -> int:
    ctl = bpf[b"ctl"]
    return ctl[ctl.Key(key)].value


def produce(n: int) -> None:
    """n datagrams to the filtered socket: n program runs (the filter drops them)."""
    tx = _sock["tx"]
    for _ in range(n):
        tx.send(b"x")


def reader_of(bpf):
    from hdrlog.collector.ringbuf import RingBufReader

    return RingBufReader(bpf[b"rb"].map_fd, RECORD)


def drain(reader, timeout_ms: int = 0, tails: list | None = None) -> np.ndarray:
    got = []
    base = 0
    while True:
        buf, n, t = reader.read(timeout_ms)
        if not n:
            break
        assert len(buf) == n * RECORD
        got.append(np.frombuffer(buf, DTYPE, count=n).copy())
        if tails is not None:
            tails.extend((base + i, b) for i, b in t)
        else:
            assert not t
        base += n
        timeout_ms = 0
    return np.concatenate(got) if got else np.zeros(0, DTYPE)


def check_records(recs: np.ndarray, seqs) -> None:
    assert recs["seq"].tolist() == list(seqs)
    assert (recs["tgid"] == os.getpid()).all()
    assert (recs["fill"] == (recs["seq"] & 0xFF).astype(np.uint8)[:, None]).all(), "record bodies are torn"


def test_reads_every_record_in_order_across_wraparounds(prog):
    reader = reader_of(prog)
    assert reader.size == PAGES * 4096
    assert reader.slot == 120
    try:
        seq = 0
        for burst in (1, 10, 100, 135, 7, 136, 50, 99, 136, 1):  # 136 slots: a full ring, never more
            produce(burst)
            recs = drain(reader)
            check_records(recs, range(seq, seq + burst))
            seq += burst
        assert reader.pending_bytes() == 0
        assert ctl_value(prog, 3) == 0
        assert reader.odd == 0 and reader.discarded == 0
    finally:
        reader.close()


def test_full_ring_drops_are_the_programs_and_reader_recovers(prog):
    reader = reader_of(prog)
    try:
        produce(1000)
        recs = drain(reader)
        dropped = ctl_value(prog, 3)
        assert len(recs) + dropped == 1000
        assert 100 <= len(recs) <= 136  # what fits in 16 KiB
        check_records(recs, range(len(recs)))
        produce(20)  # space is back once the reader has moved consumer_pos
        check_records(drain(reader), range(1000, 1020))
    finally:
        reader.close()


def test_discards_interleaved_with_reads(prog):
    set_mode(prog, 1)
    reader = reader_of(prog)
    try:
        seqs: list[int] = []
        for _ in range(20):
            produce(60)
            seqs.extend(drain(reader)["seq"].tolist())
        assert seqs == [s for s in range(1200) if s % 3 != 2]
        assert reader.discarded == 400
        assert ctl_value(prog, 3) == 0
    finally:
        reader.close()


def test_records_of_another_size_are_stepped_over_and_counted(prog):
    set_mode(prog, 2)
    reader = reader_of(prog)
    try:
        seqs: list[int] = []
        for _ in range(10):
            produce(50)
            recs = drain(reader)
            check_records(recs, recs["seq"].tolist())
            seqs.extend(recs["seq"].tolist())
        assert seqs == list(range(500))
        assert reader.odd == 100
    finally:
        reader.close()


def test_longer_records_come_with_their_tails_apart(prog):
    set_mode(prog, 3)
    reader = reader_of(prog)
    try:
        seqs: list[int] = []
        for _ in range(10):
            produce(100)
            tails: list = []
            recs = drain(reader, tails=tails)
            check_records(recs, recs["seq"].tolist())
            by_index = dict(tails)
            for i, s in enumerate(recs["seq"].tolist()):
                if s % 4 == 1:
                    assert by_index.pop(i) == bytes([(s + 1) & 0xFF]) * 40
            assert not by_index
            seqs.extend(recs["seq"].tolist())
        assert seqs == list(range(1000))
        assert reader.odd == 0 and ctl_value(prog, 3) == 0
    finally:
        reader.close()


def test_epoll_wakes_a_waiting_reader(prog):
    reader = reader_of(prog)
    try:
        out = {}

        def wait():
            t = time.monotonic()
            out["n"] = reader.read(5000)[1]
            out["waited"] = time.monotonic() - t

        th = threading.Thread(target=wait)
        th.start()
        time.sleep(0.2)
        produce(1)
        th.join(6)
        assert out["n"] == 1
        assert 0.15 < out["waited"] < 2.0
        t = time.monotonic()
        assert reader.read(100)[1] == 0
        assert time.monotonic() - t >= 0.09  # an empty ring waits the timeout
    finally:
        reader.close()


def test_agrees_with_bccs_callback_consumer(prog):
    import ctypes

    seen: list[bytes] = []
    prog[b"rb"].open_ring_buffer(lambda _c, data, size: seen.append(ctypes.string_at(data, size)) or 0)
    produce(77)
    prog.ring_buffer_consume()
    assert len(seen) == 77
    reader = reader_of(prog)  # the callback consumer moved consumer_pos: we start from there
    try:
        produce(77)
        ours = drain(reader)
        check_records(ours, range(77, 154))
        theirs = np.frombuffer(b"".join(seen), DTYPE)
        check_records(theirs, range(77))
        assert (ours["fill"][:, 0] - theirs["fill"][:, 0] == 77).all()
    finally:
        reader.close()
