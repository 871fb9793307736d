"""The decode instance that already holds a request's prompt, as the kvtier controller says
(`POST /v1/route`): `kvtier_engine proxy --controller URL`.

Per request that can be split (`proxy_flow.Router.dispatch`), `PrefixRouter.best(path, body)`:
  1. the prompt's token ids: the body's own (`prompt` as ids), else `POST /tokenize` on a decode
     instance with the body's `prompt` or `messages` (the ids its completion routes would run);
  2. `POST {controller}/v1/route {"model_id", "tokens"}` with the controller's bearer token
     (KVTIER_CONTROLLER_TOKEN): the model's engines that are up, longest cached prefix first;
  3. of the --decode instances it names (ids from their cards: `proxy_instances.py`), those with the
     longest hit above 0 make a `PrefixHit`. The router leases the least loaded of them, and skips the
     prefill when the hit covers the prompt but for its last CACHED_TAIL_TOKENS (`PrefixHit.whole`).
None means "choose by load": nothing to look up, no instance mapped, no hit, or a failure.

Failures never reach the client. A tokenize or controller call that fails, times out (each within
min(--timeout, CALL_TIMEOUT_S)) or answers garbage is logged (once a minute per kind: LogLimiter)
and the request is routed by load. A controller that fails is skipped for a while
(kvtier.tiers.backoff: BACKOFF_S doubling to BACKOFF_MAX_S, one probe per period), so a dead or hung
controller costs one timeout per period, not one per request; one that refuses the token (401, 403)
or is no controller (404, 405) is skipped for BACKOFF_MAX_S at a time, with an error saying what to
fix.

Runs on the proxy's event loop (Backoff's lock is never contended there).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from kvtier.config_values import require_token_beyond_loopback
from kvtier.errors import ConfigError
from kvtier.fleet.messages import MAX_TOKENS, RouteReply
from kvtier.log_limit import LogLimiter
from kvtier.tiers.backoff import Backoff
from kvtier_engine.serving.proxy_backends import Backend, BackendAddress
from kvtier_engine.serving.proxy_bodies import prompt_query
from kvtier_engine.serving.proxy_instances import DecodeInstances, InstanceMap
from kvtier_engine.serving.proxy_upstream import UpstreamError, fetch_json

logger = logging.getLogger(__name__)

TOKEN_ENV = "KVTIER_CONTROLLER_TOKEN"  # as the `kvtier` CLI's: never on a command line
ROUTE_PATH, TOKENIZE_PATH = "/v1/route", "/tokenize"
CALL_TIMEOUT_S = 2.0  # each lookup call: a lookup that is slower than this saves nothing
BACKOFF_S, BACKOFF_MAX_S = 1.0, 30.0
# kvtier's default chunk size. A prompt cached in whole chunks (no save_partial_chunks) still misses
# its partial last chunk; computing that on the decode instance costs less than a prefill round trip.
CACHED_TAIL_TOKENS = 256
# A /tokenize reply of the controller's MAX_TOKENS ids (1M, up to ~8 bytes each in JSON), and a route
# reply naming a few thousand instances.
MAX_TOKENS_REPLY_BYTES = 16 << 20
MAX_ROUTE_REPLY_BYTES = 4 << 20
# A wrong token, or a URL that is no controller: no quick retry fixes these.
_MISCONFIGURED = frozenset({401, 403, 404, 405})


@dataclass(frozen=True, slots=True)
class ControllerLink:
    address: BackendAddress
    token: str | None = field(default=None, repr=False)


def controller_link(address: BackendAddress, env: Mapping[str, str]) -> ControllerLink:
    """The controller at `address`, with its token from TOKEN_ENV in `env`. ConfigError when there is
    no token and the controller is not on this machine (fail closed, as the controller does: prompts'
    ids would travel unauthenticated), or when the token is not one word of printable ASCII."""
    token = env.get(TOKEN_ENV, "").strip() or None
    if token is not None and not all(" " < c <= "~" for c in token):  # the message never shows it
        raise ConfigError(f"{TOKEN_ENV} must be one word of printable ASCII")
    require_token_beyond_loopback(address.host, token, f"set {TOKEN_ENV} to the controller's token")
    return ControllerLink(address, token)


@dataclass(frozen=True, slots=True)
class PrefixHit:
    backends: tuple[Backend, ...]  # the --decode instances holding the longest cached prefix
    hit_tokens: int
    num_tokens: int

    @property
    def whole(self) -> bool:
        """The hit covers the prompt but for a tail the decode instance computes itself: no prefill."""
        return self.hit_tokens >= self.num_tokens - CACHED_TAIL_TOKENS


class PrefixRouter:
    def __init__(self, link: ControllerLink, decode: Sequence[Backend], timeout_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.link = link
        self.call_s = min(timeout_s, CALL_TIMEOUT_S)
        self.instances = DecodeInstances(decode, self.call_s, clock)
        self.backoff = Backoff(BACKOFF_S, BACKOFF_MAX_S, clock)
        self._auth = (("Authorization", f"Bearer {link.token}"),) if link.token else ()
        self._log = LogLimiter(logger)
        self._turn = 0  # round robin over the instances that tokenize

    async def best(self, path: str, body: dict[str, Any]) -> PrefixHit | None:
        """The decode instances to prefer for this request; None to choose by load. Never raises
        (but CancelledError, when the client left)."""
        query = prompt_query(body, path)
        if query is None or not self.backoff.ready():
            return None
        instances = await self.instances.current()
        if not instances.by_id:
            self.instances.refresh_soon()
            return None
        try:
            tokens = query if isinstance(query, list) else await self._tokenize(instances, query)
        except UpstreamError as exc:
            self._log.warning("tokenize", "tokenizing on decode %s failed (%s); choosing by load",
                              exc.url, exc.reason)
            return None
        if len(tokens) > MAX_TOKENS:  # the controller refuses more
            return None
        reply = await self._route(instances.model_id, tokens)
        return self._pick(reply, instances, len(tokens)) if reply is not None else None

    def snapshot(self) -> dict[str, Any]:
        return {"url": self.link.address.url, "backing_off": self.backoff.down,
                "decode_ids": self.instances.snapshot()}

    async def _tokenize(self, instances: InstanceMap, query: dict[str, Any]) -> list[int]:
        backend = instances.tokenizers[self._turn % len(instances.tokenizers)]
        self._turn += 1
        reply = await fetch_json(backend.address, "POST", TOKENIZE_PATH, query, self.call_s,
                                 MAX_TOKENS_REPLY_BYTES)
        tokens = reply.get("tokens") if isinstance(reply, dict) else None
        if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < 1 << 32 for t in tokens):
            raise UpstreamError(backend.url, "the /tokenize reply has no list of token ids")
        return tokens

    async def _route(self, model_id: str | None, tokens: list[int]) -> RouteReply | None:
        """The controller's answer; None when there is none to use (logged, and backed off from)."""
        url = self.link.address.url
        try:
            raw = await fetch_json(self.link.address, "POST", ROUTE_PATH,
                                   {"model_id": model_id, "tokens": tokens}, self.call_s,
                                   MAX_ROUTE_REPLY_BYTES, self._auth)
            reply = RouteReply.model_validate(raw)
        except UpstreamError as exc:
            self._failed(exc.status, exc.reason)
            return None
        except ValidationError as exc:
            self._failed(None, f"not a route reply: {exc.errors()[0]['msg']}")
            return None
        if self.backoff.succeeded():
            logger.info("controller %s answers again: choosing decode instances by cached prefix", url)
        return reply

    def _failed(self, status: int | None, reason: str) -> None:
        url = self.link.address.url
        if status in _MISCONFIGURED:
            if self.backoff.hold():
                logger.error("controller %s refused /v1/route (%s): check --controller and %s; choosing "
                             "by load, asking again every %.0f s", url, reason, TOKEN_ENV, BACKOFF_MAX_S)
        elif status is not None and status < 500:  # this request's own fault: the controller is fine
            self.backoff.succeeded()
            self._log.warning("route-refused", "controller %s refused a route: %s", url, reason)
        elif self.backoff.failed():
            logger.warning("controller %s failed (%s); choosing decode instances by load until it "
                           "answers again", url, reason)

    def _pick(self, reply: RouteReply, instances: InstanceMap, num_tokens: int) -> PrefixHit | None:
        best, chosen, unknown_above = 0, [], False
        for entry in reply.instances:  # longest hit first
            backend = instances.by_id.get(entry.instance_id)
            if backend is None:
                unknown_above |= entry.hit_tokens > best
            elif entry.hit_tokens > best:
                best, chosen = entry.hit_tokens, [backend]
            elif entry.hit_tokens == best > 0:
                chosen.append(backend)
        if unknown_above:  # perhaps one of ours restarted under a new id
            self.instances.refresh_soon()
        return PrefixHit(tuple(chosen), best, num_tokens) if chosen else None
