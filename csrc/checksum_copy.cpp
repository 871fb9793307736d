// checksum_copy: a record's XXH3-64 checksum (kvtier/record.py: over the header fields, then the
// payload) computed while the payload is copied into its pieces of a KV tensor, in one pass over
// the payload (kvtier/checksum_copy.py).
//
// Why one pass: a record read with O_DIRECT lands in memory by DMA, so its first reader takes it
// from RAM. Checksumming it and then copying it out read it from RAM twice (a 516 KiB chunk: ~40 us
// and ~67 us here). Copying a 16 KiB block and then hashing that block, still in the L1 cache, reads
// it from RAM once.
//
//   checksum_copy(fields, src, dst, offset, piece, n_outer, s_outer, n_inner, s_inner) -> int
//     src (a readable buffer of n_outer * n_inner * piece bytes) is copied, in order, into the pieces
//     of dst (a writable buffer): piece (o, i) at byte offset + o * s_outer + i * s_inner, `piece`
//     bytes each, o < n_outer, i < n_inner. Returns XXH3-64(fields || src), the digest as an int.
//     ValueError for pieces that overlap each other or src, or reach past dst; nothing is written then.
//
// The GIL is released for the copy: both buffers stay exported (held) until the call returns.
#include "xxh3_stream.h"

#include <dlfcn.h>

#include "held_buffer.h"

#include <algorithm>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace kvtier_xxh3 {

Stream g_stream;

namespace {

constexpr Py_ssize_t kBlockBytes = 16 * 1024;        // copied, then hashed from the L1 cache
constexpr Py_ssize_t kReleaseGilBytes = 64 * 1024;  // below this the GIL is kept (see native_keys.cpp)

using Held = kvtier_native::HeldBuffer;

struct Pieces {
  Py_ssize_t offset, piece, n_outer, s_outer, n_inner, s_inner;
  Py_ssize_t at(Py_ssize_t o, Py_ssize_t i) const { return offset + o * s_outer + i * s_inner; }
};

// Why `p` does not fit a dst of `dst_len` bytes and a src of `src_len` ("" when it does). Every
// product is checked for overflow before it is used.
const char* misfit(const Pieces& p, Py_ssize_t src_len, Py_ssize_t dst_len) {
  if (p.offset < 0 || p.piece <= 0 || p.n_outer <= 0 || p.n_inner <= 0 || p.s_outer < 0 || p.s_inner < 0) {
    return "offset and strides must be >= 0, piece and counts > 0";
  }
  Py_ssize_t total, inner_span, last_outer, last;
  if (__builtin_mul_overflow(p.n_outer, p.n_inner, &total) || __builtin_mul_overflow(total, p.piece, &total) ||
      total != src_len) {
    return "src must hold n_outer * n_inner * piece bytes";
  }
  if (p.n_inner > 1 && p.s_inner < p.piece) return "pieces overlap (s_inner < piece)";
  if (__builtin_mul_overflow(p.n_inner - 1, p.s_inner, &inner_span) ||
      __builtin_add_overflow(inner_span, p.piece, &inner_span)) {
    return "pieces reach past dst";
  }
  if (p.n_outer > 1 && p.s_outer < inner_span) return "pieces overlap (s_outer < one row of pieces)";
  if (__builtin_mul_overflow(p.n_outer - 1, p.s_outer, &last_outer) ||
      __builtin_add_overflow(last_outer, inner_span, &last) || __builtin_add_overflow(last, p.offset, &last) ||
      last > dst_len) {
    return "pieces reach past dst";
  }
  return "";
}

bool take_sizes(PyObject* const* args, Pieces* p) {
  Py_ssize_t* fields[] = {&p->offset, &p->piece, &p->n_outer, &p->s_outer, &p->n_inner, &p->s_inner};
  for (int k = 0; k < 6; ++k) {
    *fields[k] = PyNumber_AsSsize_t(args[3 + k], PyExc_OverflowError);
    if (*fields[k] == -1 && PyErr_Occurred()) return false;
  }
  return true;
}

// memcpy, with non-temporal stores where the CPU has them: the destination is not read again soon
// (the engine reads its KV later, a layer at a time), and a cached store first reads each line it
// writes from RAM, a third more traffic for a copy from RAM.
void copy_block(uint8_t* to, const uint8_t* from, size_t n) {
#if defined(__SSE2__)
  const size_t head = (16 - (reinterpret_cast<uintptr_t>(to) & 15)) & 15;
  if (n < head + 64) {
    std::memcpy(to, from, n);
    return;
  }
  std::memcpy(to, from, head);
  to += head, from += head, n -= head;
  for (; n >= 64; n -= 64, to += 64, from += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(from));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(from + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(from + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(from + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(to), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(to + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(to + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(to + 48), d);
  }
  std::memcpy(to, from, n);
#else
  std::memcpy(to, from, n);
#endif
}

void copy_and_hash(void* state, const uint8_t* src, uint8_t* dst, const Pieces& p) {
  for (Py_ssize_t o = 0; o < p.n_outer; ++o) {
    for (Py_ssize_t i = 0; i < p.n_inner; ++i) {
      uint8_t* to = dst + p.at(o, i);
      for (Py_ssize_t done = 0; done < p.piece; done += kBlockBytes) {
        const size_t n = static_cast<size_t>(std::min(kBlockBytes, p.piece - done));
        copy_block(to + done, src, n);
        g_stream.update(state, src, n);
        src += n;
      }
    }
  }
}

}  // namespace

bool take_stream(void* lib) {
  Stream s;
  s.create = reinterpret_cast<decltype(s.create)>(dlsym(lib, "XXH3_createState"));
  s.free = reinterpret_cast<decltype(s.free)>(dlsym(lib, "XXH3_freeState"));
  s.reset = reinterpret_cast<decltype(s.reset)>(dlsym(lib, "XXH3_64bits_reset"));
  // The x86 dispatching update (AVX2 where the CPU has it) where the build exports it.
  void* update = dlsym(lib, "XXH3_64bits_update_dispatch");
  s.update = reinterpret_cast<decltype(s.update)>(update != nullptr ? update : dlsym(lib, "XXH3_64bits_update"));
  s.digest = reinterpret_cast<decltype(s.digest)>(dlsym(lib, "XXH3_64bits_digest"));
  if (!s.create || !s.free || !s.reset || !s.update || !s.digest) return false;
  g_stream = s;
  return true;
}

PyObject* checksum_copy(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 9) {
    return PyErr_Format(PyExc_TypeError,
                        "checksum_copy(fields, src, dst, offset, piece, n_outer, s_outer, n_inner, s_inner)");
  }
  if (g_stream.create == nullptr) return PyErr_Format(PyExc_RuntimeError, "no streaming XXH3-64 was loaded");
  Held fields, src, dst;
  Pieces p{};
  if (!fields.get(args[0], PyBUF_SIMPLE) || !src.get(args[1], PyBUF_SIMPLE) ||
      !dst.get(args[2], PyBUF_WRITABLE) || !take_sizes(args, &p)) {
    return nullptr;
  }
  if (const char* why = misfit(p, src.view.len, dst.view.len); *why) return PyErr_Format(PyExc_ValueError, "%s", why);
  const auto* from = static_cast<const uint8_t*>(src.view.buf);
  auto* to = static_cast<uint8_t*>(dst.view.buf);
  // The pieces lie within [dst + offset, dst + len): src must lie wholly outside that.
  const auto src_at = reinterpret_cast<uintptr_t>(from), dst_at = reinterpret_cast<uintptr_t>(to);
  if (src_at < dst_at + dst.view.len && dst_at + p.offset < src_at + src.view.len) {
    return PyErr_Format(PyExc_ValueError, "src overlaps dst");
  }
  void* state = g_stream.create();
  if (state == nullptr) return PyErr_NoMemory();
  g_stream.reset(state);
  g_stream.update(state, fields.view.buf, static_cast<size_t>(fields.view.len));
  if (src.view.len < kReleaseGilBytes) {
    copy_and_hash(state, from, to, p);
  } else {
    Py_BEGIN_ALLOW_THREADS copy_and_hash(state, from, to, p);
    Py_END_ALLOW_THREADS
  }
#if defined(__SSE2__)
  _mm_sfence();  // the streamed stores are visible to other threads before this returns
#endif
  const uint64_t digest = g_stream.digest(state);
  g_stream.free(state);
  return PyLong_FromUnsignedLongLong(digest);
}

}  // namespace kvtier_xxh3

namespace kvtier_xxh3 {

// xxh3_chain(acc, sums, key): XXH3-64's block loop over block sums computed elsewhere
// (kvtier/device_checksum.py: on the device that holds the payload). Within a block XXH3 only adds
// into its 8 accumulators, so a block's additions can be summed in parallel; between blocks it
// scrambles them, which is the sequential part done here: for each block b,
//   acc[i] = ((acc[i] + sums[b][i]) ^ ... >> 47 ^ key[i]) * PRIME32_1.
// acc: 64 writable bytes (8 little-endian u64), updated in place; sums: a multiple of 64 bytes;
// key: 64 bytes (the default secret's scramble key).
PyObject* xxh3_chain(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3) return PyErr_Format(PyExc_TypeError, "xxh3_chain(acc, sums, key)");
  Held acc, sums, key;
  if (!acc.get(args[0], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) || !sums.get(args[1], PyBUF_C_CONTIGUOUS) ||
      !key.get(args[2], PyBUF_C_CONTIGUOUS)) {
    return nullptr;
  }
  if (acc.view.len != 64 || key.view.len != 64 || sums.view.len % 64 != 0) {
    return PyErr_Format(PyExc_ValueError, "acc and key are 64 bytes, sums a multiple of 64");
  }
  uint64_t a[8], k[8];
  std::memcpy(a, acc.view.buf, 64);
  std::memcpy(k, key.view.buf, 64);
  const uint8_t* s = sums.data();
  const Py_ssize_t blocks = sums.view.len / 64;
  Py_BEGIN_ALLOW_THREADS
  for (Py_ssize_t b = 0; b < blocks; ++b) {
    for (int i = 0; i < 8; ++i) {
      uint64_t x;
      std::memcpy(&x, s + b * 64 + i * 8, 8);
      uint64_t v = a[i] + x;
      v ^= v >> 47;
      v ^= k[i];
      a[i] = v * 0x9E3779B1ULL;
    }
  }
  Py_END_ALLOW_THREADS
  std::memcpy(acc.view.buf, a, 64);
  Py_RETURN_NONE;
}

}  // namespace kvtier_xxh3
