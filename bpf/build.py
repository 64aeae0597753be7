"""Building the classifier: the C source, its compiler flags, and loading it through BCC.

``cflags(config)`` turns a capture configuration (any object with ``ringbuf_pages``,
``flow_entries``, ``conn.entries``, ``payload_bytes`` and ``dns_ports``, and optionally
``tunnels``, ``vxlan_ports``, ``geneve_ports``; None = the defaults) into the ``-D`` flags hdrlog.c is compiled with; ``render_source(config)``
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

# Tunnels (tunnel.h): the types opened and the UDP ports of the two UDP ones (collector/config.py
# mirrors them). Compiled in as constants: a port list is the same compares tunnel.h's defaults were.
TUNNEL_TYPES = ("vxlan", "geneve", "gre", "ipip")
VXLAN_PORTS = (4789, 8472)
GENEVE_PORTS = (6081,)

_DEFAULTS = SimpleNamespace(ringbuf_pages=2048, flow_entries=65536, conn=SimpleNamespace(entries=65536),
                            payload_bytes=PAYLOAD_BYTES, dns_ports=[53, 5353], tunnels=list(TUNNEL_TYPES),
                            vxlan_ports=list(VXLAN_PORTS), geneve_ports=list(GENEVE_PORTS))


def _port_test(ports) -> str:
    return "||".join(f"(p)=={int(p)}" for p in sorted(set(ports))) or "0"


def tunnel_cflags(config=None) -> list[str]:
    """The -D flags of tunnel.h: which tunnels are opened, on which UDP ports (none: HDRLOG_TUNNELS=0,
    the tunnel step is not compiled in)."""
    config = config or _DEFAULTS
    types = set(getattr(config, "tunnels", TUNNEL_TYPES))
    vxlan = getattr(config, "vxlan_ports", VXLAN_PORTS) if "vxlan" in types else ()
    geneve = getattr(config, "geneve_ports", GENEVE_PORTS) if "geneve" in types else ()
    gre, ipip = int("gre" in types), int("ipip" in types)
    on = int(bool(vxlan or geneve or gre or ipip))
    return [f"-DHDRLOG_TUNNELS={on}", f"-DHDRLOG_IS_VXLAN_PORT(p)=({_port_test(vxlan)})",
            f"-DHDRLOG_IS_GENEVE_PORT(p)=({_port_test(geneve)})", f"-DHDRLOG_TUNNEL_GRE={gre}",
            f"-DHDRLOG_TUNNEL_IPIP={ipip}"]


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
        *tunnel_cflags(config),
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
