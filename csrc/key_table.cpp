// KeyTable, the key set of kvtier._native_keys (see native_keys.cpp for the module, and
// kvtier/native_keys.py for its Python face).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "chunk_key.h"
#include "held_buffer.h"
#include "key_table.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <random>

namespace kvtier_table {
namespace {

using kvtier_keys::kKeyBytes;

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

// Walks n keys, key i at `key_of(i)` (null: not a 24-byte key), in batches, prefetching a batch's
// slots before probing them in order; `visit(i, held)` returns false to stop. False (nothing set)
// if the table is off or a key is not 24 bytes: the caller's dict answers then.
template <typename KeyOf, typename Visit>
bool probe(const KeyTable* t, Py_ssize_t n, KeyOf key_of, Visit visit) {
  if (t->off) return false;
  size_t home[kProbeBatch];
  for (Py_ssize_t base = 0; base < n; base += kProbeBatch) {
    const Py_ssize_t m = std::min(kProbeBatch, n - base);
    for (Py_ssize_t j = 0; j < m; ++j) {
      const uint8_t* key = key_of(base + j);
      if (key == nullptr) return false;
      home[j] = home_of(t, key);
      __builtin_prefetch(&t->slots[home[j]]);
    }
    for (Py_ssize_t j = 0; j < m; ++j) {
      if (!visit(base + j, t->slots[find(t, key_of(base + j), home[j])].used != 0)) return true;
    }
  }
  return true;
}

// probe() over a list or tuple of key objects.
template <typename Visit>
bool probe_objects(const KeyTable* t, PyObject* keys, Visit visit) {
  PyObject** items = PySequence_Fast_ITEMS(keys);
  return probe(t, PySequence_Fast_GET_SIZE(keys), [items](Py_ssize_t i) { return key_bytes(items[i]); }, visit);
}

bool check_sequence(PyObject* keys) {
  if (PyList_CheckExact(keys) || PyTuple_CheckExact(keys)) return true;
  PyErr_SetString(PyExc_TypeError, "keys must be a list or a tuple");
  return false;
}

// How many leading keys are held, as visit() sees them: n if all.
struct StopAtMiss {
  Py_ssize_t* held;
  bool operator()(Py_ssize_t i, bool in) const { return in || (*held = i, false); }
};

PyObject* table_prefix(PyObject* self, PyObject* keys) {
  if (!check_sequence(keys)) return nullptr;
  Py_ssize_t held = PySequence_Fast_GET_SIZE(keys);
  if (!probe_objects(reinterpret_cast<KeyTable*>(self), keys, StopAtMiss{&held})) Py_RETURN_NONE;
  return PyLong_FromSsize_t(held);
}

// prefix() of keys packed 24 bytes each in one buffer (kvtier.packed_keys.PackedKeys's bytes).
PyObject* table_prefix_packed(PyObject* self, PyObject* obj) {
  kvtier_native::HeldBuffer packed;
  if (!packed.get(obj, PyBUF_SIMPLE)) return nullptr;
  if (packed.view.len % kKeyBytes) return PyErr_Format(PyExc_ValueError, "packed keys are 24 bytes each");
  Py_ssize_t held = packed.view.len / kKeyBytes;
  const uint8_t* base = packed.data();
  const auto key_of = [base](Py_ssize_t i) { return base + i * kKeyBytes; };
  if (!probe(reinterpret_cast<KeyTable*>(self), held, key_of, StopAtMiss{&held})) Py_RETURN_NONE;
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
  if (!probe_objects(reinterpret_cast<KeyTable*>(self), keys, note)) {
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
    {"prefix_packed", table_prefix_packed, METH_O,
     "prefix_packed(packed) -> prefix() of the 24-byte keys laid end to end in `packed`, or None (off)"},
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

}  // namespace

PyType_Spec kTableSpec = {"kvtier._native_keys.KeyTable", sizeof(KeyTable), 0, Py_TPFLAGS_DEFAULT, kTableSlots};

}  // namespace kvtier_table
