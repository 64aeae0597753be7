"""Configuration declared once: a dataclass per component, read from flags, env and file.

Each component (collector, server, ...) declares a dataclass whose fields carry
a default and ``metadata={"doc": ...}``. From that one declaration this module
derives the command-line flag (``sql_listen`` -> ``--sql-listen``), the
environment variable (``HDRLOG_SQL_LISTEN``) and the config-file key
(``sql_listen`` under the component's section of a YAML file). Precedence:
flag > environment > file > default. Validation lives in the dataclass's
``validate()``; every failure is one ConfigError line naming key, value and
what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from hdrlog.errors import ConfigError  # noqa: F401 - part of this module's interface

ENV_PREFIX = "HDRLOG_"
# The sections a config file may have, one per command that reads one.
SECTIONS = ("collector", "report", "server")


def doc_field(default: Any = dataclasses.MISSING, doc: str = "", *, flag: bool = True, duration: bool = False,
              metavar: str = "", **kwargs: Any) -> Any:
    """A dataclass field with its documentation (shown in --help and docs/config.md).

    ``duration``: a float of seconds that also takes the one duration syntax (500ms, 1s, 15m, 1h30m, 2d)."""
    if isinstance(default, list):
        kwargs["default_factory"] = lambda d=default: list(d)
        default = dataclasses.MISSING
    return dataclasses.field(default=default, metadata={"doc": doc, "flag": flag, "duration": duration,
                                                        "metavar": metavar}, **kwargs)


_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?$")


def parse_duration(key: str, value: object, *, allow_zero: bool = False) -> float:
    """'500ms', '90s', '15m', '1h30m', '2d' or plain seconds -> seconds; the one syntax of every duration."""
    text = str(value).strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        m = _DURATION.match(text)
        if not text or not m or not any(m.groups()):
            raise ConfigError(key, value, "expected a duration such as 500ms, 90s, 15m, 1h30m or 2d") from None
        d, h, mi, s, ms = m.groups()
        seconds = int(d or 0) * 86400 + int(h or 0) * 3600 + int(mi or 0) * 60 + float(s or 0) + float(ms or 0) / 1000
    if seconds != seconds or seconds < 0 or (seconds == 0 and not allow_zero):
        raise ConfigError(key, value, "expected a duration >= 0" if allow_zero else "expected a duration > 0")
    return seconds


def env_name(field_name: str, section: str = "") -> str:
    """HDRLOG_SQL_LISTEN; with a section, the command's own HDRLOG_SERVER_SQL_LISTEN."""
    return ENV_PREFIX + (section.upper() + "_" if section else "") + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _base_type(tp: Any) -> Any:
    """int for Optional[int], list for list[str], ..."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return origin or tp


def _convert(key: str, tp: Any, raw: Any, *, duration: bool = False) -> Any:
    """Turn a string (env, flag) or YAML value into the field's type."""
    base = _base_type(tp)
    if raw is None:
        return None
    if duration and not isinstance(raw, bool):
        try:
            return float(raw)  # plain seconds: the component's validate() judges the range and names its key
        except (TypeError, ValueError):
            return parse_duration(key, raw, allow_zero=True)
    try:
        if base is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if base is list:
            if isinstance(raw, str):
                return [p for p in (s.strip() for s in raw.split(",")) if p]
            if isinstance(raw, (list, tuple)):
                return [str(v) for v in raw]
            raise ValueError
        if base is int:
            if isinstance(raw, bool):
                raise ValueError
            return int(raw)
        if base is float:
            return float(raw)
        if base is str:
            if isinstance(raw, (dict, list)):
                raise ValueError
            return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(key, raw, f"expected {getattr(base, '__name__', base)}") from None
    return raw


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field, with its doc, env variable and default in the help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("flag", True):
            continue
        base = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        helptext = f"{f.metadata.get('doc', '')} [env {env_name(f.name)}; default {default!r}]"
        metavar = f.metadata.get("metavar") or ("DURATION" if f.metadata.get("duration") else f.name.upper())
        if base is bool:
            parser.add_argument(flag_name(f.name), dest=f.name, action="store_const", const=True,
                                default=None, help=helptext)
        elif base is list:
            parser.add_argument(flag_name(f.name), dest=f.name, action="append", default=None,
                                metavar=metavar, help=helptext + " (repeatable)")
        else:
            parser.add_argument(flag_name(f.name), dest=f.name, default=None, metavar=metavar, help=helptext)


def read_file(path: str | os.PathLike[str] | None, section: str) -> dict[str, Any]:
    """The component's section of a YAML config file (keys may use - or _)."""
    if not path:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError("config", str(path), f"cannot read the file: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError("config", str(path), f"not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError("config", str(path), "expected a mapping with a section per command")
    unknown = sorted(str(k) for k in data if k not in SECTIONS)
    if unknown:
        raise ConfigError("config", str(path), f"unknown section {unknown[0]!r} (known: {', '.join(SECTIONS)})")
    body = data.get(section, {})
    if not isinstance(body, dict):
        raise ConfigError(section, body, "expected a mapping of keys to values")
    return {str(k).replace("-", "_"): v for k, v in body.items()}


def load(cls: type, *, args: Mapping[str, Any] | None = None, file: str | None = None,
         section: str, environ: Mapping[str, str] | None = None) -> Any:
    """Build and validate a config dataclass: flag > environment > file > default.

    In the environment HDRLOG_<SECTION>_<KEY> (HDRLOG_SERVER_METRICS_LISTEN) beats HDRLOG_<KEY>, so that keys
    several commands share (clickhouse, metrics_listen, tls_*, ...) can differ per command on one host."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields)
    from_file = read_file(file, section)
    unknown = sorted(set(from_file) - names)
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}", from_file[unknown[0]],
                          f"unknown key (known: {', '.join(sorted(names))})")
    values: dict[str, Any] = {}
    for name in names:
        key = f"{section}.{name}"
        duration = bool(fields[name].metadata.get("duration"))
        if args is not None and args.get(name) is not None:
            values[name] = _convert(flag_name(name), hints[name], args[name], duration=duration)
        elif env_name(name, section) in environ:  # the command's own variable beats the shared one
            values[name] = _convert(env_name(name, section), hints[name], environ[env_name(name, section)],
                                    duration=duration)
        elif env_name(name) in environ:
            values[name] = _convert(env_name(name), hints[name], environ[env_name(name)], duration=duration)
        elif name in from_file:
            values[name] = _convert(key, hints[name], from_file[name], duration=duration)
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def parse_hostport(key: str, value: str, *, allow_empty: bool = False) -> tuple[str, int] | None:
    """'HOST:PORT', '[v6]:PORT' or ':PORT' -> (host, port); port 0 means pick a free one."""
    if not value:
        if allow_empty:
            return None
        raise ConfigError(key, value, "expected HOST:PORT")
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(key, value, "expected HOST:PORT with a port from 0 to 65535")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def markdown_table(cls: type, section: str) -> str:
    """docs/config.md rows for one component."""
    rows = [f"### `{section}`", "", "| key / flag | env | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "")  # type: ignore[misc]
        rows.append(f"| `{f.name}` / `{flag_name(f.name)}` | `{env_name(f.name)}` | `{default!r}` | "
                    f"{f.metadata.get('doc', '')} |")
    return "\n".join(rows) + "\n"
