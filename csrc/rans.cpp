// The rANS coder (rans.h): kvtier/codecs/rans.py's stream format, byte for byte.
//
// Speed (measured on the 2-core Xeon this was written on; benchmarks/codec_speed.py):
// - A stream is one serial chain (each symbol's state depends on the previous one), so the coder
//   runs several streams side by side in one unrolled loop (lane counts are template arguments, so
//   each lane's state lives in registers) and the CPU overlaps their chains: the reference's
//   lockstep over all streams, kLanes at a time.
// - Renormalisation is branch-free: whether a symbol moves a byte is a coin flip that a branch
//   predictor cannot learn, and compilers turn the plain C++ into a branch, so on x86-64 it is a
//   compare whose carry both selects the state (cmov) and moves the pointer (adc). 5.2 -> 2.2 ns a
//   symbol decoding, 5.5 -> 2.4 encoding.
// - The decoder's reads are not checked one by one: a stream's pointer may run past its end, into
//   the next stream or into a zero-padded copy of the data's tail (no stream can read past it), and
//   a stream whose pointer ends past its end is rejected afterwards, as the reference rejects the
//   read. So nothing is read outside the caller's buffer, whatever the bytes say.
// - Decoding looks a symbol up by slot in a table per stream; when every frequency of a group's
//   tables is a multiple of 16 (the codec's 8-bit per-channel tables are scaled by 16) the tables
//   have 256 entries instead of 4096, so building them never costs more than the 1K-symbol streams
//   they decode.
// - The encoder divides by multiplying with a rounded reciprocal (exact here, see EncSymbol).
#include "rans.h"

#include <algorithm>
#include <cstring>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace kvtier {
namespace {

constexpr int kLanes = 8;        // decoder
constexpr int kEncodeLanes = 4;  // encoder (measured: 8 spill registers and run slower)
constexpr uint32_t kSlotMask = kProbScale - 1;
constexpr uint32_t kEncodeBound = (kRansL >> kProbBits) << 8;  // x_max = kEncodeBound * freq

[[noreturn]] void corrupt(int64_t stream, const char* what) {
  throw CorruptStream("rANS stream " + std::to_string(stream) + ": " + what);
}

// How the encoder codes one symbol: x -> (x / freq) * 4096 + x % freq + cum, with the division
// done as a multiplication by a rounded reciprocal (ryg's rans_byte.h: exact for x < 2^31, which
// the coder's state always is): q = x * rcp >> 32 >> shift, x' = x + bias + q * (4096 - freq).
struct EncSymbol {
  uint32_t x_max;  // 0 for a symbol that cannot be coded
  uint32_t rcp;
  uint32_t bias;
  uint16_t cmpl;
  uint16_t shift;
};

// The encoder's view of a table, all 256 byte values (x_max 0 beyond k); false unless the table
// sums to kProbScale.
bool pack_table(const uint32_t* f, int k, EncSymbol* out) {
  uint64_t cum = 0;
  for (int s = 0; s < 256; ++s) {
    const uint32_t fs = s < k ? f[s] : 0;
    if (fs > kProbScale || cum + fs > kProbScale) return false;
    EncSymbol e{kEncodeBound * fs, ~0u, static_cast<uint32_t>(cum) + kProbScale - 1,
                static_cast<uint16_t>(kProbScale - fs), 0};
    if (fs >= 2) {
      uint32_t bits = 0;
      while (fs > (1u << bits)) ++bits;
      e.rcp = static_cast<uint32_t>(((1ull << (bits + 31)) + fs - 1) / fs);
      e.shift = static_cast<uint16_t>(bits - 1);
      e.bias = static_cast<uint32_t>(cum);
    }
    out[s] = e;
    cum += fs;
  }
  return cum == kProbScale;
}

// The largest z such that 2^z divides every frequency of a valid table (CorruptStream otherwise).
int table_shift(const uint32_t* f, int k, int64_t stream) {
  uint32_t any = 0;
  uint64_t sum = 0;
  for (int s = 0; s < k; ++s) {
    if (f[s] > kProbScale) corrupt(stream, "table frequency out of range");
    any |= f[s];
    sum += f[s];
  }
  if (sum != kProbScale) corrupt(stream, "table does not sum to the coder's scale");
  return std::min(__builtin_ctz(any), kProbBits);
}

// One table's decoding tables: lut[slot >> shift] = symbol, and fc[symbol] = freq | cum << 16.
void build_tables(const uint32_t* f, int k, int shift, uint8_t* lut, uint32_t* fc) {
  uint32_t cum = 0;
  for (int s = 0; s < k; ++s) {
    fc[s] = f[s] | cum << 16;
    std::fill(lut + (cum >> shift), lut + ((cum + f[s]) >> shift), static_cast<uint8_t>(s));
    cum += f[s];
  }
}

// One step of the encoder's renormalisation: if x >= x_max, emit x's low byte below p and shift it
// out. Branch-free like `renorm`; the byte is always written, and lands where the next one goes
// when it is not emitted.
inline void emit(uint32_t& x, uint8_t*& p, uint32_t x_max) {
  p[-1] = static_cast<uint8_t>(x);
  const uint32_t shifted = x >> 8;
#if defined(__x86_64__)
  asm("cmpl %[m], %[x]\n\tcmovael %[s], %[x]\n\tleaq -1(%[p]), %[p]\n\tadcq $0, %[p]"
      : [x] "+r"(x), [p] "+r"(p)
      : [s] "r"(shifted), [m] "r"(x_max)
      : "cc");
#else
  const uint32_t move = x >= x_max;
  x = move ? shifted : x;
  p -= move;
#endif
}

// Encodes n symbols of `lanes` streams backwards into buffers that end at p[j] (moved to each
// stream's first byte). packed: the lanes' tables (pack_table), 256 entries each.
template <int N>
void encode_lanes(const uint8_t* const* sym, const EncSymbol (*packed)[256], int64_t n, int k, uint8_t** p) {
  uint32_t x[N];
  uint8_t* q[N];
  for (int j = 0; j < N; ++j) x[j] = kRansL, q[j] = p[j];
  for (int64_t i = n - 1; i >= 0; --i) {
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) {
      const EncSymbol& e = packed[j][sym[j][i]];
      if (__builtin_expect(e.x_max == 0, 0)) {
        throw std::invalid_argument(sym[j][i] >= k ? "symbol out of range [0, " + std::to_string(k) + ")"
                                                   : std::string("a symbol with frequency 0 cannot be coded"));
      }
      const EncSymbol sym_e = e;  // a copy: the byte stores below may alias the table
      uint32_t v = x[j];
      emit(v, q[j], sym_e.x_max);  // at most 2 bytes
      emit(v, q[j], sym_e.x_max);
      const uint32_t quot = static_cast<uint32_t>((static_cast<uint64_t>(v) * sym_e.rcp) >> 32) >> sym_e.shift;
      x[j] = v + sym_e.bias + quot * sym_e.cmpl;
    }
  }
  for (int j = 0; j < N; ++j) {
    for (int b = 0; b < kStateBytes; ++b) {  // low byte emitted first: the stream opens big-endian
      *--q[j] = static_cast<uint8_t>(x[j]);
      x[j] >>= 8;
    }
    p[j] = q[j];
  }
}

// One step of the decoder's renormalisation: if x < L, x = x << 8 | *p++, branch-free (see the top
// of this file). Reads *p even when no byte moves: rans_decode guarantees that byte exists.
inline void renorm(uint32_t& x, const uint8_t*& p) {
  const uint32_t next = x << 8 | p[0];
#if defined(__x86_64__)
  asm("cmpl %[l], %[x]\n\tcmovbl %[next], %[x]\n\tadcq $0, %[p]"
      : [x] "+r"(x), [p] "+r"(p)
      : [next] "r"(next), [l] "i"(kRansL)
      : "cc");
#else
  const uint32_t need = x < kRansL;
  x = need ? next : x;
  p += need;
#endif
}

// Decodes `count` symbols of N streams (lane j's tables at lut + j * kProbScale, fc + j * 256) into
// sym[i * N + j]. Reads are not checked against each stream's end: p[j] may run past it (into the
// next stream, or into the caller's padding: at most 2 * count bytes past the stream's state), and
// the caller rejects any stream whose p ends past its end; reading on keeps the loop branch-free.
template <int N, int shift>
void decode_lanes(uint32_t* x, const uint8_t** p, uint8_t* sym, const uint8_t* lut, const uint32_t* fc,
                  int64_t count) {
  uint32_t xs[N];
  const uint8_t* ps[N];
  for (int j = 0; j < N; ++j) xs[j] = x[j], ps[j] = p[j];
  for (int64_t i = 0; i < count; ++i, sym += N) {
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) {
      const uint32_t slot = xs[j] & kSlotMask;
      const uint32_t s = lut[j * kProbScale + (slot >> shift)];
      sym[j] = static_cast<uint8_t>(s);
      const uint32_t e = fc[j * 256 + s];
      // x >> 12 >= 2^11 and freq >= 1, so two bytes always bring x back to [L, 256 L). Masks, not
      // branches: whether a byte moves is a coin flip that a branch predictor cannot learn.
      uint32_t v = (e & 0xFFFF) * (xs[j] >> kProbBits) + slot - (e >> 16);
      renorm(v, ps[j]);
      renorm(v, ps[j]);
      xs[j] = v;
    }
  }
  for (int j = 0; j < N; ++j) x[j] = xs[j], p[j] = ps[j];
}

// Lanes per step for `left` streams still to code: 8, then 4, 2, 1 for the rest.
int lanes_for(int64_t left) {
  return left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
}

// Lane j's symbols (sym[i * lanes + j]) to o[j][i * group]. Eight lanes of plain [S, count] rows
// are an 8 x 8 byte transpose per 8 symbols (SSE2, which every x86-64 has): 17% of the decode as
// byte stores, a few percent as this.
void scatter(const uint8_t* sym, int lanes, int64_t count, int64_t group, uint8_t* const* o) {
  int64_t i = 0;
#if defined(__SSE2__)
  if (lanes == 8 && group == 1) {
    for (; i + 8 <= count; i += 8) {
      const __m128i* in = reinterpret_cast<const __m128i*>(sym + i * 8);
      const __m128i a = _mm_loadu_si128(in), b = _mm_loadu_si128(in + 1);  // rows i .. i + 3
      const __m128i c = _mm_loadu_si128(in + 2), d = _mm_loadu_si128(in + 3);  // rows i + 4 .. i + 7
      const __m128i x0 = _mm_unpacklo_epi8(a, _mm_srli_si128(a, 8)), x1 = _mm_unpacklo_epi8(b, _mm_srli_si128(b, 8));
      const __m128i x2 = _mm_unpacklo_epi8(c, _mm_srli_si128(c, 8)), x3 = _mm_unpacklo_epi8(d, _mm_srli_si128(d, 8));
      const __m128i y0 = _mm_unpacklo_epi16(x0, x1), y1 = _mm_unpackhi_epi16(x0, x1);
      const __m128i y2 = _mm_unpacklo_epi16(x2, x3), y3 = _mm_unpackhi_epi16(x2, x3);
      const __m128i z[4] = {_mm_unpacklo_epi32(y0, y2), _mm_unpackhi_epi32(y0, y2),
                            _mm_unpacklo_epi32(y1, y3), _mm_unpackhi_epi32(y1, y3)};  // lanes 2k, 2k + 1
      for (int k = 0; k < 4; ++k) {
        _mm_storel_epi64(reinterpret_cast<__m128i*>(o[2 * k] + i), z[k]);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(o[2 * k + 1] + i), _mm_unpackhi_epi64(z[k], z[k]));
      }
    }
  }
#endif
  for (int j = 0; j < lanes; ++j) {
    for (int64_t r = i; r < count; ++r) o[j][r * group] = sym[r * lanes + j];
  }
}

// Where each stream starts; CorruptStream unless every length is >= 4 and they add up to `size`.
std::vector<int64_t> stream_starts(const int64_t* lengths, int64_t streams, int64_t size) {
  std::vector<int64_t> starts(streams);
  int64_t total = 0;
  bool fits = true;
  for (int64_t s = 0; s < streams && fits; ++s) {
    fits = lengths[s] >= kStateBytes && lengths[s] <= size - total;
    starts[s] = total;
    total += fits ? lengths[s] : 0;
  }
  if (!fits || total != size)
    throw CorruptStream("rANS stream lengths do not add up to the " + std::to_string(size) + " data bytes");
  return starts;
}

}  // namespace

void rans_encode(const uint8_t* symbols, int64_t streams, int64_t n, const uint32_t* freqs, int k,
                 std::vector<uint8_t>& data, int64_t* lengths) {
  const int64_t cap = 2 * n + kStateBytes + 1;  // at most 2 bytes a symbol, and one stray write
  std::vector<uint8_t> scratch(kEncodeLanes * cap);
  EncSymbol packed[kEncodeLanes][256];
  for (int64_t s0 = 0; s0 < streams;) {
    const int lanes = lanes_for(std::min<int64_t>(kEncodeLanes, streams - s0));
    uint8_t* p[kEncodeLanes];
    const uint8_t* sym[kEncodeLanes];
    for (int j = 0; j < lanes; ++j) {
      if (!pack_table(freqs + (s0 + j) * k, k, packed[j]))
        throw std::invalid_argument("table " + std::to_string(s0 + j) + " does not sum to the coder's scale");
      p[j] = scratch.data() + (j + 1) * cap;  // bytes are emitted last first: fill from the end
      sym[j] = symbols + (s0 + j) * n;
    }
    switch (lanes) {
      case 4: encode_lanes<4>(sym, packed, n, k, p); break;
      case 2: encode_lanes<2>(sym, packed, n, k, p); break;
      default: encode_lanes<1>(sym, packed, n, k, p);
    }
    for (int j = 0; j < lanes; ++j) {
      uint8_t* end = scratch.data() + (j + 1) * cap;
      lengths[s0 + j] = end - p[j];
      data.insert(data.end(), p[j], end);
    }
    s0 += lanes;
  }
}

void rans_decode(const uint8_t* data, int64_t size, const int64_t* lengths, int64_t streams,
                 const uint32_t* freqs, int k, int64_t count, uint8_t* out, int64_t group) {
  const std::vector<int64_t> starts = stream_starts(lengths, streams, size);
  // A stream reads at most 2 * count bytes after its state. The streams that could read past the
  // data's end are decoded from a zero-padded copy of the data's tail instead.
  const int64_t reach = kStateBytes + 2 * count;
  int64_t tail_from = streams;
  while (tail_from > 0 && starts[tail_from - 1] + reach > size) --tail_from;
  const int64_t tail_at = tail_from < streams ? starts[tail_from] : size;
  std::vector<uint8_t> tail(size - tail_at + reach, 0);
  std::copy(data + tail_at, data + size, tail.begin());
  std::vector<uint8_t> lut(kLanes * kProbScale);
  std::vector<uint32_t> fc(kLanes * 256);
  std::vector<uint8_t> sym(kLanes * count);
  for (int64_t s0 = 0; s0 < streams;) {
    const int lanes = lanes_for(streams - s0);
    uint32_t x[kLanes];
    const uint8_t* p[kLanes];
    const uint8_t* end[kLanes];
    uint8_t* o[kLanes];
    int shift = kProbBits;
    for (int j = 0; j < lanes; ++j) shift = std::min(shift, table_shift(freqs + (s0 + j) * k, k, s0 + j));
    shift = shift >= 4 ? 4 : 0;  // the two table sizes the loop is compiled for
    for (int j = 0; j < lanes; ++j) {
      const int64_t s = s0 + j;
      build_tables(freqs + s * k, k, shift, lut.data() + j * kProbScale, fc.data() + j * 256);
      p[j] = s < tail_from ? data + starts[s] : tail.data() + (starts[s] - tail_at);
      end[j] = p[j] + lengths[s];
      x[j] = uint32_t(p[j][0]) << 24 | uint32_t(p[j][1]) << 16 | uint32_t(p[j][2]) << 8 | p[j][3];
      p[j] += kStateBytes;
      if (x[j] < kRansL || x[j] >= kRansL << 8) corrupt(s, "start state out of range");
      o[j] = out + (s / group) * count * group + s % group;
    }
    switch (lanes * 16 + shift) {
      case 8 * 16 + 4: decode_lanes<8, 4>(x, p, sym.data(), lut.data(), fc.data(), count); break;
      case 8 * 16: decode_lanes<8, 0>(x, p, sym.data(), lut.data(), fc.data(), count); break;
      case 4 * 16 + 4: decode_lanes<4, 4>(x, p, sym.data(), lut.data(), fc.data(), count); break;
      case 4 * 16: decode_lanes<4, 0>(x, p, sym.data(), lut.data(), fc.data(), count); break;
      case 2 * 16 + 4: decode_lanes<2, 4>(x, p, sym.data(), lut.data(), fc.data(), count); break;
      case 2 * 16: decode_lanes<2, 0>(x, p, sym.data(), lut.data(), fc.data(), count); break;
      case 16 + 4: decode_lanes<1, 4>(x, p, sym.data(), lut.data(), fc.data(), count); break;
      default: decode_lanes<1, 0>(x, p, sym.data(), lut.data(), fc.data(), count);
    }
    if (group >= kLanes && s0 % group + lanes <= group) {
      // the lanes are neighbouring channels: their symbol i is one run of bytes in the output
      for (int64_t i = 0; i < count; ++i) std::memcpy(o[0] + i * group, sym.data() + i * lanes, lanes);
    } else {
      scatter(sym.data(), lanes, count, group, o);
    }
    for (int j = 0; j < lanes; ++j) {
      if (p[j] > end[j]) corrupt(s0 + j, "stream ends before its symbols do");
      if (x[j] != kRansL) corrupt(s0 + j, "final state is not the initial one");
      if (p[j] != end[j]) corrupt(s0 + j, "bytes left over after the last symbol");
    }
    s0 += lanes;
  }
}

}  // namespace kvtier
