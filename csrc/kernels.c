/* kernels.c: rmsnorm, rope, swiglu, attention, fused head log-softmax.
 * Each forward is followed by its backward; the backward's derivation is in
 * the comment above it. All matmuls go through pf_gemm (OpenBLAS sgemm). */
#include "kernels.h"

#include <math.h>
#include <string.h>

#include "blas.h"

/* ------------------------------------------------------------------------ */
/* RMSNorm                                                                   */
/* ------------------------------------------------------------------------ */

void pf_rmsnorm_forward(float *out, float *rstd, const float *x, const float *g, size_t T, int D,
                        float eps) {
    for (size_t t = 0; t < T; t++) {
        const float *xt = x + t * (size_t)D; /* [D] */
        float *ot = out + t * (size_t)D;
        double ss = 0.0;
        for (int j = 0; j < D; j++) ss += (double)xt[j] * xt[j];
        float r = (float)(1.0 / sqrt(ss / D + (double)eps));
        rstd[t] = r;
        for (int j = 0; j < D; j++) ot[j] = g[j] * (xt[j] * r);
    }
}

/* y_j = g_j x_j r,  r = (mean(x^2) + eps)^(-1/2),  dr/dx_k = -r^3 x_k / D, so
 *   dx_k = sum_j dy_j dy_j/dx_k = r g_k dy_k - r^3 x_k (sum_j g_j dy_j x_j) / D
 *        = r (g_k dy_k - x_k r^2 c),  c = (1/D) sum_j g_j dy_j x_j. */
void pf_rmsnorm_backward(float *dx, const float *dout, const float *x, const float *g,
                         const float *rstd, size_t T, int D) {
    for (size_t t = 0; t < T; t++) {
        const float *xt = x + t * (size_t)D;
        const float *dyt = dout + t * (size_t)D;
        float *dxt = dx + t * (size_t)D;
        double c = 0.0;
        for (int j = 0; j < D; j++) c += (double)g[j] * dyt[j] * xt[j];
        float r = rstd[t];
        float cr2 = (float)(c / D) * r * r;
        for (int j = 0; j < D; j++) dxt[j] += r * (g[j] * dyt[j] - xt[j] * cr2);
    }
}

/* ------------------------------------------------------------------------ */
/* RoPE                                                                      */
/* ------------------------------------------------------------------------ */

/* Angles as transformers computes them (float32 inverse frequencies and
 * float32 pos * f products), cos/sin evaluated in double. sign = +1 rotates
 * forward, -1 applies the transpose (inverse) rotation. */
static void rope_apply(float *x, int ldx, const int32_t *pos, size_t T, int n_heads, int hd,
                       float theta, float sign) {
    int half = hd / 2;
    float inv_freq[PF_ROPE_MAX_HD / 2];
    for (int i = 0; i < half; i++)
        inv_freq[i] = (float)(1.0 / pow((double)theta, (double)(2 * i) / (double)hd));
    for (size_t t = 0; t < T; t++) {
        float *xt = x + t * (size_t)ldx;
        float p = (float)pos[t];
        for (int i = 0; i < half; i++) {
            float ang = p * inv_freq[i];
            float c = (float)cos((double)ang), s = sign * (float)sin((double)ang);
            for (int h = 0; h < n_heads; h++) {
                float *xh = xt + (size_t)h * hd;
                float x1 = xh[i], x2 = xh[i + half];
                xh[i] = x1 * c - x2 * s;
                xh[i + half] = x2 * c + x1 * s;
            }
        }
    }
}

void pf_rope_forward(float *x, int ldx, const int32_t *pos, size_t T, int n_heads, int hd,
                     float theta) {
    rope_apply(x, ldx, pos, T, n_heads, hd, theta, 1.0f);
}

/* y = R x with R orthogonal (a rotation per (i, i+hd/2) pair), so
 * dx = R^T dy = the rotation by -angle:  dx1 = dy1 c + dy2 s, dx2 = dy2 c - dy1 s.
 * In place on dx. */
void pf_rope_backward(float *dx, int ldx, const int32_t *pos, size_t T, int n_heads, int hd,
                      float theta) {
    rope_apply(dx, ldx, pos, T, n_heads, hd, theta, -1.0f);
}

/* ------------------------------------------------------------------------ */
/* SwiGLU                                                                    */
/* ------------------------------------------------------------------------ */

void pf_swiglu_forward(float *out, const float *gate, const float *up, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

/* out = silu(g) u, silu(g) = g s, s = sigmoid(g), silu'(g) = s (1 + g (1 - s)):
 *   dg += dout * u * s (1 + g (1 - s)),  du += dout * g s. */
void pf_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                        const float *up, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float g = gate[i];
        float s = 1.0f / (1.0f + expf(-g));
        dgate[i] += dout[i] * up[i] * s * (1.0f + g * (1.0f - s));
        dup[i] += dout[i] * g * s;
    }
}

/* ------------------------------------------------------------------------ */
/* Attention                                                                 */
/* ------------------------------------------------------------------------ */

/* S[nq, nk] = scale * q_h [nq, hd] @ [k1_h; k2_h]^T  (two gemms into the column ranges). */
static void attn_scores(float *S, const float *qh, int ldq, int nq, const float *k1h,
                        const float *k2h, int n1, int n2, int ldk, int hd, float scale) {
    int nk = n1 + n2;
    if (n1 > 0) pf_gemm(0, 1, nq, n1, hd, scale, qh, ldq, k1h, ldk, 0.0f, S, nk);
    if (n2 > 0) pf_gemm(0, 1, nq, n2, hd, scale, qh, ldq, k2h, ldk, 0.0f, S + n1, nk);
}

static void attn_tile_forward(float *out, float *lse, const float *q, int nq, const float *k1,
                              const float *v1, int n1, const float *k2, const float *v2, int n2,
                              int H, int KVH, int hd, float *S) {
    int nk = n1 + n2, off = nk - nq, group = H / KVH;
    int ldq = H * hd, ldk = KVH * hd;
    float scale = (float)(1.0 / sqrt((double)hd));
    for (int h = 0; h < H; h++) {
        int kh = h / group;
        const float *qh = q + (size_t)h * hd;
        const float *k1h = k1 + (size_t)kh * hd, *v1h = v1 + (size_t)kh * hd;
        const float *k2h = n2 > 0 ? k2 + (size_t)kh * hd : NULL;
        const float *v2h = n2 > 0 ? v2 + (size_t)kh * hd : NULL;
        attn_scores(S, qh, ldq, nq, k1h, k2h, n1, n2, ldk, hd, scale);
        for (int i = 0; i < nq; i++) {
            float *Si = S + (size_t)i * nk; /* [nk] */
            int lim = i + off;               /* keys 0..lim visible */
            float mx = Si[0];
            for (int j = 1; j <= lim; j++) mx = Si[j] > mx ? Si[j] : mx;
            double sum = 0.0;
            for (int j = 0; j <= lim; j++) {
                float e = expf(Si[j] - mx);
                Si[j] = e;
                sum += e;
            }
            float inv = (float)(1.0 / sum);
            for (int j = 0; j <= lim; j++) Si[j] *= inv;
            for (int j = lim + 1; j < nk; j++) Si[j] = 0.0f;
            lse[(size_t)i * H + h] = mx + (float)log(sum);
        }
        /* out_h [nq, hd] = P [nq, nk] @ [v1_h; v2_h] */
        float *oh = out + (size_t)h * hd;
        pf_gemm(0, 0, nq, hd, n1, 1.0f, S, nk, v1h, ldk, 0.0f, oh, ldq);
        if (n2 > 0) pf_gemm(0, 0, nq, hd, n2, 1.0f, S + n1, nk, v2h, ldk, 1.0f, oh, ldq);
    }
}

/* S = scale q k^T, P = softmax_rows(S) (masked), O = P V. Per head:
 *   dV  += P^T dO                      [nk, hd]
 *   dP   = dO V^T                      [nq, nk]
 *   dS   = P * (dP - D),  D_i = sum_j P_ij dP_ij = dO_i . O_i
 *   dQ  += scale dS K,   dK += scale dS^T Q.
 * GQA: the query heads of one group all accumulate into the same kv head. */
static void attn_tile_backward(float *dq, float *dk1, float *dv1, float *dk2, float *dv2,
                               const float *dout, const float *out, const float *lse,
                               const float *q, int nq, const float *k1, const float *v1, int n1,
                               const float *k2, const float *v2, int n2, int H, int KVH, int hd,
                               float *P, float *dP) {
    int nk = n1 + n2, off = nk - nq, group = H / KVH;
    int ldq = H * hd, ldk = KVH * hd;
    float scale = (float)(1.0 / sqrt((double)hd));
    for (int h = 0; h < H; h++) {
        int kh = h / group;
        size_t qo = (size_t)h * hd, ko = (size_t)kh * hd;
        const float *k2h = n2 > 0 ? k2 + ko : NULL;
        attn_scores(P, q + qo, ldq, nq, k1 + ko, k2h, n1, n2, ldk, hd, scale);
        for (int i = 0; i < nq; i++) {
            float *Pi = P + (size_t)i * nk;
            int lim = i + off;
            float l = lse[(size_t)i * H + h];
            for (int j = 0; j <= lim; j++) Pi[j] = expf(Pi[j] - l);
            for (int j = lim + 1; j < nk; j++) Pi[j] = 0.0f;
        }
        const float *doh = dout + qo, *oh = out + qo;
        /* dP [nq, nk] = dO_h [nq, hd] @ [v1_h; v2_h]^T */
        if (n1 > 0) pf_gemm(0, 1, nq, n1, hd, 1.0f, doh, ldq, v1 + ko, ldk, 0.0f, dP, nk);
        if (n2 > 0) pf_gemm(0, 1, nq, n2, hd, 1.0f, doh, ldq, v2 + ko, ldk, 0.0f, dP + n1, nk);
        /* dV [n, hd] += P[:, range]^T @ dO_h */
        if (n1 > 0) pf_gemm(1, 0, n1, hd, nq, 1.0f, P, nk, doh, ldq, 1.0f, dv1 + ko, ldk);
        if (n2 > 0) pf_gemm(1, 0, n2, hd, nq, 1.0f, P + n1, nk, doh, ldq, 1.0f, dv2 + ko, ldk);
        for (int i = 0; i < nq; i++) {
            const float *doi = doh + (size_t)i * ldq, *oi = oh + (size_t)i * ldq;
            double d = 0.0;
            for (int c = 0; c < hd; c++) d += (double)doi[c] * oi[c];
            float Di = (float)d;
            float *Pi = P + (size_t)i * nk, *dPi = dP + (size_t)i * nk;
            int lim = i + off;
            for (int j = 0; j <= lim; j++) dPi[j] = Pi[j] * (dPi[j] - Di); /* dS */
            for (int j = lim + 1; j < nk; j++) dPi[j] = 0.0f;
        }
        /* dQ_h [nq, hd] += scale dS @ [k1_h; k2_h] */
        if (n1 > 0) pf_gemm(0, 0, nq, hd, n1, scale, dP, nk, k1 + ko, ldk, 1.0f, dq + qo, ldq);
        if (n2 > 0) pf_gemm(0, 0, nq, hd, n2, scale, dP + n1, nk, k2 + ko, ldk, 1.0f, dq + qo, ldq);
        /* dK [n, hd] += scale dS[:, range]^T @ q_h */
        if (n1 > 0) pf_gemm(1, 0, n1, hd, nq, scale, dP, nk, q + qo, ldq, 1.0f, dk1 + ko, ldk);
        if (n2 > 0) pf_gemm(1, 0, n2, hd, nq, scale, dP + n1, nk, q + qo, ldq, 1.0f, dk2 + ko, ldk);
    }
}

/* Causal blocks are processed in tiles of ATTN_TILE query rows: tile [i0, i1)
 * only needs the first min(nk, i1 + nk - nq) keys, and with those keys the
 * tile's own offset nk_t - nq_t equals i0 + nk - nq, so the tile functions
 * above apply the same mask; the masked upper triangle beyond each tile is
 * never computed. Backward accumulates (+=) tile by tile. */
#define ATTN_TILE 64

void pf_attn_block_forward(float *out, float *lse, const float *q, int nq, const float *k1,
                           const float *v1, int n1, const float *k2, const float *v2, int n2,
                           int H, int KVH, int hd, float *S) {
    int nk = n1 + n2, off = nk - nq;
    size_t ldq = (size_t)H * hd;
    for (int i0 = 0; i0 < nq; i0 += ATTN_TILE) {
        int nq_t = nq - i0 < ATTN_TILE ? nq - i0 : ATTN_TILE;
        int nk_t = i0 + nq_t + off < nk ? i0 + nq_t + off : nk;
        int n1_t = nk_t < n1 ? nk_t : n1, n2_t = nk_t - n1_t;
        attn_tile_forward(out + (size_t)i0 * ldq, lse + (size_t)i0 * H, q + (size_t)i0 * ldq, nq_t,
                          k1, v1, n1_t, k2, v2, n2_t, H, KVH, hd, S);
    }
}

void pf_attn_block_backward(float *dq, float *dk1, float *dv1, float *dk2, float *dv2,
                            const float *dout, const float *out, const float *lse, const float *q,
                            int nq, const float *k1, const float *v1, int n1, const float *k2,
                            const float *v2, int n2, int H, int KVH, int hd, float *P, float *dP) {
    int nk = n1 + n2, off = nk - nq;
    size_t ldq = (size_t)H * hd;
    for (int i0 = 0; i0 < nq; i0 += ATTN_TILE) {
        int nq_t = nq - i0 < ATTN_TILE ? nq - i0 : ATTN_TILE;
        int nk_t = i0 + nq_t + off < nk ? i0 + nq_t + off : nk;
        int n1_t = nk_t < n1 ? nk_t : n1, n2_t = nk_t - n1_t;
        size_t r = (size_t)i0 * ldq;
        attn_tile_backward(dq + r, dk1, dv1, dk2, dv2, dout + r, out + r, lse + (size_t)i0 * H,
                           q + r, nq_t, k1, v1, n1_t, k2, v2, n2_t, H, KVH, hd, P, dP);
    }
}

size_t pf_attn_scratch(const int32_t *seg, int P) {
    size_t mx = 1;
    for (int p = 0; p < P; p++) {
        size_t lp = (size_t)seg[3 * p], lc = (size_t)seg[3 * p + 1], lr = (size_t)seg[3 * p + 2];
        size_t a = (lp + lc) * (lp + lc), b = lr * (lp + lr);
        if (a > mx) mx = a;
        if (b > mx) mx = b;
    }
    return mx;
}

void pf_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                          const int32_t *seg, int P, int H, int KVH, int hd, float *S) {
    /* per-head GEMMs are small: run them on this thread only (restored below) */
    int prev_threads = pf_blas_single_thread_begin();
    size_t ldq = (size_t)H * hd, ldk = (size_t)KVH * hd, t0 = 0;
    for (int p = 0; p < P; p++) {
        int lp = seg[3 * p], lc = seg[3 * p + 1], lr = seg[3 * p + 2];
        int n = lp + lc; /* [prompt | chosen] attends causally to itself */
        pf_attn_block_forward(out + t0 * ldq, lse + t0 * H, q + t0 * ldq, n, k + t0 * ldk,
                              v + t0 * ldk, n, NULL, NULL, 0, H, KVH, hd, S);
        if (lr > 0) { /* rejected: the prompt, then itself causally */
            size_t tr = t0 + (size_t)n;
            pf_attn_block_forward(out + tr * ldq, lse + tr * H, q + tr * ldq, lr, k + t0 * ldk,
                                  v + t0 * ldk, lp, k + tr * ldk, v + tr * ldk, lr, H, KVH, hd, S);
        }
        t0 += (size_t)n + (size_t)lr;
    }
    pf_blas_single_thread_end(prev_threads);
}

void pf_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                           const float *lse, const float *q, const float *k, const float *v,
                           const int32_t *seg, int P, int H, int KVH, int hd, float *S, float *dP) {
    /* per-head GEMMs are small: run them on this thread only (restored below) */
    int prev_threads = pf_blas_single_thread_begin();
    size_t ldq = (size_t)H * hd, ldk = (size_t)KVH * hd, t0 = 0;
    for (int p = 0; p < P; p++) {
        int lp = seg[3 * p], lc = seg[3 * p + 1], lr = seg[3 * p + 2];
        int n = lp + lc;
        pf_attn_block_backward(dq + t0 * ldq, dk + t0 * ldk, dv + t0 * ldk, NULL, NULL,
                               dout + t0 * ldq, out + t0 * ldq, lse + t0 * H, q + t0 * ldq, n,
                               k + t0 * ldk, v + t0 * ldk, n, NULL, NULL, 0, H, KVH, hd, S, dP);
        if (lr > 0) {
            size_t tr = t0 + (size_t)n;
            pf_attn_block_backward(dq + tr * ldq, dk + t0 * ldk, dv + t0 * ldk, dk + tr * ldk,
                                   dv + tr * ldk, dout + tr * ldq, out + tr * ldq, lse + tr * H,
                                   q + tr * ldq, lr, k + t0 * ldk, v + t0 * ldk, lp, k + tr * ldk,
                                   v + tr * ldk, lr, H, KVH, hd, S, dP);
        }
        t0 += (size_t)n + (size_t)lr;
    }
    pf_blas_single_thread_end(prev_threads);
}

/* ------------------------------------------------------------------------ */
/* LM head + log-softmax + gather                                            */
/* ------------------------------------------------------------------------ */

size_t pf_head_scratch(int chunk, int D, int V) { return (size_t)chunk * ((size_t)D + (size_t)V); }

/* Z [c, V] = X [c, D] @ W^T for the rows of one chunk (gathered into X). */
static void head_logits(float *X, float *Z, const float *x, int D, const int32_t *rows, size_t c,
                        const float *W, int V) {
    for (size_t i = 0; i < c; i++)
        memcpy(X + i * (size_t)D, x + (size_t)rows[i] * D, sizeof(float) * (size_t)D);
    pf_gemm(0, 1, (int)c, V, D, 1.0f, X, D, W, D, 0.0f, Z, V);
}

static double row_lse(const float *z, int V) {
    float mx = z[0];
    for (int j = 1; j < V; j++) mx = z[j] > mx ? z[j] : mx;
    double s = 0.0;
    for (int j = 0; j < V; j++) s += (double)expf(z[j] - mx);
    return (double)mx + log(s);
}

void pf_head_logp_forward(double *logp, const float *x, int D, const int32_t *rows,
                          const int32_t *targets, size_t n, const float *W, int V, float *buf,
                          int chunk) {
    float *X = buf, *Z = buf + (size_t)chunk * D;
    for (size_t s = 0; s < n; s += (size_t)chunk) {
        size_t c = n - s < (size_t)chunk ? n - s : (size_t)chunk;
        head_logits(X, Z, x, D, rows + s, c, W, V);
        for (size_t i = 0; i < c; i++) {
            const float *z = Z + i * (size_t)V;
            logp[s + i] = (double)z[targets[s + i]] - row_lse(z, V);
        }
    }
}

/* logp = z_t - lse(z), z = W x:  dz_j = dlogp (1[j = t] - softmax_j),
 * dx += W^T dz  (rows of one chunk as dX [c, D] = dZ [c, V] @ W [V, D], then
 * scattered back; a row that predicts two targets receives both). */
void pf_head_logp_backward(float *dx, const float *dlogp, const float *x, int D,
                           const int32_t *rows, const int32_t *targets, size_t n, const float *W,
                           int V, float *buf, int chunk) {
    float *X = buf, *Z = buf + (size_t)chunk * D;
    for (size_t s = 0; s < n; s += (size_t)chunk) {
        size_t c = n - s < (size_t)chunk ? n - s : (size_t)chunk;
        head_logits(X, Z, x, D, rows + s, c, W, V);
        for (size_t i = 0; i < c; i++) {
            float *z = Z + i * (size_t)V;
            float l = (float)row_lse(z, V);
            float g = dlogp[s + i];
            for (int j = 0; j < V; j++) z[j] = -g * expf(z[j] - l);
            z[targets[s + i]] += g;
        }
        pf_gemm(0, 0, (int)c, D, V, 1.0f, Z, V, W, D, 0.0f, X, D);
        for (size_t i = 0; i < c; i++) {
            float *dxr = dx + (size_t)rows[s + i] * D;
            const float *Xi = X + i * (size_t)D;
            for (int j = 0; j < D; j++) dxr[j] += Xi[j];
        }
    }
}
