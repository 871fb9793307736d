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
//   load(path)            takes XXH3-128 from the xxhash package's shared object (below).
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

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "kvtier._native_keys writes host-order u32 as the little-endian token bytes"
#endif

namespace {

struct Hash128 {  // XXH128_hash_t of xxhash.h, returned by value
  uint64_t low64;
  uint64_t high64;
};
using Xxh3_128 = Hash128 (*)(const void*, size_t);
Xxh3_128 g_xxh3_128 = nullptr;

constexpr Py_ssize_t kDigestBytes = 16;
constexpr Py_ssize_t kNamespaceBytes = 8;
constexpr Py_ssize_t kKeyBytes = kNamespaceBytes + kDigestBytes;
// Below this many bytes hashed (~4 us), the GIL is kept: getting it back after another thread took
// it can cost more than the hashing (the engine's block hashes are a few blocks per step).
constexpr Py_ssize_t kReleaseGilBytes = 64 * 1024;

// A held buffer, released on every path out.
struct Buffer {
  Py_buffer view{};
  bool held = false;
  bool get(PyObject* obj, int flags) { return held = PyObject_GetBuffer(obj, &view, flags) == 0; }
  ~Buffer() {
    if (held) PyBuffer_Release(&view);
  }
  const uint8_t* data() const { return static_cast<const uint8_t*>(view.buf); }
};

void put_be64(uint8_t* out, uint64_t v) {
  for (int i = 7; i >= 0; --i, v >>= 8) out[i] = static_cast<uint8_t>(v);
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
    const Hash128 h = g_xxh3_128(scratch, parent_len + len);
    uint8_t* digest = out + i * kDigestBytes;
    put_be64(digest, h.high64);
    put_be64(digest + 8, h.low64);
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

PyObject* new_u32_bytes(Py_ssize_t n, uint32_t** dst) {
  PyObject* out = PyBytes_FromStringAndSize(nullptr, 4 * n);
  if (out != nullptr) *dst = reinterpret_cast<uint32_t*>(PyBytes_AS_STRING(out));
  return out;
}

// Exact ints only: a bool (refused for an all-bool list), an int subclass or anything else goes to
// the Python path, as does an id outside [0, 2**32) (PyLong_AsUnsignedLongLong: -1 and an error).
PyObject* u32_of_sequence(PyObject* seq) {
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  uint32_t* dst = nullptr;
  PyObject* out = new_u32_bytes(n, &dst);
  if (out == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const unsigned long long v = PyLong_CheckExact(items[i]) ? PyLong_AsUnsignedLongLong(items[i]) : ~0ull;
    if (v > 0xFFFFFFFFull) {
      PyErr_Clear();
      Py_DECREF(out);
      Py_RETURN_NONE;
    }
    dst[i] = static_cast<uint32_t>(v);
  }
  return out;
}

// dst = src as u32; false if an id is outside [0, 2**32). Branch-free, so it vectorises: a signed id
// sign-extends, so a negative one sets the high word as one >= 2**32 does.
template <typename T>
bool narrow(const uint8_t* src, Py_ssize_t n, uint32_t* dst) {
  uint64_t high = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
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
  return high == 0;
}

using Narrow = bool (*)(const uint8_t*, Py_ssize_t, uint32_t*);

// The converter of a native-order integer buffer (struct format codes, size from itemsize), else null.
Narrow narrower(const Py_buffer& view) {
  const char* f = view.format != nullptr ? view.format : "B";
  if (*f == '@' || *f == '=' || *f == '<') ++f;  // all this (little-endian) machine's order
  if (f[0] == '\0' || f[1] != '\0') return nullptr;
  const bool is_signed = std::strchr("bhilqn", f[0]) != nullptr;
  if (!is_signed && std::strchr("BHILQN", f[0]) == nullptr) return nullptr;  // bool '?', floats, ...
  switch (view.itemsize) {
    case 1: return is_signed ? narrow<int8_t> : narrow<uint8_t>;
    case 2: return is_signed ? narrow<int16_t> : narrow<uint16_t>;
    case 4: return is_signed ? narrow<int32_t> : narrow<uint32_t>;
    case 8: return is_signed ? narrow<int64_t> : narrow<uint64_t>;
    default: return nullptr;
  }
}

PyObject* u32_of_buffer(PyObject* obj) {
  Buffer src;
  if (!src.get(obj, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)) {  // strided, or no buffer at all
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  const Narrow convert = src.view.ndim == 1 ? narrower(src.view) : nullptr;
  if (convert == nullptr) Py_RETURN_NONE;
  const Py_ssize_t n = src.view.shape[0];
  uint32_t* dst = nullptr;
  PyObject* out = new_u32_bytes(n, &dst);
  if (out != nullptr && !convert(src.data(), n, dst)) {
    Py_DECREF(out);
    Py_RETURN_NONE;
  }
  return out;
}

PyObject* u32(PyObject*, PyObject* tokens) {
  if (PyList_CheckExact(tokens) || PyTuple_CheckExact(tokens)) return u32_of_sequence(tokens);
  return u32_of_buffer(tokens);
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

// A bytes subclass whose instances are laid out as bytes (no __dict__, no slots): what new_key fills.
bool is_key_type(PyObject* obj) {
  if (!PyType_Check(obj)) return false;
  auto* type = reinterpret_cast<PyTypeObject*>(obj);
  return PyType_IsSubtype(type, &PyBytes_Type) && type->tp_basicsize == PyBytes_Type.tp_basicsize &&
         type->tp_itemsize == PyBytes_Type.tp_itemsize && type->tp_dictoffset == 0;
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
  if (!is_key_type(args[6])) {
    PyErr_SetString(PyExc_TypeError, "key_type must be a bytes subclass laid out as bytes (__slots__ = ())");
    return false;
  }
  a.type = reinterpret_cast<PyTypeObject*>(args[6]);
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
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(ends.size()));
  for (size_t i = 0; list != nullptr && i < ends.size(); ++i) {
    PyObject* key = new_key(a.type, a.ns.data(), out.data() + i * kDigestBytes);
    if (key == nullptr) Py_CLEAR(list);
    else PyList_SET_ITEM(list, i, key);
  }
  return list;
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
  return PyUnicode_FromString(name);
}

PyMethodDef kMethods[] = {
    {"load", load, METH_O, "load(path): take XXH3-128 from the xxhash extension at path; the symbol's name"},
    {"u32", u32, METH_O, "u32(tokens) -> little-endian u32 bytes, or None where Python must decide"},
    {"digests", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(digests)), METH_FASTCALL,
     "digests(raw, seed, ends, start) -> kvtier.keys.chained_digests(...), or None"},
    {"chunk_keys", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(chunk_keys)), METH_FASTCALL,
     "chunk_keys(raw, start, seed, ns, chunk_size, partial, key_type) -> [key_type(ns + digest), ...]"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_native_keys", "kvtier's chunk keys in C (kvtier/native_keys.py)",
                       -1, kMethods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__native_keys() { return PyModule_Create(&kModule); }
