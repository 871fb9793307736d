"""Races inside one DiskTier (kvtier/tiers/disk.py): several threads writing, reading and
evicting the same few keys through a tier that holds fewer records than there are keys. Checked
at quiet moments: the index holds a key exactly when its record file is there, every file reads
back bit-exact, and the byte count is the index's sum."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from conftest import small_layout

from kvtier.keys import ChunkKey, Namespace
from kvtier.metrics import Metrics
from kvtier.record import encode_header
from kvtier.tiers.base import PutItem
from kvtier.tiers.disk import BLOCK, DiskTier

FILE_BYTES = 2 * BLOCK  # header block + one 4 KiB payload
ROUNDS, DEADLINE_S = 1000, 15.0


def items(namespace: bytes, count: int) -> list[PutItem]:
    layout = small_layout()
    shape = layout.chunk_shape(16)
    made = []
    for i in range(count):
        key = ChunkKey(namespace, bytes([i + 1]) * 16)
        payload = np.full(FILE_BYTES - BLOCK, i + 1, np.uint8)
        made.append(PutItem(key, encode_header(key, shape, layout.dtype, memoryview(payload)), payload))
    return made


def test_an_eviction_racing_a_rewrite_of_its_key_never_leaves_the_index_promising_a_deleted_file(tmp_path):
    # An eviction forgets a key under the lock and unlinks its file after it. A write of that key
    # in between (not indexed any more, so written again) renamed its new record into place, and
    # the late unlink deleted it: the index then promised a file that was gone (lookup promises,
    # retrieve misses; a leased chunk's host copy is dropped for a copy below that is not there).
    namespace = Namespace.for_layout("race-test", small_layout()).digest()
    tier = DiskTier(tmp_path / "disk", namespace, 3 * FILE_BYTES, lambda key: False, Metrics(["disk"]))
    records = items(namespace, 5)
    orders = [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4], [3, 4, 0, 1, 2, 0, 4, 1, 3, 2], [2, 0, 4, 1, 3, 1, 0, 2, 4, 3],
              [4, 3, 2, 1, 0, 4, 3, 2, 1, 0]]

    def writer(order: list[int]) -> None:
        dest = np.empty(FILE_BYTES, np.uint8)
        for i in order:
            tier.put([records[i]])  # False when an eviction of the key deleted what it wrote
            other = records[(i + 2) % len(records)]
            if tier.get([other.key], [dest])[0] is not None:
                assert (dest[: FILE_BYTES - BLOCK] == other.payload).all()

    broken, stop_at = [], time.monotonic() + DEADLINE_S
    with ThreadPoolExecutor(len(orders)) as pool:
        for _ in range(ROUNDS):
            if time.monotonic() > stop_at:
                break
            for job in [pool.submit(writer, order) for order in orders]:
                job.result(timeout=30)
            indexed = tier.has([r.key for r in records])
            on_disk = [tier.path_for(r.key).exists() for r in records]
            if indexed != on_disk:
                broken.append((indexed, on_disk))
            assert tier.usage().bytes == sum(indexed) * FILE_BYTES
    assert not broken, f"{len(broken)} rounds ended with index != files, e.g. {broken[0]}"
    tier.clear()
    assert tier.usage().bytes == 0 and not list(tmp_path.glob("**/*.kvr"))
    tier.close()
