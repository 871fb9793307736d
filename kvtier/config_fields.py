"""How `kvtier.config` declares a key: a dataclass `field` whose metadata `kvtier.config_load` checks
(`size`, `memory`, `choices` (a tuple, or a registry's map), `min`, `max`, `url`, `secret`, `max_bytes`),
the bounds every section shares, and the repr that hides URL secrets. Pure: nothing here reads a file
or the environment at import (the default disk path reads it when a DiskConfig is built).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import field
from typing import Any

from kvtier import policy_registry
from kvtier.config_values import hide_url_secrets

MAX_SECONDS = 365 * 86400  # a timeout, TTL or interval; a year is already "never"
# A token travels in the HELLO frame, whose strings kvtier.wire.frames caps at MAX_TEXT_BYTES:
# a longer token let the server start and then refuse every client.
MAX_TOKEN_BYTES = 4096

SWITCH = ("auto", "on", "off")


def size_key(default: int, *, memory: bool = False) -> Any:
    """A byte count; `memory`: held in host RAM, so it must fit in physical memory."""
    return field(default=default, metadata={"size": True, "memory": memory})


def choice_key(default: str, choices: tuple[str, ...]) -> Any:
    return field(default=default, metadata={"choices": choices})


def policy_key(default: str | None = None) -> Any:
    """An eviction policy by name: checked against `kvtier.policy_registry.POLICIES` (the map itself,
    so a policy registered after import counts) when the config loads; the default is `default`, or
    the registry's DEFAULT_POLICY read when the section is built."""
    return field(default_factory=lambda: default or policy_registry.DEFAULT_POLICY,
                 metadata={"choices": policy_registry.POLICIES})


def at_least(default: int, minimum: int) -> Any:
    return field(default=default, metadata={"min": minimum})


def seconds_key(default: float, minimum: float) -> Any:
    return field(default=default, metadata={"min": minimum, "max": MAX_SECONDS})


def url_key(default: str, schemes: tuple[str, ...]) -> Any:
    return field(default=default, metadata={"url": schemes})


def secret_key() -> Any:
    """An optional shared secret: absent or null = none, else non-empty; never shown or repr'd."""
    return field(default=None, repr=False, metadata={"secret": True, "max_bytes": MAX_TOKEN_BYTES})


def repr_redacting_urls(config: Any) -> str:
    """The dataclass repr, with URL credentials (`redis://:password@host`) and queries hidden in
    every text field (a URL, or one written into `key_prefix` by mistake)."""
    shown = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.repr:
            shown.append(f"{f.name}={hide_url_secrets(value) if isinstance(value, str) else value!r}")
    return f"{type(config).__name__}({', '.join(shown)})"


def default_disk_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    return os.path.abspath(os.path.expanduser(os.path.join(base, "kvtier")))
