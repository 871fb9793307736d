"""EngineLoop: one thread drives an LLMEngine; asyncio request handlers talk to it through queues.

Where it runs: `submit` is called on the server's event loop (outputs are delivered back onto the loop
it is called from); `abort`, `alive` and `close` from any thread. Everything that touches the engine
runs on the loop's own thread, because LLMEngine is not thread-safe.

    event loop                                   engine thread
    submit(prompt, params, id) --_Add-->  inbox  --> engine.add_request
    stream.abort()             --_Abort->        --> engine.abort
    await stream.next() <--call_soon_threadsafe--    each step's RequestOutput, or RequestFailed

The thread steps while the engine has unfinished requests and blocks on the inbox when it has none:
no polling. Lifecycle: EngineLoop(engine) -> start() -> submit()/abort() ... -> [stop()] -> close().
stop() asks the thread to end without waiting (what is still running fails with 503); close() stops
it, waits for it, and then closes the engine.

Failures never leave a client waiting, and fail no more requests than they must:
- add_request rejecting a request (ValueError: token id out of range, too long, bad parameters)
  fails that request: 400.
- An output that finished with "error" (its logits were not finite, its token undecodable) fails
  that request: 500. The rest of the batch goes on.
- StepFailed (the forward failed) fails the requests of that step's batch: 500. Others go on.
- Anything else step() raises leaves the engine's state unknown: every request in it fails with 500
  and is aborted; the loop carries on with new requests.
- If aborting does not leave the engine without requests, or MAX_FAILED_STEPS steps fail with no
  success between them, the engine is unusable: the loop stops, `alive` turns false (/health says
  503), every request still waiting, or submitted later, fails with 503, and `on_broken` is called
  (the server exits non-zero then, for a supervisor to restart it).
On close() (or the loop's stop), requests still running are aborted, and one more step hands their
final KV saves to kvtier before the engine closes, which drains kvtier's writes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from kvtier_engine.llm_engine import LLMEngine, RequestOutput, StepFailed
from kvtier_engine.sampling import SamplingParams, TokenLogprobs

logger = logging.getLogger(__name__)

# Failed steps in a row, with no successful one between, after which the engine is deemed unusable
# (a broken device fails every step; one bad batch does not).
MAX_FAILED_STEPS = 3
# Steps run at shutdown to hand aborted requests' final saves to kvtier (one is enough: those steps
# only gather saves; the bound keeps a misbehaving engine from holding the shutdown).
MAX_DRAIN_STEPS = 3


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
    kv_transfer_params: dict | None = None


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


class _Stop:
    pass


class _EngineBroken(Exception):
    pass


class RequestStream:
    """The event-loop side of one request: `await next()` until an output is `finished`.

    Outputs the client has not taken yet are merged, not queued: each carries the whole text and
    token list so far, so one per step, held for a client that stopped reading (its socket full),
    would be memory quadratic in the request's length. `next()` returns the latest output with the
    deltas (`new_text`, `new_token_ids`, `new_logprobs`) of every output since the previous call joined."""

    def __init__(self, request_id: str, abort: Callable[[str], None],
                 on_end: Callable[[], None] = lambda: None):
        self.request_id = request_id
        self.done = False  # finished, failed or aborted: nothing more will come
        self._abort = abort
        self._on_end = on_end  # called once, when the engine is done with the request
        self._ended = False
        self._latest: RequestOutput | None = None
        self._texts: list[str] = []
        self._tokens: list[int] = []
        self._logprobs: list[TokenLogprobs] = []
        self._failure: RequestFailed | None = None
        self._arrived = asyncio.Event()

    def put(self, event: Event) -> None:
        """On the event loop: an output, or the failure that ends the request."""
        if isinstance(event, RequestFailed):
            self._failure = event
        else:
            self._latest = event
            self._texts.append(event.new_text)
            self._tokens.extend(event.new_token_ids)
            self._logprobs.extend(event.new_logprobs)
        if isinstance(event, RequestFailed) or event.finished:
            self._end()
        self._arrived.set()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._on_end()

    async def next(self) -> RequestOutput:
        """The request's next output. Raises `RequestFailed` if the engine gave up on it."""
        while self._latest is None:
            if self._failure is not None:
                self.done = True
                raise self._failure
            self._arrived.clear()
            await self._arrived.wait()
        output = self._latest
        if len(self._texts) > 1:
            output = dataclasses.replace(output, new_text="".join(self._texts),
                                         new_token_ids=tuple(self._tokens),
                                         new_logprobs=tuple(self._logprobs))
        self._latest, self._texts, self._tokens, self._logprobs = None, [], [], []
        self.done = output.finished
        return output

    def abort(self) -> None:
        """Stop the request (the client went away). Idempotent; a no-op once it is done."""
        if not self.done:
            self.done = True
            self._abort(self.request_id)
        self._end()


class EngineLoop:
    def __init__(self, engine: LLMEngine, on_broken: Callable[[], None] | None = None,
                 max_requests: int | None = None):
        """`on_broken` is called on the engine thread once the loop has stopped because the engine
        is unusable (never on close()). At most `max_requests` submitted requests may be unfinished
        at once (None: no bound); submit() refuses more with 503."""
        self.engine = engine
        self._on_broken = on_broken
        self._max_requests = max_requests
        self._open_requests = 0  # submitted, not yet finished, failed or aborted (under _lock)
        self._inbox: queue.SimpleQueue[_Add | _Abort | _Stop] = queue.SimpleQueue()
        # Orders submit() against the thread's final drain: once `_accepting` is false under the lock,
        # no _Add can land in the inbox after the drain and wait forever.
        self._lock = threading.Lock()
        self._accepting = False
        self._stopping = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kvtier-engine-loop", daemon=True)
        self._streams: dict[str, Deliver] = {}  # engine thread only
        self._failed_steps = 0

    @property
    def alive(self) -> bool:
        return self._accepting and self._thread.is_alive()

    def start(self) -> None:
        self._accepting = True
        disagg = getattr(self.engine, "disagg", None)
        if disagg is not None:  # a prefill's last output goes out as its KV lands, not after a step
            disagg.sink = self._deliver_held
        self._thread.start()

    def _deliver_held(self, output: RequestOutput) -> None:
        # On kvtier's saver thread. `_streams` belongs to the engine thread: only read here (one dict
        # lookup), and the entry is dropped there by the abort queued after (the request is done).
        deliver = self._streams.get(output.request_id)
        if deliver is not None:
            deliver(output)
            self.abort(output.request_id)

    def submit(self, prompt: str | list[int], params: SamplingParams, request_id: str,
               kv_transfer_params: dict | None = None) -> RequestStream:
        """Queue a request; its outputs arrive on the calling event loop. Raises EngineUnavailable."""
        loop = asyncio.get_running_loop()
        stream = RequestStream(request_id, self.abort, self._request_ended)

        def deliver(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(stream.put, event)
            except RuntimeError:  # the event loop has closed: nobody is waiting any more
                pass

        with self._lock:
            if not self._accepting:
                raise EngineUnavailable()
            if self._max_requests is not None and self._open_requests >= self._max_requests:
                raise EngineUnavailable(f"the server is busy: {self._max_requests} requests are running "
                                        "or waiting; retry later")
            self._open_requests += 1
            self._inbox.put(_Add(request_id, prompt, params, deliver, kv_transfer_params))
        return stream

    def _request_ended(self) -> None:
        with self._lock:
            self._open_requests -= 1

    @property
    def open_requests(self) -> int:
        return self._open_requests

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def prometheus_text(self) -> str:
        # Read from the caller's thread, not queued behind a step: prometheus_client's metrics and
        # kvtier's storage manager are both safe to read from any thread.
        return self.engine.prometheus_text()

    def stop(self) -> None:
        """Ask the thread to end, without waiting: unfinished requests fail with 503 and their KV goes
        to kvtier. From any thread; idempotent."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        self._inbox.put(_Stop())

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop the thread, failing unfinished requests with 503, then close the engine. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self.stop()
            self._thread.join(timeout)
            if self._thread.is_alive():
                # Closing the engine under a step would be worse than leaving it to process exit.
                logger.error("engine loop did not stop within %s s; engine left open", timeout)
                return
        self.engine.close()

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        leftover: list[_Add | _Abort | _Stop] = []
        broken = True  # unless the loop ends on _Stop
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
                    broken = False
                    return
                if self.engine.has_unfinished():
                    self._step()
        except Exception:
            logger.exception("engine loop stopped: the engine is unusable")
        finally:
            self._shut_down(leftover, broken)
            if broken and self._on_broken is not None:
                self._on_broken()

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
            self.engine.add_request(command.prompt, command.params, command.request_id,
                                    kv_transfer_params=command.kv_transfer_params)
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
        except StepFailed as exc:
            self._failed_steps += 1
            logger.error("engine step failed (%d in a row); failing its %d requests", self._failed_steps,
                         len(exc.request_ids), exc_info=exc.__cause__)
            self._stop_accepting_if_broken()
            for request_id in exc.request_ids:
                self._fail(request_id, RequestFailed("the engine failed while running the request", 500))
            if self._failed_steps >= MAX_FAILED_STEPS:
                raise _EngineBroken("the engine cannot recover from failed steps") from None
            return
        except Exception:
            self._failed_steps += 1
            logger.exception("engine step failed (%d in a row); failing %d requests", self._failed_steps,
                             len(self._streams))
            self._stop_accepting_if_broken()
            self._fail_all(RequestFailed("the engine failed while running the request", 500))
            if self.engine.has_requests() or self._failed_steps >= MAX_FAILED_STEPS:
                raise _EngineBroken("the engine cannot recover from failed steps") from None
            return
        self._failed_steps = 0
        for output in outputs:
            if output.finish_reason == "error":
                self._fail(output.request_id, RequestFailed("the engine failed while running the request",
                                                            500))
                continue
            deliver = self._streams.get(output.request_id)
            if deliver is None:
                continue
            deliver(output)
            if output.finished:
                del self._streams[output.request_id]

    def _stop_accepting_if_broken(self) -> None:
        # Before the failed requests are answered: a client (or a probe) that sees the last 500
        # must find /health already failing, not a window in which the engine still looks alive.
        if self._failed_steps >= MAX_FAILED_STEPS:
            with self._lock:
                self._accepting = False

    def _fail(self, request_id: str, error: RequestFailed) -> None:
        deliver = self._streams.pop(request_id, None)
        if deliver is not None:
            deliver(error)

    def _fail_all(self, error: RequestFailed) -> None:
        streams, self._streams = self._streams, {}
        for request_id, deliver in streams.items():
            try:
                self.engine.abort(request_id)
            except Exception:
                logger.exception("abort failed for %s", request_id)
            deliver(error)

    def _shut_down(self, leftover: list[_Add | _Abort | _Stop], broken: bool) -> None:
        with self._lock:
            self._accepting = False
        gone = EngineUnavailable("the engine stopped")
        self._fail_all(gone)
        if not broken:
            self._hand_over_final_saves()
        while True:
            try:
                leftover.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for command in leftover:
            if isinstance(command, _Add):
                command.deliver(gone)

    def _hand_over_final_saves(self) -> None:
        for _ in range(MAX_DRAIN_STEPS):
            if not self.engine.has_unfinished():
                return
            try:
                self.engine.step()
            except Exception:
                logger.exception("a shutdown step failed; the aborted requests' last KV is not saved")
                return
        logger.warning("requests still hold KV blocks after %d shutdown steps", MAX_DRAIN_STEPS)
