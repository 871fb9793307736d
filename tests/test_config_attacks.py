"""Attacks on kvtier/config.py, config_yaml.py and config_values.py that got through the first
hardening (issue 8, items 17-18): secrets shown where they were not expected, numbers that YAML 1.1
reads as something else than what was written, a bound that was missing. Each test is named after
the bug; the last ones pin odd inputs that already failed closed."""

from __future__ import annotations

import os

import pytest

from kvtier.config import MAX_REDIS_CONNECTIONS, MAX_TOKEN_BYTES, load_config, load_server_config
from kvtier.errors import ConfigError
from kvtier.wire.frames import MAX_TEXT_BYTES

SECRET = "zq9SECRETzq9"


def load_text(tmp_path, text: str, server: bool = False, env: dict[str, str] | None = None):
    path = tmp_path / "kvtier.yaml"
    path.write_text(text)
    return (load_server_config if server else load_config)(path, env=env or {})


def refused(tmp_path, text: str | None, env: dict[str, str] | None = None, server: bool = False) -> str:
    """The one ConfigError's message for a file `text` (None: no file) plus `env`."""
    with pytest.raises(ConfigError) as err:
        if text is None:
            (load_server_config if server else load_config)(None, env=env or {})
        else:
            load_text(tmp_path, text, server, env)
    return str(err.value)


# -- secrets where a secret was not expected --------------------------------------------------------


@pytest.mark.parametrize(("text", "env", "key"), [
    (f"redis: redis://:{SECRET}@cache:6379/0\n", None, "redis"),
    (None, {"KVTIER_REDIS": f"redis://:{SECRET}@cache:6379/0"}, "redis"),
    (f"redis: {{cluster: true, url: [redis://:{SECRET}@n1:6379, redis://:{SECRET}@n2:6379]}}\n", None,
     "redis.url"),
    (f"redis: {{url: 'redis://cache:99999/0?password={SECRET}'}}\n", None, "redis.url"),
    (f"redis: {{url: 'redis://cache:6379/x?password={SECRET}'}}\n", None, "redis.url"),
], ids=["section_given_a_url", "env_section_given_a_url", "list_of_cluster_urls", "query_password_bad_port",
        "query_password_bad_db"])
def test_a_redis_password_outside_the_url_key_or_in_the_query_is_never_shown(tmp_path, text, env, key):
    """Bug: credentials were redacted only when the URL sat at a url key and only before '@':
    `redis: redis://:pw@host` (or KVTIER_REDIS=...), a list of cluster URLs and `?password=` printed
    the password."""
    message = refused(tmp_path, text, env)

    assert SECRET not in message
    assert f"{key}:" in message


def test_redis_url_credentials_are_not_in_the_config_repr():
    """Bug: repr(config) showed redis.url with its password (and `?password=`)."""
    env = {"KVTIER_REDIS__URL": f"redis://kv:{SECRET}@cache.internal:6379/0?password={SECRET}"}

    config = load_config(env=env)

    assert SECRET not in repr(config) and SECRET not in repr(config.redis)
    assert "cache.internal:6379/0" in repr(config.redis)  # the rest stays useful


@pytest.mark.parametrize("text", [f"salt: [{SECRET}]\n", "salt: 918273645\n", f"salt: {{{SECRET}: 1}}\n"])
def test_the_salt_is_never_shown_in_a_type_error(tmp_path, text):
    """Bug: `salt: 918273645` (a tenant's salt, read by YAML as an int) was printed in the error."""
    message = refused(tmp_path, text)

    assert SECRET not in message and "918273645" not in message
    assert "salt:" in message


def test_the_salt_is_not_in_the_config_repr():
    """Bug: KVTIER_SALT was in repr(config), like a token would have been."""
    config = load_config(env={"KVTIER_SALT": SECRET})

    assert config.salt == SECRET and SECRET not in repr(config)


@pytest.mark.parametrize(("text", "server"), [
    (f"remote:\n  token {SECRET}\n", False),
    (f"remote: {{url: 'kvtier://cache:7000', token {SECRET}}}\n", False),
    (f"{{host: 127.0.0.1, token={SECRET}}}\n", True),
    (f"{{token {SECRET}, token {SECRET}}}\n", True),
], ids=["section_scalar", "flow_mapping_key", "server_flow_mapping_key", "duplicate_key"])
def test_a_token_line_missing_its_colon_is_not_echoed(tmp_path, text, server):
    """Bug: `token s3cret` (colon forgotten) became a section's scalar value or an unknown key, and
    both were printed whole."""
    message = refused(tmp_path, text, server=server)

    assert SECRET not in message
    assert "remote" in message or "unknown key" in message or "duplicate key 'token'" in message


def test_unknown_keys_are_still_named():
    message = str(pytest.raises(ConfigError, load_config, env={"KVTIER_CPU__CAPCITY": "1GiB"}).value)

    assert "KVTIER_CPU__CAPCITY" in message and "cpu.capcity: unknown key" in message


@pytest.mark.parametrize("option", ["decode_responses=1", "socket_connect_timeout=1e9", "socket_timeout=-1",
                                    "max_connections=1", "retry_on_timeout=1", "protocol=3"])
def test_redis_url_options_that_override_the_tier_are_config_errors(option):
    """Bug: redis-py read these from the URL's query over the tier's own settings:
    `?decode_responses=1` made every get raise UnicodeDecodeError to the caller,
    `?socket_connect_timeout=1e9` replaced timeout_s (a black-holed host held a lookup for minutes),
    `?socket_timeout=-1` raised ValueError at the first call."""
    name = option.partition("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config(env={"KVTIER_REDIS__URL": f"redis://:{SECRET}@cache:6379/0?{option}"})

    assert f"redis.url: URL option {name} is not allowed" in str(err.value) and SECRET not in str(err.value)


@pytest.mark.parametrize("query", ["?db=1", f"?password={SECRET}", "?ssl_cert_reqs=none", "?client_name=kv"])
def test_redis_url_options_for_tls_and_identity_still_load(query):
    assert load_config(env={"KVTIER_REDIS__URL": f"rediss://cache:6379/0{query}"}).redis is not None


@pytest.mark.parametrize("host", [f"redis://:{SECRET}@h:6379/0", "127.0.0.1 ", "127.0.0.1\n", "a b", "[::1]"])
def test_a_server_host_that_is_not_a_name_or_address_is_refused_at_load(host):
    """Bug: any text was a host: `KVTIER_SERVER_HOST=redis://:pw@h` loaded (repr and the bind error
    then showed the password); "127.0.0.1 " failed only at bind."""
    message = refused(None, None, {"KVTIER_SERVER_HOST": host}, server=True)

    assert "KVTIER_SERVER_HOST: host: expected a host name or IP address" in message and SECRET not in message


@pytest.mark.parametrize("host", ["::1", "0.0.0.0", "localhost", "fe80::1%eth0", "cache-1.example.com"])
def test_host_names_and_addresses_still_load(host):
    assert load_server_config(env={"KVTIER_SERVER_HOST": host, "KVTIER_SERVER_TOKEN": "t"}).host == host


@pytest.mark.parametrize(("var", "server"), [("KVTIER_DISK__PATH", False),
                                            ("KVTIER_SERVER_SPILL__PATH", True)])
def test_a_url_as_a_directory_is_refused_not_made_a_local_folder(var, server):
    """Bug: `disk.path: s3://key:secret@bucket` became the folder '<cwd>/s3:/key:secret@bucket' (the
    tier would create it) and the secret was in the repr."""
    message = refused(None, None, {var: f"s3://key:{SECRET}@bucket/kv"}, server=server)

    assert "expected a local directory, got a URL" in message and SECRET not in message


def test_a_url_written_into_key_prefix_is_redacted_in_the_repr():
    """Bug: only secret keys were kept out of repr(config); a URL with its password written into
    another text key (redis.key_prefix) was shown whole."""
    config = load_config(env={"KVTIER_REDIS__KEY_PREFIX": f"redis://:{SECRET}@h:6379/0"})

    assert config.redis.key_prefix.startswith("redis://") and SECRET not in repr(config)


# -- bounds ----------------------------------------------------------------------------------------


def test_a_huge_redis_max_connections_is_a_config_error_not_a_hang(tmp_path):
    """Bug: redis.max_connections had no upper bound; redis-py's blocking pool fills a queue with
    one slot per connection on the first lookup (10**7: 7.5 s; 2**63-1: never returns)."""
    message = refused(tmp_path, "redis: {max_connections: 9223372036854775807}\n")

    assert "redis.max_connections" in message and str(MAX_REDIS_CONNECTIONS) in message
    config = load_text(tmp_path, f"redis: {{max_connections: {MAX_REDIS_CONNECTIONS}}}\n")
    assert config.redis.max_connections == MAX_REDIS_CONNECTIONS


@pytest.mark.parametrize(("var", "server"), [("KVTIER_SERVER_TOKEN", True), ("KVTIER_REMOTE__TOKEN", False)])
def test_a_token_longer_than_a_hello_frame_carries_is_a_config_error(var, server):
    """Bug: a 5,000-character token loaded; the server started, then answered every client's HELLO
    with BAD_REQUEST ("5000 exceeds max_str_len(4096)"): no client could ever authenticate."""
    assert MAX_TOKEN_BYTES == MAX_TEXT_BYTES  # the protocol's cap on a HELLO's strings

    message = refused(None, None, {var: "t" * 5000}, server=server)

    assert f"{var}:" in message and f"longer than {MAX_TOKEN_BYTES} bytes" in message and "ttt" not in message
    assert load_server_config(env={"KVTIER_SERVER_TOKEN": "é" * (MAX_TOKEN_BYTES // 2)}).token


def test_two_environment_variables_for_one_key_are_a_config_error_not_a_silent_pick():
    """Bug: KVTIER_CPU__CAPACITY and KVTIER_cpu__capacity (environment names are case-sensitive, the
    key part is not) both loaded; the one sorting last won without a word."""
    env = {"KVTIER_CPU__CAPACITY": "1GiB", "KVTIER_cpu__capacity": "2GiB"}

    message = refused(None, None, env)

    assert "KVTIER_cpu__capacity: sets the same key as KVTIER_CPU__CAPACITY" in message


# -- numbers YAML 1.1 reads as something else ------------------------------------------------------


@pytest.mark.parametrize(("text", "env", "server", "key"), [
    ("port: 07000\n", None, True, "kvtier.yaml"),
    (None, {"KVTIER_SERVER_PORT": "07000"}, True, "KVTIER_SERVER_PORT"),
    (None, {"KVTIER_CHUNK_SIZE": "0256"}, False, "KVTIER_CHUNK_SIZE"),
    ("chunk_size: 1:20\n", None, False, "kvtier.yaml"),
    ("redis: {timeout_s: 1:30.5}\n", None, False, "kvtier.yaml"),
    (None, {"KVTIER_DISK__IO_THREADS": "-010"}, False, "KVTIER_DISK__IO_THREADS"),
], ids=["file_octal_port", "env_octal_port", "env_octal_chunk_size", "base_60_int", "base_60_float",
        "negative_octal"])
def test_leading_zero_and_base_60_numbers_are_config_errors_not_silent_octal(tmp_path, text, env, server,
                                                                             key):
    """Bug: YAML 1.1 read `port: 07000` as 3584, KVTIER_CHUNK_SIZE=0256 as 174 and `1:20` as 80,
    and the config loaded without a word."""
    message = refused(tmp_path, text, env, server)

    assert key in message and ("octal" in message or "base 60" in message)


@pytest.mark.parametrize(("text", "expected"), [
    ("chunk_size: 0\n", 0), ("chunk_size: 0x10\n", 16), ("chunk_size: 1_000\n", 1000),
    ("salt: '017'\n", "017"), ("salt: '1:20'\n", "1:20"), ("salt: 0o17\n", "0o17"),
])
def test_plain_numbers_and_quoted_text_still_load(tmp_path, text, expected):
    key = text.partition(":")[0]
    try:
        value = getattr(load_text(tmp_path, text), key)
    except ConfigError as exc:  # chunk_size 0 is refused by its own bound, not as ambiguous
        assert "must be >= 1" in str(exc) and expected == 0
    else:
        assert value == expected


@pytest.mark.parametrize("size", ["１２MiB", "٣GiB", "1𝟎kB"])
def test_sizes_take_only_ascii_digits(tmp_path, size):
    """Bug: `\\d` in the size pattern took fullwidth and Arabic-Indic digits ("１２MiB" loaded as
    12 MiB) where every int key refuses them."""
    message = refused(tmp_path, f"cpu: {{capacity: '{size}'}}\n")

    assert "cpu.capacity: invalid size" in message


# -- odd inputs that already failed closed (kept so they stay closed) ------------------------------


@pytest.mark.parametrize(("data", "chunk_size"), [
    (b"\xef\xbb\xbfchunk_size: 128\n", 128),  # a UTF-8 BOM
    (b"chunk_size: 128\r\ncpu:\r\n  capacity: 1GiB\r\n", 128),  # CRLF
    (b"chunk_size:\t128\n", 128),  # a tab after the colon is just space
    (b"cpu: {<<: {capacity: 1GiB}}\nchunk_size: 64\n", 64),  # a merge key without aliases
    (b"cpu:\n\tcapacity: 1GiB\n", None),  # tab indentation
    (b"chunk_size: 12\x008\n", None),  # a NUL byte
    (b"<<: [1, 2]\n", None),  # a merge of scalars
    (b"salt: =\n", None),  # YAML 1.1's value key
    (b"chunk_size: 1\n---\nchunk_size: 2\n", None),  # two documents
    (b"? [a]\n: 1\n", None),  # a complex key
    (b"salt: " + b"s" * 1_000_000 + b"\n", 256),  # one very long line
    (b"cpu: {capacity: 1e400}\n", None), (b"cpu: {capacity: .inf}\n", None), (b"cpu: {capacity: -0}\n", None),
    (b"redis: {timeout_s: 1e400}\n", None), (b"redis: {retry_after_s: -0.0}\n", 256),
])
def test_odd_config_files_load_or_fail_with_one_config_error(tmp_path, data, chunk_size):
    path = tmp_path / "odd.yaml"
    path.write_bytes(data)
    if chunk_size is None:
        with pytest.raises(ConfigError) as err:
            load_config(path, env={})
        assert str(path) in str(err.value)
    else:
        assert load_config(path, env={}).chunk_size == chunk_size


@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "/proc/self/environ", "dangling", "loop"])
def test_config_paths_to_devices_pipes_proc_and_broken_links_fail_at_once(tmp_path, target):
    link = tmp_path / "kvtier.yaml"
    if target == "fifo":
        os.mkfifo(tmp_path / "fifo")
        target = str(tmp_path / "fifo")
    elif target == "dangling":
        target = str(tmp_path / "nowhere")
    elif target == "loop":
        target = str(link)
    link.symlink_to(target)

    with pytest.raises(ConfigError) as err:
        load_config(link, env={"SECRET": SECRET})  # /proc/self/environ holds the environment

    assert str(link) in str(err.value) and SECRET not in str(err.value)
