"""ClickHouse's ``Native`` output at a client's protocol revision (``client_protocol_version``).

Over HTTP a ClickHouse server writes ``FORMAT Native`` with the ``NativeWriter`` at revision 0
unless the request carries ``client_protocol_version=N``; then it writes at revision N
(ClickHouse ``src/Server/HTTPHandler.cpp`` puts N into the query context, the Native output
format passes it to ``NativeWriter``). clickhouse-go >= 2.38 (and so Grafana's ClickHouse data
source over HTTP) always sends it and decodes at that revision (``lib/proto/block.go``,
``Block.Decode``). chDB can only write revision 0, so this module rewrites the engine's revision-0
bytes into what ``NativeWriter::write`` (``src/Formats/NativeWriter.cpp``) writes at N:

- N > 0: every block starts with ``BlockInfo``: field 1 ``is_overflows`` (UInt8 0), field 2
  ``bucket_num`` (Int32 -1), at N >= 54480 field 3 ``out_of_order_buckets`` (VarUInt count 0),
  then 0. (8 bytes ``01 00 02 ff ff ff ff 00``; 10 bytes from 54480 on.)
- N >= 54454 (``DBMS_MIN_REVISION_WITH_CUSTOM_SERIALIZATION``): after each column's type name a
  UInt8 "has custom serialization". The engine's result columns are in the default (dense)
  serialization, so it is 0 and the data follow unchanged; sparse, replicated and size-stream
  String layouts are a server's choice, never a client's requirement.
- 0 < N < 54405 (``DBMS_MIN_REVISION_WITH_LOW_CARDINALITY_TYPE``): ``LowCardinality`` is removed
  from types and data, at any depth (``recursiveRemoveLowCardinality``).
- ``DateTime('tz')`` is announced as bare ``DateTime`` below 54337; the engine's revision-0 output
  already does that (ClickHouse's check is ``client_revision < 54337``, so revision 0 strips too).
  Above 54337 ClickHouse would name the zone again, which revision-0 bytes no longer carry: the
  column stays ``DateTime`` and clients read it in the server's time zone (UTC here) — the same
  instants, only the zone's name is not restored.

Types whose bytes change with the revision in ways not rebuilt here (``Dynamic``, ``JSON``/
``Object`` from 54473, versioned ``AggregateFunction`` states from 54452, ``Variant``) are refused
with ``NativeError`` rather than sent wrong. Every other type the engine can return is walked
(integers, floats, Decimal, Bool, Date/Date32, DateTime/DateTime64, Time/Time64, UUID, IPv4/IPv6,
Enum, String, FixedString, Array, Nullable, Tuple, Nested, Map, LowCardinality, Nothing,
SimpleAggregateFunction, Interval, geo types).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MIN_REVISION_WITH_TIME_ZONE_PARAMETER_IN_DATETIME = 54337
MIN_REVISION_WITH_LOW_CARDINALITY_TYPE = 54405
MIN_REVISION_WITH_AGGREGATE_FUNCTIONS_VERSIONING = 54452
MIN_REVISION_WITH_CUSTOM_SERIALIZATION = 54454
MIN_REVISION_WITH_V2_DYNAMIC_AND_JSON_SERIALIZATION = 54473
MIN_REVISION_WITH_OUT_OF_ORDER_BUCKETS_IN_AGGREGATION = 54480

_LC_HAS_ADDITIONAL_KEYS = 1 << 9
_LC_NEED_GLOBAL_DICTIONARY = 1 << 8

_FIXED = {
    "UInt8": 1, "Int8": 1, "Bool": 1, "Enum8": 1,
    "UInt16": 2, "Int16": 2, "Date": 2, "Enum16": 2, "BFloat16": 2,
    "UInt32": 4, "Int32": 4, "Float32": 4, "DateTime": 4, "Date32": 4, "IPv4": 4, "Decimal32": 4, "Time": 4,
    "UInt64": 8, "Int64": 8, "Float64": 8, "DateTime64": 8, "Decimal64": 8, "Time64": 8,
    "UInt128": 16, "Int128": 16, "UUID": 16, "IPv6": 16, "Decimal128": 16,
    "UInt256": 32, "Int256": 32, "Decimal256": 32,
}
_GEO = {  # ClickHouse's geo types are names for these
    "Point": "Tuple(Float64, Float64)", "Ring": "Array(Point)", "LineString": "Array(Point)",
    "Polygon": "Array(Ring)", "MultiLineString": "Array(LineString)", "MultiPolygon": "Array(Polygon)",
}
_REFUSED = {"Dynamic", "JSON", "Object", "Variant", "AggregateFunction"}


class NativeError(ValueError):
    """A Native stream this module cannot rewrite; ``code`` is the ClickHouse error code to answer with."""

    def __init__(self, message: str, code: int = 48):  # 48 NOT_IMPLEMENTED
        super().__init__(message)
        self.code = code


@dataclass
class Type:
    """One parsed type name: ``name``, its arguments (types, or raw literals), the exact ``text``."""

    name: str
    args: list["Type | str"]
    text: str
    field: str = ""  # the element name inside a named Tuple / Nested ("a" in "Tuple(a UInt8)")


def parse_type(text: str) -> Type:
    text = text.strip()
    open_at = text.find("(")
    if open_at < 0:
        return Type(text, [], text)
    if not text.endswith(")"):
        raise NativeError(f"cannot parse type name {text!r}", 50)  # UNKNOWN_TYPE
    name = text[:open_at].strip()
    args: list[Type | str] = []
    for raw in _split_args(text[open_at + 1:-1]):
        if name in ("Tuple", "Nested") and _named_element(raw):
            cut = raw.index("`", 1) + 1 if raw.startswith("`") else raw.index(" ")
            field, rest = raw[:cut], raw[cut:]
            sub = parse_type(rest)
            sub.field = field
            args.append(sub)
        elif name in ("Array", "Nullable", "LowCardinality", "Tuple", "Nested", "Map") or \
                (name == "SimpleAggregateFunction" and args):
            args.append(parse_type(raw))
        else:
            args.append(raw)
    return Type(name, args, text)


def _named_element(raw: str) -> bool:
    """``a UInt8`` or ```a b` UInt8`` in a Tuple/Nested (a space before any parenthesis)."""
    if raw.startswith("`"):
        return True
    space, paren = raw.find(" "), raw.find("(")
    return space > 0 and (paren < 0 or space < paren)


def _split_args(inner: str) -> list[str]:
    out, depth, start, quote, i = [], 0, 0, "", 0
    while i < len(inner):
        c = inner[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'`\"":
            quote = c
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "," and depth == 0:
            out.append(inner[start:i].strip())
            start = i + 1
        i += 1
    if inner[start:].strip():
        out.append(inner[start:].strip())
    return out


def _resolve(t: Type) -> Type:
    """The type whose bytes ``t`` has (aliases and geo names resolved)."""
    while True:
        if t.name in _GEO:
            t = parse_type(_GEO[t.name])
        elif t.name == "SimpleAggregateFunction":
            t = t.args[-1]  # type: ignore[assignment]
        elif t.name == "Nested":
            t = Type("Array", [Type("Tuple", t.args, "")], "")
        elif t.name.startswith("Interval"):
            t = Type("Int64", [], "Int64")
        else:
            return t


def _has_lc(t: Type) -> bool:
    return t.name == "LowCardinality" or any(isinstance(a, Type) and _has_lc(a) for a in t.args)


def _without_lc(t: Type) -> str:
    """``recursiveRemoveLowCardinality`` on a type name."""
    if t.name == "LowCardinality":
        return _without_lc(t.args[0])  # type: ignore[arg-type]
    if not _has_lc(t):
        return t.text
    parts = []
    for a in t.args:
        if isinstance(a, Type):
            parts.append((f"{a.field} " if a.field else "") + _without_lc(a))
        else:
            parts.append(a)
    return f"{t.name}({', '.join(parts)})"


# -- reading -------------------------------------------------------------------

class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes, pos: int = 0):
        self.buf = buf
        self.pos = pos

    def need(self, n: int) -> int:
        start = self.pos
        end = start + n
        if n < 0 or end > len(self.buf):
            raise NativeError("truncated Native stream", 33)  # CANNOT_READ_ALL_DATA
        self.pos = end
        return start

    def varuint(self) -> int:
        buf, pos, shift, value = self.buf, self.pos, 0, 0
        while True:
            if pos >= len(buf):
                raise NativeError("truncated Native stream", 33)
            b = buf[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                self.pos = pos
                return value
            shift += 7
            if shift > 63:
                raise NativeError("bad VarUInt in Native stream", 27)

    def string(self) -> bytes:
        n = self.varuint()
        start = self.need(n)
        return self.buf[start:start + n]

    def uint64(self) -> int:
        start = self.need(8)
        return struct.unpack_from("<Q", self.buf, start)[0]


def _prefix(t: Type, r: _Reader, revision: int) -> None:
    """Skip the bulk state prefix of ``t`` (written before any data of the column)."""
    t = _resolve(t)
    if t.name in _REFUSED:
        raise NativeError(f"cannot send a {t.text} column at client_protocol_version={revision}: "
                          "ask without client_protocol_version, or cast it (toString)")
    if t.name == "LowCardinality":
        if r.uint64() != 1:  # SharedDictionariesWithAdditionalKeys
            raise NativeError("unknown LowCardinality serialization version in Native stream", 27)
    elif t.name in ("Array", "Nullable", "Tuple", "Map"):
        for a in t.args:
            _prefix(a, r, revision)  # type: ignore[arg-type]


def _width(t: Type) -> int | None:
    if t.name in _FIXED:
        return _FIXED[t.name]
    if t.name == "Decimal":
        precision = int(str(t.args[0]))
        return 4 if precision <= 9 else 8 if precision <= 18 else 16 if precision <= 38 else 32
    if t.name == "FixedString":
        return int(str(t.args[0]))
    if t.name == "Nothing":
        return 1
    return None


def _skip(t: Type, r: _Reader, n: int) -> None:
    """Skip ``n`` rows of ``t``'s bulk data."""
    t = _resolve(t)
    w = _width(t)
    if w is not None:
        r.need(w * n)
    elif t.name == "String":
        buf, pos, end = r.buf, r.pos, len(r.buf)
        for _ in range(n):
            if pos < end and buf[pos] < 0x80:
                pos += 1 + buf[pos]
            else:
                r.pos = pos
                length = r.varuint()
                pos = r.pos + length
        if pos > end:
            raise NativeError("truncated Native stream", 33)
        r.pos = pos
    elif t.name in ("Array", "Map"):
        total = _offsets_total(r, n)
        for a in t.args:
            _skip(a, r, total)  # type: ignore[arg-type]
    elif t.name == "Nullable":
        r.need(n)
        _skip(t.args[0], r, n)  # type: ignore[arg-type]
    elif t.name == "Tuple":
        for a in t.args:
            _skip(a, r, n)  # type: ignore[arg-type]
    elif t.name == "LowCardinality":
        _lc_read(t, r, n)
    else:
        raise NativeError(f"unknown type {t.text!r} in Native stream", 50)


def _offsets_total(r: _Reader, n: int) -> int:
    start = r.need(8 * n)
    return struct.unpack_from("<Q", r.buf, start + 8 * (n - 1))[0] if n else 0


def _lc_read(t: Type, r: _Reader, n: int) -> tuple[Type, list[bytes], list[int]]:
    """One LowCardinality block: (dictionary type, its values' bytes, the row indexes)."""
    flags = r.uint64()
    if flags & _LC_NEED_GLOBAL_DICTIONARY:
        raise NativeError("LowCardinality with a global dictionary in Native stream", 27)
    key_width = 1 << (flags & 0xFF)
    inner: Type = t.args[0]  # type: ignore[assignment]
    dict_type = _resolve(inner.args[0]) if inner.name == "Nullable" else _resolve(inner)  # type: ignore[arg-type]
    values: list[bytes] = []
    if flags & _LC_HAS_ADDITIONAL_KEYS:
        keys = r.uint64()
        w = _width(dict_type)
        start = r.pos
        if w is not None:
            r.need(w * keys)
            values = [r.buf[start + i * w:start + (i + 1) * w] for i in range(keys)]
        elif dict_type.name == "String":
            for _ in range(keys):
                s = r.pos
                r.string()
                values.append(r.buf[s:r.pos])
        else:
            raise NativeError(f"LowCardinality of {dict_type.text} in Native stream", 50)
    rows = r.uint64()
    if rows != n:
        raise NativeError("LowCardinality index count differs from the block's rows", 27)
    start = r.need(key_width * rows)
    fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}.get(key_width)
    if fmt is None:
        raise NativeError("bad LowCardinality index width in Native stream", 27)
    indexes = list(struct.unpack_from(f"<{rows}{fmt}", r.buf, start))
    return dict_type, values, indexes


def _strip(t: Type, r: _Reader, n: int, out: bytearray) -> None:
    """Copy ``n`` rows of ``t``'s data into ``out`` with LowCardinality removed."""
    t = _resolve(t)
    if not _has_lc(t):
        start = r.pos
        _skip(t, r, n)
        out += r.buf[start:r.pos]
    elif t.name in ("Array", "Map"):
        start = r.pos
        total = _offsets_total(r, n)
        out += r.buf[start:r.pos]
        for a in t.args:
            _strip(a, r, total, out)  # type: ignore[arg-type]
    elif t.name == "Nullable":
        start = r.need(n)
        out += r.buf[start:start + n]
        _strip(t.args[0], r, n, out)  # type: ignore[arg-type]
    elif t.name == "Tuple":
        for a in t.args:
            _strip(a, r, n, out)  # type: ignore[arg-type]
    elif t.name == "LowCardinality":
        inner: Type = t.args[0]  # type: ignore[assignment]
        _, values, indexes = _lc_read(t, r, n)
        if inner.name == "Nullable":  # dictionary slot 0 is NULL
            out += bytes(1 if i == 0 else 0 for i in indexes)
        out += b"".join(values[i] for i in indexes)
    else:
        raise NativeError(f"unknown type {t.text!r} in Native stream", 50)


def _block_info(revision: int) -> bytes:
    info = b"\x01\x00\x02\xff\xff\xff\xff"
    if revision >= MIN_REVISION_WITH_OUT_OF_ORDER_BUCKETS_IN_AGGREGATION:
        info += b"\x03\x00"
    return info + b"\x00"


def _varuint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def to_client_revision(native: bytes, revision: int) -> bytes:
    """The engine's revision-0 ``Native`` bytes as ClickHouse writes them at ``revision``."""
    if revision <= 0:
        return native
    r = _Reader(native)
    out = bytearray()
    info = _block_info(revision)
    strip_lc = revision < MIN_REVISION_WITH_LOW_CARDINALITY_TYPE
    custom = revision >= MIN_REVISION_WITH_CUSTOM_SERIALIZATION
    while r.pos < len(native):
        columns = r.varuint()
        rows = r.varuint()
        out += info
        out += _varuint(columns)
        out += _varuint(rows)
        for _ in range(columns):
            name_start = r.pos
            r.string()
            out += native[name_start:r.pos]
            type_name = r.string().decode("utf-8", "replace")
            t = parse_type(type_name)
            base = _resolve(t)
            if base.name in _REFUSED or (revision >= MIN_REVISION_WITH_V2_DYNAMIC_AND_JSON_SERIALIZATION and
                                         any(word in type_name for word in ("Dynamic", "JSON", "Object("))) or \
                    "AggregateFunction(" in type_name.replace("SimpleAggregateFunction(", ""):
                raise NativeError(f"cannot send a {type_name} column at client_protocol_version={revision}: "
                                  "ask without client_protocol_version, or cast it (toString)")
            if strip_lc and _has_lc(t):
                name = _without_lc(t).encode()
                out += _varuint(len(name)) + name
                if custom:
                    out.append(0)
                if rows:
                    _prefix(t, r, revision)
                    _strip(t, r, rows, out)
                continue
            name = type_name.encode()
            out += _varuint(len(name)) + name
            if custom:
                out.append(0)  # has_custom_serialization: the engine's columns are dense
            if rows:
                start = r.pos
                _prefix(t, r, revision)
                _skip(t, r, rows)
                out += native[start:r.pos]
    return bytes(out)


def client_revision(value: str | None) -> int:
    """``client_protocol_version`` from the URL: 0 when absent; NativeError (code 72) when not a number."""
    if value is None or not value.strip():
        return 0
    try:
        revision = int(value.strip())
    except ValueError:
        raise NativeError(f"cannot parse client_protocol_version {value[:40]!r}: expected an unsigned integer",
                          72) from None  # CANNOT_PARSE_NUMBER
    if revision < 0:
        raise NativeError(f"cannot parse client_protocol_version {value[:40]!r}: expected an unsigned integer", 72)
    return revision


def for_client(out: bytes, fmt: str, client_protocol_version: str | None) -> bytes:
    """The HTTP answer's bytes for a client that sent ``client_protocol_version`` (only Native changes)."""
    revision = client_revision(client_protocol_version)
    if revision and fmt.lower() == "native":
        return to_client_revision(out, revision)
    return out
