"""A `Tier` over another tier: what the per-tier codec (`kvtier.tiers.coded`) and the bandwidth-
adaptive levels (`kvtier.tiers.adaptive`) are built on. The wrapper takes the inner tier's name and
flags, so metrics, config names, moves and clears see one tier ("disk"), and passes every call
through; a subclass overrides the calls it changes.

Key reporting: a tier whose keys this process reports to its fleet (`storage_admin.KeyedTier`: the
disk tier) stays one when wrapped: `wrap(cls, inner, ...)` builds `cls` with `keys` and
`set_key_listener` passed through, filtered by the subclass's `visible(key)` (a wrapper that stores
extra records under derived keys keeps them out of the fleet's index). A tier that reports nothing
(Redis, kvtier_server) is wrapped by `cls` itself, which has no such methods, so wrapping never turns
a shared store into a reported one.

Thread-safe as far as the inner tier is: the wrapper holds no state of its own.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

from kvtier.keys import ChunkKey
from kvtier.tiers.base import PutItem, Tier, TierUsage

if TYPE_CHECKING:
    import numpy as np
    import torch

    from kvtier.policy import IndexListener
    from kvtier.record import RecordHeader

W = TypeVar("W", bound="WrappedTier")


class WrappedTier:
    def __init__(self, inner: Tier):
        self.inner = inner
        self.name = inner.name
        self.writable = inner.writable
        self.fans_out = inner.fans_out
        self.local = getattr(inner, "local", False)

    def visible(self, key: ChunkKey) -> bool:
        """Whether a key of the inner tier is one of the chunks it holds (not a derived record)."""
        return True

    def has(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return self.inner.has(keys)

    def get(self, keys: Sequence[ChunkKey],
            dests: Sequence[torch.Tensor | np.ndarray]) -> list[RecordHeader | None]:
        return self.inner.get(keys, dests)

    def put(self, items: Sequence[PutItem]) -> list[bool]:
        return self.inner.put(items)

    def touch(self, keys: Sequence[ChunkKey]) -> None:
        """Mark keys recently used where the inner tier keeps its own recency (the disk tier's
        `touch`); a no-op for stores that evict by their own policy (Redis, kvtier_server)."""
        touch = getattr(self.inner, "touch", None)
        if touch is not None:
            touch(keys)

    def remove(self, keys: Sequence[ChunkKey]) -> int:
        return self.inner.remove(keys)

    def clear(self) -> None:
        self.inner.clear()

    def usage(self) -> TierUsage:
        return self.inner.usage()

    def close(self) -> None:
        self.inner.close()


class _ReportsInnerKeys:
    """The key-reporting half of a wrapper over a `KeyedTier`, filtered by `visible`."""

    inner: Tier  # (and `visible`, from the wrapper class this is mixed into, which comes after it)

    def keys(self) -> list[ChunkKey]:
        return [key for key in self.inner.keys() if self.visible(key)]  # type: ignore[attr-defined]

    def set_key_listener(self, listener: IndexListener | None) -> None:
        if listener is None:
            self.inner.set_key_listener(None)  # type: ignore[attr-defined]
            return

        def only_visible(op, tier, key):
            if self.visible(key):
                listener(op, tier, key)

        self.inner.set_key_listener(only_visible)  # type: ignore[attr-defined]


@functools.cache
def _reporting(cls: type[W]) -> type[W]:
    return type(f"Reporting{cls.__name__}", (_ReportsInnerKeys, cls), {})


def wrap(cls: type[W], inner: Tier, *args, **kwargs) -> W:
    """`cls(inner, *args, **kwargs)`, reporting the inner tier's keys when the inner tier does."""
    from kvtier.storage_admin import KeyedTier  # (storage_admin imports the tiers)

    return (_reporting(cls) if isinstance(inner, KeyedTier) else cls)(inner, *args, **kwargs)
