"""tshark as the oracle: expected columns per frame, alignment of records to frames, agreement table.

``tshark_frames(pcap)`` dissects a capture with reassembly off (TCP, IPv4/IPv6
defragmentation, HTTP and TLS desegmentation), so every frame is dissected on its
own, as the classifier sees it. ``expected(frame)`` derives, for each compared
column, tshark's value *only where that header sits where our parser looks*,
decided from ``frame.protocols``: L3 directly after Ethernet and at most
``MAX_VLAN`` VLAN tags, L4 directly after IPv4 or after IPv6 and its extension
headers, DNS/HTTP/TLS directly on TCP/UDP. One level of tunnel is opened as
bpf/tunnel.h opens it (VXLAN to UDP port 4789, Geneve to 6081, GRE, IP-in-IP, an
inner Ethernet frame with at most MAX_INNER_VLAN tags): there L3 and up are
compared with tshark's inner layers (each field's occurrence counted among the
layers of its kind before the inner IP header) and L2 with the outer frame's, as
the classifier logs them; the tunnel id and outer addresses are compared too.
ICMP errors and the like are never compared with our outer headers; a field tshark did not
produce is not compared either. Each compared field counts as agreeing or not.
"""

from __future__ import annotations

import ipaddress
import struct
import subprocess
from dataclasses import dataclass, field

MAX_VLAN = 2  # bpf/hdrlog.c HDRLOG_MAX_VLAN
MAX_EXTHDR = 8  # bpf/hdrlog.c HDRLOG_MAX_EXTHDR
MAX_INNER_VLAN = 2  # bpf/tunnel.h HDRLOG_MAX_INNER_VLAN
VXLAN_PORTS, GENEVE_PORTS = (4789, 8472), (6081,)  # bpf/tunnel.h (tshark dissects 4789 only)
MTU = 65535
SEP, AGG = "\x1e", "\x1f"

PREFS = [
    "tcp.desegment_tcp_streams:FALSE", "ip.defragment:FALSE", "ipv6.defragment:FALSE",
    "http.desegment_headers:FALSE", "http.desegment_body:FALSE", "tls.desegment_ssl_records:FALSE",
]
FIELDS = [
    "frame.number", "frame.cap_len", "frame.protocols", "eth.dst", "eth.src", "vlan.id", "ieee8021ad.id",
    "ip.src", "ip.dst", "ip.proto", "ip.ttl", "ip.dsfield.dscp", "ip.dsfield.ecn", "ip.id", "ip.frag_offset",
    "ip.flags.mf", "ip.flags.df", "ip.hdr_len",
    "ipv6.src", "ipv6.dst", "ipv6.nxt", "ipv6.hlim", "ipv6.tclass.dscp", "ipv6.tclass.ecn", "ipv6.flow",
    "ipv6.hopopts.nxt", "ipv6.routing.nxt", "ipv6.fraghdr.nxt", "ipv6.dstopts.nxt", "ah.next_header",
    "ipv6.fraghdr.ident", "ipv6.fraghdr.offset", "ipv6.fraghdr.more",
    "tcp.srcport", "tcp.dstport", "tcp.flags", "tcp.seq_raw", "tcp.ack_raw", "tcp.window_size_value",
    "tcp.options.mss_val", "tcp.options.wscale.shift", "tcp.hdr_len",
    "udp.srcport", "udp.dstport", "icmp.type", "icmp.code", "icmpv6.type", "icmpv6.code",
    "dns.qry.name", "dns.qry.type", "dns.flags.rcode",
    "http.host", "http.request.method", "http.response.code", "tls.handshake.extensions_server_name",
    "vxlan.vni", "vxlan.flags", "geneve.vni", "gre.key", "gre.flags_and_version",
]

# Columns compared, in table order.
COMPARED = [
    "eth_src", "eth_dst", "vlan_id", "ip_version", "src_ip", "dst_ip", "ip_proto", "ttl", "dscp", "ecn", "ip_id",
    "frag_offset", "more_fragments", "dont_fragment", "src_port", "dst_port", "tcp_flags", "tcp_seq", "tcp_ack",
    "tcp_window", "tcp_mss", "tcp_wscale", "icmp_type", "icmp_code", "dns_qname", "dns_qtype", "dns_rcode",
    "http_host", "http_method", "http_status", "tls_sni", "tunnel_type", "tunnel_id", "outer_src_ip", "outer_dst_ip",
]
TUNNEL_LAYERS = {"vxlan": 1, "geneve": 2, "gre": 3}  # bpf/types.h TUNNEL_*; IP-in-IP is 4

EXT_LAYERS = {"ipv6.hopopts", "ipv6.routing", "ipv6.fraghdr", "ipv6.dstopts", "ah"}
EXT_FIELD = {0: "ipv6.hopopts.nxt", 43: "ipv6.routing.nxt", 44: "ipv6.fraghdr.nxt", 60: "ipv6.dstopts.nxt",
             51: "ah.next_header"}
DNS_LAYERS = {"dns", "mdns", "llmnr"}


def tshark_frames(pcap: str) -> list[dict[str, list[str]]]:
    cmd = ["tshark", "-r", pcap, "-n", "-T", "fields", "-E", f"separator={SEP}", "-E", f"aggregator={AGG}",
           "-E", "occurrence=a", "-E", "quote=n", "-d", "udp.port==8472,vxlan"]  # Linux's VXLAN port, as ours
    for p in PREFS:
        cmd += ["-o", p]
    for f in FIELDS:
        cmd += ["-e", f]
    p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=300)
    out = []
    for line in p.stdout.split("\n"):
        if not line:
            continue
        vals = line.split(SEP)
        if len(vals) != len(FIELDS):
            raise RuntimeError(f"tshark on {pcap}: {len(vals)} fields in a line, expected {len(FIELDS)}")
        out.append({f: (v.split(AGG) if v else []) for f, v in zip(FIELDS, vals)})
    return out


def num(v: str) -> int:
    v = v.strip()
    if v in ("True", "true"):
        return 1
    if v in ("False", "false"):
        return 0
    return int(v, 0)


def first_num(t: dict, name: str) -> int | None:
    vals = t.get(name) or []
    try:
        return num(vals[0]) if vals else None
    except ValueError:
        return None


def first_str(t: dict, name: str) -> str | None:
    vals = t.get(name) or []
    return vals[0] if vals else None


@dataclass
class Expect:
    values: dict[str, object] = field(default_factory=dict)
    path: str = ""  # frame.protocols
    note: str = ""  # why some layers were not compared


def _ip16(text: str) -> bytes:
    ip = ipaddress.ip_address(text)
    return (b"\0" * 10 + b"\xff\xff" + ip.packed) if ip.version == 4 else ip.packed


def _field_layer(f: str, kinds: set[str]) -> str:
    """The frame.protocols layer a field belongs to: its longest dotted prefix that is a layer name."""
    parts = f.split(".")
    for k in range(len(parts) - 1, 0, -1):
        p = ".".join(parts[:k])
        if p in kinds:
            return p
    return parts[0]


def decapsulated(t: dict) -> tuple[dict, dict] | None:
    """For a frame bpf/tunnel.h opens: (t as if the inner IP packet sat right after the outer L2 --
    protocol path spliced, every L3-and-up field's outer occurrences dropped --, the tunnel columns
    tshark gives); else None."""
    layers = (t["frame.protocols"] or [""])[0].split(":")
    i = 1
    while i < len(layers) and layers[i] in ("ethertype", "vlan", "ieee8021ad"):
        i += 1
    if len(layers) < 2 or layers[0] != "eth" or i >= len(layers) or layers[i] not in ("ip", "ipv6"):
        return None
    l2_end, j = i, i + 1
    while j < len(layers) and layers[j] in EXT_LAYERS:
        j += 1
    if j >= len(layers):
        return None
    nxt = layers[j]
    cols: dict[str, object] = {}
    kind = layers[i]
    if first_num(t, f"{kind}.ttl" if kind == "ip" else "ipv6.hlim") is None:
        return None
    cols["outer_src_ip"] = _ip16(t[f"{kind}.src"][0]) if t[f"{kind}.src"] else None
    cols["outer_dst_ip"] = _ip16(t[f"{kind}.dst"][0]) if t[f"{kind}.dst"] else None
    if kind == "ip" and (first_num(t, "ip.frag_offset") or 0):
        return None
    if nxt in ("ip", "ipv6"):
        cols["tunnel_type"], cols["tunnel_id"], inner_at = 4, 0, j
    else:
        if nxt == "udp":
            port = first_num(t, "udp.dstport")
            if j + 1 >= len(layers):
                return None
            tl = layers[j + 1]
            if not ((tl == "vxlan" and port in VXLAN_PORTS) or (tl == "geneve" and port in GENEVE_PORTS)):
                return None
            at = j + 1
            if tl == "vxlan" and not (first_num(t, "vxlan.flags") or 0) & 0x0800:
                return None  # the I flag clear: the classifier keeps the outer packet
        elif nxt == "gre":
            tl, at = "gre", j
            if (first_num(t, "gre.flags_and_version") or 0) & 0x4007:
                return None  # routing or version 1 (PPTP): not opened
        else:
            return None
        k = at + 1
        if k < len(layers) and layers[k] == "eth":
            k += 1
            tags = 0
            while k < len(layers) and layers[k] in ("ethertype", "vlan", "ieee8021ad"):
                tags += layers[k] != "ethertype"
                k += 1
            if tags > MAX_INNER_VLAN:
                return None
        if k >= len(layers) or layers[k] not in ("ip", "ipv6"):
            return None
        inner_at = k
        cols["tunnel_type"] = TUNNEL_LAYERS[tl]
        ids = t.get({"vxlan": "vxlan.vni", "geneve": "geneve.vni", "gre": "gre.key"}[tl]) or []
        cols["tunnel_id"] = num(ids[0]) if ids else 0
    # The inner IP header must be whole for the classifier to open the tunnel.
    ik = layers[inner_at]
    k_ip = layers[:inner_at].count(ik)
    if len(t.get(f"{ik}.src") or []) <= k_ip or len(t.get(f"{ik}.dst") or []) <= k_ip:
        return None
    before = layers[:inner_at]
    kinds = set(layers)
    out = dict(t)
    for f, vals in t.items():
        if f in ("frame.number", "frame.cap_len", "frame.protocols") or f.startswith(("eth.", "vlan.", "ieee8021ad.")):
            continue
        n = before.count(_field_layer(f, kinds))
        if n:
            out[f] = vals[n:]
    out["frame.protocols"] = [":".join(layers[:l2_end] + layers[inner_at:])]
    return out, cols


def expected(t: dict) -> Expect:
    """The columns tshark lets us check for one frame (see the module doc)."""
    e = Expect(path=(t["frame.protocols"] or [""])[0])
    v = e.values
    tun = decapsulated(t)
    if tun is not None:
        t, tcols = tun
        v.update({k: x for k, x in tcols.items() if x is not None})
    layers = t["frame.protocols"][0].split(":")
    if layers[:2] == ["eth", "eth"]:
        # Cisco ISL: the outer header is ISL's (isl.*), tshark's eth.* is the encapsulated frame's.
        e.note = "ISL encapsulation: tshark's eth.* are the inner frame's"
        return e
    if t["eth.src"]:
        v["eth_src"] = int(t["eth.src"][0].replace(":", ""), 16)
    if t["eth.dst"]:
        v["eth_dst"] = int(t["eth.dst"][0].replace(":", ""), 16)
    if not layers or layers[0] != "eth":
        return e
    i, tags = 1, []
    while i < len(layers):
        if layers[i] == "ethertype":
            i += 1
        elif layers[i] in ("vlan", "ieee8021ad"):
            tags.append(layers[i])
            i += 1
        else:
            break
    if tags:
        # The outermost tag's id (tshark lists each kind's occurrences in order).
        kind = "ieee8021ad.id" if tags[0] == "ieee8021ad" else "vlan.id"
        vid = first_num(t, kind)
        if vid is not None:
            v["vlan_id"] = vid
    elif i == 1 and (len(layers) < 2 or layers[1] not in ("ethertype",)):
        v["vlan_id"] = 0  # LLC / other: no tag
    else:
        v["vlan_id"] = 0
    if len(tags) > MAX_VLAN:
        e.note = f"{len(tags)} VLAN tags (parser walks {MAX_VLAN})"
        return e
    l3 = layers[i] if i < len(layers) else ""
    if l3 not in ("ip", "ipv6"):
        v["ip_version"] = 0
        return e
    v["ip_version"] = 4 if l3 == "ip" else 6
    l4_at = i + 1
    if l3 == "ip":
        if not t["ip.src"] or not t["ip.dst"] or first_num(t, "ip.ttl") is None:
            e.note = "IPv4 header incomplete for tshark"
            return e
        v.update(src_ip=_ip16(t["ip.src"][0]), dst_ip=_ip16(t["ip.dst"][0]), ip_proto=first_num(t, "ip.proto"),
                 ttl=first_num(t, "ip.ttl"), dscp=first_num(t, "ip.dsfield.dscp"), ecn=first_num(t, "ip.dsfield.ecn"),
                 ip_id=first_num(t, "ip.id"), more_fragments=first_num(t, "ip.flags.mf"),
                 dont_fragment=first_num(t, "ip.flags.df"))
        off = first_num(t, "ip.frag_offset")
        if off is not None:
            v["frag_offset"] = off  # 8-byte units, like ours
        hl = first_num(t, "ip.hdr_len")
        if off or (hl is not None and hl < 20):
            return e  # non-first fragment or bad IHL: no L4 for either of us
    else:
        if not t["ipv6.src"] or not t["ipv6.dst"] or first_num(t, "ipv6.hlim") is None:
            e.note = "IPv6 header incomplete for tshark"
            return e
        v.update(src_ip=_ip16(t["ipv6.src"][0]), dst_ip=_ip16(t["ipv6.dst"][0]), ttl=first_num(t, "ipv6.hlim"),
                 dscp=first_num(t, "ipv6.tclass.dscp"), ecn=first_num(t, "ipv6.tclass.ecn"),
                 flow_label=first_num(t, "ipv6.flow"))
        # The final next header: follow the chain through the extension headers tshark dissected.
        nh = first_num(t, "ipv6.nxt")
        seen: dict[str, int] = {}
        walked = 0
        while nh in EXT_FIELD and walked < MAX_EXTHDR:
            name = EXT_FIELD[nh]
            k = seen.get(name, 0)
            vals = t.get(name) or []
            if k >= len(vals):
                nh = None  # tshark stopped (truncated or malformed extension header)
                break
            seen[name] = k + 1
            if nh == 44 and k == 0:
                v["ip_id"] = first_num(t, "ipv6.fraghdr.ident")
                off = first_num(t, "ipv6.fraghdr.offset")
                v["frag_offset"] = off
                v["more_fragments"] = first_num(t, "ipv6.fraghdr.more")
            nh = num(vals[k])
            walked += 1
        if nh is None or nh in EXT_FIELD:
            e.note = "IPv6 extension headers beyond tshark or the parser's limit"
            return e
        v["ip_proto"] = nh
        while l4_at < len(layers) and layers[l4_at] in EXT_LAYERS:
            l4_at += 1
        if v.get("frag_offset"):
            return e
    for k in [k for k, x in v.items() if x is None]:
        del v[k]
    l4 = layers[l4_at] if l4_at < len(layers) else ""
    if l4 == "tcp":
        hdr = first_num(t, "tcp.hdr_len")
        v.update(src_port=first_num(t, "tcp.srcport"), dst_port=first_num(t, "tcp.dstport"),
                 tcp_seq=first_num(t, "tcp.seq_raw"), tcp_window=first_num(t, "tcp.window_size_value"))
        fl = first_num(t, "tcp.flags")
        if fl is not None:
            v["tcp_flags"] = fl & 0x1FF
        ack = first_num(t, "tcp.ack_raw")
        if ack is not None:
            v["tcp_ack"] = ack
        if hdr is not None and hdr >= 20 and v["tcp_window"] is not None:
            v["tcp_mss"] = first_num(t, "tcp.options.mss_val") or 0
            v["tcp_wscale"] = first_num(t, "tcp.options.wscale.shift") or 0
    elif l4 == "udp":
        v.update(src_port=first_num(t, "udp.srcport"), dst_port=first_num(t, "udp.dstport"))
    elif l4 in ("icmp", "icmpv6"):
        v.update(icmp_type=first_num(t, f"{l4}.type"), icmp_code=first_num(t, f"{l4}.code"))
    if l4 in ("tcp", "udp"):
        app = layers[l4_at + 1] if l4_at + 1 < len(layers) else ""
        if app in DNS_LAYERS:
            name = first_str(t, "dns.qry.name")
            # tshark's placeholders for "no usable name" ("<Root>", "<name too long>", ...) are our ''.
            v["dns_qname"] = "" if name is None or (name.startswith("<") and name.endswith(">")) else name.lower()
            v["dns_qtype"] = first_num(t, "dns.qry.type") or 0
            v["dns_rcode"] = first_num(t, "dns.flags.rcode")
        elif app == "http":
            v["http_method"] = first_str(t, "http.request.method") or ""
            v["http_host"] = first_str(t, "http.host") or ""
            v["http_status"] = first_num(t, "http.response.code") or 0
        elif app in ("tls", "ssl"):
            v["tls_sni"] = (first_str(t, "tls.handshake.extensions_server_name") or "").lower()
    for k in [k for k, x in v.items() if x is None]:
        del v[k]
    return e


# -- frames and alignment ------------------------------------------------------------------


def pcap_frames(path: str) -> list[bytes]:
    """Raw frame bytes (what tcpreplay sends: the captured part) of a classic pcap file."""
    data = open(path, "rb").read()
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        end = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        end = ">"
    else:
        raise ValueError(f"{path}: not a classic pcap file")
    snaplen = struct.unpack_from(end + "I", data, 16)[0]
    out, pos = [], 24
    while pos + 16 <= len(data):
        _, _, caplen, wirelen = struct.unpack_from(end + "IIII", data, pos)
        pos += 16
        # Malformed captures may claim caplen > len or > the file's snaplen; tcpreplay sends
        # min(caplen, len, snaplen) bytes.
        n = min(caplen, wirelen, snaplen or caplen)
        out.append(data[pos: pos + n])
        pos += caplen
    return out


def fingerprint_frame(frame: bytes) -> tuple[int, int, int]:
    return len(frame), int.from_bytes(frame[0:6].ljust(6, b"\0"), "big"), int.from_bytes(frame[6:12].ljust(6, b"\0"), "big")


def align(frames: list[bytes], wire_len, eth_dst, eth_src) -> tuple[list[int | None], int]:
    """For each frame, the index of its record (or None); and how many records were left over.

    Records come in send order; a frame the kernel refused has none. Greedy in order on
    (length, destination MAC, source MAC).
    """
    j, n = 0, len(wire_len)
    out: list[int | None] = []
    for f in frames:
        fp = fingerprint_frame(f)
        if j < n and (int(wire_len[j]), int(eth_dst[j]), int(eth_src[j])) == fp:
            out.append(j)
            j += 1
        else:
            out.append(None)
    return out, n - j


def refusal_reason(frame: bytes) -> str:
    if len(frame) < 14:
        return "shorter than an Ethernet header"
    tagged = frame[12:14] in (b"\x81\x00", b"\x88\xa8")
    if len(frame) > MTU + 14 + (4 if tagged else 0):  # AF_PACKET allows one VLAN tag beyond the MTU
        return f"larger than the {MTU}-byte MTU"
    return "no record (unexplained)"


def ours(cols: dict, j: int, name: str):
    v = cols[name][j]
    if isinstance(v, str):
        return v
    if hasattr(v, "tobytes") and getattr(v, "dtype", None) is not None and v.dtype.kind == "V":
        return bytes(v.tobytes())
    return v if isinstance(v, str) else int(v)


def show(name: str, value) -> str:
    if isinstance(value, bytes) and len(value) == 16:
        ip = ipaddress.ip_address(value)
        return str(ip.ipv4_mapped or ip)
    if name in ("eth_src", "eth_dst") and isinstance(value, int):
        return ":".join(f"{b:02x}" for b in value.to_bytes(6, "big"))
    return repr(value)
