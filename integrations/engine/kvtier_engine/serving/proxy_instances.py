"""Which --decode instance the controller means by an instance id: each instance's card,
`GET /v1/kvtier/instance` (serving/disagg_routes.py), gives the fleet id its kvtier registered and
the model id it registered under.

`DecodeInstances.current()` gives the latest `InstanceMap`. The first call asks every instance (at
once, each within `timeout_s`) and waits for the answers; concurrent first requests wait for the same
lookup, and a request whose client leaves does not cancel it (shielded). Later, `refresh_soon()` (the
controller named an id the map lacks, or the map is empty: the instances were not up yet) asks again
in the background, at most once per REFRESH_S, while requests go on with the map they have.

An instance that does not answer, answers without an id (its kvtier has no `controller:` section),
or with another model id than the first instance that named one, is left out of the map: it still
gets requests by load, never by prefix. Runs on the proxy's event loop; no locks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvtier_engine.serving.proxy_backends import Backend
from kvtier_engine.serving.proxy_upstream import UpstreamError, fetch_json

logger = logging.getLogger(__name__)

INSTANCE_PATH = "/v1/kvtier/instance"
# An instance restarted with a new id (the default id is "<host>-<pid>") is found within this; and a
# fleet whose other engines hold prompts too (prefill instances do) costs one card per instance per
# period, not one per request.
REFRESH_S = 10.0
MAX_CARD_BYTES = 64 << 10


@dataclass(frozen=True, slots=True)
class InstanceMap:
    model_id: str | None = None  # what the mapped instances registered with the controller under
    by_id: Mapping[str, Backend] = field(default_factory=dict)  # fleet instance id -> decode instance
    tokenizers: tuple[Backend, ...] = ()  # instances that answered with `model_id`: their /tokenize


class DecodeInstances:
    def __init__(self, backends: Sequence[Backend], timeout_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self._backends = tuple(backends)
        self._timeout_s = timeout_s
        self._clock = clock
        self._map: InstanceMap | None = None  # None until the first lookup has ended
        self._task: asyncio.Task[None] | None = None
        self._asked_at = -math.inf

    async def current(self) -> InstanceMap:
        if self._map is None:
            await asyncio.shield(self._start())
        return self._map or InstanceMap()

    def refresh_soon(self) -> asyncio.Task[None] | None:
        """Ask the instances again in the background, unless a lookup started within REFRESH_S; the
        lookup under way, if any."""
        if self._clock() - self._asked_at >= REFRESH_S:
            self._start()
        return self._task if self._task is not None and not self._task.done() else None

    def snapshot(self) -> dict[str, str]:
        return {id_: backend.url for id_, backend in (self._map or InstanceMap()).by_id.items()}

    def _start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._asked_at = self._clock()
            self._task = asyncio.get_running_loop().create_task(self._lookup())
        return self._task

    async def _lookup(self) -> None:
        cards = await asyncio.gather(*(self._card(backend) for backend in self._backends))
        found, left_out = _instance_map(list(zip(self._backends, cards)))
        if found != self._map:  # said once per change, not once per lookup
            logger.info("decode instances by fleet id (model %s): %s", found.model_id,
                        ", ".join(f"{i}={b.url}" for i, b in found.by_id.items()) or "none")
            for complaint in left_out:
                logger.warning("%s: chosen by load only", complaint)
        self._map = found

    async def _card(self, backend: Backend) -> dict[str, Any] | None:
        try:
            card = await fetch_json(backend.address, "GET", INSTANCE_PATH, None, self._timeout_s,
                                    MAX_CARD_BYTES)
        except UpstreamError as exc:
            logger.warning("decode %s: no instance card (%s); it is chosen by load only", exc.url, exc.reason)
            return None
        return card if isinstance(card, dict) else None


def _instance_map(cards: list[tuple[Backend, dict[str, Any] | None]]) -> tuple[InstanceMap, list[str]]:
    """The instances that named the first model id named, by their instance ids; and why each
    instance with a model id was left out."""
    model_id = next((c["model_id"] for _, c in cards if c and isinstance(c.get("model_id"), str)), None)
    by_id: dict[str, Backend] = {}
    tokenizers, left_out = [], []
    for backend, card in cards:
        named = card.get("model_id") if card is not None else None
        if named is None:  # no card, or kvtier is off there: the controller never names it
            continue
        if named != model_id:
            left_out.append(f"decode {backend.url} serves model {str(named)[:100]!r}, not {model_id!r}")
            continue
        tokenizers.append(backend)
        instance_id = card.get("instance_id")
        if isinstance(instance_id, str) and instance_id in by_id:
            left_out.append(f"decode {backend.url} has the id {instance_id!r} of {by_id[instance_id].url}")
        elif isinstance(instance_id, str) and instance_id:
            by_id[instance_id] = backend
    return InstanceMap(model_id, by_id, tuple(tokenizers)), left_out
