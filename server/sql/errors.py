"""Errors as ClickHouse's HTTP interface shapes them: a code, the engine's name for it, an HTTP status.

The body is ``Code: N. DB::Exception: <message>. (NAME)``, the header ``X-ClickHouse-Exception-Code: N``.
The name comes from the engine's own message when it gave one (``... (UNKNOWN_TABLE)``), so every
code the engine knows keeps its name; ``ERROR_NAMES`` holds only the codes the endpoint raises itself.
"""

from __future__ import annotations

import re

ERROR_NAMES = {
    1: "UNSUPPORTED_METHOD", 27: "CANNOT_PARSE_INPUT_ASSERTION_FAILED", 36: "BAD_ARGUMENTS", 46: "UNKNOWN_FUNCTION",
    47: "UNKNOWN_IDENTIFIER", 60: "UNKNOWN_TABLE", 62: "SYNTAX_ERROR", 73: "UNKNOWN_FORMAT",
    81: "UNKNOWN_DATABASE", 115: "UNKNOWN_SETTING", 159: "TIMEOUT_EXCEEDED", 164: "READONLY",
    194: "REQUIRED_PASSWORD", 516: "AUTHENTICATION_FAILED",
    241: "MEMORY_LIMIT_EXCEEDED", 158: "TOO_MANY_ROWS", 202: "TOO_MANY_SIMULTANEOUS_QUERIES",
    394: "QUERY_WAS_CANCELLED", 396: "TOO_MANY_ROWS_OR_BYTES", 456: "UNKNOWN_QUERY_PARAMETER",
    457: "BAD_QUERY_PARAMETER", 1000: "POCO_EXCEPTION", 1001: "STD_EXCEPTION", 1002: "UNKNOWN_EXCEPTION",
}
# ClickHouse's HTTP status per exception code (src/Server/HTTPHandler.cpp), the ones that matter here.
_STATUS_400 = {6, 27, 36, 41, 42, 43, 44, 46, 47, 48, 53, 62, 69, 70, 72, 73, 115, 117, 130, 184, 190, 215, 386, 395,
               456, 457}
_STATUS_403 = {164, 192, 193, 195, 196, 497, 516}
_STATUS_404 = {60, 81, 82}
_NAME = re.compile(r"\(([A-Z][A-Z0-9_]+)\)\s*$")


class SqlError(Exception):
    """A refusal or an engine error with ClickHouse's code; ``name`` when the engine named it."""

    def __init__(self, code: int, message: str, name: str = ""):
        super().__init__(message)
        self.code = code
        self._name = name

    @property
    def name(self) -> str:
        return self._name or ERROR_NAMES.get(self.code, "UNKNOWN_EXCEPTION")

    @property
    def status(self) -> int:
        code = self.code
        return 400 if code in _STATUS_400 else 403 if code in _STATUS_403 else 404 if code in _STATUS_404 else 500

    def body(self) -> bytes:
        return f"Code: {self.code}. DB::Exception: {str(self).rstrip('. ')}. ({self.name})\n".encode()


def engine_name(message: str) -> str:
    """The error name the engine put at the end of its message (``... (UNKNOWN_TABLE)``), or ''."""
    text = " ".join(message.split())
    for marker in (" (version ", "Stack trace"):
        cut = text.find(marker)
        if cut > 0:
            text = text[:cut]
    m = _NAME.search(text)
    return m.group(1) if m else ""


def tidy(message: str) -> str:
    """Shorten the engine's message: no code prefix or name suffix, no long 'Expected one of' list."""
    message = re.sub(r"^Code: \d+\. (DB::Exception: )?", "", message)
    message = re.sub(r"\s*\([A-Z_]+\)\s*$", "", message)
    cut = message.find(" Expected one of:")
    if cut < 0:
        cut = message.find(". Expected one of:")
    if cut > 0:
        message = message[:cut].rstrip(".,;: ")
    return message if len(message) <= 500 else message[:497] + "..."
