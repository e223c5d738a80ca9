/* module.c: the CPython/NumPy binding of the prefopt C core (prefopt._core).
 *
 * The only file (with py_model.c, the Model type) that includes Python.h.
 * Every wrapper: parse + validate arguments with the GIL held, take raw
 * pointers, release the GIL around the pure-C call, re-take it, and turn a
 * pf_status into an exception. The file is split in sections, one per area
 * of the core, each ending with a PF_<AREA>_METHODS table fragment.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define PY_ARRAY_UNIQUE_SYMBOL PF_ARRAY_API
#include <numpy/arrayobject.h>

#include "blas.h"
#include "common.h"
#include "pybind.h"

/* ------------------------------------------------------------------------ */
/* section: shared helpers                                                   */
/* ------------------------------------------------------------------------ */

PyObject *pf_status_to_exc(const pf_status *st) {
    PyObject *type = PyExc_RuntimeError;
    switch (st->code) {
    case PF_ENOMEM: type = PyExc_MemoryError; break;
    case PF_EINVAL: type = PyExc_ValueError; break;
    case PF_ENONFINITE: type = PyExc_FloatingPointError; break;
    case PF_EUNSUPPORTED: type = PyExc_ValueError; break;
    default: break;
    }
    PyErr_SetString(type, st->msg[0] ? st->msg : "prefopt core error");
    return NULL;
}

/* Returns a new reference to a C-contiguous, aligned array of `type` with
 * `ndim` dims (ndim < 0: any), or NULL with a TypeError/ValueError naming `what`.
 * Refuses silent dtype conversions: the caller's dtype must already match. */
PyArrayObject *pf_as_array(PyObject *obj, int type, int ndim, const char *what) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy array, got %s", what, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != type) {
        PyArray_Descr *want = PyArray_DescrFromType(type);
        PyErr_Format(PyExc_TypeError, "%s must have dtype %S, got %S", what, (PyObject *)want,
                     (PyObject *)PyArray_DESCR(a));
        Py_XDECREF(want);
        return NULL;
    }
    if (ndim >= 0 && PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must be %d-dimensional, got %d dimensions", what, ndim,
                     PyArray_NDIM(a));
        return NULL;
    }
    return (PyArrayObject *)PyArray_FROM_OTF(obj, type, NPY_ARRAY_IN_ARRAY);
}

/* ------------------------------------------------------------------------ */
/* section: openblas config and threads                                      */
/* ------------------------------------------------------------------------ */

static PyObject *py_blas_info(PyObject *self, PyObject *noargs) {
    const char *cfg = pf_openblas_get_config();
    const char *core = pf_openblas_get_corename();
    return Py_BuildValue("{s:s,s:s,s:i}", "config", cfg ? cfg : "", "corename", core ? core : "",
                         "num_threads", pf_openblas_get_num_threads());
}

static PyObject *py_set_num_threads(PyObject *self, PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 1 || n > 1024) {
        PyErr_Format(PyExc_ValueError, "num_threads must be between 1 and 1024, got %ld", n);
        return NULL;
    }
    pf_openblas_set_num_threads((int)n);
    Py_RETURN_NONE;
}

#define PF_BLAS_METHODS                                                                       \
    {"blas_info", py_blas_info, METH_NOARGS, "OpenBLAS config string, core name, threads."}, \
    {"set_num_threads", py_set_num_threads, METH_O, "Set the OpenBLAS thread count."},

/* ------------------------------------------------------------------------ */
/* section: quant (dequantisers)                                             */
/* ------------------------------------------------------------------------ */

#define PF_QUANT_METHODS

/* ------------------------------------------------------------------------ */
/* section: loss and optimizer                                               */
/* ------------------------------------------------------------------------ */

#define PF_LOSS_METHODS

/* ------------------------------------------------------------------------ */
/* section: module                                                           */
/* ------------------------------------------------------------------------ */

static PyMethodDef pf_methods[] = {
    PF_BLAS_METHODS
    PF_QUANT_METHODS
    PF_LOSS_METHODS
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef pf_module = {
    PyModuleDef_HEAD_INIT, "_core", "prefopt C core (forward/backward, LoRA, losses, AdamW).", -1,
    pf_methods,
};

PyMODINIT_FUNC PyInit__core(void) {
    PyObject *m = PyModule_Create(&pf_module);
    if (!m) return NULL;
    import_array1((Py_DECREF(m), NULL));
    if (pf_model_register(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
