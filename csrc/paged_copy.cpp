// kvtier.platforms._paged_copy: the CPU platform's paged block copies (kvtier/platforms/cpu_ops.py).
//
// An engine's block cache is [2, L, num_blocks, block_size, H, D] (kvtier_engine.kv_cache); a
// kvtier chunk is [2, L', T, H*D]. A block of one layer is one contiguous run of block_size rows, so
// moving a request's KV is 2 * L' * ceil(T / block_size) memcpys, independent of each other: they
// are cut into equal ranges, one per thread (torch's index_select does the same copies on one).
//
//   gather(cache, ids, out, layers, num_blocks, block_size, row_bytes, tokens, threads)
//     out[k, l, t] = cache[k, l, ids[t / block_size], t % block_size] for every layer l < layers;
//   scatter(cache, ids, src, layers, layer_start, cache_layers, num_blocks, block_size, row_bytes,
//           tokens, threads)
//     cache[k, layer_start + l, ids[t / block_size], t % block_size] = src[k, l, t].
//
// Buffers are byte views (any dtype: the caller views its tensors as uint8). Every size is checked
// against the buffers and every id against num_blocks before a byte moves: a wrong call is a
// ValueError, never a stray write. The GIL is released for the copies. Plain CPython API, no torch
// (it builds in seconds, beside kvtier._native_keys).
#include "held_buffer.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

using Held = kvtier_native::HeldBuffer;

constexpr int64_t kBytesPerThread = 256 * 1024;  // less work than this per thread is not worth one

struct Geometry {
  int64_t layers, num_blocks, block_size, row_bytes, tokens;
  int64_t blocks() const { return (tokens + block_size - 1) / block_size; }
};

bool fail(const std::string& message) {
  PyErr_SetString(PyExc_ValueError, message.c_str());
  return false;
}

// A contiguous byte buffer of at least `need` bytes (writable if asked).
bool bytes_of(PyObject* obj, Held& held, int64_t need, bool writable, const char* what) {
  if (!held.get(obj, writable ? PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS : PyBUF_C_CONTIGUOUS)) return false;
  if (held.view.len < need) return fail(std::string(what) + " is smaller than its geometry says");
  return true;
}

// The first g.blocks() ids, each in [0, num_blocks).
bool ids_of(PyObject* obj, Held& held, const Geometry& g) {
  if (!held.get(obj, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)) return false;
  if (held.view.itemsize != 8 || held.view.len < g.blocks() * 8)
    return fail("ids must be a contiguous int64 buffer with an id per block");
  const auto* ids = static_cast<const int64_t*>(held.view.buf);
  for (int64_t i = 0; i < g.blocks(); ++i)
    if (ids[i] < 0 || ids[i] >= g.num_blocks) return fail("a block id is out of range");
  return true;
}

bool ints(PyObject* const* args, Py_ssize_t from, Py_ssize_t count, int64_t* out) {
  for (Py_ssize_t i = 0; i < count; ++i) {
    out[i] = PyLong_AsLongLong(args[from + i]);
    if (out[i] == -1 && PyErr_Occurred()) return false;
  }
  return true;
}

bool check(const Geometry& g) {
  if (g.layers < 0 || g.num_blocks < 1 || g.block_size < 1 || g.row_bytes < 1 || g.tokens < 0)
    return fail("negative or empty geometry");
  return true;
}

// copy(piece) for piece in [0, pieces), over up to `threads` threads in equal ranges.
template <typename Copy>
void run(int64_t pieces, int64_t piece_bytes, int64_t threads, const Copy& copy) {
  const int64_t by_work = std::max<int64_t>(1, pieces * piece_bytes / kBytesPerThread);
  const int64_t n = std::max<int64_t>(1, std::min({threads, by_work, pieces}));
  auto range = [&](int64_t t) {
    for (int64_t p = pieces * t / n, end = pieces * (t + 1) / n; p < end; ++p) copy(p);
  };
  std::vector<std::thread> workers;
  workers.reserve(n - 1);
  for (int64_t t = 1; t < n; ++t) workers.emplace_back(range, t);
  range(0);
  for (auto& w : workers) w.join();
}

// gather(cache, ids, out, layers, num_blocks, block_size, row_bytes, tokens, threads)
PyObject* gather(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t v[6];
  if (nargs != 9) return PyErr_Format(PyExc_TypeError, "gather takes 9 arguments, got %zd", nargs);
  if (!ints(args, 3, 6, v)) return nullptr;
  const Geometry g{v[0], v[1], v[2], v[3], v[4]};
  const int64_t threads = v[5];
  Held cache, ids, out;
  if (!check(g) || !bytes_of(args[0], cache, 2 * g.layers * g.num_blocks * g.block_size * g.row_bytes, false,
                             "cache") ||
      !ids_of(args[1], ids, g) || !bytes_of(args[2], out, 2 * g.layers * g.tokens * g.row_bytes, true, "out"))
    return nullptr;
  const uint8_t* c = cache.data();
  auto* o = static_cast<uint8_t*>(out.view.buf);
  const auto* id = static_cast<const int64_t*>(ids.view.buf);
  const int64_t blocks = g.blocks();
  Py_BEGIN_ALLOW_THREADS
  run(2 * g.layers * blocks, g.block_size * g.row_bytes, threads, [&](int64_t p) {
    const int64_t kl = p / blocks, b = p % blocks;  // kl: (k, l) flattened
    const int64_t rows = std::min(g.block_size, g.tokens - b * g.block_size);
    std::memcpy(o + (kl * g.tokens + b * g.block_size) * g.row_bytes,
                c + ((kl * g.num_blocks + id[b]) * g.block_size) * g.row_bytes, rows * g.row_bytes);
  });
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// scatter(cache, ids, src, layers, layer_start, cache_layers, num_blocks, block_size, row_bytes, tokens, threads)
PyObject* scatter(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t v[8];
  if (nargs != 11) return PyErr_Format(PyExc_TypeError, "scatter takes 11 arguments, got %zd", nargs);
  if (!ints(args, 3, 8, v)) return nullptr;
  const int64_t layer_start = v[1], cache_layers = v[2], threads = v[7];
  const Geometry g{v[0], v[3], v[4], v[5], v[6]};
  if (!check(g)) return nullptr;
  if (layer_start < 0 || layer_start + g.layers > cache_layers) {
    fail("the layers are not the cache's");
    return nullptr;
  }
  Held cache, ids, src;
  if (!bytes_of(args[0], cache, 2 * cache_layers * g.num_blocks * g.block_size * g.row_bytes, true, "cache") ||
      !ids_of(args[1], ids, g) || !bytes_of(args[2], src, 2 * g.layers * g.tokens * g.row_bytes, false, "src"))
    return nullptr;
  auto* c = static_cast<uint8_t*>(cache.view.buf);
  const uint8_t* s = src.data();
  const auto* id = static_cast<const int64_t*>(ids.view.buf);
  const int64_t blocks = g.blocks();
  Py_BEGIN_ALLOW_THREADS
  run(2 * g.layers * blocks, g.block_size * g.row_bytes, threads, [&](int64_t p) {
    const int64_t kl = p / blocks, b = p % blocks, k = kl / g.layers, l = kl % g.layers;
    const int64_t rows = std::min(g.block_size, g.tokens - b * g.block_size);
    const int64_t cache_kl = k * cache_layers + layer_start + l;
    std::memcpy(c + ((cache_kl * g.num_blocks + id[b]) * g.block_size) * g.row_bytes,
                s + (kl * g.tokens + b * g.block_size) * g.row_bytes, rows * g.row_bytes);
  });
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyMethodDef kMethods[] = {
    {"gather", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(gather)), METH_FASTCALL,
     "gather(cache, ids, out, layers, num_blocks, block_size, row_bytes, tokens, threads)"},
    {"scatter", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(scatter)), METH_FASTCALL,
     "scatter(cache, ids, src, layers, layer_start, cache_layers, num_blocks, block_size, row_bytes, tokens, "
     "threads)"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_paged_copy",
                       "kvtier's CPU paged block copies (use kvtier.platforms.cpu_ops, not this module)", -1,
                       kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__paged_copy() { return PyModule_Create(&kModule); }
