"""PeerDirectory: which peers hold which chunks, asked of the controller (`POST /v1/peers`).

    directory = PeerDirectory(config.controller, config.p2p.directory_ttl_s, metrics)
    directory.instance_id = handle.instance_id    # once joined: the controller leaves us out
    directory.locate(keys) -> [PeerHolding]       # held / in_memory per key, most leading keys first
    directory.hint(keys, p2p_url, ttl_s)          # a peer said it holds these (disaggregated prefill)
    directory.close()

Hints: a decode instance is told by a request (kv_transfer_params) which prefill instance holds its
prompt's chunks. A hinted key is answered from the hint until it expires, before any cached answer
and without asking the controller, so a key the controller has not heard of yet (its index lags a
store by an event interval) or that it said nobody held a moment ago is still found. Without a
controller (`fleet` None) hints are the only answers.

Where it runs: the P2P tier's `has` (the lookup path) and `get` (the read threads), so thread-safe.
One round trip per call at most, in chunks of MAX_PEER_KEYS keys; each key's answer (its holders,
or none) is kept for `ttl_s`, so the `get` that follows a `has` by milliseconds costs no round trip.
The cache is bounded (MAX_CACHED_KEYS, oldest dropped), and so is what one answer may name: its first
MAX_PEERS peers with a kvtier:// URL are kept, the rest ignored. A JsonClient serves one thread at a time:
idle ones are kept for reuse, one is made when none is free (as many as threads ask at once).

Failure: a controller that cannot answer (unreachable, 5xx, a reply that is not the protocol, no
whole answer within the fleet's timeout_s however it trickles: a timer thread per round trip aborts
it) costs the keys not cached (no holders: the P2P tier misses, the engine recomputes), `errors`
counts on the p2p tier and a back-off (`FailureGuard`), so a dead controller costs one timeout per
back-off period, not one per lookup. A 4xx (a wrong token, a controller without the route) is a
configuration problem: one error line and a probe every RETRY_MAX_S. Never raises.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import TypeAdapter

from kvtier.config import FleetConfig
from kvtier.config_values import hide_url_secrets
from kvtier.errors import KvtierError, ProtocolError
from kvtier.fleet.http_client import HttpError, JsonClient, Unreachable
from kvtier.fleet.messages import MAX_PEER_KEYS, PeerHolding, PeersReply, PeersRequest, PeerUrl
from kvtier.keys import ChunkKey
from kvtier.log_limit import LogLimiter
from kvtier.metrics import Metrics
from kvtier.tiers.backoff import Backoff, Failure, FailureGuard

logger = logging.getLogger(__name__)

MAX_CACHED_KEYS = 1 << 20  # ~200 B each: a 1M-token prompt of 256-token chunks is 4K keys
MAX_PEERS = 32  # peers taken from one answer (more only cost memory: a key is read from one)
_PEER_URL = TypeAdapter(PeerUrl)
RETRY_AFTER_S = 1.0  # controller back-off, doubling to
RETRY_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class _Holder:
    instance_id: str
    p2p_url: str
    in_memory: bool


def _classify(exc: Exception) -> Failure:
    if isinstance(exc, HttpError):
        # 401/403: the token; 404/405: a controller without the route; 422: a version it does not speak
        return Failure.OUTAGE if exc.status >= 500 or exc.status == 429 else Failure.MISCONFIGURED
    return Failure.OUTAGE if isinstance(exc, (Unreachable, KvtierError, ValueError)) else Failure.BUG


class PeerDirectory:
    def __init__(self, fleet: FleetConfig | None, ttl_s: float, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic):
        self.instance_id: str | None = None
        self._fleet = fleet  # None: no controller; only hinted keys have holders
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: OrderedDict[ChunkKey, tuple[float, tuple[_Holder, ...]]] = OrderedDict()
        self._hints: OrderedDict[ChunkKey, tuple[float, tuple[_Holder, ...]]] = OrderedDict()
        self._idle: list[JsonClient] = []
        self._closed = False
        self._log = LogLimiter(logger)
        self._guard = FailureGuard(f"p2p directory {hide_url_secrets(fleet.url) if fleet else 'hints'}",
                                   Backoff(RETRY_AFTER_S, RETRY_MAX_S, clock),
                                   lambda n: metrics.tier_inc("p2p", "errors", n), self._log,
                                   _classify, meanwhile="peers are not asked")

    def locate(self, keys: Sequence[ChunkKey]) -> list[PeerHolding]:
        """The peers (other than this instance) that hold some of `keys`: `held[i]` and
        `in_memory[i]` answer for `keys[i]`; peers with the longest leading run first. Keys the
        controller could not be asked about count as held by nobody. Never raises."""
        keys = list(keys)
        known = self._cached(keys)
        missing = [i for i, holders in enumerate(known) if holders is None] if self._fleet is not None else []
        for start in range(0, len(missing), MAX_PEER_KEYS):
            part = missing[start:start + MAX_PEER_KEYS]
            asked = [keys[i] for i in part]
            answer = self._guard.call(len(part), lambda asked=asked: self._ask(asked))
            if answer is None:
                break  # failed or backing off: the rest would too
            for i, holders in zip(part, answer):
                known[i] = holders
            self._remember(asked, answer)
        return _holdings(known)

    def hint(self, keys: Sequence[ChunkKey], p2p_url: str, ttl_s: float) -> None:
        """`p2p_url` (a kvtier:// URL, checked by the caller) holds `keys` for the next `ttl_s`."""
        holder = (_Holder(p2p_url, p2p_url, True),)
        expires = self._clock() + ttl_s
        with self._lock:
            for key in keys:
                self._hints[key] = (expires, holder)
                self._hints.move_to_end(key)
            while len(self._hints) > MAX_CACHED_KEYS:
                self._hints.popitem(last=False)

    def _cached(self, keys: list[ChunkKey]) -> list[tuple[_Holder, ...] | None]:
        now = self._clock()
        found: list[tuple[_Holder, ...] | None] = []
        with self._lock:
            for key in keys:
                entry = self._hints.get(key)
                if entry is None or entry[0] <= now:
                    entry = self._cache.get(key)
                found.append(entry[1] if entry is not None and entry[0] > now else None)
        return found

    def _remember(self, keys: list[ChunkKey], answer: list[tuple[_Holder, ...]]) -> None:
        if self._ttl_s <= 0:
            return
        expires = self._clock() + self._ttl_s
        with self._lock:
            for key, holders in zip(keys, answer):
                self._cache[key] = (expires, holders)
                self._cache.move_to_end(key)
            while len(self._cache) > MAX_CACHED_KEYS:
                self._cache.popitem(last=False)

    def _ask(self, keys: list[ChunkKey]) -> list[tuple[_Holder, ...]]:
        """One POST /v1/peers: each key's holders. Raises (the guard counts and backs off)."""
        request = PeersRequest(keys=[k.hex() for k in keys], exclude=self.instance_id)
        client = self._client()
        try:
            reply = PeersReply.model_validate(_within(self._fleet.timeout_s, client, "/v1/peers", request))
        except BaseException:
            client.close()
            raise
        self._give_back(client)
        holders: list[list[_Holder]] = [[] for _ in keys]
        for peer in self._usable(reply.peers):
            if len(peer.held) != len(keys) or len(peer.in_memory) != len(keys):
                raise ProtocolError(f"/v1/peers answered {len(peer.held)} flags for {len(keys)} keys")
            # One _Holder per peer and flag, shared by its keys: the cache holds references.
            shared = {f: _Holder(peer.instance_id, peer.p2p_url, f) for f in (False, True)}
            for i, (held, in_memory) in enumerate(zip(peer.held, peer.in_memory)):
                if held:
                    holders[i].append(shared[bool(in_memory)])
        return [tuple(h) for h in holders]

    def _usable(self, peers: list[PeerHolding]) -> list[PeerHolding]:
        """The first MAX_PEERS peers (the controller ranks the best first) whose URL is a kvtier
        URL: an answer naming thousands would cost a holder per peer and key, here and in `get`."""
        usable = []
        for peer in peers:
            try:
                _PEER_URL.validate_python(peer.p2p_url)
            except ValueError:
                self._log.warning("url", "/v1/peers named a peer at %.80r: not a kvtier:// URL; "
                                  "ignored", peer.p2p_url)
                continue
            usable.append(peer)
            if len(usable) == MAX_PEERS:
                break
        return usable

    def _client(self) -> JsonClient:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return JsonClient(self._fleet.url, self._fleet.token, self._fleet.timeout_s)

    def _give_back(self, client: JsonClient) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(client)
                return
        client.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cache.clear()
            self._hints.clear()
        for client in idle:
            client.close()


def _within(seconds: float, client: JsonClient, path: str, body: object) -> object:
    """`client.post(path, body)`, all of it within `seconds`: the client's timeout is per socket
    operation, so a controller trickling its answer a byte at a time would hold the lookup path for
    as long as it likes. A timer aborts the request at the deadline (Unreachable)."""
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        client.abort()

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        answer = client.post(path, body)
    finally:
        timer.cancel()
        timer.join()  # (if it fired meanwhile, the client is aborted: the caller closes it)
    if expired.is_set():
        raise Unreachable(f"POST {path}: no whole answer within {seconds:g} s")
    return answer


def _holdings(known: list[tuple[_Holder, ...] | None]) -> list[PeerHolding]:
    """Per-key holders turned into one PeerHolding per peer, the longest leading run first."""
    n = len(known)
    peers: dict[str, PeerHolding] = {}
    for i, holders in enumerate(known):
        for h in holders or ():
            peer = peers.get(h.p2p_url)
            if peer is None:
                peer = peers[h.p2p_url] = PeerHolding(instance_id=h.instance_id, p2p_url=h.p2p_url,
                                                      held=[False] * n, in_memory=[False] * n)
            peer.held[i] = True
            peer.in_memory[i] = h.in_memory
    return sorted(peers.values(), key=lambda p: (-leading_run(p.held), -sum(p.held)))


def leading_run(flags: Sequence[bool]) -> int:
    """How many flags are True before the first False."""
    for i, flag in enumerate(flags):
        if not flag:
            return i
    return len(flags)
