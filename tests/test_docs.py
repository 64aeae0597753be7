"""docs/config.md mirrors the config dataclasses; --help teaches every flag."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

from tests.support import HDRLOG

ROOT = Path(__file__).resolve().parent.parent


def test_config_docs_are_current():
    spec = importlib.util.spec_from_file_location("gen", ROOT / "scripts" / "gen-config-docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (ROOT / "docs" / "config.md").read_text() == gen.render(), \
        "docs/config.md is stale: run .venv/bin/python scripts/gen-config-docs.py"


def test_help_names_every_flag_with_its_env_variable():
    for args in (["server", "run"], ["collector", "run"], ["sql"], ["pki", "issue"]):
        out = subprocess.run([*HDRLOG, *args, "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        if args[-1] == "run":
            assert "HDRLOG_INSECURE" in out.stdout.replace("\n", " ").replace("  ", " ")


def test_bad_flag_value_is_one_line_exit_2():
    out = subprocess.run([*HDRLOG, "collector", "run", "--insecure", "--server", "127.0.0.1:1",
                          "--iface", "lo", "--sample", "zero"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == "hdrlog: bad config --sample='zero': expected int"
