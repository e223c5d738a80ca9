/* pybind.h: what module.c and py_model.c (the two Python-facing files) share. */
#ifndef PF_PYBIND_H
#define PF_PYBIND_H
#include "common.h"
#include "loss.h"

PyObject *pf_status_to_exc(const pf_status *st);
PyArrayObject *pf_as_array(PyObject *obj, int type, int ndim, const char *what);
/* Objective dict -> pf_objective (loss.h), validated; 0 or -1 with an exception set.
 * Defined in module.c, section "loss and optimizer". */
int pf_objective_from_py(PyObject *d, pf_objective *o);
/* Adds the Model type to the module; defined in py_model.c. */
int pf_model_register(PyObject *module);
#endif
