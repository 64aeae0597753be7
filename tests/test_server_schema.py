"""Schema and config: tables match the column registry, migrations are idempotent, bad config is one clear line."""

from __future__ import annotations

import pytest

from hdrlog.config import ConfigError, load
from hdrlog.proto import columns as registry
from hdrlog.server import ServerConfig
from hdrlog.server.schema import LATEST_VERSION, MIGRATIONS
from hdrlog.server.store import Store

SERVER_COLUMNS = {"host", "collector_id", "batch_seq"}


def test_tables_match_the_registry_and_migrations_are_idempotent(tmp_path):
    store = Store(f"chdb://{tmp_path}/store")
    store.open()
    try:
        assert store.migrate() == [v for v, _, _ in MIGRATIONS]
        assert store.migrate() == []  # second run: nothing to do
        client = store._client  # noqa: SLF001
        for table, specs in registry.TABLES.items():
            cols = dict(client.query(f"SELECT name, type FROM system.columns WHERE database = 'hdrlog' "
                                     f"AND table = '{table}'").result_rows)
            assert set(cols) == {s.name for s in specs} | SERVER_COLUMNS, table
            for spec in specs:
                if spec.dtype == "V16":
                    assert cols[spec.name] == "IPv6"
                if spec.name in ("ts", "start_ts", "end_ts"):
                    assert cols[spec.name] == "DateTime64(9, 'UTC')"
            assert cols["batch_seq"] == "UInt64"
            ddl = client.command(f"SHOW CREATE TABLE hdrlog.{table}")
            assert "non_replicated_deduplication_window" in ddl and "PARTITION BY toDate(" in ddl
        assert client.query("SELECT max(version), count() FROM hdrlog.schema_version").result_rows == [
            (LATEST_VERSION, len(MIGRATIONS))]
        # a column dropped by hand (as if added to the registry later) is added back
        client.command("ALTER TABLE hdrlog.packets DROP COLUMN tls_sni")
        assert store.migrate() == []
        assert client.command("SELECT count() FROM system.columns WHERE database = 'hdrlog' AND table = 'packets' "
                              "AND name = 'tls_sni'") == 1
    finally:
        store.close()


def test_config_defaults_and_validation():
    cfg = load(ServerConfig, args={"insecure": True}, section="server", environ={})
    assert (cfg.listen, cfg.sql_listen, cfg.metrics_listen) == ("0.0.0.0:7600", "127.0.0.1:7623", "")
    assert cfg.clickhouse.startswith("chdb:///") and cfg.pending_rows_cap == 4 * cfg.flush_rows
    env = {"HDRLOG_INSECURE": "1", "HDRLOG_CLICKHOUSE": "http://default:pw@127.0.0.1:8123"}
    assert load(ServerConfig, section="server", environ=env).clickhouse.startswith("http://")
    with pytest.raises(ConfigError, match="--insecure") as err:
        load(ServerConfig, args={}, section="server", environ={})
    assert err.value.key == "insecure"
    bad = [({"listen": "nope"}, "listen"), ({"clickhouse": "mysql://x"}, "clickhouse"),
           ({"clickhouse": "chdb://relative"}, "clickhouse"), ({"flush_rows": "0"}, "flush_rows"),
           ({"flush_interval": "-1"}, "flush_interval"), ({"sql_listen": "1.2.3.4:99999"}, "sql_listen"),
           ({"tls_cert": "/x"}, "tls_cert")]
    for args, key in bad:
        with pytest.raises(ConfigError) as err:
            load(ServerConfig, args={"insecure": True, **args}, section="server", environ={})
        assert err.value.key == key, args
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        load(ServerConfig, args={"tls_cert": "/nonexistent.crt", "tls_key": "/k", "tls_ca": "/ca"}, section="server",
             environ={})
    assert err.value.key == "tls_cert" and "readable" in str(err.value)
