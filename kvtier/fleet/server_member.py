"""kvtier_server as a fleet member (`kvtier.fleet.member.FleetMember`): its record store's tiers,
"memory" and (with a spill) "spill", reported to kvtier_controller.

A server holds records of many engines and namespaces (each key carries its own), so it registers
with no model or namespace, and the controller finds it through the keys it reports. It takes two
commands: clear (one tier or both, every namespace) and stats; pin and move are an engine's (a
server pins nothing and has one tier order), and so are compress and decompress (it stores records
as engines wrote them and never decodes one): ValueError, which the command server answers 400.

Where it runs: the store belongs to the server's event-loop thread (nothing in it locks), while the
agent calls `tier_usage` / `key_snapshot` / `set_key_listener` from its thread and the command
server calls `run` from its own. So every call hops onto the loop (`call_soon_threadsafe`) and waits
for the answer, at most LOOP_WAIT_S; the key listener is called on the loop thread, by the store.
The loop must not block on the agent in turn: kvtier_server starts and stops the agent in a worker
thread (`asyncio.to_thread`). No torch here (kvtier_server never imports it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from kvtier.fleet.description import MemberDescription
from kvtier.fleet.member import KeyListener
from kvtier.fleet.messages import Command, CommandReply, TierUsage

if TYPE_CHECKING:
    from kvtier.server.store import RecordStore

T = TypeVar("T")

# How long a call waits for the loop; a loop stuck this long (a hung spill disk) fails the command
# (the controller answers it 5xx) rather than holding a command server thread.
LOOP_WAIT_S = 10.0


class ServerMember:
    def __init__(self, store: RecordStore, loop: asyncio.AbstractEventLoop):
        self.store = store
        self.loop = loop

    def describe(self) -> MemberDescription:
        # chunk_size 1: a server does not chunk (the registration requires a positive one).
        return MemberDescription("server", None, None, 1)

    def tier_usage(self) -> list[TierUsage]:
        return self._on_loop(self._usage)

    def key_snapshot(self) -> dict[str, list[bytes]]:
        return self._on_loop(self.store.key_snapshot)

    def set_key_listener(self, listener: KeyListener | None) -> None:
        self._on_loop(lambda: self.store.set_key_listener(listener))  # type: ignore[arg-type]

    def run(self, command: Command) -> CommandReply:
        if command.op in ("compress", "decompress"):
            raise ValueError(f"a kvtier_server cannot {command.op}: it stores records as the engines "
                             f"wrote them and never decodes one (compress in the engine's own tier)")
        if command.op not in ("clear", "stats"):
            raise ValueError(f"a kvtier_server cannot {command.op}: it holds many engines' records "
                             f"(clear and stats only)")
        return self._on_loop(lambda: self._run(command))

    # -- on the loop thread --------------------------------------------------------------------

    def _run(self, command: Command) -> CommandReply:
        chunks = self.store.clear_tier(command.tier) if command.op == "clear" else 0
        return CommandReply(chunks=chunks, tiers=self._usage())

    def _usage(self) -> list[TierUsage]:
        return [TierUsage(name=name, chunks=records, bytes_used=used, capacity_bytes=capacity)
                for name, (records, used, capacity) in self.store.usage().items()]

    def _on_loop(self, call: Callable[[], T]) -> T:
        """`call()` on the loop thread, its result or exception here. Called on the loop thread
        itself, or once the loop is closed (nothing else touches the store then), it runs at once."""
        if self.loop.is_closed() or _running_loop() is self.loop:
            return call()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(call())
                except BaseException as exc:  # handed to the waiting thread, which raises it
                    future.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        try:
            return future.result(LOOP_WAIT_S)
        except concurrent.futures.TimeoutError:
            future.cancel()  # not run later, when nobody waits for it any more
            raise TimeoutError(f"kvtier_server's event loop did not answer within {LOOP_WAIT_S} s") from None


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
