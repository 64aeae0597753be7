"""`hdrlog`, with the server's ClickHouse inserts failing while a flag file exists (test-only).

    python tests/faulty_hdrlog.py FLAG_FILE server run ...

The fault is injected below the store, where clickhouse-connect raises: the client's
``insert_arrow``, and the embedded store's own INSERT path (``store._insert_local``), raise
``OperationalError`` (what an unreachable ClickHouse gives), so the
server's own classification, retries, RETRY acks and backpressure run as in production.
Production code has no hook for this.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    flag = sys.argv.pop(1)
    from clickhouse_connect.driver.exceptions import OperationalError

    from hdrlog.server import store

    real_open = store.Store.open

    def open_with_fault(self) -> None:
        real_open(self)
        real_insert = self._client.insert_arrow

        def insert_arrow(*args, **kwargs):
            if os.path.exists(flag):
                raise OperationalError("injected fault: ClickHouse is not answering (tests/faulty_hdrlog.py)")
            return real_insert(*args, **kwargs)

        self._client.insert_arrow = insert_arrow

    real_local = store._insert_local

    def insert_local(*args, **kwargs):  # the embedded store's INSERTs (chDB's Python() table function)
        if os.path.exists(flag):
            raise OperationalError("injected fault: ClickHouse is not answering (tests/faulty_hdrlog.py)")
        return real_local(*args, **kwargs)

    store._insert_local = insert_local
    store.Store.open = open_with_fault
    from hdrlog.cli import main as hdrlog_main

    return hdrlog_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
