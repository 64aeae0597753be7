"""The two errors a person at the terminal sees as one line (the CLI prints them, no traceback).

``ConfigError``: a configuration value is wrong (exit 2). ``UserError``: anything else the
person can fix, explained in a sentence (exit 1).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """One clear line: which key, which value, what is allowed."""

    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"bad config {key}={value!r}: {allowed}")


class UserError(Exception):
    """A failure with a one-line explanation for the person at the terminal."""
