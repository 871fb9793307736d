// rANS coder of kvtier's cachegen codec: the C++ port of kvtier/codecs/rans.py (the numpy
// reference, which defines the stream format; read its docstring first). Same bytes, same symbols,
// the same checks. Pure C++ over raw pointers: the Python binding (module.cpp) owns the buffers and
// releases the GIL around these calls. Thread-safe: no shared state.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace kvtier {

// A coded stream that is not a valid coding (the reference's CorruptRecord).
struct CorruptStream : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr int kProbBits = 12;
constexpr uint32_t kProbScale = 1u << kProbBits;
constexpr uint32_t kRansL = 1u << 23;
constexpr int kStateBytes = 4;

// Codes S streams of n symbols (row-major [S, n]) with tables freqs [S, k] (each row sums to
// kProbScale: checked by the caller). Appends the streams back to back to `data` and writes each
// one's length to lengths[S]. std::invalid_argument for a symbol >= k or of frequency 0.
void rans_encode(const uint8_t* symbols, int64_t streams, int64_t n, const uint32_t* freqs, int k,
                 std::vector<uint8_t>& data, int64_t* lengths);

// Decodes S streams of `count` symbols each. Stream s's symbol i goes to
// out[(s / group) * count * group + s % group + i * group]: group 1 is the plain [S, count] layout;
// group C writes streams (kv, layer, channel) of tokens straight into a [2, L, T, C] array.
// CorruptStream for anything the reference rejects; never reads outside data[0, size).
void rans_decode(const uint8_t* data, int64_t size, const int64_t* lengths, int64_t streams,
                 const uint32_t* freqs, int k, int64_t count, uint8_t* out, int64_t group);

}  // namespace kvtier
