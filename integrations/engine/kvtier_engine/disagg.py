"""Disaggregated prefill in the bundled engine (`kvtier_engine serve --kv-role prefill|decode|both`).

A request's `kv_transfer_params` (vLLM's name and shape) say what it wants of this instance:

- `{"do_remote_decode": true}` (roles prefill, both): run it to its first token, save its whole
  prompt's KV and hold it for a decode instance (kvtier.connector.handoffs). Its last output waits
  here until every save of it is stored (the worker reports it on its saver thread: `stored`, which
  hands it straight to the server's `sink`; else the next step's end), at most STORE_WAIT_S, and
  carries the parameters the decode instance needs (`RequestOutput.kv_transfer_params`; None if
  they could not be made, or the wait ran out: decode colocated then).
- `{"do_remote_prefill": true, "remote_p2p_url", "namespace", "num_tokens", ...}` (roles decode,
  both): the prompt's chunks are read from that prefill instance over P2P (CacheEngine.
  expect_from_peer: the P2P directory's hints), by the connector's asynchronous load: the request
  waits for its KV outside the batch and continues from the first token. Only a URL given by
  `--kv-peer` is accepted (a client must not make this instance connect, with its P2P token,
  wherever it likes), and only KV of this instance's namespace (same model, weights, dtype, chunk
  size). A transfer that fails part-way leaves a short load: the rest is recomputed here.

Roles other than `both` need a kvtier config with a `p2p:` section and `save_partial_chunks: true`
(the prompt's partial last chunk moves too, and both sides must key chunks alike).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pydantic import TypeAdapter

from kvtier.config import KvtierConfig
from kvtier.errors import ConfigError
from kvtier.fleet.messages import PeerUrl

if TYPE_CHECKING:
    from kvtier.engine import CacheEngine
    from kvtier_engine.llm_engine import RequestOutput

logger = logging.getLogger(__name__)

KV_ROLES = ("prefill", "decode", "both")
STORE_WAIT_S = 30.0  # a prefill's last output waits at most this long for its KV to be stored
PEER_HINT_S = 60.0  # how long a decode reads a prompt's chunks from the prefill instance named
MAX_PARAMS_KEYS = 32  # a kv_transfer_params object larger than this is refused
_PEER_URL = TypeAdapter(PeerUrl)


def check_role(role: str, config: KvtierConfig | None) -> None:
    """ConfigError unless `config` can do what `role` needs (see the module docstring)."""
    if role not in KV_ROLES:
        raise ConfigError(f"--kv-role must be one of {', '.join(KV_ROLES)}, got {role!r}")
    if role == "both":
        return
    if config is None or config.p2p is None:
        raise ConfigError(f"--kv-role {role} needs a kvtier config with a p2p: section (the KV moves "
                          "between instances over P2P)")
    if not config.save_partial_chunks:
        raise ConfigError(f"--kv-role {role} needs save_partial_chunks: true in {config.source} (a "
                          "prompt's partial last chunk moves too)")


def peer_url(url: object) -> str:
    """A kvtier://host:port URL, checked; ValueError naming it otherwise."""
    try:
        return str(_PEER_URL.validate_python(url))
    except ValueError:
        raise ValueError(f"{str(url)[:100]!r} is not a kvtier://host:port URL") from None


class Disaggregation:
    def __init__(self, role: str, peers: Sequence[str], kvtier: CacheEngine | None):
        check_role(role, None if kvtier is None else kvtier.config)
        self.role, self.kvtier = role, kvtier
        try:
            self.peers = frozenset(peer_url(p) for p in peers)
        except ValueError as exc:
            raise ConfigError(f"--kv-peer: {exc}") from None
        self._awaiting: dict[str, tuple[float, RequestOutput]] = {}  # id -> (give up at, last output)
        self._lock = threading.Lock()  # `stored` runs on the saver thread, the rest on the engine's
        # Where `stored` hands a held output at once (the serving loop's delivery); None: `ready` does,
        # at the end of the engine's next step, which may be seconds away while a long prompt runs.
        self.sink: Callable[[RequestOutput], None] | None = None

    def admit(self, token_ids: list[int], params: object) -> dict | None:
        """The `kv_transfer_params` of a new request with prompt `token_ids`, checked (ValueError: a
        400), for the request to carry; a decode's prompt chunks are pointed at its prefill instance."""
        if params is None:
            return None
        if not isinstance(params, dict) or len(params) > MAX_PARAMS_KEYS:
            raise ValueError("kv_transfer_params must be an object of at most "
                             f"{MAX_PARAMS_KEYS} fields")
        if params.get("do_remote_decode") is True:
            if self.role == "decode":
                raise ValueError("this instance only decodes (--kv-role decode): do_remote_decode is refused")
            if self.kvtier is None or self.kvtier.p2p_url is None:
                raise ValueError("do_remote_decode needs kvtier with a p2p: section on this instance")
            return {"do_remote_decode": True}
        if params.get("do_remote_prefill") is True:
            return self._expect(token_ids, params)
        return None  # nothing asked of kvtier (vLLM's other fields travel through untouched)

    def _expect(self, token_ids: list[int], params: dict) -> dict:
        if self.role == "prefill":
            raise ValueError("this instance only prefills (--kv-role prefill): do_remote_prefill is refused")
        if self.kvtier is None or self.kvtier.config.p2p is None:
            raise ValueError("do_remote_prefill needs kvtier with a p2p: section on this instance")
        url = peer_url(params.get("remote_p2p_url"))
        if url not in self.peers:
            raise ValueError(f"remote_p2p_url {url} is not one of this instance's --kv-peer URLs")
        if params.get("namespace") != self.kvtier.db.namespace_digest.hex():
            raise ValueError("kv_transfer_params.namespace is not this instance's: the prefill instance "
                             "runs another model, weights, dtype or chunk size")
        num_tokens = params.get("num_tokens")
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or not 0 < num_tokens <= len(
                token_ids):
            raise ValueError(f"kv_transfer_params.num_tokens must be in [1, {len(token_ids)}]")
        self.kvtier.expect_from_peer(token_ids[:num_tokens], url, PEER_HINT_S)
        return {"do_remote_prefill": True, "remote_p2p_url": url, "num_tokens": num_tokens}

    # -- a prefill's last output waits for its KV ----------------------------------------------

    @property
    def waiting(self) -> bool:
        return bool(self._awaiting)

    def stored(self, request_id: str) -> None:
        """On the saver thread: `request_id`'s KV is stored. With a `sink`, its held output goes out
        now, not after the step the engine is running."""
        if self.sink is None:
            return
        with self._lock:
            entry = self._awaiting.pop(request_id, None)
        if entry is not None:
            self.sink(entry[1])

    def hold_back(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """`outputs` less the last ones of requests whose KV is going to a decode instance (kept
        until `ready` says their KV is stored)."""
        kept = []
        for out in outputs:
            if out.finished and out.kv_transfer_params is not None:
                with self._lock:
                    self._awaiting[out.request_id] = (time.monotonic() + STORE_WAIT_S, out)
            else:
                kept.append(out)
        return kept

    def ready(self, stored: set[str]) -> list[RequestOutput]:
        """The held outputs whose KV is stored (`stored`: the worker's `pop_kv_stored`), and those
        past STORE_WAIT_S without their parameters (the decode instance computes the prompt)."""
        now, out = time.monotonic(), []
        with self._lock:
            for request_id, (give_up_at, output) in list(self._awaiting.items()):
                if request_id in stored:
                    out.append(output)
                elif give_up_at <= now:
                    logger.warning("request %s: its KV was not stored within %g s; answered without "
                                   "kv_transfer_params", request_id, STORE_WAIT_S)
                    out.append(dataclasses.replace(output, kv_transfer_params=None))
                else:
                    continue
                del self._awaiting[request_id]
        return out

    def drop(self, request_id: str) -> None:
        """The client went away: its held output is not delivered (the KV's lease runs out)."""
        with self._lock:
            self._awaiting.pop(request_id, None)
