"""Building a config dataclass tree from YAML, `KVTIER_*` environment variables and overrides.

`kvtier.config` declares what the configuration is (one frozen dataclass per section); this module
knows nothing about any section. It walks a root dataclass's fields, their type hints and their
metadata (`size`, `memory`, `min`, `max`, `max_bytes`, `max_items`, `choices`, `path`, `url`, `host`,
`secret`, `empty`, `internal`), so a new section (redis, remote, ...) is just a new dataclass; a
`tuple[X, ...]` field is a bounded YAML list of X (`max_items`, each item checked like a scalar):

    load(root, path, env, ...)   defaults -> the YAML file -> environment overrides -> machine checks
    override(config, origin, {key: value})   top-level values set and checked like a file's

Validation is strict and fails closed. A string is never empty unless its field says so (an empty
host would bind every interface, an empty token would be a secret anyone knows); floats are finite;
ints fit in 64 bits; `bool` is never taken for an int. What depends on the machine is checked once,
on the final config: a `path` must be a directory or not exist yet, a `memory` size must fit in
physical memory. Every problem raises one `ConfigError` naming the dotted key and where its value
came from (the file, the environment variable, or `<defaults>`), never the value of a `secret` key.
Side-effect free apart from reading the file and stat-ing the paths; nothing is created on disk.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any

from kvtier.config_values import (
    MAX_SIZE,
    check_directory,
    check_host,
    check_items,
    check_memory,
    check_text,
    check_url,
    parse_size,
    show,
    show_key,
)
from kvtier.config_yaml import parse_yaml, read_config_file
from kvtier.errors import ConfigError

_log = logging.getLogger(__name__)

DEFAULT_SOURCE = "<defaults>"

Origins = dict[str, str]  # dotted key -> where its value came from, for the machine checks' messages


def load(root: type, path: str | os.PathLike[str] | None, env: Mapping[str, str] | None, *, prefix: str,
         config_var: str, foreign: str | tuple[str, ...] | None = None) -> Any:
    """A `root` built from its defaults, the YAML file (`path`, else `env[config_var]`, else none),
    then the `prefix*` variables of `env` (default `os.environ`) except `config_var` and those
    starting with `foreign` (another loader's variables sharing this prefix)."""
    env = os.environ if env is None else env
    if path is None:
        path = env.get(config_var) or None
    origins: Origins = {}
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
    overrides = _env_overrides(env, prefix, config_var, foreign)
    for parts, name, text in overrides:
        config = _set_path(config, parts, text, "", f"environment {name}", origins)
        _log.debug("config: %s overrides %s", name, ".".join(parts))
    _check_machine(config, "", origins)
    return config


def override(config: Any, origin: str, values: Mapping[str, object]) -> Any:
    """`config` with top-level `values` set (None values skipped), validated like a file's: for
    command-line flags, e.g. `override(config, "command line", {"host": args.host})`."""
    origins: Origins = {}
    updates = {}
    for key, value in values.items():
        if value is not None:
            f = _field(type(config), key, "", origin)
            updates[f.name] = _coerce(_hints(type(config))[f.name], f, value, f.name, origin, origins)
    config = dataclasses.replace(config, **updates)
    _check_machine(config, "", origins)
    return config


def _env_overrides(env: Mapping[str, str], prefix: str, config_var: str,
                   foreign: str | tuple[str, ...] | None) -> list[tuple[list[str], str, str]]:
    """(lower-cased key path, variable name, text) of each override, in the order to apply them."""
    overrides = []
    seen: dict[str, str] = {}  # lower-cased key -> the variable that set it
    for name, text in env.items():
        if name.startswith(prefix) and name != config_var and not _is_foreign(name, foreign or ()):
            parts = name[len(prefix) :].lower().split("__")
            other = seen.setdefault("__".join(parts), name)
            if other != name:  # KVTIER_CHUNK_SIZE and KVTIER_chunk_size: which one was meant?
                first, second = sorted([other, name])
                raise ConfigError(f"environment {second}: sets the same key as {first}; keep one of them")
            overrides.append((parts, name, text))
    # Shallow keys first, so `KVTIER_DISK=null` plus `KVTIER_DISK__PATH=x` means "disk at x" whatever
    # the environment's iteration order, rather than depending on which variable came last.
    overrides.sort(key=lambda item: (len(item[0]), item[1]))
    return overrides


def _is_foreign(name: str, foreign: str | tuple[str, ...]) -> bool:
    """Whether `name` is another loader's variable: it starts with one of the `foreign` prefixes and
    goes on with a key, not with "_" (KVTIER_CONTROLLER_TOKEN is kvtier_controller's token, while
    KVTIER_CONTROLLER__URL is the url of an instance's `controller:` section)."""
    prefixes = (foreign,) if isinstance(foreign, str) else foreign
    return any(name.startswith(p) and not name[len(p):].startswith("_") for p in prefixes)


def _set_path(obj: Any, parts: list[str], text: str, prefix: str, origin: str, origins: Origins) -> Any:
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


def _build(cls: type, data: Mapping[Any, Any], prefix: str, origin: str, origins: Origins) -> Any:
    """An instance of section `cls` from a mapping; keys left out keep the section's defaults."""
    values = {}
    for key, value in data.items():
        f = _field(cls, key, prefix, origin)
        values[f.name] = _coerce(_hints(cls)[f.name], f, value, prefix + f.name, origin, origins)
    return cls(**values)


def _coerce(hint: Any, f: dataclasses.Field[Any], value: object, dotted: str, origin: str,
            origins: Origins) -> Any:
    """`value` for field `f` (type `hint`) checked against the field's type and metadata."""
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
    inner = _strip_optional(hint)
    if typing.get_origin(inner) is tuple:  # a bounded list of scalars, `tuple[int, ...]`
        return _coerce_items(typing.get_args(inner)[0], value, meta, where)
    if meta.get("size"):
        return parse_size(value, where)
    if "on" in meta.get("choices", ()) and isinstance(value, bool):
        # YAML 1.1 reads bare on/off as booleans; `pin_memory: off` should still mean "off".
        value = "on" if value else "off"
    value = _check_type(_strip_optional(hint), value, where, meta.get("secret", False))
    return _check_scalar(value, meta, where)


def _coerce_items(item_type: type, value: object, meta: Mapping[str, Any], where: str) -> tuple[Any, ...]:
    """A YAML list as a tuple (configs are frozen); every item checked like a scalar of `item_type`
    against the field's metadata (`min`/`max` bound each item, `max_items` the length)."""
    items = check_items(value, meta, where)
    return tuple(_check_scalar(_check_type(item_type, item, f"{where}[{i}]", False), meta, f"{where}[{i}]")
                 for i, item in enumerate(items))


def _check_scalar(value: Any, meta: Mapping[str, Any], where: str) -> Any:
    """A value of the right type checked against its field's metadata (a path made absolute)."""
    if isinstance(value, str):
        check_text(value, meta, where)
        if "max_bytes" in meta and len(value.encode()) > meta["max_bytes"]:
            raise ConfigError(f"{where}: longer than {meta['max_bytes']} bytes (UTF-8)")
    choices = meta.get("choices")
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


def _check_machine(config: Any, prefix: str, origins: Origins) -> None:
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


def _record(origins: Origins, dotted: str, origin: str) -> None:
    """`dotted` now comes from `origin`; what its sub-keys came from before no longer counts."""
    for key in [k for k in origins if k.startswith(dotted + ".")]:
        del origins[key]
    origins[dotted] = origin


def _origin(origins: Origins, dotted: str) -> str:
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
