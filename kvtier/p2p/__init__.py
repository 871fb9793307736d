"""Peer-to-peer KV: an instance reads the chunks it misses from the peer that holds them.

The controller says who holds what (`POST /v1/peers`, kvtier.p2p.directory); the bytes go peer to
peer. The holder side is `peer_server` (the kvtier wire on a TCP port: HELLO, HAS, GET, LEASE,
RELEASE, CONNECT), `holding` (keeping chunks in slabs while a peer reads them) and `leases` (which
expire on their own when a reader vanishes). The reader side is the `p2p` tier
(kvtier.tiers.p2p) with `peer_client`. The transport is NIXL (`nixl_transport`: one agent per
process, the memory pool's arena registered once, READs from the holder's slabs straight into the
reader's) or, where NIXL cannot load, the wire's own GET over TCP. Submodules are imported where
used: nothing here loads NIXL until a `p2p:` section asks for it.
"""
