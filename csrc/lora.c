/* lora.c: LoRA adapters, PEFT conventions (see lora.h, design.md section 6).
 *
 * Random streams: for (layer, target) with id = layer * PF_LORA_NT + target,
 *   init of A uses   pf_rng(seed,         2*id,     j*in + i)   (element A[j, i])
 *   dropout uses     pf_rng(dropout_seed, 2*id + 1, row*in + col)
 * so no two (layer, target) pairs share a stream and A does not depend on which
 * other targets are adapted. */
#include "lora.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "rng.h"

const char *const pf_lora_target_names[PF_LORA_NT] = {"q_proj",    "k_proj",  "v_proj", "o_proj",
                                                       "gate_proj", "up_proj", "down_proj"};

static uint64_t stream_id(int layer, int t) { return (uint64_t)layer * PF_LORA_NT + (uint64_t)t; }

int pf_lora_create(pf_lora *l, int n_layers, const int in_dim[PF_LORA_NT],
                   const int out_dim[PF_LORA_NT], int rank, float alpha, int rslora,
                   float dropout, unsigned target_mask, pf_status *st) {
    memset(l, 0, sizeof *l);
    if (n_layers < 1) return pf_fail(st, PF_EINVAL, "LoRA: n_layers must be >= 1, got %d", n_layers);
    if (rank < 1) return pf_fail(st, PF_EINVAL, "LoRA: rank must be >= 1, got %d", rank);
    if (target_mask == 0 || target_mask >= (1u << PF_LORA_NT))
        return pf_fail(st, PF_EINVAL, "LoRA: target mask 0x%x selects no valid target", target_mask);
    if (!isfinite(alpha) || alpha <= 0.0f)
        return pf_fail(st, PF_EINVAL, "LoRA: alpha must be a finite number > 0, got %g", (double)alpha);
    if (!(dropout >= 0.0f && dropout < 1.0f))
        return pf_fail(st, PF_EINVAL, "LoRA: dropout must be in [0, 1), got %g", (double)dropout);
    size_t n = 0;
    for (int t = 0; t < PF_LORA_NT; t++) {
        l->in_dim[t] = in_dim[t];
        l->out_dim[t] = out_dim[t];
        if (!((target_mask >> t) & 1u)) continue;
        if (in_dim[t] < 1 || out_dim[t] < 1)
            return pf_fail(st, PF_EINVAL, "LoRA: target %s has invalid shape [%d, %d]",
                           pf_lora_target_names[t], out_dim[t], in_dim[t]);
        /* per layer: A [rank, in] + B [out, rank] */
        size_t per = (size_t)rank * ((size_t)in_dim[t] + (size_t)out_dim[t]);
        if (per > (SIZE_MAX / 4 - n) / (size_t)n_layers)
            return pf_fail(st, PF_ENOMEM, "LoRA: parameter count overflows");
        n += per * (size_t)n_layers;
    }
    size_t n_slots = (size_t)n_layers * PF_LORA_NT;
    l->off_a = pf_malloc(n_slots * sizeof(size_t), "LoRA offset table A", st);
    l->off_b = pf_malloc(n_slots * sizeof(size_t), "LoRA offset table B", st);
    if (!l->off_a || !l->off_b) goto fail;
    /* one allocation per arena family (params, grads, adam m, adam v) */
    l->params = pf_calloc(n, sizeof(float), "LoRA params", st);
    if (!l->params) goto fail;
    l->grads = pf_calloc(n, sizeof(float), "LoRA grads", st);
    if (!l->grads) goto fail;
    l->adam_m = pf_calloc(n, sizeof(float), "LoRA Adam m", st);
    if (!l->adam_m) goto fail;
    l->adam_v = pf_calloc(n, sizeof(float), "LoRA Adam v", st);
    if (!l->adam_v) goto fail;
    size_t off = 0;
    for (int layer = 0; layer < n_layers; layer++) {
        for (int t = 0; t < PF_LORA_NT; t++) {
            size_t s = (size_t)layer * PF_LORA_NT + (size_t)t;
            if (!((target_mask >> t) & 1u)) {
                l->off_a[s] = l->off_b[s] = SIZE_MAX;
                continue;
            }
            l->off_a[s] = off;
            off += (size_t)rank * (size_t)in_dim[t];
            l->off_b[s] = off;
            off += (size_t)out_dim[t] * (size_t)rank;
        }
    }
    l->n_layers = n_layers;
    l->rank = rank;
    l->target_mask = target_mask;
    l->alpha = alpha;
    l->rslora = rslora ? 1 : 0;
    l->scale = (float)(rslora ? (double)alpha / sqrt((double)rank) : (double)alpha / (double)rank);
    l->dropout = dropout;
    l->n_params = n;
    return PF_OK;
fail:
    pf_lora_free(l);
    return st ? st->code : PF_ENOMEM;
}

void pf_lora_free(pf_lora *l) {
    if (!l) return;
    free(l->off_a);
    free(l->off_b);
    free(l->params);
    free(l->grads);
    free(l->adam_m);
    free(l->adam_v);
    memset(l, 0, sizeof *l);
}

void pf_lora_init_weights(pf_lora *l, uint64_t seed) {
    if (!l || !l->params) return;
    memset(l->params, 0, l->n_params * sizeof(float));
    memset(l->grads, 0, l->n_params * sizeof(float));
    memset(l->adam_m, 0, l->n_params * sizeof(float));
    memset(l->adam_v, 0, l->n_params * sizeof(float));
    for (int layer = 0; layer < l->n_layers; layer++) {
        for (int t = 0; t < PF_LORA_NT; t++) {
            if (!pf_lora_has(l, t)) continue;
            /* kaiming_uniform_(a=sqrt(5)) on A [rank, in]: gain = sqrt(2/(1+5)),
             * bound = gain * sqrt(3/fan_in) = 1/sqrt(in) */
            size_t in = (size_t)l->in_dim[t];
            double bound = 1.0 / sqrt((double)in);
            float *A = pf_lora_a(l, l->params, layer, t);
            uint64_t stream = 2 * stream_id(layer, t);
            size_t na = (size_t)l->rank * in;
            for (size_t e = 0; e < na; e++) {
                double u = (double)pf_rng_u01(seed, stream, e); /* [0, 1) */
                A[e] = (float)((2.0 * u - 1.0) * bound);
            }
            /* B stays 0: the policy equals the base model at step 0 */
        }
    }
}

/* Dropout: element (row, col) kept iff u >= p, kept values scaled by 1/(1-p). */
static int dropout_active(const pf_lora *l, uint64_t dropout_seed) {
    return dropout_seed != 0 && l->dropout > 0.0f;
}

static inline float keep_factor(uint64_t seed, uint64_t stream, uint64_t idx, float p, float inv) {
    return pf_rng_u01(seed, stream, idx) >= p ? inv : 0.0f;
}

/* xd [T, in] = drop(x) */
static void dropout_apply(const pf_lora *l, int layer, int t, const float *x, int T, float *xd,
                          uint64_t seed) {
    size_t in = (size_t)l->in_dim[t];
    uint64_t stream = 2 * stream_id(layer, t) + 1;
    float p = l->dropout, inv = 1.0f / (1.0f - p);
    for (size_t r = 0; r < (size_t)T; r++)
        for (size_t c = 0; c < in; c++)
            xd[r * in + c] = x[r * in + c] * keep_factor(seed, stream, r * in + c, p, inv);
}

void pf_lora_forward(const pf_lora *l, int layer, int t, const float *x, int T, float *y,
                     float *xa, float *xd, uint64_t dropout_seed) {
    if (!pf_lora_has(l, t) || layer < 0 || layer >= l->n_layers || T <= 0) return;
    const int in = l->in_dim[t], out = l->out_dim[t], r = l->rank;
    const float *A = pf_lora_a(l, l->params, layer, t); /* [r, in] */
    const float *B = pf_lora_b(l, l->params, layer, t); /* [out, r] */
    const float *xin = x;
    if (dropout_active(l, dropout_seed)) {
        if (xd) {
            dropout_apply(l, layer, t, x, T, xd, dropout_seed);
            xin = xd;
        } else {
            /* no scratch: xa [T, r] = drop(x) A^T row by row, regenerating the mask */
            uint64_t stream = 2 * stream_id(layer, t) + 1;
            float p = l->dropout, inv = 1.0f / (1.0f - p);
            memset(xa, 0, (size_t)T * (size_t)r * sizeof(float));
            for (size_t row = 0; row < (size_t)T; row++)
                for (size_t c = 0; c < (size_t)in; c++) {
                    float k = keep_factor(dropout_seed, stream, row * (size_t)in + c, p, inv);
                    if (k == 0.0f) continue;
                    float v = x[row * (size_t)in + c] * k;
                    for (size_t j = 0; j < (size_t)r; j++) xa[row * (size_t)r + j] += v * A[j * (size_t)in + c];
                }
            xin = NULL;
        }
    }
    /* xa [T, r] = xin [T, in] @ A^T */
    if (xin) pf_gemm(0, 1, T, r, in, 1.0f, xin, in, A, in, 0.0f, xa, r);
    /* y [T, out] += scale * xa [T, r] @ B^T */
    pf_gemm(0, 1, T, out, r, l->scale, xa, r, B, r, 1.0f, y, out);
}

/* Backward of y += s * (drop(x) A^T) B^T, with xa = drop(x) A^T:
 *   dB [out, r] += s * dy^T xa
 *   tmp [T, r]   = s * dy B             (gradient w.r.t. xa)
 *   dA [r, in]  += tmp^T drop(x)
 *   dx [T, in]  += mask/(1-p) * (tmp A) */
void pf_lora_backward(const pf_lora *l, int layer, int t, const float *x, int T, const float *xa,
                      const float *dy, float *dx, float *tmp, float *xd, uint64_t dropout_seed) {
    if (!pf_lora_has(l, t) || layer < 0 || layer >= l->n_layers || T <= 0) return;
    const int in = l->in_dim[t], out = l->out_dim[t], r = l->rank;
    const float *A = pf_lora_a(l, l->params, layer, t);
    const float *B = pf_lora_b(l, l->params, layer, t);
    float *dA = pf_lora_a(l, l->grads, layer, t);
    float *dB = pf_lora_b(l, l->grads, layer, t);
    const float s = l->scale;
    pf_gemm(1, 0, out, r, T, s, dy, out, xa, r, 1.0f, dB, r);
    pf_gemm(0, 0, T, r, out, s, dy, out, B, r, 0.0f, tmp, r);
    if (!dropout_active(l, dropout_seed)) {
        pf_gemm(1, 0, r, in, T, 1.0f, tmp, r, x, in, 1.0f, dA, in);
        if (dx) pf_gemm(0, 0, T, in, r, 1.0f, tmp, r, A, in, 1.0f, dx, in);
        return;
    }
    const uint64_t stream = 2 * stream_id(layer, t) + 1;
    const float p = l->dropout, inv = 1.0f / (1.0f - p);
    if (xd) {
        dropout_apply(l, layer, t, x, T, xd, dropout_seed); /* the same mask as forward */
        pf_gemm(1, 0, r, in, T, 1.0f, tmp, r, xd, in, 1.0f, dA, in);
        if (dx) {
            pf_gemm(0, 0, T, in, r, 1.0f, tmp, r, A, in, 0.0f, xd, in); /* xd := tmp A */
            for (size_t row = 0; row < (size_t)T; row++)
                for (size_t c = 0; c < (size_t)in; c++) {
                    size_t e = row * (size_t)in + c;
                    dx[e] += xd[e] * keep_factor(dropout_seed, stream, e, p, inv);
                }
        }
        return;
    }
    /* no scratch: element-wise with the regenerated mask */
    for (size_t row = 0; row < (size_t)T; row++)
        for (size_t c = 0; c < (size_t)in; c++) {
            size_t e = row * (size_t)in + c;
            float k = keep_factor(dropout_seed, stream, e, p, inv);
            if (k == 0.0f) continue;
            float v = x[e] * k;
            const float *tr = tmp + row * (size_t)r;
            double acc = 0.0;
            for (size_t j = 0; j < (size_t)r; j++) {
                dA[j * (size_t)in + c] += tr[j] * v;
                acc += (double)tr[j] * A[j * (size_t)in + c];
            }
            if (dx) dx[e] += (float)acc * k;
        }
}

void pf_lora_merge(const pf_lora *l, int layer, int t, float *W) {
    if (!pf_lora_has(l, t) || layer < 0 || layer >= l->n_layers) return;
    const int in = l->in_dim[t], out = l->out_dim[t], r = l->rank;
    /* W [out, in] += scale * B [out, r] @ A [r, in] */
    pf_gemm(0, 0, out, in, r, l->scale, pf_lora_b(l, l->params, layer, t), r,
            pf_lora_a(l, l->params, layer, t), in, 1.0f, W, in);
}
