"""Sending a `Command` to instances: `POST {command_url}/v1/command` with the instance's own
command token, to every target at once, answered within one deadline.

Where it runs: the controller's request handlers, on the event loop. `CommandSender.send` hands each
target to a bounded thread pool (one JsonClient per call: commands are rare, a connection per call is
simpler than a pool of idle ones) and waits for all of them until `timeout_s` from its start; so a
request never waits longer than the deadline, whatever the instances do. At the deadline a call
still queued is cancelled and one still running has its socket shut down (`JsonClient.abort`): an
instance that trickles its answer a byte at a time, each byte inside the socket timeout, cannot keep
a worker past the deadline (16 such instances would otherwise stop every command of the fleet).
The command token is never logged nor put in an error.

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
        calls = [_Call(target, self.timeout_s) for target in targets]
        futures = [self._pool.submit(call.run) for call in calls]
        waiting = [asyncio.wrap_future(future) for future in futures]
        if waiting:
            await asyncio.wait(waiting, timeout=self.timeout_s)
        for late in waiting:
            # Cancelled, the loop's copy of a call that ends after the deadline (aborted below)
            # takes no result: no "exception was never retrieved" for a 504 already answered.
            late.cancel()
        replies = []
        for call, future in zip(calls, futures):
            try:
                replies.append(call.outcome(future))
            except CommandFailed as exc:
                if not (refusal_is_zero and exc.status == 400):
                    raise
                replies.append(CommandReply(chunks=0))
        return replies

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Call:
    """One command to one instance: `run` in a worker thread, `outcome` at the deadline."""

    def __init__(self, target: CommandTarget, timeout_s: float):
        self.target, self.timeout_s = target, timeout_s
        registration = target.instance.registration
        try:
            self.client: JsonClient | None = JsonClient(registration.command_url, registration.command_token,
                                                        timeout_s, MAX_REPLY_BYTES)
        except ValueError as exc:  # a URL registered before messages checked it (an older Redis record)
            self.client, self.bad_url = None, str(exc)

    def run(self) -> CommandReply:
        name = self.target.instance.instance_id
        if self.client is None:
            raise CommandFailed(502, f"instance {name} has an unusable command address: {self.bad_url}")
        return _send_one(self.target, self.client)

    def outcome(self, future: Future) -> CommandReply:
        if not future.done():
            future.cancel()  # still queued: it never runs
            if self.client is not None:
                self.client.abort()  # running: its thread gets Unreachable now, not when the peer stops
            raise CommandFailed(504, f"instance {self.target.instance.instance_id} did not answer the "
                                     f"{self.target.command.op} command within {self.timeout_s:g} s")
        return future.result()


def _send_one(target: CommandTarget, client: JsonClient) -> CommandReply:
    name, op = target.instance.instance_id, target.command.op
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
