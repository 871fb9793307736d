// The quantiser and byte planes (quant.h). Float semantics follow numpy's float32 exactly: x / s *
// M divides then multiplies; rint is round-half-even, done as (v + 1.5 * 2^23) - 1.5 * 2^23, exact
// for |v| < 2^22 (|v| <= M + 1 here) and free of the C library's rounding-mode calls.
#include "quant.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

namespace kvtier {
namespace {

constexpr float kFp16Max = 65504.0f;
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23

inline float to_float(uint16_t bits, bool bf16) {
  if (bf16) return c10::BFloat16(bits, c10::BFloat16::from_bits());
  return c10::Half(bits, c10::Half::from_bits());
}

inline uint16_t from_float(float v, bool bf16) {
  return bf16 ? c10::BFloat16(v).x : c10::Half(v).x;
}

// fp16 bits of max |x| rounded up, so that |x| <= scale after storage (quantize.py `scales`).
uint16_t scale_of(const float* x, int64_t channels) {
  float peak = 0.0f;
  bool bad = false;
  for (int64_t c = 0; c < channels; ++c) {
    const float a = std::fabs(x[c]);
    bad |= !(a <= kFp16Max);  // NaN fails this too
    peak = a > peak ? a : peak;
  }
  if (bad) throw std::invalid_argument("KV values must be finite and within fp16's range to quantise");
  uint16_t h = c10::Half(peak).x;  // peak >= 0: the next fp16 up is the next bit pattern
  if (static_cast<float>(c10::Half(h, c10::Half::from_bits())) < peak) ++h;
  return h;
}

// Symbols of one token's channels; simple enough loops for the compiler to vectorise.
void quantise_row(const float* x, int64_t channels, float safe, float m, uint8_t* out) {
  for (int64_t c = 0; c < channels; ++c) {
    float q = (x[c] / safe * m + kRoundMagic) - kRoundMagic;
    q = q < -m ? -m : q;
    q = q > m ? m : q;
    out[c] = static_cast<uint8_t>(static_cast<int32_t>(q + m));
  }
}

}  // namespace

void quantise(const uint16_t* x, bool bf16, ChunkShape shape, const int64_t* levels, uint16_t* scales,
              uint8_t* symbols, bool by_channel) {
  const int64_t t_n = shape.tokens, c_n = shape.channels;
  // Per-channel streams ([kl][c][t]) are written kBlock tokens at a time: a row of one byte per
  // channel, T bytes apart, would land in a handful of cache sets and evict itself.
  constexpr int64_t kBlock = 64;
  std::vector<float> row(c_n);
  std::vector<uint8_t> block(kBlock * c_n);
  for (int64_t kl = 0; kl < 2 * shape.layers; ++kl) {
    const float m = static_cast<float>(levels[kl]);
    for (int64_t t0 = 0; t0 < t_n; t0 += kBlock) {
      const int64_t rows = std::min(kBlock, t_n - t0);
      for (int64_t t = t0; t < t0 + rows; ++t) {
        const uint16_t* in = x + (kl * t_n + t) * c_n;
        for (int64_t c = 0; c < c_n; ++c) row[c] = to_float(in[c], bf16);
        const uint16_t h = scale_of(row.data(), c_n);
        scales[kl * t_n + t] = h;
        const float s = static_cast<float>(c10::Half(h, c10::Half::from_bits()));
        const float safe = s > 0.0f ? s : 1.0f;  // an all-zero token codes as symbol M (zero)
        uint8_t* out = by_channel ? block.data() + (t - t0) * c_n : symbols + (kl * t_n + t) * c_n;
        quantise_row(row.data(), c_n, safe, m, out);
      }
      if (!by_channel) continue;
      for (int64_t c = 0; c < c_n; ++c) {
        uint8_t* o = symbols + (kl * c_n + c) * t_n + t0;
        for (int64_t r = 0; r < rows; ++r) o[r] = block[r * c_n + c];
      }
    }
  }
}

void dequantise(const uint8_t* symbols, const uint16_t* scales, const int64_t* levels, ChunkShape shape,
                bool bf16, uint16_t* out) {
  const int64_t t_n = shape.tokens, c_n = shape.channels;
  uint16_t lut[256];  // per token: symbol -> output bits (2M + 1 <= 255 symbols vs C channels)
  for (int64_t kl = 0; kl < 2 * shape.layers; ++kl) {
    const int m = static_cast<int>(std::min<int64_t>(levels[kl], 127));
    const float mf = static_cast<float>(m);
    std::fill(lut + 2 * m + 1, lut + 256, uint16_t{0});  // symbols a layer cannot have
    for (int64_t t = 0; t < t_n; ++t) {
      const float step = static_cast<float>(c10::Half(scales[kl * t_n + t], c10::Half::from_bits())) / mf;
      // (s - M) * step is odd in s - M, and so is rounding to nearest even: convert half the values
      lut[m] = from_float(0.0f * step, bf16);  // -0 for a -0 scale, as the reference
      for (int d = 1; d <= m; ++d) {
        const uint16_t v = from_float((static_cast<float>(m + d) - mf) * step, bf16);
        lut[m + d] = v;
        lut[m - d] = v ^ 0x8000;
      }
      const int64_t base = (kl * t_n + t) * c_n;
      for (int64_t c = 0; c < c_n; ++c) out[base + c] = lut[symbols[base + c]];
    }
  }
}

void symbol_counts(const uint8_t* streams, int64_t count, int64_t n, int k, int64_t* counts) {
  for (int64_t s = 0; s < count; ++s) {
    int64_t local[256] = {};
    const uint8_t* row = streams + s * n;
    for (int64_t i = 0; i < n; ++i) ++local[row[i]];
    for (int v = k; v < 256; ++v)
      if (local[v]) throw std::invalid_argument("symbol out of range [0, " + std::to_string(k) + ")");
    std::copy(local, local + k, counts + s * k);
  }
}

void join_planes(const uint8_t* planes, int64_t rows, int64_t n, uint16_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* hi = planes + 2 * r * n;
    const uint8_t* lo = hi + n;
    for (int64_t i = 0; i < n; ++i) out[r * n + i] = static_cast<uint16_t>(hi[i] << 8 | lo[i]);
  }
}

}  // namespace kvtier
