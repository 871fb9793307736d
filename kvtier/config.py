"""The typed, nested kvtier configuration: YAML file, then `KVTIER_*` environment overrides.

Where the config comes from, in order (later wins):

1. the embedded defaults (the dataclass defaults below: a CPU tier plus a disk tier);
2. a YAML file: the `path` argument, else the file named by `KVTIER_CONFIG`, else none;
3. environment overrides, one variable per key, nesting spelled with a double underscore::

       KVTIER_CHUNK_SIZE=128            -> chunk_size: 128
       KVTIER_CPU__CAPACITY=8GiB        -> cpu: {capacity: 8GiB}
       KVTIER_DISK__IO_THREADS=2        -> disk: {io_threads: 2}
       KVTIER_DISK=null                 -> disk: null   (no disk tier)

   The key part after `KVTIER_` is case-insensitive (two variables naming one key, such as
   `KVTIER_CHUNK_SIZE` and `KVTIER_chunk_size`, are an error). A string-typed key takes the raw
   text, never parsed (`KVTIER_SALT=123` is the salt "123", `KVTIER_REMOTE__TOKEN='s3cret #1'` the
   whole token); only an optional string reads the exact text `null` as None. Every other value (numbers,
   booleans, sizes, whole sections) is read as YAML ("128" is an int, "true" a bool, "null" None).
   All are then validated exactly like a file value. Whole-section overrides apply before field
   overrides, and a field override on a disabled (null) section re-enables it from that section's
   defaults. `KVTIER_CONFIG` itself is not an override.

Validation is strict, fails closed and is generic: it walks the dataclass fields, their type hints
and their metadata (`size`, `memory`, `min`, `max`, `max_bytes`, `choices`, `path`, `url`, `host`,
`secret`, `empty`), so a new section (redis, remote, ...) is just a new dataclass. A string is never
empty unless its field says so (an empty host would bind every interface, an empty token would be a
secret anyone knows); floats are finite; ints fit in 64 bits. YAML is read by `kvtier.config_yaml`
(bounded size and nesting, no aliases). After the overrides, what depends on the machine is checked
once: a `path` must be a directory or not exist yet, a `memory` size must fit in physical memory.
Any problem raises one `ConfigError` naming the dotted key and where it came from (the file, or
the environment variable), and never showing the value of a `secret` key (tokens, the salt) or the
credentials or query of a URL, wherever the URL was written. YAML 1.1's surprises are refused
rather than read: `07000` (octal), `1:20` (base 60). Loading is side-effect free apart from reading
the file and stat-ing the paths; nothing is created on disk here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from kvtier.config_values import (
    MAX_SIZE,
    GiB,
    check_directory,
    check_host,
    check_memory,
    check_text,
    check_url,
    hide_url_secrets,
    parse_size,
    show,
    show_key,
)
from kvtier.config_yaml import parse_yaml, read_config_file
from kvtier.errors import ConfigError

_log = logging.getLogger(__name__)

ENV_PREFIX = "KVTIER_"
ENV_CONFIG = "KVTIER_CONFIG"
SERVER_ENV_PREFIX = "KVTIER_SERVER_"
SERVER_ENV_CONFIG = "KVTIER_SERVER_CONFIG"
DEFAULT_SOURCE = "<defaults>"
MAX_SECONDS = 365 * 86400  # a timeout, TTL or interval; a year is already "never"
MAX_REDIS_CONNECTIONS = 10_000  # Redis's own default maxclients; redis-py fills its pool up front
# A token travels in the HELLO frame, whose strings kvtier.server.protocol caps at MAX_TEXT_BYTES:
# a longer token let the server start and then refuse every client.
MAX_TOKEN_BYTES = 4096

_SWITCH = ("auto", "on", "off")


def _size(default: int, *, memory: bool = False) -> Any:
    """A byte count; `memory`: held in host RAM, so it must fit in physical memory."""
    return field(default=default, metadata={"size": True, "memory": memory})


def _choice(default: str, choices: tuple[str, ...]) -> Any:
    return field(default=default, metadata={"choices": choices})


def _at_least(default: int, minimum: int) -> Any:
    return field(default=default, metadata={"min": minimum})


def _seconds(default: float, minimum: float) -> Any:
    return field(default=default, metadata={"min": minimum, "max": MAX_SECONDS})


def _url(default: str, schemes: tuple[str, ...]) -> Any:
    return field(default=default, metadata={"url": schemes})


def _secret() -> Any:
    """An optional shared secret: absent or null = none, else non-empty; never shown or repr'd."""
    return field(default=None, repr=False, metadata={"secret": True, "max_bytes": MAX_TOKEN_BYTES})


def _repr_redacting_urls(config: Any) -> str:
    """The dataclass repr, with URL credentials (`redis://:password@host`) and queries hidden in
    every text field (a URL, or one written into `key_prefix` by mistake)."""
    shown = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.repr:
            shown.append(f"{f.name}={hide_url_secrets(value) if isinstance(value, str) else value!r}")
    return f"{type(config).__name__}({', '.join(shown)})"


def _default_disk_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    return os.path.abspath(os.path.expanduser(os.path.join(base, "kvtier")))


@dataclass(frozen=True, slots=True)
class CpuConfig:
    capacity: int = _size(2 * GiB, memory=True)
    pin_memory: str = _choice("auto", _SWITCH)


@dataclass(frozen=True, slots=True)
class DiskConfig:
    path: str = field(default_factory=_default_disk_path, metadata={"path": True})
    capacity: int = _size(16 * GiB)
    o_direct: str = _choice("auto", _SWITCH)
    io_threads: int = _at_least(4, 1)
    fsync: bool = False


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """A Redis (or Redis Cluster) tier: one key per chunk holding its whole record."""

    url: str = _url("redis://127.0.0.1:6379/0", ("redis", "rediss", "unix"))  # cluster: any node
    cluster: bool = False
    ttl_s: int | None = field(default=None, metadata={"min": 1, "max": MAX_SECONDS})  # None = never
    timeout_s: float = _seconds(1.0, 0.001)  # connect and read timeout per round trip
    # redis-py's blocking pool puts one slot per connection in a queue when built (on the first
    # lookup): 10**7 took 7.5 s there, 2**63-1 never returned.
    max_connections: int = field(default=16, metadata={"min": 1, "max": MAX_REDIS_CONNECTIONS})
    batch_size: int = _at_least(32, 1)  # chunks per pipelined round trip
    retry_after_s: float = _seconds(1.0, 0.0)  # first back-off after a failure; doubles up to retry_max_s
    retry_max_s: float = _seconds(30.0, 0.0)
    key_prefix: str = field(default="kvtier:", metadata={"empty": True})

    def __repr__(self) -> str:
        return _repr_redacting_urls(self)


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    """A `kvtier_server` tier."""

    url: str = _url("kvtier://127.0.0.1:7000", ("kvtier",))
    token: str | None = _secret()  # the server's shared secret, when it has one
    timeout_s: float = _seconds(5.0, 0.001)
    connections: int = _at_least(4, 1)
    retry_after_s: float = _seconds(1.0, 0.0)
    retry_max_s: float = _seconds(30.0, 0.0)


@dataclass(frozen=True, slots=True)
class KvtierConfig:
    chunk_size: int = _at_least(256, 1)
    save_partial_chunks: bool = False
    # "" = no salt. A tenant's salt keeps its KV apart from others': treated as a secret.
    salt: str = field(default="", repr=False, metadata={"empty": True, "secret": True})
    write_through: bool = True  # store to lower tiers in the background as soon as stored in CPU
    promote_on_hit: bool = True  # a lower-tier hit is copied into the CPU tier
    cpu: CpuConfig = field(default_factory=CpuConfig)
    disk: DiskConfig | None = field(default_factory=DiskConfig)  # None: no disk tier
    redis: RedisConfig | None = None  # None: no Redis tier
    remote: RemoteConfig | None = None  # None: no kvtier_server tier
    # Where the config came from, for messages; not a config key.
    source: str = field(default=DEFAULT_SOURCE, metadata={"internal": True})


@dataclass(frozen=True, slots=True)
class SpillConfig:
    """Where `kvtier_server` spills what it evicts from memory (a disk tier directory)."""

    path: str = field(default_factory=_default_disk_path, metadata={"path": True})
    capacity: int = _size(16 * GiB)
    o_direct: str = _choice("auto", _SWITCH)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """`kvtier_server`: `load_server_config`, env overrides `KVTIER_SERVER_<KEY>`."""

    host: str = field(default="127.0.0.1", metadata={"host": True})
    port: int = field(default=7000, metadata={"min": 0, "max": 65535})  # 0: any free port (logged)
    capacity: int = _size(4 * GiB, memory=True)  # bytes of records held in memory; LRU beyond
    token: str | None = _secret()  # shared secret every client must present; None = no auth
    max_frame_bytes: int = _size(1 * GiB)  # largest frame accepted (header + payloads)
    max_connections: int = _at_least(256, 1)  # authenticated connections; more get BUSY at HELLO
    max_handshakes: int = _at_least(64, 1)  # connections before their HELLO; the oldest make room
    handshake_timeout_s: float = _seconds(5.0, 0.001)  # from accept to a HELLO answered OK
    idle_timeout_s: float = _seconds(300.0, 0.001)  # an authenticated connection silent this long closes
    receive_bytes: int = _size(2 * GiB)  # payload bytes being received, all connections together
    reply_bytes: int = _size(1 * GiB)  # reply bytes queued to send, all connections together
    send_timeout_s: float = _seconds(30.0, 0.001)  # replies queued, none sent this long: closed
    spill: SpillConfig | None = None  # None: evicted records are dropped
    stats_interval_s: float = _seconds(60.0, 0.0)  # one traffic log line per interval; 0 = never
    source: str = field(default=DEFAULT_SOURCE, metadata={"internal": True})


def load_config(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> KvtierConfig:
    """Defaults, then the YAML file (`path`, else `$KVTIER_CONFIG`), then `KVTIER_*` overrides."""
    return _load(KvtierConfig, path, env, ENV_PREFIX, ENV_CONFIG)


def load_server_config(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> ServerConfig:
    """`kvtier_server`'s config: defaults, the YAML file (`path`, else `$KVTIER_SERVER_CONFIG`), then
    `KVTIER_SERVER_*` overrides (`KVTIER_SERVER_PORT=7001`, `KVTIER_SERVER_SPILL__PATH=/nvme`)."""
    return _load(ServerConfig, path, env, SERVER_ENV_PREFIX, SERVER_ENV_CONFIG)


def override(config: Any, origin: str, values: Mapping[str, object]) -> Any:
    """`config` with top-level `values` set (None values skipped), validated like a file's: for
    command-line flags, e.g. `override(config, "command line", {"host": args.host})`."""
    origins: dict[str, str] = {}
    updates = {}
    for key, value in values.items():
        if value is not None:
            f = _field(type(config), key, "", origin)
            updates[f.name] = _coerce(_hints(type(config))[f.name], f, value, f.name, origin, origins)
    config = dataclasses.replace(config, **updates)
    _check_machine(config, "", origins)
    return config


def _load(root: type, path: str | os.PathLike[str] | None, env: Mapping[str, str] | None, prefix: str,
          config_var: str) -> Any:
    env = os.environ if env is None else env
    if path is None:
        path = env.get(config_var) or None
    origins: dict[str, str] = {}  # dotted key -> where its value came from, for the machine checks
    if path is None:
        config = root()
    else:
        source = os.fspath(path)
        data = read_config_file(source)
        if data is None:  # an empty file means "all defaults"
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: top level must be a mapping of keys, got {type(data).__name__}")
        config = _build(root, data, "", source, origins)
        config = dataclasses.replace(config, source=source)
    config = _apply_env(config, env, prefix, config_var, origins)
    _check_machine(config, "", origins)
    return config


def _apply_env(config: Any, env: Mapping[str, str], prefix: str, config_var: str,
               origins: dict[str, str]) -> Any:
    # The server's variables share kvtier's prefix: each loader skips the other's.
    foreign = SERVER_ENV_PREFIX if prefix == ENV_PREFIX else None
    overrides = []
    seen: dict[str, str] = {}  # lower-cased key -> the variable that set it
    for name, text in env.items():
        if name.startswith(prefix) and name != config_var and not (foreign and name.startswith(foreign)):
            parts = name[len(prefix) :].lower().split("__")
            other = seen.setdefault("__".join(parts), name)
            if other != name:  # KVTIER_CHUNK_SIZE and KVTIER_chunk_size: which one was meant?
                first, second = sorted([other, name])
                raise ConfigError(f"environment {second}: sets the same key as {first}; keep one of them")
            overrides.append((parts, name, text))
    # Shallow keys first, so `KVTIER_DISK=null` plus `KVTIER_DISK__PATH=x` means "disk at x" whatever
    # the environment's iteration order, rather than depending on which variable came last.
    overrides.sort(key=lambda item: (len(item[0]), item[1]))
    for parts, name, text in overrides:
        config = _set_path(config, parts, text, "", f"environment {name}", origins)
        _log.debug("config: %s overrides %s", name, ".".join(parts))
    return config


def _set_path(obj: Any, parts: list[str], text: str, prefix: str, origin: str,
              origins: dict[str, str]) -> Any:
    """`obj` with the field at `parts` set from env `text`; sections are rebuilt, not mutated."""
    cls = type(obj)
    f = _field(cls, parts[0], prefix, origin)
    dotted = prefix + f.name
    hint = _hints(cls)[f.name]
    if len(parts) > 1:
        section = _section_type(hint)
        if section is None:
            raise ConfigError(f"{origin}: {dotted}: is a value, not a section; cannot set {parts[1]!r}")
        current = getattr(obj, f.name)
        if current is None:  # overriding a field of a disabled section re-enables it from defaults
            current = section()
            _record(origins, dotted, origin)
        new = _set_path(current, parts[1:], text, dotted + ".", origin, origins)
    elif _strip_optional(hint) is str:
        # The environment has no quoting habit, so a string key takes the raw text, never YAML:
        # through YAML, 's3cret #x' was the token 's3cret' and '123' not a string at all.
        optional = _strip_optional(hint) is not hint
        new = _coerce(hint, f, None if optional and text == "null" else text, dotted, origin, origins)
    else:
        new = _coerce(hint, f, parse_yaml(text, f"{origin}: {dotted}"), dotted, origin, origins)
    return dataclasses.replace(obj, **{f.name: new})


def _build(cls: type, data: Mapping[Any, Any], prefix: str, origin: str, origins: dict[str, str]) -> Any:
    """An instance of section `cls` from a mapping; keys left out keep the section's defaults."""
    values = {}
    for key, value in data.items():
        f = _field(cls, key, prefix, origin)
        values[f.name] = _coerce(_hints(cls)[f.name], f, value, prefix + f.name, origin, origins)
    return cls(**values)


def _coerce(hint: Any, f: dataclasses.Field[Any], value: object, dotted: str, origin: str,
            origins: dict[str, str]) -> Any:
    where = f"{origin}: {dotted}"
    _record(origins, dotted, origin)
    optional = _strip_optional(hint) is not hint
    section = _section_type(hint)
    if value is None:
        if optional:
            return None
        what = "section" if section else "key"
        raise ConfigError(f"{where}: this {what} cannot be null")
    if section is not None:
        if not isinstance(value, Mapping):
            # A scalar in place of a section that holds a secret may be that secret, its key
            # mistyped (`remote:` then `token s3cret` on the next line): type only.
            secret = any(g.metadata.get("secret") for g in dataclasses.fields(section))
            got = type(value).__name__ if secret else show(value)
            raise ConfigError(f"{where}: expected a mapping of keys, got {got}")
        return _build(section, value, dotted + ".", origin, origins)
    meta = f.metadata
    if meta.get("size"):
        return parse_size(value, where)
    choices = meta.get("choices")
    if choices and "on" in choices and isinstance(value, bool):
        # YAML 1.1 reads bare on/off as booleans; `pin_memory: off` should still mean "off".
        value = "on" if value else "off"
    value = _check_type(_strip_optional(hint), value, where, meta.get("secret", False))
    if isinstance(value, str):
        check_text(value, meta, where)
        if "max_bytes" in meta and len(value.encode()) > meta["max_bytes"]:
            raise ConfigError(f"{where}: longer than {meta['max_bytes']} bytes (UTF-8)")
    if choices and value not in choices:
        raise ConfigError(f"{where}: expected one of {', '.join(choices)}; got {show(value)}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{where}: must be >= {meta['min']}, got {value}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{where}: must be <= {meta['max']}, got {value}")
    if "url" in meta:
        check_url(value, meta["url"], where)
    if meta.get("host"):
        check_host(value, where)
    if meta.get("path"):
        if "://" in value:  # abspath would make "s3://key:secret@bucket" a local folder name
            raise ConfigError(f"{where}: expected a local directory, got a URL {show(value)}")
        value = os.path.abspath(os.path.expanduser(value))
    return value


def _check_type(expected: type, value: object, where: str, secret: bool) -> Any:
    # bool is a subclass of int in Python, but `chunk_size: true` is a mistake, not 1.
    ok = isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        got = type(value).__name__ if secret else show(value)
        raise ConfigError(f"{where}: expected {expected.__name__}, got {got}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value}")
    if expected is int and not -MAX_SIZE - 1 <= value <= MAX_SIZE:  # type: ignore[operator]
        raise ConfigError(f"{where}: must fit in 64 bits (at most {MAX_SIZE})")
    return value


def _check_machine(config: Any, prefix: str, origins: dict[str, str]) -> None:
    """What depends on this machine, checked once on the final config: paths and memory sizes."""
    for f in _public_fields(type(config)).values():
        value = getattr(config, f.name)
        dotted = prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_machine(value, dotted + ".", origins)
        elif f.metadata.get("path"):
            check_directory(value, f"{_origin(origins, dotted)}: {dotted}")
        elif f.metadata.get("memory"):
            check_memory(value, f"{_origin(origins, dotted)}: {dotted}")


def _record(origins: dict[str, str], dotted: str, origin: str) -> None:
    """`dotted` now comes from `origin`; what its sub-keys came from before no longer counts."""
    for key in [k for k in origins if k.startswith(dotted + ".")]:
        del origins[key]
    origins[dotted] = origin


def _origin(origins: dict[str, str], dotted: str) -> str:
    """Where `dotted` (or the nearest section above it) was set; the defaults if nowhere."""
    while dotted:
        if dotted in origins:
            return origins[dotted]
        dotted = dotted.rpartition(".")[0]
    return DEFAULT_SOURCE


def _field(cls: type, key: object, prefix: str, origin: str) -> dataclasses.Field[Any]:
    fields = _public_fields(cls)
    if not isinstance(key, str) or key not in fields:
        known = ", ".join(fields)
        raise ConfigError(f"{origin}: {prefix}{show_key(key)}: unknown key (known: {known})")
    return fields[key]


@cache
def _public_fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(hint: Any) -> Any:
    """`X` for `X | None` (or `Optional[X]`); `hint` unchanged otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _section_type(hint: Any) -> type | None:
    inner = _strip_optional(hint)
    return inner if isinstance(inner, type) and dataclasses.is_dataclass(inner) else None
