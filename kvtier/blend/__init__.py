"""CacheBlend: reuse the KV of passages that are not a prefix, recomputing only the tokens that need it.

In retrieval-augmented generation the same passages come back behind other prompts and in other
orders, so prefix caching misses them. Blending loads each passage's cached KV wherever it now
sits, moves its keys to their new positions, and recomputes only the tokens whose KV deviates most.
The package is model-agnostic; the engine supplies the model-specific parts.

    segments.py    split_segments: a prompt cut on separator token ids into head / passages / suffix;
                   SegmentKeys: each segment's chunk keys on its own tokens (position-independent),
                   and where a segment chunk's K is anchored (its segment at position 0).
                   Used on the scheduler side (which chunks of which passages are stored) and at save.
    rope_shift.py  check_shiftable: which RoPE scalings are pure rotations (default, linear, llama3);
                   shift_keys: post-RoPE K moved by a position delta (exact rotation, float64 angles).
                   Used on the worker side when segment chunks are saved (normalised to position 0)
                   and loaded (moved to where the segment now sits).
    selection.py   select_rows: the rows the blended prefill recomputes past the check layer (every
                   uncached row + the top `ratio` of the cached rows by K deviation); random_rows:
                   the same count at random (the benchmark's baseline). Used by the engine's blend
                   prefill (integrations/engine/kvtier_engine/blend.py).

The configuration is `kvtier.config.BlendConfig` (the `blend:` section). Nothing is imported here:
`segments` needs only numpy and xxhash, while `rope_shift` and `selection` import torch.
Everything in the package is pure functions or stateless classes, safe from any thread.
"""
