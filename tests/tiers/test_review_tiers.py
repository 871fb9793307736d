"""Review findings in the disk and Redis tiers, each pinned by the bug it was."""

from __future__ import annotations

import numpy as np
import torch
import xxhash

from kvtier.config import RedisConfig
from kvtier.keys import ChunkKey
from kvtier.metrics import Metrics
from kvtier.record import encode_header
from kvtier.tiers.base import PutItem
from kvtier.tiers.redis import RedisTier


def test_redis_put_takes_a_numpy_payload_as_the_tier_contract_allows(redis_server):
    # PutItem.payload is "torch.Tensor | np.ndarray" and get() took numpy buffers, but put() called
    # tensor_bytes() and .numel() on the payload: AttributeError for a numpy one.
    namespace = xxhash.xxh3_64_digest(b"review numpy put")
    tier = RedisTier(RedisConfig(url=redis_server.url), namespace, Metrics(["redis"]))
    try:
        key = ChunkKey(namespace, xxhash.xxh3_128_digest(b"chunk"))
        payload = np.arange(3000, dtype=np.uint8)
        header = encode_header(key, (1, 1, 3000, 1), torch.uint8, payload)

        assert tier.put([PutItem(key, header, payload)]) == [True]
        dest = np.zeros(4096, dtype=np.uint8)
        (got,) = tier.get([key], [dest])
        assert got is not None and got.payload_len == 3000
        assert np.array_equal(dest[:3000], payload)
        assert tier._metrics.snapshot()["tiers"]["redis"]["bytes_written"] == 3000
    finally:
        tier.clear()
        tier.close()
