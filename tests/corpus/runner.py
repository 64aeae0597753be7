"""Replay corpus captures through the classifier and compare every record with tshark.

``run(files, workdir)`` builds an isolated lab (tests/corpus/lab.py), replays the
files inside it with the capture attached to the sending veth's egress hook
(tests/corpus/replay_capture.py), dissects the same files with tshark in
parallel, aligns records to frames and returns a ``Report``: per-field agreement,
frames the kernel would not send, disagreements, and per-file robustness facts.

Why egress on the sending veth: it sees each frame exactly as tcpreplay wrote it.
At ingress of the peer the veth receive path has already run eth_type_trans and
moved an outer VLAN tag into skb metadata (we would log it, but as metadata),
and the peer's receive path drops frames its own checks dislike before TC ever
runs; egress is the one hook every frame that was sent must cross.

Also a command: ``python -m tests.corpus.runner [--full | FILE...]`` prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tests.corpus import oracle
from tests.corpus.lab import IsolatedLab

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "pcaps" / "tcpdump"
if not CORPUS.is_dir():
    CORPUS = Path("/work/shared/corpus/pcaps/tcpdump")
DNS_PORTS = "53,5353,5355,8053"  # what tshark 4.0 dissects as DNS, mDNS and LLMNR (8053: its heuristics)

# make test's subset: fixed, representative, quick (real traffic of every kind we parse,
# tunnels, VLANs, IPv6 extension headers, fragments, and malformed captures).
SUBSET = [
    # real traffic of every kind we parse
    "dns_tcp.pcap", "dns_udp.pcap", "dns_udp_2.pcap", "dns_udp_8053.pcap", "dns_tcp_8053.pcap", "dnssec.pcap",
    "edns-opts.pcap", "dns-uri.pcap", "ipv4_tcp_http_xml.pcap", "ipv4_tcp_http_xml_tso.pcap", "mptcp-aa-v1.pcap",
    "mptcp-fclose.pcap", "mptcp-v0.pcap", "tcp_rst_data.pcap", "tcp_eight_lowest_weight_flags_set.pcap",
    "icmpv6.pcap", "icmpv6-ra-pref64.pcap", "icmp-rfc8335.pcap", "syslog_udp.pcap", "espudp1.pcap",
    "802.1ad_QinQ.pcap", "LLDP_and_CDP.pcap", "OSPFv3_with_AH.pcap", "EIGRP_ipv6.pcap", "DTP.pcap", "afs.pcap",
    # tunnels, GSO/BIG TCP, IPv6 extension headers, fragments
    "bigtcp-ipv4.pcap", "bigtcp-ipv6-hbh.pcap", "bigtcp-ipv4-vxlan-ipv6.pcap", "gso-ipv6-geneve-ipv4.pcap",
    "vxlan.pcap", "geneve.pcap", "various_gre.pcap", "mpls-over-udp.pcap", "ipv6-routing-header.pcap",
    "ipv6-srh-ext-header.pcap", "ipv6_jumbogram_1.pcap", "ipv6_no_next_header.pcap", "ip6_frag_asan.pcap",
    # malformed on purpose
    "dns-badlabel.pcap", "dns_fwdptr.pcap", "dns-zlip-1.pcap", "dns-zlip-3.pcap", "dns-badvers.pcap",
    "ipv6-bad-version.pcap", "ipv6_39_byte_header.pcap", "ipv6_frag6_negative_len.pcap", "ipv6_invalid_length.pcap",
    "ipv6-too-long-jumbo.pcap", "ipv6_missing_jumbo_payload_option.pcap", "ipv4_invalid_hdr_length.pcap",
    "ipv4_invalid_total_length.pcap", "tcp_rst_data-trunc.pcap", "mptcp-dss-oobr.pcap", "dccp_options-oobr.pcap",
    "aoe-oobr-1.pcap", "arp-too-long-tha.pcap", "icmp-icmp_print-oobr-1.pcap", "bgp_vpn_rt-oobr.pcap",
    "cve-2014-8767-OLSR.pcap", "heapoverflow-in_checksum.pcap", "telnet-iac-check-oobr.pcap",
]


@dataclass
class Report:
    files: int = 0
    frames: int = 0
    crossed: int = 0
    agree: Counter = field(default_factory=Counter)
    compared: Counter = field(default_factory=Counter)
    disagreements: list[dict] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # robustness failures (stalls, crashes, lost records)
    not_compared: Counter = field(default_factory=Counter)
    ringbuf_full: int = 0
    seconds: float = 0.0

    def table(self) -> str:
        lines = [f"{'field':16} {'compared':>9} {'agree':>9} {'disagree':>8} {'agreement':>10}"]
        for name in oracle.COMPARED:
            n, a = self.compared[name], self.agree[name]
            pct = f"{100.0 * a / n:9.3f}%" if n else "        -"
            lines.append(f"{name:16} {n:9d} {a:9d} {n - a:8d} {pct:>10}")
        return "\n".join(lines)

    def summary(self) -> str:
        out = [f"{self.files} files, {self.frames} frames, {self.crossed} crossed the veth, "
               f"{len(self.refused)} refused by the kernel, {self.ringbuf_full} ring-buffer drops, "
               f"{self.seconds:.0f} s", self.table()]
        if self.refused:
            out.append("frames the kernel would not send:")
            by = Counter((r["reason"]) for r in self.refused)
            for reason, n in by.most_common():
                out.append(f"  {n:5d}  {reason}")
            for r in self.refused[:40]:
                out.append(f"    {r['file']}#{r['frame']} ({r['len']} bytes): {r['reason']}")
        if self.not_compared:
            out.append("frames with layers not compared (parser limits / tshark could not dissect):")
            for note, n in self.not_compared.most_common():
                out.append(f"  {n:5d}  {note}")
        if self.disagreements:
            out.append("disagreements (file#frame field: ours vs tshark [protocols]):")
            for d in self.disagreements[:200]:
                out.append(f"  {d['file']}#{d['frame']} {d['field']}: {d['ours']} vs {d['tshark']}  [{d['path']}]")
        if self.problems:
            out.append("ROBUSTNESS PROBLEMS:")
            out += [f"  {p}" for p in self.problems]
        return "\n".join(out)


def compare_file(report: Report, name: str, frames: list[bytes], tframes: list[dict], cols: dict,
                 result: dict) -> None:
    report.files += 1
    report.frames += len(frames)
    if len(tframes) != len(frames):
        report.problems.append(f"{name}: tshark saw {len(tframes)} frames, the file holds {len(frames)}")
    match, leftover = oracle.align(frames, cols["wire_len"], cols["eth_dst"], cols["eth_src"])
    if leftover:
        report.problems.append(f"{name}: {leftover} records match no frame (alignment lost)")
    crossed = sum(1 for m in match if m is not None)
    report.crossed += crossed
    c = result["counters"]
    report.ringbuf_full += c.get("ringbuf_full", 0)
    if not result["marker"]:
        report.problems.append(f"{name}: the end-of-file marker never came back (stall)")
    if c.get("seen", 0) - 1 != c.get("logged", 0) - 1 + c.get("ringbuf_full", 0):
        report.problems.append(f"{name}: seen {c.get('seen')} != logged {c.get('logged')} + ringbuf_full")
    # Every frame tcpreplay sent crossed egress: one record, or a counted ring-buffer drop.
    sent = _tcpreplay_count(result["tcpreplay"], "Successful packets")
    failed = _tcpreplay_count(result["tcpreplay"], "Failed packets")
    if sent is not None and sent != c.get("seen", 0) - 1:
        report.problems.append(f"{name}: tcpreplay sent {sent}, the classifier saw {c.get('seen', 0) - 1}")
    if len(cols["wire_len"]) + c.get("ringbuf_full", 0) != c.get("seen", 0) - 1:
        report.problems.append(f"{name}: {len(cols['wire_len'])} records + {c.get('ringbuf_full')} drops "
                               f"!= {c.get('seen', 0) - 1} frames seen")
    missing = [i for i, m in enumerate(match) if m is None]
    if failed is not None and c.get("ringbuf_full", 0) == 0 and failed != len(missing):
        report.problems.append(f"{name}: tcpreplay failed {failed} frames, {len(missing)} have no record")
    aborted = "safe_pcap_next ERROR" in result["tcpreplay"]
    for i in missing:
        reason = oracle.refusal_reason(frames[i])
        if aborted and reason.startswith("no record"):
            reason = "never sent: tcpreplay stopped at a malformed pcap record before it"
        report.refused.append({"file": name, "frame": i + 1, "len": len(frames[i]), "reason": reason})
        if reason.startswith("no record") and not c.get("ringbuf_full"):
            report.problems.append(f"{name}#{i + 1}: {len(frames[i])}-byte frame has no record")
    for i, j in enumerate(match):
        if j is None or i >= len(tframes):
            continue
        exp = oracle.expected(tframes[i])
        if exp.note:
            report.not_compared[exp.note] += 1
        for fname, want in exp.values.items():
            if fname not in report.compared and fname not in oracle.COMPARED:
                continue
            got = oracle.ours(cols, j, fname)
            report.compared[fname] += 1
            if got == want:
                report.agree[fname] += 1
            else:
                report.disagreements.append({"file": name, "frame": i + 1, "field": fname,
                                             "ours": oracle.show(fname, got), "tshark": oracle.show(fname, want),
                                             "path": exp.path})


def _tcpreplay_count(text: str, label: str) -> int | None:
    for line in text.splitlines():
        if line.strip().startswith(label + ":"):
            try:
                return int(line.split(":")[1])
            except ValueError:
                return None
    return None


def run(files: list[str], workdir: Path, timeout: float = 1800) -> Report:
    t0 = time.monotonic()
    paths = [str(CORPUS / f) if not os.path.isabs(f) else f for f in files]
    report = Report()
    with ThreadPoolExecutor(max_workers=max(2, (os.cpu_count() or 2))) as pool, IsolatedLab() as lab:
        tshark = {p: pool.submit(oracle.tshark_frames, p) for p in paths}
        proc = lab.start_replay(paths, workdir, DNS_PORTS)
        try:
            proc.wait(timeout)
        except Exception:
            report.problems.append(f"replay did not finish within {timeout:.0f}s")
        log = (workdir / "replay.log").read_text(errors="replace") if (workdir / "replay.log").exists() else ""
        if proc.returncode not in (0, None):
            report.problems.append(f"replay/capture process exited {proc.returncode}: {log[-2000:]}")
        results = {}
        if (workdir / "results.jsonl").exists():
            for line in (workdir / "results.jsonl").read_text().splitlines():
                r = json.loads(line)
                results[r["file"]] = r
        for p in paths:
            name = os.path.basename(p)
            r = results.get(p)
            if r is None:
                report.problems.append(f"{name}: not replayed")
                continue
            with np.load(workdir / f"{r['index']:04d}.npz", allow_pickle=True) as z:
                cols = {k: z[k] for k in z.files}
            compare_file(report, name, oracle.pcap_frames(p), tshark[p].result(), cols, r)
    report.seconds = time.monotonic() - t0
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description="replay the tcpdump corpus and compare with tshark")
    ap.add_argument("--full", action="store_true", help="every capture in the corpus")
    ap.add_argument("--json", help="write the disagreements and refusals here")
    ap.add_argument("files", nargs="*")
    args = ap.parse_args()
    files = args.files or (sorted(p.name for p in CORPUS.glob("*.pcap")) if args.full else SUBSET)
    with tempfile.TemporaryDirectory(prefix="hdrlog-corpus-") as tmp:
        report = run(files, Path(tmp))
    print(report.summary())
    if args.json:
        Path(args.json).write_text(json.dumps({"disagreements": report.disagreements, "refused": report.refused,
                                               "problems": report.problems}, indent=1))
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
