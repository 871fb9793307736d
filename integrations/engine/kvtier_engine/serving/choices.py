"""One HTTP call, several engine requests: a batch of prompts, `n` choices of each.

    streams = submit_choices(engine_loop, prompts, params, n, head.id)   # choice i = streams[i]
    outputs = await all_finished(streams)                               # or, streaming:
    async with contextlib.aclosing(merged(streams, firsts)) as events:
        async for index, output in events: ...

Choice `p * n + i` is prompt `p`'s `i`-th; under a `seed`, choice `i` of a prompt samples from
`seed + i`, so the choices differ and each is still reproducible. A single choice keeps the call's
own id as its request id.

Where it runs: the server's event loop. Every helper leaves no task behind: a failure (RequestFailed)
or a cancellation cancels the waits still pending; aborting the requests is the caller's
(`abort_all`), as it is for a single one.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence

from kvtier_engine.llm_engine import RequestOutput
from kvtier_engine.sampling import SEED_MAX, SamplingParams
from kvtier_engine.serving.engine_loop import EngineLoop, RequestStream


def submit_choices(engine_loop: EngineLoop, prompts: Sequence[list[int]], params: SamplingParams, n: int,
                   request_id: str, kv_transfer_params: dict | None = None) -> list[RequestStream]:
    """Submit every choice; if one is refused (EngineUnavailable), those already in are aborted.
    `kv_transfer_params` only for a single choice (the parsers see to it)."""
    streams: list[RequestStream] = []
    several = len(prompts) * n > 1
    try:
        for prompt in prompts:
            for i in range(n):
                choice_id = f"{request_id}-{len(streams)}" if several else request_id
                streams.append(engine_loop.submit(prompt, _choice_params(params, i), choice_id,
                                                  kv_transfer_params))
    except BaseException:
        abort_all(streams)
        raise
    return streams


def abort_all(streams: Sequence[RequestStream]) -> None:
    for stream in streams:
        stream.abort()  # a no-op for one that is done


async def first_outputs(streams: Sequence[RequestStream]) -> list[RequestOutput]:
    """Each choice's first output (a stream waits for them all before answering)."""
    return await _every([stream.next() for stream in streams])


async def all_finished(streams: Sequence[RequestStream]) -> list[RequestOutput]:
    """Each choice's final output."""
    return await _every([_until_finished(stream) for stream in streams])


async def merged(streams: Sequence[RequestStream],
                 firsts: Sequence[RequestOutput]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) as the outputs come, `firsts` first; each choice's in order. Close it
    (`contextlib.aclosing`) so that a consumer who stops early leaves no wait behind."""
    pending: dict[asyncio.Future[RequestOutput], int] = {}
    try:
        for index, first in enumerate(firsts):
            yield index, first
            if not first.finished:
                pending[asyncio.ensure_future(streams[index].next())] = index
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = pending.pop(task)
                output = task.result()  # RequestFailed ends the merge
                yield index, output
                if not output.finished:
                    pending[asyncio.ensure_future(streams[index].next())] = index
    finally:
        for task in pending:
            task.cancel()


async def _until_finished(stream: RequestStream) -> RequestOutput:
    while not (output := await stream.next()).finished:
        pass
    return output


async def _every(works: list) -> list[RequestOutput]:
    """Every result in order; the first failure (or a cancellation) cancels the rest."""
    tasks = [asyncio.ensure_future(work) for work in works]
    try:
        return [await task for task in tasks]
    finally:
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # marks a later failure seen: the first one is the answer
            task.cancel()  # a no-op for those done


def _choice_params(params: SamplingParams, i: int) -> SamplingParams:
    if i == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + i) % (SEED_MAX + 1))
