"""Which platform kvtier uses: the built-in `cpu` and `cuda`, and out-of-tree ones that an installed
package declares in the entry-point group `kvtier.platforms` (name: the platform's; value: a callable
returning a `Platform`), the way vLLM takes accelerator plugins without being forked.

`current_platform()`: the one `KVTIER_PLATFORM` names (an error if it is unknown or unavailable);
else the first available plugin, by name (a plugin is installed to be used); else `cuda` where a GPU
is available; else `cpu`. `platform_for(device)`: the platform of a tensor's device type (the KV
cache a connector is given decides where its copies run).

A plugin that fails to load, returns something that is not a `Platform`, or reuses a built-in name is
skipped with an error in the log: a broken accelerator package must not stop a CPU deployment.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from importlib.metadata import entry_points

import torch

from kvtier.platforms.base import Platform
from kvtier.platforms.cpu import CpuPlatform
from kvtier.platforms.cuda import CudaPlatform
from kvtier.platforms.generic import TorchPlatform

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kvtier.platforms"
ENV = "KVTIER_PLATFORM"
BUILTIN = ("cpu", "cuda")


def _builtin() -> dict[str, Platform]:
    return {"cpu": CpuPlatform(), "cuda": CudaPlatform()}


@functools.cache
def plugins() -> dict[str, Platform]:
    """The out-of-tree platforms installed, by name (loaded once per process)."""
    found: dict[str, Platform] = {}
    for point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda p: p.name):
        if point.name in BUILTIN or point.name in found:
            logger.error("platform plugin %r (%s) skipped: the name is taken", point.name, point.value)
            continue
        try:
            platform = point.load()()
        except Exception:
            logger.exception("platform plugin %r (%s) failed to load: skipped", point.name, point.value)
            continue
        if not isinstance(platform, Platform) or not isinstance(getattr(platform, "device_type", None), str):
            logger.error("platform plugin %r (%s) skipped: %r is not a kvtier Platform", point.name,
                         point.value, platform)
            continue
        found[point.name] = platform
    return found


def all_platforms() -> dict[str, Platform]:
    """Every platform by name: the built-in ones, then the plugins."""
    return {**_builtin(), **plugins()}


def current_platform(env: Mapping[str, str] = os.environ) -> Platform:
    """The platform this process uses (see the module docstring). ValueError for a bad KVTIER_PLATFORM."""
    known = all_platforms()
    if (name := env.get(ENV)) is not None:
        platform = known.get(name)
        if platform is None:
            raise ValueError(f"{ENV}={name!r}: no such platform; known: {sorted(known)}")
        if not _available(name, platform):
            raise ValueError(f"{ENV}={name!r}: that platform is not available in this process")
        return platform
    for name, platform in plugins().items():
        if _available(name, platform):
            return platform
    return known["cuda"] if known["cuda"].available() else known["cpu"]


def _available(name: str, platform: Platform) -> bool:
    """A plugin's `available()`, False (logged) when it raises: its driver is broken, not kvtier."""
    try:
        return bool(platform.available())
    except Exception:
        logger.exception("platform plugin %r: available() failed; not used", name)
        return False


def platform_for(device: torch.device | str) -> Platform:
    """The platform whose device type is `device`'s; for a device none claims, torch alone
    (`TorchPlatform`: synchronous copies, as before platforms existed)."""
    device_type = torch.device(device).type
    for platform in all_platforms().values():
        if platform.device_type == device_type:
            return platform
    return TorchPlatform(device_type)
