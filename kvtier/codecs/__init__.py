"""The codec slot: how a chunk's KV bytes are written into a record (`raw`, and `cachegen`, which
quantises KV and entropy-codes the symbols several times below 8 bits; issue 13).

`base` is the `Codec` protocol and the codec ids; `raw` the bytes as kvtier stores them; `cachegen`
the CacheGen codec, made of `quantize` (per-token max-abs scales, bins per layer), `rans` (the
static-model rANS entropy coder, one frequency table per stream), `rans_tables` (building and
storing the tables) and `cachegen_format` (the self-describing, bounds-checked coded record), all
numpy: the reference that defines every byte. `native` runs the heavy steps in the C++ extension
built from `csrc/` (`_cachegen_native`, byte for byte and symbol for symbol the reference; falls
back to it when not built) and is what cachegen uses by default.
"""
