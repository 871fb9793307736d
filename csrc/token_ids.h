// Token ids as little-endian u32, the bytes a chunk key hashes: from the items of a list or tuple,
// or from a 1-D native-order integer buffer (numpy). Each converter answers false (no error set)
// for an id outside [0, 2**32) or an item that is not an exact int, so that every refusal and its
// wording stay in Python (kvtier/keys.py). The caller holds the GIL: the source may be mutable.
#pragma once
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "held_buffer.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "kvtier's token ids are written as host-order u32, taken to be little-endian"
#endif

namespace kvtier_ids {

// Exact ints only: a bool, an int subclass or anything else is Python's to judge, as is an id
// outside [0, 2**32) (PyLong_AsUnsignedLongLong: -1 and an error, cleared here).
inline bool ids_of_items(PyObject* const* items, Py_ssize_t n, uint32_t* dst) {
  for (Py_ssize_t i = 0; i < n; ++i) {
    const unsigned long long v = PyLong_CheckExact(items[i]) ? PyLong_AsUnsignedLongLong(items[i]) : ~0ull;
    if (v > 0xFFFFFFFFull) {
      PyErr_Clear();
      return false;
    }
    dst[i] = static_cast<uint32_t>(v);
  }
  return true;
}

// dst = src[0:n] as u32. Branch-free, so it vectorises: a signed id sign-extends, so a negative one
// sets the high word as one >= 2**32 does. The source is prefetched kAheadBytes ahead, up to
// `readable_end` (the buffer's end, which may lie past this call's n ids): a hardware prefetcher
// stops at each 4 KiB page, and a new prompt's tokens are cold (out of every cache).
constexpr Py_ssize_t kPageBytes = 4096;
constexpr Py_ssize_t kAheadBytes = 2 * kPageBytes;

template <typename T>
bool narrow(const uint8_t* src, Py_ssize_t n, uint32_t* dst, const uint8_t* readable_end) {
  constexpr Py_ssize_t kPage = kPageBytes / sizeof(T);
  uint64_t high = 0;
  for (Py_ssize_t page = 0; page < n; page += kPage) {
    const uint8_t* ahead = src + page * sizeof(T) + kAheadBytes;
    for (Py_ssize_t j = 0; j < kPageBytes && ahead + j < readable_end; j += 64) __builtin_prefetch(ahead + j);
    const Py_ssize_t stop = std::min(n, page + kPage);
    for (Py_ssize_t i = page; i < stop; ++i) {
      T v;
      std::memcpy(&v, src + i * sizeof(T), sizeof(T));  // numpy arrays need not be aligned
      uint64_t wide;
      if constexpr (std::is_signed_v<T>) {
        wide = static_cast<uint64_t>(static_cast<int64_t>(v));
      } else {
        wide = static_cast<uint64_t>(v);
      }
      high |= wide >> 32;
      dst[i] = static_cast<uint32_t>(wide);
    }
  }
  return high == 0;
}

using Narrow = bool (*)(const uint8_t*, Py_ssize_t, uint32_t*, const uint8_t*);

// The converter of a 1-D native-order integer buffer (struct format codes, size from itemsize),
// else null (floats, bools '?', big-endian, several dimensions ...).
inline Narrow narrower(const Py_buffer& view) {
  if (view.ndim != 1) return nullptr;
  const char* f = view.format != nullptr ? view.format : "B";
  if (*f == '@' || *f == '=' || *f == '<') ++f;  // all this (little-endian) machine's order
  if (f[0] == '\0' || f[1] != '\0') return nullptr;
  const bool is_signed = std::strchr("bhilqn", f[0]) != nullptr;
  if (!is_signed && std::strchr("BHILQN", f[0]) == nullptr) return nullptr;
  switch (view.itemsize) {
    case 1: return is_signed ? narrow<int8_t> : narrow<uint8_t>;
    case 2: return is_signed ? narrow<int16_t> : narrow<uint16_t>;
    case 4: return is_signed ? narrow<int32_t> : narrow<uint32_t>;
    case 8: return is_signed ? narrow<int64_t> : narrow<uint64_t>;
    default: return nullptr;
  }
}

// The ids of `tokens` one range at a time: a list or tuple's items, or a 1-D integer buffer's.
struct IdSource {
  kvtier_native::HeldBuffer buffer;
  Narrow convert = nullptr;
  PyObject* const* items = nullptr;
  bool of_items = false;
  Py_ssize_t n = 0;

  bool open(PyObject* tokens) {  // false (no error set) for what Python must judge
    if (PyList_CheckExact(tokens) || PyTuple_CheckExact(tokens)) {  // (an empty list's items are null)
      items = PySequence_Fast_ITEMS(tokens), n = PySequence_Fast_GET_SIZE(tokens), of_items = true;
      return true;
    }
    if (!buffer.get(tokens, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)) {
      PyErr_Clear();
      return false;
    }
    convert = narrower(buffer.view);
    n = convert != nullptr ? buffer.view.shape[0] : 0;
    return convert != nullptr;
  }
  bool read(Py_ssize_t begin, Py_ssize_t len, uint32_t* dst) const {
    if (of_items) return ids_of_items(items + begin, len, dst);
    return convert(buffer.data() + begin * buffer.view.itemsize, len, dst, buffer.data() + buffer.view.len);
  }
};

}  // namespace kvtier_ids
