"""The typed, nested kvtier configuration: YAML file, then `KVTIER_*` environment overrides.

Where the config comes from, in order (later wins):

1. the embedded defaults (the dataclass defaults below: a CPU tier plus a disk tier);
2. a YAML file: the `path` argument, else the file named by `KVTIER_CONFIG`, else none;
3. environment overrides, one variable per key, nesting spelled with a double underscore::

       KVTIER_CHUNK_SIZE=128            -> chunk_size: 128
       KVTIER_CPU__CAPACITY=8GiB        -> cpu: {capacity: 8GiB}
       KVTIER_DISK__IO_THREADS=2        -> disk: {io_threads: 2}
       KVTIER_DISK=null                 -> disk: null   (no disk tier)

   The key part after `KVTIER_` is case-insensitive. Each value is read with `yaml.safe_load` ("128"
   is an int, "true" a bool, "null" None) and validated exactly like a file value, except that a
   string-typed key takes the raw text (so `KVTIER_SALT=123` is the salt "123"). Whole-section
   overrides apply before field overrides, and a field override on a disabled (null) section
   re-enables it from that section's defaults. `KVTIER_CONFIG` itself is not an override.

Validation is strict and generic: it walks the dataclass fields, their type hints and their metadata
(`size`, `min`, `choices`, `path`), so a new section (redis, remote, ...) is just a new dataclass. An
unknown key, a wrong type or a value out of range raises one `ConfigError` naming the dotted key and
where it came from (the file, or the environment variable). Loading is side-effect free apart from
reading the file; nothing is created on disk here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Any

import yaml

from kvtier.errors import ConfigError

_log = logging.getLogger(__name__)

GiB = 1 << 30
ENV_PREFIX = "KVTIER_"
ENV_CONFIG = "KVTIER_CONFIG"
SERVER_ENV_PREFIX = "KVTIER_SERVER_"
SERVER_ENV_CONFIG = "KVTIER_SERVER_CONFIG"
DEFAULT_SOURCE = "<defaults>"

_SWITCH = ("auto", "on", "off")
_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE_RE = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*([A-Za-z]*)\s*")


def _size(default: int) -> Any:
    return field(default=default, metadata={"size": True})


def _choice(default: str, choices: tuple[str, ...]) -> Any:
    return field(default=default, metadata={"choices": choices})


def _at_least(default: int, minimum: int) -> Any:
    return field(default=default, metadata={"min": minimum})


def _default_disk_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    return os.path.abspath(os.path.expanduser(os.path.join(base, "kvtier")))


@dataclass(frozen=True, slots=True)
class CpuConfig:
    capacity: int = _size(2 * GiB)
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

    url: str = "redis://127.0.0.1:6379/0"  # redis:// or rediss://; for a cluster, any node
    cluster: bool = False
    ttl_s: int | None = field(default=None, metadata={"min": 1})  # expiry per chunk; None = never
    timeout_s: float = _at_least(1.0, 0.001)  # connect and read timeout per round trip
    max_connections: int = _at_least(16, 1)
    batch_size: int = _at_least(32, 1)  # chunks per pipelined round trip
    retry_after_s: float = _at_least(1.0, 0.0)  # first back-off after a failure; doubles up to retry_max_s
    retry_max_s: float = _at_least(30.0, 0.0)
    key_prefix: str = "kvtier:"


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    """A `kvtier_server` tier."""

    url: str = "kvtier://127.0.0.1:7000"
    token: str | None = None  # the server's shared secret, when it has one
    timeout_s: float = _at_least(5.0, 0.001)
    connections: int = _at_least(4, 1)
    retry_after_s: float = _at_least(1.0, 0.0)
    retry_max_s: float = _at_least(30.0, 0.0)


@dataclass(frozen=True, slots=True)
class KvtierConfig:
    chunk_size: int = _at_least(256, 1)
    save_partial_chunks: bool = False
    salt: str = ""
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

    host: str = "127.0.0.1"
    port: int = field(default=7000, metadata={"min": 0})  # 0: any free port (logged at start)
    capacity: int = _size(4 * GiB)  # bytes of records held in memory; LRU beyond
    token: str | None = None  # shared secret every client must present; None = no auth
    max_frame_bytes: int = _size(1 * GiB)  # largest frame accepted (header + payloads)
    max_connections: int = _at_least(256, 1)
    spill: SpillConfig | None = None  # None: evicted records are dropped
    stats_interval_s: float = _at_least(60.0, 0.0)  # one traffic log line per interval; 0 = never
    source: str = field(default=DEFAULT_SOURCE, metadata={"internal": True})


def parse_size(value: object, where: str) -> int:
    """A byte count from an int or a string such as "512MiB", "1.5GB", "800kB", "1024"; must be > 0."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        size = _parse_size_text(value, where)
    else:
        raise ConfigError(f"{where}: expected a size (bytes or a string like '4GiB'), got {_show(value)}")
    if size <= 0:
        raise ConfigError(f"{where}: size must be positive, got {value}")
    return size


def _parse_size_text(text: str, where: str) -> int:
    match = _SIZE_RE.fullmatch(text)
    unit = _UNITS.get(match.group(2).lower() or "b") if match else None
    if match is None or unit is None:
        units = ", ".join(["B", "kB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"])
        raise ConfigError(f"{where}: invalid size {text!r} (a number with an optional unit: {units})")
    try:
        # Decimal, not float: "1.1GB" must be exactly 1_100_000_000 bytes.
        exact = Decimal(match.group(1)) * unit
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only valid numbers
        raise ConfigError(f"{where}: invalid size {text!r}") from exc
    if exact != exact.to_integral_value():
        raise ConfigError(f"{where}: size {text!r} is not a whole number of bytes")
    return int(exact)


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


def _load(root: type, path: str | os.PathLike[str] | None, env: Mapping[str, str] | None, prefix: str,
          config_var: str) -> Any:
    env = os.environ if env is None else env
    if path is None:
        path = env.get(config_var) or None
    if path is None:
        config = root()
    else:
        source = os.fspath(path)
        data = _read_yaml(source)
        config = _build(root, data, "", source)
        config = dataclasses.replace(config, source=source)
    return _apply_env(config, env, prefix, config_var)


def _read_yaml(source: str) -> Mapping[str, Any]:
    try:
        with open(source, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config file: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}:{line}: invalid YAML: {problem}") from exc
    if data is None:  # an empty file means "all defaults"
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _apply_env(config: Any, env: Mapping[str, str], prefix: str, config_var: str) -> Any:
    # The server's variables share kvtier's prefix: each loader skips the other's.
    foreign = SERVER_ENV_PREFIX if prefix == ENV_PREFIX else None
    overrides = []
    for name, text in env.items():
        if name.startswith(prefix) and name != config_var and not (foreign and name.startswith(foreign)):
            parts = name[len(prefix) :].lower().split("__")
            overrides.append((parts, name, text))
    # Shallow keys first, so `KVTIER_DISK=null` plus `KVTIER_DISK__PATH=x` means "disk at x" whatever
    # the environment's iteration order, rather than depending on which variable came last.
    overrides.sort(key=lambda item: (len(item[0]), item[1]))
    for parts, name, text in overrides:
        origin = f"environment {name}"
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{origin}: {'.'.join(parts)}: value {text!r} is not valid YAML") from exc
        config = _set_path(config, parts, value, text, "", origin)
        _log.debug("config: %s overrides %s", name, ".".join(parts))
    return config


def _set_path(obj: Any, parts: list[str], value: object, text: str, prefix: str, origin: str) -> Any:
    """`obj` with the field at `parts` set to the validated `value`; sections are rebuilt, not mutated."""
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
        new = _set_path(current, parts[1:], value, text, dotted + ".", origin)
    else:
        # The environment has no quoting habit, so a string key takes the raw text ("123" salt, and
        # "" an empty salt); only an optional string reads "null" as None.
        if _strip_optional(hint) is str and not isinstance(value, str) and (value is not None or hint is str):
            value = text
        new = _coerce(hint, f, value, dotted, origin)
    return dataclasses.replace(obj, **{f.name: new})


def _build(cls: type, data: Mapping[str, Any], prefix: str, origin: str) -> Any:
    """An instance of section `cls` from a mapping; keys left out keep the section's defaults."""
    values = {}
    for key, value in data.items():
        f = _field(cls, key, prefix, origin)
        values[f.name] = _coerce(_hints(cls)[f.name], f, value, prefix + f.name, origin)
    return cls(**values)


def _coerce(hint: Any, f: dataclasses.Field[Any], value: object, dotted: str, origin: str) -> Any:
    where = f"{origin}: {dotted}"
    optional = _strip_optional(hint) is not hint
    section = _section_type(hint)
    if value is None:
        if optional:
            return None
        what = "section" if section else "key"
        raise ConfigError(f"{where}: this {what} cannot be null")
    if section is not None:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of keys, got {_show(value)}")
        return _build(section, value, dotted + ".", origin)
    meta = f.metadata
    if meta.get("size"):
        return parse_size(value, where)
    choices = meta.get("choices")
    if choices and "on" in choices and isinstance(value, bool):
        # YAML 1.1 reads bare on/off as booleans; `pin_memory: off` should still mean "off".
        value = "on" if value else "off"
    value = _check_type(_strip_optional(hint), value, where)
    if choices and value not in choices:
        raise ConfigError(f"{where}: expected one of {', '.join(choices)}; got {value!r}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{where}: must be >= {meta['min']}, got {value}")
    if meta.get("path"):
        value = os.path.abspath(os.path.expanduser(value))
    return value


def _check_type(expected: type, value: object, where: str) -> Any:
    # bool is a subclass of int in Python, but `chunk_size: true` is a mistake, not 1.
    ok = isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ConfigError(f"{where}: expected {expected.__name__}, got {_show(value)}")
    return value


def _field(cls: type, key: object, prefix: str, origin: str) -> dataclasses.Field[Any]:
    fields = _public_fields(cls)
    if key not in fields:
        known = ", ".join(fields)
        raise ConfigError(f"{origin}: {prefix}{key}: unknown key (known: {known})")
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


def _show(value: object) -> str:
    return f"{type(value).__name__} {value!r}"
