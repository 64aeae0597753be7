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


def test_tunnel_extension_after_the_payload_bytes():
    """A record with PARSE_TUNNEL carries 40 bytes after its payload: columns from them, the payload without."""
    from hdrlog.proto.columns import TUNNEL_TYPES

    assert records.TUNNEL_NAMES == TUNNEL_TYPES
    rec = make(3)
    rec["parse_flags"] = [records.PARSE_TUNNEL, 0, records.PARSE_TUNNEL]
    rec["payload_len"] = [0, 0, 5]
    ext = np.zeros(2, records.TUNNEL_EXT_DTYPE)
    ext["tunnel_type"], ext["tunnel_id"], ext["tunnel_flags"] = [1, 3], [4242, 9], [records.TUN_DECAP] * 2
    ext["outer_src_ip"] = [bytes(10) + b"\xff\xff" + bytes([198, 18, 250, 2])] * 2
    ext[1]["tunnel_vlan_id"] = 333
    payloads = [(0, ext[0].tobytes()), (2, b"hello" + ext[1].tobytes())]
    rest, got = records.split_tunnels(rec, payloads)
    assert rest == [(2, b"hello")]
    assert got["tunnel_id"].tolist() == [4242, 0, 9] and got["tunnel_vlan_id"].tolist() == [0, 0, 333]
    cols = records.decode(rec.tobytes(), 3, {}, 0, payloads=payloads)
    assert cols["tunnel_type"].tolist() == [1, 0, 3] and cols["tunnel_flags"].tolist() == [1, 0, 1]
    assert cols["outer_src_ip"][2].tobytes()[-4:] == bytes([198, 18, 250, 2]) and not any(cols["outer_dst_ip"][0].tobytes())
    plain = records.decode(make(2).tobytes(), 2, {}, 0)
    assert plain["tunnel_type"].tolist() == [0, 0] and not any(plain["outer_src_ip"][0].tobytes())


def test_parse_flag_names_are_unique_bits():
    bits = [v for v in records.PARSE_FLAG_NAMES]
    assert all(b and b & (b - 1) == 0 for b in bits) and len(bits) == len(set(bits))


def test_constants_mirror_the_bpf_headers():
    """Every constant and struct size bpf/*.h shares with Python, read from the headers themselves."""
    import re

    from hdrlog.bpf import SOURCE_DIR, build
    from hdrlog.collector import capture, filters
    from hdrlog.collector import connections as cm
    from hdrlog.collector import flows

    text = "".join((SOURCE_DIR / h).read_text() for h in build.HEADERS)
    shifts = {m[0]: 1 << int(m[1]) for m in re.findall(r"#define (\w+)\s+\(1 << (\d+)\)", text)}
    plain = {m[0]: int(m[1], 0) for m in re.findall(r"#define (\w+)\s+\(?(0x[0-9a-fA-F]+|\d+)\)?\s", text)}

    def family(prefix: str, table: dict) -> dict:
        return {k: v for k, v in table.items() if k.startswith(prefix)}

    # types.h: parse flags, counters, directions
    parse = family("PARSE_", shifts)
    assert parse == {name: getattr(records, name) for name in parse}
    assert set(parse) == set(records.PARSE_FLAG_NAMES.values())
    cnt = family("CNT_", plain)
    assert cnt.pop("CNT_MAX") == len(records.COUNTER_NAMES)
    assert {k[4:].lower(): v for k, v in cnt.items()} == {n: i for i, n in enumerate(records.COUNTER_NAMES)}
    assert family("DIR_", plain) == {"DIR_INGRESS": records.DIR_INGRESS, "DIR_EGRESS": records.DIR_EGRESS}
    # modes.h: modes and log reasons
    assert {k[5:].lower(): v for k, v in family("MODE_", plain).items()} == capture.MODES
    log_bits = family("LOG_", shifts)
    assert len(log_bits) == 8 and log_bits == {name: getattr(records, name) for name in log_bits}
    assert "#define LOG_CONN_FALLBACK LOG_ALL" in text and records.LOG_CONN_FALLBACK == records.LOG_ALL
    # filter.h: rule bits and dimension flags
    fbits = {k: v for k, v in shifts.items() if k.startswith(("F_", "FF_"))}
    assert len(fbits) == 20 and fbits == {name: getattr(filters, name) for name in fbits}
    assert plain["HDRLOG_FILTER_PREFIXES"] == filters.MAX_PREFIXES
    # flows.h and conntrack.h: flags, Zeek states, map key and value layouts
    assert shifts["FLOW_CONTINUED"] == flows.FLOW_CONTINUED
    for name in ("CONN_ORIG_1", "CONN_FLIPPED", "CONN_HIST_FULL", "CONN_STARTED"):
        assert shifts[name] == getattr(cm, name), name
    for name in ("ZS_INACTIVE", "ZS_SYN_SENT", "ZS_SYN_ACK_SENT", "ZS_PARTIAL", "ZS_ESTABLISHED", "ZS_CLOSED",
                 "ZS_RESET", "HDRLOG_CONN_HISTORY"):
        assert plain[name] == getattr(cm, name), name
    sizes = {k: int(v) for k, v in re.findall(r"struct (\w+) \{[^{}]*?\};\s+/\* (\d+) bytes \*/", text, re.S)}
    assert sizes["conn_key"] == cm.CONN_KEY_DTYPE.itemsize
    assert sizes["conn_side"] == cm.CONN_SIDE_DTYPE.itemsize
    assert sizes["conn_value"] == cm.CONN_VALUE_DTYPE.itemsize
    assert sizes["flow_key"] == flows.FLOW_KEY_DTYPE.itemsize and sizes["flow_value"] == flows.FLOW_VALUE_DTYPE.itemsize
    # types.h / tunnel.h: the tunnel extension, its types and flags
    assert sizes["tunnel_ext"] == records.TUNNEL_EXT_SIZE
    ttypes = family("TUNNEL_", plain)
    assert ttypes == {name: getattr(records, name) for name in ttypes} and len(ttypes) == 4
    assert all(records.TUNNEL_NAMES[v] == k[7:].lower() for k, v in ttypes.items())
    tun = family("TUN_", shifts)
    assert len(tun) == 5 and tun == {name: getattr(records, name) for name in tun}
    # payload.h / build.py: the copy's chunk and cap
    assert re.search(r"#define HDRLOG_PAYLOAD_CHUNK (\d+)", text)[1] == str(build.PAYLOAD_CHUNK)
    assert re.search(r"#define HDRLOG_PAYLOAD_BYTES (\d+)", text)[1] == str(build.PAYLOAD_BYTES)
