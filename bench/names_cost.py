"""Collector CPU of issue 14's names and fingerprints, per 100k packets/s, beside the baseline in the same run.

The user-space decode path alone (``records.decode``, what ``Capture.poll`` runs per ring-buffer
read), on a mix of 100k records of which a share carry payloads as the kernel copies them:
DNS queries and their responses (with answers), TLS ClientHellos (Python's ssl), QUIC client
Initials (aioquic) and the rest bare TCP headers. Rows:

* baseline: the decode of the DNS and TLS payloads (QUIC rows left out) without ``names_state``
  -- it already includes JA4 and the DNS answers, whose share the JA4 row gives;
* + names: the same records with ``names_state`` (rtt matching, passive DNS, connection names);
* + JA4 per hello, + QUIC per Initial: the per-packet cost of those decoders, scaled to the
  share of hellos / Initials in the mix.

CPU seconds per 100k records = share of one core at 100k packets/s. Run:
``.venv/bin/python -m bench.names_cost``.
"""

from __future__ import annotations

import ssl
import time

import numpy as np
from scapy.all import DNS, DNSQR, DNSRR

from hdrlog.collector import ja4, quic, records
from hdrlog.collector.names import Names

N = 100_000
SHARE_DNS, SHARE_TLS, SHARE_QUIC = 0.02, 0.01, 0.005  # of all records, each


def _v16(a: int) -> bytes:
    return b"\0" * 10 + b"\xff\xff" + bytes([198, 18, a >> 8 & 0xFF, a & 0xFF])


def _hello() -> bytes:
    ctx = ssl.create_default_context()
    out, inc = ssl.MemoryBIO(), ssl.MemoryBIO()
    s = ctx.wrap_bio(inc, out, server_hostname="bench.example.org")
    try:
        s.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def _initial() -> bytes:
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    c = QuicConnection(configuration=QuicConfiguration(is_client=True, server_name="q.example.org", alpn_protocols=["h3"]))
    c.connect(("198.18.0.1", 443), now=time.time())
    return c.datagrams_to_send(now=time.time())[0][0]


def mix(quic_rows: bool) -> tuple[bytes, list[tuple[int, bytes]]]:
    rec = np.zeros(N, records.RECORD_DTYPE)
    rec["ifindex"], rec["ip_version"], rec["ip_proto"], rec["direction"] = 7, 4, 6, 1
    rec["mono_ns"] = np.arange(N, dtype=np.uint64) * 10_000
    rec["src_port"], rec["dst_port"] = 40000 + np.arange(N) % 20000, 443
    for i in range(N):
        rec[i]["src_ip"], rec[i]["dst_ip"] = _v16(i % 4000), _v16(60000)
    payloads: list[tuple[int, bytes]] = []
    hello, initial = _hello(), _initial()
    rng = np.random.default_rng(1)
    kinds = rng.random(N)
    for i in range(N):
        k = kinds[i]
        if k < SHARE_DNS:
            qid = i & 0xFFFF
            name = f"h{i % 500}.example.org"
            if i % 2 == 0:
                rec[i]["ip_proto"], rec[i]["src_port"], rec[i]["dst_port"] = 17, 33000 + i % 1000, 53
                payloads.append((i, bytes(DNS(id=qid, rd=1, qd=DNSQR(qname=name)))))
            else:
                rec[i]["ip_proto"], rec[i]["src_port"], rec[i]["dst_port"] = 17, 53, 33000 + (i - 1) % 1000
                rec[i]["src_ip"], rec[i]["dst_ip"] = rec[i]["dst_ip"], rec[i]["src_ip"]
                payloads.append((i, bytes(DNS(id=(i - 1) & 0xFFFF, qr=1, rd=1, ra=1, qd=DNSQR(qname=name), ancount=1,
                                              an=[DNSRR(rrname=name, ttl=300, rdata="198.18.3.4")]))))
        elif k < SHARE_DNS + SHARE_TLS:
            payloads.append((i, hello))
        elif k < SHARE_DNS + SHARE_TLS + SHARE_QUIC and quic_rows:
            rec[i]["ip_proto"] = 17
            payloads.append((i, initial))
    return rec.tobytes(), payloads


def _cpu(fn, rounds: int = 5) -> float:
    best = []
    for _ in range(rounds):
        t0 = time.process_time()
        fn()
        best.append(time.process_time() - t0)
    return sorted(best)[len(best) // 2]


def run() -> list[dict]:
    raw0, p0 = mix(quic_rows=False)
    raw1, p1 = mix(quic_rows=True)
    base = _cpu(lambda: records.decode(raw0, N, {7: "eth0"}, 0, payloads=p0))
    with_names = _cpu(lambda: records.decode(raw1, N, {7: "eth0"}, 0, payloads=p1, names_state=Names()))
    hello, initial = _hello(), _initial()
    k = 2000
    per_ja4 = _cpu(lambda: [ja4.ja4_of_record(hello) for _ in range(k)]) / k
    per_quic = _cpu(lambda: [quic.hello_of(quic.parse_initial(initial).crypto) for _ in range(k)]) / k
    rows = [
        {"figure": "decode per 100k records, baseline (DNS+TLS payloads incl. JA4 and answers, no names, no QUIC)", "value": f"{base * 100:.1f}% of a core",
         "ratio": "1.00x"},
        {"figure": "decode per 100k records, + names state and QUIC Initials", "value": f"{with_names * 100:.1f}% of a core",
         "ratio": f"{with_names / base:.2f}x"},
        {"figure": f"JA4 of one ClientHello ({SHARE_TLS:.1%} of the mix)", "value": f"{per_ja4 * 1e6:.1f} us",
         "ratio": f"{per_ja4 * SHARE_TLS * N / base:.3f} of baseline"},
        {"figure": f"QUIC Initial decrypt + CRYPTO ({SHARE_QUIC:.1%} of the mix)", "value": f"{per_quic * 1e6:.1f} us",
         "ratio": f"{per_quic * SHARE_QUIC * N / base:.3f} of baseline"},
    ]
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
