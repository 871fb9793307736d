"""Fuzz tests for kvtier/config.py and kvtier/config_yaml.py: whatever the file or the environment
holds, loading returns a config or raises one ConfigError -- never another exception, never slowly,
and never with a secret in the message."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.config import KvtierConfig, ServerConfig, load_config, load_server_config
from kvtier.errors import ConfigError

SECRET = "zq9SECRETzq9"  # planted in tokens and URL passwords: it must never reach a message
SLOW_S = 5.0  # one load, whatever the input (the inputs below are small; bounds are tested apart)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])

# Keys that exist, so that examples get past "unknown key" and reach the value checks.
KEYS = ["chunk_size", "save_partial_chunks", "salt", "write_through", "promote_on_hit", "cpu", "disk",
        "redis", "remote", "capacity", "pin_memory", "path", "o_direct", "io_threads", "fsync", "url",
        "cluster", "ttl_s", "timeout_s", "max_connections", "batch_size", "retry_after_s", "retry_max_s",
        "key_prefix", "token", "connections", "host", "port", "max_frame_bytes", "spill",
        "stats_interval_s"]
# YAML syntax and plausible values, for text that is YAML-ish rather than noise.
PIECES = KEYS + [
    ":", ": ", " ", "  ", "\n", "- ", "[", "]", "{", "}", ", ", "&a ", "*a", "!!int ", "!x ", "'", '"',
    "# c", "? ", "|", ">", "<<: ", "---", "...", "~", "null", "true", "off", "0", "-1", "1.5", ".nan",
    "1e999", "9" * 30, "64TiB", "4GiB", "0x1F", "0x", "0b", "_", ".", "e+1", "2024-13-45",
    "redis://:pw@h:99999/0", "kvtier://h:7000", "/tmp", "\t", "\\u00e9", "\x00", "\udcff",
]


def check(load: Any, path: Path | None, env: dict[str, str]) -> None:
    started = time.monotonic()
    try:
        config = load(path, env=env)
    except ConfigError as exc:
        assert SECRET not in str(exc)
    else:
        assert isinstance(config, (KvtierConfig, ServerConfig))
        assert SECRET not in repr(config)
    assert time.monotonic() - started < SLOW_S


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(data)
    return path


LOADERS = pytest.mark.parametrize("load", [load_config, load_server_config], ids=["kvtier", "server"])


@LOADERS
@FUZZ
@given(data=st.binary(max_size=2048))
def test_fuzz_config_file_bytes(tmp_path, load, data):
    check(load, write(tmp_path, data), {})


@LOADERS
@FUZZ
@given(text=st.lists(st.sampled_from(PIECES), max_size=60).map("".join))
def test_fuzz_config_file_yaml_ish_text(tmp_path, load, text):
    check(load, write(tmp_path, text.encode("utf-8", "surrogateescape")), {})


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40), st.sampled_from(["64TiB", "1GiB", "0", "-5", "redis://h:1/0", "kvtier://h:1", ""]),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=10))
structures = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(keys, inner, max_size=5)),
                          max_leaves=30)
secrets = st.sampled_from([{"token": SECRET}, {"token": [SECRET]}, {"token": {"a": SECRET}},
                           {"url": f"redis://:{SECRET}@h:99999/0"}, {"url": f"kvtier://{SECRET}@h:7000"},
                           {"salt": SECRET}, {"salt": [SECRET]}, {"salt": {SECRET: 1}},
                           {f"token {SECRET}": None}])


@LOADERS
@FUZZ
@given(top=st.dictionaries(keys, structures, max_size=8), secret=secrets, section=st.sampled_from(
    ["", "remote", "redis"]))
def test_fuzz_config_file_nested_structures(tmp_path, load, top, secret, section):
    # A secret is planted where it belongs (a token, a URL's password); any error must hide it.
    top = dict(top)
    if section:
        top[section] = {**(top[section] if isinstance(top.get(section), dict) else {}), **secret}
    else:
        top.update(secret)
    check(load, write(tmp_path, yaml.safe_dump(top).encode()), {})


env_names = st.lists(st.sampled_from(KEYS), min_size=1, max_size=3).map(lambda p: "__".join(p).upper())
env_values = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=30),  # surrogates included
    st.lists(st.sampled_from(PIECES), max_size=12).map("".join),
)


@LOADERS
@FUZZ
@given(env=st.dictionaries(env_names, env_values, max_size=6), token=env_values)
def test_fuzz_env_overrides(load, env, token):
    prefix = "KVTIER_SERVER_" if load is load_server_config else "KVTIER_"
    env = {prefix + name: value for name, value in env.items()}
    env[prefix + ("TOKEN" if load is load_server_config else "REMOTE__TOKEN")] = SECRET + token
    check(load, None, env)


numberish = st.from_regex(r"[-+]?(0[bxo]?)?[0-9a-fA-F_:.eE+-]{0,8}|[-+]?\.(inf|nan|Inf|NaN)", fullmatch=True)
leaf_keys = st.sampled_from(["chunk_size", "salt", "cpu:\n  capacity", "redis:\n  url", "redis:\n  ttl_s",
                             "remote:\n  timeout_s", "disk:\n  io_threads", "cpu:\n  pin_memory"])


@FUZZ
@given(key=leaf_keys, value=st.one_of(numberish, st.lists(st.sampled_from(PIECES), max_size=4).map("".join)))
def test_fuzz_one_value_in_a_file(tmp_path, key, value):
    check(load_config, write(tmp_path, f"{key}: {value}\n".encode("utf-8", "surrogateescape")), {})


# A URL's secrets (password, `?password=`) wherever a URL may be written by mistake: any key, a
# section's place, inside lists and mappings, in the file or the environment.
url_secrets = st.sampled_from([f"redis://:{SECRET}@h:6379/0", f"redis://u:{SECRET}@h:99999/0",
                               f"rediss://h:6379/x?password={SECRET}", f"redis://u:{SECRET}@h:6379/0?foo=1",
                               f"kvtier://u:{SECRET}@h:7000", f"unix://:{SECRET}@/run/redis.sock"])
planted = st.recursive(url_secrets, lambda inner: st.one_of(
    st.lists(inner, min_size=1, max_size=3), st.dictionaries(keys, inner, min_size=1, max_size=3)),
    max_leaves=4)


@LOADERS
@FUZZ
@given(top=st.dictionaries(keys, structures, max_size=6), path=st.lists(st.sampled_from(KEYS), min_size=1,
                                                                        max_size=2), value=planted)
def test_fuzz_a_url_password_anywhere_in_a_file_is_never_shown(tmp_path, load, top, path, value):
    top = dict(top)
    if len(path) == 1:
        top[path[0]] = value
    else:
        top[path[0]] = {**(top[path[0]] if isinstance(top.get(path[0]), dict) else {}), path[1]: value}
    check(load, write(tmp_path, yaml.safe_dump(top).encode()), {})


@LOADERS
@FUZZ
@given(env=st.dictionaries(env_names, env_values, max_size=4), name=env_names, url=url_secrets)
def test_fuzz_a_url_password_in_any_environment_variable_is_never_shown(load, env, name, url):
    prefix = "KVTIER_SERVER_" if load is load_server_config else "KVTIER_"
    env = {prefix + key: value for key, value in {**env, name: url}.items()}
    check(load, None, env)
