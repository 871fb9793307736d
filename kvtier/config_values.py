"""What a config value may be: sizes, text, lists, URLs, hosts, directories, memory; how a message shows one.

Pure checks used by `kvtier.config` while it walks the config's fields: each takes the value and
`where` (the source and dotted key, for the message) and raises `ConfigError` or returns the value.
A message shows at most a short prefix of a value (`show`), never the text of a secret (the callers
do not pass one to `show`) nor a URL's credentials or query, wherever the URL was written (`show`
redacts every string it quotes, alone or inside a list or mapping).
"""

from __future__ import annotations

import ipaddress
import os
import re
import reprlib
import stat
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kvtier.errors import ConfigError

GiB = 1 << 30
MAX_SIZE = (1 << 63) - 1  # bytes; also the bound on every int (they reach C int64s)
MAX_TEXT = 1 << 20  # characters in one string value (the bound on a config file, for env values)

_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
# ASCII: `\d` would take "１２" or "٣" as digits (Decimal reads them) where every int key refuses them.
_SIZE_RE = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*([A-Za-z]*)\s*", re.ASCII)


def parse_size(value: object, where: str) -> int:
    """A byte count from an int or a string such as "512MiB", "1.5GB", "800kB", "1024"; must be > 0."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        size = _parse_size_text(value, where)
    else:
        raise ConfigError(f"{where}: expected a size (bytes or a string like '4GiB'), got {show(value)}")
    if size <= 0:
        raise ConfigError(f"{where}: size must be positive, got {_repr.repr(value)}")
    if size > MAX_SIZE:
        raise ConfigError(f"{where}: size must be at most {MAX_SIZE} bytes, got {_repr.repr(value)}")
    return size


def _parse_size_text(text: str, where: str) -> int:
    match = _SIZE_RE.fullmatch(text)
    unit = _UNITS.get(match.group(2).lower() or "b") if match else None
    if match is None or unit is None:
        units = ", ".join(["B", "kB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"])
        raise ConfigError(f"{where}: invalid size {show(text)} (a number with an optional unit: {units})")
    try:
        # Decimal, not float: "1.1GB" must be exactly 1_100_000_000 bytes.
        exact = Decimal(match.group(1)) * unit
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only valid numbers
        raise ConfigError(f"{where}: invalid size {show(text)}") from exc
    if exact != exact.to_integral_value():
        raise ConfigError(f"{where}: size {show(text)} is not a whole number of bytes")
    return int(min(exact, MAX_SIZE + 1))  # no int() of a million digits; too large is refused above


def check_items(value: object, meta: Mapping[str, Any], where: str) -> list[Any]:
    """A list of at most `meta["max_items"]` values (every list key declares its bound: a config list
    is a few ids, never a data set), not empty unless the field's metadata says `empty`."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {show(value)}")
    if len(value) > meta["max_items"]:
        raise ConfigError(f"{where}: at most {meta['max_items']} items, got {len(value)}")
    if not value and not meta.get("empty"):
        raise ConfigError(f"{where}: must not be an empty list")
    return list(value)


def check_text(value: str, meta: Mapping[str, Any], where: str) -> None:
    """Bounded, encodable, no NUL, and not blank unless the field's metadata says `empty`."""
    # The value is not shown: it may be a secret, and what is wrong with it says enough.
    if len(value) > MAX_TEXT:
        raise ConfigError(f"{where}: longer than {MAX_TEXT} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, os.environ's stand-in for a non-UTF-8 byte
        raise ConfigError(f"{where}: not UTF-8 text (at character {exc.start})") from exc
    if "\0" in value:
        raise ConfigError(f"{where}: contains a NUL character")
    if not value.strip() and not meta.get("empty"):
        hint = "; leave it out or null for none" if meta.get("secret") else ""
        raise ConfigError(f"{where}: must not be empty{hint}")


def check_url(url: str, schemes: tuple[str, ...], where: str) -> None:
    """Scheme, host, port (1-65535) and path checked now, not at the first connection."""
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # a bad IPv6 literal, or a port out of range or not a number
        raise ConfigError(f"{where}: invalid URL {shown} (a port is a number in 1-65535)") from exc
    if parts.scheme not in schemes:
        expected = ", ".join(f"{s}://" for s in schemes)
        raise ConfigError(f"{where}: URL scheme must be {expected}; got {shown}")
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(f"{where}: unix:// URL needs a socket path; got {shown}")
        return
    if not parts.hostname or any(c.isspace() for c in parts.hostname):
        raise ConfigError(f"{where}: URL needs a host; got {shown}")
    if port == 0 or (port is None and parts.scheme == "kvtier"):
        raise ConfigError(f"{where}: URL needs a port in 1-65535; got {shown}")
    if parts.scheme in ("kvtier", "http", "https"):
        # The token has its own key; userinfo in a URL ends up in logs.
        if parts.username is not None or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"{where}: expected {parts.scheme}://host:port; got {shown}")
        return
    if not re.fullmatch(r"/?\d*", parts.path):
        raise ConfigError(f"{where}: the path of a redis:// URL is the database number; got {shown}")
    for name in parse_qs(parts.query, keep_blank_values=True):
        if not _REDIS_URL_OPTIONS.fullmatch(name):
            raise ConfigError(f"{where}: URL option {show_key(name)} is not allowed (timeouts, pool "
                              f"size and retries are redis.* keys); got {shown}")


# What redis-py may take from a URL's query. The rest (`socket_timeout`, `max_connections`,
# `retry_on_timeout`, `decode_responses`, ...) would override the tier's own bounds or change how
# replies are read (`decode_responses=1` made every get raise UnicodeDecodeError): refused.
_REDIS_URL_OPTIONS = re.compile(r"ssl_[a-z_]+|client_name|db|username|password")


_HOST = re.compile(r"[A-Za-z0-9._:%-]{1,253}")  # a name, IPv4 or IPv6 (with a %zone); no brackets


def check_host(host: str, where: str) -> None:
    """A host name or IP address to bind: not a URL, no spaces ("127.0.0.1 " failed only at bind)."""
    if not _HOST.fullmatch(host):
        raise ConfigError(f"{where}: expected a host name or IP address, got {show(host)}")


def redact_url(url: str) -> str:
    """`url` for a message (`show`n), credentials and query replaced by *** (see `hide_url_secrets`)."""
    return show(url)


def hide_url_secrets(text: str) -> str:
    """`text` with what may be a URL's secret replaced by ***: anything between "://" and the last
    "@" (user and password, even one holding "@" or "/"), and a query (`?password=...`, which
    redis-py reads). Text without "://" is returned as is."""
    if "://" not in text:
        return text
    scheme, sep, rest = text.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    if "?" in rest:
        rest = rest.partition("?")[0] + "?***"
    return scheme + sep + rest


def check_directory(path: str, where: str) -> None:
    """A directory, or nothing yet (the tier creates it); not a file, nor a link to nothing."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.lexists(path):
            raise ConfigError(f"{where}: {path} is a symbolic link to nothing") from None
        return
    except OSError as exc:
        raise ConfigError(f"{where}: cannot use {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(mode):
        raise ConfigError(f"{where}: {path} exists and is not a directory")


def check_memory(size: int, where: str) -> None:
    """At most the machine's physical memory (a container's own limit may be lower: not checked)."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not known on this platform: nothing to check
        return
    if physical > 0 and size > physical:
        raise ConfigError(f"{where}: {size} bytes ({size / GiB:.1f} GiB) is more than this machine's "
                          f"physical memory ({physical / GiB:.1f} GiB)")


class _Repr(reprlib.Repr):
    """Every string it shows, alone or inside a list or mapping, has URL secrets redacted first:
    a URL can land where a URL is not expected (`redis: redis://:pw@host`, a list of cluster URLs)."""

    def repr_str(self, x: str, level: int) -> str:
        return super().repr_str(hide_url_secrets(x), level)


# Bounded: a message quotes at most a short prefix of a value, whatever was written.
_repr = _Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlevel, _repr.maxlist, _repr.maxdict = 2, 4, 4


def show(value: object) -> str:
    return f"{type(value).__name__} {_repr.repr(value)}"


def show_key(key: object) -> str:
    """An unknown key for a message. A key is a name; text after the name (`token s3cret` with its
    colon forgotten) may be a value, even a secret, so only the name part is shown."""
    if not isinstance(key, str):
        return _repr.repr(key)
    name = _KEY_NAME.match(key).group()
    if len(name) == len(key):
        return key
    return f"{name!r} and {len(key) - len(name)} more characters"


_KEY_NAME = re.compile(r"[A-Za-z0-9_.-]{0,60}")


def require_token_beyond_loopback(host: str, token: str | None, how_to_set: str) -> None:
    """Fail closed: a service other machines can reach must check a token. `how_to_set` says where
    the token goes, for the message. Raises ConfigError."""
    if token is not None or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        loopback = False
    if not loopback:
        raise ConfigError(f"host {host} is reachable from other machines and no token is set: "
                          f"{how_to_set} or bind 127.0.0.1")
