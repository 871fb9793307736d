// A Py_buffer held for the length of a call and released on every path out: the one way the
// extension's C++ files take Python buffers.
#pragma once
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdint>

namespace kvtier_native {

struct HeldBuffer {
  Py_buffer view{};
  bool held = false;
  bool get(PyObject* obj, int flags) { return held = PyObject_GetBuffer(obj, &view, flags) == 0; }
  ~HeldBuffer() {
    if (held) PyBuffer_Release(&view);
  }
  const uint8_t* data() const { return static_cast<const uint8_t*>(view.buf); }
};

}  // namespace kvtier_native
