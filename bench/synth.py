"""Synthetic but plausible packet headers, as registry columns (numpy), for benchmarks and tests.

A small fleet: ``hosts`` hosts with a few addresses each talk to a few dozen servers
(HTTPS, HTTP, DNS, SSH, PostgreSQL) from ephemeral ports, both directions logged, in
TCP connections (SYN, SYN-ACK, data, FIN) and DNS exchanges, at a steady rate with a
diurnal swing. Rows come sorted by time, as a collector sends them. Deterministic for
a seed. Nothing here is measured traffic: it only has to compress and filter like it.
"""

from __future__ import annotations

import ipaddress

import numpy as np

from hdrlog.proto import columns as registry

NS = 1_000_000_000
SERVICES = np.array([443, 443, 443, 80, 53, 22, 5432, 8080], dtype=np.uint16)
NAMES = ["www.example.org", "api.example.org", "cdn.example.net", "mail.example.com", "repo.example.test",
         "auth.example.org", "metrics.example.net", "git.example.com"]


def v16(addr: str) -> bytes:
    ip = ipaddress.ip_address(addr)
    return (b"\0" * 10 + b"\xff\xff" + ip.packed) if ip.version == 4 else ip.packed


def packets(rows: int, *, start_ns: int, seconds: float, hosts: int = 8, seed: int = 1,
            servers: int = 40) -> dict[str, dict[str, object]]:
    """Columns of ``rows`` packets spread over ``seconds`` from ``start_ns``, split by host name."""
    rng = np.random.default_rng(seed)
    # Time: a steady rate with a diurnal swing (more in the day than at night).
    t = np.sort(rng.random(rows))
    t = t + 0.15 * np.sin(2 * np.pi * t) / (2 * np.pi)
    ts = (start_ns + np.sort(t) * seconds * NS).astype(np.int64)
    host_of = rng.integers(0, hosts, rows)
    host_ips = np.array([v16(f"198.18.{h}.{10 + k}") for h in range(hosts) for k in range(4)], dtype="V16")
    server_ips = np.array([v16(f"198.19.{s // 200}.{s % 200 + 1}") for s in range(servers)], dtype="V16")
    local = host_ips[host_of * 4 + rng.integers(0, 4, rows)]
    server_idx = rng.zipf(1.6, rows) % servers
    remote = server_ips[server_idx]
    service = SERVICES[server_idx % len(SERVICES)]
    ephemeral = (32768 + (rng.zipf(1.2, rows) % 28000)).astype(np.uint16)
    egress = rng.random(rows) < 0.5  # local host sends (egress) or receives (ingress)
    cols = registry.empty_columns("packets", rows)
    cols["ts"] = ts
    cols["ifname"] = ["eth0"] * rows
    cols["direction"] = np.where(egress, 2, 1).astype("u1")
    cols["sample_rate"] = np.ones(rows, dtype="<u4")
    cols["eth_type"] = np.full(rows, 0x0800, dtype="<u2")
    cols["ip_version"] = np.full(rows, 4, dtype="u1")
    cols["eth_src"] = np.where(egress, 0x02AA00000000 + host_of, 0x02BB00000001).astype("<u8")
    cols["eth_dst"] = np.where(egress, 0x02BB00000001, 0x02AA00000000 + host_of).astype("<u8")
    cols["src_ip"] = np.where(egress, local, remote)
    cols["dst_ip"] = np.where(egress, remote, local)
    cols["src_port"] = np.where(egress, ephemeral, service).astype("<u2")
    cols["dst_port"] = np.where(egress, service, ephemeral).astype("<u2")
    udp = service == 53
    cols["ip_proto"] = np.where(udp, 17, 6).astype("u1")
    cols["ttl"] = np.where(egress, 64, 64 - (server_idx % 7)).astype("u1")
    cols["dont_fragment"] = (~udp).astype("u1")
    cols["ip_id"] = rng.integers(0, 65536, rows).astype("<u4")
    # TCP: mostly ACK/PSH-ACK, some SYN, SYN-ACK, FIN-ACK.
    phase = rng.random(rows)
    # SYNs go out from the local (client) side, SYN-ACKs come back from the service side.
    flags = np.select([phase < 0.06, phase < 0.08], [np.where(egress, 0x02, 0x12), 0x11], np.where(phase < 0.5, 0x18, 0x10))
    cols["tcp_flags"] = np.where(udp, 0, flags).astype("<u2")
    cols["tcp_seq"] = np.where(udp, 0, rng.integers(0, 2**32, rows, dtype=np.uint64)).astype("<u4")
    cols["tcp_ack"] = np.where(udp, 0, rng.integers(0, 2**32, rows, dtype=np.uint64)).astype("<u4")
    cols["tcp_window"] = np.where(udp, 0, 502 + (server_idx % 3) * 1000).astype("<u2")
    syn = (~udp) & ((flags & 0x02) != 0)
    cols["tcp_mss"] = np.where(syn, 1460, 0).astype("<u2")
    cols["tcp_wscale"] = np.where(syn, 7, 0).astype("u1")
    size = np.where(udp, 60 + rng.integers(0, 120, rows), np.where(phase < 0.5, 66 + rng.integers(0, 1449, rows), 66))
    cols["wire_len"] = size.astype("<u4")
    cols["udp_len"] = np.where(udp, size - 34, 0).astype("<u2")
    names = np.array(NAMES, dtype=object)[server_idx % len(NAMES)]
    dns_q = udp
    cols["dns_id"] = np.where(dns_q, rng.integers(0, 65536, rows), 0).astype("<u2")
    cols["dns_qname"] = [n if q else "" for n, q in zip(names, dns_q)]
    cols["dns_qtype"] = np.where(dns_q, 1, 0).astype("<u2")
    hello = (~udp) & (service == 443) & (phase >= 0.08) & (phase < 0.09) & egress
    cols["tls_sni"] = [n if h else "" for n, h in zip(names, hello)]
    http = (~udp) & (service == 80) & (phase >= 0.08) & (phase < 0.1) & egress
    cols["http_method"] = ["GET" if h else "" for h in http]
    cols["http_host"] = [n if h else "" for n, h in zip(names, http)]
    cols["http_path"] = [f"/api/v1/items/{i % 500}" if h else "" for i, h in enumerate(http)]
    out: dict[str, dict[str, object]] = {}
    for h in range(hosts):
        sel = np.nonzero(host_of == h)[0]
        out[f"host-{h:02d}"] = {k: ([v[i] for i in sel] if isinstance(v, list) else v[sel]) for k, v in cols.items()}
    return out


def connections(count: int, *, start_ns: int, seconds: float, hosts: int = 8, seed: int = 1,
                servers: int = 40, interim_share: float = 0.03) -> dict[str, dict[str, object]]:
    """Columns of ``count`` connections (``connections`` rows) like ``packets()``' traffic: the
    hosts' addresses connect to the same servers and services; most close cleanly (SF), about
    1% are not answered (S0) or refused (REJ), some reset; ``interim_share`` of them also have
    an interim row (final = 0) half-way, with half the counts. Split by host name."""
    rng = np.random.default_rng(seed)
    start = (start_ns + np.sort(rng.random(count)) * seconds * NS).astype(np.int64)
    host_of = rng.integers(0, hosts, count)
    host_ips = np.array([v16(f"198.18.{h}.{10 + k}") for h in range(hosts) for k in range(4)], dtype="V16")
    server_ips = np.array([v16(f"198.19.{s // 200}.{s % 200 + 1}") for s in range(servers)], dtype="V16")
    server_idx = rng.zipf(1.6, count) % servers
    service = SERVICES[server_idx % len(SERVICES)]
    udp = service == 53
    fate = rng.random(count)
    states = np.where(udp, np.where(fate < 0.01, "S0", "SF"),
                      np.select([fate < 0.006, fate < 0.012, fate < 0.03], ["S0", "REJ", "RSTR"], "SF"))
    history = np.select([udp & (states == "SF"), udp, states == "S0", states == "REJ", states == "RSTR"],
                        ["Dd", "D", "S", "Sr", "ShADadr"], "ShADadFf")
    ok = (states == "SF") | (states == "RSTR")
    up = np.where(ok, rng.integers(40, 4000, count), 0)
    down = np.where(ok, rng.integers(100, 200_000, count) * (~udp) + rng.integers(40, 300, count) * udp, 0)
    opk = np.where(ok, 3 + up // 1400, 1)
    rpk = np.where(ok, 2 + down // 1400, (states == "REJ").astype(int))
    dur = np.where(ok, rng.exponential(2.0, count), np.where(states == "REJ", 0.0002, 0.0))
    cols = registry.empty_columns("connections", count)
    cols["start_ts"] = start
    cols["end_ts"] = (start + dur * NS).astype(np.int64)
    cols["ifname"] = ["eth0"] * count
    cols["uid"] = [f"Csynth{seed:04d}{i:09d}" for i in range(count)]
    cols["final"] = np.ones(count, dtype="u1")
    cols["ip_version"] = np.full(count, 4, dtype="u1")
    cols["ip_proto"] = np.where(udp, 17, 6).astype("u1")
    cols["orig_ip"] = host_ips[host_of * 4 + rng.integers(0, 4, count)]
    cols["orig_port"] = (32768 + rng.integers(0, 28000, count)).astype("<u2")
    cols["resp_ip"] = server_ips[server_idx]
    cols["resp_port"] = service.astype("<u2")
    cols["orig_pkts"], cols["resp_pkts"] = opk.astype("<u8"), rpk.astype("<u8")
    hdr = np.where(udp, 28, 52)
    cols["orig_bytes"], cols["resp_bytes"] = up.astype("<u8"), down.astype("<u8")
    cols["orig_ip_bytes"] = (up + hdr * opk).astype("<u8")
    cols["resp_ip_bytes"] = (down + hdr * rpk).astype("<u8")
    cols["conn_state"] = [str(s) for s in states]
    cols["history"] = [str(s) for s in history]
    cols["handshake_rtt_us"] = np.where(ok & ~udp, 200 + rng.integers(0, 40_000, count), 0).astype("<u4")
    cols["orig_retrans"] = np.where(ok & ~udp & (rng.random(count) < 0.05), 1, 0).astype("<u4")
    cols["community_id"] = [""] * count
    extra = np.nonzero(rng.random(count) < interim_share)[0]  # an interim row half-way, half the counts
    if len(extra):
        for name, v in list(cols.items()):
            part = [v[i] for i in extra] if isinstance(v, list) else v[extra].copy()
            if name in ("orig_pkts", "resp_pkts", "orig_ip_bytes", "resp_ip_bytes", "orig_bytes", "resp_bytes"):
                part = (part // 2).astype(v.dtype)
            elif name == "end_ts":
                part = ((cols["start_ts"][extra] + v[extra]) // 2).astype(v.dtype)
            elif name == "final":
                part = np.zeros(len(extra), dtype="u1")
            elif name == "conn_state":
                part = ["S1" if not u else "SF" for u in udp[extra]]
            cols[name] = (v + part) if isinstance(v, list) else np.concatenate([v, part])
        host_of = np.concatenate([host_of, host_of[extra]])
    out: dict[str, dict[str, object]] = {}
    for h in range(hosts):
        sel = np.nonzero(host_of == h)[0]
        out[f"host-{h:02d}"] = {k: ([v[i] for i in sel] if isinstance(v, list) else v[sel]) for k, v in cols.items()}
    return out


def scan(rows: int, *, start_ns: int, seconds: float, peers: int = 20_000, seed: int = 2,
         host: str = "host-00") -> dict[str, dict[str, object]]:
    """A scan-like mix on one host: ``peers`` sources (a random-source flood or a distributed scan)
    send TCP SYNs to every port of the host's 4 addresses; the host answers each with a RST-ACK.
    Every port and nearly every (peer, address) pair is its own rollup key: the worst case for
    per-minute rollups, and the traffic an anomaly tool exists for."""
    rng = np.random.default_rng(seed)
    ts = (start_ns + np.sort(rng.random(rows)) * seconds * NS).astype(np.int64)
    peer_ips = np.array([v16(f"198.18.{128 + p // 250}.{p % 250 + 1}") for p in range(peers)], dtype="V16")
    local = np.array([v16(f"198.19.200.{10 + k}") for k in range(4)], dtype="V16")[rng.integers(0, 4, rows)]
    remote = peer_ips[rng.integers(0, peers, rows)]
    port = rng.integers(1, 65536, rows).astype(np.uint16)
    eph = rng.integers(1024, 65536, rows).astype(np.uint16)
    reply = rng.random(rows) < 0.5  # half the rows: the host's RST-ACK (egress)
    cols = registry.empty_columns("packets", rows)
    cols["ts"] = ts
    cols["ifname"] = ["eth0"] * rows
    cols["direction"] = np.where(reply, 2, 1).astype("u1")
    cols["sample_rate"] = np.ones(rows, dtype="<u4")
    cols["wire_len"] = np.where(reply, 54, 60).astype("<u4")
    cols["eth_type"] = np.full(rows, 0x0800, dtype="<u2")
    cols["ip_version"] = np.full(rows, 4, dtype="u1")
    cols["eth_src"] = np.where(reply, 0x02AA00000001, 0x02BB00000001).astype("<u8")
    cols["eth_dst"] = np.where(reply, 0x02BB00000001, 0x02AA00000001).astype("<u8")
    cols["src_ip"] = np.where(reply, local, remote)
    cols["dst_ip"] = np.where(reply, remote, local)
    cols["src_port"] = np.where(reply, port, eph).astype("<u2")
    cols["dst_port"] = np.where(reply, eph, port).astype("<u2")
    cols["ip_proto"] = np.full(rows, 6, dtype="u1")
    cols["ttl"] = np.where(reply, 64, rng.integers(40, 64, rows)).astype("u1")
    cols["tcp_flags"] = np.where(reply, 0x14, 0x02).astype("<u2")
    cols["tcp_seq"] = rng.integers(0, 2**32, rows, dtype=np.uint64).astype("<u4")
    cols["tcp_window"] = np.where(reply, 0, 1024).astype("<u2")
    cols["ip_id"] = rng.integers(0, 65536, rows).astype("<u4")
    cols["dont_fragment"] = np.where(reply, 1, 0).astype("u1")
    return {host: cols}
