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

#include "quant.h"

/* dequantize(ggml_type: int, raw: uint8 ndarray, n_elements: int) -> float32 [n_elements].
 * raw (any shape, C-contiguous uint8) must hold exactly the bytes of n_elements. */
static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    int type;
    PyObject *raw_obj;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "iOn:dequantize", &type, &raw_obj, &n)) return NULL;
    if (n < 0) {
        PyErr_Format(PyExc_ValueError, "n_elements must be >= 0, got %zd", n);
        return NULL;
    }
    pf_status st = {0};
    size_t need;
    if (pf_ggml_nbytes(type, (size_t)n, &need, &st)) return pf_status_to_exc(&st);
    PyArrayObject *raw = pf_as_array(raw_obj, NPY_UINT8, -1, "raw");
    if (!raw) return NULL;
    size_t have = (size_t)PyArray_NBYTES(raw);
    if (have != need) {
        PyErr_Format(PyExc_ValueError, "%zd elements of %s need %zu bytes, raw has %zu", n,
                     pf_ggml_type_name(type), need, have);
        Py_DECREF(raw);
        return NULL;
    }
    npy_intp dims[1] = {(npy_intp)n};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(1, dims, NPY_FLOAT32);
    if (!out) {
        Py_DECREF(raw);
        return NULL;
    }
    const uint8_t *src = (const uint8_t *)PyArray_DATA(raw);
    float *dst = (float *)PyArray_DATA(out);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pf_dequantize(type, src, have, dst, (size_t)n, &st);
    Py_END_ALLOW_THREADS
    Py_DECREF(raw);
    if (rc) {
        Py_DECREF(out);
        return pf_status_to_exc(&st);
    }
    return (PyObject *)out;
}

/* ggml_type_info(ggml_type: int) -> (name, block_elems, block_bytes); ValueError if unsupported. */
static PyObject *py_ggml_type_info(PyObject *self, PyObject *arg) {
    long t = PyLong_AsLong(arg);
    if (t == -1 && PyErr_Occurred()) return NULL;
    if (t < INT32_MIN || t > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "ggml type id %ld out of range", t);
        return NULL;
    }
    pf_status st = {0};
    size_t be, bb;
    if (pf_ggml_type_info((int)t, &be, &bb, &st)) return pf_status_to_exc(&st);
    return Py_BuildValue("(snn)", pf_ggml_type_name((int)t), (Py_ssize_t)be, (Py_ssize_t)bb);
}

/* ggml_type_name(ggml_type: int) -> str ("unknown" if not a ggml id). */
static PyObject *py_ggml_type_name(PyObject *self, PyObject *arg) {
    long t = PyLong_AsLong(arg);
    if (t == -1 && PyErr_Occurred()) return NULL;
    if (t < INT32_MIN || t > INT32_MAX) return PyUnicode_FromString("unknown");
    return PyUnicode_FromString(pf_ggml_type_name((int)t));
}

#define PF_QUANT_METHODS                                                                        \
    {"dequantize", py_dequantize, METH_VARARGS,                                                \
     "dequantize(ggml_type, raw uint8 ndarray, n_elements) -> float32 ndarray (GIL released)."}, \
    {"ggml_type_info", py_ggml_type_info, METH_O,                                               \
     "ggml_type_info(ggml_type) -> (name, block_elems, block_bytes); ValueError if unsupported."}, \
    {"ggml_type_name", py_ggml_type_name, METH_O, "Name of a ggml type id, or 'unknown'."},

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
