"""What the fleet holds of a prompt: lookup, route and the per-instance keys of pin/unpin/move; and
who holds given keys for a peer-to-peer read (`peers`).

Pure functions over a `FleetState`. A prompt's chunk keys depend on who cached it: each engine
hashes with its own namespace digest, chunk size and partial-chunk setting, so the tokens are hashed
once per (namespace, chunk_size, save_partial) group of engines with `kvtier.keys.chained_digests`,
exactly as the engine's `TokenDatabase` does, and never with a default chunk size (LMCache's
controller hashes with its own and answers wrongly for an engine configured otherwise).

A kvtier_server (kind "server") holds keys of many namespaces: it is matched against every group's
keys, and appears in a lookup (and is a pin target) only when it holds leading keys of one of them;
its hit is counted in the chunks of the group where it is longest.

Where it runs: the controller's request threads, or its event loop for a lookup or route of a
small body against a `MemoryState` (kvtier.controller.app.INLINE_BODY_BYTES). Side-effect free;
`StateUnavailable` and `UnknownInstance` from the state pass through; bad tokens raise ValueError
(the app's 400/422), as does naming an engine of another model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvtier.controller.state import FleetState, InstanceRecord
from kvtier.fleet.messages import InstanceHit, LookupReply, PeerHolding, PeersReply, RouteEntry, RouteReply
from kvtier.keys import chained_digests, tokens_to_u32

# Peers in one /v1/peers answer: each carries 2 flags per key (4096 keys: ~50 KiB of JSON), and a
# reader takes its run from the first and the rest from the next few; a fleet of thousands holding
# the keys must not make the answer (and its JSON) grow with it.
MAX_PEERS = 16


@dataclass(frozen=True, slots=True)
class _Group:
    """How a set of engines keys a prompt (None namespace: an engine that reported none)."""

    namespace: bytes | None
    chunk_size: int
    save_partial: bool


@dataclass(slots=True)
class _Hit:
    record: InstanceRecord
    group: _Group
    chunks: int = 0  # leading chunks held
    masks: tuple[int, ...] = ()  # their tier masks
    keys: tuple[bytes, ...] = ()  # the prompt's keys in this group


def prompt_keys(tokens_u32: np.ndarray, namespace: bytes, chunk_size: int, save_partial: bool) -> list[bytes]:
    """The 24-byte chunk keys of a prompt, as `TokenDatabase(.., chunk_size, save_partial).keys`."""
    n = len(tokens_u32)
    ends = list(range(chunk_size, n + 1, chunk_size))
    if save_partial and n % chunk_size:
        ends.append(n)
    return [namespace + d for d in chained_digests(tokens_u32.tobytes(), namespace, ends)]


def _group(record: InstanceRecord) -> _Group:
    r = record.registration
    return _Group(bytes.fromhex(r.namespace) if r.namespace else None, r.chunk_size, r.save_partial_chunks)


def _leading(held: list[dict[str, int]], instance_id: str) -> tuple[int, ...]:
    masks = []
    for holders in held:
        mask = holders.get(instance_id)
        if not mask:
            break
        masks.append(mask)
    return tuple(masks)


def _hits(state: FleetState, model_id: str, tokens: Sequence[int] | np.ndarray,
          now: float) -> tuple[list[_Hit], list[_Hit], int]:
    """(engines of the model that are up, servers holding a leading key, number of tokens)."""
    arr = tokens_to_u32(tokens)
    up = [r for r in state.instances(now) if r.up]
    servers = [r for r in up if r.registration.kind == "server"]
    engines = [_Hit(r, _group(r)) for r in up
               if r.registration.kind == "engine" and r.registration.model_id == model_id]
    server_hits: dict[str, _Hit] = {}
    for group in dict.fromkeys(h.group for h in engines):
        if group.namespace is None:
            continue
        keys = tuple(prompt_keys(arr, group.namespace, group.chunk_size, group.save_partial))
        held = state.holders(list(keys)) if keys else []
        for hit in engines:
            if hit.group == group:
                hit.masks, hit.keys = _leading(held, hit.record.instance_id), keys
                hit.chunks = len(hit.masks)
        for record in servers:
            masks = _leading(held, record.instance_id)
            best = server_hits.get(record.instance_id)
            if masks and (best is None or len(masks) > best.chunks):
                server_hits[record.instance_id] = _Hit(record, group, len(masks), masks, keys)
    return engines, list(server_hits.values()), len(arr)


def _hit_tokens(hit: _Hit, num_tokens: int) -> int:
    return min(hit.chunks * hit.group.chunk_size, num_tokens)


def _fastest(record: InstanceRecord, mask: int) -> str:
    names = record.tier_names()
    index = (mask & -mask).bit_length() - 1
    return names[index] if index < len(names) else f"tier{index}"


def lookup(state: FleetState, model_id: str, tokens: Sequence[int] | np.ndarray, now: float) -> LookupReply:
    engines, servers, n = _hits(state, model_id, tokens, now)
    entries = [InstanceHit(instance_id=h.record.instance_id, hit_tokens=_hit_tokens(h, n),
                           chunk_size=h.group.chunk_size,
                           tiers=[_fastest(h.record, mask) for mask in h.masks])
               for h in engines + servers]
    entries.sort(key=lambda e: (-e.hit_tokens, e.instance_id))
    return LookupReply(model_id=model_id, num_tokens=n,
                       hit_tokens=max((e.hit_tokens for e in entries), default=0), instances=entries)


def free_bytes(record: InstanceRecord) -> int:
    """Capacity left in its fastest tier, by its latest usage report."""
    tiers = record.tiers or tuple(record.registration.tiers)
    return max(tiers[0].capacity_bytes - tiers[0].bytes_used, 0) if tiers else 0


def route(state: FleetState, model_id: str, tokens: Sequence[int] | np.ndarray, now: float) -> RouteReply:
    engines, _, n = _hits(state, model_id, tokens, now)
    entries = [RouteEntry(instance_id=h.record.instance_id, hit_tokens=_hit_tokens(h, n),
                          free_bytes=free_bytes(h.record)) for h in engines]
    entries.sort(key=lambda e: (-e.hit_tokens, -e.free_bytes, e.instance_id))
    return RouteReply(instances=entries)


def _keys_for(record: InstanceRecord, arr: np.ndarray) -> list[bytes]:
    group = _group(record)
    if group.namespace is None:
        return []
    return prompt_keys(arr, group.namespace, group.chunk_size, group.save_partial)


def targets(state: FleetState, model_id: str, tokens: Sequence[int] | np.ndarray, instance_id: str | None,
            now: float) -> list[tuple[InstanceRecord, list[bytes]]]:
    """Per target instance, the prompt's keys as it names them (for pin, unpin, move).

    `instance_id` None: every engine of the model that is up, and every server that holds leading
    keys of the prompt (with the keys of the group it holds most of). Named: that one instance,
    even down (the app answers 409), or UnknownInstance; an engine of another model is a ValueError;
    a server gets the keys of its longest hit (none when it holds none)."""
    if instance_id is None:
        engines, servers, _ = _hits(state, model_id, tokens, now)
        return [(h.record, list(h.keys)) for h in engines + servers]
    record = state.instance(instance_id, now)
    r = record.registration
    if r.kind == "engine":
        if r.model_id != model_id:
            raise ValueError(f"instance {instance_id} serves model {r.model_id!r}, not {model_id!r}")
        return [(record, _keys_for(record, tokens_to_u32(tokens)))]
    _, servers, _ = _hits(state, model_id, tokens, now)
    keys = next((list(h.keys) for h in servers if h.record.instance_id == instance_id), [])
    return [(record, keys)]


def peers(state: FleetState, keys: Sequence[bytes], exclude: str | None, now: float) -> PeersReply:
    """Who can serve `keys` peer to peer (POST /v1/peers): the engines that are up, have a P2P
    endpoint, are not `exclude` (the asker) and hold at least one key; per key whether each holds it
    and whether in its fastest tier (mask bit 0: host memory, read without a disk read). Most
    leading keys first (a reader takes its prefix from the first), then most in memory, then by id;
    the best MAX_PEERS only. A kvtier_server is never named, even with a p2p_url: it answers no
    LEASE or CONNECT (a reader sent there would only fail and back off)."""
    found = []
    held = state.holders(list(keys))
    holding = set().union(*held)  # (an instance in no key's holders has nothing to serve)
    for record in state.instances(now):
        url, instance_id = record.registration.p2p_url, record.instance_id
        if (not record.up or url is None or instance_id == exclude or instance_id not in holding
                or record.registration.kind != "engine"):
            continue
        masks = [holders.get(instance_id, 0) for holders in held]
        if any(masks):
            found.append(PeerHolding(instance_id=instance_id, p2p_url=url, held=[bool(m) for m in masks],
                                     in_memory=[bool(m & 1) for m in masks]))
    found.sort(key=lambda p: (-_leading_count(p.held), -sum(p.in_memory), p.instance_id))
    return PeersReply(peers=found[:MAX_PEERS])


def _leading_count(held: list[bool]) -> int:
    return held.index(False) if False in held else len(held)
