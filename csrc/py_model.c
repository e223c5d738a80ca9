/* py_model.c: the prefopt._core.Model type (binding of model.c + lora.c). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NO_IMPORT_ARRAY
#define PY_ARRAY_UNIQUE_SYMBOL PF_ARRAY_API
#include <numpy/arrayobject.h>

#include "pybind.h"

int pf_model_register(PyObject *module) { return 0; }
