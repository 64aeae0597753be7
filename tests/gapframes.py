"""Messages and frames built like the decoding gaps of issue 14, shared by the unit, capture and pcap tests.

Each builder gives the bytes real traffic carries: a browser-sized ClientHello
(post-quantum X25519MLKEM768 key share of 1,216 bytes before SNI, ALPN and
supported_versions), WebDAV and token-method requests, bare-LF requests, a
scanner's request target with spaces, DNS names near and over 255 octets, and
frames with three and four VLAN tags.
"""

from __future__ import annotations

import struct

from scapy.layers.dns import DNS, DNSQR
from scapy.layers.tls.extensions import (ProtocolName, ServerName, TLS_Ext_ALPN, TLS_Ext_Padding,
                                         TLS_Ext_ServerName, TLS_Ext_SupportedGroups,
                                         TLS_Ext_SupportedVersion_CH, TLS_Ext_SupportedVersion_SH)
from scapy.layers.tls.handshake import TLSClientHello, TLSServerHello
from scapy.layers.tls.keyexchange_tls13 import KeyShareEntry, TLS_Ext_KeyShare_CH, TLS_Ext_KeyShare_SH
from scapy.layers.tls.record import TLS

PQ_SNI = "pq.example.org"


def pq_client_hello(sni: str = PQ_SNI, padding: int = 250) -> bytes:
    """A ClientHello shaped like Chrome's with X25519MLKEM768 (~1,770 bytes): the key share and a padding
    extension come first, so SNI, ALPN and supported_versions start past byte 1,500 (in a second segment)."""
    return bytes(TLS(msg=[TLSClientHello(ciphers=[0x1A1A, 0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C], ext=[
        TLS_Ext_SupportedGroups(groups=[0x1A1A, 0x11EC, 29, 23]),
        TLS_Ext_KeyShare_CH(client_shares=[KeyShareEntry(group=0x11EC, key_exchange=b"\x11" * 1216),
                                           KeyShareEntry(group=29, key_exchange=b"\x22" * 32)]),
        TLS_Ext_Padding(padding=b"\0" * padding),
        TLS_Ext_ServerName(servernames=[ServerName(servername=sni.encode())]),
        TLS_Ext_ALPN(protocols=[ProtocolName(protocol=b"h2"), ProtocolName(protocol=b"http/1.1")]),
        TLS_Ext_SupportedVersion_CH(versions=[0x2A2A, 0x0304, 0x0303])])]))


def pq_server_hello() -> bytes:
    """A TLS 1.3 ServerHello answering with an X25519MLKEM768 share (1,120 bytes): over 1,024 in all."""
    return bytes(TLS(msg=[TLSServerHello(version=0x0303, cipher=0x1301, ext=[
        TLS_Ext_KeyShare_SH(server_share=KeyShareEntry(group=0x11EC, key_exchange=b"\x33" * 1120)),
        TLS_Ext_SupportedVersion_SH(version=0x0304)])]))


def hello_without_extensions(version: int = 0x0301) -> bytes:
    """A ClientHello that ends (by its own length) right after the compression methods."""
    body = struct.pack("!H", version) + b"\x01" * 32 + b"\x00" + b"\x00\x02\x00\x2f" + b"\x01\x00"
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs


def hello_ending_inside_ciphers() -> bytes:
    """A malformed ClientHello whose length ends it inside its cipher-suite list."""
    body = struct.pack("!H", 0x0303) + b"\x02" * 32 + b"\x00" + b"\x00\x10\x13\x01"
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs


SCANNER_GET = b"GET /cgi-bin/x;cat /etc/passwd|?d=1 HTTP/1.1\r\nHost: victim.example.org\r\nUser-Agent: scan/1\r\n\r\n"
WEBDAV = [
    b"PROPFIND /dav/ HTTP/1.1\r\nHost: dav.example.org\r\nUser-Agent: davfs/1\r\nDepth: 1\r\n\r\n",
    b"PROPPATCH /dav/a HTTP/1.1\r\nHost: dav.example.org\r\n\r\n",
    b"MKCOL /dav/new/ HTTP/1.1\r\nHost: dav.example.org\r\n\r\n",
    b"COPY /dav/a HTTP/1.1\r\nHost: dav.example.org\r\nDestination: /dav/b\r\n\r\n",
    b"MOVE /dav/b HTTP/1.1\r\nHost: dav.example.org\r\n\r\n",
    b"LOCK /dav/a HTTP/1.1\r\nHost: dav.example.org\r\n\r\n",
    b"UNLOCK /dav/a HTTP/1.1\r\nHost: dav.example.org\r\n\r\n",
    b"SEARCH /dav/ HTTP/1.1\r\nHost: dav.example.org\r\n\r\n",
]
TOKEN_METHOD = b"BREW /pot-1 HTTP/1.1\r\nHost: coffee.example.org\r\n\r\n"
BARE_LF = b"GET /lf-only HTTP/1.1\nHost: lf.example.org\nUser-Agent: lf/1\n\n"

LONG_LABELS = ["a" * 63, "b" * 63, "c" * 63, "d" * 61]  # 63+63+63+61 + 4 length octets + root = 255 octets


def dns_long_name_query(over: bool) -> bytes:
    """A query for a 255-octet name (the limit), or one that goes past it (with a dotted label to escape)."""
    if not over:
        name = b".".join(x.encode() for x in LONG_LABELS) + b"."
        return bytes(DNS(id=0x4242, rd=1, qd=DNSQR(qname=name, qtype="TXT")))
    # Built by hand (scapy refuses names over 255): labels with bytes to escape, going past 255 octets.
    labels = [b"x." * 31 + b"x"] * 5  # 63-byte labels, 31 dots each -> \046 escapes
    qname = b"".join(bytes([len(x)]) + x for x in labels) + b"\x00"
    return struct.pack("!HHHHHH", 0x4343, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 16, 1)


def single_segment_hello() -> bytes:
    """A 1,3xx-byte ClientHello in one segment whose SNI sits past byte 1,100 (a 1,000-byte key share first)."""
    return bytes(TLS(msg=[TLSClientHello(ciphers=[0x1301, 0x1302, 0x1303], ext=[
        TLS_Ext_KeyShare_CH(client_shares=[KeyShareEntry(group=0x11EC, key_exchange=b"\x44" * 1100)]),
        TLS_Ext_ServerName(servernames=[ServerName(servername=b"single.example.org")]),
        TLS_Ext_ALPN(protocols=[ProtocolName(protocol=b"h2")]),
        TLS_Ext_SupportedVersion_CH(versions=[0x0304])])]))


DOTTED_LABELS = [b"x." * 31 + b"x"] * 3 + [b"y" * 61]  # 255 octets with length octets and root; 93 dots to escape


def dns_dotted_name_query() -> bytes:
    """A legal 255-octet name whose labels hold dots: 373 characters once escaped (\\046), over any char cap."""
    qname = b"".join(bytes([len(x)]) + x for x in DOTTED_LABELS) + b"\x00"
    return struct.pack("!HHHHHH", 0x4545, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)


DOTTED_QNAME = ".".join(x.decode().replace(".", "\\046") for x in DOTTED_LABELS)
