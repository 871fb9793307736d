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
//   load(path)            takes XXH3-128 from the xxhash package's shared object (below), and the
//                         streaming XXH3-64 that checksum_copy (checksum_copy.cpp) uses.
//   checksum_copy(...)    a record's checksum, computed while its payload is copied out (one pass).
//   read_record(...)      a record file's open, read and close with the GIL released once (record_read.cpp).
//   KeyTable()            a set of 24-byte keys whose prefix(keys) / present(keys) prefetch a batch
//                         of slots before probing them: the CPU tier's mirror for the lookup (below).
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

#include "held_buffer.h"
#include "record_read.h"
#include "xxh3_stream.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <new>
#include <random>
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

using Buffer = kvtier_native::HeldBuffer;

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
// The source's pages are prefetched kAheadBytes ahead: a hardware prefetcher stops at each 4 KiB page,
// and a new prompt's tokens are cold (out of every cache), so each page would stall on memory.
constexpr Py_ssize_t kPageBytes = 4096;
constexpr Py_ssize_t kAheadBytes = 2 * kPageBytes;

template <typename T>
bool narrow(const uint8_t* src, Py_ssize_t n, uint32_t* dst) {
  constexpr Py_ssize_t kPage = kPageBytes / sizeof(T);
  const uint8_t* end = src + n * sizeof(T);
  uint64_t high = 0;
  for (Py_ssize_t page = 0; page < n; page += kPage) {
    const uint8_t* ahead = src + page * sizeof(T) + kAheadBytes;
    for (Py_ssize_t j = 0; j < kPageBytes && ahead + j < end; j += 64) __builtin_prefetch(ahead + j);
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

// -- key table -------------------------------------------------------------------------------------

// KeyTable: a set of 24-byte keys (ChunkKey's bytes) in one open-addressed array: the CPU tier's
// membership mirrored for the lookup's probe (kvtier/tiers/cpu.py). A dict probe of a new prompt's
// key hashes it (SipHash) and then reads three scattered places one after the other (the dict's
// index, its entry, the stored key object); here every slot of a batch of keys is computed and
// prefetched first, so their cache misses overlap. The keys are hashes already: a few multiplies
// mix them into a slot. At most half full (linear probing, deletion by backward shift: no
// tombstones). Holds no Python object. Its owner's lock guards it (each call is atomic under the GIL).
struct Slot {
  uint8_t key[kKeyBytes];
  uint64_t used;  // 0: empty
};
static_assert(sizeof(Slot) == 32, "a slot is half a cache line");

struct KeyTable {
  PyObject_HEAD
  Slot* slots;
  size_t mask;  // capacity - 1, capacity a power of two
  Py_ssize_t count;
  bool off;  // a key it could not hold (not 24 bytes, no memory to grow): probes answer None till clear()
  uint64_t seed[3];  // drawn per table: a chunk key is public (XXH3 of chosen tokens), its slot is not
};

constexpr size_t kMinSlots = 64;
constexpr Py_ssize_t kProbeBatch = 64;  // keys whose slots are prefetched together

uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// A key's first slot. Unseeded, anyone who can choose prompts could find keys that all land in one
// run of slots (about 16 tries a chunk for a sixteenth of the table) and make every probe, add and
// discard walk it under the storage lock; with a secret seed per table, which keys cluster is unknown.
size_t home_of(const KeyTable* t, const uint8_t* key) {
  uint64_t h = (load64(key) ^ t->seed[0]) * 0x9E3779B97F4A7C15ull ^
               (load64(key + 8) ^ t->seed[1]) * 0xC2B2AE3D27D4EB4Full ^
               (load64(key + 16) ^ t->seed[2]) * 0x165667B19E3779F9ull;
  h ^= h >> 31;
  h *= 0x94D049BB133111EBull;
  h ^= h >> 29;
  return (h ^ (h >> 32)) & t->mask;
}

// Three random words from the OS (std::random_device: /dev/urandom on Linux); should it fail, the
// table's address and the clock, which an outsider cannot read either.
void draw_seed(KeyTable* t) {
  try {
    std::random_device device;
    for (uint64_t& word : t->seed) word = (uint64_t{device()} << 32) ^ device();
  } catch (...) {
    const uint64_t mixed = reinterpret_cast<uintptr_t>(t) ^ static_cast<uint64_t>(time(nullptr));
    for (int i = 0; i < 3; ++i) t->seed[i] = (mixed + i) * 0x9E3779B97F4A7C15ull;
  }
}

// The 24 bytes of a bytes object (ChunkKey included) of that length, else null.
const uint8_t* key_bytes(PyObject* obj) {
  if (!PyBytes_Check(obj) || PyBytes_GET_SIZE(obj) != kKeyBytes) return nullptr;
  return reinterpret_cast<const uint8_t*>(PyBytes_AS_STRING(obj));
}

// The slot holding `key`, else the empty slot ending its run (there is one: at most half full).
size_t find(const KeyTable* t, const uint8_t* key, size_t i) {
  for (;; i = (i + 1) & t->mask) {
    const Slot& s = t->slots[i];
    if (!s.used || std::memcmp(s.key, key, kKeyBytes) == 0) return i;
  }
}

bool resize(KeyTable* t, size_t capacity) {
  auto* slots = static_cast<Slot*>(PyMem_Calloc(capacity, sizeof(Slot)));
  if (slots == nullptr) {
    PyErr_NoMemory();
    return false;
  }
  Slot* old = t->slots;
  const size_t old_capacity = old != nullptr ? t->mask + 1 : 0;
  t->slots = slots, t->mask = capacity - 1;
  for (size_t i = 0; i < old_capacity; ++i) {
    if (old[i].used) slots[find(t, old[i].key, home_of(t, old[i].key))] = old[i];
  }
  PyMem_Free(old);
  return true;
}

PyObject* table_new(PyTypeObject* type, PyObject*, PyObject*) {
  auto* t = reinterpret_cast<KeyTable*>(type->tp_alloc(type, 0));
  if (t != nullptr) draw_seed(t);
  if (t != nullptr && !resize(t, kMinSlots)) Py_CLEAR(t);
  return reinterpret_cast<PyObject*>(t);
}

void table_dealloc(PyObject* self) {
  PyTypeObject* type = Py_TYPE(self);
  PyMem_Free(reinterpret_cast<KeyTable*>(self)->slots);
  type->tp_free(self);
  Py_DECREF(type);
}

PyObject* table_add(PyObject* self, PyObject* obj) {
  auto* t = reinterpret_cast<KeyTable*>(self);
  const uint8_t* key = key_bytes(obj);
  // Off rather than wrong: its owner's dict holds the key all the same, and answers from now on.
  if (key == nullptr || (2 * static_cast<size_t>(t->count + 1) > t->mask + 1 && !resize(t, 2 * (t->mask + 1)))) {
    PyErr_Clear();  // (a MemoryError from resize)
    t->off = true;
    Py_RETURN_FALSE;
  }
  Slot& s = t->slots[find(t, key, home_of(t, key))];
  if (s.used) Py_RETURN_FALSE;
  std::memcpy(s.key, key, kKeyBytes);
  s.used = 1, ++t->count;
  Py_RETURN_TRUE;
}

PyObject* table_discard(PyObject* self, PyObject* obj) {
  auto* t = reinterpret_cast<KeyTable*>(self);
  const uint8_t* key = key_bytes(obj);
  size_t hole = key != nullptr ? find(t, key, home_of(t, key)) : 0;
  if (key == nullptr || !t->slots[hole].used) Py_RETURN_FALSE;
  // Backward shift: a later key of the run moves into the hole unless its home lies cyclically in
  // (hole, j], where a probe for it would stop before reaching the hole.
  for (size_t j = (hole + 1) & t->mask; t->slots[j].used; j = (j + 1) & t->mask) {
    const size_t home = home_of(t, t->slots[j].key);
    if (hole <= j ? (hole < home && home <= j) : (hole < home || home <= j)) continue;
    t->slots[hole] = t->slots[j];
    hole = j;
  }
  t->slots[hole].used = 0, --t->count;
  Py_RETURN_TRUE;
}

PyObject* table_clear(PyObject* self, PyObject*) {
  auto* t = reinterpret_cast<KeyTable*>(self);
  auto* slots = static_cast<Slot*>(PyMem_Calloc(kMinSlots, sizeof(Slot)));
  if (slots == nullptr) return PyErr_NoMemory();  // (the table as it was)
  PyMem_Free(t->slots);
  t->slots = slots, t->mask = kMinSlots - 1, t->count = 0, t->off = false;
  Py_RETURN_NONE;
}

// Walks `keys` (a list or tuple) in batches, prefetching a batch's slots before probing them in
// order; `visit(i, held)` returns false to stop. False (nothing set) if the table is off or a key
// is not 24 bytes of bytes: the caller's dict answers then.
template <typename Visit>
bool probe(const KeyTable* t, PyObject* keys, Visit visit) {
  if (t->off) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(keys);
  PyObject** items = PySequence_Fast_ITEMS(keys);
  size_t home[kProbeBatch];
  for (Py_ssize_t base = 0; base < n; base += kProbeBatch) {
    const Py_ssize_t m = std::min(kProbeBatch, n - base);
    for (Py_ssize_t j = 0; j < m; ++j) {
      const uint8_t* key = key_bytes(items[base + j]);
      if (key == nullptr) return false;
      home[j] = home_of(t, key);
      __builtin_prefetch(&t->slots[home[j]]);
    }
    for (Py_ssize_t j = 0; j < m; ++j) {
      const uint8_t* key = key_bytes(items[base + j]);
      if (!visit(base + j, t->slots[find(t, key, home[j])].used != 0)) return true;
    }
  }
  return true;
}

bool check_sequence(PyObject* keys) {
  if (PyList_CheckExact(keys) || PyTuple_CheckExact(keys)) return true;
  PyErr_SetString(PyExc_TypeError, "keys must be a list or a tuple");
  return false;
}

PyObject* table_prefix(PyObject* self, PyObject* keys) {
  if (!check_sequence(keys)) return nullptr;
  Py_ssize_t held = PySequence_Fast_GET_SIZE(keys);
  const auto stop_at_miss = [&held](Py_ssize_t i, bool in) { return in || (held = i, false); };
  if (!probe(reinterpret_cast<KeyTable*>(self), keys, stop_at_miss)) Py_RETURN_NONE;
  return PyLong_FromSsize_t(held);
}

PyObject* table_present(PyObject* self, PyObject* keys) {
  if (!check_sequence(keys)) return nullptr;
  PyObject* out = PyList_New(PySequence_Fast_GET_SIZE(keys));
  if (out == nullptr) return nullptr;
  const auto note = [out](Py_ssize_t i, bool in) {
    PyList_SET_ITEM(out, i, Py_NewRef(in ? Py_True : Py_False));
    return true;
  };
  if (!probe(reinterpret_cast<KeyTable*>(self), keys, note)) {
    Py_DECREF(out);  // (its unset items are null: list_dealloc skips them)
    Py_RETURN_NONE;
  }
  return out;
}

Py_ssize_t table_len(PyObject* self) { return reinterpret_cast<KeyTable*>(self)->count; }

// The most slots a probe walks: the longest run of used slots (for tests of the seeding and for
// diagnostics; it reads the whole table).
PyObject* table_longest_run(PyObject* self, PyObject*) {
  const auto* t = reinterpret_cast<KeyTable*>(self);
  size_t longest = 0, run = 0;
  for (size_t i = 0; i <= t->mask; ++i) {
    run = t->slots[i].used ? run + 1 : 0;
    longest = std::max(longest, run);
  }
  // (a run that wraps past the end continues at slot 0: at most the two pieces added)
  size_t head = 0;
  while (head <= t->mask && t->slots[head].used) ++head;
  return PyLong_FromSize_t(std::max(longest, head <= t->mask ? run + head : longest));
}

PyMethodDef kTableMethods[] = {
    {"add", table_add, METH_O, "add(key) -> True if new; a key it cannot hold turns the table off"},
    {"discard", table_discard, METH_O, "discard(key) -> True if it was held"},
    {"prefix", table_prefix, METH_O, "prefix(keys) -> how many leading keys are held, or None (off)"},
    {"present", table_present, METH_O, "present(keys) -> [held, ...], or None (off)"},
    {"clear", table_clear, METH_NOARGS, "clear(): no keys, and on again"},
    {"longest_run", table_longest_run, METH_NOARGS, "longest_run() -> the most slots a probe walks"},
    {nullptr, nullptr, 0, nullptr},
};

PyType_Slot kTableSlots[] = {
    {Py_tp_new, reinterpret_cast<void*>(table_new)},
    {Py_tp_dealloc, reinterpret_cast<void*>(table_dealloc)},
    {Py_tp_methods, kTableMethods},
    {Py_sq_length, reinterpret_cast<void*>(table_len)},
    {Py_tp_doc, const_cast<char*>("KeyTable(): a set of 24-byte keys probed in prefetched batches")},
    {0, nullptr},
};

PyType_Spec kTableSpec = {"kvtier._native_keys.KeyTable", sizeof(KeyTable), 0, Py_TPFLAGS_DEFAULT, kTableSlots};

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
    {"checksum_copy", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(kvtier_xxh3::checksum_copy)),
     METH_FASTCALL,
     "checksum_copy(fields, src, dst, offset, piece, n_outer, s_outer, n_inner, s_inner) -> XXH3-64 of "
     "fields || src, src copied into dst's pieces"},
    {"read_record", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(kvtier_io::read_record)),
     METH_FASTCALL, "read_record(dir_fd, shard, name, dir_flags, file_flags, head, payload) -> bytes read"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_native_keys", "kvtier's chunk keys in C (kvtier/native_keys.py)",
                       -1, kMethods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__native_keys() {
  PyObject* module = PyModule_Create(&kModule);
  PyObject* table = module != nullptr ? PyType_FromSpec(&kTableSpec) : nullptr;
  if (table == nullptr || PyModule_AddObject(module, "KeyTable", table) < 0) {
    Py_XDECREF(table);
    Py_XDECREF(module);
    return nullptr;
  }
  return module;
}
