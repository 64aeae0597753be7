"""``python -m hdrlog.server``: run the server without the full CLI (tests SIGKILL and restart it).

Prints the bound ports as one JSON line on stdout once started, e.g.
``{"grpc_port": 40123, "sql_port": 40124, "metrics_port": null}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from hdrlog.config import ConfigError, add_arguments, load
from hdrlog.server.app import Server, serve
from hdrlog.server.config import ServerConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hdrlog.server",
                                     description="hdrlog server: gRPC ingest into ClickHouse plus a read-only SQL endpoint")
    parser.add_argument("--config", metavar="FILE", help="YAML config file (section 'server')")
    add_arguments(parser, ServerConfig)
    ns = parser.parse_args(argv)
    args = vars(ns)
    try:
        config = load(ServerConfig, args=args, file=args.pop("config"), section="server")
    except ConfigError as exc:
        print(f"hdrlog server: {exc}", file=sys.stderr)
        return 2

    def announce(server: Server) -> None:
        print(json.dumps({"grpc_port": server.grpc_port, "sql_port": server.sql_port,
                          "metrics_port": server.metrics_port}), flush=True)

    return asyncio.run(serve(config, on_started=announce))


if __name__ == "__main__":
    raise SystemExit(main())
