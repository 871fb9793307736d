// Streaming XXH3-64, taken from the xxhash package's shared object by load() in native_keys.cpp
// (as XXH3-128 is there): the record checksum of kvtier/record.py, computed in checksum_copy.cpp.
#pragma once
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstddef>
#include <cstdint>

namespace kvtier_xxh3 {

// xxhash.h's XXH3_createState, XXH3_freeState, XXH3_64bits_reset, XXH3_64bits_update(_dispatch) and
// XXH3_64bits_digest, with XXH3_state_t* as void* and XXH_errorcode as int (0: ok).
struct Stream {
  void* (*create)() = nullptr;
  int (*free)(void*) = nullptr;
  int (*reset)(void*) = nullptr;
  int (*update)(void*, const void*, size_t) = nullptr;
  uint64_t (*digest)(const void*) = nullptr;
};

extern Stream g_stream;  // every member set by take_stream, or none

// Take the streaming functions from `lib` (a dlopen handle); false, with g_stream left empty,
// where any of them is missing.
bool take_stream(void* lib);

// checksum_copy(fields, src, dst, offset, piece, n_outer, s_outer, n_inner, s_inner) -> int: see
// checksum_copy.cpp.
PyObject* checksum_copy(PyObject*, PyObject* const* args, Py_ssize_t nargs);

// xxh3_chain(acc, sums, key) -> None: XXH3-64's scrambles between blocks, over block sums computed
// elsewhere (kvtier/device_checksum.py); see checksum_copy.cpp.
PyObject* xxh3_chain(PyObject*, PyObject* const* args, Py_ssize_t nargs);

}  // namespace kvtier_xxh3
