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
// ValueError, never a stray write. The GIL is released for the copies.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t kBytesPerThread = 256 * 1024;  // less work than this per thread is not worth one

struct Geometry {
  int64_t layers, num_blocks, block_size, row_bytes, tokens;
  int64_t blocks() const { return (tokens + block_size - 1) / block_size; }
};

uint8_t* bytes_of(const py::buffer_info& b, int64_t need, const char* what) {
  if (b.itemsize != 1 || b.ndim != 1 || (b.shape[0] > 1 && b.strides[0] != 1))
    throw std::invalid_argument(std::string(what) + " must be a contiguous byte buffer");
  if (b.shape[0] < need)
    throw std::invalid_argument(std::string(what) + " is smaller than its geometry says");
  return static_cast<uint8_t*>(b.ptr);
}

const int64_t* ids_of(const py::buffer_info& b, const Geometry& g) {
  if (b.itemsize != 8 || b.ndim != 1 || (b.shape[0] > 1 && b.strides[0] != 8) || b.shape[0] < g.blocks())
    throw std::invalid_argument("ids must be a contiguous int64 buffer with an id per block");
  const auto* ids = static_cast<const int64_t*>(b.ptr);
  for (int64_t i = 0; i < g.blocks(); ++i)
    if (ids[i] < 0 || ids[i] >= g.num_blocks) throw std::invalid_argument("a block id is out of range");
  return ids;
}

void check(const Geometry& g) {
  if (g.layers < 0 || g.num_blocks < 1 || g.block_size < 1 || g.row_bytes < 1 || g.tokens < 0)
    throw std::invalid_argument("negative or empty geometry");
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

void gather(py::buffer cache, py::buffer ids, py::buffer out, int64_t layers, int64_t num_blocks,
            int64_t block_size, int64_t row_bytes, int64_t tokens, int64_t threads) {
  const Geometry g{layers, num_blocks, block_size, row_bytes, tokens};
  check(g);
  auto cb = cache.request(), ib = ids.request(), ob = out.request(true);
  const uint8_t* c = bytes_of(cb, 2 * layers * num_blocks * block_size * row_bytes, "cache");
  uint8_t* o = bytes_of(ob, 2 * layers * tokens * row_bytes, "out");
  const int64_t* id = ids_of(ib, g);
  const int64_t blocks = g.blocks();
  py::gil_scoped_release nogil;
  run(2 * layers * blocks, block_size * row_bytes, threads, [&](int64_t p) {
    const int64_t kl = p / blocks, b = p % blocks;  // kl: (k, l) flattened
    const int64_t rows = std::min(block_size, tokens - b * block_size);
    std::memcpy(o + (kl * tokens + b * block_size) * row_bytes,
                c + ((kl * num_blocks + id[b]) * block_size) * row_bytes, rows * row_bytes);
  });
}

void scatter(py::buffer cache, py::buffer ids, py::buffer src, int64_t layers, int64_t layer_start,
             int64_t cache_layers, int64_t num_blocks, int64_t block_size, int64_t row_bytes, int64_t tokens,
             int64_t threads) {
  const Geometry g{layers, num_blocks, block_size, row_bytes, tokens};
  check(g);
  if (layer_start < 0 || layer_start + layers > cache_layers)
    throw std::invalid_argument("the layers are not the cache's");
  auto cb = cache.request(true), ib = ids.request(), sb = src.request();
  uint8_t* c = bytes_of(cb, 2 * cache_layers * num_blocks * block_size * row_bytes, "cache");
  const uint8_t* s = bytes_of(sb, 2 * layers * tokens * row_bytes, "src");
  const int64_t* id = ids_of(ib, g);
  const int64_t blocks = g.blocks();
  py::gil_scoped_release nogil;
  run(2 * layers * blocks, block_size * row_bytes, threads, [&](int64_t p) {
    const int64_t kl = p / blocks, b = p % blocks, k = kl / layers, l = kl % layers;
    const int64_t rows = std::min(block_size, tokens - b * block_size);
    const int64_t cache_kl = k * cache_layers + layer_start + l;
    std::memcpy(c + ((cache_kl * num_blocks + id[b]) * block_size) * row_bytes,
                s + (kl * tokens + b * block_size) * row_bytes, rows * row_bytes);
  });
}

}  // namespace

PYBIND11_MODULE(_paged_copy, m) {
  m.doc() = "kvtier's CPU paged block copies (use kvtier.platforms.cpu_ops, not this module)";
  m.def("gather", &gather);
  m.def("scatter", &scatter);
}
