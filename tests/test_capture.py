"""Capture against real eBPF: scripted frames across a veth into the monitored end.

Frames are built with scapy, sent raw (AF_PACKET, like scapy's sendp) from inside a
lab namespace, and arrive on the root-side veth end where the classifier runs at
clsact ingress. Every registry column of each record is compared with what scapy
says was sent (an independent dissector); a few fields also against tshark.
"""

from __future__ import annotations

import os
import subprocess
import time

import numpy as np
import pytest
from scapy.all import (
    IP,
    UDP,
    Dot1Q,
    Ether,
    IPv6,
    Raw,
    wrpcap,
)
from scapy.layers.l2 import Dot1AD

from hdrlog.collector import records
from hdrlog.collector.attach import TC_PRIO
from hdrlog.collector.capture import Capture, CaptureConfig
from hdrlog.proto.columns import PACKETS

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="eBPF and network namespaces need root")

from tests.frames import FAKE_SRC, IGNORED_FLAGS, community_id, expected, mac_int, scripted_frames, send_frames, v16
from tests.support import hdrlog_hooks

def row(cols: dict, i: int) -> dict:
    out = {}
    for c in PACKETS:
        v = cols[c.name][i]
        out[c.name] = v if c.is_string else (bytes(v.tobytes()) if c.dtype.startswith("V") else int(v))
    return out


def collect(cap: Capture, want, n: int, timeout: float = 5.0) -> list[dict]:
    """Poll until ``n`` rows satisfy ``want(row)`` (or timeout); return those rows."""
    rows: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(rows) < n:
        cols = cap.poll(100)
        if cols is None:
            continue
        assert list(cols) == [c.name for c in PACKETS], "columns out of registry order"
        for c in PACKETS:
            v = cols[c.name]
            if c.is_string:
                assert isinstance(v, list) and all(isinstance(s, str) for s in v)
            else:
                assert v.dtype == np.dtype(c.dtype), (c.name, v.dtype)
        for i in range(len(cols["ts"])):
            r = row(cols, i)
            if want(r):
                rows.append(r)
    # Anything extra arriving late would show up as a count mismatch.
    cols = cap.poll(200)
    if cols is not None:
        rows += [r for r in (row(cols, i) for i in range(len(cols["ts"]))) if want(r)]
    return rows


def tc(*args: str) -> str:
    return subprocess.run(["tc", *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def host(lab):
    return lab.add_host("cap")


@pytest.fixture
def capture(host):
    cap = Capture(CaptureConfig(ifaces=[host.peer_ifname]))
    cap.start()
    yield cap
    cap.stop()


# -- the scripted frames -----------------------------------------------------------


# -- tests ----------------------------------------------------------------------


def test_every_column_of_scripted_frames(lab, host, capture, tmp_path):
    cases = scripted_frames(host)
    frames = [f for _, f, _ in cases]
    t0 = time.time_ns()
    send_frames(lab, host, frames, tmp_path)
    t1 = time.time_ns()
    rows = collect(capture, lambda r: r["direction"] == 1 and r["eth_src"] == mac_int(FAKE_SRC), len(frames))
    assert [r["wire_len"] for r in rows] == [len(f) for f in frames], "one ingress record per frame, in order"
    for (name, frame, extra), got in zip(cases, rows):
        want = expected(frame)
        want.update(extra)
        want["community_id"] = community_id(want)  # after extra: its parse_flags say what was cut
        assert t0 - 5_000_000 <= got["ts"] <= t1 + 5_000_000, (name, got["ts"], t0, t1)
        assert got["ifname"] == host.peer_ifname, name
        if name in ("vlan-8021q", "qinq-8021ad", "three-tags"):
            # veth's receive path moves the outer tag into skb metadata before TC ingress.
            assert got["parse_flags"] & records.PARSE_VLAN_ACCEL, name
        got = dict(got, ts=0, ifname="", parse_flags=got["parse_flags"] & ~IGNORED_FLAGS)
        want.update(ts=0, ifname="")
        diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        assert not diff, f"{name}: (got, want) {diff}"
    c = capture.counters()
    assert c["seen"] == c["logged"] + c["ringbuf_full"] and c["ringbuf_full"] == 0
    assert c["truncated"] >= 1 and c["polled"] >= len(frames)


def test_fields_agree_with_tshark(lab, host, capture, tmp_path):
    cases = scripted_frames(host)
    frames = [f for _, f, _ in cases]
    pcap = tmp_path / "frames.pcap"
    wrpcap(str(pcap), [Ether(f) for f in frames])
    fields = ["frame.len", "ieee8021ad.id", "vlan.id", "ip.ttl", "ipv6.hlim", "tcp.srcport", "tcp.seq_raw",
              "tcp.options.mss_val", "tcp.options.wscale.shift", "udp.length", "icmp.type", "icmpv6.type", "ipv6.flow"]
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-T", "fields", "-E", "occurrence=f", "-E", "separator=|"]
        + [a for f in fields for a in ("-e", f)],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    assert len(out) == len(frames)
    send_frames(lab, host, frames, tmp_path)
    rows = collect(capture, lambda r: r["direction"] == 1 and r["eth_src"] == mac_int(FAKE_SRC), len(frames))
    assert len(rows) == len(frames)
    for (name, _, _), line, r in zip(cases, out, rows):
        t = dict(zip(fields, line.split("|")))
        if name in ("ipv4-frag-2", "tcp4-truncated", "ipv4-bad-ihl", "tcp-bad-doff", "ipv6-truncated",
                    "tcp-bad-option-len"):  # tshark reassembles, or stops at the malformed header
            continue
        num = lambda k: int(t[k], 0) if t[k] else 0  # noqa: E731
        assert r["wire_len"] == num("frame.len"), name
        assert r["vlan_id"] == (num("ieee8021ad.id") or num("vlan.id")), name
        assert r["ttl"] == (num("ip.ttl") or num("ipv6.hlim")), name
        if num("tcp.srcport"):
            assert r["src_port"] == num("tcp.srcport"), name
            assert r["tcp_seq"] == num("tcp.seq_raw"), name
            assert r["tcp_mss"] == num("tcp.options.mss_val"), name
            assert r["tcp_wscale"] == num("tcp.options.wscale.shift"), name
        if t["udp.length"] and name != "icmp4-unreach":
            assert r["udp_len"] == num("udp.length"), name
        assert r["icmp_type"] == (num("icmp.type") or num("icmpv6.type")), name
        assert r["flow_label"] == num("ipv6.flow"), name


def test_egress_direction(lab, host, capture, tmp_path):
    """Packets the root namespace sends out of the monitored veth are logged as egress."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host.peer_addr4, 0))
        sport = s.getsockname()[1]
        s.sendto(b"egress!", (host.addr4, 9))
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.sendto(b"egress6", (host.addr6, 10))
    # The host answers the IPv4 one with port unreachable: that crosses ingress.
    is_reply = lambda r: r["direction"] == 1 and r["icmp_type"] == 3 and r["ip_version"] == 4  # noqa: E731
    rows = collect(capture, lambda r: (r["direction"] == 2 and r["dst_port"] in (9, 10)) or is_reply(r), 3)
    back = [r for r in rows if is_reply(r)]
    assert len(back) == 1 and back[0]["icmp_code"] == 3 and back[0]["src_ip"] == v16(host.addr4)
    rows = [r for r in rows if not is_reply(r)]
    assert len(rows) == 2
    r4, r6 = sorted(rows, key=lambda r: r["dst_port"])
    assert r4["src_ip"] == v16(host.peer_addr4) and r4["dst_ip"] == v16(host.addr4)
    assert r4["src_port"] == sport and r4["udp_len"] == 8 + 7 and r4["ip_proto"] == 17
    assert r4["eth_src"] == mac_int(host.peer_mac) and r4["eth_dst"] == mac_int(host.mac)
    assert r4["wire_len"] == 14 + 20 + 8 + 7 and r4["ip_version"] == 4 and r4["ifname"] == host.peer_ifname
    assert r6["ip_version"] == 6 and r6["src_ip"] == v16(host.peer_addr6) and r6["dst_ip"] == v16(host.addr6)
    assert r6["wire_len"] == 14 + 40 + 8 + 7


@pytest.mark.parametrize("attach", ["tcx", "tc"])
def test_stop_leaves_no_filter_or_qdisc(host, attach):
    dev = host.peer_ifname
    cap = Capture(CaptureConfig(ifaces=[dev], attach=attach))
    cap.start()
    assert cap.attachments == [(dev, "ingress"), (dev, "egress")]
    assert hdrlog_hooks(dev, "ingress") == [f"{attach} hdrlog_ingress"]
    assert hdrlog_hooks(dev, "egress") == [f"{attach} hdrlog_egress"]
    cap.stop()
    cap.stop()  # idempotent
    assert cap.attachments == []
    assert hdrlog_hooks(dev, "ingress") == hdrlog_hooks(dev, "egress") == []
    assert tc("filter", "show", "dev", dev, "ingress").strip() == ""
    assert tc("filter", "show", "dev", dev, "egress").strip() == ""
    assert "clsact" not in tc("qdisc", "show", "dev", dev)
    assert cap.counters()["seen"] >= 0  # still answers after stop


@pytest.mark.parametrize("attach", ["tcx", "tc"])
def test_foreign_clsact_and_filter_left_intact(host, attach):
    dev = host.peer_ifname
    subprocess.run(["tc", "qdisc", "add", "dev", dev, "clsact"], check=True)
    subprocess.run(["tc", "filter", "add", "dev", dev, "ingress", "pref", "20", "protocol", "all",
                    "u32", "match", "u32", "0", "0", "flowid", "1:1"], check=True)
    try:
        cap = Capture(CaptureConfig(ifaces=[dev], attach=attach))
        cap.start()
        shown = tc("filter", "show", "dev", dev, "ingress")
        assert "u32" in shown and hdrlog_hooks(dev, "ingress") == [f"{attach} hdrlog_ingress"]
        cap.stop()
        shown = tc("filter", "show", "dev", dev, "ingress")
        assert "u32" in shown and "hdrlog" not in shown
        assert "clsact" in tc("qdisc", "show", "dev", dev)
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", dev, "clsact"], check=False)


def test_start_rolls_back_when_an_attach_fails(lab):
    """(tc filters; tcx links need no rollback beyond closing their fds, see test_handover.py)"""
    a, b = lab.add_host("ra"), lab.add_host("rb")
    # Someone else's filter of another kind at our prio on b makes our attach there fail.
    subprocess.run(["tc", "qdisc", "add", "dev", b.peer_ifname, "clsact"], check=True)
    subprocess.run(["tc", "filter", "add", "dev", b.peer_ifname, "ingress", "pref", str(TC_PRIO),
                    "protocol", "all", "u32", "match", "u32", "0", "0", "flowid", "1:1"], check=True)
    try:
        cap = Capture(CaptureConfig(ifaces=[a.peer_ifname, b.peer_ifname], attach="tc"))
        with pytest.raises(RuntimeError, match=b.peer_ifname):
            cap.start()
        assert cap.attachments == []
        assert "clsact" not in tc("qdisc", "show", "dev", a.peer_ifname)
        assert "u32" in tc("filter", "show", "dev", b.peer_ifname, "ingress")
        cap.stop()
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", b.peer_ifname, "clsact"], check=False)


def test_glob_and_literal_iface_errors(lab):
    a, b = lab.add_host("ga"), lab.add_host("gb")
    with pytest.raises(ValueError, match="'nosuchif0' does not exist"):
        Capture(CaptureConfig(ifaces=["nosuchif0"])).start()
    with pytest.raises(ValueError, match=r"glob 'nosuch\*' matches no interface"):
        Capture(CaptureConfig(ifaces=["nosuch*"])).start()
    # a glob that matches nothing beside one that does: a warning, not a failure (README: eth0 and 'veth*')
    cap = Capture(CaptureConfig(ifaces=[f"{lab.prefix}{lab.suffix}*", "nosuch*"]))
    cap.start()
    try:
        assert sorted(cap.attachments) == sorted(
            (h.peer_ifname, d) for h in (a, b) for d in ("ingress", "egress")
        )
    finally:
        cap.stop()
    assert "clsact" not in tc("qdisc", "show", "dev", a.peer_ifname)


def test_full_ring_buffer_is_counted(lab, host, tmp_path):
    cap = Capture(CaptureConfig(ifaces=[host.peer_ifname], ringbuf_bytes=4096))
    cap.start()
    try:
        frame = bytes(Ether(src=FAKE_SRC, dst=host.peer_mac) / IP(src=host.addr4, dst=host.peer_addr4)
                      / UDP(sport=1, dport=9))
        send_frames(lab, host, [frame] * 300, tmp_path)  # 300 x 112-byte records > 4 KiB
        c = cap.counters()
        assert c["ringbuf_full"] > 0
        assert c["seen"] == c["logged"] + c["ringbuf_full"]
        rows = collect(cap, lambda r: r["eth_src"] == mac_int(FAKE_SRC), 300, timeout=1)
        assert 0 < len(rows) < 300
        assert len(rows) + c["ringbuf_full"] >= 300  # every frame is either read or counted as dropped
    finally:
        cap.stop()


@pytest.mark.parametrize("vlan_proto", ["802.1Q", "802.1ad"])
def test_egress_vlan_tag_in_skb_metadata(lab, host, capture, vlan_proto):
    """A VLAN device on the monitored link hands the tag over in skb metadata: still counted on the wire."""
    import socket

    vdev = f"{host.peer_ifname}v"
    made = subprocess.run(["ip", "link", "add", "link", host.peer_ifname, "name", vdev, "type", "vlan",
                           "proto", vlan_proto, "id", "42"], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"no VLAN devices in this kernel: {made.stderr.strip()}")
    try:
        subprocess.run(["ip", "link", "set", vdev, "up"], check=True)
        frame = bytes(Ether(src=host.peer_mac, dst=host.mac) / IP(src=host.peer_addr4, dst=host.addr4, ttl=3)
                      / UDP(sport=4242, dport=4343) / Raw(b"tagged"))
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind((vdev, 0))
            s.send(frame)
        rows = collect(capture, lambda r: r["direction"] == 2 and r["dst_port"] == 4343, 1)
        assert len(rows) == 1
        r = rows[0]
        assert r["vlan_id"] == 42 and r["eth_type"] == 0x0800 and r["ip_version"] == 4
        assert r["wire_len"] == len(frame) + 4, "the tag counts on the wire"
        assert r["src_port"] == 4242 and r["udp_len"] == 8 + 6 and r["ttl"] == 3
    finally:
        subprocess.run(["ip", "link", "del", vdev], check=False)


def test_egress_inband_tags(lab, host, capture):
    """Frames written raw (AF_PACKET) from the root side keep their tags in the frame at TC egress."""
    import socket

    frames = [
        bytes(Ether(src=host.peer_mac, dst=host.mac) / Dot1Q(vlan=7) / IP(src=host.peer_addr4, dst=host.addr4)
              / UDP(sport=1, dport=4711)),
        bytes(Ether(src=host.peer_mac, dst=host.mac) / Dot1AD(vlan=8) / Dot1Q(vlan=9)
              / IPv6(src=host.peer_addr6, dst=host.addr6) / UDP(sport=2, dport=4712)),
    ]
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((host.peer_ifname, 0))
        for f in frames:
            s.send(f)
    rows = collect(capture, lambda r: r["direction"] == 2 and r["dst_port"] in (4711, 4712), 2)
    assert len(rows) == 2
    for f, r in zip(frames, sorted(rows, key=lambda r: r["dst_port"])):
        want = dict(expected(f), direction=2)
        want["community_id"] = community_id(want)
        got = dict(r, ts=0, ifname="", parse_flags=r["parse_flags"] & ~IGNORED_FLAGS)
        want.update(ts=0, ifname="")
        assert {k: (got[k], want[k]) for k in want if got[k] != want[k]} == {}
        assert not r["parse_flags"] & records.PARSE_VLAN_ACCEL, "tag was in the frame"


@pytest.mark.parametrize("attach", ["tcx", "tc"])
def test_interfaces_matching_a_glob_are_followed(lab, attach):
    """A veth that appears after start (a new container) is captured without a restart; one that
    goes away is forgotten, and stop leaves nothing on the interfaces that remain."""
    first = lab.add_host("fa")
    cap = Capture(CaptureConfig(ifaces=[f"{lab.prefix}{lab.suffix}*"], attach=attach))
    cap.start()
    try:
        assert cap.attach_new_interfaces() == ([], [])
        late = lab.add_host("fb")
        attached, gone = cap.attach_new_interfaces()
        assert (attached, gone) == ([late.peer_ifname], [])
        assert hdrlog_hooks(late.peer_ifname, "ingress") == [f"{attach} hdrlog_ingress"]
        lab.run(late, "ping", "-c", "3", "-i", "0.2", "-W", "1", late.peer_addr4, check=False)
        rows = collect(cap, lambda r: r["ifname"] == late.peer_ifname and r["ip_proto"] == 1, 6)
        assert {r["direction"] for r in rows} == {records.DIR_INGRESS, records.DIR_EGRESS}
        assert len(rows) == 6  # 3 echo requests in, 3 replies out: all of them, none before the attach
        subprocess.run(["ip", "link", "del", late.peer_ifname], check=True)
        assert cap.attach_new_interfaces() == ([], [late.peer_ifname])
        assert sorted(cap.attachments) == [(first.peer_ifname, "egress"), (first.peer_ifname, "ingress")]
    finally:
        cap.stop()
    assert hdrlog_hooks(first.peer_ifname, "ingress") == hdrlog_hooks(first.peer_ifname, "egress") == []
    assert "clsact" not in tc("qdisc", "show", "dev", first.peer_ifname)
