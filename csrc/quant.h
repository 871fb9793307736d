// CacheGen's quantiser and the lossless byte planes: the C++ port of kvtier/codecs/quantize.py
// (the numpy reference: scales, quantize, dequantize) and of the plane split in
// kvtier/codecs/cachegen.py, fused so that one pass reads or writes the 16-bit KV. Results are bit
// for bit the reference's: the same float32 operations in the same order (built with
// -ffp-contract=off so no multiply-add is fused), fp16/bf16 rounded to nearest even like torch's
// copy. Pure C++ over raw pointers; thread-safe.
#pragma once

#include <cstdint>

namespace kvtier {

// A chunk [2, L, T, C] of 16-bit floats (fp16, or bf16 when `bf16`), as its raw bits.
struct ChunkShape {
  int64_t layers, tokens, channels;
};

// Per (kv, layer, token): the fp16 max-abs scale rounded up (scales [2, L, T], fp16 bits) and the
// symbols round(x / scale * M) + M with M = levels[kv * L + layer]. Symbols go in stream order:
// [2, L, T, C] or, when `by_channel`, [2, L, C, T]. std::invalid_argument for a value that is not
// finite or beyond fp16's range (the reference's ValueError).
void quantise(const uint16_t* x, bool bf16, ChunkShape shape, const int64_t* levels, uint16_t* scales,
              uint8_t* symbols, bool by_channel);

// x_hat = (s - M) * (scale / M), rounded to fp16/bf16, into out [2, L, T, C] from symbols
// [2, L, T, C] with M = levels[kv * L + layer] in [1, 127]. A symbol above 2M (which no valid record
// has: its tables give such symbols no frequency) decodes as 0.
void dequantise(const uint8_t* symbols, const uint16_t* scales, const int64_t* levels, ChunkShape shape,
                bool bf16, uint16_t* out);

// counts[S, k] of each stream's symbols (streams [S, n]); std::invalid_argument for a symbol >= k.
void symbol_counts(const uint8_t* streams, int64_t count, int64_t n, int k, int64_t* counts);

// The lossless planes [2 * L, 2, n] (high bytes, then low bytes) joined into values [2 * L, n].
void join_planes(const uint8_t* planes, int64_t rows, int64_t n, uint16_t* out);

}  // namespace kvtier
