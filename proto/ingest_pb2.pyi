from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NONE: _ClassVar[Compression]
    ZSTD: _ClassVar[Compression]
NONE: Compression
ZSTD: Compression

class Column(_message.Message):
    __slots__ = ("name", "values", "offsets", "compression", "values_size", "offsets_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    VALUES_SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: bytes
    offsets: bytes
    compression: Compression
    values_size: int
    offsets_size: int
    def __init__(self, name: _Optional[str] = ..., values: _Optional[bytes] = ..., offsets: _Optional[bytes] = ..., compression: _Optional[_Union[Compression, str]] = ..., values_size: _Optional[int] = ..., offsets_size: _Optional[int] = ...) -> None: ...

class Table(_message.Message):
    __slots__ = ("name", "rows", "columns")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    name: str
    rows: int
    columns: _containers.RepeatedCompositeFieldContainer[Column]
    def __init__(self, name: _Optional[str] = ..., rows: _Optional[int] = ..., columns: _Optional[_Iterable[_Union[Column, _Mapping]]] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("collector_id", "host", "seq", "created_unix_ns", "tables")
    COLLECTOR_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    collector_id: str
    host: str
    seq: int
    created_unix_ns: int
    tables: _containers.RepeatedCompositeFieldContainer[Table]
    def __init__(self, collector_id: _Optional[str] = ..., host: _Optional[str] = ..., seq: _Optional[int] = ..., created_unix_ns: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[Table, _Mapping]]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("seq", "status", "error", "rows", "duplicate", "reason")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OK: _ClassVar[Ack.Status]
        REJECTED: _ClassVar[Ack.Status]
        RETRY: _ClassVar[Ack.Status]
    OK: Ack.Status
    REJECTED: Ack.Status
    RETRY: Ack.Status
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    seq: int
    status: Ack.Status
    error: str
    rows: int
    duplicate: bool
    reason: str
    def __init__(self, seq: _Optional[int] = ..., status: _Optional[_Union[Ack.Status, str]] = ..., error: _Optional[str] = ..., rows: _Optional[int] = ..., duplicate: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...
