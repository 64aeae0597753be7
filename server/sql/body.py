"""Request bodies: a Content-Encoding decoded into at most ``MAX_BODY_BYTES`` (HTTP 413 beyond).

Decoding is incremental with an output cap, so a small bomb never inflates in memory; it blocks, so the
endpoint runs it in a thread, off the event loop.
"""

from __future__ import annotations

import io
import zlib

MAX_BODY_BYTES = 16 * 1024 * 1024


class BadRequest(Exception):
    """The request cannot be served as sent: HTTP ``status`` with the message (code 1 in ClickHouse's shape)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _inflate(body: bytes, wbits: int, cap: int) -> bytes:
    """zlib/gzip (every gzip member) into at most ``cap`` bytes, incrementally."""
    out = bytearray()
    data = body
    while data:
        d = zlib.decompressobj(wbits)
        while not d.eof:
            chunk = d.decompress(data, cap + 1 - len(out))
            out += chunk
            if len(out) > cap:
                raise BadRequest(413, f"decoded query larger than {cap} bytes")
            data = d.unconsumed_tail
            if not chunk and not data:
                break
        if not d.eof:
            raise BadRequest(400, "cannot decode body: truncated stream")
        data = d.unused_data if wbits == 31 else b""
    return bytes(out)


def decompress(body: bytes, encoding: str, cap: int = MAX_BODY_BYTES) -> bytes:
    """Decode a Content-Encoding into at most ``cap`` bytes (HTTP 413 beyond). Blocks: run it in a thread."""
    try:
        if encoding in ("gzip", "x-gzip"):
            return _inflate(body, 31, cap)
        if encoding == "deflate":
            return _inflate(body, 15, cap)
        if encoding == "lz4":
            import lz4.frame
            d = lz4.frame.LZ4FrameDecompressor()
            out = d.decompress(body, max_length=cap + 1)
            if len(out) > cap:
                raise BadRequest(413, f"decoded query larger than {cap} bytes")
            return out
        if encoding == "zstd":
            import zstandard
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)) as reader:
                out = reader.read(cap + 1)
            if len(out) > cap:
                raise BadRequest(413, f"decoded query larger than {cap} bytes")
            return out
        if encoding == "br":
            import brotli
            d = brotli.Decompressor()
            out = b""
            view = memoryview(body)
            for i in range(0, len(body), 65536):  # brotli has no output cap: feed it slices, stop past the cap
                out += d.process(bytes(view[i:i + 65536]))
                if len(out) > cap:
                    raise BadRequest(413, f"decoded query larger than {cap} bytes")
            return out
    except BadRequest:
        raise
    except Exception as exc:  # noqa: BLE001
        raise BadRequest(400, f"cannot decode {encoding} body: {exc}") from None
    raise BadRequest(400, f"unsupported Content-Encoding {encoding!r}: send gzip, deflate, br, zstd or lz4")


MAX_FORM_FIELDS = 10_000


def form_fields(content_type: str, body: bytes) -> dict[str, str]:
    """The fields of a ``multipart/form-data`` body, as ClickHouse's HTTP interface reads them: ``query``
    and ``param_NAME`` (clickhouse-connect sends its bind parameters this way once they pass ~4 KB).
    A file part is external data (a temporary table sent with the query), which is not supported here."""
    from email import policy
    from email.parser import BytesParser

    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    msg = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise BadRequest(400, "multipart/form-data body without parts (is its boundary right?)")
    out: dict[str, str] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise BadRequest(400, "a multipart/form-data part without a name")
        if part.get_filename() is not None or name.endswith(("_structure", "_types", "_format")):
            raise BadRequest(400, f"external data (form part {name!r}) is not supported: put the values in "
                                  "the query or in param_ values")
        payload = part.get_payload(decode=True) or b""
        out[str(name)] = payload.decode(part.get_content_charset() or "utf-8", "replace")
        if len(out) > MAX_FORM_FIELDS:
            raise BadRequest(400, f"more than {MAX_FORM_FIELDS} form fields")
    return out
