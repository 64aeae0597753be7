"""Corpus captures replayed through the connection tracker: conn_state and history against
expectations written by hand from Zeek's definitions.

The captures are replayed with tcpreplay (--topspeed) on the isolated corpus namespace's veth
(tests/corpus/lab.py: no addresses, no routes), with the capture in auto mode on its egress
hook (tests/conncap.py, short timeouts so each file's connections end before the next file).
Expectations come from each capture's frames (tshark: flags, lengths, relative sequence
numbers), through Zeek's rules: conn_state() in base/protocols/conn/main.zeek over the
TCP endpoint states, and the history letters of TCPSessionAdapter::UpdateHistory (one letter
per kind and side, upper case for the originator; F/S/R again only when their sequence number
changes; T at the 1st, 10th, 100th... retransmission). orig_bytes/resp_bytes: how far each
side's sequence space advanced, SYN and FIN octets left out.

Ambiguous cases, and what is expected here:

* **Mid-stream start from a server port** (ipv4_tcp_http_xml.pcap: one data segment from port
  80; tcp_rst_data.pcap: one RST+ACK with data from port 80). Zeek's TCP WantConnection flips
  the roles when the first packet's source port is a likely server port (history '^').
  hdrlog's kernel has no likely_server_ports list: the sender of the first packet is the
  originator (flipped only for a SYN+ACK seen first). Expected: no flip ("D" / "R", OTH).
  A deliberate difference from Zeek.
* **FIN without a SYN, responder silent** (ldp-common-session.pcap, first connection: data,
  then FIN, one side only): Zeek's documentation says SH is "a SYN followed by a FIN"; its
  conn_state() code returns SH for any closed originator whose peer is inactive or partial.
  Expected: the code's answer, SH with history "DF".
* **SYN, then data and ACKs, never a SYN-ACK** (the same file's second connection, captured on
  one side only): first written here as OTH; Zeek's UpdateSYN_SentState only notes
  "data_before_established" for data in SYN_SENT and leaves the state, so the originator stays
  SYN_SENT, the responder inactive: S0 ("attempt seen, no reply"), history "SDA". Expected: S0.
* **Data on a SYN** (bgp-bfd-cease.pcap: a lone SYN with 21 payload bytes): S0, history "S";
  orig_bytes counts the 21 bytes (the sequence space advanced by them). The kernel wrote "TS"
  until bpf/conntrack.h compared the payload's start one past the SYN octet (KERNEL_BUGS below,
  checked on its own by test_corpus_kernel_bugs_fixed).
* **Data on a RST** (tcp_rst_data.pcap): 58 bytes counted as the originator's (they advance
  the sequence space); Zeek would count them for the flipped responder.
* **SYN+FIN+RST in one segment** (tcp_eight_lowest_weight_flags_set.pcap): history "I" (FIN and
  RST together, Zeek's letter). The state: the RST wins (the originator is RESET, the peer
  inactive), and RSTOS0 needs a history starting with S, so OTH.
* **A retransmitted FIN segment with data** (ssh.pcap: the client's FIN, then its last 96
  bytes again with FIN): one 'F' (the FIN's sequence number did not change) and a 'T'.
* Captures that end with connections open (bgp-4byte-asn.pcap's sessions, idle at the end of
  the file) get their final row at the inactivity timeout: S1 ("ShADad"), as Zeek writes
  them at the end of a trace.

``HDRLOG_CORPUS=full`` adds every capture with TCP in it (no hand expectations): every
connection has one final row and a state of Zeek's vocabulary (last run: 74 captures, 103 TCP
connections).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from tests.corpus.lab import ROOT, SEND_IF, IsolatedLab
from tests.corpus.runner import CORPUS

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="eBPF and network namespaces need root")
FULL = os.environ.get("HDRLOG_CORPUS") == "full"
ZEEK_STATES = {"S0", "S1", "SF", "REJ", "S2", "S3", "RSTO", "RSTR", "RSTOS0", "RSTRH", "SH", "SHR", "OTH"}

# file -> [(orig_ip, orig_port, resp_ip, resp_port, conn_state, history, orig_bytes, resp_bytes)]
EXPECTED = {
    "dns_tcp.pcap": [  # DNS over TCP: clean close, originator first
        ("192.168.1.11", 33779, "209.87.249.18", 53, "SF", "ShADadFf", 58, 226)],
    "mptcp-fclose.pcap": [  # one byte each way, then the responder resets
        ("10.1.1.2", 37479, "10.2.1.2", 2002, "RSTR", "ShADadr", 1, 1)],
    "mptcp-aa-v1.pcap": [  # 3 x 16 bytes up, 5 x 16 down, clean close
        ("192.168.125.212", 52278, "192.168.125.165", 55555, "SF", "ShADadFf", 48, 80)],
    "mptcp-v0.pcap": [  # two SSH sessions (the server speaks first): one reset by the client, one closed
        ("10.2.1.2", 35961, "10.1.1.2", 22, "RSTO", "ShAdDaR", 3785, 5257),
        ("10.2.1.2", 41221, "10.1.2.2", 22, "SF", "ShAadDFf", 1336, 3304)],
    "ssh.pcap": [  # the client's FIN, then its last segment again with the FIN (a retransmission)
        ("202.108.87.165", 62146, "223.132.53.222", 22, "SF", "ShADadFTf", 5281, 3311)],
    "bgp-4byte-asn.pcap": [  # BGP sessions left open, two refused, one closed responder first
        ("1.0.2.2", 42741, "1.0.2.1", 179, "S1", "ShADad", 174, 224),
        ("1.0.3.2", 43415, "1.0.3.1", 179, "REJ", "Sr", 0, 0),
        ("1.0.4.2", 34995, "1.0.4.1", 179, "REJ", "Sr", 0, 0),
        ("1.0.3.1", 35169, "1.0.3.2", 179, "S1", "ShADad", 301, 87),
        ("1.0.4.1", 34883, "1.0.4.2", 179, "S1", "ShADad", 327, 81),
        ("1.0.0.1", 33993, "1.0.0.2", 179, "SF", "ShADadfF", 155, 114)],
    "ldp-common-session.pcap": [  # one side only: a mid-stream start closed, a SYN never answered
        ("192.168.0.2", 58320, "192.168.0.1", 646, "SH", "DF", 32, 0),
        ("192.168.0.2", 58321, "192.168.0.1", 646, "S0", "SDA", 1274, 0)],
    "ipv4_tcp_http_xml.pcap": [  # one mid-stream data segment from port 80 (Zeek would flip: '^d')
        ("10.21.11.94", 80, "10.114.101.120", 5767, "OTH", "D", 605, 0)],
    "tcp_rst_data.pcap": [  # one RST+ACK with data from port 80
        ("199.204.31.89", 80, "172.16.133.41", 52875, "OTH", "R", 58, 0)],
    "bgp-bfd-cease.pcap": [  # a lone SYN carrying data
        ("127.0.0.1", 20, "127.0.0.1", 179, "S0", "S", 21, 0)],
    "tcp_eight_lowest_weight_flags_set.pcap": [  # SYN+FIN+RST+... in one segment
        ("10.0.0.2", 6260, "10.128.0.2", 80, "OTH", "I", 0, 0)],
}


# Cases the kernel tracker got wrong, now fixed and checked by their own test:
# (file, orig_port) -> what it wrote before the fix.
KERNEL_BUGS = {("bgp-bfd-cease.pcap", 20): ("S0", "TS", 21, 0)}  # data on a SYN counted as a retransmission


def _replay(files: list[str], tmp_path) -> tuple[list[dict], list[dict]]:
    """(connection rows, per-file events) of replaying ``files`` in an isolated namespace."""
    with IsolatedLab() as lab:
        p = subprocess.Popen(["ip", "netns", "exec", lab.netns, sys.executable, "-m", "tests.conncap", "--iface",
                              SEND_IF, "--tcp-timeout", "1", "--udp-timeout", "1", "--icmp-timeout", "1",
                              "--linger", "0.2", "--replay", *files], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
        err: list[str] = []
        t = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
        t.start()
        try:
            out, _ = p.communicate(timeout=120 + 10 * len(files))
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        t.join(5)
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    rows = [r for r in lines if "uid" in r]
    events = [r for r in lines if "uid" not in r]
    assert any(e.get("done") for e in events), "".join(err)[-3000:]
    return rows, events


def _key(r: dict) -> tuple:
    return (r["orig_ip"], r["orig_port"], r["resp_ip"], r["resp_port"])


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    files = sorted(EXPECTED)
    rows, events = _replay([str(CORPUS / f) for f in files], tmp_path_factory.mktemp("conns"))
    assert [e["rc"] for e in events if "replayed" in e] == [0] * len(files), events
    return rows


def _compare(rows: list[dict], bugs: str) -> tuple[list[str], list[str]]:
    """(table lines, problems); ``bugs``: "skip" the KERNEL_BUGS cases, or "only" check them (against
    EXPECTED; a row that still shows the old bug says so)."""
    table, problems = [], []
    for f in sorted(EXPECTED):
        finals = {_key(r): r for r in rows if r["final"] and r["ip_proto"] == 6 and r.get("file", "").endswith(f)}
        for o_ip, o_p, r_ip, r_p, state, hist, ob, rb in EXPECTED[f]:
            got = finals.pop((o_ip, o_p, r_ip, r_p), None)
            if ((f, o_p) in KERNEL_BUGS) != (bugs == "only"):
                continue
            if got is None:
                problems.append(f"{f}: no final row for {o_ip}:{o_p} -> {r_ip}:{r_p}")
                continue
            have = (got["conn_state"], got["history"], got["orig_bytes"], got["resp_bytes"])
            table.append(f"{f:40} {o_p:>5}->{r_p:<5} {have[0]:6} {have[1]:10} {have[2]:>5} {have[3]:>5}")
            if have != (state, hist, ob, rb):
                old = " (the kernel bug fixed in bpf/conntrack.h)" if have == KERNEL_BUGS.get((f, o_p)) else ""
                problems.append(f"{f} {o_ip}:{o_p}->{r_ip}:{r_p}: want {(state, hist, ob, rb)}, got {have}{old}")
        if bugs == "skip":
            problems += [f"{f}: unexpected connection {k}: {r['conn_state']} {r['history']}"
                         for k, r in finals.items()]
    return table, problems


def test_corpus_tcp_connections_match_zeek_by_hand(replayed):
    table, problems = _compare(replayed, "skip")
    print("\n".join(table))
    finals = [r for r in replayed if r["final"]]
    assert len({r["uid"] for r in finals}) == len(finals)  # one final row per connection
    assert not problems, "\n".join(problems)


def test_corpus_kernel_bugs_fixed(replayed):
    """Data on a SYN (bgp-bfd-cease.pcap) is new data, not a retransmission: history "S", not "TS"."""
    table, problems = _compare(replayed, "only")
    assert not problems, "\n".join(problems)
    assert len(table) == len(KERNEL_BUGS)  # every case was found and compared


@pytest.mark.skipif(not FULL, reason="HDRLOG_CORPUS=full runs every capture with TCP")
def test_corpus_every_tcp_conversation_has_one_final_row(tmp_path):
    files = []
    for path in sorted(CORPUS.glob("*.pcap*")):
        p = subprocess.run(["tshark", "-r", str(path), "-q", "-z", "conv,tcp"], capture_output=True, text=True,
                           timeout=120)
        if "<->" in p.stdout:
            files.append(str(path))
    rows, _ = _replay(files, tmp_path)
    bad = [r for r in rows if r["ip_proto"] == 6 and r["conn_state"] not in ZEEK_STATES]
    assert not bad, bad[:5]
    finals = [r for r in rows if r["final"]]
    assert len({r["uid"] for r in finals}) == len(finals)
    print(f"{len(files)} captures, {sum(r['ip_proto'] == 6 for r in finals)} TCP connections")
