"""EngineLoop: one thread drives an LLMEngine; asyncio request handlers talk to it through queues.

Where it runs: `submit` is called on the server's event loop (outputs are delivered back onto the loop
it is called from); `abort`, `alive` and `close` from any thread. Everything that touches the engine
runs on the loop's own thread, because LLMEngine is not thread-safe.

    event loop                                   engine thread
    submit(prompt, params, id) --_Add-->  inbox  --> engine.add_request
    stream.abort()             --_Abort->        --> engine.abort
    await stream.next() <--call_soon_threadsafe--    each step's RequestOutput, or RequestFailed

The thread steps while the engine has unfinished requests and blocks on the inbox when it has none:
no polling. Lifecycle: EngineLoop(engine) -> start() -> submit()/abort() ... -> close(), which stops
the thread (failing what is still running with 503) and then closes the engine.

Failures never leave a client waiting:
- add_request rejecting a prompt (ValueError: token id out of range, too long) fails that request: 400.
- step() raising fails every request in the engine with 500 and aborts them, since a step that broke
  part-way leaves the batch's blocks and progress unknown; the loop carries on with new requests.
- If aborting does not bring the engine back to idle, or steps keep failing with no success between
  them, the engine is unusable: the loop stops, `alive` turns false (/health says 503) and every
  request still waiting, or submitted later, fails with 503.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from kvtier_engine.llm_engine import LLMEngine, RequestOutput
from kvtier_engine.sampling import SamplingParams

logger = logging.getLogger(__name__)

# Failed steps in a row, with no successful one between, after which the engine is deemed unusable
# (a broken device fails every step; one bad batch does not).
MAX_FAILED_STEPS = 3


class RequestFailed(Exception):
    """The engine could not serve a request; `status` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.message = message
        self.status = status


class EngineUnavailable(RequestFailed):
    def __init__(self, message: str = "the engine is not running"):
        super().__init__(message, 503)


Event = RequestOutput | RequestFailed
Deliver = Callable[[Event], None]


@dataclass(frozen=True, slots=True)
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    deliver: Deliver


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


class _Stop:
    pass


class _EngineBroken(Exception):
    pass


class RequestStream:
    """The event-loop side of one request: `await next()` until an output is `finished`."""

    def __init__(self, request_id: str, events: asyncio.Queue[Event], abort: Callable[[str], None]):
        self.request_id = request_id
        self.done = False  # finished, failed or aborted: nothing more will come
        self._events = events
        self._abort = abort

    async def next(self) -> RequestOutput:
        """The request's next output. Raises `RequestFailed` if the engine gave up on it."""
        event = await self._events.get()
        if isinstance(event, RequestFailed):
            self.done = True
            raise event
        self.done = event.finished
        return event

    def abort(self) -> None:
        """Stop the request (the client went away). Idempotent; a no-op once it is done."""
        if not self.done:
            self.done = True
            self._abort(self.request_id)


class EngineLoop:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.SimpleQueue[_Add | _Abort | _Stop] = queue.SimpleQueue()
        # Orders submit() against the thread's final drain: once `_accepting` is false under the lock,
        # no _Add can land in the inbox after the drain and wait forever.
        self._lock = threading.Lock()
        self._accepting = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kvtier-engine-loop", daemon=True)
        self._streams: dict[str, Deliver] = {}  # engine thread only
        self._failed_steps = 0

    @property
    def alive(self) -> bool:
        return self._accepting and self._thread.is_alive()

    def start(self) -> None:
        self._accepting = True
        self._thread.start()

    def submit(self, prompt: str | list[int], params: SamplingParams, request_id: str) -> RequestStream:
        """Queue a request; its outputs arrive on the calling event loop. Raises EngineUnavailable."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def deliver(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed: nobody is waiting any more
                pass

        with self._lock:
            if not self._accepting:
                raise EngineUnavailable()
            self._inbox.put(_Add(request_id, prompt, params, deliver))
        return RequestStream(request_id, events, self.abort)

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def prometheus_text(self) -> str:
        # Read from the caller's thread, not queued behind a step: prometheus_client's metrics and
        # kvtier's storage manager are both safe to read from any thread.
        return self.engine.prometheus_text()

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop the thread, failing unfinished requests with 503, then close the engine. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._inbox.put(_Stop())
            self._thread.join(timeout)
            if self._thread.is_alive():
                # Closing the engine under a step would be worse than leaving it to process exit.
                logger.error("engine loop did not stop within %s s; engine left open", timeout)
                return
        self.engine.close()

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        leftover: list[_Add | _Abort | _Stop] = []
        try:
            while True:
                commands = self._take_commands()
                stop = next((i for i, c in enumerate(commands) if isinstance(c, _Stop)), None)
                if stop is not None:
                    leftover = commands[stop + 1:]
                    commands = commands[:stop]
                for command in commands:
                    self._handle(command)
                if stop is not None:
                    return
                if self.engine.has_unfinished():
                    self._step()
        except Exception:
            logger.exception("engine loop stopped: the engine is unusable")
        finally:
            self._shut_down(leftover)

    def _take_commands(self) -> list[_Add | _Abort | _Stop]:
        # Block only when the engine is idle; with work pending a step is due, so just drain.
        commands = [] if self.engine.has_unfinished() else [self._inbox.get()]
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands

    def _handle(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            if self._streams.pop(command.request_id, None) is not None:
                self.engine.abort(command.request_id)
            return
        try:
            self.engine.add_request(command.prompt, command.params, command.request_id)
        except ValueError as exc:
            command.deliver(RequestFailed(str(exc), 400))
            return
        except Exception:
            logger.exception("add_request failed for %s", command.request_id)
            command.deliver(RequestFailed("the engine could not accept the request", 500))
            return
        self._streams[command.request_id] = command.deliver

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            self._failed_steps += 1
            logger.exception("engine step failed (%d in a row); failing %d requests", self._failed_steps,
                             len(self._streams))
            self._fail_all(RequestFailed("the engine failed while running the request", 500))
            if self.engine.has_unfinished() or self._failed_steps >= MAX_FAILED_STEPS:
                raise _EngineBroken("the engine cannot recover from failed steps") from None
            return
        self._failed_steps = 0
        for output in outputs:
            deliver = self._streams.get(output.request_id)
            if deliver is None:
                continue
            deliver(output)
            if output.finished:
                del self._streams[output.request_id]

    def _fail_all(self, error: RequestFailed) -> None:
        streams, self._streams = self._streams, {}
        for request_id, deliver in streams.items():
            try:
                self.engine.abort(request_id)
            except Exception:
                logger.exception("abort failed for %s", request_id)
            deliver(error)

    def _shut_down(self, leftover: list[_Add | _Abort | _Stop]) -> None:
        with self._lock:
            self._accepting = False
        gone = EngineUnavailable("the engine stopped")
        self._fail_all(gone)
        while True:
            try:
                leftover.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for command in leftover:
            if isinstance(command, _Add):
                command.deliver(gone)
