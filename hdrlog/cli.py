"""The `hdrlog` command: server, collector, sql, report and pki subcommands.

Every component flag comes from its config dataclass (hdrlog.config), so the
flag, the HDRLOG_* variable and the config-file key can never drift apart.
Errors in configuration end the command with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import textwrap

from hdrlog import __version__
from hdrlog import config as cfg
from hdrlog.errors import UserError

EPILOG = textwrap.dedent("""\
    Every flag FOO_BAR also reads HDRLOG_FOO_BAR from the environment and key foo_bar from the
    command's section (server:, collector:) of --config FILE. Flag beats environment beats file.

    examples:
      hdrlog server run --insecure --clickhouse chdb:///var/lib/hdrlog/clickhouse
      hdrlog collector run --insecure --server 198.18.0.1:7600 --iface eth0 --iface 'veth*'
      hdrlog sql "SELECT host, count() FROM hdrlog.packets GROUP BY host"
      hdrlog report --url http://127.0.0.1:7623 --since 1h --format md
    """)


def _setup_logging(level: str) -> None:
    from hdrlog import logs

    logs.configure(level)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file (keys as in docs/config.md)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="how much to say on stderr (default info)")


class _Parser(argparse.ArgumentParser):
    """No prefix matching: `--sql-password x` must not quietly become `--sql-password-file x`.

    Subcommand parsers are made of the same class (add_subparsers uses type(self))."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            # Name the unknown options, never echo their values: one may be a password.
            flags = [a.split("=", 1)[0] for a in extras if a.startswith("-")]
            self.error(f"unrecognized arguments: {' '.join(flags) or 'a value with no option'} "
                       "(values not shown); see --help")
        return ns


def build_parser() -> argparse.ArgumentParser:
    from hdrlog.collector.config import CollectorConfig
    from hdrlog.server.config import ServerConfig
    from hdrlog.report.config import ReportConfig

    top = _Parser(
        prog="hdrlog", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Log packet header elements across a fleet: eBPF collectors stream columnar "
                    "batches over gRPC to a server that stores them in ClickHouse.")
    top.add_argument("--version", action="version", version=f"hdrlog {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    server = sub.add_parser("server", help="the central server (gRPC ingest, ClickHouse, SQL endpoint)")
    server_sub = server.add_subparsers(dest="action", metavar="ACTION", required=True)
    run = server_sub.add_parser(
        "run", help="receive batches, store them, serve read-only SQL",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Receive batches from collectors over gRPC, insert them into ClickHouse "
                    "(embedded chDB by default) and serve a read-only ClickHouse-compatible HTTP "
                    "SQL endpoint. Stops cleanly on SIGINT/SIGTERM after storing what it acked.")
    _common(run)
    cfg.add_arguments(run, ServerConfig)
    run.set_defaults(handler=_server_run)
    check = server_sub.add_parser(
        "check", help="validate the configuration (flags, HDRLOG_* variables, --config file) and exit",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read the configuration exactly as `server run` would (flag > environment > file > default), "
                    "check every value and the TLS files, print a summary and exit: 0 when it is valid, 2 with one "
                    "line naming the bad key otherwise. Opens no store and no port.",
        epilog="example: hdrlog server check --config /etc/hdrlog/server.yaml")
    _common(check)
    cfg.add_arguments(check, ServerConfig)
    check.set_defaults(handler=_server_check)
    migrate = server_sub.add_parser(
        "migrate", help="create or upgrade the schema, apply the TTLs, then exit",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Apply the versioned schema migrations (database hdrlog: tables, codecs, skip indexes, "
                    "rollups) and the configured TTLs, print what was done and exit. `server run` does the "
                    "same at start; run this before upgrading a fleet, or against a ClickHouse server. An "
                    "embedded chDB store must not be held by a running server.")
    _common(migrate)
    migrate.add_argument("--clickhouse", help="store: chdb:///PATH or http(s)://USER:PASSWORD@HOST:PORT "
                                              "[env HDRLOG_CLICKHOUSE; default: the server's]")
    migrate.set_defaults(handler=_server_migrate)

    collector = sub.add_parser("collector", help="the per-host collector (eBPF at TC ingress and egress)")
    collector_sub = collector.add_subparsers(dest="action", metavar="ACTION", required=True)
    run = collector_sub.add_parser(
        "run", help="capture header elements and stream them to the server",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Attach a TC classifier to the ingress and egress of each --iface, log one "
                    "record per packet header and stream them in batches to --server. Keeps every "
                    "batch until the server acks it. On SIGINT/SIGTERM: flush, wait for acks, detach "
                    "its own filters, exit 0. Needs root (or CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON).")
    _common(run)
    cfg.add_arguments(run, CollectorConfig)
    check = collector_sub.add_parser(
        "check", help="validate the configuration and exit",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read the configuration exactly as `collector run` would, check every value and the TLS "
                    "files, say which interfaces match --iface now, and exit: 0 when it is valid, 2 with one "
                    "line naming the bad key otherwise. Loads no BPF and needs no privileges.",
        epilog="example: hdrlog collector check --config /etc/hdrlog/collector.yaml")
    _common(check)
    cfg.add_arguments(check, CollectorConfig)
    check.set_defaults(handler=_collector_check)
    run.add_argument("--print-bpf", action="store_true",
                     help="print the BPF C source and compiler flags that would be loaded, then exit")
    run.set_defaults(handler=_collector_run)

    sql = sub.add_parser(
        "sql", help="run a read-only SQL query against the store",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run one read-only SQL query and print the result in a ClickHouse output format. "
                    "Asks the server's SQL endpoint (--url), a real ClickHouse (--url http(s)://...), "
                    "or opens an embedded store no server holds (--clickhouse chdb:///PATH). "
                    "With neither, it asks the local server's endpoint, and only that.",
        epilog="example: hdrlog sql --format JSONEachRow "
               "\"SELECT dst_port, count() c FROM hdrlog.packets GROUP BY dst_port ORDER BY c DESC LIMIT 5\"")
    sql.add_argument("--url", help="SQL endpoint or ClickHouse HTTP URL, http(s)://[user:password@]host:port "
                                   "[env HDRLOG_SQL_URL]")
    sql.add_argument("--clickhouse", help="store to open directly: chdb:///PATH or http(s)://... "
                                          "[env HDRLOG_CLICKHOUSE]")
    sql.add_argument("--user", default=None, help="user when the URL names none [env HDRLOG_SQL_USER]")
    sql.add_argument("--password-file", metavar="FILE", default=None,
                     help="read the password from FILE when the URL has none [else env HDRLOG_SQL_PASSWORD]")
    sql.add_argument("--format", default=None,
                     help="ClickHouse output format: PrettyCompact (default on a terminal), "
                          "TabSeparated (default otherwise), CSV, JSONEachRow, ...")
    sql.add_argument("query", help="the SQL text, or - to read it from standard input")
    sql.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                     help=argparse.SUPPRESS)
    sql.set_defaults(handler=_sql)

    report = sub.add_parser(
        "report", help="anomaly report over a window, against the same hours of previous days",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the anomaly detectors (port scan, SYN flood, traffic spike/drop, new services and "
                    "destinations, DNS anomalies, TCP flag and TTL oddities, silent hosts, collector drops) over "
                    "the last --since, against the same hours of the previous --baseline-days days. Writes HTML, "
                    "Markdown or JSON to --out (a file, a directory, or standard output), and optionally POSTs "
                    "the JSON to --webhook and mails it. With --clickhouse the findings are also written to "
                    "hdrlog.anomalies; through the read-only SQL endpoint (--url) they are not (the server's "
                    "--report-every records them). Exit 0 when the report was made and delivered, whatever it found; "
                    "1 when it could not be made or a delivery (file, webhook, mail) failed.",
        epilog="examples:\n"
               "  hdrlog report --url http://127.0.0.1:7623 --since 1h --format md\n"
               "  hdrlog report --clickhouse http://default:pw@ch1:8123 --out /var/lib/hdrlog/reports/ "
               "--webhook https://hooks.example/hdrlog")
    _common(report)
    cfg.add_arguments(report, ReportConfig)
    report.add_argument("--url", dest="sql_url", default=None, help="same as --sql-url (the SQL endpoint to ask)")
    report.set_defaults(handler=_report)

    pki = sub.add_parser("pki", help="certificates for mTLS between collectors and the server")
    pki_sub = pki.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = pki_sub.add_parser("init", help="create a CA (DIR/ca.key, DIR/ca.crt)",
                              description="Create the certificate authority that signs the server's and "
                                          "every collector's certificate. Keep ca.key off the fleet.")
    init.add_argument("--dir", required=True, help="directory for ca.key and ca.crt (created if missing)")
    init.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    init.add_argument("--force", action="store_true", help="replace existing files")
    init.set_defaults(handler=_pki_init, log_level="warning")
    issue = pki_sub.add_parser(
        "issue", help="issue a certificate (DIR/NAME.key, DIR/NAME.crt)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Issue a certificate signed by the CA in DIR. For a collector, NAME is the host "
                    "name its records carry: the server lets it write rows for that host only.",
        epilog="examples: hdrlog pki issue --dir pki --name central --server --san 198.18.100.10\n"
               "          hdrlog pki issue --dir pki --name web-01")
    issue.add_argument("--dir", required=True, help="directory holding ca.key and ca.crt")
    issue.add_argument("--name", required=True, help="identity: the host name (collector) or server name")
    issue.add_argument("--server", action="store_true", help="a server certificate (adds serverAuth)")
    issue.add_argument("--san", action="append", default=[], metavar="HOST_OR_IP",
                       help="another DNS name or IP address the certificate is valid for (repeatable)")
    issue.add_argument("--days", type=int, default=397, help="validity in days (default 397)")
    issue.add_argument("--force", action="store_true", help="replace existing files")
    issue.set_defaults(handler=_pki_issue, log_level="warning")
    return top


def _pki_init(ns: argparse.Namespace) -> int:
    from hdrlog import pki

    try:
        key, crt = pki.init_ca(ns.dir, days=ns.days, force=ns.force)
    except pki.PkiError as exc:
        raise UserError(str(exc)) from None
    print(f"wrote {key} (keep it secret, off the fleet) and {crt}")
    return 0


def _pki_issue(ns: argparse.Namespace) -> int:
    from hdrlog import pki

    try:
        key, crt = pki.issue(ns.dir, ns.name, server=ns.server, sans=ns.san, days=ns.days, force=ns.force)
    except pki.PkiError as exc:
        raise UserError(str(exc)) from None
    print(f"wrote {key} and {crt}")
    return 0


def _require_server_extra(command: str) -> None:
    """One clear line, not an ImportError, on a host installed without the server extra."""
    import importlib

    from hdrlog.clickhouse import engine_messages_logged

    missing = []
    for module in ("pyarrow", "chdb"):
        try:
            with engine_messages_logged():  # loading chDB may print an engine notice with a stack trace
                importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UserError(f"{command} needs hdrlog's server extra ({' and '.join(missing)} not installed): "
                        f"pip install 'hdrlog[server]'")


def _server_run(ns: argparse.Namespace) -> int:
    _require_server_extra("hdrlog server run")
    from hdrlog.server import corelog

    corelog.start(ns.log_level)  # before grpc is imported: it reads its log settings once
    from hdrlog.server.app import serve
    from hdrlog.server.config import ServerConfig

    from hdrlog.report.config import ReportConfig

    config = cfg.load(ServerConfig, args=vars(ns), file=ns.config, section="server")
    # Scheduled reports (--report-every) read their settings from the report: section and HDRLOG_* only.
    report = cfg.load(ReportConfig, args={}, file=ns.config, section="report") if config.report_every else None
    return asyncio.run(serve(config, report=report))


def _server_check(ns: argparse.Namespace) -> int:
    from hdrlog.server.config import ServerConfig
    from hdrlog.report.config import ReportConfig
    from hdrlog.clickhouse import redact

    config = cfg.load(ServerConfig, args=vars(ns), file=ns.config, section="server")
    if config.report_every:
        cfg.load(ReportConfig, args={}, file=ns.config, section="report")
    security = "--insecure (no TLS, no authentication)" if config.insecure else f"mTLS (CA {config.tls_ca})"
    print(f"server configuration OK: gRPC {config.listen}, SQL {config.sql_listen or 'off'}, "
          f"store {redact(config.clickhouse)}, {security}")
    return 0


def _server_migrate(ns: argparse.Namespace) -> int:
    _require_server_extra("hdrlog server migrate")
    from hdrlog.server.config import ServerConfig
    from hdrlog.server.store import Store, StoreError
    from hdrlog.clickhouse import redact

    args = {"clickhouse": ns.clickhouse, "insecure": True}
    config = cfg.load(ServerConfig, args=args, file=ns.config, section="server")
    store = Store(config.clickhouse, cluster=config.cluster)
    try:
        store.open()
        applied = store.migrate()
        changed = store.apply_ttl(config.ttl_days())
    except StoreError as exc:
        raise UserError(str(exc)) from None
    finally:
        store.close()
    from hdrlog.server.schema import LATEST_VERSION
    print(f"{redact(config.clickhouse)}: schema at version {LATEST_VERSION}; "
          f"{'applied ' + ', '.join(map(str, applied)) if applied else 'no migration needed'}; "
          f"{'TTL changed on ' + ', '.join(changed) if changed else 'TTLs unchanged'}")
    return 0


def _report(ns: argparse.Namespace) -> int:
    from hdrlog.report import build as reporting
    from hdrlog.report.connection import connect
    from hdrlog.report.config import ReportConfig

    config = cfg.load(ReportConfig, args=vars(ns), file=ns.config, section="report")
    try:
        conn = connect(config)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line for the person at the terminal
        raise UserError(f"unable to connect to {config.clickhouse or config.sql_url or 'the local SQL endpoint'}: "
                        f"{' '.join(str(exc).split())[:300]}") from None
    try:
        result = reporting.run(config, conn)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"report failed: {' '.join(str(exc).split())[:400]}") from None
    finally:
        conn.close()
    if config.out and config.out != "-":
        print(result.summary(), file=sys.stderr)
    for note in result.notes:
        print(f"hdrlog report: {note}", file=sys.stderr)
    # Non-zero when a delivery failed, so that a timer's OnFailure= (or cron's mail) hears of it.
    return 1 if result.undelivered else 0


def _collector_run(ns: argparse.Namespace) -> int:
    from hdrlog.collector.config import CollectorConfig

    if ns.print_bpf:
        from hdrlog.collector.capture import CaptureConfig, render_source

        try:  # the C and flags of this config (dns_ports, tunnels, vxlan_ports, ...) when it is whole
            loaded = cfg.load(CollectorConfig, args=vars(ns), file=ns.config, section="collector")
            capture = CaptureConfig.from_config(loaded, loaded.filter)
        except cfg.ConfigError as exc:
            print(f"hdrlog: the defaults' BPF (the config does not validate: {exc})", file=sys.stderr)
            capture = None
        print(render_source(capture))
        return 0
    config = cfg.load(CollectorConfig, args=vars(ns), file=ns.config, section="collector")
    from hdrlog.collector.app import serve

    return asyncio.run(serve(config))


def _collector_check(ns: argparse.Namespace) -> int:
    import fnmatch
    import socket

    from hdrlog.collector.config import CollectorConfig

    config = cfg.load(CollectorConfig, args=vars(ns), file=ns.config, section="collector")
    names = [name for _, name in socket.if_nameindex()]
    matched = sorted({n for pattern in config.iface for n in names if fnmatch.fnmatchcase(n, pattern)})
    security = "--insecure (no TLS)" if config.insecure else f"mTLS as {config.host_id!r}"
    print(f"collector configuration OK: host {config.host_id!r}, server {', '.join(config.server)}, {security}, "
          f"mode {config.mode}; interfaces matching now: {', '.join(matched) or 'none (they may appear later)'}")
    return 0


def _sql(ns: argparse.Namespace) -> int:
    from hdrlog import sqlclient

    query = sys.stdin.read() if ns.query == "-" else ns.query
    fmt = ns.format or ("PrettyCompact" if sys.stdout.isatty() else "TabSeparated")
    out = sqlclient.run(query, fmt=fmt, url=ns.url, clickhouse=ns.clickhouse, user=ns.user,
                        password_file=ns.password_file)
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    _setup_logging(ns.log_level)
    try:
        return ns.handler(ns)
    except cfg.ConfigError as exc:
        print(f"hdrlog: {exc}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"hdrlog: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
