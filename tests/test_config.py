"""Tests for kvtier/config.py: YAML loading, strict validation, KVTIER_* environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.config import CpuConfig, DiskConfig, KvtierConfig, load_config, parse_size
from kvtier.errors import ConfigError

REPO = Path(__file__).parents[1]
GiB = 2**30


def write(tmp_path: Path, text: str, name: str = "kvtier.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_without_file_or_env_are_cpu_plus_disk(monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    config = load_config(env={})
    assert config.source == "<defaults>"
    assert config.chunk_size == 256
    assert config.cpu == CpuConfig(capacity=2 * GiB, pin_memory="auto")
    assert config.disk is not None
    assert config.disk.path == "/xdg/kvtier"
    assert config.disk.capacity == 16 * GiB
    assert (config.disk.o_direct, config.disk.io_threads, config.disk.fsync) == ("auto", 4, False)
    assert config.write_through and config.promote_on_hit and not config.save_partial_chunks


def test_default_disk_path_expands_home(monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "/home/someone")
    assert DiskConfig().path == "/home/someone/.cache/kvtier"


def test_empty_file_means_all_defaults(tmp_path):
    path = write(tmp_path, "")
    config = load_config(path, env={})
    assert config.source == str(path)
    assert config.chunk_size == 256 and config.disk is not None


def test_shipped_cpu_config_has_no_disk_tier():
    config = load_config(REPO / "configs" / "cpu.yaml", env={})
    assert config.disk is None
    assert config.cpu.capacity == 2 * GiB
    assert config.source.endswith("cpu.yaml")


def test_shipped_cpu_disk_config_resolves_relative_path_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(REPO / "configs" / "cpu_disk.yaml", env={})
    assert config.cpu.capacity == 2 * GiB
    assert config.disk == DiskConfig(
        path=str(tmp_path / ".kvtier-cache" / "disk"), capacity=16 * GiB, o_direct="auto", io_threads=4
    )
    assert config.write_through is True


def test_section_mapping_starts_from_section_defaults(tmp_path):
    config = load_config(write(tmp_path, "disk:\n  io_threads: 2\ncpu: {}\n"), env={})
    assert config.disk is not None
    assert config.disk.io_threads == 2
    assert config.disk.capacity == 16 * GiB
    assert config.cpu == CpuConfig()


def test_yaml_on_off_booleans_mean_on_off_for_switches(tmp_path):
    config = load_config(write(tmp_path, "cpu:\n  pin_memory: off\ndisk:\n  o_direct: on\n"), env={})
    assert config.cpu.pin_memory == "off"
    assert config.disk is not None and config.disk.o_direct == "on"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("4GiB", 4 * GiB),
        ("1.5GB", 1_500_000_000),
        ("1.1GB", 1_100_000_000),
        ("512MiB", 512 * 2**20),
        ("800kB", 800_000),
        ("1024", 1024),
        ("2 TiB", 2 * 2**40),
        ("64B", 64),
        (4096, 4096),
    ],
)
def test_parse_size_accepts(value, expected):
    assert parse_size(value, "x") == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("4GX", "invalid size"),
        ("GiB", "invalid size"),
        ("", "invalid size"),
        ("0.5B", "whole number"),
        (0, "must be positive"),
        (-5, "must be positive"),
        ("-1GiB", "must be positive"),
        (True, "expected a size"),
        (1.5, "expected a size"),
        ([1], "expected a size"),
    ],
)
def test_parse_size_rejects(value, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_size(value, "cpu.capacity")
    assert "cpu.capacity" in str(info.value)


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("cpu:\n  capacty: 1GiB\n", "cpu.capacty", "unknown key (known: capacity, pin_memory)"),
        ("chunk_sise: 5\n", "chunk_sise", "unknown key"),
        ("source: x\n", "source", "unknown key"),
        ("chunk_size: abc\n", "chunk_size", "expected int, got str 'abc'"),
        ("chunk_size: true\n", "chunk_size", "expected int, got bool"),
        ("write_through: 1\n", "write_through", "expected bool, got int"),
        ("salt: 7\n", "salt", "expected str, got int"),
        ("disk:\n  capacity: -5\n", "disk.capacity", "size must be positive, got -5"),
        ("cpu:\n  capacity: 0\n", "cpu.capacity", "size must be positive"),
        ("cpu:\n  pin_memory: maybe\n", "cpu.pin_memory", "expected one of auto, on, off"),
        ("disk:\n  io_threads: 0\n", "disk.io_threads", "must be >= 1, got 0"),
        ("chunk_size: 0\n", "chunk_size", "must be >= 1"),
        ("cpu: null\n", "cpu", "cannot be null"),
        ("cpu: 5\n", "cpu", "expected a mapping"),
        ("salt: null\n", "salt", "cannot be null"),
    ],
)
def test_bad_value_names_key_and_file(tmp_path, text, key, message):
    path = write(tmp_path, text, "bad.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}: {key}: ")
    assert message in str(info.value)


def test_config_error_is_a_value_error(tmp_path):
    with pytest.raises(ValueError):
        load_config(write(tmp_path, "chunk_size: -1\n"), env={})


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "chunk_size: 1\ncpu: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        load_config(path, env={})
    assert str(path) in str(info.value)
    assert "line " in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_top_level_names_file(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="top level must be a mapping") as info:
        load_config(path, env={})
    assert str(path) in str(info.value)


def test_missing_file_names_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read config file") as info:
        load_config(path, env={})
    assert str(path) in str(info.value)


def test_env_overrides_top_level_and_nested(tmp_path):
    env = {
        "KVTIER_CHUNK_SIZE": "128",
        "KVTIER_CPU__CAPACITY": "8GiB",
        "kvtier_ignored_prefix_case": "1",  # the prefix is exact; only the key part is case-insensitive
        "KVTIER_disk__Io_Threads": "2",
        "KVTIER_WRITE_THROUGH": "false",
        "KVTIER_SALT": "123",
        "KVTIER_CPU__PIN_MEMORY": "off",
    }
    config = load_config(env=env)
    assert config.chunk_size == 128
    assert config.cpu.capacity == 8 * GiB
    assert config.disk is not None and config.disk.io_threads == 2
    assert config.write_through is False
    assert config.salt == "123"
    assert config.cpu.pin_memory == "off"


def test_env_overrides_win_over_file(tmp_path):
    path = write(tmp_path, "chunk_size: 64\ncpu:\n  capacity: 1GiB\n")
    config = load_config(path, env={"KVTIER_CHUNK_SIZE": "32"})
    assert config.chunk_size == 32
    assert config.cpu.capacity == GiB  # untouched by env, still from the file


def test_env_disk_null_disables_disk():
    assert load_config(env={"KVTIER_DISK": "null"}).disk is None


def test_env_field_override_reenables_disk_disabled_in_file(tmp_path):
    path = write(tmp_path, "disk: null\n")
    assert load_config(path, env={}).disk is None
    config = load_config(path, env={"KVTIER_DISK__PATH": str(tmp_path / "d")})
    assert config.disk == DiskConfig(path=str(tmp_path / "d"))


def test_env_section_null_applies_before_field_override():
    config = load_config(env={"KVTIER_DISK__IO_THREADS": "3", "KVTIER_DISK": "null"})
    assert config.disk is not None and config.disk.io_threads == 3


def test_env_unknown_key_names_variable():
    with pytest.raises(ConfigError) as info:
        load_config(env={"KVTIER_CPU__CAPACTIY": "1GiB"})
    message = str(info.value)
    assert message.startswith("environment KVTIER_CPU__CAPACTIY: cpu.capactiy: unknown key (known: ")


def test_env_wrong_type_names_variable():
    with pytest.raises(ConfigError) as info:
        load_config(env={"KVTIER_CHUNK_SIZE": "abc"})
    assert str(info.value) == "environment KVTIER_CHUNK_SIZE: chunk_size: expected int, got str 'abc'"


def test_env_cannot_null_cpu_or_descend_into_a_value():
    with pytest.raises(ConfigError, match="KVTIER_CPU: cpu: this section cannot be null"):
        load_config(env={"KVTIER_CPU": "null"})
    with pytest.raises(ConfigError, match="KVTIER_CHUNK_SIZE__X: chunk_size: is a value"):
        load_config(env={"KVTIER_CHUNK_SIZE__X": "1"})


def test_kvtier_config_env_picks_the_file(tmp_path):
    path = write(tmp_path, "chunk_size: 16\ndisk: null\n")
    config = load_config(env={"KVTIER_CONFIG": str(path)})
    assert config.source == str(path)
    assert config.chunk_size == 16 and config.disk is None


def test_explicit_path_beats_kvtier_config_env(tmp_path):
    chosen = write(tmp_path, "chunk_size: 8\n", "a.yaml")
    other = write(tmp_path, "chunk_size: 9\n", "b.yaml")
    assert load_config(chosen, env={"KVTIER_CONFIG": str(other)}).chunk_size == 8


def test_env_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("KVTIER_CHUNK_SIZE", "77")
    monkeypatch.delenv("KVTIER_CONFIG", raising=False)
    assert load_config().chunk_size == 77


def test_config_is_frozen():
    config = KvtierConfig()
    with pytest.raises(AttributeError):
        config.chunk_size = 1  # type: ignore[misc]


def test_empty_env_value_for_a_string_key_is_the_empty_string():
    # Regression: KVTIER_SALT="" parsed as YAML null and was rejected as "cannot be null".
    config = load_config(env={"KVTIER_SALT": ""})
    assert config.salt == ""
