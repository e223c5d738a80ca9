/* py_model.c: the prefopt._core.Model type (binding of model.c + lora.c), and
 * the test-only module function _kernel_test (kernels.c forward/backward).
 *
 * Pattern of every method: parse and validate with the GIL held, mark the
 * model busy, release the GIL around the pure-C call, re-take it, clear busy,
 * turn a pf_status into an exception. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NO_IMPORT_ARRAY
#define PY_ARRAY_UNIQUE_SYMBOL PF_ARRAY_API
#include <numpy/arrayobject.h>

#include <math.h>
#include <string.h>

#include "common.h"
#include "kernels.h"
#include "lora.h"
#include "loss.h"
#include "model.h"
#include "optim.h"
#include "pybind.h"

typedef struct {
    PyObject_HEAD
    pf_model m;
    int ready; /* __init__ succeeded */
    int busy;  /* a call is running with the GIL released */
} PyModel;

/* module paths of the LoRA targets inside a layer, index = pf_lora target id */
static const char *const target_paths[PF_LORA_NT] = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};

static int model_enter(PyModel *self) {
    if (!self->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Model is not initialised");
        return -1;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Model is in use by another thread");
        return -1;
    }
    return 0;
}

/* Marks the model busy right before the GIL is released (no Python call in
 * between), so a second thread cannot start a call on the same model. */
static int model_claim(PyModel *self) {
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Model is in use by another thread");
        return -1;
    }
    self->busy = 1;
    return 0;
}

static int need_lora(PyModel *self, const char *what) {
    if (self->m.lora.rank <= 0) {
        PyErr_Format(PyExc_ValueError, "%s needs an adapter: call lora_init first", what);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* construction                                                              */
/* ------------------------------------------------------------------------ */

static int cfg_long(PyObject *cfg, const char *key, long *out, int required, long dflt) {
    PyObject *v = PyDict_GetItemString(cfg, key); /* borrowed */
    if (!v || v == Py_None) {
        if (required) {
            PyErr_Format(PyExc_ValueError, "config is missing %s", key);
            return -1;
        }
        *out = dflt;
        return 0;
    }
    if (PyBool_Check(v) || !PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "config[%s] must be an int", key);
        return -1;
    }
    *out = PyLong_AsLong(v);
    if (*out == -1 && PyErr_Occurred()) return -1;
    if (*out < 0 || *out > 1L << 30) {
        PyErr_Format(PyExc_ValueError, "config[%s] = %ld is out of range", key, *out);
        return -1;
    }
    return 0;
}

static int cfg_double(PyObject *cfg, const char *key, double *out) {
    PyObject *v = PyDict_GetItemString(cfg, key);
    if (!v) {
        PyErr_Format(PyExc_ValueError, "config is missing %s", key);
        return -1;
    }
    *out = PyFloat_AsDouble(v);
    if (*out == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "config[%s] must be a number", key);
        return -1;
    }
    return 0;
}

static int cfg_bool(PyObject *cfg, const char *key, int *out) {
    PyObject *v = PyDict_GetItemString(cfg, key);
    if (!v || v == Py_None) {
        *out = 0;
        return 0;
    }
    int b = PyObject_IsTrue(v);
    if (b < 0) return -1;
    *out = b;
    return 0;
}

static int Model_init(PyModel *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"config", "weights", NULL};
    PyObject *cfg, *weights;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!", kwlist, &PyDict_Type, &cfg, &PyDict_Type,
                                     &weights))
        return -1;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Model is in use by another thread");
        return -1;
    }
    if (self->ready) pf_model_free(&self->m);
    self->ready = 0;
    long V, D, F, L, H, KVH, hd;
    double eps, theta;
    pf_config c;
    if (cfg_long(cfg, "vocab_size", &V, 1, 0) || cfg_long(cfg, "hidden_size", &D, 1, 0) ||
        cfg_long(cfg, "intermediate_size", &F, 1, 0) ||
        cfg_long(cfg, "num_hidden_layers", &L, 1, 0) ||
        cfg_long(cfg, "num_attention_heads", &H, 1, 0) ||
        cfg_long(cfg, "num_key_value_heads", &KVH, 0, H) ||
        cfg_long(cfg, "head_dim", &hd, 0, H > 0 ? D / H : 0) ||
        cfg_double(cfg, "rms_norm_eps", &eps) || cfg_double(cfg, "rope_theta", &theta) ||
        cfg_bool(cfg, "tie_word_embeddings", &c.tied) ||
        cfg_bool(cfg, "attention_bias", &c.attn_bias))
        return -1;
    c.vocab = (int)V, c.dim = (int)D, c.ffn = (int)F, c.n_layers = (int)L;
    c.n_heads = (int)H, c.n_kv_heads = (int)KVH, c.head_dim = (int)hd;
    c.eps = (float)eps, c.theta = (float)theta;
    pf_status st = {0};
    if (pf_model_create(&self->m, &c, &st)) {
        pf_status_to_exc(&st);
        return -1;
    }
    /* copy every expected tensor, checking dtype, shape and contiguity */
    size_t nt = pf_model_n_tensors(&self->m);
    char name[160];
    for (size_t i = 0; i < nt; i++) {
        float *dst;
        int ndim;
        size_t shape[2];
        pf_model_tensor(&self->m, i, name, sizeof name, &dst, &ndim, shape);
        PyObject *obj = PyDict_GetItemString(weights, name);
        if (!obj) {
            PyErr_Format(PyExc_ValueError, "weights is missing %s", name);
            goto fail;
        }
        char what[200];
        snprintf(what, sizeof what, "weights[%s]", name);
        PyArrayObject *a = pf_as_array(obj, NPY_FLOAT32, ndim, what);
        if (!a) goto fail;
        npy_intp *dims = PyArray_DIMS(a);
        if ((size_t)dims[0] != shape[0] || (ndim == 2 && (size_t)dims[1] != shape[1])) {
            if (ndim == 2)
                PyErr_Format(PyExc_ValueError, "%s has shape (%zd, %zd), expected (%zu, %zu)", what,
                             (Py_ssize_t)dims[0], (Py_ssize_t)dims[1], shape[0], shape[1]);
            else
                PyErr_Format(PyExc_ValueError, "%s has shape (%zd,), expected (%zu,)", what,
                             (Py_ssize_t)dims[0], shape[0]);
            Py_DECREF(a);
            goto fail;
        }
        memcpy(dst, PyArray_DATA(a), sizeof(float) * shape[0] * (ndim == 2 ? shape[1] : 1));
        Py_DECREF(a);
    }
    /* unknown names are an error (a typo must not silently drop a weight);
     * lm_head.weight of a tied model is accepted only if it equals the embedding */
    PyObject *key, *val;
    Py_ssize_t pos = 0;
    while (PyDict_Next(weights, &pos, &key, &val)) {
        if (!PyUnicode_Check(key)) {
            PyErr_SetString(PyExc_TypeError, "weights keys must be str");
            goto fail;
        }
        const char *k = PyUnicode_AsUTF8(key);
        if (!k) goto fail;
        int known = 0;
        for (size_t i = 0; i < nt && !known; i++) {
            float *dst;
            int ndim;
            size_t shape[2];
            pf_model_tensor(&self->m, i, name, sizeof name, &dst, &ndim, shape);
            known = strcmp(name, k) == 0;
        }
        if (known) continue;
        if (c.tied && strcmp(k, "lm_head.weight") == 0) {
            PyArrayObject *a = pf_as_array(val, NPY_FLOAT32, 2, "weights[lm_head.weight]");
            if (!a) goto fail;
            int same = (size_t)PyArray_DIM(a, 0) == (size_t)c.vocab &&
                       (size_t)PyArray_DIM(a, 1) == (size_t)c.dim &&
                       memcmp(PyArray_DATA(a), self->m.embed,
                              sizeof(float) * (size_t)c.vocab * (size_t)c.dim) == 0;
            Py_DECREF(a);
            if (!same) {
                PyErr_SetString(PyExc_ValueError,
                                "weights[lm_head.weight] differs from model.embed_tokens.weight "
                                "but tie_word_embeddings is true");
                goto fail;
            }
            continue;
        }
        PyErr_Format(PyExc_ValueError, "weights has an unexpected tensor %s", k);
        goto fail;
    }
    self->ready = 1;
    return 0;
fail:
    pf_model_free(&self->m);
    return -1;
}

static void Model_dealloc(PyModel *self) {
    pf_model_free(&self->m);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* ------------------------------------------------------------------------ */
/* packed batch arguments                                                    */
/* ------------------------------------------------------------------------ */

typedef struct {
    PyArrayObject *tok, *seg;
    size_t n_tokens;
    int P;
} batch_args;

static void batch_release(batch_args *b) {
    Py_XDECREF(b->tok);
    Py_XDECREF(b->seg);
    b->tok = b->seg = NULL;
}

static int batch_parse(PyModel *self, PyObject *tokens, PyObject *segments, batch_args *b) {
    b->tok = b->seg = NULL;
    b->tok = pf_as_array(tokens, NPY_INT32, 1, "tokens");
    if (!b->tok) return -1;
    b->seg = pf_as_array(segments, NPY_INT32, 2, "segments");
    if (!b->seg) goto fail;
    if (PyArray_DIM(b->seg, 1) != 3 || PyArray_DIM(b->seg, 0) < 1 ||
        PyArray_DIM(b->seg, 0) > (1 << 24)) {
        PyErr_Format(PyExc_ValueError,
                     "segments must have shape (P, 3) with 1 <= P, got (%zd, %zd)",
                     (Py_ssize_t)PyArray_DIM(b->seg, 0), (Py_ssize_t)PyArray_DIM(b->seg, 1));
        goto fail;
    }
    b->n_tokens = (size_t)PyArray_DIM(b->tok, 0);
    b->P = (int)PyArray_DIM(b->seg, 0);
    pf_status st = {0};
    if (pf_batch_check(&self->m, PyArray_DATA(b->tok), b->n_tokens, PyArray_DATA(b->seg), b->P,
                       &st)) {
        pf_status_to_exc(&st);
        goto fail;
    }
    return 0;
fail:
    batch_release(b);
    return -1;
}

static PyObject *new_array(int nd, npy_intp d0, npy_intp d1, int type) {
    npy_intp dims[2] = {d0, d1};
    return PyArray_ZEROS(nd, dims, type, 0);
}

/* ------------------------------------------------------------------------ */
/* score / train_step                                                        */
/* ------------------------------------------------------------------------ */

static PyObject *Model_score(PyModel *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"tokens", "segments", "use_lora", "per_token", NULL};
    PyObject *tokens, *segments;
    int use_lora = 1, per_token = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|pp", kwlist, &tokens, &segments, &use_lora,
                                     &per_token))
        return NULL;
    if (model_enter(self)) return NULL;
    batch_args b;
    if (batch_parse(self, tokens, segments, &b)) return NULL;
    size_t nc = pf_batch_n_completion(PyArray_DATA(b.seg), b.P);
    PyObject *logp = new_array(2, b.P, 2, NPY_FLOAT64), *n = new_array(2, b.P, 2, NPY_INT32);
    PyObject *pt = per_token ? new_array(1, (npy_intp)nc, 0, NPY_FLOAT32) : NULL;
    if (!logp || !n || (per_token && !pt)) goto fail;
    pf_status st = {0};
    int rc;
    if (model_claim(self)) goto fail;
    Py_BEGIN_ALLOW_THREADS
    rc = pf_model_score(&self->m, PyArray_DATA(b.tok), b.n_tokens, PyArray_DATA(b.seg), b.P,
                        use_lora, PyArray_DATA((PyArrayObject *)logp),
                        PyArray_DATA((PyArrayObject *)n),
                        pt ? PyArray_DATA((PyArrayObject *)pt) : NULL, &st);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (rc) {
        pf_status_to_exc(&st);
        goto fail;
    }
    batch_release(&b);
    PyObject *d = pt ? Py_BuildValue("{s:N,s:N,s:N}", "logp", logp, "n", n, "per_token", pt)
                     : Py_BuildValue("{s:N,s:N}", "logp", logp, "n", n);
    return d;
fail:
    batch_release(&b);
    Py_XDECREF(logp);
    Py_XDECREF(n);
    Py_XDECREF(pt);
    return NULL;
}

/* test helper: full logits at the completion-predicting positions */
static PyObject *Model_completion_logits(PyModel *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"tokens", "segments", "use_lora", NULL};
    PyObject *tokens, *segments;
    int use_lora = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|p", kwlist, &tokens, &segments, &use_lora))
        return NULL;
    if (model_enter(self)) return NULL;
    batch_args b;
    if (batch_parse(self, tokens, segments, &b)) return NULL;
    size_t nc = pf_batch_n_completion(PyArray_DATA(b.seg), b.P);
    if (nc * (size_t)self->m.c.vocab > ((size_t)1 << 28)) {
        batch_release(&b);
        PyErr_SetString(PyExc_ValueError, "_completion_logits is a test helper: batch too large");
        return NULL;
    }
    PyObject *lg = new_array(2, (npy_intp)nc, self->m.c.vocab, NPY_FLOAT32);
    if (!lg) {
        batch_release(&b);
        return NULL;
    }
    pf_status st = {0};
    int rc;
    if (model_claim(self)) {
        batch_release(&b);
        Py_DECREF(lg);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = pf_model_completion_logits(&self->m, PyArray_DATA(b.tok), b.n_tokens, PyArray_DATA(b.seg),
                                    b.P, use_lora, PyArray_DATA((PyArrayObject *)lg), &st);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    batch_release(&b);
    if (rc) {
        Py_DECREF(lg);
        return pf_status_to_exc(&st);
    }
    return lg;
}

static PyObject *Model_train_step(PyModel *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"tokens", "segments", "ref", "objective", "weight", "dropout_seed",
                             NULL};
    PyObject *tokens, *segments, *refo, *objd;
    double weight = 1.0;
    unsigned long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO!|dK", kwlist, &tokens, &segments, &refo,
                                     &PyDict_Type, &objd, &weight, &seed))
        return NULL;
    if (model_enter(self) || need_lora(self, "train_step")) return NULL;
    if (!isfinite(weight)) {
        PyErr_SetString(PyExc_ValueError, "weight must be a finite number");
        return NULL;
    }
    /* "nll_include_prompt" (ORPO, TRL's NLL over prompt + chosen) is the model's
     * business (it scores prompt tokens); the rest goes to pf_objective_from_py */
    int with_prompt = 0;
    PyObject *flag = PyDict_GetItemString(objd, "nll_include_prompt"); /* borrowed */
    pf_objective obj;
    if (flag) {
        if ((with_prompt = PyObject_IsTrue(flag)) < 0) return NULL;
        PyObject *rest = PyDict_Copy(objd);
        if (!rest) return NULL;
        int bad = PyDict_DelItemString(rest, "nll_include_prompt") < 0 ||
                  pf_objective_from_py(rest, &obj) < 0;
        Py_DECREF(rest);
        if (bad) return NULL;
        if (with_prompt && obj.kind != PF_OBJ_ORPO) {
            PyErr_SetString(PyExc_ValueError, "objective: nll_include_prompt is an ORPO option");
            return NULL;
        }
    } else if (pf_objective_from_py(objd, &obj)) {
        return NULL;
    }
    batch_args b;
    if (batch_parse(self, tokens, segments, &b)) return NULL;
    PyArrayObject *ref = pf_as_array(refo, NPY_FLOAT64, 2, "ref");
    PyObject *o[7] = {0};
    if (!ref) goto fail;
    if (PyArray_DIM(ref, 0) != b.P || PyArray_DIM(ref, 1) != 2) {
        PyErr_Format(PyExc_ValueError, "ref must have shape (%d, 2), got (%zd, %zd)", b.P,
                     (Py_ssize_t)PyArray_DIM(ref, 0), (Py_ssize_t)PyArray_DIM(ref, 1));
        goto fail;
    }
    o[0] = new_array(2, b.P, 2, NPY_FLOAT64); /* logp */
    o[1] = new_array(2, b.P, 2, NPY_INT32);   /* n */
    o[2] = new_array(1, b.P, 0, NPY_FLOAT64); /* loss */
    o[3] = new_array(2, b.P, 2, NPY_FLOAT64); /* reward */
    o[4] = new_array(1, b.P, 0, NPY_FLOAT64); /* nll */
    o[5] = new_array(1, b.P, 0, NPY_FLOAT64); /* log_odds */
    o[6] = new_array(1, b.P, 0, NPY_FLOAT64); /* log_sig_odds */
    for (int i = 0; i < 7; i++)
        if (!o[i]) goto fail;
#define D_(i) PyArray_DATA((PyArrayObject *)o[i])
    pf_train_out out = {D_(0), D_(1), D_(2), D_(3), D_(4), D_(5), D_(6)};
#undef D_
    pf_status st = {0};
    int rc;
    if (model_claim(self)) goto fail;
    Py_BEGIN_ALLOW_THREADS
    rc = pf_model_train_step(&self->m, PyArray_DATA(b.tok), b.n_tokens, PyArray_DATA(b.seg), b.P,
                             PyArray_DATA(ref), &obj, weight, (uint64_t)seed, with_prompt, &out,
                             &st);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (rc) {
        pf_status_to_exc(&st);
        goto fail;
    }
    batch_release(&b);
    Py_DECREF(ref);
    return Py_BuildValue("{s:N,s:N,s:N,s:N,s:N,s:N,s:N}", "logp", o[0], "n", o[1], "loss", o[2],
                         "reward", o[3], "nll", o[4], "log_odds", o[5], "log_sig_odds", o[6]);
fail:
    batch_release(&b);
    Py_XDECREF(ref);
    for (int i = 0; i < 7; i++) Py_XDECREF(o[i]);
    return NULL;
}

static PyObject *Model_logp_backward(PyModel *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"tokens", "segments", "coef", "dropout_seed", NULL};
    PyObject *tokens, *segments, *coefo;
    unsigned long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|K", kwlist, &tokens, &segments, &coefo,
                                     &seed))
        return NULL;
    if (model_enter(self) || need_lora(self, "logp_backward")) return NULL;
    batch_args b;
    if (batch_parse(self, tokens, segments, &b)) return NULL;
    PyObject *logp = NULL, *n = NULL;
    PyArrayObject *coef = pf_as_array(coefo, NPY_FLOAT64, 2, "coef");
    if (!coef) goto fail;
    if (PyArray_DIM(coef, 0) != b.P || PyArray_DIM(coef, 1) != 2) {
        PyErr_Format(PyExc_ValueError, "coef must have shape (%d, 2)", b.P);
        goto fail;
    }
    logp = new_array(2, b.P, 2, NPY_FLOAT64);
    n = new_array(2, b.P, 2, NPY_INT32);
    if (!logp || !n) goto fail;
    pf_status st = {0};
    int rc;
    if (model_claim(self)) goto fail;
    Py_BEGIN_ALLOW_THREADS
    rc = pf_model_logp_backward(&self->m, PyArray_DATA(b.tok), b.n_tokens, PyArray_DATA(b.seg), b.P,
                                PyArray_DATA(coef), (uint64_t)seed,
                                PyArray_DATA((PyArrayObject *)logp),
                                PyArray_DATA((PyArrayObject *)n), &st);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (rc) {
        pf_status_to_exc(&st);
        goto fail;
    }
    batch_release(&b);
    Py_DECREF(coef);
    return Py_BuildValue("{s:N,s:N}", "logp", logp, "n", n);
fail:
    batch_release(&b);
    Py_XDECREF(coef);
    Py_XDECREF(logp);
    Py_XDECREF(n);
    return NULL;
}

static PyObject *Model_activation_bytes(PyModel *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"segments", "train", NULL};
    PyObject *segments;
    int train = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|p", kwlist, &segments, &train)) return NULL;
    if (model_enter(self)) return NULL;
    PyArrayObject *seg = pf_as_array(segments, NPY_INT32, 2, "segments");
    if (!seg) return NULL;
    if (PyArray_DIM(seg, 1) != 3 || PyArray_DIM(seg, 0) < 1) {
        Py_DECREF(seg);
        PyErr_SetString(PyExc_ValueError, "segments must have shape (P, 3), P >= 1");
        return NULL;
    }
    const int32_t *s = PyArray_DATA(seg);
    int P = (int)PyArray_DIM(seg, 0);
    size_t T = 0;
    for (int p = 0; p < 3 * P; p++) {
        if (s[p] < 0) {
            Py_DECREF(seg);
            PyErr_SetString(PyExc_ValueError, "segments: negative length");
            return NULL;
        }
        T += (size_t)s[p];
    }
    size_t f = pf_model_work_floats(&self->m, s, P, T, train);
    Py_DECREF(seg);
    return PyLong_FromSize_t(f * sizeof(float));
}

/* ------------------------------------------------------------------------ */
/* LoRA                                                                      */
/* ------------------------------------------------------------------------ */

static int target_id(const char *s) {
    for (int t = 0; t < PF_LORA_NT; t++) {
        const char *full = pf_lora_target_names[t];
        size_t n = strlen(s);
        if (strcmp(s, full) == 0) return t;
        /* short form "q" for "q_proj", "gate" for "gate_proj" */
        if (n > 0 && strncmp(s, full, n) == 0 && strcmp(full + n, "_proj") == 0) return t;
    }
    return -1;
}

static PyObject *Model_lora_init(PyModel *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"rank", "alpha", "targets", "use_rslora", "dropout", "seed", NULL};
    int rank, rslora = 0;
    double alpha, dropout = 0.0;
    PyObject *targets;
    unsigned long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "idO|pdK", kwlist, &rank, &alpha, &targets,
                                     &rslora, &dropout, &seed))
        return NULL;
    if (model_enter(self)) return NULL;
    unsigned mask = 0;
    if (PyUnicode_Check(targets)) {
        const char *s = PyUnicode_AsUTF8(targets);
        if (!s) return NULL;
        if (strcmp(s, "all-linear") == 0 || strcmp(s, "all") == 0) {
            mask = (1u << PF_LORA_NT) - 1;
        } else {
            int t = target_id(s);
            if (t < 0) {
                PyErr_Format(PyExc_ValueError, "unknown LoRA target %s", s);
                return NULL;
            }
            mask = 1u << t;
        }
    } else {
        PyObject *seq = PySequence_Fast(targets, "targets must be 'all-linear' or a list of names");
        if (!seq) return NULL;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *it = PySequence_Fast_GET_ITEM(seq, i);
            const char *s = PyUnicode_Check(it) ? PyUnicode_AsUTF8(it) : NULL;
            int t = s ? target_id(s) : -1;
            if (t < 0) {
                if (!PyErr_Occurred())
                    PyErr_Format(PyExc_ValueError,
                                 "unknown LoRA target %R (use q_proj, k_proj, v_proj, o_proj, "
                                 "gate_proj, up_proj, down_proj or 'all-linear')",
                                 it);
                Py_DECREF(seq);
                return NULL;
            }
            mask |= 1u << t;
        }
        Py_DECREF(seq);
        if (!mask) {
            PyErr_SetString(PyExc_ValueError, "targets is empty");
            return NULL;
        }
    }
    int in[PF_LORA_NT], out[PF_LORA_NT];
    pf_model_lora_dims(&self->m, in, out);
    for (int t = 0; t < PF_LORA_NT; t++) {
        /* a rank above min(out, in) adds parameters but no expressiveness; refusing it
         * also turns an absurd rank into an error instead of a huge allocation */
        if (((mask >> t) & 1u) && (rank > in[t] || rank > out[t])) {
            PyErr_Format(PyExc_ValueError,
                         "LoRA rank %d exceeds the smaller side of target %s [%d, %d]", rank,
                         pf_lora_target_names[t], out[t], in[t]);
            return NULL;
        }
    }
    pf_lora l;
    pf_status st = {0};
    if (pf_lora_create(&l, self->m.c.n_layers, in, out, rank, (float)alpha, rslora,
                       (float)dropout, mask, &st))
        return pf_status_to_exc(&st);
    pf_lora_init_weights(&l, (uint64_t)seed);
    pf_lora_free(&self->m.lora);
    self->m.lora = l;
    self->m.adam_step = 0;
    Py_RETURN_NONE;
}

static PyObject *Model_lora_remove(PyModel *self, PyObject *noargs) {
    if (model_enter(self)) return NULL;
    pf_lora_free(&self->m.lora);
    self->m.adam_step = 0;
    Py_RETURN_NONE;
}

static PyObject *Model_lora_info(PyModel *self, PyObject *noargs) {
    if (model_enter(self)) return NULL;
    const pf_lora *l = &self->m.lora;
    if (l->rank <= 0) Py_RETURN_NONE;
    PyObject *tl = PyList_New(0);
    if (!tl) return NULL;
    for (int t = 0; t < PF_LORA_NT; t++) {
        if (!pf_lora_has(l, t)) continue;
        PyObject *s = PyUnicode_FromString(pf_lora_target_names[t]);
        if (!s || PyList_Append(tl, s) < 0) {
            Py_XDECREF(s);
            Py_DECREF(tl);
            return NULL;
        }
        Py_DECREF(s);
    }
    return Py_BuildValue("{s:i,s:d,s:d,s:N,s:O,s:d,s:n}", "rank", l->rank, "alpha",
                         (double)l->alpha, "scale", (double)l->scale, "targets", tl, "use_rslora",
                         l->rslora ? Py_True : Py_False, "dropout", (double)l->dropout,
                         "n_params", (Py_ssize_t)l->n_params);
}

static float *arena_by_name(pf_lora *l, const char *arena) {
    if (strcmp(arena, "params") == 0) return l->params;
    if (strcmp(arena, "grads") == 0) return l->grads;
    if (strcmp(arena, "adam_m") == 0) return l->adam_m;
    if (strcmp(arena, "adam_v") == 0) return l->adam_v;
    PyErr_Format(PyExc_ValueError, "arena must be params, grads, adam_m or adam_v, got %s", arena);
    return NULL;
}

static void lora_name(char *buf, size_t cap, int layer, int t, int is_b) {
    snprintf(buf, cap, "model.layers.%d.%s.lora_%s.weight", layer, target_paths[t],
             is_b ? "B" : "A");
}

static PyObject *Model_lora_state(PyModel *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"arena", NULL};
    const char *arena = "params";
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|s", kwlist, &arena)) return NULL;
    if (model_enter(self) || need_lora(self, "lora_state")) return NULL;
    pf_lora *l = &self->m.lora;
    float *base = arena_by_name(l, arena);
    if (!base) return NULL;
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    char name[160];
    for (int layer = 0; layer < l->n_layers; layer++) {
        for (int t = 0; t < PF_LORA_NT; t++) {
            if (!pf_lora_has(l, t)) continue;
            for (int is_b = 0; is_b < 2; is_b++) {
                npy_intp d0 = is_b ? l->out_dim[t] : l->rank, d1 = is_b ? l->rank : l->in_dim[t];
                PyObject *a = new_array(2, d0, d1, NPY_FLOAT32);
                if (!a) goto fail;
                const float *src =
                    is_b ? pf_lora_b(l, base, layer, t) : pf_lora_a(l, base, layer, t);
                memcpy(PyArray_DATA((PyArrayObject *)a), src, sizeof(float) * (size_t)(d0 * d1));
                lora_name(name, sizeof name, layer, t, is_b);
                int rc = PyDict_SetItemString(d, name, a);
                Py_DECREF(a);
                if (rc < 0) goto fail;
            }
        }
    }
    return d;
fail:
    Py_DECREF(d);
    return NULL;
}

static PyObject *lora_load_state_impl(PyModel *self, PyObject *state, const char *arena);

static PyObject *Model_lora_load_state(PyModel *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"state", "arena", NULL};
    PyObject *state;
    const char *arena = "params";
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!|s", kwlist, &PyDict_Type, &state, &arena))
        return NULL;
    if (model_enter(self) || need_lora(self, "lora_load_state")) return NULL;
    /* busy for the whole call: array conversions may run Python code (and let
     * another thread in) between validation and the copy */
    if (model_claim(self)) return NULL;
    PyObject *r = lora_load_state_impl(self, state, arena);
    self->busy = 0;
    return r;
}

static PyObject *lora_load_state_impl(PyModel *self, PyObject *state, const char *arena) {
    pf_lora *l = &self->m.lora;
    float *base = arena_by_name(l, arena);
    if (!base) return NULL;
    char name[160];
    Py_ssize_t expected = 0;
    /* first pass validates everything, second copies: a bad state changes nothing */
    for (int pass = 0; pass < 2; pass++) {
        for (int layer = 0; layer < l->n_layers; layer++) {
            for (int t = 0; t < PF_LORA_NT; t++) {
                if (!pf_lora_has(l, t)) continue;
                for (int is_b = 0; is_b < 2; is_b++) {
                    npy_intp d0 = is_b ? l->out_dim[t] : l->rank;
                    npy_intp d1 = is_b ? l->rank : l->in_dim[t];
                    lora_name(name, sizeof name, layer, t, is_b);
                    PyObject *obj = PyDict_GetItemString(state, name);
                    if (!obj) {
                        PyErr_Format(PyExc_ValueError, "state is missing %s", name);
                        return NULL;
                    }
                    char what[200];
                    snprintf(what, sizeof what, "state[%s]", name);
                    PyArrayObject *a = pf_as_array(obj, NPY_FLOAT32, 2, what);
                    if (!a) return NULL;
                    if (PyArray_DIM(a, 0) != d0 || PyArray_DIM(a, 1) != d1) {
                        PyErr_Format(PyExc_ValueError,
                                     "%s has shape (%zd, %zd), expected (%zd, %zd)",
                                     what, (Py_ssize_t)PyArray_DIM(a, 0),
                                     (Py_ssize_t)PyArray_DIM(a, 1), (Py_ssize_t)d0, (Py_ssize_t)d1);
                        Py_DECREF(a);
                        return NULL;
                    }
                    /* parameters must be finite (grads may be loaded non-finite on purpose,
                     * e.g. to test the optimizer's guard) */
                    if (pass == 0 && base == l->params) {
                        const float *src = (const float *)PyArray_DATA(a);
                        for (npy_intp i = 0; i < d0 * d1; i++) {
                            if (!isfinite(src[i])) {
                                PyErr_Format(PyExc_ValueError,
                                             "%s has a non-finite value at flat index %zd", what,
                                             (Py_ssize_t)i);
                                Py_DECREF(a);
                                return NULL;
                            }
                        }
                    }
                    if (pass == 1) {
                        float *dst =
                            is_b ? pf_lora_b(l, base, layer, t) : pf_lora_a(l, base, layer, t);
                        memcpy(dst, PyArray_DATA(a), sizeof(float) * (size_t)(d0 * d1));
                    } else {
                        expected++;
                    }
                    Py_DECREF(a);
                }
            }
        }
        if (pass == 0 && PyDict_Size(state) != expected) {
            PyErr_Format(PyExc_ValueError,
                         "state has %zd tensors but the adapter has %zd (extra names present)",
                         PyDict_Size(state), expected);
            return NULL;
        }
    }
    Py_RETURN_NONE;
}

static PyObject *Model_lora_merge(PyModel *self, PyObject *noargs) {
    if (model_enter(self) || need_lora(self, "lora_merge")) return NULL;
    pf_model *m = &self->m;
    for (int layer = 0; layer < m->c.n_layers; layer++) {
        pf_layer_weights *w = &m->layers[layer];
        float *W[PF_LORA_NT] = {w->wq, w->wk, w->wv, w->wo, w->wg, w->wu, w->wd};
        for (int t = 0; t < PF_LORA_NT; t++)
            if (pf_lora_has(&m->lora, t)) pf_lora_merge(&m->lora, layer, t, W[t]);
    }
    pf_lora_free(&m->lora);
    m->adam_step = 0;
    Py_RETURN_NONE;
}

static PyObject *Model_zero_grad(PyModel *self, PyObject *noargs) {
    if (model_enter(self) || need_lora(self, "zero_grad")) return NULL;
    memset(self->m.lora.grads, 0, sizeof(float) * self->m.lora.n_params);
    Py_RETURN_NONE;
}

static PyObject *Model_grad_norm(PyModel *self, PyObject *noargs) {
    if (model_enter(self) || need_lora(self, "grad_norm")) return NULL;
    return PyFloat_FromDouble(sqrt(pf_sumsq(self->m.lora.grads, self->m.lora.n_params)));
}

static PyObject *Model_optimizer_step(PyModel *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"lr", "beta1", "beta2", "eps", "weight_decay", "max_grad_norm", NULL};
    pf_adamw h = {0.0, 0.9, 0.999, 1e-8, 0.0};
    double max_norm = 0.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "d|ddddd", kwlist, &h.lr, &h.beta1, &h.beta2,
                                     &h.eps, &h.weight_decay, &max_norm))
        return NULL;
    if (model_enter(self) || need_lora(self, "optimizer_step")) return NULL;
    pf_lora *l = &self->m.lora;
    pf_status st = {0};
    if (pf_adamw_check(&h, self->m.adam_step + 1, &st)) return pf_status_to_exc(&st);
    if (!isfinite(max_norm)) {
        PyErr_SetString(PyExc_ValueError, "max_grad_norm must be finite");
        return NULL;
    }
    double norm;
    int finite;
    if (model_claim(self)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    norm = sqrt(pf_sumsq(l->grads, l->n_params));
    finite = isfinite(norm);
    if (finite) {
        double scale = max_norm > 0.0 ? fmin(1.0, max_norm / (norm + 1e-6)) : 1.0;
        self->m.adam_step++;
        pf_adamw_update(l->params, l->grads, l->adam_m, l->adam_v, l->n_params, &h,
                        self->m.adam_step, scale);
    }
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (!finite) {
        PyErr_Format(PyExc_FloatingPointError,
                     "gradient norm is %g: optimizer step refused, parameters unchanged", norm);
        return NULL;
    }
    return PyFloat_FromDouble(norm);
}

static PyObject *Model_get_adam_step(PyModel *self, void *closure) {
    return PyLong_FromLong(self->m.adam_step);
}

static int Model_set_adam_step(PyModel *self, PyObject *v, void *closure) {
    if (!v) {
        PyErr_SetString(PyExc_TypeError, "cannot delete adam_step");
        return -1;
    }
    long s = PyLong_AsLong(v);
    if (s == -1 && PyErr_Occurred()) return -1;
    if (s < 0) {
        PyErr_SetString(PyExc_ValueError, "adam_step must be >= 0");
        return -1;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Model is in use by another thread");
        return -1;
    }
    self->m.adam_step = s;
    return 0;
}

static PyObject *Model_get_budget(PyModel *self, void *closure) {
    return PyLong_FromSize_t(self->m.act_budget);
}

static int Model_set_budget(PyModel *self, PyObject *v, void *closure) {
    if (!v) {
        PyErr_SetString(PyExc_TypeError, "cannot delete activation_budget");
        return -1;
    }
    long long b = PyLong_AsLongLong(v);
    if (b == -1 && PyErr_Occurred()) return -1;
    if (b < 0) {
        PyErr_SetString(PyExc_ValueError, "activation_budget must be >= 0 bytes");
        return -1;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Model is in use by another thread");
        return -1;
    }
    self->m.act_budget = (size_t)b;
    return 0;
}

static PyObject *Model_get_config(PyModel *self, void *closure) {
    if (!self->ready) Py_RETURN_NONE;
    const pf_config *c = &self->m.c;
    return Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:d,s:d,s:O,s:O}", "vocab_size", c->vocab,
                         "hidden_size", c->dim, "intermediate_size", c->ffn, "num_hidden_layers",
                         c->n_layers, "num_attention_heads", c->n_heads, "num_key_value_heads",
                         c->n_kv_heads, "head_dim", c->head_dim, "rms_norm_eps", (double)c->eps,
                         "rope_theta", (double)c->theta, "tie_word_embeddings",
                         c->tied ? Py_True : Py_False, "attention_bias",
                         c->attn_bias ? Py_True : Py_False);
}

/* ------------------------------------------------------------------------ */
/* generate                                                                  */
/* ------------------------------------------------------------------------ */

static PyObject *Model_generate(PyModel *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"prompt_ids", "max_new_tokens", "stop_ids", "use_lora", NULL};
    PyObject *prompt, *stopo = NULL;
    int max_new, use_lora = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Oi|Op", kwlist, &prompt, &max_new, &stopo,
                                     &use_lora))
        return NULL;
    if (model_enter(self)) return NULL;
    if (max_new < 0 || max_new > (1 << 24)) {
        PyErr_Format(PyExc_ValueError, "max_new_tokens must be in [0, 2^24], got %d", max_new);
        return NULL;
    }
    PyArrayObject *pa = pf_as_array(prompt, NPY_INT32, 1, "prompt_ids");
    if (!pa) return NULL;
    int32_t stop[256];
    int n_stop = 0;
    if (stopo && stopo != Py_None) {
        PyObject *seq = PySequence_Fast(stopo, "stop_ids must be a sequence of ints");
        if (!seq) goto fail;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
        if (n > 256) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "at most 256 stop_ids");
            goto fail;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
            if (v == -1 && PyErr_Occurred()) {
                Py_DECREF(seq);
                goto fail;
            }
            stop[n_stop++] = (int32_t)v;
        }
        Py_DECREF(seq);
    }
    PyObject *res = new_array(1, max_new, 0, NPY_INT32);
    if (!res) goto fail;
    pf_status st = {0};
    int rc, n_out = 0;
    if (model_claim(self)) {
        Py_DECREF(res);
        goto fail;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = pf_model_generate(&self->m, PyArray_DATA(pa), (size_t)PyArray_DIM(pa, 0), max_new, stop,
                           n_stop, use_lora, PyArray_DATA((PyArrayObject *)res), &n_out, &st);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    Py_DECREF(pa);
    if (rc) {
        Py_DECREF(res);
        return pf_status_to_exc(&st);
    }
    PyObject *cut = PySequence_GetSlice(res, 0, n_out);
    Py_DECREF(res);
    if (!cut) return NULL;
    PyObject *copy = PyArray_NewCopy((PyArrayObject *)cut, NPY_CORDER);
    Py_DECREF(cut);
    return copy;
fail:
    Py_DECREF(pa);
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* type                                                                      */
/* ------------------------------------------------------------------------ */

static PyMethodDef Model_methods[] = {
    {"score", (PyCFunction)(void (*)(void))Model_score, METH_VARARGS | METH_KEYWORDS,
     "score(tokens, segments, use_lora=True, per_token=False) -> {logp [P,2] float64, n [P,2] "
     "int32, per_token float32}: completion log-prob sums of a packed prefix-shared batch."},
    {"train_step", (PyCFunction)(void (*)(void))Model_train_step, METH_VARARGS | METH_KEYWORDS,
     "train_step(tokens, segments, ref, objective, weight=1.0, dropout_seed=0) -> per-pair "
     "numbers; accumulates weight * d(sum of pair losses)/d(LoRA params) into the grads. "
     "objective may carry nll_include_prompt=True (ORPO: NLL over prompt + chosen tokens, as "
     "TRL)."},
    {"_completion_logits", (PyCFunction)(void (*)(void))Model_completion_logits,
     METH_VARARGS | METH_KEYWORDS,
     "_completion_logits(tokens, segments, use_lora=True) -> float32 [n_completion, V] (test "
     "helper: the logits at the positions that predict completion tokens)."},
    {"logp_backward", (PyCFunction)(void (*)(void))Model_logp_backward,
     METH_VARARGS | METH_KEYWORDS,
     "logp_backward(tokens, segments, coef [P,2] float64, dropout_seed=0) -> {logp, n}; "
     "accumulates d(sum coef * completion logp sums)/d(LoRA params) into the grads (any "
     "packed layout, empty completions allowed)."},
    {"activation_bytes", (PyCFunction)(void (*)(void))Model_activation_bytes,
     METH_VARARGS | METH_KEYWORDS,
     "activation_bytes(segments, train=True) -> bytes of the work arena a call allocates."},
    {"lora_init", (PyCFunction)(void (*)(void))Model_lora_init, METH_VARARGS | METH_KEYWORDS,
     "lora_init(rank, alpha, targets, use_rslora=False, dropout=0.0, seed=0): new adapter "
     "(A kaiming-uniform, B = 0); resets grads, Adam moments and adam_step."},
    {"lora_remove", (PyCFunction)Model_lora_remove, METH_NOARGS, "Drop the adapter."},
    {"lora_info", (PyCFunction)Model_lora_info, METH_NOARGS, "Adapter settings, or None."},
    {"lora_state", (PyCFunction)(void (*)(void))Model_lora_state, METH_VARARGS | METH_KEYWORDS,
     "lora_state(arena='params'|'grads'|'adam_m'|'adam_v') -> {name: float32 copy}."},
    {"lora_load_state", (PyCFunction)(void (*)(void))Model_lora_load_state,
     METH_VARARGS | METH_KEYWORDS,
     "lora_load_state(state, arena='params'): every name required, shapes checked."},
    {"lora_merge", (PyCFunction)Model_lora_merge, METH_NOARGS,
     "Base W += scale B A for every adapted linear, then drop the adapter."},
    {"zero_grad", (PyCFunction)Model_zero_grad, METH_NOARGS, "Zero the LoRA gradients."},
    {"grad_norm", (PyCFunction)Model_grad_norm, METH_NOARGS, "Global L2 norm of the LoRA grads."},
    {"optimizer_step", (PyCFunction)(void (*)(void))Model_optimizer_step,
     METH_VARARGS | METH_KEYWORDS,
     "optimizer_step(lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, max_grad_norm=0.0)"
     " -> grad norm before clipping. One AdamW update; increments adam_step. Grads are kept."},
    {"generate", (PyCFunction)(void (*)(void))Model_generate, METH_VARARGS | METH_KEYWORDS,
     "generate(prompt_ids, max_new_tokens, stop_ids=(), use_lora=True) -> int32 new ids "
     "(greedy, KV cache; a stop id is included as the last id)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Model_getset[] = {
    {"adam_step", (getter)Model_get_adam_step, (setter)Model_set_adam_step,
     "AdamW updates made so far (bias-correction step counter).", NULL},
    {"config", (getter)Model_get_config, NULL, "The model config as a dict.", NULL},
    {"activation_budget", (getter)Model_get_budget, (setter)Model_set_budget,
     "Bytes of work arena train_step may use to keep layer activations for backward instead "
     "of recomputing them (default 512 MiB; 0 = recompute all but the top layer).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ModelType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "prefopt._core.Model",
    .tp_basicsize = sizeof(PyModel),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Model(config, weights): a LLaMA-family decoder in float32 with an optional LoRA "
              "adapter (see csrc/README.md).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Model_init,
    .tp_dealloc = (destructor)Model_dealloc,
    .tp_methods = Model_methods,
    .tp_getset = Model_getset,
};

/* ------------------------------------------------------------------------ */
/* _kernel_test: test-only access to kernels.c forward + backward            */
/* ------------------------------------------------------------------------ */

#define KT_MAX 6
typedef struct {
    PyArrayObject *in[KT_MAX];
    int n;
} kt_args;

static void kt_release(kt_args *a) {
    for (int i = 0; i < a->n; i++) Py_XDECREF(a->in[i]);
    a->n = 0;
}

/* arrays[i] as a C-contiguous array of types[i] with ndims[i] dims */
static int kt_get(PyObject *arrays, kt_args *a, int n, const int *types, const int *ndims) {
    a->n = 0;
    if (!PyTuple_Check(arrays) || PyTuple_GET_SIZE(arrays) != n) {
        PyErr_Format(PyExc_ValueError, "expected a tuple of %d arrays", n);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        char what[32];
        snprintf(what, sizeof what, "arrays[%d]", i);
        a->in[i] = pf_as_array(PyTuple_GET_ITEM(arrays, i), types[i], ndims[i], what);
        if (!a->in[i]) {
            kt_release(a);
            return -1;
        }
        a->n = i + 1;
    }
    return 0;
}

#define KD(i, j) PyArray_DIM(a.in[i], j)
#define KP(i) PyArray_DATA(a.in[i])
#define OP(o) PyArray_DATA((PyArrayObject *)(o))

static PyObject *kt_bad(kt_args *a, const char *msg) {
    kt_release(a);
    PyErr_SetString(PyExc_ValueError, msg);
    return NULL;
}

static PyObject *py_kernel_test(PyObject *mod, PyObject *args) {
    const char *name;
    PyObject *arrays, *params;
    if (!PyArg_ParseTuple(args, "sO!O!", &name, &PyTuple_Type, &arrays, &PyTuple_Type, &params))
        return NULL;
    double pr[4] = {0};
    Py_ssize_t np_ = PyTuple_GET_SIZE(params);
    for (Py_ssize_t i = 0; i < np_ && i < 4; i++) {
        pr[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(params, i));
        if (pr[i] == -1.0 && PyErr_Occurred()) return NULL;
    }
    kt_args a;
    if (strcmp(name, "rmsnorm") == 0) { /* (x[T,D], g[D], dout[T,D]), (eps,) -> (out, dx) */
        int ty[3] = {NPY_FLOAT32, NPY_FLOAT32, NPY_FLOAT32}, nd[3] = {2, 1, 2};
        if (kt_get(arrays, &a, 3, ty, nd)) return NULL;
        npy_intp T = KD(0, 0), D = KD(0, 1);
        if (KD(1, 0) != D || KD(2, 0) != T || KD(2, 1) != D || D < 1)
            return kt_bad(&a, "rmsnorm: shape mismatch");
        PyObject *out = new_array(2, T, D, NPY_FLOAT32), *dx = new_array(2, T, D, NPY_FLOAT32);
        PyObject *rs = new_array(1, T, 0, NPY_FLOAT32);
        if (!out || !dx || !rs) goto kfail3;
        pf_rmsnorm_forward(OP(out), OP(rs), KP(0), KP(1), (size_t)T, (int)D, (float)pr[0]);
        pf_rmsnorm_backward(OP(dx), KP(2), KP(0), KP(1), OP(rs), (size_t)T, (int)D);
        Py_DECREF(rs);
        kt_release(&a);
        return Py_BuildValue("(NN)", out, dx);
    kfail3:
        Py_XDECREF(out), Py_XDECREF(dx), Py_XDECREF(rs);
        kt_release(&a);
        return NULL;
    }
    if (strcmp(name, "rope") == 0) { /* (x[T,W], pos[T], dout[T,W]), (H, hd, theta) -> (out, dx) */
        int ty[3] = {NPY_FLOAT32, NPY_INT32, NPY_FLOAT32}, nd[3] = {2, 1, 2};
        if (kt_get(arrays, &a, 3, ty, nd)) return NULL;
        npy_intp T = KD(0, 0), W = KD(0, 1);
        int H = (int)pr[0], hd = (int)pr[1];
        if (KD(1, 0) != T || KD(2, 0) != T || KD(2, 1) != W || H < 1 || hd < 2 || hd % 2 ||
            hd > PF_ROPE_MAX_HD || (npy_intp)H * hd != W)
            return kt_bad(&a, "rope: shape mismatch");
        PyObject *out = PyArray_NewCopy(a.in[0], NPY_CORDER);
        PyObject *dx = PyArray_NewCopy(a.in[2], NPY_CORDER);
        if (!out || !dx) {
            Py_XDECREF(out), Py_XDECREF(dx);
            kt_release(&a);
            return NULL;
        }
        pf_rope_forward(OP(out), (int)W, KP(1), (size_t)T, H, hd, (float)pr[2]);
        pf_rope_backward(OP(dx), (int)W, KP(1), (size_t)T, H, hd, (float)pr[2]);
        kt_release(&a);
        return Py_BuildValue("(NN)", out, dx);
    }
    if (strcmp(name, "swiglu") == 0) { /* (gate[n], up[n], dout[n]) -> (out, dgate, dup) */
        int ty[3] = {NPY_FLOAT32, NPY_FLOAT32, NPY_FLOAT32}, nd[3] = {1, 1, 1};
        if (kt_get(arrays, &a, 3, ty, nd)) return NULL;
        npy_intp n = KD(0, 0);
        if (KD(1, 0) != n || KD(2, 0) != n) return kt_bad(&a, "swiglu: shape mismatch");
        PyObject *out = new_array(1, n, 0, NPY_FLOAT32), *dg = new_array(1, n, 0, NPY_FLOAT32);
        PyObject *du = new_array(1, n, 0, NPY_FLOAT32);
        if (!out || !dg || !du) {
            Py_XDECREF(out), Py_XDECREF(dg), Py_XDECREF(du);
            kt_release(&a);
            return NULL;
        }
        pf_swiglu_forward(OP(out), KP(0), KP(1), (size_t)n);
        pf_swiglu_backward(OP(dg), OP(du), KP(2), KP(0), KP(1), (size_t)n);
        kt_release(&a);
        return Py_BuildValue("(NNN)", out, dg, du);
    }
    if (strcmp(name, "attention") == 0) {
        /* (q[T,H*hd], k[T,KVH*hd], v[T,KVH*hd], seg[P,3], dout[T,H*hd]), (H, KVH, hd)
         * -> (out, dq, dk, dv) */
        int ty[5] = {NPY_FLOAT32, NPY_FLOAT32, NPY_FLOAT32, NPY_INT32, NPY_FLOAT32};
        int nd[5] = {2, 2, 2, 2, 2};
        if (kt_get(arrays, &a, 5, ty, nd)) return NULL;
        int H = (int)pr[0], KVH = (int)pr[1], hd = (int)pr[2];
        npy_intp T = KD(0, 0), P = KD(3, 0);
        if (H < 1 || KVH < 1 || H % KVH || hd < 1 || KD(0, 1) != (npy_intp)H * hd ||
            KD(1, 0) != T || KD(2, 0) != T || KD(1, 1) != (npy_intp)KVH * hd ||
            KD(2, 1) != (npy_intp)KVH * hd || KD(3, 1) != 3 || P < 1 || KD(4, 0) != T ||
            KD(4, 1) != KD(0, 1))
            return kt_bad(&a, "attention: shape mismatch");
        const int32_t *seg = KP(3);
        npy_intp tot = 0;
        for (npy_intp p = 0; p < P; p++) {
            if (seg[3 * p] < 1 || seg[3 * p + 1] < 0 || seg[3 * p + 2] < 0)
                return kt_bad(&a, "attention: bad segment lengths");
            tot += seg[3 * p] + seg[3 * p + 1] + seg[3 * p + 2];
        }
        if (tot != T) return kt_bad(&a, "attention: segments do not sum to T");
        size_t sc = pf_attn_scratch(seg, (int)P);
        PyObject *out = new_array(2, T, KD(0, 1), NPY_FLOAT32);
        PyObject *dq = new_array(2, T, KD(0, 1), NPY_FLOAT32);
        PyObject *dk = new_array(2, T, KD(1, 1), NPY_FLOAT32);
        PyObject *dv = new_array(2, T, KD(1, 1), NPY_FLOAT32);
        PyObject *lse = new_array(2, T, H, NPY_FLOAT32);
        PyObject *S = new_array(1, (npy_intp)sc, 0, NPY_FLOAT32);
        PyObject *dP = new_array(1, (npy_intp)sc, 0, NPY_FLOAT32);
        if (!out || !dq || !dk || !dv || !lse || !S || !dP) {
            Py_XDECREF(out), Py_XDECREF(dq), Py_XDECREF(dk), Py_XDECREF(dv);
            Py_XDECREF(lse), Py_XDECREF(S), Py_XDECREF(dP);
            kt_release(&a);
            return NULL;
        }
        pf_attention_forward(OP(out), OP(lse), KP(0), KP(1), KP(2), seg, (int)P, H, KVH, hd, OP(S));
        pf_attention_backward(OP(dq), OP(dk), OP(dv), KP(4), OP(out), OP(lse), KP(0), KP(1), KP(2),
                              seg, (int)P, H, KVH, hd, OP(S), OP(dP));
        Py_DECREF(lse), Py_DECREF(S), Py_DECREF(dP);
        kt_release(&a);
        return Py_BuildValue("(NNNN)", out, dq, dk, dv);
    }
    if (strcmp(name, "head") == 0) {
        /* (x[T,D], W[V,D], rows[n], targets[n], dlogp[n]), (chunk,) -> (logp f64, dx) */
        int ty[5] = {NPY_FLOAT32, NPY_FLOAT32, NPY_INT32, NPY_INT32, NPY_FLOAT32};
        int nd[5] = {2, 2, 1, 1, 1};
        if (kt_get(arrays, &a, 5, ty, nd)) return NULL;
        npy_intp T = KD(0, 0), D = KD(0, 1), V = KD(1, 0), n = KD(2, 0);
        int chunk = (int)pr[0];
        if (KD(1, 1) != D || KD(3, 0) != n || KD(4, 0) != n || chunk < 1 || V < 1 || D < 1)
            return kt_bad(&a, "head: shape mismatch");
        const int32_t *rows = KP(2), *tg = KP(3);
        for (npy_intp i = 0; i < n; i++)
            if (rows[i] < 0 || rows[i] >= T || tg[i] < 0 || tg[i] >= V)
                return kt_bad(&a, "head: row or target out of range");
        PyObject *lp = new_array(1, n, 0, NPY_FLOAT64), *dx = new_array(2, T, D, NPY_FLOAT32);
        PyObject *buf = new_array(1, (npy_intp)pf_head_scratch(chunk, (int)D, (int)V), 0,
                                  NPY_FLOAT32);
        if (!lp || !dx || !buf) {
            Py_XDECREF(lp), Py_XDECREF(dx), Py_XDECREF(buf);
            kt_release(&a);
            return NULL;
        }
        pf_head_logp_forward(OP(lp), KP(0), (int)D, rows, tg, (size_t)n, KP(1), (int)V, OP(buf),
                             chunk);
        pf_head_logp_backward(OP(dx), KP(4), KP(0), (int)D, rows, tg, (size_t)n, KP(1), (int)V,
                              OP(buf), chunk);
        Py_DECREF(buf);
        kt_release(&a);
        return Py_BuildValue("(NN)", lp, dx);
    }
    PyErr_Format(PyExc_ValueError, "unknown kernel %s", name);
    return NULL;
}

static PyMethodDef model_module_methods[] = {
    {"_kernel_test", py_kernel_test, METH_VARARGS,
     "_kernel_test(name, arrays, params): test-only forward+backward of one kernel "
     "(rmsnorm, rope, swiglu, attention, head)."},
    {NULL, NULL, 0, NULL},
};

int pf_model_register(PyObject *module) {
    if (PyType_Ready(&ModelType) < 0) return -1;
    Py_INCREF(&ModelType);
    if (PyModule_AddObject(module, "Model", (PyObject *)&ModelType) < 0) {
        Py_DECREF(&ModelType);
        return -1;
    }
    return PyModule_AddFunctions(module, model_module_methods);
}
