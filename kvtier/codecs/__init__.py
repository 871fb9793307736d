"""The codec slot: how a chunk's KV bytes are written into a record (`raw`, and `cachegen`, which
quantises KV and entropy-codes the symbols several times below 8 bits; issue 13).

`rans` is the entropy coder the cachegen codec uses (static-model rANS, one frequency table per
stream) and `rans_tables` builds and stores its tables; both are the numpy reference, and the C++
implementation in `csrc/` matches them symbol for symbol and byte for byte.
"""
