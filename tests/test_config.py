"""Tests for kvtier/config.py: YAML loading, strict validation, KVTIER_* environment overrides."""

from __future__ import annotations

import os
import time
import tracemalloc
from pathlib import Path

import pytest

from kvtier.config import (
    CpuConfig,
    DiskConfig,
    KvtierConfig,
    load_config,
    load_controller_config,
    load_server_config,
    parse_size,
)
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
        ("cpu:\n  capacty: 1GiB\n", "cpu.capacty",
         "unknown key (known: capacity, pin_memory, policy, admission)"),
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


# -- issue 8, item 17: configuration fails open -------------------------------------------------

SECRET = "s3cretZ9"  # a marker: no error message may contain it


@pytest.mark.parametrize("where", ["env", "file"])
@pytest.mark.parametrize("host", ["", "  "])
def test_empty_server_host_is_an_error_not_every_interface(tmp_path, where, host):
    # Regression: host "" reached bind(), which reads it as 0.0.0.0 (every interface).
    if where == "env":
        args, env, origin = (None, {"KVTIER_SERVER_HOST": host}, "environment KVTIER_SERVER_HOST")
    else:
        path = write(tmp_path, f"host: {host!r}\n")
        args, env, origin = (path, {}, str(path))
    with pytest.raises(ConfigError) as info:
        load_server_config(args, env=env)
    assert str(info.value) == f"{origin}: host: must not be empty"


@pytest.mark.parametrize(
    ("loader", "var", "key"),
    [("server", "KVTIER_SERVER_TOKEN", "token"), ("kvtier", "KVTIER_REMOTE__TOKEN", "remote.token")],
)
def test_empty_token_in_env_is_an_error_not_auth_off(loader, var, key):
    # Regression: KVTIER_SERVER_TOKEN="" read as YAML null, so a token meant to be set turned auth off.
    load = load_server_config if loader == "server" else load_config
    for text in ("", " "):
        with pytest.raises(ConfigError, match=f"^environment {var}: {key}: must not be empty"):
            load(env={var: text})


@pytest.mark.parametrize(("section", "key"), [("", "token"), ("remote:\n  ", "remote.token")])
def test_empty_token_in_file_is_an_error_not_the_empty_secret(tmp_path, section, key):
    # Regression: `token: ""` made "" the shared secret, which every client knows.
    path = write(tmp_path, f'{section}token: ""\n')
    load = load_config if section else load_server_config
    with pytest.raises(ConfigError, match=f"^{path}: {key}: must not be empty"):
        load(path, env={})


def test_absent_or_null_token_means_no_auth(tmp_path):
    assert load_server_config(env={}).token is None
    assert load_server_config(write(tmp_path, "token: null\n"), env={}).token is None
    assert load_server_config(env={"KVTIER_SERVER_TOKEN": "null"}).token is None


@pytest.mark.parametrize("text", [f"{SECRET} #rest", f"{{unclosed {SECRET}", "123", "true", "null x", " a "])
def test_env_string_keys_take_raw_text_not_yaml(text):
    # Regression: env values went through YAML: 's3cret #rest' became the token 's3cret', and a
    # token that is not valid YAML was echoed in the error.
    assert load_server_config(env={"KVTIER_SERVER_TOKEN": text}).token == text
    config = load_config(env={"KVTIER_REMOTE__TOKEN": text, "KVTIER_SALT": text, "KVTIER_DISK": "null"})
    assert config.remote is not None and config.remote.token == text
    assert config.salt == text


def test_env_yaml_error_does_not_echo_the_value():
    # Regression: the whole variable was quoted in "value ... is not valid YAML".
    for env in ({"KVTIER_REMOTE": f'{{token: "{SECRET}'}, {"KVTIER_CHUNK_SIZE": f"[{SECRET}"}):
        with pytest.raises(ConfigError, match="invalid YAML at line") as info:
            load_config(env=env)
        assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("text", "env"),
    [
        (f"remote:\n  token: [{SECRET}]\n", {}),
        ("remote:\n  token: 12345678\n", {}),  # a numeric token (unquoted) is not shown either
        (f"redis:\n  url: redis://:{SECRET}@cache:99999/0\n", {}),
        (f"redis:\n  url: http://user:{SECRET}@cache:6379/0\n", {}),
        (f"redis:\n  url: 'redis://:{SECRET}/x@cache:6379/0'\n", {}),
        ("", {"KVTIER_REDIS__URL": f"redis://user:{SECRET}@cache:0/0"}),
        ("", {"KVTIER_REMOTE__URL": f"kvtier://{SECRET}@cache:7000"}),
        ("", {"KVTIER_REMOTE__TOKEN": SECRET + "\udcff"}),
    ],
)
def test_secrets_are_never_shown_in_config_errors(tmp_path, text, env):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text) if text else None, env=env)
    assert SECRET not in str(info.value) and "12345678" not in str(info.value)


def test_tokens_are_not_in_the_config_repr():
    server = load_server_config(env={"KVTIER_SERVER_TOKEN": SECRET})
    remote = load_config(env={"KVTIER_REMOTE__TOKEN": SECRET}).remote
    assert server.token == SECRET and SECRET not in repr(server) and SECRET not in repr(remote)


def test_command_line_override_is_validated_like_a_file():
    # `kvtier_server --host ""` must fail like `host: ""` does, not bind every interface.
    from kvtier.config import override

    config = load_server_config(env={})
    assert override(config, "command line", {"host": "::1", "port": None}).host == "::1"
    with pytest.raises(ConfigError, match="^command line: host: must not be empty"):
        override(config, "command line", {"host": ""})
    with pytest.raises(ConfigError, match="^command line: port: must be <= 65535"):
        override(config, "command line", {"port": 70000})


# -- issue 8, item 18: every bad input is one clear ConfigError -----------------------------------


def test_non_utf8_config_file_is_one_config_error(tmp_path):
    # Regression: a UnicodeDecodeError traceback.
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"chunk_size: 16\nsalt: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == f"{path}: not UTF-8 text (byte 0xe9 at offset 24)"


@pytest.mark.parametrize("nested", ["[" * 5000 + "]" * 5000, "{a: " * 5000 + "1" + "}" * 5000])
def test_deep_nesting_is_a_config_error_not_recursion_error(tmp_path, nested):
    # Regression: 5,000 nested levels raised RecursionError from the YAML composer.
    path = write(tmp_path, f"chunk_size: {nested}\n")
    with pytest.raises(ConfigError, match=f"^{path}: invalid YAML at line 1, column "):
        load_config(path, env={})
    block = "".join("  " * i + "a:\n" for i in range(100))
    with pytest.raises(ConfigError, match="nested deeper than 32 levels"):
        load_config(write(tmp_path, block), env={})


def alias_bomb(levels: int) -> str:
    """The "billion laughs": each level is a list of 9 aliases of the level below."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\nchunk_size: *a{levels - 1}\n"


def test_yaml_alias_bomb_is_refused_not_expanded(tmp_path):
    # Regression: a ~1 KB file of nested aliases took 50 s and >2 GiB, then MemoryError (the error
    # message quoted the whole expansion). 6 levels keep the old code's expansion affordable here.
    path = write(tmp_path, alias_bomb(6))
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == f"{path}: invalid YAML at line 1, column 5: anchors (&name) are not allowed"


def test_full_size_alias_bomb_costs_nothing(tmp_path):
    # 9 levels (9**9 items once expanded) in under 1 KB: refused before anything is built.
    path = write(tmp_path, alias_bomb(9))
    assert path.stat().st_size < 1024
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(ConfigError, match="anchors"):
            load_config(path, env={})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 1.0 and peak < 4 << 20  # the old code: 50 s and >2 GiB
    bare_alias = r"^environment KVTIER_CPU: cpu: invalid YAML at line 1, column 1: aliases \(\*name\)"
    with pytest.raises(ConfigError, match=bare_alias):
        load_config(env={"KVTIER_CPU": "*a"})


@pytest.mark.parametrize(
    "text",
    ["chunk_size: !!int abc\n", "salt: !!timestamp x\n", "write_through: !!bool maybe\n",
     "chunk_size: !!float x\n", "salt: !secret x\n", "cpu: !!map {}\n"],
)
def test_explicit_yaml_tags_are_config_errors(tmp_path, text):
    # Regression: ValueError, AttributeError and KeyError escaped from PyYAML's constructors.
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=r"tags \(!name, !!type\) are not allowed"):
        load_config(path, env={})


def test_huge_integer_is_a_config_error(tmp_path):
    # Regression: a 5,000-digit integer raised ValueError (Python's int-from-text digit limit).
    with pytest.raises(ConfigError, match="integer longer than 40 characters"):
        load_config(write(tmp_path, "chunk_size: " + "9" * 5000 + "\n"), env={})
    with pytest.raises(ConfigError, match="chunk_size: must fit in 64 bits"):
        load_config(env={"KVTIER_CHUNK_SIZE": "9" * 20})
    with pytest.raises(ConfigError, match="size must be at most"):
        load_config(env={"KVTIER_DISK__CAPACITY": "9" * 100_000 + "TiB"})


@pytest.mark.parametrize("text", ["0x_", "-0b_"])
def test_numbers_yaml_admits_but_python_refuses_are_config_errors(tmp_path, text):
    # Regression: PyYAML resolves "0x_" as an int, then int("", 16) raised ValueError.
    path = write(tmp_path, f"chunk_size: {text}\n")
    with pytest.raises(ConfigError, match=f"^{path}: invalid YAML at line 1, column 13: not a valid number"):
        load_config(path, env={})


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e999"])
def test_non_finite_seconds_are_config_errors(value):
    # Regression: `timeout_s: .nan` passed the `>= 0.001` check (every comparison with NaN is false).
    with pytest.raises(ConfigError, match="^environment KVTIER_REMOTE__TIMEOUT_S: remote.timeout_s: "):
        load_config(env={"KVTIER_REMOTE__TIMEOUT_S": value})


def test_duplicate_key_is_a_config_error(tmp_path):
    # Regression: YAML kept the last of two `token:` lines silently.
    path = write(tmp_path, "token: a-long-secret\nport: 7001\ntoken: another-secret\n")
    with pytest.raises(ConfigError) as info:
        load_server_config(path, env={})
    assert str(info.value) == f"{path}: invalid YAML at line 3, column 1: duplicate key 'token'"


def test_date_like_salt_is_text(tmp_path):
    # Regression: `salt: 2024-01-01` became a datetime.date ("expected str"); `2024-13-45` a ValueError.
    for salt in ("2024-01-01", "2024-13-45"):
        assert load_config(write(tmp_path, f"salt: {salt}\n"), env={}).salt == salt


def test_config_file_over_the_size_limit_is_refused(tmp_path):
    from kvtier.config_yaml import MAX_CONFIG_BYTES

    path = write(tmp_path, "# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match=f"larger than {MAX_CONFIG_BYTES} bytes"):
        load_config(path, env={})


def test_fifo_or_directory_as_config_file_is_refused_without_waiting(tmp_path):
    # Regression: open() of a FIFO nobody writes to blocked for ever.
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path):
        with pytest.raises(ConfigError, match=f"^{path}: cannot read config file: not a regular file"):
            load_config(path, env={})


@pytest.mark.parametrize(
    ("text", "env", "key"),
    [
        ("cpu:\n  capacity: 64TiB\n", {}, "cpu.capacity"),
        ("", {"KVTIER_CPU__CAPACITY": "64TiB"}, "cpu.capacity"),
    ],
)
def test_capacity_beyond_physical_memory_is_a_config_error(tmp_path, text, env, key):
    # Regression: accepted, then torch failed with a RuntimeError allocating the pool.
    path = write(tmp_path, text) if text else None
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    origin = str(path) if path else "environment KVTIER_CPU__CAPACITY"
    assert str(info.value).startswith(f"{origin}: {key}: 70368744177664 bytes (65536.0 GiB) is more than "
                                      "this machine's physical memory (")


def test_server_capacity_beyond_physical_memory_is_a_config_error():
    with pytest.raises(ConfigError, match="^environment KVTIER_SERVER_CAPACITY: capacity: .* physical mem"):
        load_server_config(env={"KVTIER_SERVER_CAPACITY": "64TiB"})


def test_checks_that_depend_on_the_machine_apply_to_the_final_value(tmp_path):
    # A bad value in the file that the environment replaces is not an error.
    path = write(tmp_path, f"cpu:\n  capacity: 64TiB\ndisk:\n  path: {tmp_path / 'kvtier.yaml'}\n")
    config = load_config(path, env={"KVTIER_CPU__CAPACITY": "1GiB", "KVTIER_DISK__PATH": str(tmp_path)})
    assert config.cpu.capacity == GiB and config.disk is not None and config.disk.path == str(tmp_path)


@pytest.mark.parametrize(
    "url",
    ["redis://cache:99999/0", "redis://cache:abc/0", "redis://cache:0/0", "redis://:6379/0",
     "http://cache:6379/0", "redis://cache:6379/db", "redis://[::1/0", "unix://", ""],
)
def test_bad_redis_url_is_a_config_error_at_load(url):
    # Regression: accepted at load; the port error surfaced at the first connection.
    with pytest.raises(ConfigError, match="^environment KVTIER_REDIS__URL: redis.url: "):
        load_config(env={"KVTIER_REDIS__URL": url})


@pytest.mark.parametrize(
    "url", ["redis://cache", "redis://:pw@cache:6380/2", "rediss://[::1]:6379", "unix:///run/redis.sock"]
)
def test_good_redis_urls_load(url):
    config = load_config(env={"KVTIER_REDIS__URL": url})
    assert config.redis is not None and config.redis.url == url


@pytest.mark.parametrize(
    "url", ["kvtier://cache", "kvtier://cache:0", "kvtier://tok@cache:7000", "kvtier://cache:7000/x",
            "tcp://cache:7000", "kvtier://:7000"],
)
def test_bad_remote_url_is_a_config_error_at_load(url):
    with pytest.raises(ConfigError, match="^environment KVTIER_REMOTE__URL: remote.url: "):
        load_config(env={"KVTIER_REMOTE__URL": url})


def test_disk_path_that_is_a_file_is_a_config_error(tmp_path, monkeypatch):
    # Regression: accepted; the disk tier failed later with a traceback.
    afile = tmp_path / "afile"
    afile.write_text("")
    path = write(tmp_path, f"disk:\n  path: {afile}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == f"{path}: disk.path: {afile} exists and is not a directory"
    with pytest.raises(ConfigError, match=f"^environment KVTIER_SERVER_SPILL__PATH: spill.path: {afile} exi"):
        load_server_config(env={"KVTIER_SERVER_SPILL__PATH": str(afile)})
    with pytest.raises(ConfigError, match="^environment KVTIER_DISK__PATH: disk.path: cannot use .*Not a"):
        load_config(env={"KVTIER_DISK__PATH": str(afile / "below")})
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="is a symbolic link to nothing"):
        load_config(env={"KVTIER_DISK__PATH": str(tmp_path / "dangling")})
    # The default path is checked too, named as the default.
    monkeypatch.setenv("XDG_CACHE_HOME", str(afile))
    with pytest.raises(ConfigError, match=f"^<defaults>: disk.path: cannot use {afile}/kvtier: Not a dir"):
        load_config(env={})


def test_missing_or_empty_paths(tmp_path):
    assert load_config(env={"KVTIER_DISK__PATH": str(tmp_path / "new" / "dir")}).disk is not None
    with pytest.raises(ConfigError, match="^environment KVTIER_DISK__PATH: disk.path: must not be empty"):
        load_config(env={"KVTIER_DISK__PATH": ""})


def test_long_values_are_shortened_in_messages(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "chunk_size: [" + "1, " * 5000 + "]\n"), env={})
    assert len(str(info.value)) < len(str(tmp_path)) + 200


def _worst_cases() -> dict[str, str]:
    from kvtier.config_yaml import MAX_CONFIG_BYTES as size

    mapping = "".join(f"k{i}: v{i}\n" for i in range(size // 10))
    return {
        "flow list": "chunk_size: [" + "1, " * (size // 3 - 10) + "]\n",
        "mapping": mapping[: mapping.rindex("\n", 0, size) + 1],
        "string": 'salt: "' + "x" * (size - 10) + '"\n',
        "brackets": "[" * size,
        "words": "salt: " + "x " * (size // 2 - 10) + "\n",
        "block list": "- a\n" * (size // 4),
    }


@pytest.mark.parametrize("name", sorted(_worst_cases()))
def test_worst_case_config_files_load_in_bounded_time_and_memory(tmp_path, name):
    # Regression: a full-size list took ~9 s (pure-Python parser, 350,000 items built then refused).
    path = write(tmp_path, _worst_cases()[name])
    tracemalloc.start()
    started = time.monotonic()
    try:
        try:
            load_config(path, env={"KVTIER_DISK": "null"})
        except ConfigError:
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 2.0 and peak < 16 << 20  # measured: 0.05 s, 4 MiB


def test_controller_variables_reach_the_loader_they_belong_to():
    # KVTIER_CONTROLLER_TOKEN is kvtier_controller's token, KVTIER_CONTROLLER_URL the kvtier CLI's
    # controller, KVTIER_CONTROLLER__URL an instance's `controller:` section: each loader takes its
    # own and leaves the others alone (before, an instance's variable made the controller refuse to start).
    env = {"KVTIER_CONTROLLER_TOKEN": "t" * 20, "KVTIER_CONTROLLER_URL": "http://127.0.0.1:7100",
           "KVTIER_CONTROLLER__URL": "http://10.0.0.5:7100", "KVTIER_CONTROLLER__INSTANCE_ID": "a1"}
    instance = load_config(env=env)
    assert instance.controller is not None
    assert (instance.controller.url, instance.controller.instance_id) == ("http://10.0.0.5:7100", "a1")
    assert instance.controller.token is None
    controller = load_controller_config(env=env)
    assert controller.token == "t" * 20 and controller.port == 7100
    with pytest.raises(ConfigError, match="KVTIER_CONTROLLER_PORTS"):
        load_controller_config(env={"KVTIER_CONTROLLER_PORTS": "1"})
    with pytest.raises(ConfigError, match="controller.url"):
        load_config(env={"KVTIER_CONTROLLER__URL": "http://user:pw@host:1/path"})
