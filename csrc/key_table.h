// The KeyTable type of kvtier._native_keys (key_table.cpp): the CPU tier's key set for the lookup.
#pragma once
#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace kvtier_table {

extern PyType_Spec kTableSpec;

}  // namespace kvtier_table
