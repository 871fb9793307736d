"""Device platforms: what kvtier needs from a device (host memory, copy streams, paged block copies),
built in for `cpu` and `cuda`, and discovered for others through the `kvtier.platforms` entry points."""

from kvtier.platforms.base import CopyStream, Platform
from kvtier.platforms.registry import all_platforms, current_platform, platform_for, plugins

__all__ = ["CopyStream", "Platform", "all_platforms", "current_platform", "platform_for", "plugins"]
