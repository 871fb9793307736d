// kvtier.platforms._paged_copy_cuda: the CUDA platform's paged block copies (kvtier/platforms/cuda_ops.py).
//
// An engine's block cache on the GPU is [2, L, num_blocks, block_size, H, D] (kvtier_engine.kv_cache);
// a kvtier chunk is [2, L', T, H*D], in GPU memory or in page-locked host memory (a CPU tier slab).
// One kernel moves every row (one token of one layer of K or V: H*D elements, contiguous on both
// sides) of a request in one launch:
//
//   gather  (to_cache = 0): chunk[k, l, t] = cache[k, l, ids[t / block_size], t % block_size]
//   scatter (to_cache = 1): cache[k, l, ids[t / block_size], t % block_size] = chunk[k, l, t]
//
// for k < 2, l < layers, t < tokens. Where the chunk is in host memory the kernel reads or writes it
// across PCIe itself (zero-copy, through the pinned pages' device address): a load needs no device
// staging buffer and no second kernel, which DMA cannot do for blocks that are not contiguous.
//
//   copy(to_cache, cache_ptr, cache_kv_stride, cache_layer_stride, cache_block_stride, cache_slot_stride,
//        chunk_ptr, chunk_kv_stride, chunk_layer_stride, chunk_token_stride, ids_ptr,
//        layers, tokens, block_size, row_bytes, stream)
//
// Pointers are addresses (tensor.data_ptr()), strides are in bytes, `ids_ptr` is int64 ids in GPU
// memory (checked against the cache's block count by the caller), `stream` a cudaStream_t as an
// int (torch.cuda.current_stream().cuda_stream). The cache must be device memory; the chunk device or
// page-locked host memory (pageable memory is a ValueError: the caller falls back to torch). The
// launch is asynchronous on `stream`; a launch error is a RuntimeError. Plain CPython API and the
// CUDA runtime, no torch headers: built by setup.py only where torch is a CUDA build and nvcc exists.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace {

struct Rows {
  char* cache;
  int64_t cache_kv, cache_layer, cache_block, cache_slot;
  char* chunk;
  int64_t chunk_kv, chunk_layer, chunk_token;
  const int64_t* ids;
  int64_t layers, tokens, block_size, row_bytes;
};

// One CUDA block per row; its threads move the row in `Word`s (16, 8, 4 or 1 bytes, the widest
// that every address and stride allows).
template <typename Word, bool kToCache>
__global__ void copy_rows(Rows r) {
  const int64_t row = blockIdx.x;
  const int64_t t = row % r.tokens;
  const int64_t l = (row / r.tokens) % r.layers;
  const int64_t k = row / (r.tokens * r.layers);
  const int64_t block = r.ids[t / r.block_size];
  char* cache_row = r.cache + k * r.cache_kv + l * r.cache_layer + block * r.cache_block +
                    (t % r.block_size) * r.cache_slot;
  char* chunk_row = r.chunk + k * r.chunk_kv + l * r.chunk_layer + t * r.chunk_token;
  Word* dst = reinterpret_cast<Word*>(kToCache ? cache_row : chunk_row);
  const Word* src = reinterpret_cast<const Word*>(kToCache ? chunk_row : cache_row);
  const int64_t words = r.row_bytes / static_cast<int64_t>(sizeof(Word));
  for (int64_t i = threadIdx.x; i < words; i += blockDim.x) dst[i] = src[i];
}

template <typename Word>
cudaError_t launch(const Rows& r, bool to_cache, cudaStream_t stream) {
  const int64_t words = r.row_bytes / static_cast<int64_t>(sizeof(Word));
  const int threads = static_cast<int>(words >= 256 ? 256 : ((words + 31) / 32) * 32);
  const dim3 grid(static_cast<unsigned int>(2 * r.layers * r.tokens));
  if (to_cache)
    copy_rows<Word, true><<<grid, threads, 0, stream>>>(r);
  else
    copy_rows<Word, false><<<grid, threads, 0, stream>>>(r);
  return cudaGetLastError();
}

int64_t word_bytes(const Rows& r) {
  const uint64_t all = reinterpret_cast<uintptr_t>(r.cache) | reinterpret_cast<uintptr_t>(r.chunk) |
                       static_cast<uint64_t>(r.cache_kv | r.cache_layer | r.cache_block | r.cache_slot |
                                             r.chunk_kv | r.chunk_layer | r.chunk_token | r.row_bytes);
  for (int64_t width : {16, 8, 4})
    if (all % width == 0) return width;
  return 1;
}

PyObject* fail(PyObject* type, const std::string& message) {
  PyErr_SetString(type, message.c_str());
  return nullptr;
}

// The address the GPU uses for `ptr`, or nullptr with `*why` set (pageable host memory).
char* device_address(int64_t ptr, bool host_allowed, std::string* why) {
  cudaPointerAttributes attr;
  if (cudaPointerGetAttributes(&attr, reinterpret_cast<void*>(ptr)) != cudaSuccess) {
    cudaGetLastError();  // clear it: an unknown pointer is reported, not left for the next call
    *why = "memory CUDA does not know (pageable host memory)";
    return nullptr;
  }
  if (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged)
    return static_cast<char*>(attr.devicePointer);
  if (attr.type == cudaMemoryTypeHost && host_allowed && attr.devicePointer != nullptr)
    return static_cast<char*>(attr.devicePointer);
  *why = attr.type == cudaMemoryTypeHost ? "host memory where device memory is needed"
                                         : "pageable host memory";
  return nullptr;
}

PyObject* copy(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 16) return fail(PyExc_TypeError, "copy takes 16 integer arguments");
  int64_t v[16];
  for (Py_ssize_t i = 0; i < 16; ++i) {
    v[i] = PyLong_AsLongLong(args[i]);
    if (v[i] == -1 && PyErr_Occurred()) return nullptr;
  }
  const bool to_cache = v[0] != 0;
  Rows r{nullptr, v[2], v[3], v[4], v[5], nullptr, v[7], v[8], v[9],
         reinterpret_cast<const int64_t*>(v[10]), v[11], v[12], v[13], v[14]};
  if (r.layers < 0 || r.tokens < 0 || r.block_size < 1 || r.row_bytes < 1)
    return fail(PyExc_ValueError, "negative or empty geometry");
  if (2 * r.layers * r.tokens > 0x7fffffffLL) return fail(PyExc_ValueError, "too many rows for one launch");
  if (r.layers == 0 || r.tokens == 0) Py_RETURN_NONE;
  std::string why;
  if ((r.cache = device_address(v[1], false, &why)) == nullptr)
    return fail(PyExc_ValueError, "the cache is " + why);
  if ((r.chunk = device_address(v[6], true, &why)) == nullptr)
    return fail(PyExc_ValueError, "the chunk is " + why);
  cudaError_t err;
  Py_BEGIN_ALLOW_THREADS
  const auto stream = reinterpret_cast<cudaStream_t>(v[15]);
  switch (word_bytes(r)) {
    case 16: err = launch<uint4>(r, to_cache, stream); break;
    case 8: err = launch<uint2>(r, to_cache, stream); break;
    case 4: err = launch<uint32_t>(r, to_cache, stream); break;
    default: err = launch<unsigned char>(r, to_cache, stream); break;
  }
  Py_END_ALLOW_THREADS
  if (err != cudaSuccess) return fail(PyExc_RuntimeError, std::string("paged copy launch: ") + cudaGetErrorString(err));
  Py_RETURN_NONE;
}

PyMethodDef kMethods[] = {
    {"copy", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(copy)), METH_FASTCALL,
     "Paged gather or scatter of every row of a request between a GPU block cache and a chunk."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_paged_copy_cuda", nullptr, -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__paged_copy_cuda() { return PyModule_Create(&kModule); }
