"""Building the classifier: the C source, its compiler flags, and loading it through BCC.

``cflags(config)`` turns a capture configuration (any object with ``ringbuf_pages``,
``flow_entries``, ``conn.entries``, ``payload_bytes`` and ``dns_ports``; None = the
defaults) into the ``-D`` flags hdrlog.c is compiled with; ``render_source(config)``
is the C exactly as compiled, headers inlined (``hdrlog collector run --print-bpf``,
BCC tools' ``--ebpf``); ``load(config)`` compiles it and returns the BCC object.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

SOURCE_DIR = Path(__file__).resolve().parent
BPF_SOURCE = SOURCE_DIR / "hdrlog.c"
# The headers hdrlog.c includes, in include order (one per feature; types.h mirrored in Python).
HEADERS = ("types.h", "parse.h", "tunnel.h", "payload.h", "modes.h", "filter.h", "flows.h", "conntrack.h")

# Payload copy (types.h HDRLOG_PAYLOAD_*): a TLS ClientHello's SNI can sit 1,100-1,400 bytes in
# (post-quantum key shares, shuffled extensions), DNS names up to ~270; 2048 holds a whole full-sized
# segment, and a hello longer than its segment is joined with the next one (payload.h tls_cont,
# collector/appdecode.py Reassembly). bench/payload_copy.py measures the copy.
PAYLOAD_BYTES = 2048
PAYLOAD_CHUNK = 128
MAX_PAYLOAD_BYTES = 4096

_DEFAULTS = SimpleNamespace(ringbuf_pages=2048, flow_entries=65536, conn=SimpleNamespace(entries=65536),
                            payload_bytes=PAYLOAD_BYTES, dns_ports=[53, 5353])


def cflags(config=None) -> list[str]:
    """Compiler flags for hdrlog.c under this config."""
    config = config or _DEFAULTS
    ports = sorted(set(config.dns_ports))
    is_dns = "||".join(f"(p)=={p}" for p in ports) or "0"
    return [
        f"-I{SOURCE_DIR}",
        f"-DHDRLOG_RINGBUF_PAGES={config.ringbuf_pages}",
        f"-DHDRLOG_FLOW_ENTRIES={config.flow_entries}",
        f"-DHDRLOG_CONN_ENTRIES={config.conn.entries}",
        f"-DHDRLOG_PAYLOAD_BYTES={config.payload_bytes}",
        f"-DHDRLOG_PAYLOAD_CHUNK={PAYLOAD_CHUNK}",
        f"-DHDRLOG_IS_DNS_PORT(p)=({is_dns})",
        "-Wno-macro-redefined",
    ]


def render_source(config=None) -> str:
    """The C the collector compiles, with its cflags."""
    headers = "".join(f"// ---- {h} ----\n{(SOURCE_DIR / h).read_text()}\n" for h in HEADERS)
    return f"// cflags: {' '.join(cflags(config))}\n{headers}// ---- {BPF_SOURCE.name} ----\n{BPF_SOURCE.read_text()}"


def load(config=None, extra_cflags: list[str] | None = None):
    """Compile hdrlog.c through BCC; RuntimeError naming the step when it fails."""
    try:
        from bcc import BPF
    except ImportError as e:  # pragma: no cover - environment problem
        raise RuntimeError("unable to initialize capture: BCC (python3-bpfcc) is not importable") from e
    try:
        return BPF(src_file=str(BPF_SOURCE).encode(), cflags=cflags(config) + list(extra_cflags or ()))
    except Exception as e:
        raise RuntimeError(f"unable to initialize capture: compiling {BPF_SOURCE.name} failed: {e}") from e
