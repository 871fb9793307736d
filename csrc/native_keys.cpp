// kvtier._native_keys: a prompt's chunk keys in C, for the lookup hot path (kvtier/native_keys.py).
//
// Each call is the C twin of a Python function in kvtier/keys.py, which defines its result:
//   u32(tokens)           the little-endian u32 bytes of a list/tuple of ints or of a 1-D, C-contiguous,
//                         native-order integer buffer (numpy); None for anything else, a bad id
//                         included, so that every refusal and its wording stay in Python.
//   digests(raw, seed, ends, start)
//                         chained_digests(); None for ends it does not take (out of order or past raw).
//   chunk_keys(raw, start, seed, ns, chunk_size, partial, key_type)
//                         the keys TokenDatabase.keys builds from chunk `start / chunk_size` on, each a
//                         `key_type` (a bytes subclass without slots: ChunkKey) holding ns + digest.
//   packed_keys(tokens, ns, chunk_size, partial)
//                         the bytes of chunk_keys(u32(tokens), 0, ns, ns, ...) as one bytes (24 per
//                         key), converted and hashed in one pass: the lookup's keys, no object each.
//   keys_of(packed, start, stop, key_type)
//                         key objects of some of those.
//   bytes_at(address, length)
//                         a read-only memoryview of a CPU tensor's memory, for u32 and packed_keys.
//   load(path)            takes XXH3-128 from the xxhash package's shared object (below), and the
//                         streaming XXH3-64 that checksum_copy (checksum_copy.cpp) uses.
//   checksum_copy(...)    a record's checksum, computed while its payload is copied out (one pass).
//   read_record(...)      a record file's open, read and close with the GIL released once (record_read.cpp).
//   KeyTable()            a set of 24-byte keys whose prefix(keys) / prefix_packed(packed) /
//                         present(keys) prefetch a batch of slots before probing them: the CPU
//                         tier's mirror for the lookup (key_table.cpp).
//
// XXH3 is not compiled in: load() dlopens the `xxhash` Python package's own extension (loaded
// already) and takes its exported XXH3_128bits, so the digests are xxhash.xxh3_128_digest's by
// construction; native_keys.py checks a few vectors at import and uses Python on any mismatch.
//
// The GIL is held while converting (the source list or array may be mutable) and released while
// hashing a large input (kReleaseGilBytes): only immutable or buffer-pinned memory is read then.
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>

#include "chunk_key.h"
#include "held_buffer.h"
#include "key_table.h"
#include "record_read.h"
#include "token_ids.h"
#include "xxh3_stream.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <new>
#include <utility>
#include <vector>

namespace {

struct Hash128 {  // XXH128_hash_t of xxhash.h, returned by value
  uint64_t low64;
  uint64_t high64;
};
using Xxh3_128 = Hash128 (*)(const void*, size_t);
Xxh3_128 g_xxh3_128 = nullptr;

using kvtier_keys::kDigestBytes;
using kvtier_keys::kKeyBytes;
using kvtier_keys::kNamespaceBytes;
// Below this many bytes hashed (~4 us), the GIL is kept: getting it back after another thread took
// it can cost more than the hashing (the engine's block hashes are a few blocks per step).
constexpr Py_ssize_t kReleaseGilBytes = 64 * 1024;

using Buffer = kvtier_native::HeldBuffer;

void put_be64(uint8_t* out, uint64_t v) {
  for (int i = 7; i >= 0; --i, v >>= 8) out[i] = static_cast<uint8_t>(v);
}

// digest = XXH3-128(bytes[0:len]) in canonical form (high64 then low64, big-endian): one link of a
// chain, whose `bytes` are the parent digest (or seed) followed by the chunk's u32 tokens.
void digest_into(const uint8_t* bytes, size_t len, uint8_t* digest) {
  const Hash128 h = g_xxh3_128(bytes, len);
  put_be64(digest, h.high64);
  put_be64(digest + 8, h.low64);
}

// out[16 i : 16 i + 16] = XXH3-128(parent || tokens [ends[i-1], ends[i])) in canonical form (high64
// then low64, big-endian), parent = seed for i = 0, else digest i - 1. `data` holds the u32 tokens
// from token `first` on, where ends[-1] is taken to be; scratch holds max(seed, 16) + the widest chunk.
void chain(const uint8_t* data, Py_ssize_t first, const std::vector<Py_ssize_t>& ends, const uint8_t* seed,
           Py_ssize_t seed_len, uint8_t* scratch, uint8_t* out) {
  const uint8_t* parent = seed;
  Py_ssize_t parent_len = seed_len, prev = first;
  for (size_t i = 0; i < ends.size(); ++i) {
    // One-shot hash of a contiguous copy: a streaming state would need xxhash's private layout.
    const size_t len = 4 * static_cast<size_t>(ends[i] - prev);
    std::memcpy(scratch, parent, parent_len);
    std::memcpy(scratch + parent_len, data + 4 * (prev - first), len);
    uint8_t* digest = out + i * kDigestBytes;
    digest_into(scratch, parent_len + len, digest);
    parent = digest, parent_len = kDigestBytes, prev = ends[i];
  }
}

// chain() over `ends` into a new buffer of digests; the GIL released for a large input. Empty on
// std::bad_alloc, with MemoryError set.
std::vector<uint8_t> hashed(const uint8_t* data, Py_ssize_t first, const std::vector<Py_ssize_t>& ends,
                            const uint8_t* seed, Py_ssize_t seed_len) {
  Py_ssize_t widest = 0, prev = first;
  for (Py_ssize_t end : ends) widest = std::max(widest, end - prev), prev = end;
  std::vector<uint8_t> out, scratch;
  try {
    out.resize(ends.size() * kDigestBytes);
    scratch.resize(std::max(seed_len, kDigestBytes) + 4 * widest);
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
    return {};
  }
  if (4 * (prev - first) < kReleaseGilBytes) {
    chain(data, first, ends, seed, seed_len, scratch.data(), out.data());
  } else {
    Py_BEGIN_ALLOW_THREADS chain(data, first, ends, seed, seed_len, scratch.data(), out.data());
    Py_END_ALLOW_THREADS
  }
  return out;
}

// -- u32 -------------------------------------------------------------------------------------------

using kvtier_ids::IdSource;

PyObject* u32(PyObject*, PyObject* tokens) {
  IdSource ids;
  if (!ids.open(tokens)) Py_RETURN_NONE;
  PyObject* out = PyBytes_FromStringAndSize(nullptr, 4 * ids.n);
  if (out != nullptr && !ids.read(0, ids.n, reinterpret_cast<uint32_t*>(PyBytes_AS_STRING(out)))) {
    Py_DECREF(out);
    Py_RETURN_NONE;
  }
  return out;
}

// -- digests and keys ------------------------------------------------------------------------------

// Any integer Python takes as an index (int, numpy integer, bool), as the Python path does.
bool take_index(PyObject* obj, Py_ssize_t* out) {
  PyObject* index = PyNumber_Index(obj);
  if (index == nullptr) return false;
  *out = PyLong_AsSsize_t(index);
  Py_DECREF(index);
  return !(*out == -1 && PyErr_Occurred());
}

// A read-only memoryview of `length` bytes at `address`: a CPU tensor's own memory, which
// kvtier/native_keys.py reads this way while its caller holds the tensor (tensor.numpy() costs more
// than the lookup itself when cold). Nothing here can check the address: its one caller passes a
// tensor's data_ptr() and nbytes, and drops the view before the call that made it returns.
PyObject* bytes_at(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) return PyErr_Format(PyExc_TypeError, "bytes_at(address, length)");
  void* address = PyLong_AsVoidPtr(args[0]);
  Py_ssize_t length;
  if ((address == nullptr && PyErr_Occurred()) || !take_index(args[1], &length)) return nullptr;
  if (address == nullptr || length < 0) return PyErr_Format(PyExc_ValueError, "bytes_at: no address, or length < 0");
  return PyMemoryView_FromMemory(static_cast<char*>(address), length, PyBUF_READ);
}

// The ends of chained_digests(raw, seed, ends, start), when each lies in [previous, last token of raw].
// False (no error set) for any other, which the Python loop takes.
bool read_ends(PyObject* seq, Py_ssize_t start, Py_ssize_t tokens, std::vector<Py_ssize_t>& ends) {
  if (!PyList_CheckExact(seq) && !PyTuple_CheckExact(seq)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  ends.reserve(n);
  Py_ssize_t prev = start;
  for (Py_ssize_t i = 0; i < n; ++i) {
    Py_ssize_t end;
    // (end - start: no overflow, as start >= 0 (checked by the caller) and end >= prev >= start)
    if (!PyLong_CheckExact(items[i]) || !take_index(items[i], &end) || end < prev || end - start > tokens) {
      PyErr_Clear();
      return false;
    }
    ends.push_back(prev = end);
  }
  return true;
}

PyObject* digests(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4) return PyErr_Format(PyExc_TypeError, "digests(raw, seed, ends, start)");
  if (g_xxh3_128 == nullptr) return PyErr_Format(PyExc_RuntimeError, "load() was not called");
  Buffer raw, seed;
  Py_ssize_t start;
  if (!raw.get(args[0], PyBUF_SIMPLE) || !seed.get(args[1], PyBUF_SIMPLE) || !take_index(args[3], &start)) {
    return nullptr;
  }
  std::vector<Py_ssize_t> ends;
  if (start < 0 || !read_ends(args[2], start, raw.view.len / 4, ends)) Py_RETURN_NONE;
  const std::vector<uint8_t> out = hashed(raw.data(), start, ends, seed.data(), seed.view.len);
  if (PyErr_Occurred()) return nullptr;
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(ends.size()));
  for (size_t i = 0; list != nullptr && i < ends.size(); ++i) {
    PyObject* d = PyBytes_FromStringAndSize(reinterpret_cast<const char*>(out.data()) + i * kDigestBytes, kDigestBytes);
    if (d == nullptr) Py_CLEAR(list);
    else PyList_SET_ITEM(list, i, d);
  }
  return list;
}

// `obj` as a type new_key can fill: a bytes subclass whose instances are laid out as bytes (no
// __dict__, no slots); else null, with TypeError set.
PyTypeObject* key_type_of(PyObject* obj) {
  auto* type = PyType_Check(obj) ? reinterpret_cast<PyTypeObject*>(obj) : nullptr;
  if (type != nullptr && PyType_IsSubtype(type, &PyBytes_Type) && type->tp_basicsize == PyBytes_Type.tp_basicsize &&
      type->tp_itemsize == PyBytes_Type.tp_itemsize && type->tp_dictoffset == 0) {
    return type;
  }
  PyErr_SetString(PyExc_TypeError, "key_type must be a bytes subclass laid out as bytes (__slots__ = ())");
  return nullptr;
}

// type(ns + digest) as bytes.__new__(type, ns + digest) makes it (CPython's bytes_subtype_new),
// without the temporary bytes: the subtype's own allocator, then the hash marked "not computed".
// Then untracked by the cycle collector: a key refers to nothing but its type, so it can never be
// part of a garbage cycle, and an index of 100K keys no longer adds 100K objects to every full
// collection (nor 128 to each young one per 32K-token lookup). Deallocation copes with either state.
PyObject* new_key(PyTypeObject* type, const uint8_t* ns, const uint8_t* digest) {
  PyObject* key = type->tp_alloc(type, kKeyBytes);
  if (key == nullptr) return nullptr;
  char* s = PyBytes_AS_STRING(key);
  std::memcpy(s, ns, kNamespaceBytes);
  std::memcpy(s + kNamespaceBytes, digest, kDigestBytes);
  s[kKeyBytes] = '\0';
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#endif
  reinterpret_cast<PyBytesObject*>(key)->ob_shash = -1;
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
  if (PyType_IS_GC(type)) PyObject_GC_UnTrack(key);
  return key;
}

// [type(ns_i + digest_i) for i in range(n)], `parts(i)` giving (ns_i, digest_i); null on an error.
template <typename Parts>
PyObject* key_list(PyTypeObject* type, Py_ssize_t n, Parts parts) {
  PyObject* list = PyList_New(n);
  for (Py_ssize_t i = 0; list != nullptr && i < n; ++i) {
    const auto [ns, digest] = parts(i);
    PyObject* key = new_key(type, ns, digest);
    if (key == nullptr) Py_CLEAR(list);
    else PyList_SET_ITEM(list, i, key);
  }
  return list;
}

struct KeyArgs {
  Buffer raw, seed, ns;
  Py_ssize_t start = 0, size = 0;
  int partial = 0;
  PyTypeObject* type = nullptr;
};

bool parse_key_args(PyObject* const* args, KeyArgs& a) {
  if (!a.raw.get(args[0], PyBUF_SIMPLE) || !take_index(args[1], &a.start) || !a.seed.get(args[2], PyBUF_SIMPLE) ||
      !a.ns.get(args[3], PyBUF_SIMPLE) || !take_index(args[4], &a.size) || (a.partial = PyObject_IsTrue(args[5])) < 0) {
    return false;
  }
  if ((a.type = key_type_of(args[6])) == nullptr) return false;
  const Py_ssize_t n = a.raw.view.len / 4;
  if (a.raw.view.len % 4 || a.ns.view.len != kNamespaceBytes || a.size <= 0 || a.start < 0 || a.start > n ||
      a.start % a.size) {
    PyErr_SetString(PyExc_ValueError, "chunk_keys: raw must hold u32 tokens, ns 8 bytes, start a chunk "
                                      "boundary within raw, chunk_size > 0");
    return false;
  }
  return true;
}

PyObject* chunk_keys(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 7) {
    return PyErr_Format(PyExc_TypeError, "chunk_keys(raw, start, seed, ns, chunk_size, partial, key_type)");
  }
  if (g_xxh3_128 == nullptr) return PyErr_Format(PyExc_RuntimeError, "load() was not called");
  KeyArgs a;
  if (!parse_key_args(args, a)) return nullptr;
  const Py_ssize_t n = a.raw.view.len / 4;
  std::vector<Py_ssize_t> ends;
  for (Py_ssize_t end = a.start + a.size; end <= n; end += a.size) ends.push_back(end);
  if (a.partial && n % a.size && n > a.start) ends.push_back(n);
  const std::vector<uint8_t> out = hashed(a.raw.data() + 4 * a.start, a.start, ends, a.seed.data(), a.seed.view.len);
  if (PyErr_Occurred()) return nullptr;
  const uint8_t* ns = a.ns.data();
  return key_list(a.type, static_cast<Py_ssize_t>(ends.size()), [&](Py_ssize_t i) {
    return std::make_pair(ns, out.data() + i * kDigestBytes);
  });
}

// -- packed keys -----------------------------------------------------------------------------------

// A prompt's keys from chunk 0 as one bytes, 24 per chunk (ns || digest: TokenDatabase.keys's bytes),
// made in one pass over the ids: each chunk is converted into the scratch behind its parent digest
// and hashed while it is in L1, so no u32 copy of the prompt is written and read back, and no key
// object is made (keys_of makes those that are wanted). False for ids Python must judge (any of
// them, those past the last key included). `scratch` holds 16 + 4 * min(size, n) bytes. The GIL
// is held throughout: the ids may be mutable.
bool pack_keys(const IdSource& ids, Py_ssize_t size, Py_ssize_t count, const uint8_t* ns, uint8_t* scratch,
               uint8_t* out) {
  const uint8_t* parent = ns;
  Py_ssize_t parent_len = kNamespaceBytes;
  for (Py_ssize_t i = 0; i < count; ++i) {
    const Py_ssize_t begin = i * size, len = std::min(size, ids.n - begin);
    std::memcpy(scratch, parent, parent_len);
    if (!ids.read(begin, len, reinterpret_cast<uint32_t*>(scratch + parent_len))) return false;
    uint8_t* key = out + i * kKeyBytes;
    std::memcpy(key, ns, kNamespaceBytes);
    digest_into(scratch, parent_len + 4 * len, key + kNamespaceBytes);
    parent = key + kNamespaceBytes, parent_len = kDigestBytes;
  }
  // Ids past the last key (a tail when not `partial`, a prompt under a chunk) are judged too, as
  // the u32 conversion of the whole prompt would: a bad one anywhere leaves the prompt to Python.
  for (Py_ssize_t begin = count * size; begin < ids.n; begin += size) {
    if (!ids.read(begin, std::min(size, ids.n - begin), reinterpret_cast<uint32_t*>(scratch + kDigestBytes))) {
      return false;
    }
  }
  return true;
}

PyObject* packed_keys(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4) return PyErr_Format(PyExc_TypeError, "packed_keys(tokens, ns, chunk_size, partial)");
  if (g_xxh3_128 == nullptr) return PyErr_Format(PyExc_RuntimeError, "load() was not called");
  Buffer ns;
  Py_ssize_t size;
  int partial;
  if (!ns.get(args[1], PyBUF_SIMPLE) || !take_index(args[2], &size) || (partial = PyObject_IsTrue(args[3])) < 0) {
    return nullptr;
  }
  if (ns.view.len != kNamespaceBytes || size <= 0) {
    return PyErr_Format(PyExc_ValueError, "packed_keys: ns must be 8 bytes, chunk_size > 0");
  }
  IdSource ids;
  if (!ids.open(args[0])) Py_RETURN_NONE;
  const Py_ssize_t count = ids.n / size + (partial && ids.n % size);
  std::vector<uint8_t> scratch;
  try {
    scratch.resize(kDigestBytes + 4 * std::min(size, ids.n));
  } catch (const std::bad_alloc&) {
    return PyErr_NoMemory();
  }
  PyObject* out = PyBytes_FromStringAndSize(nullptr, count * kKeyBytes);
  if (out == nullptr) return nullptr;
  if (!pack_keys(ids, size, count, ns.data(), scratch.data(), reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(out)))) {
    Py_DECREF(out);
    Py_RETURN_NONE;
  }
  return out;
}

// [key_type(packed[24 i : 24 i + 24]) for i in range(start, stop)]
PyObject* keys_of(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4) return PyErr_Format(PyExc_TypeError, "keys_of(packed, start, stop, key_type)");
  Buffer packed;
  Py_ssize_t start, stop;
  if (!packed.get(args[0], PyBUF_SIMPLE) || !take_index(args[1], &start) || !take_index(args[2], &stop)) {
    return nullptr;
  }
  PyTypeObject* type = key_type_of(args[3]);
  if (type == nullptr) return nullptr;
  if (packed.view.len % kKeyBytes || start < 0 || stop < start || stop > packed.view.len / kKeyBytes) {
    return PyErr_Format(PyExc_ValueError, "keys_of: packed must hold 24-byte keys, 0 <= start <= stop <= keys");
  }
  const uint8_t* first = packed.data() + start * kKeyBytes;
  return key_list(type, stop - start, [first](Py_ssize_t i) {
    const uint8_t* key = first + i * kKeyBytes;
    return std::make_pair(key, key + kNamespaceBytes);
  });
}

// -- loading XXH3 ----------------------------------------------------------------------------------

// The x86 dispatching entry (AVX2/AVX-512 where the CPU has them, as xxhash's own Python functions
// call) where the build exports it, else the portable one: the same function of the input.
PyObject* load(PyObject*, PyObject* path_obj) {
  PyObject* path = nullptr;
  if (!PyUnicode_FSConverter(path_obj, &path)) return nullptr;
  const char* file = PyBytes_AS_STRING(path);
  void* lib = dlopen(file, RTLD_NOW | RTLD_NOLOAD);  // loaded already, by `import xxhash`
  if (lib == nullptr) lib = dlopen(file, RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    PyErr_Format(PyExc_OSError, "cannot load %s: %s", file, dlerror());
    Py_DECREF(path);
    return nullptr;
  }
  Py_DECREF(path);
  // A wrong signature would crash where the self-test only compares outputs: take the hash only
  // from xxhash 0.8 or later, whose XXH3_128bits(const void*, size_t) is the stable API.
  using Version = unsigned (*)();
  const auto version = reinterpret_cast<Version>(dlsym(lib, "XXH_versionNumber"));
  if (version == nullptr || version() < 800) {
    return PyErr_Format(PyExc_OSError, "the xxhash library is not 0.8 or later (XXH_versionNumber %u)",
                        version != nullptr ? version() : 0u);
  }
  const char* name = "XXH3_128bits_dispatch";
  void* fn = dlsym(lib, name);
  if (fn == nullptr) fn = dlsym(lib, name = "XXH3_128bits");
  if (fn == nullptr) return PyErr_Format(PyExc_OSError, "the xxhash library exports no XXH3_128bits");
  g_xxh3_128 = reinterpret_cast<Xxh3_128>(fn);  // (the handle stays open for the process's life)
  kvtier_xxh3::take_stream(lib);  // (none: checksum_copy raises; kvtier/checksum_copy.py is then off)
  return PyUnicode_FromString(name);
}

PyMethodDef kMethods[] = {
    {"load", load, METH_O, "load(path): take XXH3-128 from the xxhash extension at path; the symbol's name"},
    {"u32", u32, METH_O, "u32(tokens) -> little-endian u32 bytes, or None where Python must decide"},
    {"digests", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(digests)), METH_FASTCALL,
     "digests(raw, seed, ends, start) -> kvtier.keys.chained_digests(...), or None"},
    {"chunk_keys", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(chunk_keys)), METH_FASTCALL,
     "chunk_keys(raw, start, seed, ns, chunk_size, partial, key_type) -> [key_type(ns + digest), ...]"},
    {"bytes_at", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(bytes_at)), METH_FASTCALL,
     "bytes_at(address, length) -> a read-only memoryview of that memory (a tensor's, held by the caller)"},
    {"packed_keys", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(packed_keys)), METH_FASTCALL,
     "packed_keys(tokens, ns, chunk_size, partial) -> the keys from chunk 0 as 24-byte runs of one bytes, or None"},
    {"keys_of", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(keys_of)), METH_FASTCALL,
     "keys_of(packed, start, stop, key_type) -> [key_type(key), ...] of packed keys start:stop"},
    {"checksum_copy", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(kvtier_xxh3::checksum_copy)),
     METH_FASTCALL,
     "checksum_copy(fields, src, dst, offset, piece, n_outer, s_outer, n_inner, s_inner) -> XXH3-64 of "
     "fields || src, src copied into dst's pieces"},
    {"xxh3_chain", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(kvtier_xxh3::xxh3_chain)),
     METH_FASTCALL, "xxh3_chain(acc, sums, key): XXH3-64's block scrambles over precomputed block sums"},
    {"read_record", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(kvtier_io::read_record)),
     METH_FASTCALL, "read_record(dir_fd, shard, name, dir_flags, file_flags, head, payload) -> bytes read"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_native_keys", "kvtier's chunk keys in C (kvtier/native_keys.py)",
                       -1, kMethods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__native_keys() {
  PyObject* module = PyModule_Create(&kModule);
  PyObject* table = module != nullptr ? PyType_FromSpec(&kvtier_table::kTableSpec) : nullptr;
  if (table == nullptr || PyModule_AddObject(module, "KeyTable", table) < 0) {
    Py_XDECREF(table);
    Py_XDECREF(module);
    return nullptr;
  }
  return module;
}
