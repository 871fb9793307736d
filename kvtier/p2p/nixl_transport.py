"""The NIXL transport: one agent per engine that registers the memory pool's whole arena once and is
both the holder (peers READ from our slots) and the reader (we READ from theirs into ours).

    nixl_status()            None when NIXL with its UCX plugin can be used here, else why not
                             (cached; never raises; imports nixl and makes an agent with no
                             backend: ~30 ms, not the ~0.4 s of starting UCX)
    NixlEndpoint(name, arena, slot_stride, slot_bytes, num_slots)
        .metadata()          our agent's metadata (the holder sends it in its CONNECT reply)
        .geometry()          {"base", "stride", "slot_bytes", "slots"} (also in CONNECT)
        .slot_of(dest)       dest's slot index when dest starts a slot of our arena, else None
        .connect(md, geo)    -> NixlPeer (kvtier.p2p.nixl_peer): the peer's agent loaded, its
                             slots' descriptors prepared once, the UCX connection made ahead of
                             the first READ. TransportError when it cannot be.
        .close()             refuse new reads, wait (bounded) for reads in flight, drop every
                             peer, deregister the arena exactly once. Idempotent.

Slot i of an arena is [base + i * stride, + slot_bytes): the memory pool's slab i. A READ moves
whole slots; both sides must have the same slot_bytes (connect refuses otherwise).

Why the raw bindings (`nixl._bindings`) and not the `nixl_agent` wrapper: the wrapper fixes the
UCX progress thread's poll delay at 0, which makes that thread spin a whole core per process even
when idle (measured here: 2.0 s of CPU per 2 s idle), and a holder needs the thread: without it a
peer's READ lands but never completes (its UCX endpoint waits on the holder's side). With a 1 ms
delay the thread sleeps in poll() on UCX's event fd: ~1% of a core idle, same throughput.

Logging: importing nixl configures its Python logger at INFO to stdout and turns off
`logging.raiseExceptions` process-wide; `_load` restores the latter and sets the "nixl" logger to
WARNING unless NIXL_LOG_LEVEL is set (which then rules, as nixl documents). UCX's own log goes to
stdout/stderr as UCX_LOG_LEVEL says (default: warnings and errors only).

Where it runs: built by the engine (kvtier.p2p.setup) before the peer server starts; `connect` and
reads run on the P2P tier's threads, `metadata`/`geometry` on the peer server's. Thread-safe: the
agent serialises its own calls (NIXL_THREAD_SYNC_STRICT); the endpoint's bookkeeping takes a lock.
Memory: the caller owns the arena and keeps it alive until close() returned; close() runs after
the peer server stopped and every lease ended (no peer reads our slots any more).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from kvtier.errors import KvtierError
from kvtier.p2p.nixl_peer import NixlPeer, PeerLinks, RemoteAgent

if TYPE_CHECKING:
    import torch

__all__ = ["NixlEndpoint", "NixlPeer", "TransportError", "nixl_status"]

logger = logging.getLogger(__name__)

PROGRESS_DELAY_US = 1000  # the UCX progress thread's poll() timeout (it wakes on events sooner)
CLOSE_WAIT_S = 10.0       # close() waits this long for reads in flight (each is itself bounded)
MAX_REMOTE_SLOTS = 1 << 20  # a peer's slots we prepare descriptors for (24 B each), if more than ours


class TransportError(KvtierError):
    """NIXL cannot start here, or cannot reach a peer's agent (bad metadata, another slot size)."""


def _load() -> Any:
    """The nixl bindings module, imported quietly (see the module docstring)."""
    raise_exceptions = logging.raiseExceptions
    import nixl  # picks the wheel built for this machine's CUDA (or none)

    logging.raiseExceptions = raise_exceptions
    if not os.environ.get("NIXL_LOG_LEVEL"):
        logging.getLogger("nixl").setLevel(logging.WARNING)
    return nixl._bindings


def _config(nixl: Any, progress: bool) -> Any:
    config = nixl.nixlAgentConfig()
    config.useProgThread = progress
    config.useListenThread = False  # metadata travels in our own CONNECT reply
    config.pthrDelay = PROGRESS_DELAY_US
    config.syncMode = nixl.NIXL_THREAD_SYNC_STRICT
    return config


@functools.cache
def nixl_status() -> str | None:
    """None when NIXL with the UCX backend can be used in this process, else a reason to show."""
    try:
        nixl = _load()
        plugins = list(nixl.nixlAgent("kvtier-probe", _config(nixl, progress=False)).getAvailPlugins())
    except Exception as exc:  # noqa: BLE001 - ImportError, a missing shared library, ...
        return f"NIXL cannot load: {type(exc).__name__}: {exc}"
    if "UCX" not in plugins:
        return f"NIXL has no UCX plugin here (plugins: {', '.join(plugins) or 'none'})"
    return None


class NixlEndpoint:
    def __init__(self, name: str, arena: torch.Tensor, slot_stride: int, slot_bytes: int,
                 num_slots: int):
        _check_arena(arena, slot_stride, slot_bytes, num_slots)
        why = nixl_status()
        if why is not None:
            raise TransportError(why)
        self.name = name
        self._nixl = _load()
        self._arena = arena
        self._geometry = {"base": arena.data_ptr(), "stride": slot_stride, "slot_bytes": slot_bytes,
                          "slots": num_slots}
        self._lock = threading.Lock()
        self._remotes: dict[bytes, RemoteAgent] = {}  # by metadata: one load per remote agent
        self._peers: set[NixlPeer] = set()
        self._closed = False
        self._agent: Any = None
        self._registered: Any = None
        self._local: int | None = None
        try:
            self._start()
        except Exception as exc:  # noqa: BLE001 - nixl's errors share no base but Exception
            self._stop()
            raise TransportError(f"NIXL agent {name} cannot start: {type(exc).__name__}: {exc}") from exc
        self._links = PeerLinks(self._nixl, self._agent, self._local, num_slots, self._peer_closed,
                                self._tear_down)

    def _start(self) -> None:
        nixl, g = self._nixl, self._geometry
        self._agent = nixl.nixlAgent(self.name, _config(nixl, progress=True))
        self._agent.createBackend("UCX", {})
        registered = nixl.nixlRegDList(nixl.DRAM_SEG, [(g["base"], self._arena.numel(), 0, "")])
        self._agent.registerMem(registered, [])
        self._registered = registered
        self._local = self._agent.prepXferDlist(nixl.NIXL_INIT_AGENT, _slot_descs(nixl, g), [])
        self._metadata = bytes(self._agent.getLocalMD())  # after registering: it carries the rkeys

    def metadata(self) -> bytes:
        return self._metadata

    def geometry(self) -> dict[str, int]:
        return dict(self._geometry)

    def slot_of(self, dest: torch.Tensor) -> int | None:
        g = self._geometry
        offset = dest.data_ptr() - g["base"]
        if dest.device.type != "cpu" or offset < 0 or offset % g["stride"]:
            return None
        slot = offset // g["stride"]
        # A READ fills `slot_bytes` from the slot's start; a dest up to the slot's stride (the
        # memory pool's padded slab view) lies within that slot, so the READ stays inside it.
        fits = dest.numel() * dest.element_size() <= g["stride"]
        return slot if slot < g["slots"] and fits else None

    def connect(self, metadata: bytes, geometry: dict[str, int]) -> NixlPeer:
        """A peer whose slots we can READ; TransportError when its agent cannot be used."""
        mine = self._geometry  # (a peer configured as we are has as many slots: never refused)
        remote_geometry = _check_remote(geometry, mine["slot_bytes"], max(MAX_REMOTE_SLOTS, mine["slots"]))
        with self._lock:
            if self._closed:
                raise TransportError(f"NIXL endpoint {self.name} is closed")
            remote = self._remotes.get(metadata)
            if remote is not None and remote.stale:
                raise TransportError(f"the last read from NIXL agent {remote.name} failed and "
                                     f"{remote.peers} peer(s) still use it: connect again later")
            try:
                if remote is None:
                    remote = RemoteAgent(_text(self._agent.loadRemoteMD(metadata)), remote_geometry["slots"])
                    self._remotes[metadata] = remote
                dlist = self._agent.prepXferDlist(remote.name, _slot_descs(self._nixl, remote_geometry), [])
                self._agent.makeConnection(remote.name, [])
            except Exception as exc:  # noqa: BLE001 - bad metadata, an unreachable agent, ...
                if remote is not None and remote.peers == 0:
                    self._drop(remote)
                raise TransportError(f"NIXL cannot connect to a peer: {type(exc).__name__}: {exc}") from exc
            remote.peers += 1
            peer = NixlPeer(self._links, remote, dlist)
            self._peers.add(peer)
            return peer

    def _peer_closed(self, peer: NixlPeer) -> None:
        with self._lock:
            if peer not in self._peers:
                return
            self._peers.discard(peer)
            if not peer.remote.torn_down:
                peer.release_dlist()
            peer.remote.peers -= 1
            if peer.remote.peers == 0:
                self._drop(peer.remote)

    def _tear_down(self, remote: RemoteAgent) -> None:
        """A transfer that cannot be cancelled: drop its agent now (closes its UCX endpoint)."""
        with self._lock:
            remote.stale = True
            self._drop(remote)

    def _drop(self, remote: RemoteAgent) -> None:
        """Forget a remote agent (under the lock); a later connect loads it afresh."""
        for metadata, known in list(self._remotes.items()):
            if known is remote:
                del self._remotes[metadata]
        if not remote.torn_down:
            remote.torn_down = True
            try:
                self._agent.invalidateRemoteMD(remote.name)
            except Exception as exc:  # noqa: BLE001 - already gone: nothing to undo
                logger.info("NIXL: dropping remote agent %s: %s", remote.name, exc)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            peers = list(self._peers)
        give_up = time.monotonic() + CLOSE_WAIT_S
        for peer in peers:
            peer.close(max(0.0, give_up - time.monotonic()))
        if any(peer.in_flight for peer in peers):
            # Deregistering under a live transfer could let it write into memory the pool reuses;
            # keeping the agent (and its registration) alive until exit is the lesser harm.
            logger.error("NIXL endpoint %s: reads still in flight at close: the arena stays "
                         "registered", self.name)
            return
        self._stop()

    def _stop(self) -> None:
        """Release what _start made, in reverse order; each step at most once."""
        agent, self._agent = self._agent, None
        if agent is None:
            return
        try:
            if self._local is not None:
                agent.releasedDlistH(self._local)
            if self._registered is not None:
                agent.deregisterMem(self._registered, [])
        except Exception as exc:  # noqa: BLE001 - the agent goes anyway
            logger.warning("NIXL endpoint %s: cleanup failed: %s", self.name, exc)
        self._local = self._registered = None
        del agent  # joins the progress thread, closes the UCX workers


def _check_arena(arena: torch.Tensor, stride: int, slot_bytes: int, slots: int) -> None:
    if arena.dim() != 1 or arena.element_size() != 1 or arena.device.type != "cpu" \
            or not arena.is_contiguous():
        raise ValueError("the arena must be a contiguous 1-D byte tensor in CPU memory")
    if not 0 < slot_bytes <= stride or slots <= 0 or (slots - 1) * stride + slot_bytes > arena.numel():
        raise ValueError(f"{slots} slots of {slot_bytes} bytes every {stride} do not fit an arena "
                         f"of {arena.numel()} bytes")


def _check_remote(geometry: dict[str, int], slot_bytes: int, max_slots: int = MAX_REMOTE_SLOTS
                  ) -> dict[str, int]:
    try:
        g = {k: int(geometry[k]) for k in ("base", "stride", "slot_bytes", "slots")}
    except (KeyError, TypeError, ValueError) as exc:
        raise TransportError(f"a peer's geometry is malformed: {geometry!r}") from exc
    if g["slot_bytes"] != slot_bytes:
        raise TransportError(f"a peer's slots are {g['slot_bytes']} bytes, ours {slot_bytes}")
    # Bounded before anything is built: connect makes a descriptor per remote slot (24 bytes), and
    # the addresses must not wrap past 2**64 (numpy's uint64 would wrap silently).
    if not 0 < g["slots"] <= max_slots or g["stride"] < g["slot_bytes"] or g["base"] <= 0 \
            or g["base"] + g["slots"] * g["stride"] > 2**64:
        raise TransportError(f"a peer's geometry is impossible: {g}")
    return g


def _slot_descs(nixl: Any, g: dict[str, int]) -> Any:
    """The descriptor list of every slot: (address, length, device 0), one row per slot."""
    import numpy as np

    descs = np.empty((g["slots"], 3), dtype=np.uint64)
    descs[:, 0] = g["base"] + np.arange(g["slots"], dtype=np.uint64) * np.uint64(g["stride"])
    descs[:, 1] = g["slot_bytes"]
    descs[:, 2] = 0
    return nixl.nixlXferDList(nixl.DRAM_SEG, descs)


def _text(name: Any) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)
