"""Sending a `Command` to instances: `POST {command_url}/v1/command` with the instance's own
command token, to every target at once, answered within one deadline.

Where it runs: the controller's request handlers, on the event loop. `CommandSender.send` hands each
target to a bounded thread pool (one JsonClient per call: commands are rare, a connection per call is
simpler than a pool of idle ones) and waits for all of them until `timeout_s` from its start; so a
request never waits longer than the deadline, whatever the instances do. A call still running at
the deadline is left to finish in its thread (its socket timeout is the same deadline); one still
queued is cancelled. The command token is never logged nor put in an error.

Outcomes, as `CommandFailed(status, detail)` naming the instance: no connection or a broken answer
-> 502; no answer within the deadline -> 504; the instance's own 4xx (a bad tier) -> 400 with its
detail; its 5xx or an auth refusal (our token is wrong: a controller-side fault) -> 502.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from kvtier.controller.state import InstanceRecord
from kvtier.errors import KvtierError
from kvtier.fleet.http_client import HttpError, JsonClient, Unreachable
from kvtier.fleet.messages import Command, CommandReply

logger = logging.getLogger(__name__)

MAX_WORKERS = 16  # instances commanded at once, over all requests
# A CommandReply is a count and at most 16 tiers' usage (~2 KB): a larger answer is refused unread,
# so an instance (or whoever took over its id) cannot make the controller hold megabytes per call.
MAX_REPLY_BYTES = 1 << 20


class CommandFailed(KvtierError):
    """An instance did not carry out a command; `status` is what the controller answers."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True, slots=True)
class CommandTarget:
    instance: InstanceRecord
    command: Command


class CommandSender:
    def __init__(self, timeout_s: float, max_workers: int = MAX_WORKERS):
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="kvtier-command")

    async def send(self, targets: list[CommandTarget], refusal_is_zero: bool = False) -> list[CommandReply]:
        """The replies in target order; the first failure (in target order) raises CommandFailed.
        `refusal_is_zero` (a request to every instance): an instance's refusal (its 4xx: a
        kvtier_server cannot pin) is its answer of 0 chunks, not a failure of the whole request.

        Awaited on the event loop, not in a request thread: requests waiting on slow instances hold
        no thread of FastAPI's pool, which the agents' heartbeats need."""
        futures = [self._pool.submit(_send_one, target, self.timeout_s) for target in targets]
        if futures:
            await asyncio.wait([asyncio.wrap_future(future) for future in futures], timeout=self.timeout_s)
        replies = []
        for target, future in zip(targets, futures):
            try:
                replies.append(_outcome(target, future, self.timeout_s))
            except CommandFailed as exc:
                if not (refusal_is_zero and exc.status == 400):
                    raise
                replies.append(CommandReply(chunks=0))
        return replies

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _outcome(target: CommandTarget, future: Future, timeout_s: float) -> CommandReply:
    name = target.instance.instance_id
    if not future.done():
        future.cancel()  # still queued: it never runs; running: it ends at its socket timeout
        raise CommandFailed(504, f"instance {name} did not answer the {target.command.op} "
                                 f"command within {timeout_s:g} s")
    return future.result()


def _send_one(target: CommandTarget, timeout_s: float) -> CommandReply:
    registration = target.instance.registration
    name, op = registration.instance_id, target.command.op
    try:
        client = JsonClient(registration.command_url, registration.command_token, timeout_s, MAX_REPLY_BYTES)
    except ValueError as exc:  # a URL registered before messages checked it (an older Redis record)
        raise CommandFailed(502, f"instance {name} has an unusable command address: {exc}") from exc
    try:
        reply = client.post("/v1/command", target.command)
        return CommandReply.model_validate(reply)
    except Unreachable as exc:
        status = 504 if isinstance(exc.__cause__, TimeoutError) else 502
        verb = "did not answer" if status == 504 else "is unreachable"
        logger.warning("%s command to instance %s: %s", op, name, exc)
        raise CommandFailed(status, f"instance {name} {verb} ({op} command): {exc}") from exc
    except HttpError as exc:
        status = 400 if 400 <= exc.status < 500 and exc.status not in (401, 403) else 502
        raise CommandFailed(status, f"instance {name} refused the {op} command: {exc.detail}") from exc
    except ValueError as exc:  # pydantic's ValidationError: an answer that is not a CommandReply
        raise CommandFailed(502, f"instance {name} sent a malformed reply to the {op} command") from exc
    finally:
        client.close()
