"""From the engine's output to the bytes a client receives, chunk by chunk.

The path of one chunk of a result (``Encoder.feed``):

1. ``Joiner``: the engine streams one chunk per block, each written by a fresh format writer; for the
   formats with a header (``*WithNames``, ``*WithNamesAndTypes``) the header of every chunk but the first
   is dropped, so the chunks join into one valid answer.
2. ``encode_result(out, fmt, params)``: the one place where the engine's bytes may be re-encoded for a
   client; ``Native`` with ``client_protocol_version`` goes to ``hdrlog.server.native`` when present.
3. ``compress=1``: ClickHouse's own compressed blocks (CityHash128 checksum, method byte, sizes, LZ4
   payload), as clickhouse-go and ClickHouse's own clients read them.
4. HTTP compression: with ``enable_http_compression=1``, the first method of the client's
   ``Accept-Encoding`` among gzip, deflate, br, zstd and lz4 (ClickHouse's own names).
"""

from __future__ import annotations

import struct
import zlib
from typing import Mapping

# Formats whose per-block chunks join by plain concatenation.
STREAMED = frozenset({
    "Native", "TabSeparated", "TSV", "TabSeparatedRaw", "TSVRaw", "CSV", "JSONEachRow", "JSONLines", "NDJSON",
    "JSONStringsEachRow", "JSONCompactEachRow", "JSONCompactStringsEachRow", "RowBinary", "LineAsString",
    "RawBLOB", "TSKV", "Null",
})
# Formats that repeat a header of N text lines in every chunk.
HEADER_LINES = {
    "TabSeparatedWithNames": 1, "TSVWithNames": 1, "TabSeparatedRawWithNames": 1, "TSVRawWithNames": 1,
    "TabSeparatedWithNamesAndTypes": 2, "TSVWithNamesAndTypes": 2, "CSVWithNames": 1, "CSVWithNamesAndTypes": 2,
    "JSONCompactEachRowWithNames": 1, "JSONCompactEachRowWithNamesAndTypes": 2,
}
BINARY_HEADER = {"RowBinaryWithNames": 1, "RowBinaryWithNamesAndTypes": 2}  # name lists after the column count

HTTP_ENCODINGS = ("gzip", "deflate", "br", "zstd", "lz4")
ZLIB_LEVEL = 3  # ClickHouse's http_zlib_compression_level default
COMPRESSED_BLOCK = 1 << 20  # ClickHouse's max_compress_block_size
LZ4_METHOD = 0x82


def streamable(fmt: str) -> bool:
    """True when the engine's chunks of ``fmt`` can go out as they come."""
    return fmt in STREAMED or fmt in HEADER_LINES or fmt in BINARY_HEADER


def encode_result(out: bytes, fmt: str, params: Mapping[str, str]) -> bytes:
    """The engine's output (whole blocks) as this client asked for it.

    ``Native`` at a client's revision: clickhouse-go (Grafana) sends ``client_protocol_version`` and reads
    Native with block info and serialization flags at that revision; ``hdrlog.server.native`` rewrites the
    engine's revision-0 Native for it (the value was checked before the query ran, server/sql/http.py).
    """
    from hdrlog.server import native

    return native.for_client(out, fmt, params.get("client_protocol_version"))


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _text_header(chunk: bytes, lines: int, csv: bool) -> int:
    """Length of the first ``lines`` lines (a CSV name may hold a quoted newline)."""
    pos = 0
    for _ in range(lines):
        if csv:
            quoted = False
            while pos < len(chunk):
                ch = chunk[pos]
                pos += 1
                if ch == 0x22:
                    quoted = not quoted
                elif ch == 0x0A and not quoted:
                    break
        else:
            nl = chunk.find(b"\n", pos)
            pos = len(chunk) if nl < 0 else nl + 1
    return pos


def _binary_header(chunk: bytes, lists: int) -> int:
    count, pos = _varint(chunk, 0)
    for _ in range(count * lists):
        size, pos = _varint(chunk, pos)
        pos += size
    return pos


class Joiner:
    """Drops the repeated header of every chunk after the first."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.header: bytes | None = None

    def _header_len(self, chunk: bytes) -> int:
        if self.fmt in HEADER_LINES:
            return _text_header(chunk, HEADER_LINES[self.fmt], self.fmt.startswith("CSV"))
        if self.fmt in BINARY_HEADER:
            return _binary_header(chunk, BINARY_HEADER[self.fmt])
        return 0

    def feed(self, chunk: bytes) -> bytes:
        if self.fmt not in HEADER_LINES and self.fmt not in BINARY_HEADER:
            return chunk
        if self.header is None:
            self.header = chunk[: self._header_len(chunk)]
            return chunk
        if self.header and chunk.startswith(self.header):
            return chunk[len(self.header):]
        return chunk


def compressed_blocks(data: bytes) -> bytes:
    """``data`` in ClickHouse's compressed block framing (LZ4), blocks of at most 1 MiB."""
    import lz4.block
    from clickhouse_cityhash.cityhash import CityHash128

    out = bytearray()
    for start in range(0, len(data), COMPRESSED_BLOCK):
        raw = data[start:start + COMPRESSED_BLOCK]
        payload = lz4.block.compress(raw, store_size=False)
        block = struct.pack("<BII", LZ4_METHOD, 9 + len(payload), len(raw)) + payload
        digest = CityHash128(block)
        out += struct.pack("<QQ", digest & 0xFFFFFFFFFFFFFFFF, digest >> 64) + block
    return bytes(out)


def pick_encoding(accept: str) -> str:
    """The first of the client's Accept-Encoding methods that is served ('' for none)."""
    for item in accept.split(","):
        name, _, q = item.strip().partition(";")
        name = name.strip().lower()
        if q.strip().replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000"):
            continue
        if name in HTTP_ENCODINGS:
            return name
    return ""


class _Compressor:
    def __init__(self, method: str):
        self.method = method
        if method in ("gzip", "deflate"):
            self._z = zlib.compressobj(ZLIB_LEVEL, zlib.DEFLATED, 31 if method == "gzip" else 15)
        elif method == "br":
            import brotli
            self._z = brotli.Compressor(quality=3)
        elif method == "zstd":
            import zstandard
            self._z = zstandard.ZstdCompressor(level=3).compressobj()
        elif method == "lz4":
            import lz4.frame
            self._z = lz4.frame.LZ4FrameCompressor()
            self._begun = False
        else:
            raise ValueError(method)

    def compress(self, data: bytes) -> bytes:
        if self.method == "br":
            return self._z.process(data)
        if self.method == "lz4":
            head = b""
            if not self._begun:
                head, self._begun = self._z.begin(), True
            return head + self._z.compress(data)
        return self._z.compress(data)

    def finish(self) -> bytes:
        if self.method == "br":
            return self._z.finish()
        if self.method == "lz4":
            head = b"" if self._begun else self._z.begin()
            return head + self._z.flush()
        return self._z.flush()


class Encoder:
    """One response's chunks: joined, re-encoded, framed and compressed as the request asked."""

    def __init__(self, fmt: str, params: Mapping[str, str], accept_encoding: str):
        self.fmt = fmt
        self.params = params
        self.joiner = Joiner(fmt)
        self.blocks = params.get("compress", "0").strip() == "1"
        self.content_encoding = pick_encoding(accept_encoding) \
            if params.get("enable_http_compression", "0").strip() == "1" else ""
        self._http = _Compressor(self.content_encoding) if self.content_encoding else None

    def feed(self, chunk: bytes) -> bytes:
        out = encode_result(self.joiner.feed(chunk), self.fmt, self.params)
        if self.blocks and out:
            out = compressed_blocks(out)
        if self._http is not None:
            out = self._http.compress(out)
        return out

    def finish(self) -> bytes:
        return self._http.finish() if self._http is not None else b""
