/* model.c: config, base-weight arena, decoder forward/backward over a packed
 * prefix-shared batch, scoring, one training micro-step, greedy generation.
 * See model.h for the batch layout and the activation-memory formula. */
#include "model.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "kernels.h"

#define HEAD_CHUNK 64

/* ------------------------------------------------------------------------ */
/* config and weights                                                        */
/* ------------------------------------------------------------------------ */

static size_t qdim(const pf_config *c) { return (size_t)c->n_heads * c->head_dim; }
static size_t kdim(const pf_config *c) { return (size_t)c->n_kv_heads * c->head_dim; }

static size_t layer_floats(const pf_config *c) {
    size_t D = c->dim, F = c->ffn, Q = qdim(c), K = kdim(c);
    return 2 * D + Q * D + 2 * K * D + D * Q + (c->attn_bias ? Q + 2 * K : 0) + 3 * F * D;
}

int pf_model_create(pf_model *m, const pf_config *c, pf_status *st) {
    memset(m, 0, sizeof *m);
    if (c->vocab < 1 || c->dim < 1 || c->ffn < 1 || c->n_layers < 1 || c->n_heads < 1 ||
        c->n_kv_heads < 1 || c->head_dim < 1)
        return pf_fail(st, PF_EINVAL,
                       "config: vocab_size, hidden_size, intermediate_size, num_hidden_layers, "
                       "num_attention_heads, num_key_value_heads and head_dim must all be >= 1");
    if (c->n_heads % c->n_kv_heads != 0)
        return pf_fail(st, PF_EINVAL,
                       "config: num_attention_heads (%d) must be a multiple of "
                       "num_key_value_heads (%d)",
                       c->n_heads, c->n_kv_heads);
    if (c->head_dim % 2 != 0 || c->head_dim > PF_ROPE_MAX_HD)
        return pf_fail(st, PF_EUNSUPPORTED, "config: head_dim %d must be even and <= %d",
                       c->head_dim, PF_ROPE_MAX_HD);
    if (!(c->eps > 0.0f) || !isfinite(c->eps))
        return pf_fail(st, PF_EINVAL, "config: rms_norm_eps must be a positive number");
    if (!(c->theta > 0.0f) || !isfinite(c->theta))
        return pf_fail(st, PF_EINVAL, "config: rope_theta must be a positive number");
    /* every width and every V*D / F*D product must fit the BLAS int and size_t */
    if ((size_t)c->vocab * c->dim > (size_t)INT_MAX * 64 || qdim(c) > INT_MAX / 2 ||
        (size_t)c->ffn * c->dim > (size_t)INT_MAX * 64)
        return pf_fail(st, PF_EUNSUPPORTED, "config: model dimensions too large");
    m->c = *c;
    m->act_budget = PF_DEFAULT_ACT_BUDGET;
    size_t D = c->dim, V = c->vocab;
    m->n_floats = V * D + D + (c->tied ? 0 : V * D) + (size_t)c->n_layers * layer_floats(c);
    m->arena = pf_calloc(m->n_floats, sizeof(float), "model weights", st);
    if (!m->arena) return st->code;
    m->layers = pf_calloc((size_t)c->n_layers, sizeof(pf_layer_weights), "layer table", st);
    if (!m->layers) {
        free(m->arena);
        m->arena = NULL;
        return st->code;
    }
    size_t F = c->ffn, Q = qdim(c), K = kdim(c);
    float *p = m->arena;
    m->embed = p; p += V * D;
    for (int l = 0; l < c->n_layers; l++) {
        pf_layer_weights *w = &m->layers[l];
        w->ln1 = p; p += D;
        w->wq = p; p += Q * D;
        w->wk = p; p += K * D;
        w->wv = p; p += K * D;
        if (c->attn_bias) {
            w->bq = p; p += Q;
            w->bk = p; p += K;
            w->bv = p; p += K;
        }
        w->wo = p; p += D * Q;
        w->ln2 = p; p += D;
        w->wg = p; p += F * D;
        w->wu = p; p += F * D;
        w->wd = p; p += D * F;
    }
    m->norm = p; p += D;
    if (c->tied) {
        m->head = m->embed;
    } else {
        m->head = p; p += V * D;
    }
    return PF_OK;
}

void pf_model_free(pf_model *m) {
    if (!m) return;
    pf_lora_free(&m->lora);
    free(m->arena);
    free(m->layers);
    memset(m, 0, sizeof *m);
}

static const char *const layer_tensor_names[12] = {
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.q_proj.bias",
    "self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight",
    "self_attn.v_proj.bias", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"};

size_t pf_model_n_tensors(const pf_model *m) {
    size_t per = m->c.attn_bias ? 12 : 9;
    return 2 + (size_t)m->c.n_layers * per + (m->c.tied ? 0 : 1);
}

int pf_model_tensor(const pf_model *m, size_t i, char *name, size_t cap, float **ptr, int *ndim,
                    size_t shape[2]) {
    const pf_config *c = &m->c;
    size_t D = c->dim, V = c->vocab, F = c->ffn, Q = qdim(c), K = kdim(c);
    size_t per = c->attn_bias ? 12 : 9, nl = (size_t)c->n_layers * per;
    if (i >= pf_model_n_tensors(m)) return 0;
    if (i == 0) {
        snprintf(name, cap, "model.embed_tokens.weight");
        *ptr = m->embed, *ndim = 2, shape[0] = V, shape[1] = D;
        return 1;
    }
    if (i == 1 + nl) {
        snprintf(name, cap, "model.norm.weight");
        *ptr = m->norm, *ndim = 1, shape[0] = D, shape[1] = 1;
        return 1;
    }
    if (i == 2 + nl) {
        snprintf(name, cap, "lm_head.weight");
        *ptr = m->head, *ndim = 2, shape[0] = V, shape[1] = D;
        return 1;
    }
    size_t l = (i - 1) / per, j = (i - 1) % per;
    if (!c->attn_bias) { /* skip the three bias slots */
        static const int map[9] = {0, 1, 3, 5, 7, 8, 9, 10, 11};
        j = (size_t)map[j];
    }
    const pf_layer_weights *w = &m->layers[l];
    snprintf(name, cap, "model.layers.%zu.%s", l, layer_tensor_names[j]);
    *ndim = 2;
    shape[1] = D;
    switch (j) {
    case 0: *ptr = w->ln1, *ndim = 1, shape[0] = D, shape[1] = 1; break;
    case 1: *ptr = w->wq, shape[0] = Q; break;
    case 2: *ptr = w->bq, *ndim = 1, shape[0] = Q, shape[1] = 1; break;
    case 3: *ptr = w->wk, shape[0] = K; break;
    case 4: *ptr = w->bk, *ndim = 1, shape[0] = K, shape[1] = 1; break;
    case 5: *ptr = w->wv, shape[0] = K; break;
    case 6: *ptr = w->bv, *ndim = 1, shape[0] = K, shape[1] = 1; break;
    case 7: *ptr = w->wo, shape[0] = D, shape[1] = Q; break;
    case 8: *ptr = w->ln2, *ndim = 1, shape[0] = D, shape[1] = 1; break;
    case 9: *ptr = w->wg, shape[0] = F; break;
    case 10: *ptr = w->wu, shape[0] = F; break;
    default: *ptr = w->wd, shape[0] = D, shape[1] = F; break;
    }
    return 1;
}

void pf_model_lora_dims(const pf_model *m, int in_dim[PF_LORA_NT], int out_dim[PF_LORA_NT]) {
    int D = m->c.dim, F = m->c.ffn, Q = (int)qdim(&m->c), K = (int)kdim(&m->c);
    int in[PF_LORA_NT] = {D, D, D, Q, D, D, F};
    int out[PF_LORA_NT] = {Q, K, K, D, F, F, D};
    for (int t = 0; t < PF_LORA_NT; t++) in_dim[t] = in[t], out_dim[t] = out[t];
}

/* ------------------------------------------------------------------------ */
/* packed batch                                                              */
/* ------------------------------------------------------------------------ */

int pf_batch_check(const pf_model *m, const int32_t *tokens, size_t n_tokens, const int32_t *seg,
                   int P, pf_status *st) {
    if (P < 1) return pf_fail(st, PF_EINVAL, "segments: need at least one pair");
    if (n_tokens > (size_t)INT_MAX / 2)
        return pf_fail(st, PF_EINVAL, "tokens: %zu tokens is too many for one batch", n_tokens);
    size_t total = 0;
    for (int p = 0; p < P; p++) {
        int32_t lp = seg[3 * p], lc = seg[3 * p + 1], lr = seg[3 * p + 2];
        if (lp < 1)
            return pf_fail(st, PF_EINVAL, "segments: pair %d has prompt_len %d (must be >= 1)", p,
                           (int)lp);
        if (lc < 0 || lr < 0)
            return pf_fail(st, PF_EINVAL,
                           "segments: pair %d has a negative completion length (%d, %d)", p,
                           (int)lc, (int)lr);
        total += (size_t)lp + (size_t)lc + (size_t)lr;
        if (total > n_tokens)
            return pf_fail(st, PF_EINVAL,
                           "segments: pair %d ends at token %zu, past len(tokens) = %zu", p, total,
                           n_tokens);
    }
    if (total != n_tokens)
        return pf_fail(st, PF_EINVAL, "segments: lengths sum to %zu but len(tokens) = %zu", total,
                       n_tokens);
    for (size_t t = 0; t < n_tokens; t++)
        if (tokens[t] < 0 || tokens[t] >= m->c.vocab)
            return pf_fail(st, PF_EINVAL, "tokens: id %d at index %zu is outside [0, %d)",
                           (int)tokens[t], t, m->c.vocab);
    return PF_OK;
}

size_t pf_batch_n_completion(const int32_t *seg, int P) {
    size_t n = 0;
    for (int p = 0; p < P; p++) n += (size_t)seg[3 * p + 1] + (size_t)seg[3 * p + 2];
    return n;
}

/* positions, and the (row, target) list of scored tokens: completion token j
 * is predicted by the row before it, the first one by the last prompt row. */
static void build_index(const int32_t *tokens, const int32_t *seg, int P, int32_t *pos,
                        int32_t *rows, int32_t *targets, int with_prompt) {
    size_t t0 = 0, i = 0;
    for (int p = 0; p < P; p++) {
        int32_t lp = seg[3 * p], lc = seg[3 * p + 1], lr = seg[3 * p + 2];
        size_t tc = t0 + (size_t)lp, tr = tc + (size_t)lc, last = tc - 1;
        for (int32_t j = 0; j < lp; j++) pos[t0 + j] = j;
        for (int32_t j = 0; j < lc; j++, i++) {
            pos[tc + j] = lp + j;
            rows[i] = (int32_t)(j == 0 ? last : tc + j - 1);
            targets[i] = tokens[tc + j];
        }
        for (int32_t j = 0; j < lr; j++, i++) {
            pos[tr + j] = lp + j;
            rows[i] = (int32_t)(j == 0 ? last : tr + j - 1);
            targets[i] = tokens[tr + j];
        }
        t0 = tr + (size_t)lr;
    }
    if (!with_prompt) return;
    /* then, pair by pair, prompt token j >= 1, predicted by prompt row j-1 */
    t0 = 0;
    for (int p = 0; p < P; p++) {
        int32_t lp = seg[3 * p];
        for (int32_t j = 1; j < lp; j++, i++) {
            rows[i] = (int32_t)(t0 + (size_t)j - 1);
            targets[i] = tokens[t0 + (size_t)j];
        }
        t0 += (size_t)lp + (size_t)seg[3 * p + 1] + (size_t)seg[3 * p + 2];
    }
}

static size_t n_prompt_scored(const int32_t *seg, int P) {
    size_t n = 0;
    for (int p = 0; p < P; p++) n += (size_t)seg[3 * p] - 1;
    return n;
}

/* ------------------------------------------------------------------------ */
/* work arena: every activation buffer of one call, carved from one block    */
/* ------------------------------------------------------------------------ */

/* one layer's activations, [T, width] */
typedef struct {
    float *a1, *rstd1, *q, *k, *v, *att, *lse, *h1, *a2, *rstd2, *gate, *up, *act;
    float *xa[PF_LORA_NT]; /* [T, r] per adapted target */
} pf_layer_acts;

typedef struct {
    pf_layer_acts la;      /* the copy the current layer uses */
    pf_layer_acts *acts;   /* [n_keep] copies (train: the top n_keep layers keep theirs) */
    int n_keep;
    float *xd;             /* [T, M] dropout scratch */
    float *S;              /* attention scores scratch */
    float *hbuf;           /* head chunk scratch */
    float *x;              /* [T, D] residual stream / recompute output */
    float *xf, *rstdf;     /* final norm */
    int32_t *pos, *rows, *targets;
    double *tok_logp;      /* [n] */
    /* train only */
    float *store;          /* [(L+1), T, D] */
    float *dres, *dA, *dq, *dk, *dv, *datt, *dgate, *dup, *dact, *dP, *ltmp, *dlogp, *lgrad;
    double *dL;            /* [P,2] coefficient of each completion's logp sum */
    double *Lp, *dLp;      /* [P] prompt logp sums and their coefficients (ORPO option) */
    void *mem;
} pf_work;

typedef struct {
    char *base;
    size_t off;
} carver;

static void *carve(carver *c, size_t n, size_t elsize) {
    size_t o = (c->off + 63) & ~(size_t)63;
    c->off = o + (n ? n : 1) * elsize;
    return c->base ? (void *)(c->base + o) : NULL;
}

static void carve_layer(carver *cv, pf_layer_acts *a, const pf_model *m, size_t T,
                        const pf_lora *lo) {
    const pf_config *c = &m->c;
    size_t D = c->dim, F = c->ffn, Q = qdim(c), K = kdim(c), H = c->n_heads;
    a->a1 = carve(cv, T * D, 4), a->rstd1 = carve(cv, T, 4);
    a->q = carve(cv, T * Q, 4), a->k = carve(cv, T * K, 4), a->v = carve(cv, T * K, 4);
    a->att = carve(cv, T * Q, 4), a->lse = carve(cv, T * H, 4), a->h1 = carve(cv, T * D, 4);
    a->a2 = carve(cv, T * D, 4), a->rstd2 = carve(cv, T, 4);
    a->gate = carve(cv, T * F, 4), a->up = carve(cv, T * F, 4), a->act = carve(cv, T * F, 4);
    for (int t = 0; t < PF_LORA_NT; t++)
        a->xa[t] = pf_lora_has(lo, t) ? carve(cv, T * (size_t)lo->rank, 4) : NULL;
}

/* Lays out (base != NULL) or measures (base == NULL) the work block; returns
 * bytes. n_keep >= 1 copies of the per-layer activations. */
static size_t work_layout(pf_work *w, const pf_model *m, size_t T, size_t n, int P, size_t smax,
                          int train, const pf_lora *lo, int drop_on, int n_keep, char *base) {
    const pf_config *c = &m->c;
    size_t D = c->dim, F = c->ffn, Q = qdim(c), K = kdim(c), V = c->vocab;
    size_t M = D > F ? D : F;
    M = M > Q ? M : Q;
    carver cv = {base, 0};
    w->n_keep = n_keep;
    w->acts = carve(&cv, (size_t)n_keep, sizeof(pf_layer_acts));
    for (int i = 0; i < n_keep; i++) {
        pf_layer_acts tmp;
        carve_layer(&cv, base ? &w->acts[i] : &tmp, m, T, lo);
    }
    if (base) w->la = w->acts[0];
    w->xd = drop_on ? carve(&cv, T * M, 4) : NULL;
    w->S = carve(&cv, smax, 4);
    w->hbuf = carve(&cv, pf_head_scratch(HEAD_CHUNK, (int)D, (int)V), 4);
    w->x = carve(&cv, T * D, 4), w->xf = carve(&cv, T * D, 4), w->rstdf = carve(&cv, T, 4);
    w->pos = carve(&cv, T, 4), w->rows = carve(&cv, n, 4), w->targets = carve(&cv, n, 4);
    w->tok_logp = carve(&cv, n, 8);
    w->store = w->dres = w->dA = w->dq = w->dk = w->dv = w->datt = NULL;
    w->dgate = w->dup = w->dact = w->dP = w->ltmp = w->dlogp = w->lgrad = NULL;
    w->dL = w->Lp = w->dLp = NULL;
    if (train) {
        w->store = carve(&cv, ((size_t)c->n_layers + 1) * T * D, 4);
        w->dres = carve(&cv, T * D, 4), w->dA = carve(&cv, T * D, 4);
        w->dq = carve(&cv, T * Q, 4), w->dk = carve(&cv, T * K, 4), w->dv = carve(&cv, T * K, 4);
        w->datt = carve(&cv, T * Q, 4);
        w->dgate = carve(&cv, T * F, 4), w->dup = carve(&cv, T * F, 4);
        w->dact = carve(&cv, T * F, 4), w->dP = carve(&cv, smax, 4);
        w->ltmp = carve(&cv, T * (size_t)(lo ? lo->rank : 1), 4);
        w->dlogp = carve(&cv, n, 4);
        w->lgrad = carve(&cv, lo ? lo->n_params : 1, 4);
        w->dL = carve(&cv, 2 * (size_t)P, 8);
        w->Lp = carve(&cv, (size_t)P, 8), w->dLp = carve(&cv, (size_t)P, 8);
    }
    w->mem = base;
    return cv.off;
}

/* How many layers keep their activations through backward (the top ones), so
 * that the work block stays within m->act_budget bytes; at least 1 (the top
 * layer's activations are still in place when backward starts). */
static int keep_layers(const pf_model *m, size_t T, size_t n, int P, size_t smax,
                       const pf_lora *lo, int drop_on) {
    pf_work w;
    size_t one = work_layout(&w, m, T, n, P, smax, 1, lo, drop_on, 1, NULL);
    size_t two = work_layout(&w, m, T, n, P, smax, 1, lo, drop_on, 2, NULL);
    size_t per = two - one, L = (size_t)m->c.n_layers;
    if (m->act_budget <= one || per == 0) return 1;
    size_t extra = (m->act_budget - one) / per;
    return (int)(1 + (extra < L - 1 ? extra : L - 1));
}

static int work_alloc(pf_work *w, const pf_model *m, size_t T, size_t n, int P, size_t smax,
                      int train, const pf_lora *lo, int drop_on, int n_keep, pf_status *st) {
    size_t bytes = work_layout(w, m, T, n, P, smax, train, lo, drop_on, n_keep, NULL);
    char *base = pf_malloc(bytes, "activations", st);
    if (!base) return st->code;
    work_layout(w, m, T, n, P, smax, train, lo, drop_on, n_keep, base);
    return PF_OK;
}

/* Point the current-layer view at copy i. */
static void use_copy(pf_work *w, int i) { w->la = w->acts[i]; }

size_t pf_model_work_floats(const pf_model *m, const int32_t *seg, int P, size_t n_tokens,
                            int train) {
    pf_work w;
    const pf_lora *lo = m->lora.rank > 0 ? &m->lora : NULL;
    size_t n = pf_batch_n_completion(seg, P), smax = pf_attn_scratch(seg, P);
    int drop_on = train && lo && lo->dropout > 0.0f;
    int keep = train ? keep_layers(m, n_tokens, n, P, smax, lo, drop_on) : 1;
    return work_layout(&w, m, n_tokens, n, P, smax, train, lo, drop_on, keep, NULL) / sizeof(float);
}

/* ------------------------------------------------------------------------ */
/* one decoder layer: forward, and backward from the stored layer input      */
/* ------------------------------------------------------------------------ */

typedef struct {
    const pf_model *m;
    const pf_lora *lo; /* NULL: base model only */
    uint64_t seed;     /* dropout seed, 0 = none */
    size_t T;          /* rows of this call */
    const int32_t *seg; /* packed layout [P,3] (NULL with a KV cache) */
    int P;
    float *kc, *vc;    /* KV cache of the current layer [maxT, K], or NULL */
    size_t p0;         /* with a cache: position of the first row */
} fctx;

/* y [T,out] = x [T,in] W^T (+ b) (+ LoRA of (layer, t)). */
static void linear_forward(const fctx *f, pf_work *w, int l, int t, float *y, const float *x,
                           const float *W, const float *b, int in, int out) {
    pf_gemm(0, 1, (int)f->T, out, in, 1.0f, x, in, W, in, 0.0f, y, out);
    if (b)
        for (size_t r = 0; r < f->T; r++)
            for (int j = 0; j < out; j++) y[r * (size_t)out + j] += b[j];
    if (pf_lora_has(f->lo, t))
        pf_lora_forward(f->lo, l, t, x, (int)f->T, y, w->la.xa[t], w->xd, f->seed);
}

/* y = x W^T + LoRA:  dx [T,in] (+)= dy W  (beta 0 writes, 1 accumulates), and the
 * adapter's dx and dA/dB (into lg's grad arena). W, b frozen. */
static void linear_backward(const fctx *f, const pf_lora *lg, pf_work *w, int l, int t, float *dx,
                            const float *dy, const float *x, const float *W, int in, int out,
                            float beta) {
    pf_gemm(0, 0, (int)f->T, in, out, 1.0f, dy, out, W, in, beta, dx, in);
    if (pf_lora_has(lg, t))
        pf_lora_backward(lg, l, t, x, (int)f->T, w->la.xa[t], dy, dx, w->ltmp, w->xd, f->seed);
}

/* xo [T,D] = layer l applied to x [T,D] (xo may alias x); leaves the layer's
 * activations in w for backward. */
static void layer_forward(const fctx *f, pf_work *w, int l, const float *x, float *xo) {
    const pf_model *m = f->m;
    const pf_config *c = &m->c;
    const pf_layer_weights *L = &m->layers[l];
    int D = c->dim, F = c->ffn, Q = (int)qdim(c), K = (int)kdim(c);
    int H = c->n_heads, KVH = c->n_kv_heads, hd = c->head_dim;
    size_t T = f->T;
    pf_rmsnorm_forward(w->la.a1, w->la.rstd1, x, L->ln1, T, D, c->eps);
    linear_forward(f, w, l, PF_LORA_Q, w->la.q, w->la.a1, L->wq, L->bq, D, Q);
    linear_forward(f, w, l, PF_LORA_K, w->la.k, w->la.a1, L->wk, L->bk, D, K);
    linear_forward(f, w, l, PF_LORA_V, w->la.v, w->la.a1, L->wv, L->bv, D, K);
    pf_rope_forward(w->la.q, Q, w->pos, T, H, hd, c->theta);
    pf_rope_forward(w->la.k, K, w->pos, T, KVH, hd, c->theta);
    if (f->kc) { /* generation: append to the cache, attend to all of it */
        memcpy(f->kc + f->p0 * (size_t)K, w->la.k, sizeof(float) * T * (size_t)K);
        memcpy(f->vc + f->p0 * (size_t)K, w->la.v, sizeof(float) * T * (size_t)K);
        pf_attn_block_forward(w->la.att, w->la.lse, w->la.q, (int)T, f->kc, f->vc,
                              (int)(f->p0 + T), NULL,
                              NULL, 0, H, KVH, hd, w->S);
    } else {
        pf_attention_forward(w->la.att, w->la.lse, w->la.q, w->la.k, w->la.v, f->seg, f->P, H,
                             KVH, hd, w->S);
    }
    /* h1 = x + o_proj(att) */
    linear_forward(f, w, l, PF_LORA_O, w->la.h1, w->la.att, L->wo, NULL, Q, D);
    for (size_t i = 0; i < T * (size_t)D; i++) w->la.h1[i] += x[i];
    /* xo = h1 + down(silu(gate(a2)) * up(a2)) */
    pf_rmsnorm_forward(w->la.a2, w->la.rstd2, w->la.h1, L->ln2, T, D, c->eps);
    linear_forward(f, w, l, PF_LORA_GATE, w->la.gate, w->la.a2, L->wg, NULL, D, F);
    linear_forward(f, w, l, PF_LORA_UP, w->la.up, w->la.a2, L->wu, NULL, D, F);
    pf_swiglu_forward(w->la.act, w->la.gate, w->la.up, T * (size_t)F);
    linear_forward(f, w, l, PF_LORA_DOWN, xo, w->la.act, L->wd, NULL, F, D);
    for (size_t i = 0; i < T * (size_t)D; i++) xo[i] += w->la.h1[i];
}

/* In: dres [T,D] = dLoss/d(layer output), w holding this layer's activations
 * for input x. Out: dres = dLoss/d(layer input); LoRA grads accumulated into lg.
 *   xo = h1 + Wd act(a2),  a2 = norm2(h1):  dact = dres Wd, then swiglu, gate/up,
 *     dres += norm2^T (dgate Wg + dup Wu)                       (dres is now dh1)
 *   h1 = x + Wo att(q, k, v),  q, k = rope(Wq a1, Wk a1),  a1 = norm1(x):
 *     datt = dres Wo, attention backward, inverse rope,
 *     dres += norm1^T (dq Wq + dk Wk + dv Wv)                   (dres is now dx). */
static void layer_backward(const fctx *f, const pf_lora *lg, pf_work *w, int l, const float *x,
                           float *dres) {
    const pf_model *m = f->m;
    const pf_config *c = &m->c;
    const pf_layer_weights *L = &m->layers[l];
    int D = c->dim, F = c->ffn, Q = (int)qdim(c), K = (int)kdim(c);
    int H = c->n_heads, KVH = c->n_kv_heads, hd = c->head_dim;
    size_t T = f->T;
    /* MLP */
    linear_backward(f, lg, w, l, PF_LORA_DOWN, w->dact, dres, w->la.act, L->wd, F, D, 0.0f);
    memset(w->dgate, 0, sizeof(float) * T * (size_t)F);
    memset(w->dup, 0, sizeof(float) * T * (size_t)F);
    pf_swiglu_backward(w->dgate, w->dup, w->dact, w->la.gate, w->la.up, T * (size_t)F);
    linear_backward(f, lg, w, l, PF_LORA_GATE, w->dA, w->dgate, w->la.a2, L->wg, D, F, 0.0f);
    linear_backward(f, lg, w, l, PF_LORA_UP, w->dA, w->dup, w->la.a2, L->wu, D, F, 1.0f);
    pf_rmsnorm_backward(dres, w->dA, w->la.h1, L->ln2, w->la.rstd2, T, D);
    /* attention */
    linear_backward(f, lg, w, l, PF_LORA_O, w->datt, dres, w->la.att, L->wo, Q, D, 0.0f);
    memset(w->dq, 0, sizeof(float) * T * (size_t)Q);
    memset(w->dk, 0, sizeof(float) * T * (size_t)K);
    memset(w->dv, 0, sizeof(float) * T * (size_t)K);
    pf_attention_backward(w->dq, w->dk, w->dv, w->datt, w->la.att, w->la.lse, w->la.q, w->la.k,
                          w->la.v, f->seg, f->P, H, KVH, hd, w->S, w->dP);
    pf_rope_backward(w->dq, Q, w->pos, T, H, hd, c->theta);
    pf_rope_backward(w->dk, K, w->pos, T, KVH, hd, c->theta);
    linear_backward(f, lg, w, l, PF_LORA_Q, w->dA, w->dq, w->la.a1, L->wq, D, Q, 0.0f);
    linear_backward(f, lg, w, l, PF_LORA_K, w->dA, w->dk, w->la.a1, L->wk, D, K, 1.0f);
    linear_backward(f, lg, w, l, PF_LORA_V, w->dA, w->dv, w->la.a1, L->wv, D, K, 1.0f);
    pf_rmsnorm_backward(dres, w->dA, x, L->ln1, w->la.rstd1, T, D);
}

static void embed_rows(const pf_model *m, const int32_t *tokens, size_t T, float *x) {
    size_t D = m->c.dim;
    for (size_t t = 0; t < T; t++)
        memcpy(x + t * D, m->embed + (size_t)tokens[t] * D, sizeof(float) * D);
}

/* ------------------------------------------------------------------------ */
/* score                                                                     */
/* ------------------------------------------------------------------------ */

static void pair_sums(const double *tok_logp, const int32_t *seg, int P, double *logp, int32_t *n) {
    size_t i = 0;
    for (int p = 0; p < P; p++) {
        for (int s = 0; s < 2; s++) {
            int32_t len = seg[3 * p + 1 + s];
            double sum = 0.0;
            for (int32_t j = 0; j < len; j++) sum += tok_logp[i++];
            logp[2 * p + s] = sum;
            n[2 * p + s] = len;
        }
    }
}

/* Embedding, every layer and the final norm over a packed batch; leaves the
 * normed hidden states in w->xf and the scoring index in w->rows/targets.
 * Allocates w (the caller frees w->mem). */
static int forward_packed(pf_model *m, const pf_lora *lo, const int32_t *tokens, size_t T,
                          const int32_t *seg, int P, pf_work *w, pf_status *st) {
    const pf_config *c = &m->c;
    size_t nc = pf_batch_n_completion(seg, P);
    if (work_alloc(w, m, T, nc, P, pf_attn_scratch(seg, P), 0, lo, 0, 1, st)) return st->code;
    build_index(tokens, seg, P, w->pos, w->rows, w->targets, 0);
    fctx f = {m, lo, 0, T, seg, P, NULL, NULL, 0};
    embed_rows(m, tokens, T, w->x);
    for (int l = 0; l < c->n_layers; l++) layer_forward(&f, w, l, w->x, w->x);
    pf_rmsnorm_forward(w->xf, w->rstdf, w->x, m->norm, T, c->dim, c->eps);
    return PF_OK;
}

int pf_model_score(pf_model *m, const int32_t *tokens, size_t n_tokens, const int32_t *seg, int P,
                   int use_lora, double *logp, int32_t *n, float *per_token, pf_status *st) {
    if (pf_batch_check(m, tokens, n_tokens, seg, P, st)) return st->code;
    const pf_config *c = &m->c;
    const pf_lora *lo = use_lora && m->lora.rank > 0 ? &m->lora : NULL;
    size_t nc = pf_batch_n_completion(seg, P);
    pf_work w;
    if (forward_packed(m, lo, tokens, n_tokens, seg, P, &w, st)) return st->code;
    pf_head_logp_forward(w.tok_logp, w.xf, c->dim, w.rows, w.targets, nc, m->head, c->vocab,
                         w.hbuf, HEAD_CHUNK);
    pair_sums(w.tok_logp, seg, P, logp, n);
    if (per_token)
        for (size_t i = 0; i < nc; i++) per_token[i] = (float)w.tok_logp[i];
    free(w.mem);
    return PF_OK;
}

int pf_model_completion_logits(pf_model *m, const int32_t *tokens, size_t n_tokens,
                               const int32_t *seg, int P, int use_lora, float *logits,
                               pf_status *st) {
    if (pf_batch_check(m, tokens, n_tokens, seg, P, st)) return st->code;
    const pf_config *c = &m->c;
    const pf_lora *lo = use_lora && m->lora.rank > 0 ? &m->lora : NULL;
    size_t nc = pf_batch_n_completion(seg, P), D = c->dim;
    pf_work w;
    if (forward_packed(m, lo, tokens, n_tokens, seg, P, &w, st)) return st->code;
    /* gather the nc (< T) scoring rows into a1 [nc, D]; logits [nc, V] = a1 @ head^T */
    for (size_t i = 0; i < nc; i++)
        memcpy(w.la.a1 + i * D, w.xf + (size_t)w.rows[i] * D, sizeof(float) * D);
    if (nc > 0)
        pf_gemm(0, 1, (int)nc, c->vocab, c->dim, 1.0f, w.la.a1, c->dim, m->head, c->dim, 0.0f,
                logits, c->vocab);
    free(w.mem);
    return PF_OK;
}

/* ------------------------------------------------------------------------ */
/* train step                                                                */
/* ------------------------------------------------------------------------ */

/* The per-completion gradient coefficients dL [P,2] = dLoss/d(logp sums) from
 * the sums logp [P,2] and counts n [P,2]: the objective (train_step) or given
 * (logp_backward). With prompt scoring (Lp != NULL), Lp [P] holds the prompt
 * log-prob sums (tokens 1..lp-1) and the function also writes dLp [P]. */
typedef int (*coef_fn)(void *ctx, const double *logp, const int32_t *n, const double *Lp,
                       const int32_t *seg, int P, double *dL, double *dLp, pf_status *st);

/* Forward with the adapter (storing each layer's input), coefficients, then
 * backward of sum over completions of dL * logp into a private gradient
 * buffer, added to the LoRA grad arena only if every entry is finite. */
static int forward_backward(pf_model *m, const int32_t *tokens, size_t n_tokens,
                            const int32_t *seg, int P, uint64_t dropout_seed, int with_prompt,
                            coef_fn coef, void *ctx, double *logp, int32_t *n, pf_status *st) {
    const pf_config *c = &m->c;
    const pf_lora *lo = &m->lora;
    int drop_on = lo->dropout > 0.0f && dropout_seed != 0;
    size_t T = n_tokens, D = c->dim, ncomp = pf_batch_n_completion(seg, P);
    /* scored tokens: every completion token, then (option) prompt tokens 1..lp-1 */
    size_t nc = ncomp + (with_prompt ? n_prompt_scored(seg, P) : 0);
    size_t smax = pf_attn_scratch(seg, P);
    int keep = keep_layers(m, T, nc, P, smax, lo, drop_on), L = c->n_layers, rc = PF_OK;
    pf_work w;
    if (work_alloc(&w, m, T, nc, P, smax, 1, lo, drop_on, keep, st)) return st->code;
    double *dL = w.dL; /* [P,2] */
    build_index(tokens, seg, P, w.pos, w.rows, w.targets, with_prompt);
    fctx f = {m, lo, drop_on ? dropout_seed : 0, T, seg, P, NULL, NULL, 0};
    /* forward, storing each layer's input; layer l >= L - keep keeps its
     * activations in copy l - (L - keep), the others pass through copy 0 */
    embed_rows(m, tokens, T, w.store);
    for (int l = 0; l < L; l++) {
        use_copy(&w, l >= L - keep ? l - (L - keep) : 0);
        layer_forward(&f, &w, l, w.store + (size_t)l * T * D, w.store + (size_t)(l + 1) * T * D);
    }
    const float *xL = w.store + (size_t)L * T * D;
    pf_rmsnorm_forward(w.xf, w.rstdf, xL, m->norm, T, c->dim, c->eps);
    pf_head_logp_forward(w.tok_logp, w.xf, c->dim, w.rows, w.targets, nc, m->head, c->vocab,
                         w.hbuf, HEAD_CHUNK);
    pair_sums(w.tok_logp, seg, P, logp, n);
    size_t i = ncomp;
    for (int p = 0; with_prompt && p < P; p++) {
        double sum = 0.0;
        for (int32_t j = 1; j < seg[3 * p]; j++) sum += w.tok_logp[i++];
        w.Lp[p] = sum;
    }
    if ((rc = coef(ctx, logp, n, with_prompt ? w.Lp : NULL, seg, P, dL, w.dLp, st))) goto done;
    /* every scored token's log-prob gets its sequence's coefficient */
    i = 0;
    for (int p = 0; p < P; p++)
        for (int s2 = 0; s2 < 2; s2++)
            for (int32_t j = 0; j < seg[3 * p + 1 + s2]; j++) w.dlogp[i++] = (float)dL[2 * p + s2];
    for (int p = 0; with_prompt && p < P; p++)
        for (int32_t j = 1; j < seg[3 * p]; j++) w.dlogp[i++] = (float)w.dLp[p];
    /* backward: head, final norm, then the layers from the top; a layer whose
     * activations were not kept is recomputed from its stored input into copy 0
     * (free by then: every kept layer is above it and already done) */
    memset(w.dA, 0, sizeof(float) * T * D);
    pf_head_logp_backward(w.dA, w.dlogp, w.xf, c->dim, w.rows, w.targets, nc, m->head, c->vocab,
                          w.hbuf, HEAD_CHUNK);
    memset(w.dres, 0, sizeof(float) * T * D);
    pf_rmsnorm_backward(w.dres, w.dA, xL, m->norm, w.rstdf, T, c->dim);
    pf_lora lg = *lo; /* same adapter, gradients into this call's own buffer */
    lg.grads = w.lgrad;
    memset(w.lgrad, 0, sizeof(float) * lo->n_params);
    for (int l = L - 1; l >= 0; l--) {
        const float *xl = w.store + (size_t)l * T * D;
        if (l >= L - keep) {
            use_copy(&w, l - (L - keep));
        } else {
            use_copy(&w, 0);
            layer_forward(&f, &w, l, xl, w.x);
        }
        layer_backward(&f, &lg, &w, l, xl, w.dres);
    }
    for (size_t j = 0; j < lo->n_params; j++) {
        if (!isfinite(w.lgrad[j])) {
            rc = pf_fail(st, PF_ENONFINITE,
                         "non-finite LoRA gradient (parameter %zu); gradients left unchanged", j);
            goto done;
        }
    }
    for (size_t j = 0; j < lo->n_params; j++) lo->grads[j] += w.lgrad[j];
done:
    free(w.mem);
    return rc;
}

typedef struct {
    const double *ref;
    const pf_objective *obj;
    double weight;
    pf_train_out *out;
} objective_ctx;

/* objective per pair; dL = weight * dLoss/dLc, dLoss/dLr.
 * ORPO with the prompt in the NLL (TRL's convention, Lp != NULL): the loss
 * swaps pf_objective_pair's nll = -Lc/nc for nll' = -(Lp + Lc)/(np + nc),
 * np = lp - 1 (every token but the first is predicted), so
 *   loss' = loss - nll + nll',  dLc' = dLc + 1/nc - 1/(np + nc),  dLp = -1/(np + nc). */
static int objective_coef(void *vctx, const double *logp, const int32_t *n, const double *Lp,
                          const int32_t *seg, int P, double *dL, double *dLp, pf_status *st) {
    objective_ctx *x = vctx;
    pf_train_out *out = x->out;
    for (int p = 0; p < P; p++) {
        pf_pair_loss pl;
        if (pf_objective_pair(x->obj, logp[2 * p], logp[2 * p + 1], x->ref[2 * p],
                              x->ref[2 * p + 1], (double)n[2 * p], (double)n[2 * p + 1], &pl, st)) {
            if (st->code == PF_ENONFINITE) {
                char msg[sizeof st->msg];
                snprintf(msg, sizeof msg, "%s", st->msg);
                return pf_fail(st, PF_ENONFINITE, "pair %d: %s", p, msg);
            }
            return st->code;
        }
        if (Lp) {
            double nc = (double)n[2 * p], np = (double)seg[3 * p] - 1.0;
            double nll = -(Lp[p] + logp[2 * p]) / (np + nc);
            pl.loss += nll - pl.nll;
            pl.dLc += 1.0 / nc - 1.0 / (np + nc);
            pl.nll = nll;
            dLp[p] = x->weight * (-1.0 / (np + nc));
            if (!isfinite(pl.loss) || !isfinite(nll))
                return pf_fail(st, PF_ENONFINITE, "pair %d: non-finite ORPO loss", p);
        }
        out->loss[p] = pl.loss;
        out->reward[2 * p] = pl.reward_c, out->reward[2 * p + 1] = pl.reward_r;
        out->nll[p] = pl.nll, out->log_odds[p] = pl.log_odds;
        out->log_sig_odds[p] = pl.log_sig_odds;
        dL[2 * p] = x->weight * pl.dLc;
        dL[2 * p + 1] = x->weight * pl.dLr;
    }
    return PF_OK;
}

int pf_model_train_step(pf_model *m, const int32_t *tokens, size_t n_tokens, const int32_t *seg,
                        int P, const double *ref, const pf_objective *obj, double weight,
                        uint64_t dropout_seed, int nll_with_prompt, pf_train_out *out,
                        pf_status *st) {
    if (pf_batch_check(m, tokens, n_tokens, seg, P, st)) return st->code;
    if (nll_with_prompt && obj->kind != PF_OBJ_ORPO)
        return pf_fail(st, PF_EINVAL, "nll_include_prompt is an ORPO option");
    if (m->lora.rank <= 0)
        return pf_fail(st, PF_EINVAL, "train_step needs an adapter: call lora_init first");
    for (int p = 0; p < P; p++)
        if (seg[3 * p + 1] < 1 || seg[3 * p + 2] < 1)
            return pf_fail(st, PF_EINVAL,
                           "segments: pair %d has an empty completion (chosen_len %d, "
                           "rejected_len %d); train_step needs both >= 1",
                           p, (int)seg[3 * p + 1], (int)seg[3 * p + 2]);
    if (!isfinite(weight)) return pf_fail(st, PF_EINVAL, "weight must be finite");
    if (pf_objective_check(obj, st)) return st->code;
    objective_ctx x = {ref, obj, weight, out};
    return forward_backward(m, tokens, n_tokens, seg, P, dropout_seed, nll_with_prompt,
                            objective_coef, &x, out->logp, out->n, st);
}

static int given_coef(void *ctx, const double *logp, const int32_t *n, const double *Lp,
                      const int32_t *seg, int P, double *dL, double *dLp, pf_status *st) {
    memcpy(dL, ctx, sizeof(double) * 2 * (size_t)P);
    return PF_OK;
}

int pf_model_logp_backward(pf_model *m, const int32_t *tokens, size_t n_tokens, const int32_t *seg,
                           int P, const double *coef, uint64_t dropout_seed, double *logp,
                           int32_t *n, pf_status *st) {
    if (pf_batch_check(m, tokens, n_tokens, seg, P, st)) return st->code;
    if (m->lora.rank <= 0)
        return pf_fail(st, PF_EINVAL, "logp_backward needs an adapter: call lora_init first");
    for (int j = 0; j < 2 * P; j++)
        if (!isfinite(coef[j])) return pf_fail(st, PF_EINVAL, "coef[%d] is not finite", j);
    return forward_backward(m, tokens, n_tokens, seg, P, dropout_seed, 0, given_coef,
                            (void *)coef, logp, n, st);
}

/* ------------------------------------------------------------------------ */
/* greedy generation with a KV cache                                         */
/* ------------------------------------------------------------------------ */

int pf_model_generate(pf_model *m, const int32_t *prompt, size_t n_prompt, int max_new,
                      const int32_t *stop, int n_stop, int use_lora, int32_t *out, int *n_out,
                      pf_status *st) {
    *n_out = 0;
    const pf_config *c = &m->c;
    if (n_prompt < 1) return pf_fail(st, PF_EINVAL, "prompt_ids must not be empty");
    if (max_new < 0) return pf_fail(st, PF_EINVAL, "max_new_tokens must be >= 0");
    int32_t seg1[3] = {(int32_t)n_prompt, 0, 0};
    if (n_prompt > (size_t)INT_MAX / 4) return pf_fail(st, PF_EINVAL, "prompt_ids too long");
    if (pf_batch_check(m, prompt, n_prompt, seg1, 1, st)) return st->code;
    if (max_new == 0) return PF_OK;
    const pf_lora *lo = use_lora && m->lora.rank > 0 ? &m->lora : NULL;
    size_t maxT = n_prompt + (size_t)max_new, D = c->dim, K = kdim(c), V = c->vocab;
    size_t L = (size_t)c->n_layers;
    size_t smax = n_prompt * n_prompt > maxT ? n_prompt * n_prompt : maxT;
    pf_work w;
    if (work_alloc(&w, m, n_prompt, 0, 1, smax, 0, lo, 0, 1, st)) return st->code;
    /* cache [L][2][maxT, K] and logits [V] in one block */
    float *cache = pf_malloc(sizeof(float) * (2 * L * maxT * K + V), "KV cache", st);
    if (!cache) {
        free(w.mem);
        return st->code;
    }
    float *logits = cache + 2 * L * maxT * K;
    fctx f = {m, lo, 0, n_prompt, NULL, 1, NULL, NULL, 0};
    for (size_t t = 0; t < n_prompt; t++) w.pos[t] = (int32_t)t;
    embed_rows(m, prompt, n_prompt, w.x);
    size_t p0 = 0;
    for (int g = 0; g < max_new; g++) {
        for (size_t l = 0; l < L; l++) {
            f.kc = cache + (2 * l) * maxT * K, f.vc = cache + (2 * l + 1) * maxT * K, f.p0 = p0;
            layer_forward(&f, &w, (int)l, w.x, w.x);
        }
        const float *xl = w.x + (f.T - 1) * D; /* last row predicts the next token */
        pf_rmsnorm_forward(w.xf, w.rstdf, xl, m->norm, 1, c->dim, c->eps);
        pf_gemm(0, 1, 1, (int)V, (int)D, 1.0f, w.xf, (int)D, m->head, (int)D, 0.0f, logits, (int)V);
        int32_t best = 0;
        for (size_t j = 1; j < V; j++)
            if (logits[j] > logits[best]) best = (int32_t)j;
        if (!isfinite(logits[best])) {
            free(cache);
            free(w.mem);
            return pf_fail(st, PF_ENONFINITE, "non-finite logits while generating token %d", g);
        }
        out[(*n_out)++] = best;
        int stopped = 0;
        for (int s = 0; s < n_stop; s++) stopped |= stop[s] == best;
        if (stopped) break;
        p0 += f.T;
        f.T = 1;
        w.pos[0] = (int32_t)p0;
        embed_rows(m, &best, 1, w.x);
    }
    free(cache);
    free(w.mem);
    return PF_OK;
}
