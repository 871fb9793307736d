"""Tests for the `loads:` section (kvtier/config_connector.py LoadsConfig, read by kvtier/config.py):
defaults, every key from a file and from the environment; every bad value names the dotted key and
where it came from."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvtier.config import KvtierConfig, LoadsConfig, load_config
from kvtier.errors import ConfigError

MiB, GiB = 1 << 20, 1 << 30


def write(tmp_path: Path, loads: str) -> Path:
    """A config file whose disk tier lives in tmp_path, with `loads` (YAML lines) as its loads section."""
    path = tmp_path / "kvtier.yaml"
    path.write_text(f"disk:\n  path: {tmp_path / 'disk'}\nloads:\n{loads}")
    return path


def test_the_defaults_are_auto_with_prefetch():
    assert KvtierConfig().loads == load_config(env={}).loads == LoadsConfig(
        asynchronous="auto", async_min_bytes=64 * MiB, async_max_bytes_in_flight=GiB, prefetch=True,
        prefetch_max_bytes_in_flight=512 * MiB)


@pytest.mark.parametrize("mode", ["auto", "on", "off"])
def test_every_key_is_read_from_the_file(tmp_path, mode):
    # `on` and `off` are read as the switch's names (YAML 1.1 would have read them as booleans).
    text = (f"  asynchronous: {mode}\n  async_min_bytes: 1MiB\n  async_max_bytes_in_flight: 256MiB\n"
            "  prefetch: false\n  prefetch_max_bytes_in_flight: 64MiB\n")
    loads = load_config(write(tmp_path, text), env={}).loads
    assert loads == LoadsConfig(mode, MiB, 256 * MiB, False, 64 * MiB)


@pytest.mark.parametrize(("text", "key", "problem"), [
    ("  asynchronous: sometimes\n", "loads.asynchronous", "expected one of auto, on, off"),
    ("  asynchronous: 1\n", "loads.asynchronous", ""),
    ("  async_min_bytes: 0\n", "loads.async_min_bytes", "size must be positive"),
    ("  async_max_bytes_in_flight: lots\n", "loads.async_max_bytes_in_flight", "invalid size"),
    ("  async_max_bytes_in_flight: 100PiB\n", "loads.async_max_bytes_in_flight", ""),
    ("  prefetch: maybe\n", "loads.prefetch", ""),
    ("  prefetch_max_bytes_in_flight: -5\n", "loads.prefetch_max_bytes_in_flight", "size must be positive"),
    ("  asynchronus: on\n", "loads.asynchronus", ""),
])
def test_bad_values_name_the_key_and_file(tmp_path, text, key, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {re.escape(key)}: .*{problem}"):
        load_config(path, env={})


def test_environment_overrides_set_each_key():
    env = {"KVTIER_LOADS__ASYNCHRONOUS": "off", "KVTIER_LOADS__ASYNC_MIN_BYTES": "2MiB",
           "KVTIER_LOADS__ASYNC_MAX_BYTES_IN_FLIGHT": "128MiB", "KVTIER_LOADS__PREFETCH": "false",
           "KVTIER_LOADS__PREFETCH_MAX_BYTES_IN_FLIGHT": "8MiB"}
    assert load_config(env=env).loads == LoadsConfig("off", 2 * MiB, 128 * MiB, False, 8 * MiB)


def test_a_bad_environment_override_names_the_variable_and_the_key():
    with pytest.raises(ConfigError, match=r"^environment KVTIER_LOADS__ASYNCHRONOUS: loads.asynchronous: "):
        load_config(env={"KVTIER_LOADS__ASYNCHRONOUS": "maybe"})


def test_the_environment_overrides_the_file(tmp_path):
    path = write(tmp_path, "  asynchronous: on\n  prefetch: false\n")
    loads = load_config(path, env={"KVTIER_LOADS__ASYNCHRONOUS": "auto"}).loads
    assert (loads.asynchronous, loads.prefetch) == ("auto", False)
