"""The config sections the connector reads (not the tiers): `blend:`, `loads:` and `trace_log:`.

Part of `kvtier.config` (which re-exports both); the loader (`kvtier.config_load`) walks these
dataclasses' fields like every other section's, so every key is checked the same way, in a file or
from the environment (`KVTIER_LOADS__ASYNCHRONOUS=off`, `KVTIER_BLEND__RATIO=0.2`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvtier.config_fields import SWITCH, at_least, choice_key, size_key
from kvtier.config_values import GiB

MAX_TRACE_PATH_BYTES = 4096  # trace_log.path: Linux's PATH_MAX
MAX_SEPARATOR_IDS = 64  # blend.separator_ids: a separator is a few tokens; the bound keeps a list small
MAX_LOOKUPS_IN_FLIGHT = 1 << 16  # loads.lookup_max_in_flight: far past any engine's waiting queue


@dataclass(frozen=True, slots=True)
class BlendConfig:
    """`blend:`: reuse cached passages that are not a prefix (kvtier.blend). Exactly one of `separator_ids`
    and `separator` (alone, tokenised once at start-up by the engine, which also checks `check_layer`)."""

    # Ids, never text re-tokenised in context (it tokenises differently there); a tuple: configs are frozen.
    separator_ids: tuple[int, ...] | None = field(
        default=None, metadata={"min": 0, "max": 2**32 - 1, "max_items": MAX_SEPARATOR_IDS})
    separator: str | None = field(default=None, metadata={"empty": True, "max_bytes": 1024})
    ratio: float = field(default=0.15, metadata={"min": 0.0, "max": 1.0})  # of reused tokens recomputed
    check_layer: int = at_least(1, 1)  # where deviations are measured; layers before it: all recomputed
    min_tokens: int = at_least(64, 0)  # a shorter passage is recomputed, not reused


@dataclass(frozen=True, slots=True)
class LoadsConfig:
    """`loads:`: whether a kvtier load finishes within the engine step that schedules it or runs in
    the background while the request waits for its KV (`kvtier.connector.async_load`), and prefetch.

    `asynchronous`: auto = a load is asynchronous when some chunk of it is not in the CPU tier (it
    needs disk, Redis, the server or a peer) or when it is at least `async_min_bytes`; on = every
    load; off = every load finishes within its step. At most `async_max_bytes_in_flight` of staging
    memory is read into at once (a larger load is cut there: the rest is recomputed, counted).
    `prefetch`: when a request arrives, the chunks of its hit below the CPU tier start moving up at
    once (`kvtier.connector.prefetch`), at most `prefetch_max_bytes_in_flight` being read.
    `lookup_max_in_flight`: with a tier below whose index is not in this process (Redis, kvtier_server,
    a peer) and `asynchronous` not off, a request's lookup runs in the background
    (`kvtier.connector.lookups`) and the request waits, holding nothing, until it lands; at most this
    many are queued or running at once (a request past that is asked again at the next step)."""

    asynchronous: str = choice_key("auto", SWITCH)
    async_min_bytes: int = size_key(64 << 20)
    async_max_bytes_in_flight: int = size_key(1 * GiB, memory=True)
    prefetch: bool = True
    prefetch_max_bytes_in_flight: int = size_key(512 << 20)
    lookup_max_in_flight: int = field(default=64, metadata={"min": 1, "max": MAX_LOOKUPS_IN_FLIGHT})


@dataclass(frozen=True, slots=True)
class TraceLogConfig:
    """`trace_log:`: one Mooncake JSONL line per finished request, chunk hashes and lengths only
    (`kvtier.connector.trace_log`), for replaying the traffic through kvtier's simulator. `path`: the
    file, appended to (a relative path is resolved against the working directory when the engine
    starts); empty = off. `max_bytes`: once the file would grow past it, logging stops (counted)."""

    path: str = field(default="", metadata={"empty": True, "max_bytes": MAX_TRACE_PATH_BYTES})
    max_bytes: int = size_key(1 * GiB)
