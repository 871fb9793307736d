// One record file read with the GIL released once: see record_read.cpp.
#pragma once
#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace kvtier_io {

PyObject* read_record(PyObject*, PyObject* const* args, Py_ssize_t nargs);

}  // namespace kvtier_io
