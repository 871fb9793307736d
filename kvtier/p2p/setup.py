"""A CacheEngine's P2P parts, built, started and closed in the order the issue requires.

    p2p = PeerToPeer.build(config, pool, namespace, metrics)   # endpoint, bound server, directory, tier
    lower.append(p2p.tier)                                      # the last tier below host memory
    storage = StorageManager(..., lower, ...)
    p2p.start(storage)                                          # the server serves from now on
    handle = join_fleet(...)                                    # Registration.p2p_url = p2p.url
    p2p.joined(handle.instance_id)                              # the controller leaves us out of answers
    ...
    handle.close(); p2p.close(storage)                          # server, storage, directory, endpoint

Transport: "tcp" builds no NIXL endpoint (and never imports NIXL); "nixl" requires one (NIXL that
cannot be used here is a ConfigError naming p2p.transport and why); "auto" builds one when
`nixl_status()` says NIXL works here, else (or when the endpoint fails to start) serves and reads
over TCP, with one log line saying why. The endpoint registers the whole memory-pool arena once.

Memory safety (why the close order): the server stops first, ending every lease, so no peer reads a
slab that is about to be reused; storage.close() then closes the P2P tier, whose reads have ended
(a NIXL read returns only once its transfer settled); only then is the arena deregistered
(endpoint.close()), before the pool's memory can go away.

Where it runs: the engine's constructor and close(), on the owner's thread. Nothing here is on a
data path. Imported only when a `p2p:` section is configured.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

from kvtier.config_checks import check_sections
from kvtier.errors import ConfigError
from kvtier.p2p.directory import PeerDirectory
from kvtier.p2p.peer_server import PeerServer
from kvtier.tiers.p2p import P2PTier

if TYPE_CHECKING:
    from kvtier.config import KvtierConfig, P2PConfig
    from kvtier.memory import MemoryPool
    from kvtier.metrics import Metrics
    from kvtier.p2p.nixl_transport import NixlEndpoint
    from kvtier.storage import StorageManager

logger = logging.getLogger(__name__)


def nixl_endpoint(config: P2PConfig, pool: MemoryPool) -> NixlEndpoint | None:
    """The NIXL endpoint over the pool's arena, or None for TCP (see the module docstring)."""
    if config.transport == "tcp":
        return None
    from kvtier.p2p.nixl_transport import NixlEndpoint, TransportError, nixl_status

    why = nixl_status()
    if why is None:
        try:
            return NixlEndpoint(f"kvtier-{uuid.uuid4().hex}", pool.arena, pool.slab_stride, pool.slab_bytes,
                                pool.num_slabs)
        except TransportError as exc:
            why = f"the NIXL endpoint did not start: {exc}"
    if config.transport == "nixl":
        raise ConfigError(f"p2p.transport: nixl cannot be used here: {why} (transport: tcp or auto "
                          f"serves over TCP)")
    logger.info("p2p: NIXL cannot be used here (%s): peers are served and read over TCP", why)
    return None


class PeerToPeer:
    """The P2P parts of one engine: NIXL endpoint (or None), PeerServer, PeerDirectory, P2PTier."""

    def __init__(self, endpoint: NixlEndpoint | None, server: PeerServer, directory: PeerDirectory,
                 tier: P2PTier):
        self.endpoint, self.server, self.directory, self.tier = endpoint, server, directory, tier

    @classmethod
    def build(cls, config: KvtierConfig, pool: MemoryPool, namespace: bytes, metrics: Metrics) -> PeerToPeer:
        """Endpoint, then the server (bound: its URL is known), then the directory and the tier
        that reads from peers. Whatever was built is closed again when a later step fails."""
        check_sections(config)  # a config built in code has not been through load_config
        p2p, fleet = config.p2p, config.controller  # no controller: peers are only those hinted
        if p2p is None:
            raise ConfigError(f"{config.source}: p2p: no p2p: section to build")
        endpoint = nixl_endpoint(p2p, pool)
        server = directory = None
        try:
            server = PeerServer(p2p, namespace, metrics, endpoint)
            directory = PeerDirectory(fleet, p2p.directory_ttl_s, metrics)
            tier = P2PTier(p2p, directory, namespace, metrics, endpoint, own_url=server.url)
        except BaseException:  # as close() does, without a storage
            if server is not None:
                server.stop()
            if directory is not None:
                directory.close()
            if endpoint is not None:
                endpoint.close()
            raise
        logger.info("p2p: serving at %s over %s", server.url, "NIXL" if endpoint is not None else "TCP")
        return cls(endpoint, server, directory, tier)

    @property
    def url(self) -> str:
        """Where peers reach this instance (`Registration.p2p_url`)."""
        return self.server.url

    def start(self, storage: StorageManager) -> None:
        self.server.start(storage)

    def joined(self, instance_id: str) -> None:
        """The fleet id this instance registered under: the controller leaves it out of answers."""
        self.directory.instance_id = instance_id

    def close(self, storage: StorageManager | None) -> None:
        """Stop serving (every lease ended: readers get up to p2p.timeout_s to release theirs, as a
        NIXL READ may still be reading the slabs), close `storage` (it closes the P2P tier, whose reads
        end; None: no storage was built, so the tier is closed here), then the directory (closed
        by the tier already: idempotent) and the endpoint: the arena is deregistered only once
        nothing reads or writes it any more. Each step runs even if one before it failed."""
        try:
            self.server.stop()
        finally:
            try:
                if storage is not None:
                    storage.close()
                else:
                    self.tier.close()
            finally:
                self.directory.close()
                if self.endpoint is not None:
                    self.endpoint.close()
