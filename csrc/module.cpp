// kvtier.codecs._cachegen_native: Python bindings of the cachegen coder (rans.h, quant.h).
//
// Called only by kvtier/codecs/native.py, which checks shapes, dtypes and tables and allocates every
// output as a numpy array; here each buffer is checked again for its element size, C-contiguity and
// element count before its pointer is used, so a wrong call is a ValueError, never a stray write.
// The GIL is released while coding: tiers decode on several read threads at once. Errors: a
// corrupt stream raises CorruptStream (native.py turns it into kvtier.errors.CorruptRecord);
// std::invalid_argument becomes ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "quant.h"
#include "rans.h"

namespace py = pybind11;

namespace {

// The buffer's contents as T[count], refused unless exactly that and C-contiguous.
template <typename T>
T* checked(const py::buffer_info& b, int64_t count, const char* what) {
  bool contiguous = true;
  int64_t expect = b.itemsize;
  for (int64_t d = b.ndim - 1; d >= 0; --d) {
    if (b.shape[d] > 1 && b.strides[d] != expect) contiguous = false;
    expect *= b.shape[d];
  }
  if (b.itemsize != static_cast<py::ssize_t>(sizeof(T)) || !contiguous || b.size != count) {
    throw std::invalid_argument(std::string(what) + ": need a contiguous buffer of " + std::to_string(count) +
                                " items of " + std::to_string(sizeof(T)) + " bytes");
  }
  return static_cast<T*>(b.ptr);
}

py::tuple rans_encode(py::buffer symbols, int64_t streams, int64_t n, py::buffer freqs, int k) {
  auto sb = symbols.request(), fb = freqs.request();
  const auto* sym = checked<uint8_t>(sb, streams * n, "symbols");
  const auto* f = checked<uint32_t>(fb, streams * k, "freqs");
  py::array_t<int64_t> lengths(streams);
  int64_t* len = lengths.mutable_data();
  std::vector<uint8_t> data;
  {
    py::gil_scoped_release nogil;
    data.reserve(static_cast<size_t>(streams * (n / 2 + kvtier::kStateBytes)));
    kvtier::rans_encode(sym, streams, n, f, k, data, len);
  }
  return py::make_tuple(py::bytes(reinterpret_cast<const char*>(data.data()), data.size()), lengths);
}

void rans_decode(py::buffer data, py::buffer lengths, int64_t streams, py::buffer freqs, int k, int64_t count,
                 py::buffer out, int64_t group) {
  auto db = data.request(), lb = lengths.request(), fb = freqs.request(), ob = out.request(true);
  const auto* d = checked<uint8_t>(db, db.size, "data");
  const auto* len = checked<int64_t>(lb, streams, "lengths");
  const auto* f = checked<uint32_t>(fb, streams * k, "freqs");
  auto* o = checked<uint8_t>(ob, streams * count, "out");
  if (group < 1 || streams % group || k < 1 || k > 256) throw std::invalid_argument("bad stream group or k");
  py::gil_scoped_release nogil;
  kvtier::rans_decode(d, db.size, len, streams, f, k, count, o, group);
}

void quantise(py::buffer x, bool bf16, int64_t layers, int64_t tokens, int64_t channels, py::buffer levels,
              py::buffer scales, py::buffer symbols, bool by_channel) {
  auto xb = x.request(), lb = levels.request(), sb = scales.request(true), yb = symbols.request(true);
  const int64_t n = 2 * layers * tokens * channels;
  const auto* xp = checked<uint16_t>(xb, n, "x");
  const auto* lv = checked<int64_t>(lb, 2 * layers, "levels");
  auto* sp = checked<uint16_t>(sb, 2 * layers * tokens, "scales");
  auto* yp = checked<uint8_t>(yb, n, "symbols");
  py::gil_scoped_release nogil;
  kvtier::quantise(xp, bf16, {layers, tokens, channels}, lv, sp, yp, by_channel);
}

void dequantise(py::buffer symbols, py::buffer scales, py::buffer levels, int64_t layers, int64_t tokens,
                int64_t channels, bool bf16, py::buffer out) {
  auto yb = symbols.request(), sb = scales.request(), lb = levels.request(), ob = out.request(true);
  const int64_t n = 2 * layers * tokens * channels;
  const auto* yp = checked<uint8_t>(yb, n, "symbols");
  const auto* sp = checked<uint16_t>(sb, 2 * layers * tokens, "scales");
  const auto* lv = checked<int64_t>(lb, 2 * layers, "levels");
  auto* op = checked<uint16_t>(ob, n, "out");
  for (int64_t i = 0; i < 2 * layers; ++i)
    if (lv[i] < 1 || lv[i] > 127) throw std::invalid_argument("levels must be in [1, 127]");
  py::gil_scoped_release nogil;
  kvtier::dequantise(yp, sp, lv, {layers, tokens, channels}, bf16, op);
}

void symbol_counts(py::buffer streams, int64_t count, int64_t n, int k, py::buffer counts) {
  auto sb = streams.request(), cb = counts.request(true);
  const auto* sp = checked<uint8_t>(sb, count * n, "streams");
  auto* cp = checked<int64_t>(cb, count * k, "counts");
  if (k < 1 || k > 256) throw std::invalid_argument("k must be in [1, 256]");
  py::gil_scoped_release nogil;
  kvtier::symbol_counts(sp, count, n, k, cp);
}

void join_planes(py::buffer planes, int64_t rows, int64_t n, py::buffer out) {
  auto pb = planes.request(), ob = out.request(true);
  const auto* pp = checked<uint8_t>(pb, 2 * rows * n, "planes");
  auto* op = checked<uint16_t>(ob, rows * n, "out");
  py::gil_scoped_release nogil;
  kvtier::join_planes(pp, rows, n, op);
}

}  // namespace

PYBIND11_MODULE(_cachegen_native, m) {
  m.doc() = "kvtier's cachegen coder in C++ (use kvtier.codecs.native, not this module)";
  py::register_exception<kvtier::CorruptStream>(m, "CorruptStream");
  m.def("rans_encode", &rans_encode);
  m.def("rans_decode", &rans_decode);
  m.def("quantise", &quantise);
  m.def("dequantise", &dequantise);
  m.def("symbol_counts", &symbol_counts);
  m.def("join_planes", &join_planes);
}
