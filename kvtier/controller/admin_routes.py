"""Pin, unpin, move, compress, decompress and clear over the fleet: each request becomes one
`Command` per target instance, sent to all of them at once (kvtier.controller.commands), and the
chunks each one acted on.

    POST /v1/pin, /v1/unpin   AdminRequest -> AdminReply   the prompt's leading chunks on each target
    POST /v1/move             MoveRequest  -> AdminReply   to another tier of one instance (copy: keep)
    POST /v1/compress         CompressRequest -> AdminReply    recode them with a codec in one tier
                                                           below host memory of one instance
    POST /v1/decompress       DecompressRequest -> AdminReply  recode them raw (one tier, or all below)
    POST /v1/clear            ClearRequest -> AdminReply   one tier or all, of one instance or all up

Targets: `instance_id` given -> that instance only (404 unknown, 409 down; its refusal is a 400);
else every instance of the model that is up (clear: every instance that is up and has the tier),
where an instance's refusal (a kvtier_server cannot pin) is its 0 chunks, not a failed request.
Each target gets the prompt's keys in its own namespace and chunk size (`fleet_lookup.targets`),
never a default. An instance that is unreachable or silent fails the request (502, 504).

The targets are found in FastAPI's thread pool (the state may wait on Redis); the commands are then
awaited on the event loop (up to the deadline), holding no thread.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from kvtier.controller import fleet_lookup
from kvtier.controller.commands import CommandSender, CommandTarget
from kvtier.controller.errors import InstanceDown, error_responses
from kvtier.controller.state import FleetState, InstanceRecord
from kvtier.fleet.messages import (
    AdminReply,
    AdminRequest,
    ClearRequest,
    Command,
    CompressRequest,
    DecompressRequest,
    InstanceResult,
    MoveRequest,
)

PromptAdmin = AdminRequest | MoveRequest | CompressRequest | DecompressRequest
AnyRequest = PromptAdmin | ClearRequest


def admin_router(state: FleetState, sender: CommandSender, clock: Callable[[], float]) -> APIRouter:
    router = APIRouter(responses=error_responses(400, 404, 409, 422, 502, 503, 504))

    async def run(find: Callable[..., list[CommandTarget]], request: AnyRequest, *args: object,
                  **fields: object) -> AdminReply:
        targets = await run_in_threadpool(find, request, *args, **fields)
        replies = await sender.send(targets, refusal_is_zero=request.instance_id is None)
        return AdminReply(results=[InstanceResult(instance_id=t.instance.instance_id, chunks=r.chunks)
                                   for t, r in zip(targets, replies)])

    def prompt_targets(request: PromptAdmin, op: str, **fields: object) -> list[CommandTarget]:
        now = clock()
        if request.instance_id is not None:
            _require_up(state.instance(request.instance_id, now), now)
        found = fleet_lookup.targets(state, request.model_id, request.tokens, request.instance_id, now)
        return [CommandTarget(record, Command(op=op, keys=[key.hex() for key in keys],
                                              num_tokens=len(request.tokens), **fields))
                for record, keys in found]

    def clear_targets(request: ClearRequest) -> list[CommandTarget]:
        now = clock()
        if request.instance_id is not None:
            records = [_require_up(state.instance(request.instance_id, now), now)]
        else:  # those that have the tier: a kvtier_server has no "cpu"
            records = [record for record in state.instances(now)
                       if record.up and (request.tier is None or request.tier in record.tier_names())]
        return [CommandTarget(record, Command(op="clear", tier=request.tier)) for record in records]

    @router.post("/v1/pin", response_model=AdminReply)
    async def pin(request: AdminRequest) -> AdminReply:
        return await run(prompt_targets, request, "pin")

    @router.post("/v1/unpin", response_model=AdminReply)
    async def unpin(request: AdminRequest) -> AdminReply:
        return await run(prompt_targets, request, "unpin")

    @router.post("/v1/move", response_model=AdminReply)
    async def move(request: MoveRequest) -> AdminReply:
        return await run(prompt_targets, request, "move", tier=request.to, copy=request.copy_)

    _recode_routes(router, run, prompt_targets)

    @router.post("/v1/clear", response_model=AdminReply)
    async def clear(request: ClearRequest) -> AdminReply:
        return await run(clear_targets, request)

    return router


def _recode_routes(router: APIRouter, run: Callable[..., Awaitable[AdminReply]],
                   prompt_targets: Callable[..., list[CommandTarget]]) -> None:
    """/v1/compress and /v1/decompress. A recode of a long prompt may outlast the command deadline
    (a 504): the instance finishes it."""

    @router.post("/v1/compress", response_model=AdminReply)
    async def compress(request: CompressRequest) -> AdminReply:
        return await run(prompt_targets, request, "compress", tier=request.tier, codec=request.codec)

    @router.post("/v1/decompress", response_model=AdminReply)
    async def decompress(request: DecompressRequest) -> AdminReply:
        return await run(prompt_targets, request, "decompress", tier=request.tier)


def _require_up(record: InstanceRecord, now: float) -> InstanceRecord:
    if not record.up:
        raise InstanceDown(f"instance {record.instance_id} is down "
                           f"(last heartbeat {max(0.0, now - record.last_heartbeat):.0f} s ago)")
    return record
