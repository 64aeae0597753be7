"""The SQL endpoint's guard: may this statement run, and what exactly runs.

One job: take the text a client sent (plus its format, database and settings)
and either refuse it with a ``SqlError`` or return the ``Statement`` to run.
The guard does not tokenize SQL itself. It asks the engine's own parser:

1. ``SELECT formatQuery('<text>')`` parses the text as exactly one statement
   (the engine refuses multi-statements and syntax errors) and gives back its
   canonical form. That canonical text is what runs, so what was checked and
   what runs are the same parse.
2. ``EXPLAIN AST <canonical>`` (with the client's query parameters, so
   ``{name:Identifier}`` substitutions are seen too) gives the syntax tree,
   which is walked against allowlists:

   - the statement is one SELECT/WITH (``SelectWithUnionQuery``), SHOW
     TABLES/DATABASES/CREATE TABLE/ENGINES/FUNCTIONS/SETTING, DESCRIBE,
     EXISTS, or EXPLAIN (AST, SYNTAX, PLAN, PIPELINE, ESTIMATE, QUERY TREE) of
     a SELECT;
   - every node kind is a known read-only one (no ``Set`` = SETTINGS clause,
     no INTO OUTFILE literal);
   - tables only from database ``hdrlog`` or an allowlist of ``system`` and
     ``information_schema`` tables; unqualified names resolve in ``hdrlog``;
   - table functions only from ``TABLE_FUNCTIONS``; any function named like a
     table function outside it (``file``, ``url``, ``s3``, ...), and the
     scalar functions that reach outside the tables (``DENIED_FUNCTIONS``:
     ``file()``, ``dictGet*``, ``joinGet``, introspection, ...), are refused by
     the name the engine resolves (case-insensitive names and aliases from
     ``system.functions``);
   - the output format is exactly one name from ``OUTPUT_FORMATS``;
   - URL-parameter settings only from ``SETTINGS``.

The tree dump is text, and a quoted name may contain a newline; the walk
checks every line on its own (so an added line can only add refusals) and
refuses a dump whose indentation and children counts do not agree.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Mapping

from hdrlog.server.sql.errors import SqlError

__all__ = ["SqlError", "SqlGuard", "Statement", "output_format"]

DATABASE = "hdrlog"

# system tables a client may read (Grafana, clickhouse-connect, people exploring the schema).
SYSTEM_TABLES = frozenset({
    "one", "numbers", "numbers_mt", "tables", "columns", "databases", "settings", "functions", "formats",
    "data_type_families", "table_functions", "table_engines", "time_zones", "collations", "contributors",
    "aggregate_function_combinators", "keywords", "parts", "parts_columns", "data_skipping_indices",
    "build_options", "licenses", "settings_changes", "merge_tree_settings", "errors", "metrics", "events",
    "asynchronous_metrics", "current_roles", "enabled_roles",
    # Not system.server_settings (paths of the host) nor system.processes (other queries' text): the
    # server exports what an operator needs from them on /metrics (hdrlog_server_engine_memory_limit_bytes,
    # hdrlog_server_sql_engine_queries).
})
INFORMATION_SCHEMA_TABLES = frozenset({"tables", "columns", "schemata", "views", "key_column_usage",
                                       "referential_constraints", "statistics"})
# Table functions that make rows out of their arguments alone.
TABLE_FUNCTIONS = frozenset({"numbers", "numbers_mt", "values", "generateRandom", "generate_series",
                             "generateSeries", "null", "primes"})
# Scalar functions that read files, dictionaries, other tables by name, the server's configuration
# or its memory, or write anywhere. Compared by the name the engine resolves (alias_to).
DENIED_FUNCTIONS = frozenset({
    "file", "joinGet", "joinGetOrNull", "hasColumnInTable", "getServerSetting", "getServerPort", "getMacro",
    "getClientHTTPHeader", "filesystemAvailable", "filesystemCapacity", "filesystemUnreserved", "logTrace",
    "generateSerialID", "zookeeperSessionUptime", "catboostEvaluate", "modelEvaluate", "naiveBayesClassifier",
    "addressToLine", "addressToLineWithInlines", "addressToSymbol", "demangle", "getMergeTreeSetting",
    "serverUUID", "buildId", "getMaxTableNameLengthForDatabase", "input", "url",
})
DENIED_PREFIXES = ("dict", "__")  # dictGet*, dictHas, dictIsIn, ...; internal functions
# Functions that are AST shapes rather than entries of system.functions.
AST_FUNCTIONS = frozenset({"lambda", "tuple", "array", "in", "notIn", "globalIn", "globalNotIn", "nullIn",
                           "notNullIn", "globalNullIn", "globalNotNullIn", "_CAST", "CAST"})
AGGREGATE_COMBINATORS = ("If", "Array", "Map", "ArgMin", "ArgMax", "ForEach", "OrDefault", "OrNull", "Resample",
                         "Distinct", "State", "SimpleState", "MergeState", "Merge")

OUTPUT_FORMATS = tuple(
    "TabSeparated TSV TabSeparatedRaw TSVRaw TabSeparatedWithNames TSVWithNames TabSeparatedWithNamesAndTypes "
    "TSVWithNamesAndTypes TabSeparatedRawWithNames TSVRawWithNames CSV CSVWithNames CSVWithNamesAndTypes JSON "
    "JSONCompact JSONStrings JSONCompactStrings JSONEachRow JSONLines NDJSON JSONStringsEachRow "
    "JSONCompactEachRow JSONCompactEachRowWithNames JSONCompactEachRowWithNamesAndTypes JSONCompactStringsEachRow "
    "JSONEachRowWithProgress JSONObjectEachRow Native RowBinary RowBinaryWithNames RowBinaryWithNamesAndTypes "
    "Arrow ArrowStream Parquet ORC Avro Pretty PrettyCompact PrettyCompactMonoBlock PrettySpace PrettyNoEscapes "
    "PrettyCompactNoEscapes PrettySpaceNoEscapes Vertical Markdown Values XML Null TSKV RawBLOB LineAsString "
    "PrettyJSONEachRow".split())
_FORMATS_BY_LOWER = {f.lower(): f for f in OUTPUT_FORMATS}

# Settings a client may pass as URL parameters: result shaping and limits that only narrow.
SETTINGS = frozenset({
    "max_result_rows", "max_result_bytes", "result_overflow_mode", "max_execution_time", "timeout_overflow_mode",
    "max_rows_to_read", "max_bytes_to_read", "read_overflow_mode", "max_block_size", "max_threads",
    "max_memory_usage", "extremes", "totals_mode", "join_use_nulls", "session_timezone",
    "date_time_output_format", "format_csv_delimiter", "format_tsv_null_representation", "format_csv_null_representation",
    "use_query_cache", "prefer_column_name_to_alias", "aggregate_functions_null_for_empty", "max_rows_to_group_by",
    "group_by_overflow_mode", "max_rows_to_sort", "sort_overflow_mode", "max_ast_elements", "max_expanded_ast_elements",
    "cancel_http_readonly_queries_on_client_close", "enable_analyzer", "joined_subquery_requires_alias",
    "os_thread_priority",  # limits.capped_settings keeps it at least SQL_THREAD_NICE (a nice value: may only rise)
})
SETTING_PREFIXES = ("output_format_",)
DENIED_SETTINGS = frozenset({"output_format_schema"})  # writes a schema file

_STATEMENTS = "SELECT, WITH, SHOW, DESCRIBE, EXISTS and EXPLAIN"
_ROOTS = frozenset({"SelectWithUnionQuery", "ShowTables", "ShowEngineQuery", "ShowFunctions", "ShowSetting",
                    "ShowCreateTableQuery", "ShowCreateDatabaseQuery", "DescribeQuery", "ExistsTableQuery",
                    "ExistsDatabaseQuery", "Explain"})
_EXPLAIN_KINDS = frozenset({"EXPLAIN", "EXPLAIN AST", "EXPLAIN SYNTAX", "EXPLAIN PLAN", "EXPLAIN PIPELINE",
                            "EXPLAIN ESTIMATE", "EXPLAIN QUERY TREE"})
# Node kinds that may appear inside a read-only statement.
_NODES = frozenset({
    "SelectWithUnionQuery", "SelectIntersectExceptQuery", "SelectQuery", "ExpressionList", "Subquery",
    "TablesInSelectQuery", "TablesInSelectQueryElement", "TableExpression", "TableIdentifier", "TableJoin",
    "ArrayJoin", "Function", "Identifier", "Literal", "Asterisk", "QualifiedAsterisk", "ColumnsRegexpMatcher",
    "ColumnsListMatcher", "QualifiedColumnsRegexpMatcher", "QualifiedColumnsListMatcher", "WithElement",
    "OrderByElement", "WindowDefinition", "WindowListElement", "Interpolate", "InterpolateElement",
    "ColumnsTransformerList", "ColumnsApplyTransformer", "ColumnsExceptTransformer", "ColumnsReplaceTransformer",
    "ColumnsReplaceTransformer::Replacement", "SampleRatio", "DataType", "NameTypePair", "QueryParameter",
    "Alias", "StorageOrderByElement",
}) | _ROOTS
_SAFE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CHILDREN = re.compile(r" \(children (\d+)\)$")
_ALIAS = re.compile(r" \(alias .*\)$", re.DOTALL)


@dataclass
class Statement:
    sql: str                 # the engine's canonical text of the statement, ending in FORMAT <fmt>
    fmt: str                 # the output format (one of OUTPUT_FORMATS)
    database: str            # the database unqualified names resolve in
    settings: dict[str, str] = field(default_factory=dict)  # allowlisted URL-parameter settings


@dataclass
class _Node:
    depth: int
    kind: str
    text: str                # the line without indentation, alias and children count
    children: list["_Node"] = field(default_factory=list)


def quote_string(text: str) -> str:
    """A ClickHouse string literal holding ``text``."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _refuse(message: str) -> SqlError:
    return SqlError(164, message)


class SqlGuard:
    """``run(sql, parameters)`` runs one statement on a read-only engine handle and returns its
    TabSeparated text; ``known_settings`` is the set of the engine's setting names."""

    def __init__(self, run: Callable[[str, Mapping[str, str] | None], str],
                 known_settings: Callable[[], frozenset[str]] | None = None):
        self._run = run
        self._known_settings = known_settings
        self._functions: dict[str, str] | None = None       # exact name -> resolved name
        self._functions_ci: dict[str, str] = {}             # lower name -> resolved (case-insensitive ones)
        self._aggregates: frozenset[str] = frozenset()
        self._table_functions: frozenset[str] = frozenset()  # lower-cased
        self._lock = threading.Lock()

    # -- the engine's catalogue --------------------------------------------

    def _load(self) -> None:
        with self._lock:
            if self._functions is not None:
                return
            functions: dict[str, str] = {}
            ci: dict[str, str] = {}
            aggregates = set()
            for line in self._run("SELECT name, alias_to, case_insensitive, is_aggregate FROM system.functions",
                                  None).splitlines():
                name, alias_to, case_insensitive, is_aggregate = (tsv_field(f) for f in line.split("\t"))
                functions[name] = alias_to or name
                if case_insensitive == "1":
                    ci[name.lower()] = alias_to or name
                if is_aggregate == "1":
                    aggregates.add(name)
            for name, target in list(functions.items()):  # an alias of an alias
                functions[name] = functions.get(target, target)
            tfs = frozenset(n.lower() for n in self._run("SELECT name FROM system.table_functions", None).split())
            self._functions_ci, self._aggregates, self._table_functions = ci, frozenset(aggregates), tfs
            self._functions = functions

    def _resolve(self, name: str) -> str | None:
        assert self._functions is not None
        if name in self._functions:
            return self._functions[name]
        return self._functions_ci.get(name.lower())

    # -- the check -----------------------------------------------------------

    def check(self, query: str, *, default_format: str | None = None, database: str | None = None,
              settings: Mapping[str, str] | None = None, parameters: Mapping[str, str] | None = None) -> Statement:
        """The statement to run, or SqlError (62 syntax, 73 format, 81 database, 164 refused)."""
        self._load()
        db = self._database(database)
        use = self._settings(settings or {})
        canonical = self._canonical(query)
        tree = self._tree(canonical, parameters)
        fmt_in_text = self._walk_root(tree)
        if fmt_in_text is not None:
            return Statement(canonical, fmt_in_text, db, use)
        fmt = output_format(default_format or "TabSeparated")
        return Statement(f"{canonical}\nFORMAT {fmt}", fmt, db, use)

    def _database(self, database: str | None) -> str:
        if not database or database in (DATABASE, "default"):
            return DATABASE
        shown = database if len(database) <= 64 else database[:61] + "..."
        raise SqlError(81, f"Database {shown!r} is not served here: unqualified names resolve in {DATABASE}; "
                           f"read system tables by their full name (system.tables)")

    def _settings(self, settings: Mapping[str, str]) -> dict[str, str]:
        known = self._known_settings() if self._known_settings else None
        use: dict[str, str] = {}
        for key, value in settings.items():
            if known is not None and key not in known:
                continue  # not a setting: ignored, as ClickHouse's HTTP interface ignores unknown parameters
            if key in DENIED_SETTINGS or not (key in SETTINGS or key.startswith(SETTING_PREFIXES)):
                raise _refuse(f"Setting {key} cannot be changed here: the SQL endpoint accepts "
                              f"{', '.join(sorted(SETTINGS))} and output_format_*")
            use[key] = value
        return use

    def _canonical(self, query: str) -> str:
        if not query.strip():
            raise SqlError(62, "Empty query")
        try:
            out = self._run(f"SELECT formatQuery({quote_string(query)})", None)
        except Exception as exc:  # noqa: BLE001 - the engine's parser said no
            code = getattr(exc, "code", 0)
            raise SqlError(code if code in (62, 1001, 456, 457) else 62, _scrub(str(exc))) from None
        canonical = tsv_field(out[:-1] if out.endswith("\n") else out)
        if not canonical.strip():
            raise SqlError(62, "Empty query")
        return canonical

    def _tree(self, canonical: str, parameters: Mapping[str, str] | None) -> _Node:
        try:
            text = self._run(f"EXPLAIN AST {canonical}", parameters)
        except Exception as exc:  # noqa: BLE001 - e.g. a query parameter without a value
            code = getattr(exc, "code", 0) or 62
            raise SqlError(code, _scrub(str(exc))) from None
        lines = [tsv_field(ln) for ln in text.split("\n") if ln != ""]
        if not lines:
            raise _refuse("the statement could not be verified (empty syntax tree)")
        nodes: list[_Node] = []
        stack: list[_Node] = []
        declared: list[int] = []
        for line in lines:
            depth = len(line) - len(line.lstrip(" "))
            body = line[depth:]
            m = _CHILDREN.search(body)
            count = int(m.group(1)) if m else 0
            if m:
                body = body[: m.start()]
            body = _ALIAS.sub("", body)
            kind, _, rest = body.partition(" ")
            node = _Node(depth, kind, rest)
            if depth > len(stack) or (depth == 0 and stack) or (depth > 0 and not stack):
                raise _refuse("the statement could not be verified (a quoted name spans lines?): "
                              "use plain names")
            del stack[depth:]
            if stack:
                stack[-1].children.append(node)
            stack.append(node)
            nodes.append(node)
            declared.append(count)
        for node, count in zip(nodes, declared):
            if len(node.children) != count:
                raise _refuse("the statement could not be verified (a quoted name spans lines?): use plain names")
        for node in nodes:  # every line on its own
            self._check_node(node)
        return nodes[0]

    def _check_node(self, node: _Node) -> None:
        kind = node.kind
        if kind == "Set":
            raise _refuse("SETTINGS in the query are not allowed here: pass settings as URL parameters "
                          "(allowed: limits and output_format_*)")
        if kind not in _NODES:
            raise _refuse(f"{kind} is not allowed here: the SQL endpoint is read-only ({_STATEMENTS})")
        if kind == "Function":
            self._check_function(node.text)
        elif kind == "TableIdentifier":
            self._check_table(node.text.split("."))
        elif kind == "Identifier" and node.text.count(".") == 1:
            # `x IN db.table` names a table with a plain identifier
            db, table = node.text.split(".")
            if db != DATABASE and db in ("system", "default", "information_schema", "INFORMATION_SCHEMA"):
                self._check_table([db, table])

    def _check_function(self, name: str) -> None:
        if not _SAFE_NAME.match(name):
            raise _refuse(f"function {name[:40]!r} is not allowed here: use plain names")
        lowered = name.lower()
        resolved = self._resolve(name)
        if lowered in self._table_functions or (resolved and resolved.lower() in self._table_functions):
            if name in TABLE_FUNCTIONS or resolved in TABLE_FUNCTIONS:
                return
            if not (resolved and resolved not in DENIED_FUNCTIONS and resolved.lower() not in self._table_functions):
                raise _refuse(f"{name}() is not allowed here: the SQL endpoint reads only the database, not files, "
                              f"URLs or other servers (table functions: {', '.join(sorted(TABLE_FUNCTIONS))})")
        if resolved is None:
            if name in AST_FUNCTIONS or self._aggregate_with_combinators(name):
                return
            raise SqlError(46, f"Unknown function {name}")
        if resolved in DENIED_FUNCTIONS or resolved.startswith(DENIED_PREFIXES) or name.startswith(DENIED_PREFIXES):
            raise _refuse(f"{name}() is not allowed here: it reaches outside the database's tables "
                          "(files, dictionaries, other tables by name, the server's configuration)")

    def _aggregate_with_combinators(self, name: str) -> bool:
        stem = name
        for _ in range(4):
            for suffix in AGGREGATE_COMBINATORS:
                if stem.endswith(suffix) and len(stem) > len(suffix):
                    stem = stem[: -len(suffix)]
                    resolved = self._resolve(stem)
                    if resolved is not None and resolved in self._aggregates:
                        return True
                    break
            else:
                return False
        return False

    def _check_table(self, parts: list[str]) -> None:
        shown = ".".join(parts)[:80]
        if not all(_SAFE_NAME.match(p) for p in parts) or len(parts) > 2:
            raise _refuse(f"table {shown!r} is not allowed here: use plain names from {DATABASE} or system")
        if len(parts) == 1 or parts[0] == DATABASE:
            return
        db, table = parts
        if db == "system" and table in SYSTEM_TABLES:
            return
        if db in ("information_schema", "INFORMATION_SCHEMA") and table.lower() in INFORMATION_SCHEMA_TABLES:
            return
        raise _refuse(f"table {shown} is not readable here: the SQL endpoint serves {DATABASE}.* and "
                      f"system.{{{', '.join(sorted(SYSTEM_TABLES))}}}")

    def _walk_root(self, root: _Node) -> str | None:
        """Check the statement's own shape; the FORMAT it names, if any."""
        if root.kind not in _ROOTS:
            raise _refuse(f"Cannot execute {root.kind} here: the SQL endpoint is read-only ({_STATEMENTS})")
        body = root.children
        if root.kind == "Explain":
            if root.text not in _EXPLAIN_KINDS:
                raise _refuse(f"{root.text[:40]} is not allowed here")
            if not body or body[0].kind != "SelectWithUnionQuery":
                raise _refuse(f"{root.text} is allowed only of a SELECT here: the SQL endpoint is read-only")
            self._walk_root(body[0])
            return self._tail(body[1:])
        if root.kind in ("ShowCreateTableQuery", "ExistsTableQuery", "ShowCreateDatabaseQuery", "ExistsDatabaseQuery"):
            names = [c.text for c in body if c.kind == "Identifier"]
            if root.kind in ("ShowCreateTableQuery", "ExistsTableQuery"):
                self._check_table(names)
            elif names and names[0] not in (DATABASE, "system"):
                raise _refuse(f"database {names[0][:64]!r} is not served here")
            return self._tail([c for c in body if c.kind != "Identifier"])
        if root.kind == "SelectWithUnionQuery":
            return self._tail(body[1:])
        if root.kind == "DescribeQuery":
            return self._tail(body[1:])
        if root.kind == "ShowTables" and body and body[0].kind == "Identifier" and (
                len(body) > 1 or body[0].text.lower() not in _FORMATS_BY_LOWER):
            body = body[1:]  # SHOW TABLES FROM db [FORMAT f]: the first name is the database (Grafana's fetchTables)
        return self._tail(body)  # SHOW ...: no table references in the tree (name listings only)

    def _tail(self, extra: list[_Node]) -> str | None:
        """A statement's clauses after its body: FORMAT <name> (Identifier), INTO OUTFILE (Literal)."""
        fmt = None
        for node in extra:
            if node.kind == "Literal":
                raise _refuse("INTO OUTFILE is not allowed here: the SQL endpoint returns results over HTTP")
            if node.kind == "Identifier" and fmt is None:
                fmt = output_format(node.text)
                continue
            raise _refuse(f"{node.kind} is not allowed here")
        return fmt


def output_format(name: str) -> str:
    """The canonical name of an allowlisted output format, or SqlError 73."""
    found = _FORMATS_BY_LOWER.get(name.strip().lower()) if len(name) <= 64 else None
    if found is None:
        shown = name if len(name) <= 40 else name[:37] + "..."
        raise SqlError(73, f"Unknown or not allowed output format {shown!r}: the SQL endpoint writes "
                           "TabSeparated, CSV, JSON*, Native, RowBinary*, Arrow, Parquet, Pretty*, ... "
                           "(one format name)")
    return found


_TSV_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "0": "\0", "\\": "\\", "'": "'"}


def tsv_field(text: str) -> str:
    """One TabSeparated field as text (the engine escapes newlines, tabs and backslashes)."""
    return re.sub(r"\\(.)", lambda m: _TSV_ESCAPES.get(m.group(1), m.group(1)), text, flags=re.DOTALL)


def _scrub(message: str) -> str:
    """The engine's syntax error about the client's text, without our wrapping formatQuery call."""
    message = re.sub(r"^Code: \d+\. (DB::Exception: )?", "", message)
    cut = message.find(": In scope SELECT formatQuery(")
    if cut > 0:
        message = message[:cut]
    message = re.sub(r"\s*\([A-Z_]+\)\s*$", "", message)
    cut = message.find(" Expected one of:")
    if cut > 0:
        message = message[:cut].rstrip(".,;: ")
    return message if len(message) <= 500 else message[:497] + "..."
