"""Worker side of the connector: moves KV between kvtier and the engine's paged cache.

Where it runs: in the process that holds the paged KV, on the forward pass's thread (plus a loader,
a saver (`save_queue`) and an asynchronous loader (`async_load`) thread of its own). Per step, in order:

    bind_connector_metadata(meta)
    start_load_kv()          reads the chunks (tier I/O, blocking), then starts copying them into the
                             paged blocks; `get_loaded_tokens()` says how far each load really got
    wait_for_layer_load(l)   before layer l's attention: layer l's KV is in place
    save_kv_layer(l)         after layer l's attention
    wait_for_save(discard)   after the forward: gathers what to save, hands it to the saver thread
    get_finished()           requests whose final save is gathered (their blocks may be freed), and
                             those whose asynchronous load finished (`get_async_loaded`: how far)
    clear_connector_metadata()

A step whose forward fails still ends with `wait_for_save(discard=<its requests>)` and
`clear_connector_metadata()` (the model runner does this in `finally`), and skips `get_finished`:
the KV the step computed is not trusted, so only final saves (KV of earlier steps) go out, and their
requests come back from the next step's `get_finished`. Neither call raises, so a failed step never
leaves a request's blocks held or a lease taken.

Layouts: the paged cache holds every layer in one tensor, so a request's save is one gather for all
layers and its load one scatter (a chunk record holds all layers too). On a GPU the load runs layer
by layer on its own thread (`layerwise`): layer l+1 is copied while layer l computes. On a CPU both
copies are memcpy on the same cores, so by default the whole scatter is done at once.

A save gathers into a new host tensor before the step ends, so the engine may reuse the blocks at
once; kvtier copies it into its own memory on the saver thread and never blocks the forward pass.
A load that falls short (a chunk missing, corrupt or unreadable) reports where it stopped; the engine
recomputes exactly the tokens after that. Leases taken by the scheduler side are released here, once
the chunks have been read or found missing. A load marked `asynchronous` goes to the `AsyncLoader`
and is reported by a later step's `get_finished`; `wait_for_async_loads` blocks for one. With
`enable_blend` (`kvtier.connector.blend_io`), `start_load_kv` also reads blended requests' passages
(`get_blend_loads`) and `wait_for_save` saves passages under their segment keys.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Collection

import torch

from kvtier.config import LoadsConfig
from kvtier.connector.async_load import AsyncLoader
from kvtier.connector.blend_io import BlendLoad, SegmentIO
from kvtier.connector.load_read import PagedKV, StagingBuffer, first_token, read_load
from kvtier.connector.load_thread import LoadThread
from kvtier.connector.metadata import ConnectorMetadata, KVEvent, LoadSpec
from kvtier.connector.save_queue import SaveQueue
from kvtier.engine import CacheEngine
from kvtier.log_limit import LogLimiter
from kvtier.platforms import Platform, platform_for
from kvtier.platforms.cpu import CpuPlatform

logger = logging.getLogger(__name__)

MAX_EVENTS = 10_000
# How long a reset waits for the saves handed over before it (then clears what landed).
RESET_DRAIN_S = 30.0


class KvtierWorkerConnector:
    def __init__(self, engine: CacheEngine, layerwise: bool | None = None, loads: LoadsConfig | None = None):
        self.engine = engine
        # Loads fall short whenever a tier misses, and failures repeat per request: counted in
        # `stats` every time, logged once a minute per kind.
        self._log = LogLimiter(logger)
        self.layerwise = layerwise
        self.cache: PagedKV | None = None
        self.events: deque[KVEvent] = deque(maxlen=MAX_EVENTS)
        # Every load handed to the worker counts in `loads`, and ends whole, short (`load_shortfalls`:
        # the rest recomputed) or cancelled before it started (`load_cancels`: its request aborted).
        self.stats = {"loads": 0, "load_shortfalls": 0, "load_cancels": 0, "loaded_tokens": 0, "saves": 0,
                      "save_failures": 0, "saved_tokens": 0}
        self._meta: ConnectorMetadata | None = None
        self._platform: Platform = CpuPlatform()  # the KV cache's device's (register_kv_caches)
        self._staging = StagingBuffer(engine, pin=False)  # pinned where that helps (register_kv_caches)
        self._loaded: dict[str, int] = {}
        self._layer_ready: list[threading.Event] = []
        self._layer_copied: dict[int, object | None] = {}  # layer -> its copy's event (None: synchronous)
        self._load_error: BaseException | None = None
        self._loader = LoadThread()
        self._finished_sending: set[str] = set()
        self._kv_stored: set[str] = set()  # `notify_stored` requests whose saves are all stored
        self._stored_changed = threading.Condition()
        self.on_stored: Callable[[str], None] | None = None  # also told, on the saver thread
        self.segments: SegmentIO | None = None
        self._blend_loads: dict[str, BlendLoad] = {}
        # Counters are updated from the forward thread, the saver's and the asynchronous loader's.
        self._record_lock = threading.Lock()
        self._saver = SaveQueue(engine, self.stats, self._record_lock, self._log)
        self._async = AsyncLoader(engine, (loads or LoadsConfig()).async_max_bytes_in_flight, self._record)
        self._async_loaded: dict[str, int] = {}

    def enable_blend(self, inv_freq: torch.Tensor) -> None:
        """Read and save passages for CacheBlend; `inv_freq`: the model's RoPE inverse frequencies."""
        self.segments = SegmentIO(self.engine, inv_freq)

    def register_kv_caches(self, cache: PagedKV) -> None:
        self.cache = cache
        kv = getattr(cache, "kv", None)
        self._platform = platform_for(kv.device) if kv is not None else CpuPlatform()
        pinned = self._platform.pin_by_default()
        if self.layerwise is None:  # worth it where copies overlap compute
            self.layerwise = self._platform.capabilities()["async_copies"]
        self._staging = StagingBuffer(self.engine, pin=pinned)
        self._async.bind(cache, self._platform)

    def bind_connector_metadata(self, meta: ConnectorMetadata) -> None:
        if meta.reset:  # the scheduler side reset the cache (its engine is another): this one follows
            self._saver.drain(RESET_DRAIN_S)  # saves of KV computed before land first, then go too
            self.engine.clear()
        self._meta = meta

    def clear_connector_metadata(self) -> None:
        self._meta = None

    # -- loads ---------------------------------------------------------------------------------

    def start_load_kv(self) -> None:
        for copied in self._layer_copied.values():  # the last step's copies still read the staging buffer
            self._platform.synchronize(copied)
        self._loaded, self._layer_ready, self._load_error = {}, [], None
        self._layer_copied, self._blend_loads = {}, {}
        if self._meta is None:
            return
        if self._meta.blend_loads:  # planned only when blending is enabled; read_all releases the leases
            self._blend_loads = self.segments.read_all(self._meta.blend_loads)
        if not (loads := self._start_async(self._meta)):
            return
        firsts = [first_token(spec, self.engine.db.chunk_size) for spec in loads]
        sizes = [len(spec.token_ids) - first for spec, first in zip(loads, firsts)]
        offsets = list(itertools.accumulate(sizes, initial=0))[:-1]
        jobs, read = [], 0
        try:
            staging = self._staging_for(sum(sizes))
            for spec, first, offset, size in zip(loads, firsts, offsets, sizes):
                read += 1  # `_read` releases the lease whatever happens
                if (job := self._read(spec, first, staging.narrow(2, offset, size))) is not None:
                    jobs.append(job)
        finally:
            for spec in loads[read:]:  # never reached (the staging buffer could not be had)
                self.engine.release(spec.lease)
        if not self.layerwise:
            for block_ids, kv in jobs:
                self.cache.scatter(block_ids, kv)
            return
        self._layer_ready = [threading.Event() for _ in range(self.cache.num_layers)]
        args = (jobs, self._layer_ready, self._layer_copied)
        try:
            self._loader.submit(self._scatter_layers, *args)
        except RuntimeError:  # no thread to be had (the process is at its limit): copy now, as bulk
            # loads do. Left unset, the layers' events hung wait_for_save, and the engine loop, for good.
            self._log.error("thread", "could not start the layer-wise load thread; copying in line",
                            exc_info=True)
            self._scatter_layers(*args)

    def _start_async(self, meta: ConnectorMetadata) -> list[LoadSpec]:
        """Hand the step's asynchronous loads to the loader and its cancels; the synchronous loads. A
        load whose request was aborted before it was handed over (its cancel in the same step) is
        never read, and is reported at its start like any cancelled load."""
        cancelled = set(meta.cancel_loads)
        for request_id in cancelled:
            self._async.cancel(request_id)
        for spec in meta.loads:
            if spec.asynchronous:
                (self._async.drop if spec.request_id in cancelled else self._async.submit)(spec, meta.step)
        return [spec for spec in meta.loads if not spec.asynchronous]

    def get_blend_loads(self) -> dict[str, BlendLoad]:
        """The step's blended requests whose passages were all read (the others compute normally)."""
        return dict(self._blend_loads)

    def _staging_for(self, num_tokens: int) -> torch.Tensor:
        """The synchronous loads' staging buffer (`StagingBuffer`), kept across steps."""
        return self._staging.get(num_tokens)

    def _read(self, spec: LoadSpec, first: int, out: torch.Tensor) -> tuple[list[int], torch.Tensor] | None:
        """Read a request's chunks from token `first` on into `out`; the blocks and KV still to
        scatter, if any."""
        kv, reached = read_load(self.engine, spec, first, out, self._log)  # releases the lease
        self._loaded[spec.request_id] = reached
        self._record(spec, self._meta.step, reached, False)
        if reached == spec.start:
            return None
        bs = self.cache.block_size
        return list(spec.block_ids[spec.start // bs:]), kv[:, :, spec.start - first:reached - first]

    def _scatter_layers(self, jobs: list[tuple[list[int], torch.Tensor]], layer_ready: list[threading.Event],
                        layer_copied: dict[int, object | None]) -> None:
        # Its own step's events, not `self._layer_ready`: the forward pass may finish and the next
        # step start before this thread reaches `finally`, which must not signal that step's layers.
        # On a GPU the copies go on the platform's copy stream, and each layer's completion is an
        # event the forward's stream waits on: the copy of layer l+1 overlaps layer l's compute.
        stream = self._platform.copy_stream()
        try:
            with stream.active():
                for layer, ready in enumerate(layer_ready):
                    for block_ids, kv in jobs:
                        self.cache.scatter(block_ids, kv[:, layer:layer + 1], layers=slice(layer, layer + 1))
                    layer_copied[layer] = stream.record()
                    ready.set()
        except BaseException as exc:  # surfaced to the forward pass by wait_for_layer_load
            self._load_error = exc
        finally:
            for ready in layer_ready:
                ready.set()

    def _record(self, spec: LoadSpec, step: int, reached: int, cancelled: bool) -> None:
        """A load's event and counters (from the forward thread, or the asynchronous loader's).
        `cancelled`: it never started (its request was aborted, or the loader closed); not a shortfall."""
        with self._record_lock:
            self.events.append(KVEvent(step, "load", spec.request_id, spec.start, reached))
            self.stats["loads"] += 1
            self.stats["loaded_tokens"] += reached - spec.start
            if cancelled:
                self.stats["load_cancels"] += 1
            elif reached < spec.end:
                self.stats["load_shortfalls"] += 1
                self._log.warning("shortfall", "request %s: kvtier load reached token %d of %d; the rest is "
                                  "recomputed", spec.request_id, reached, spec.end)

    def get_loaded_tokens(self) -> dict[str, int]:
        """For each request loaded this step: the token its KV now reaches (the planned end unless the
        load fell short). Available as soon as `start_load_kv` returns."""
        return dict(self._loaded)

    def wait_for_layer_load(self, layer: int) -> None:
        if self._layer_ready:
            self._layer_ready[layer].wait()
            if self._load_error is not None:
                raise RuntimeError("copying loaded KV into the paged cache failed") from self._load_error
            self._platform.wait(self._layer_copied.get(layer))

    # -- saves ---------------------------------------------------------------------------------

    def save_kv_layer(self, layer: int) -> None:
        """Nothing per layer: the save is one gather of all layers in `wait_for_save` (see above)."""

    def wait_for_save(self, discard: Collection[str] = ()) -> None:
        """Hand this step's saves to the saver thread. The non-final saves of requests in `discard`
        are dropped: the KV this step computed for them is not trusted (their forward or sampling
        failed). Final saves hold KV of earlier steps and always go. Never raises: a save that
        cannot be gathered is a save failure, and its request's blocks are still released."""
        self._wait_for_copies()
        if self._meta is None:
            return
        bs = self.cache.block_size
        for spec in self._meta.saves:
            if spec.request_id in discard and not spec.final:
                continue
            try:
                kv = self.cache.gather(list(spec.block_ids[spec.start // bs:]), spec.end - spec.start)
                self._saver.store(spec, kv)
                self.events.append(KVEvent(self._meta.step, "save", spec.request_id, spec.start, spec.end))
            except Exception:
                self._saver.count_failure()
                self._log.error("gather", "gathering the kvtier save of request %s failed", spec.request_id,
                                exc_info=True)
            finally:
                if spec.final:
                    self._finished_sending.add(spec.request_id)
        if self._meta.segment_saves:  # planned only when blending is enabled
            self.segments.save_all([s for s in self._meta.segment_saves if s.request_id not in discard],
                                   self.cache, self._saver.submit)
        for request_id in self._meta.notify_stored:  # the saver runs in order: after their saves
            self._saver.submit(self._stored, request_id)

    def _stored(self, request_id: str) -> None:
        with self._stored_changed:
            self._kv_stored.add(request_id)
            self._stored_changed.notify_all()
        if self.on_stored is not None:  # (on the saver thread: the engine may be mid-step)
            try:
                self.on_stored(request_id)
            except Exception:
                self._log.error("stored", "reporting request %s stored failed", request_id, exc_info=True)

    def pop_kv_stored(self) -> set[str]:
        """Requests of `notify_stored` whose saves have all been stored (or failed) since the last call."""
        with self._stored_changed:
            stored, self._kv_stored = self._kv_stored, set()
        return stored

    def wait_for_kv_stored(self, timeout: float) -> bool:
        """Block (at most `timeout` s) until some `notify_stored` request is reported; True if one is."""
        with self._stored_changed:
            return self._stored_changed.wait_for(lambda: bool(self._kv_stored), timeout)

    def _wait_for_copies(self) -> None:
        # A forward that failed part-way leaves the layer-wise copy running; its blocks are about
        # to be freed and reused, so it must finish first. After a whole forward this waits for
        # nothing: every layer was waited for.
        for ready in self._layer_ready:
            ready.wait()

    def get_finished(self) -> tuple[set[str], set[str]]:
        """(requests whose final save no longer needs their blocks, requests whose asynchronous load
        finished: landed, short, failed or cancelled; `get_async_loaded` says how far each got)."""
        done, self._finished_sending = self._finished_sending, set()
        self._async_loaded.update(self._async.pop_finished())
        return done, set(self._async_loaded)

    def get_async_loaded(self) -> dict[str, int]:
        """`get_finished`'s second set -> the token each one's KV reaches (consumed: reported once)."""
        loaded, self._async_loaded = self._async_loaded, {}
        return loaded

    def wait_for_async_loads(self, timeout: float | None = None) -> bool:
        """Block until an asynchronous load has finished (not yet reported by `get_finished`), at most
        `timeout` seconds; False at once when none is in flight. For an engine with nothing to run."""
        return self._async.wait(timeout)

    def async_stats(self) -> dict[str, int]:
        return self._async.stats()  # the asynchronous loader's: loads, cuts, cancels, in flight

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every save handed to kvtier has been stored. True if all did in time."""
        return self._saver.drain(timeout)

    def close(self) -> None:
        self._async.close()
        self._loader.close()
        self._saver.close()
