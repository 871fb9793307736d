"""Tests for the `trace_log:` section (kvtier/config_connector.py TraceLogConfig, read by kvtier/config.py):
off by default, both keys from a file and from the environment, every shipped engine config spelling it
out at its defaults; a bad value names the dotted key and where it came from."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from kvtier.config import KvtierConfig, TraceLogConfig, load_config
from kvtier.errors import ConfigError

ENGINE_CONFIGS = ["cachegen", "cpu", "cpu_disk", "fleet", "p2p", "redis", "redis_cluster", "remote"]


def write(tmp_path: Path, trace_log: str) -> Path:
    path = tmp_path / "kvtier.yaml"
    path.write_text(f"disk: null\ntrace_log:\n{trace_log}")
    return path


def test_off_by_default_with_a_one_gib_cap():
    assert KvtierConfig().trace_log == load_config(env={}).trace_log == TraceLogConfig("", 1 << 30)


def test_both_keys_are_read_from_the_file_and_the_environment(tmp_path):
    config = load_config(write(tmp_path, "  path: logs/trace.jsonl\n  max_bytes: 10MiB\n"), env={})
    assert config.trace_log == TraceLogConfig("logs/trace.jsonl", 10 << 20)
    env = {"KVTIER_TRACE_LOG__PATH": "/var/log/kvtier trace.jsonl", "KVTIER_TRACE_LOG__MAX_BYTES": "5MB"}
    assert load_config(env=env).trace_log == TraceLogConfig("/var/log/kvtier trace.jsonl", 5_000_000)


@pytest.mark.parametrize("name", ENGINE_CONFIGS)
def test_shipped_configs_spell_out_the_section_at_its_defaults(name):
    path = REPO / "configs" / f"{name}.yaml"
    assert set(yaml.safe_load(path.read_text())["trace_log"]) == {"path", "max_bytes"}
    assert load_config(path, env={}).trace_log == TraceLogConfig()


@pytest.mark.parametrize(("text", "key", "problem"), [
    ("  max_bytes: lots\n", "trace_log.max_bytes", "invalid size"),
    ("  max_bytes: 0\n", "trace_log.max_bytes", "size must be positive"),
    ("  path: 5\n", "trace_log.path", "expected str"),
    ("  path: null\n", "trace_log.path", "cannot be null"),
    (f"  path: {'a' * 4097}\n", "trace_log.path", "longer than 4096 bytes"),
    ("  max_size: 1GiB\n", "trace_log.max_size", "unknown key"),
])
def test_bad_values_name_the_key_and_the_file(tmp_path, text, key, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {re.escape(key)}: .*{problem}"):
        load_config(path, env={})


def test_a_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match=r"^environment KVTIER_TRACE_LOG__MAX_BYTES: trace_log.max_bytes: "):
        load_config(env={"KVTIER_TRACE_LOG__MAX_BYTES": "-1"})
