// The layout of a chunk key (kvtier.keys.ChunkKey's bytes), shared by the files that read keys.
#pragma once
#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace kvtier_keys {

constexpr Py_ssize_t kDigestBytes = 16;    // XXH3-128, canonical (big-endian) form
constexpr Py_ssize_t kNamespaceBytes = 8;  // the namespace digest, first
constexpr Py_ssize_t kKeyBytes = kNamespaceBytes + kDigestBytes;

}  // namespace kvtier_keys
