"""The codec slot: how a chunk's KV bytes are written into a record (`raw`, and `cachegen`, which
quantises KV and entropy-codes the symbols several times below 8 bits; issue 13).

`base` is the `Codec` protocol and the codec ids; `raw` the bytes as kvtier stores them; `cachegen`
the CacheGen codec, made of `quantize` (per-token max-abs scales, bins per layer), `rans` (the
static-model rANS entropy coder, one frequency table per stream), `rans_tables` (building and
storing the tables) and `cachegen_format` (the self-describing, bounds-checked coded record). All
of it is the numpy reference; the C++ implementation planned in `csrc/` is to match it symbol for
symbol and byte for byte. Nothing else in kvtier uses a codec yet (per-tier codecs come next).
"""
