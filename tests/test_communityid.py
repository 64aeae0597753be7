"""Community ID v1 (collector/communityid.py) against Corelight's reference implementation
(PyPI ``communityid``) and the spec's published vectors (corelight/community-id-spec:
the README's tables and ``baseline/`` outputs for ``pcaps/combined.pcap.gz``, copied
into tests/data/communityid with the spec's licence)."""

from __future__ import annotations

import gzip
import io
import ipaddress
import json
from pathlib import Path

import communityid as ref
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hdrlog.collector.communityid import addr16, community_id, community_ids

DATA = Path(__file__).parent / "data" / "communityid"
A6 = "fe80:0001:0203:0405:0607:0809:0A0B:0C0D"
B6 = "fe80:1011:1213:1415:1617:1819:1A1B:1C1D"

# The spec README's tables: (proto, saddr, daddr, sport, dport, id seed 0, id seed 1).
SPEC_TABLE = [
    (6, "1.2.3.4", "5.6.7.8", 1122, 3344, "1:wCb3OG7yAFWelaUydu0D+125CLM=", "1:HhA1B+6CoLbiKPEs5nhNYN4XWfk="),
    (6, "5.6.7.8", "1.2.3.4", 3344, 1122, "1:wCb3OG7yAFWelaUydu0D+125CLM=", "1:HhA1B+6CoLbiKPEs5nhNYN4XWfk="),
    (17, "1.2.3.4", "5.6.7.8", 1122, 3344, "1:0Mu9InQx6z4ZiCZM/7HXi2WMhOg=", "1:OShq+iKDAMVouh/4bMxB9Sz4amw="),
    (17, "5.6.7.8", "1.2.3.4", 3344, 1122, "1:0Mu9InQx6z4ZiCZM/7HXi2WMhOg=", "1:OShq+iKDAMVouh/4bMxB9Sz4amw="),
    (132, "1.2.3.4", "5.6.7.8", 1122, 3344, "1:EKt4MsxuyaE6mL+hmrEkQ9csDD8=", "1:uitchpn5MMGAQKBJh7bIr/bAr7s="),
    (132, "5.6.7.8", "1.2.3.4", 3344, 1122, "1:EKt4MsxuyaE6mL+hmrEkQ9csDD8=", "1:uitchpn5MMGAQKBJh7bIr/bAr7s="),
    (1, "1.2.3.4", "5.6.7.8", 8, 0, "1:crodRHL2FEsHjbv3UkRrfbs4bZ0=", "1:9pr4ZGTICiuZoIh90RRYE2RyXpU="),
    (1, "5.6.7.8", "1.2.3.4", 0, 0, "1:crodRHL2FEsHjbv3UkRrfbs4bZ0=", "1:9pr4ZGTICiuZoIh90RRYE2RyXpU="),
    (1, "1.2.3.4", "5.6.7.8", 11, 0, "1:f/YiSyWqczrTgfUCZlBUnvHRcPk=", "1:1DD7cWGC/Yg91YGsQeni8du3pIA="),
    (58, A6, B6, 128, 0, "1:0bf7hyMJUwt3fMED7z8LIfRpBeo=", "1:IO27GQzPuCtNnwFvjWALMHu5tJE="),
    (58, B6, A6, 129, 0, "1:0bf7hyMJUwt3fMED7z8LIfRpBeo=", "1:IO27GQzPuCtNnwFvjWALMHu5tJE="),
    (58, A6, B6, 146, 0, "1:fYC8+pz24E+EhANP1EZhpX0Dw10=", "1:Cv4IKJe56BNkF0MBW2YxQ3Nwc3s="),
    (46, "1.2.3.4", "5.6.7.8", 0, 0, "1:ikv3kmf89luf73WPz1jOs49S768=", "1:/buhqeOmaRCopOZFy9HnoJd5XW8="),
    (46, "5.6.7.8", "1.2.3.4", 0, 0, "1:ikv3kmf89luf73WPz1jOs49S768=", "1:/buhqeOmaRCopOZFy9HnoJd5XW8="),
    (46, A6, B6, 0, 0, "1:wQ/2mwrnXP4lmJcHdGL5ePjR+e0=", "1:j6EyyfBzL4vWKHFXgUqb5Az3OxM="),
    (46, B6, A6, 0, 0, "1:wQ/2mwrnXP4lmJcHdGL5ePjR+e0=", "1:j6EyyfBzL4vWKHFXgUqb5Az3OxM="),
]


def reference(proto, saddr, daddr, sport, dport, seed=0) -> str:
    """Corelight's pycommunityid for the same tuple (ICMP: type and code in the ports)."""
    if proto in ref.PORT_PROTOS:
        tpl = ref.FlowTuple(proto, saddr, daddr, sport, dport)
    else:
        tpl = ref.FlowTuple.make_ip(saddr, daddr, proto)
    return ref.CommunityID(seed=seed).calc(tpl)


def batch(rows, seed=0, **kw) -> list[str]:
    """community_ids over rows of (proto, saddr, daddr, sport, dport) given as text addresses."""
    proto, s, d, sp, dp = zip(*rows)
    return community_ids(np.array(proto, np.uint8), [addr16(a) for a in s], [addr16(a) for a in d],
                         np.array(sp, np.uint16), np.array(dp, np.uint16), seed=seed, **kw)


@pytest.mark.parametrize("row", SPEC_TABLE, ids=lambda r: f"{r[0]}-{r[1]}-{r[3]}")
def test_spec_table(row):
    proto, s, d, sp, dp, id0, id1 = row
    assert community_id(proto, s, d, sp, dp) == id0 == reference(proto, s, d, sp, dp)
    assert community_id(proto, s, d, sp, dp, seed=1) == id1 == reference(proto, s, d, sp, dp, seed=1)


def test_spec_table_batched():
    rows = [r[:5] for r in SPEC_TABLE]
    assert batch(rows) == [r[5] for r in SPEC_TABLE]
    assert batch(rows, seed=1) == [r[6] for r in SPEC_TABLE]


def _pcap_tuples() -> list[tuple]:
    """(proto, saddr, daddr, sport, dport) of every IP packet of the spec's combined.pcap."""
    from scapy.all import ICMP, IP, SCTP, TCP, UDP, IPv6, rdpcap

    out = []
    for p in rdpcap(io.BytesIO(gzip.decompress((DATA / "combined.pcap.gz").read_bytes()))):
        ip = p[IP] if IP in p else p[IPv6] if IPv6 in p else None
        if ip is None:
            continue  # ARP
        proto = ip.proto if IP in p else ip.nh
        l4 = ip.payload
        if isinstance(l4, (TCP, UDP, SCTP)):
            sp, dp = l4.sport, l4.dport
        elif proto in (1, 58):  # ICMP/ICMPv6: the first two bytes are type and code
            raw = bytes(l4)
            sp, dp = raw[0], raw[1]
        else:
            sp = dp = 0
        assert not isinstance(l4, ICMP) or proto == 1
        out.append((proto, ip.src, ip.dst, sp, dp))
    return out


@pytest.mark.parametrize("seed,name", [(0, "baseline_deflt.json"), (1, "baseline_seed1.json")])
def test_spec_baseline_pcap(seed, name):
    """Every IP packet of the spec's capture gets the id the spec's baseline gives its tuple
    (the baseline lists each distinct tuple once, ICMP types already mapped to ports)."""
    from hdrlog.collector.communityid import icmp_ports

    base = {(e["proto"], e["saddr"], e["daddr"], e["sport"] or 0, e["dport"] or 0): e["communityid"]
            for e in json.loads((DATA / name).read_text())}
    tuples = _pcap_tuples()
    assert len(tuples) == 62
    ids = [community_id(*t, seed=seed) for t in tuples]
    assert batch(tuples, seed=seed) == ids
    seen = set()
    for (proto, s, d, sp, dp), cid in zip(tuples, ids):
        key_ports = icmp_ports(proto, sp, dp)[:2] if proto in (1, 58) else (sp, dp)
        key = (proto, s, d, *key_ports)
        assert base[key] == cid, key
        assert reference(proto, s, d, sp, dp, seed) == cid
        seen.add(key)
    assert seen == set(base)


# -- against the reference, case by case -------------------------------------------

V4A, V4B, V6A, V6B = "198.18.1.1", "198.18.1.2", "2001:db8:1::1", "2001:db8:1::2"

CASES = {
    "tcp4": (6, V4A, V4B, 40000, 80), "tcp4-back": (6, V4B, V4A, 80, 40000),
    "tcp6": (6, V6A, V6B, 40000, 443), "tcp6-back": (6, V6B, V6A, 443, 40000),
    "udp4": (17, V4A, V4B, 5353, 53), "udp6": (17, V6B, V6A, 53, 5353),
    "sctp4": (132, V4A, V4B, 7, 7), "sctp6": (132, V6A, V6B, 36412, 38412),
    "tcp-same-addr": (6, V4A, V4A, 9000, 22), "tcp-same-addr6": (6, V6A, V6A, 22, 9000),
    "gre4": (47, V4B, V4A, 0, 0), "gre6": (47, V6A, V6B, 0, 0), "esp4": (50, V4A, V4B, 0, 0),
    "icmp-dest-unreach": (1, V4B, V4A, 3, 3), "icmp-time-exceeded": (1, V4B, V4A, 11, 0),
    "icmp-timestamp": (1, V4A, V4B, 13, 0), "icmp-timestamp-reply": (1, V4B, V4A, 14, 0),
    "icmp6-dest-unreach": (58, V6B, V6A, 1, 4), "icmp6-packet-too-big": (58, V6B, V6A, 2, 0),
    "icmp6-mld-query": (58, V6A, V6B, 130, 0), "icmp6-mld-report": (58, V6B, V6A, 131, 0),
    "icmp6-mldv2-report": (58, V6B, "ff02::16", 143, 0),
}


@pytest.mark.parametrize("name", CASES)
def test_against_reference(name):
    t = CASES[name]
    assert community_id(*t) == reference(*t)
    assert batch([t]) == [reference(*t)]


@pytest.mark.parametrize("fam", [(V4A, V4B), (V6A, V6B)], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("proto,req,rep", [(1, 8, 0), (1, 10, 9), (58, 128, 129), (58, 133, 134),
                                           (58, 135, 136), (58, 139, 140)],
                         ids=["icmp-echo", "icmp-router", "icmp6-echo", "icmp6-router", "icmp6-neighbor",
                              "icmp6-nodeinfo"])
def test_icmp_request_reply_pairs(proto, req, rep, fam):
    """A request and its reply, each way, hash alike (and as the reference does)."""
    a, b = fam
    there, back = (proto, a, b, req, 0), (proto, b, a, rep, 0)
    assert community_id(*there) == community_id(*back) == reference(*there) == reference(*back)
    assert batch([there, back]) == [community_id(*there)] * 2


def test_icmp_one_way_is_not_reordered():
    """Time exceeded from the bigger address: hashed as sent, so the opposite direction differs."""
    there, back = (1, V4B, V4A, 11, 0), (1, V4A, V4B, 11, 0)
    assert community_id(*there) != community_id(*back)
    assert batch([there, back]) == [reference(*there), reference(*back)]


def test_address_forms_agree():
    want = community_id(6, V4A, V4B, 1, 2)
    assert community_id(6, ipaddress.ip_address(V4A).packed, ipaddress.ip_address(V4B), 1, 2) == want
    assert community_id(6, addr16(V4A), addr16(V4B), 1, 2) == want  # IPv4-mapped 16 bytes
    assert community_id(6, f"::ffff:{V4A}", f"::ffff:{V4B}", 1, 2) == want


def test_batched_address_forms_and_ip_version():
    rows = [(6, V4A, V4B, 1, 2), (17, V6A, V6B, 3, 4)]
    want = batch(rows)
    s = np.frombuffer(addr16(V4A) + addr16(V6A), np.uint8).reshape(2, 16)
    d = np.frombuffer(addr16(V4B) + addr16(V6B), np.uint8).reshape(2, 16)
    assert community_ids([6, 17], s, d, [1, 3], [2, 4]) == want
    assert community_ids([6, 17], s.view("S16").ravel(), d.view("S16").ravel(), [1, 3], [2, 4]) == want
    assert community_ids([6, 17], s.view(np.uint64), d.view(np.uint64), [1, 3], [2, 4]) == want
    assert community_ids([6, 17], s, d, [1, 3], [2, 4], ip_version=[4, 6]) == want
    # told it is IPv6, a mapped address hashes as 16 bytes, as pycommunityid does for "::ffff:..."
    v6 = community_ids([6], s[:1], d[:1], [1], [2], ip_version=[6])
    assert v6 == [ref.CommunityID().calc(ref.FlowTuple(6, addr16(V4A), addr16(V4B), 1, 2))]
    assert v6 != want[:1]
    assert community_ids([], np.zeros((0, 16), np.uint8), np.zeros((0, 16), np.uint8), [], []) == []


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="different families"):
        community_id(6, V4A, V6A, 1, 2)
    with pytest.raises(ValueError, match="seed"):
        community_id(6, V4A, V4B, 1, 2, seed=70000)
    with pytest.raises(ValueError, match="3 bytes"):
        community_id(6, b"\x01\x02\x03", V4B, 1, 2)
    with pytest.raises(ValueError, match="different families"):
        batch([(6, V4A, V6A, 1, 2)])
    with pytest.raises(ValueError, match="lengths"):
        community_ids([6, 6], [addr16(V4A)] * 2, [addr16(V4B)] * 2, [1], [2, 3])


# -- generated tuples ---------------------------------------------------------------

PROTOS = st.one_of(st.sampled_from([1, 6, 17, 58, 132, 47, 46, 50, 0, 255]), st.integers(0, 255))
V4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
V6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n))).filter(
    lambda a: ipaddress.IPv6Address(a).ipv4_mapped is None)
# small pools too, so that equal addresses (the port tie-break) come up often
V4S = st.one_of(V4, st.sampled_from([V4A, V4B]))
V6S = st.one_of(V6, st.sampled_from([V6A, V6B]))


@st.composite
def tuples(draw):
    proto = draw(PROTOS)
    addrs = draw(st.sampled_from([V4S, V6S]))
    s, d = draw(addrs), draw(addrs)
    hi = 255 if proto in (1, 58) else 65535  # ICMP type and code are one byte
    sp = draw(st.one_of(st.integers(0, hi), st.sampled_from([0, 8, 128, 135, 136, 133]))) if hi == 255 \
        else draw(st.integers(0, hi))
    dp = draw(st.integers(0, hi))
    if proto not in ref.PORT_PROTOS:
        sp = dp = 0
    return proto, s, d, sp, dp


@settings(max_examples=400, deadline=None)
@given(t=tuples(), seed=st.one_of(st.just(0), st.integers(0, 65535)))
def test_generated_tuples_match_reference(t, seed):
    want = reference(*t, seed=seed)
    assert community_id(*t, seed=seed) == want
    p, s, d, sp, dp = t
    assert community_id(p, d, s, dp, sp, seed=seed) == reference(p, d, s, dp, sp, seed=seed)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(tuples(), min_size=1, max_size=80), seed=st.integers(0, 65535))
def test_generated_batches_match_reference(rows, seed):
    assert batch(rows, seed=seed) == [reference(*t, seed=seed) for t in rows]
