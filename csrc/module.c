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
/* (owner: trainmath) rng, LoRA branch, objectives, AdamW, schedules: small   */
/* functions used by the Python layer and by the tests of these kernels.      */
/* ------------------------------------------------------------------------ */

#include "lora.h"
#include "loss.h"
#include "optim.h"
#include "rng.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

/* New C-contiguous float32 array of `ndim` dims from obj, exact dtype, with
 * the given shape (a dim of -1: any). Returns a new reference or NULL. */
static PyArrayObject *pf_f32_shape(PyObject *obj, const char *what, int ndim, const npy_intp *shape) {
    PyArrayObject *a = pf_as_array(obj, NPY_FLOAT32, ndim, what);
    if (!a) return NULL;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] >= 0 && PyArray_DIM(a, d) != shape[d]) {
            PyErr_Format(PyExc_ValueError, "%s: dimension %d must be %zd, got %zd", what, d,
                         (Py_ssize_t)shape[d], (Py_ssize_t)PyArray_DIM(a, d));
            Py_DECREF(a);
            return NULL;
        }
    }
    return a;
}

static PyObject *py_rng_u01(PyObject *self, PyObject *args) {
    unsigned long long seed, stream;
    PyObject *idx_obj;
    if (!PyArg_ParseTuple(args, "KKO", &seed, &stream, &idx_obj)) return NULL;
    PyArrayObject *idx = pf_as_array(idx_obj, NPY_UINT64, 1, "idx");
    if (!idx) return NULL;
    npy_intp n = PyArray_DIM(idx, 0);
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(1, &n, NPY_FLOAT32);
    PyArrayObject *bits = (PyArrayObject *)PyArray_SimpleNew(1, &n, NPY_UINT64);
    if (!out || !bits) {
        Py_DECREF(idx);
        Py_XDECREF(out);
        Py_XDECREF(bits);
        return NULL;
    }
    const uint64_t *ip = (const uint64_t *)PyArray_DATA(idx);
    float *op = (float *)PyArray_DATA(out);
    uint64_t *bp = (uint64_t *)PyArray_DATA(bits);
    Py_BEGIN_ALLOW_THREADS
    for (npy_intp i = 0; i < n; i++) {
        op[i] = pf_rng_u01(seed, stream, ip[i]);
        bp[i] = pf_rng_bits(seed, stream, ip[i]);
    }
    Py_END_ALLOW_THREADS
    Py_DECREF(idx);
    return Py_BuildValue("(NN)", (PyObject *)out, (PyObject *)bits);
}

static int pf_target_from_name(const char *name) {
    for (int t = 0; t < PF_LORA_NT; t++)
        if (strcmp(name, pf_lora_target_names[t]) == 0) return t;
    return -1;
}

/* lora_init_test(n_layers, in_dims[7], out_dims[7], rank, alpha, rslora, dropout,
 *                targets: list[str], seed) -> {"scale", "n_params", "A": {(layer, target): arr}, "B": ...}
 * Creates an adapter arena and initialises it; for tests of layout and init. */
static PyObject *py_lora_init_test(PyObject *self, PyObject *args) {
    int n_layers, rank, rslora;
    float alpha, dropout;
    unsigned long long seed;
    PyObject *in_obj, *out_obj, *tg_obj;
    if (!PyArg_ParseTuple(args, "iOOifpfOK", &n_layers, &in_obj, &out_obj, &rank, &alpha, &rslora,
                          &dropout, &tg_obj, &seed))
        return NULL;
    int in_dim[PF_LORA_NT], out_dim[PF_LORA_NT];
    PyObject *lists[2] = {in_obj, out_obj};
    int *dims[2] = {in_dim, out_dim};
    for (int k = 0; k < 2; k++) {
        PyObject *seq = PySequence_Fast(lists[k], "in_dims/out_dims must be sequences of 7 ints");
        if (!seq) return NULL;
        if (PySequence_Fast_GET_SIZE(seq) != PF_LORA_NT) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "in_dims/out_dims must have 7 entries (q,k,v,o,gate,up,down)");
            return NULL;
        }
        for (int t = 0; t < PF_LORA_NT; t++) {
            long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, t));
            if (v == -1 && PyErr_Occurred()) { Py_DECREF(seq); return NULL; }
            dims[k][t] = (int)v;
        }
        Py_DECREF(seq);
    }
    unsigned mask = 0;
    PyObject *tseq = PySequence_Fast(tg_obj, "targets must be a sequence of module names");
    if (!tseq) return NULL;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(tseq); i++) {
        const char *nm = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(tseq, i));
        if (!nm) { Py_DECREF(tseq); return NULL; }
        int t = pf_target_from_name(nm);
        if (t < 0) {
            PyErr_Format(PyExc_ValueError, "unknown LoRA target %s", nm);
            Py_DECREF(tseq);
            return NULL;
        }
        mask |= 1u << t;
    }
    Py_DECREF(tseq);
    pf_lora l;
    pf_status st = {0};
    if (pf_lora_create(&l, n_layers, in_dim, out_dim, rank, alpha, rslora, dropout, mask, &st))
        return pf_status_to_exc(&st);
    Py_BEGIN_ALLOW_THREADS
    pf_lora_init_weights(&l, seed);
    Py_END_ALLOW_THREADS
    PyObject *res = PyDict_New(), *da = PyDict_New(), *db = PyDict_New();
    if (!res || !da || !db) goto fail;
    for (int layer = 0; layer < n_layers; layer++)
        for (int t = 0; t < PF_LORA_NT; t++) {
            if (!pf_lora_has(&l, t)) continue;
            npy_intp sa[2] = {rank, in_dim[t]}, sb[2] = {out_dim[t], rank};
            PyObject *a = PyArray_SimpleNew(2, sa, NPY_FLOAT32), *b = PyArray_SimpleNew(2, sb, NPY_FLOAT32);
            PyObject *key = Py_BuildValue("(is)", layer, pf_lora_target_names[t]);
            if (!a || !b || !key) { Py_XDECREF(a); Py_XDECREF(b); Py_XDECREF(key); goto fail; }
            memcpy(PyArray_DATA((PyArrayObject *)a), pf_lora_a(&l, l.params, layer, t), (size_t)sa[0] * sa[1] * sizeof(float));
            memcpy(PyArray_DATA((PyArrayObject *)b), pf_lora_b(&l, l.params, layer, t), (size_t)sb[0] * sb[1] * sizeof(float));
            int e = PyDict_SetItem(da, key, a) | PyDict_SetItem(db, key, b);
            Py_DECREF(a); Py_DECREF(b); Py_DECREF(key);
            if (e) goto fail;
        }
    PyObject *sc = PyFloat_FromDouble(l.scale), *np_ = PyLong_FromSize_t(l.n_params);
    if (!sc || !np_ || PyDict_SetItemString(res, "scale", sc) || PyDict_SetItemString(res, "n_params", np_) ||
        PyDict_SetItemString(res, "A", da) || PyDict_SetItemString(res, "B", db)) {
        Py_XDECREF(sc); Py_XDECREF(np_);
        goto fail;
    }
    Py_DECREF(sc); Py_DECREF(np_); Py_DECREF(da); Py_DECREF(db);
    pf_lora_free(&l);
    return res;
fail:
    Py_XDECREF(res); Py_XDECREF(da); Py_XDECREF(db);
    pf_lora_free(&l);
    return NULL;
}

/* lora_branch_test(x [T,in], A [r,in], B [out,r], y0 [T,out], dy [T,out], W [out,in],
 *                  alpha, rslora, dropout, dropout_seed, layer, target, use_scratch)
 * -> {"y", "xa", "dA", "dB", "dx", "merged"}: pf_lora_forward / pf_lora_backward /
 * pf_lora_merge on one adapted linear, for finite-difference tests. */
static PyObject *py_lora_branch_test(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "A", "B", "y0", "dy", "W", "alpha", "rslora", "dropout",
                             "dropout_seed", "layer", "target", "use_scratch", NULL};
    PyObject *xo, *Ao, *Bo, *y0o, *dyo, *Wo;
    float alpha, dropout;
    int rslora, layer, use_scratch = 1;
    unsigned long long dseed;
    const char *tname;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOfpfKis|p", kwlist, &xo, &Ao, &Bo, &y0o, &dyo, &Wo,
                                     &alpha, &rslora, &dropout, &dseed, &layer, &tname, &use_scratch))
        return NULL;
    int t = pf_target_from_name(tname);
    if (t < 0) return PyErr_Format(PyExc_ValueError, "unknown LoRA target %s", tname);
    if (layer < 0 || layer > 1000) return PyErr_Format(PyExc_ValueError, "layer %d out of range", layer);
    PyArrayObject *x = NULL, *A = NULL, *B = NULL, *y0 = NULL, *dy = NULL, *W = NULL;
    PyObject *res = NULL;
    npy_intp any2[2] = {-1, -1};
    if (!(x = pf_f32_shape(xo, "x", 2, any2)) || !(A = pf_f32_shape(Ao, "A", 2, any2))) goto done;
    npy_intp T = PyArray_DIM(x, 0), in = PyArray_DIM(x, 1), r = PyArray_DIM(A, 0);
    if (PyArray_DIM(A, 1) != in) { PyErr_SetString(PyExc_ValueError, "A must be [rank, in]"); goto done; }
    if (!(B = pf_f32_shape(Bo, "B", 2, any2))) goto done;
    npy_intp out = PyArray_DIM(B, 0);
    npy_intp sB[2] = {out, r}, sy[2] = {T, out}, sW[2] = {out, in};
    if (PyArray_DIM(B, 1) != r) { PyErr_SetString(PyExc_ValueError, "B must be [out, rank]"); goto done; }
    if (!(y0 = pf_f32_shape(y0o, "y0", 2, sy)) || !(dy = pf_f32_shape(dyo, "dy", 2, sy)) ||
        !(W = pf_f32_shape(Wo, "W", 2, sW)))
        goto done;
    (void)sB;
    int in_dim[PF_LORA_NT] = {0}, out_dim[PF_LORA_NT] = {0};
    in_dim[t] = (int)in;
    out_dim[t] = (int)out;
    pf_lora l;
    pf_status st = {0};
    if (pf_lora_create(&l, layer + 1, in_dim, out_dim, (int)r, alpha, rslora, dropout, 1u << t, &st)) {
        pf_status_to_exc(&st);
        goto done;
    }
    memcpy(pf_lora_a(&l, l.params, layer, t), PyArray_DATA(A), (size_t)(r * in) * sizeof(float));
    memcpy(pf_lora_b(&l, l.params, layer, t), PyArray_DATA(B), (size_t)(out * r) * sizeof(float));
    npy_intp sxa[2] = {T, r}, sx[2] = {T, in}, sA[2] = {r, in};
    PyArrayObject *y = (PyArrayObject *)PyArray_NewCopy(y0, NPY_CORDER);
    PyArrayObject *xa = (PyArrayObject *)PyArray_ZEROS(2, sxa, NPY_FLOAT32, 0);
    PyArrayObject *dA = (PyArrayObject *)PyArray_ZEROS(2, sA, NPY_FLOAT32, 0);
    PyArrayObject *dB = (PyArrayObject *)PyArray_ZEROS(2, sB, NPY_FLOAT32, 0);
    PyArrayObject *dx = (PyArrayObject *)PyArray_ZEROS(2, sx, NPY_FLOAT32, 0);
    PyArrayObject *merged = (PyArrayObject *)PyArray_NewCopy(W, NPY_CORDER);
    float *tmp = pf_malloc((size_t)(T * r + 1) * sizeof(float), "tmp", &st);
    float *xd = use_scratch ? pf_malloc((size_t)(T * in + 1) * sizeof(float), "xd", &st) : NULL;
    if (!y || !xa || !dA || !dB || !dx || !merged || !tmp || (use_scratch && !xd)) {
        if (!PyErr_Occurred()) pf_status_to_exc(&st);
    } else {
        Py_BEGIN_ALLOW_THREADS
        pf_lora_forward(&l, layer, t, PyArray_DATA(x), (int)T, PyArray_DATA(y), PyArray_DATA(xa), xd, dseed);
        pf_lora_backward(&l, layer, t, PyArray_DATA(x), (int)T, PyArray_DATA(xa), PyArray_DATA(dy),
                         PyArray_DATA(dx), tmp, xd, dseed);
        memcpy(PyArray_DATA(dA), pf_lora_a(&l, l.grads, layer, t), (size_t)(r * in) * sizeof(float));
        memcpy(PyArray_DATA(dB), pf_lora_b(&l, l.grads, layer, t), (size_t)(out * r) * sizeof(float));
        pf_lora_merge(&l, layer, t, PyArray_DATA(merged));
        Py_END_ALLOW_THREADS
        res = Py_BuildValue("{s:O,s:O,s:O,s:O,s:O,s:O,s:d}", "y", y, "xa", xa, "dA", dA, "dB", dB, "dx",
                            dx, "merged", merged, "scale", (double)l.scale);
    }
    free(tmp);
    free(xd);
    Py_XDECREF(y); Py_XDECREF(xa); Py_XDECREF(dA); Py_XDECREF(dB); Py_XDECREF(dx); Py_XDECREF(merged);
    pf_lora_free(&l);
done:
    Py_XDECREF(x); Py_XDECREF(A); Py_XDECREF(B); Py_XDECREF(y0); Py_XDECREF(dy); Py_XDECREF(W);
    return res;
}

#define PF_LORA_TEST_METHODS                                                                   \
    {"rng_u01", py_rng_u01, METH_VARARGS,                                                      \
     "rng_u01(seed, stream, idx uint64[n]) -> (u01 float32[n], bits uint64[n])."},              \
    {"lora_init_test", py_lora_init_test, METH_VARARGS,                                        \
     "Create + init a LoRA arena; returns scale, n_params and the A/B blocks."},                \
    {"lora_branch_test", (PyCFunction)(void (*)(void))py_lora_branch_test,                     \
     METH_VARARGS | METH_KEYWORDS, "Forward/backward/merge of one LoRA branch (tests)."},

/* Fills *o from an objective dict {"kind": str, "beta", "label_smoothing",
 * "gamma", "sft_weight", "lambda"} (missing numbers: beta 0.1, lambda 0.1,
 * others 0) and validates it. Unknown keys are an error. Returns 0 or -1 with
 * a Python exception set. Shared with py_model.c (declared in pybind.h). */
int pf_objective_from_py(PyObject *d, pf_objective *o) {
    if (!PyDict_Check(d)) {
        PyErr_Format(PyExc_TypeError, "objective must be a dict, got %s", Py_TYPE(d)->tp_name);
        return -1;
    }
    memset(o, 0, sizeof *o);
    o->beta = 0.1;
    o->lambda = 0.1;
    PyObject *kind = PyDict_GetItemString(d, "kind");
    if (!kind || !PyUnicode_Check(kind)) {
        PyErr_SetString(PyExc_ValueError, "objective needs a string 'kind' (dpo, ipo, hinge, simpo, orpo)");
        return -1;
    }
    const char *kname = PyUnicode_AsUTF8(kind);
    if (!kname) return -1;
    o->kind = pf_objective_kind(kname);
    if (o->kind < 0) {
        PyErr_Format(PyExc_ValueError, "unknown objective kind '%s' (dpo, ipo, hinge, simpo, orpo)", kname);
        return -1;
    }
    PyObject *key, *val;
    Py_ssize_t pos = 0;
    while (PyDict_Next(d, &pos, &key, &val)) {
        const char *k = PyUnicode_Check(key) ? PyUnicode_AsUTF8(key) : NULL;
        if (!k) {
            PyErr_SetString(PyExc_TypeError, "objective keys must be strings");
            return -1;
        }
        if (strcmp(k, "kind") == 0) continue;
        double *slot = NULL;
        if (strcmp(k, "beta") == 0) slot = &o->beta;
        else if (strcmp(k, "label_smoothing") == 0) slot = &o->label_smoothing;
        else if (strcmp(k, "gamma") == 0) slot = &o->gamma;
        else if (strcmp(k, "sft_weight") == 0) slot = &o->sft_weight;
        else if (strcmp(k, "lambda") == 0) slot = &o->lambda;
        if (!slot) {
            if (strcmp(k, "gamma_beta_ratio") == 0)
                PyErr_SetString(PyExc_ValueError, "objective: resolve gamma_beta_ratio to the absolute "
                                                  "'gamma' (gamma = beta * ratio) before the core");
            else
                PyErr_Format(PyExc_ValueError, "objective: unknown parameter '%s'", k);
            return -1;
        }
        double x = PyFloat_AsDouble(val);
        if (x == -1.0 && PyErr_Occurred()) return -1;
        *slot = x;
    }
    pf_status st = {0};
    if (pf_objective_check(o, &st)) {
        pf_status_to_exc(&st);
        return -1;
    }
    return 0;
}

/* objective_eval(objective dict, Lc, Lr, Rc, Rr, nc, nr: float64 [P])
 * -> dict of float64 [P]: loss, dLc, dLr, reward_c, reward_r, nll, log_odds, log_sig_odds */
static PyObject *py_objective_eval(PyObject *self, PyObject *args) {
    PyObject *od, *in_obj[6];
    if (!PyArg_ParseTuple(args, "OOOOOOO", &od, &in_obj[0], &in_obj[1], &in_obj[2], &in_obj[3], &in_obj[4],
                          &in_obj[5]))
        return NULL;
    pf_objective o;
    if (pf_objective_from_py(od, &o) < 0) return NULL;
    static const char *in_names[6] = {"Lc", "Lr", "Rc", "Rr", "nc", "nr"};
    static const char *out_names[8] = {"loss", "dLc", "dLr", "reward_c", "reward_r", "nll", "log_odds",
                                       "log_sig_odds"};
    PyArrayObject *in[6] = {NULL}, *out[8] = {NULL};
    PyObject *res = NULL;
    npy_intp P = -1;
    for (int k = 0; k < 6; k++) {
        in[k] = pf_as_array(in_obj[k], NPY_FLOAT64, 1, in_names[k]);
        if (!in[k]) goto done;
        if (P < 0) P = PyArray_DIM(in[k], 0);
        if (PyArray_DIM(in[k], 0) != P) {
            PyErr_Format(PyExc_ValueError, "%s has %zd entries, Lc has %zd", in_names[k],
                         (Py_ssize_t)PyArray_DIM(in[k], 0), (Py_ssize_t)P);
            goto done;
        }
    }
    for (int k = 0; k < 8; k++)
        if (!(out[k] = (PyArrayObject *)PyArray_ZEROS(1, &P, NPY_FLOAT64, 0))) goto done;
    const double *x[6];
    double *y[8];
    for (int k = 0; k < 6; k++) x[k] = (const double *)PyArray_DATA(in[k]);
    for (int k = 0; k < 8; k++) y[k] = (double *)PyArray_DATA(out[k]);
    pf_status st = {0};
    npy_intp bad = -1;
    Py_BEGIN_ALLOW_THREADS
    for (npy_intp i = 0; i < P; i++) {
        pf_pair_loss pl;
        if (pf_objective_pair(&o, x[0][i], x[1][i], x[2][i], x[3][i], x[4][i], x[5][i], &pl, &st)) {
            bad = i;
            break;
        }
        y[0][i] = pl.loss; y[1][i] = pl.dLc; y[2][i] = pl.dLr; y[3][i] = pl.reward_c;
        y[4][i] = pl.reward_r; y[5][i] = pl.nll; y[6][i] = pl.log_odds; y[7][i] = pl.log_sig_odds;
    }
    Py_END_ALLOW_THREADS
    if (bad >= 0) {
        pf_status st2 = st;
        snprintf(st2.msg, sizeof st2.msg, "pair %zd: %.480s", (Py_ssize_t)bad, st.msg);
        pf_status_to_exc(&st2);
        goto done;
    }
    res = PyDict_New();
    if (!res) goto done;
    for (int k = 0; k < 8; k++)
        if (PyDict_SetItemString(res, out_names[k], (PyObject *)out[k])) {
            Py_CLEAR(res);
            goto done;
        }
done:
    for (int k = 0; k < 6; k++) Py_XDECREF(in[k]);
    for (int k = 0; k < 8; k++) Py_XDECREF(out[k]);
    return res;
}

/* A writable, C-contiguous float32 1-D array, exactly (no copy: updated in place). */
static int pf_f32_inplace(PyObject *obj, const char *what, float **ptr, npy_intp *n) {
    if (!PyArray_Check(obj) || PyArray_TYPE((PyArrayObject *)obj) != NPY_FLOAT32 ||
        !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)obj) || !PyArray_ISWRITEABLE((PyArrayObject *)obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a writable C-contiguous float32 numpy array", what);
        return -1;
    }
    *ptr = (float *)PyArray_DATA((PyArrayObject *)obj);
    *n = PyArray_SIZE((PyArrayObject *)obj);
    return 0;
}

/* adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, grad_scale):
 * p, m, v updated in place (float32, same size as g). */
static PyObject *py_adamw_update(PyObject *self, PyObject *args) {
    PyObject *po, *go, *mo, *vo;
    pf_adamw h;
    long step;
    double gs;
    if (!PyArg_ParseTuple(args, "OOOOdddddld", &po, &go, &mo, &vo, &h.lr, &h.beta1, &h.beta2, &h.eps,
                          &h.weight_decay, &step, &gs))
        return NULL;
    float *p, *g, *m, *v;
    npy_intp np_, ng, nm, nv;
    if (pf_f32_inplace(po, "p", &p, &np_) || pf_f32_inplace(go, "g", &g, &ng) ||
        pf_f32_inplace(mo, "m", &m, &nm) || pf_f32_inplace(vo, "v", &v, &nv))
        return NULL;
    if (ng != np_ || nm != np_ || nv != np_)
        return PyErr_Format(PyExc_ValueError, "adamw_update: p, g, m, v sizes differ (%zd, %zd, %zd, %zd)",
                            (Py_ssize_t)np_, (Py_ssize_t)ng, (Py_ssize_t)nm, (Py_ssize_t)nv);
    if (!(isfinite(gs) && gs >= 0)) return PyErr_Format(PyExc_ValueError, "grad_scale must be finite and >= 0");
    pf_status st = {0};
    if (pf_adamw_check(&h, step, &st)) return pf_status_to_exc(&st);
    Py_BEGIN_ALLOW_THREADS
    pf_adamw_update(p, g, m, v, (size_t)np_, &h, step, gs);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* sumsq(g float32 array) -> float (double accumulation) */
static PyObject *py_sumsq(PyObject *self, PyObject *arg) {
    PyArrayObject *a = pf_as_array(arg, NPY_FLOAT32, -1, "g");
    if (!a) return NULL;
    double s;
    const float *d = (const float *)PyArray_DATA(a);
    size_t n = (size_t)PyArray_SIZE(a);
    Py_BEGIN_ALLOW_THREADS
    s = pf_sumsq(d, n);
    Py_END_ALLOW_THREADS
    Py_DECREF(a);
    return PyFloat_FromDouble(s);
}

/* lr_at(kind, base_lr, step, total_steps, warmup_steps) -> float */
static PyObject *py_lr_at(PyObject *self, PyObject *args) {
    const char *kind;
    double base;
    long step, total, warm;
    if (!PyArg_ParseTuple(args, "sdlll", &kind, &base, &step, &total, &warm)) return NULL;
    int k = pf_sched_kind(kind);
    if (k < 0) return PyErr_Format(PyExc_ValueError, "unknown schedule '%s' (constant, linear, cosine)", kind);
    if (!(isfinite(base) && base >= 0)) return PyErr_Format(PyExc_ValueError, "base_lr must be finite and >= 0");
    if (total < 1 || warm < 0 || step < 0)
        return PyErr_Format(PyExc_ValueError, "need total_steps >= 1, warmup_steps >= 0, step >= 0 (got %ld, %ld, %ld)",
                            total, warm, step);
    return PyFloat_FromDouble(pf_lr_at(k, base, step, total, warm));
}

#define PF_OPTIM_TEST_METHODS                                                                  \
    {"objective_eval", py_objective_eval, METH_VARARGS,                                        \
     "objective_eval(objective dict, Lc, Lr, Rc, Rr, nc, nr float64[P]) -> dict of float64[P]."},\
    {"adamw_update", py_adamw_update, METH_VARARGS,                                            \
     "adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, grad_scale), in place."},\
    {"sumsq", py_sumsq, METH_O, "Sum of squares of a float32 array (double accumulation)."},   \
    {"lr_at", py_lr_at, METH_VARARGS,                                                          \
     "lr_at(kind, base_lr, step, total_steps, warmup_steps): transformers' schedules."},

#define PF_LOSS_METHODS PF_LORA_TEST_METHODS PF_OPTIM_TEST_METHODS

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
