"""The controller's side of the agents' channel (kvtier.fleet.agent is the other side):

    POST /v1/instances/register               Registration -> RegisterReply (the session to echo)
    POST /v1/instances/{instance_id}/heartbeat  Heartbeat  -> HeartbeatReply (known=False: register)
    POST /v1/instances/{instance_id}/events     EventBatch -> EventsReply (resync on a seq gap)
    POST /v1/peers                            PeersRequest -> PeersReply (who holds keys, for P2P)

An unknown id or session is not an error here (the state answers known=False and the agent
re-registers): 404 is for people. /v1/peers is an instance's question too (its P2P tier asks which
peer holds the chunks it misses: kvtier.controller.fleet_lookup.peers); its keys are bounded by
MAX_PEER_KEYS (more: 422), its answer by fleet_lookup.MAX_PEERS engines. Handlers are plain
`def`: the state may wait on Redis, and an event batch of 64K keys is parsed in FastAPI's thread
pool, not on the event loop.

Trust: whoever holds the controller token may register any id, and a registration replaces the one
before it (a restarted instance comes back under its configured id, with a new command token and
maybe a new address, before its old self has timed out). So a token holder can take over another
instance's id and receive its commands; it never learns the old command token. Such a takeover of an
instance that is up, from another address, is logged (ids and addresses, never tokens). A new id
beyond `max_instances` registered ones (down ones count until forgotten) is refused with 429, so a
token holder, or an instance restarting in a loop under `<host>-<pid>` ids, cannot grow the
registry (and every lookup's walk over it) without bound.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path

from kvtier.controller import fleet_lookup
from kvtier.controller.errors import error_responses
from kvtier.controller.state import FleetState, UnknownInstance
from kvtier.fleet.messages import (
    EventBatch,
    EventsReply,
    Heartbeat,
    HeartbeatReply,
    PeersReply,
    PeersRequest,
    RegisterReply,
    Registration,
)

logger = logging.getLogger(__name__)

InstancePath = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


def agent_router(state: FleetState, heartbeat_timeout_s: float, clock: Callable[[], float],
                 max_instances: int) -> APIRouter:
    router = APIRouter(responses=error_responses(400, 422, 503))

    @router.post("/v1/instances/register", response_model=RegisterReply,
                 responses=error_responses(429))
    def register(registration: Registration) -> RegisterReply:
        now = clock()
        if not _known(state, registration, now) and len(state.instances(now)) >= max_instances:
            raise HTTPException(429, f"{max_instances} instances are registered already (max_instances); "
                                     f"{registration.instance_id} is refused")
        state.register(registration, now)
        return RegisterReply(heartbeat_timeout_s=heartbeat_timeout_s, session=state.session)

    @router.post("/v1/instances/{instance_id}/heartbeat", response_model=HeartbeatReply)
    def heartbeat(instance_id: InstancePath, beat: Heartbeat) -> HeartbeatReply:
        return HeartbeatReply(known=state.heartbeat(instance_id, beat.session, list(beat.tiers), clock()))

    @router.post("/v1/instances/{instance_id}/events", response_model=EventsReply)
    def events(instance_id: InstancePath, batch: EventBatch) -> EventsReply:
        return state.apply(instance_id, batch.session, batch.seq, list(batch.events), clock())

    @router.post("/v1/peers", response_model=PeersReply)
    def peers(request: PeersRequest) -> PeersReply:
        keys = [bytes.fromhex(key) for key in request.keys]
        return fleet_lookup.peers(state, keys, request.exclude, clock())

    return router


def _known(state: FleetState, registration: Registration, now: float) -> bool:
    """Whether the id is registered; a takeover of an instance that is up is logged."""
    try:
        old = state.instance(registration.instance_id, now)
    except UnknownInstance:
        return False
    if old.up and old.registration.command_url != registration.command_url:
        logger.warning("instance %s re-registered from %s while up at %s: it now gets the commands",
                       registration.instance_id, registration.command_url, old.registration.command_url)
    return True
