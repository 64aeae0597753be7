"""records.decode: the raw C record to registry columns, without the kernel."""

from __future__ import annotations

import numpy as np

from hdrlog.collector import records
from hdrlog.proto.columns import PACKETS


def make(n: int) -> np.ndarray:
    rec = np.zeros(n, dtype=records.RECORD_DTYPE)
    for i in range(n):
        rec[i]["mono_ns"] = 1_000 + i
        rec[i]["ifindex"] = 3 if i % 2 else 7
        rec[i]["eth_src"] = [0x02, 0x42, 0xAC, 0x11, 0x00, i]
        rec[i]["eth_dst"] = [0xFF] * 6
        rec[i]["src_ip"] = bytes(10) + b"\xff\xff" + bytes([198, 18, 0, i])
        rec[i]["tcp_flags"] = 0x1FF
        rec[i]["direction"] = 1 + i % 2
        rec[i]["parse_flags"] = records.PARSE_TRUNC_L4
    return rec


def test_layout_matches_the_c_struct():
    assert records.RECORD_SIZE == 120
    offsets = {name: records.RECORD_DTYPE.fields[name][1] for name in records.RECORD_DTYPE.names}
    # Spot checks against bpf/types.h (natural alignment, no holes).
    assert offsets["src_ip"] == 16 and offsets["eth_src"] == 48 and offsets["ip_id"] == 64
    assert offsets["frag_offset"] == 80 and offsets["parse_flags"] == 98 and offsets["direction"] == 100
    assert offsets["icmp_code"] == 110 and offsets["payload_len"] == 112 and offsets["ip_len"] == 114
    assert offsets["l4_len"] == 116 and offsets["vlan_inner_id"] == 118


def test_decode_gives_registry_columns():
    rec = make(4)
    cols = records.decode(rec.tobytes(), 4, {7: "veth0"}, mono_to_wall_ns=10**18, sample_rate=5)
    assert list(cols) == [c.name for c in PACKETS]
    for c in PACKETS:
        v = cols[c.name]
        assert len(v) == 4
        if not c.is_string:
            assert v.dtype == np.dtype(c.dtype), c.name
    assert cols["ts"].tolist() == [10**18 + 1000 + i for i in range(4)]
    assert cols["ifname"] == ["veth0", "if3", "veth0", "if3"]
    assert cols["eth_src"][3] == 0x0242AC110003
    assert cols["eth_dst"][0] == 0xFFFFFFFFFFFF
    assert cols["src_ip"][2].tobytes()[-4:] == bytes([198, 18, 0, 2])
    assert cols["sample_rate"].tolist() == [5] * 4
    assert cols["tcp_flags"].tolist() == [0x1FF] * 4
    assert cols["direction"].tolist() == [1, 2, 1, 2]
    assert cols["dns_qname"] == [""] * 4 and cols["http_status"].tolist() == [0] * 4


def test_parse_flag_names_are_unique_bits():
    bits = [v for v in records.PARSE_FLAG_NAMES]
    assert all(b and b & (b - 1) == 0 for b in bits) and len(bits) == len(set(bits))


def test_constants_mirror_types_h():
    import re

    from hdrlog.bpf import SOURCE_DIR

    text = (SOURCE_DIR / "types.h").read_text()
    parse = {m[0]: 1 << int(m[1]) for m in re.findall(r"#define (PARSE_\w+)\s+\(1 << (\d+)\)", text)}
    assert parse == {name: getattr(records, name) for name in parse}
    assert set(parse) == set(records.PARSE_FLAG_NAMES.values())
    cnt = {m[0]: int(m[1]) for m in re.findall(r"#define CNT_(\w+)\s+(\d+)", text)}
    assert cnt.pop("MAX") == len(records.COUNTER_NAMES)
    assert {k.lower(): v for k, v in cnt.items()} == {n: i for i, n in enumerate(records.COUNTER_NAMES)}
