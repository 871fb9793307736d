"""Instance ids: the one a fleet member registers under, unique among the members of this process.

    instance_id = claim_instance_id(config.instance_id)   # ConfigError if taken / invalid
    ...
    release_instance_id(instance_id)                      # when the member leaves the fleet

A configured id is validated and must not be in use by another member of this process (two would
overwrite each other's keys in the controller's index: each registration resets the other's). The
default is `<host name>-<pid>` made to fit the id pattern, then `<host name>-<pid>-2`, `-3`, ... for
further members of the same process (several CacheEngines, or an engine beside a kvtier_server).

Thread-safe: one process-wide lock around the set of ids in use.
"""

from __future__ import annotations

import os
import socket
import threading

from pydantic import TypeAdapter, ValidationError

from kvtier.config_values import show
from kvtier.errors import ConfigError
from kvtier.fleet.messages import InstanceId

_INSTANCE_ID = TypeAdapter(InstanceId)
_lock = threading.Lock()
_in_use: set[str] = set()


def resolve_instance_id(configured: str | None, nth: int = 1) -> str:
    """The configured id, validated, or `<host name>-<pid>` (`-<nth>` after it beyond the first)
    made to fit the id pattern."""
    if configured is not None:
        try:
            return _INSTANCE_ID.validate_python(configured)
        except ValidationError:
            raise ConfigError(f"controller.instance_id: expected 1 to 64 letters, digits, '.', '_' or '-', "
                              f"beginning with a letter or digit; got {show(configured)}") from None
    suffix = f"-{os.getpid()}" + (f"-{nth}" if nth > 1 else "")
    host = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "-" for c in socket.gethostname())
    host = host.lstrip("._-") or "kvtier"
    return host[:64 - len(suffix)] + suffix


def claim_instance_id(configured: str | None) -> str:
    """An id for a new member of this process (see the module docstring). Raises ConfigError."""
    instance_id = resolve_instance_id(configured)
    with _lock:
        if configured is not None and instance_id in _in_use:
            raise ConfigError(f"controller.instance_id {instance_id!r} is already used by another fleet "
                              f"member of this process: give each its own (or leave it unset)")
        nth = 1
        while instance_id in _in_use:
            nth += 1
            instance_id = resolve_instance_id(None, nth)
        _in_use.add(instance_id)
    return instance_id


def release_instance_id(instance_id: str) -> None:
    with _lock:
        _in_use.discard(instance_id)
