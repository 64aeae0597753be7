"""Config loading: one declaration gives flag, env, file key; bad values fail in one clear line."""

from __future__ import annotations

import pytest

from hdrlog import config as cfg
from hdrlog.collector.config import CollectorConfig


def load(args=None, file=None, environ=None):
    return cfg.load(CollectorConfig, args=args or {}, file=file, section="collector", environ=environ or {})


def test_flag_beats_env_beats_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("collector:\n  server: file:1\n  sample: 3\n  batch-rows: 7\n  insecure: true\n  iface: [a, b]\n")
    c = load(file=str(f))
    assert (c.server, c.sample, c.batch_rows, c.iface, c.insecure) == (["file:1"], 3, 7, ["a", "b"], True)
    c = load(file=str(f), environ={"HDRLOG_SERVER": "env:2", "HDRLOG_IFACE": "x, y*"})
    assert (c.server, c.iface) == (["env:2"], ["x", "y*"])
    c = load(args={"server": ["flag:3"], "iface": ["z"]}, file=str(f), environ={"HDRLOG_SERVER": "env:2"})
    assert (c.server, c.iface, c.sample) == (["flag:3"], ["z"], 3)


def test_several_servers_for_failover(tmp_path):
    """`server` is a list: repeated flags, comma lists, a YAML list; a single value still works."""
    base = {"iface": ["e"], "insecure": True}
    assert load(args={**base, "server": ["a:1", "b:2,c:3"]}).server == ["a:1", "b:2", "c:3"]
    assert load(args=base, environ={"HDRLOG_SERVER": "a:1, b:2"}).server == ["a:1", "b:2"]
    f = tmp_path / "c.yaml"
    f.write_text("collector:\n  server: [a:1, b:2]\n")
    assert load(args=base, file=str(f)).server == ["a:1", "b:2"]
    with pytest.raises(cfg.ConfigError, match="each server may be named once"):
        load(args={**base, "server": ["a:1", "a:1"]})
    with pytest.raises(cfg.ConfigError, match="bad config server='b'"):
        load(args={**base, "server": ["a:1,b"]})


def test_defaults_fill_host_id():
    c = load(args={"server": ["h:1"], "iface": ["eth0"], "insecure": True})
    assert c.host_id and c.batch_rows == 10_000 and c.sample == 1


@pytest.mark.parametrize("args, environ, needle", [
    ({"iface": ["e"], "insecure": True}, {}, "bad config server=''"),
    ({"server": ["nope"], "iface": ["e"], "insecure": True}, {}, "bad config server='nope'"),
    ({"server": "h:1", "insecure": True}, {}, "bad config iface=[]"),
    ({"server": "h:1", "iface": ["e"], "insecure": True}, {"HDRLOG_SAMPLE": "many"}, "HDRLOG_SAMPLE='many'"),
    ({"server": "h:1", "iface": ["e"], "insecure": True, "sample": "0"}, {}, "sample=0: must be 1 or more"),
    ({"server": "h:1", "iface": ["e"]}, {}, "or --insecure"),
    ({"server": "h:1", "iface": ["e"], "insecure": True, "ringbuf_bytes": "5000"}, {}, "power of two"),
])
def test_bad_values_name_key_value_and_rule(args, environ, needle):
    with pytest.raises(cfg.ConfigError) as info:
        load(args=args, environ=environ)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_bad_files(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(cfg.ConfigError, match="cannot read the file"):
        load(file=str(missing))
    broken = tmp_path / "broken.yaml"
    broken.write_text("collector:\n  server: [unclosed\n")
    with pytest.raises(cfg.ConfigError, match="not valid YAML at line"):
        load(file=str(broken))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("collector:\n  sevrer: h:1\n")
    with pytest.raises(cfg.ConfigError, match=r"collector.sevrer='h:1': unknown key"):
        load(file=str(unknown))


def test_hostport():
    assert cfg.parse_hostport("k", "[::1]:80") == ("::1", 80)
    assert cfg.parse_hostport("k", ":0") == ("0.0.0.0", 0)
    assert cfg.parse_hostport("k", "", allow_empty=True) is None
    with pytest.raises(cfg.ConfigError):
        cfg.parse_hostport("k", "host:99999")


@pytest.mark.parametrize("text, seconds", [("500ms", 0.5), ("1s", 1.0), ("15m", 900.0), ("1h30m", 5400.0),
                                           ("2d", 172800.0), ("2.5", 2.5), ("1m500ms", 60.5), ("0", 0.0)])
def test_one_duration_syntax_for_every_duration(text, seconds):
    c = load(args={"server": "s:1", "iface": ["lo"], "insecure": True, "shutdown_timeout": text}, environ={})
    assert c.shutdown_timeout == seconds
    assert cfg.parse_duration("k", text, allow_zero=True) == seconds


def test_durations_are_the_same_syntax_in_file_env_and_every_command(tmp_path):
    from hdrlog.server.config import ServerConfig
    from hdrlog.report.config import ReportConfig

    f = tmp_path / "c.yaml"
    f.write_text("server:\n  insecure: true\n  flush_interval: 250ms\nreport:\n  webhook_timeout: 1m\n")
    s = cfg.load(ServerConfig, args={}, file=str(f), section="server", environ={"HDRLOG_STATUS_INTERVAL": "15m"})
    assert (s.flush_interval, s.status_interval) == (0.25, 900.0)
    r = cfg.load(ReportConfig, args={}, file=str(f), section="report", environ={})
    assert r.webhook_timeout == 60.0
    with pytest.raises(cfg.ConfigError) as err:
        load(args={"server": "s:1", "iface": ["lo"], "insecure": True, "shutdown_timeout": "5 minutes"})
    assert err.value.key == "--shutdown-timeout" and "500ms" in str(err.value)


def test_an_unknown_section_is_an_error_like_an_unknown_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("colector:\n  server: s:1\n")
    with pytest.raises(cfg.ConfigError) as err:
        load(file=str(f))
    assert "unknown section 'colector'" in str(err.value) and "collector" in str(err.value)


def test_a_commands_own_variable_beats_the_shared_one():
    """HDRLOG_METRICS_LISTEN means the server's and the collector's port alike; HDRLOG_COLLECTOR_... is one."""
    env = {"HDRLOG_METRICS_LISTEN": "127.0.0.1:9100", "HDRLOG_COLLECTOR_METRICS_LISTEN": "127.0.0.1:9200"}
    c = load(args={"server": "s:1", "iface": ["lo"], "insecure": True}, environ=env)
    assert c.metrics_listen == "127.0.0.1:9200"
    from hdrlog.server.config import ServerConfig

    s = cfg.load(ServerConfig, args={"insecure": True}, section="server", environ=env)
    assert s.metrics_listen == "127.0.0.1:9100"


def test_tunnel_types_and_ports(tmp_path):
    base = {"server": ["h:1"], "iface": ["e"], "insecure": True}
    c = load(args=base)
    assert (c.tunnels, c.vxlan_ports, c.geneve_ports) == (["vxlan", "geneve", "gre", "ipip"], [4789, 8472], [6081])
    c = load(args={**base, "vxlan_ports": ["14789,4789"]}, environ={"HDRLOG_TUNNELS": "gre,VXLAN"})
    assert (c.tunnels, c.vxlan_ports) == (["vxlan", "gre"], [4789, 14789])
    f = tmp_path / "c.yaml"
    f.write_text("collector:\n  tunnels: none\n  geneve_ports: [16081]\n")
    c = load(args=base, file=str(f))
    assert (c.tunnels, c.geneve_ports) == ([], [16081])
    from hdrlog.bpf import build
    from hdrlog.collector.capture import CaptureConfig

    flags = build.cflags(CaptureConfig.from_config(c, []))
    assert "-DHDRLOG_TUNNELS=0" in flags and "-DHDRLOG_IS_GENEVE_PORT(p)=(0)" in flags
    flags = build.cflags(CaptureConfig.from_config(load(args={**base, "vxlan_ports": ["14789"]}), []))
    assert "-DHDRLOG_TUNNELS=1" in flags and "-DHDRLOG_IS_VXLAN_PORT(p)=((p)==14789)" in flags


@pytest.mark.parametrize("key, value, needle", [
    ("vxlan_ports", "0", "bad config vxlan_ports=['0']: at most 8 UDP port numbers 1-65535"),
    ("vxlan_ports", "x", "bad config vxlan_ports=['x']: UDP port numbers"),
    ("geneve_ports", "70000", "bad config geneve_ports=['70000']"),
    ("vxlan_ports", "4790", "4790 is VXLAN-GPE"),
    ("geneve_ports", "4789", "port 4789 is in vxlan_ports too"),
    ("tunnels", "vxlan,mpls", "bad config tunnels=['vxlan', 'mpls']: any of vxlan, geneve, gre, ipip, or none"),
])
def test_bad_tunnel_config_is_one_line_naming_the_key(key, value, needle):
    with pytest.raises(cfg.ConfigError) as info:
        load(args={"server": ["h:1"], "iface": ["e"], "insecure": True}, environ={f"HDRLOG_{key.upper()}": value})
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)
