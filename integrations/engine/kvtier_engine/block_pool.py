"""Block pool: the paged KV cache's blocks, their reference counts, and hash-based prefix caching.

Where it runs: in the scheduler; pure Python, no tensors. Per sequence, in order:

    can_allocate(tokens) -> allocate(seq, tokens) -> hit tokens   (blocks for the whole prompt)
    publish(seq, tokens, num_computed) after each forward step     (computed full blocks findable)
    cache_only_upto(seq, n)        its KV past token n is approximate (CacheBlend): never published
    append_slot(seq, n) before a step that grows the sequence      (decode)
    free(seq)                                                     (finished or preempted)

A block's hash chains over every token before it (`kvtier.keys.chained_digests`, the scheme of
kvtier's chunk keys at block granularity), so equal hashes mean equal prefixes; a hit is still
confirmed by comparing token ids. Hashes are published only once a block's KV has been computed,
so no sequence ever reads a block that another is still filling. A block whose count drops to zero
keeps its contents and hash (cached) until the pool needs it; free blocks are recycled least
recently freed first, unhashed ones before any cached one. The block holding a prompt's last token
is never a hit: its logits are needed, so it is recomputed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from kvtier.keys import chained_digests

_SEED = b"kvtier-engine-blocks"


class NoFreeBlocks(RuntimeError):
    """The pool cannot hold the request right now; nothing was changed."""


@dataclass(slots=True, eq=False)
class Block:
    id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: tuple[int, ...] = ()


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # next victim first
        self._by_hash: dict[bytes, int] = {}
        self._tables: dict[Hashable, list[int]] = {}
        self._hashes: dict[Hashable, list[bytes]] = {}  # per sequence: hashes of its computed full blocks
        self._limits: dict[Hashable, int] = {}  # per sequence: blocks past this many are never published

    @property
    def num_free(self) -> int:
        return len(self._free)

    def block_table(self, seq_id: Hashable) -> list[int]:
        return self._tables[seq_id]

    def holds(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    # -- prefix matching -----------------------------------------------------------------------

    def _digests(self, token_ids: Sequence[int], first: int, last: int, seed: bytes) -> list[bytes]:
        """Hashes of full blocks first..last-1 of `token_ids`, chained from `seed`."""
        bs = self.block_size
        raw = np.asarray(token_ids[first * bs:last * bs], dtype="<u4").tobytes()
        return chained_digests(raw, seed, [(i + 1) * bs for i in range(first, last)], start=first * bs)

    def _match(self, token_ids: Sequence[int]) -> list[int]:
        bs = self.block_size
        hits: list[int] = []
        if not self.enable_caching:
            return hits
        for i, digest in enumerate(self._digests(token_ids, 0, (len(token_ids) - 1) // bs, _SEED)):
            block_id = self._by_hash.get(digest)
            if block_id is None or self.blocks[block_id].token_ids != tuple(token_ids[i * bs:(i + 1) * bs]):
                break
            hits.append(block_id)
        return hits

    def _free_needed(self, token_ids: Sequence[int], hits: list[int]) -> int:
        total = -(-len(token_ids) // self.block_size)
        return total - len(hits) + sum(1 for b in hits if self.blocks[b].ref_count == 0)

    # -- lifecycle -----------------------------------------------------------------------------

    def match(self, token_ids: Sequence[int]) -> list[int]:
        """The cached blocks of the prompt's leading full blocks, as `allocate` would take them now;
        changes nothing. Valid for `can_allocate` and `allocate` until the pool next changes."""
        return self._match(token_ids)

    def can_allocate(self, token_ids: Sequence[int], hits: list[int] | None = None) -> bool:
        hits = self._match(token_ids) if hits is None else hits
        return self._free_needed(token_ids, hits) <= self.num_free

    def allocate(self, seq_id: Hashable, token_ids: Sequence[int], hits: list[int] | None = None) -> int:
        """Blocks for the whole prompt. Returns the leading tokens already cached (block aligned).
        `hits`: `match(token_ids)` taken since the pool last changed (spares hashing the prompt again)."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already holds blocks")
        if not token_ids:
            raise ValueError("cannot allocate an empty prompt")
        hits = self._match(token_ids) if hits is None else hits
        if self._free_needed(token_ids, hits) > self.num_free:
            raise NoFreeBlocks(f"{len(token_ids)} tokens need more than the {self.num_free} free blocks")
        table = []
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            table.append(block_id)
        table += [self._take_free() for _ in range(-(-len(token_ids) // self.block_size) - len(hits))]
        self._tables[seq_id] = table
        self._hashes[seq_id] = [self.blocks[b].hash for b in hits]
        return len(hits) * self.block_size

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self._by_hash.get(block.hash) == block_id:
            del self._by_hash[block.hash]  # recycled: its cached prefix is gone
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

    def append_slot(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Room for the sequence grown to `num_tokens`. False (nothing changed) if no block is free."""
        table = self._tables[seq_id]
        need = -(-num_tokens // self.block_size) - len(table)
        if need > self.num_free:
            return False
        table += [self._take_free() for _ in range(need)]
        return True

    def publish(self, seq_id: Hashable, token_ids: Sequence[int], num_computed: int) -> None:
        """Make the computed full blocks of a sequence findable by later prompts."""
        if not self.enable_caching:  # nothing will ever look them up: skip the hashing too
            return
        table, hashes = self._tables[seq_id], self._hashes[seq_id]
        done = min(num_computed, len(token_ids)) // self.block_size
        done = min(done, self._limits.get(seq_id, done))
        if done <= len(hashes):
            return
        hashes += self._digests(token_ids, len(hashes), done, hashes[-1] if hashes else _SEED)
        bs = self.block_size
        for i in range(done):
            block = self.blocks[table[i]]
            if block.hash is None and hashes[i] not in self._by_hash:
                block.hash, block.token_ids = hashes[i], tuple(token_ids[i * bs:(i + 1) * bs])
                self._by_hash[hashes[i]] = block.id

    def cache_only_upto(self, seq_id: Hashable, num_tokens: int) -> None:
        """Never publish the sequence's blocks past its first `num_tokens` (block aligned), for as
        long as it holds them: a blended prompt's KV past its head is approximate, and so is every
        token decoded over it, and a later prompt must not find either as an exact prefix hit."""
        if num_tokens % self.block_size:
            raise ValueError(f"{num_tokens} tokens is not a whole number of {self.block_size}-token blocks")
        if seq_id not in self._tables:
            raise KeyError(f"sequence {seq_id} holds no blocks")
        blocks = num_tokens // self.block_size
        self._limits[seq_id] = min(self._limits.get(seq_id, blocks), blocks)

    def free(self, seq_id: Hashable) -> None:
        """Release a sequence's blocks; cached ones stay findable until recycled."""
        self._hashes.pop(seq_id, None)
        self._limits.pop(seq_id, None)
        # Last block first, so a prompt's tail is recycled before its head (heads are shared more).
        for block_id in reversed(self._tables.pop(seq_id)):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {block_id} freed more often than taken")
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.hash is None:  # nothing cached in it: recycle it before cached blocks
                    self._free.move_to_end(block_id, last=False)
