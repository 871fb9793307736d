"""How RedisState (kvtier.controller.redis_state) reads its values back: an instance's record from
its meta hash, and holders' masks from HMGET replies.

Anything in Redis may have been written by someone else: a meta or index key of another type (its
command's reply is the WRONGTYPE error object), an `hb` that is no number, JSON that is not ours, a
mask that is no small positive integer. Such a record reads as None (RedisState leaves it out and its
sweep forgets it; the instance registers again), such a mask as no tier: never an exception that
would fail the answers about every other instance.

Pure functions; the parsed registrations and usage lists are cached by their raw bytes (a record is
read on every lookup, and changes only when the instance registers or heartbeats).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence

from kvtier.controller.state import InstanceRecord
from kvtier.fleet.messages import MAX_TIERS, Registration, TierUsage

_MASK_LIMIT = 1 << MAX_TIERS  # a mask has one bit per registered tier


@functools.lru_cache(maxsize=1024)
def _registration(raw: bytes) -> Registration:
    return Registration.model_validate_json(raw)


@functools.lru_cache(maxsize=4096)
def _usage(raw: bytes) -> tuple[TierUsage, ...]:
    return tuple(TierUsage(**t) for t in json.loads(raw))


def record(instance_id: str, meta: object, count: object, now: float,
           timeout_s: float) -> InstanceRecord | None:
    """An instance's record from its meta hash (HGETALL) and index length (HLEN); None when either is
    not what a controller wrote."""
    if not isinstance(meta, dict):
        return None
    try:
        hb = float(meta[b"hb"])
        registration = _registration(meta[b"reg"])
        usage = _usage(meta[b"usage"])
    except (KeyError, ValueError, TypeError):  # pydantic's ValidationError is a ValueError
        return None
    if not math.isfinite(hb) or registration.instance_id != instance_id:
        return None
    return InstanceRecord(registration, hb, usage, now - hb <= timeout_s,
                          count if isinstance(count, int) else 0)


def joined(parts: list) -> list | Exception:
    """One instance's HMGET replies of consecutive key slices as one; a refused one (WRONGTYPE) stands
    for them all."""
    refused = next((part for part in parts if isinstance(part, Exception)), None)
    return refused if refused is not None else [mask for part in parts for mask in part]


def held(ids: Sequence[str], masks: list, n: int) -> list[dict[str, int]]:
    """holders' answer (per key, instance -> mask) from one HMGET reply per instance: an index that
    is not a hash holds nothing, a mask that is not a positive integer below 2^16 is no tier."""
    out: list[dict[str, int]] = [{} for _ in range(n)]
    for instance_id, column in zip(ids, masks):
        if isinstance(column, Exception):
            continue
        for holders, raw in zip(out, column):
            if raw is not None and raw.isdigit() and len(raw) <= 5 and 0 < int(raw) < _MASK_LIMIT:
                holders[instance_id] = int(raw)
    return out
