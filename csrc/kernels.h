/* kernels.h: the decoder's building blocks (design.md section 3), each
 * _forward beside its _backward. Row-major float32 token matrices [T, width].
 * Backward functions ACCUMULATE (+=) into their gradient outputs unless the
 * comment says "in place". Nothing here allocates; scratch is passed in. */
#ifndef PF_KERNELS_H
#define PF_KERNELS_H
#include <stddef.h>
#include <stdint.h>

/* ---- RMSNorm ------------------------------------------------------------
 * out[T,D] = x * rstd * g,  rstd[T] = 1/sqrt(mean_j x_j^2 + eps) (written). */
void pf_rmsnorm_forward(float *out, float *rstd, const float *x, const float *g, size_t T, int D,
                        float eps);
/* dx[T,D] += d out/d x ^T dout   (g is frozen: no dg). */
void pf_rmsnorm_backward(float *dx, const float *dout, const float *x, const float *g,
                         const float *rstd, size_t T, int D);

/* ---- RoPE, half-split ("rotate_half") layout -----------------------------
 * x[T, ldx] holds n_heads heads of width hd at columns h*hd; row t is rotated
 * at position pos[t]: for i < hd/2, f_i = theta^(-2i/hd), angle = pos*f_i,
 *   (x_i, x_{i+hd/2}) <- (x_i c - x_{i+hd/2} s, x_{i+hd/2} c + x_i s).
 * In place. hd must be even and <= PF_ROPE_MAX_HD. */
#define PF_ROPE_MAX_HD 1024
void pf_rope_forward(float *x, int ldx, const int32_t *pos, size_t T, int n_heads, int hd,
                     float theta);
/* In place: dx <- R(pos)^T dx (the inverse rotation). */
void pf_rope_backward(float *dx, int ldx, const int32_t *pos, size_t T, int n_heads, int hd,
                      float theta);

/* ---- SwiGLU: out[n] = silu(gate) * up ------------------------------------ */
void pf_swiglu_forward(float *out, const float *gate, const float *up, size_t n);
void pf_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                        const float *up, size_t n);

/* ---- Causal GQA attention on one block of queries ------------------------
 * Queries: nq rows of q (row stride H*hd). Keys/values: the concatenation of
 * two row ranges (k1,v1: n1 rows; k2,v2: n2 rows, n2 may be 0), row stride
 * KVH*hd. With nk = n1 + n2 >= nq, query i sees key j iff j <= i + nk - nq.
 * Query head h uses kv head h / (H/KVH); scale 1/sqrt(hd).
 *   out [nq, H*hd] (written), lse [nq, H] (written: log-sum-exp of the scaled
 *   scores, kept for backward), S scratch [nq * nk]. */
void pf_attn_block_forward(float *out, float *lse, const float *q, int nq, const float *k1,
                           const float *v1, int n1, const float *k2, const float *v2, int n2,
                           int H, int KVH, int hd, float *S);
/* Accumulates dq [nq, H*hd], dk1/dv1 [n1, KVH*hd], dk2/dv2 [n2, KVH*hd] from
 * dout. Recomputes the probabilities from q, k and lse. P, dP scratch [nq*nk]. */
void pf_attn_block_backward(float *dq, float *dk1, float *dv1, float *dk2, float *dv2,
                            const float *dout, const float *out, const float *lse, const float *q,
                            int nq, const float *k1, const float *v1, int n1, const float *k2,
                            const float *v2, int n2, int H, int KVH, int hd, float *P, float *dP);

/* Packed prefix-shared layout (csrc/README.md): seg[P,3] = (prompt, chosen,
 * rejected) lengths, pairs back to back in q/k/v rows. Per pair two blocks:
 * [prompt|chosen] causally on itself, and [rejected] on prompt + earlier
 * rejected. S (and dP) scratch: pf_attn_scratch(seg, P) floats each. */
size_t pf_attn_scratch(const int32_t *seg, int P);
void pf_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                          const int32_t *seg, int P, int H, int KVH, int hd, float *S);
void pf_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                           const float *lse, const float *q, const float *k, const float *v,
                           const int32_t *seg, int P, int H, int KVH, int hd, float *S, float *dP);

/* ---- LM head fused with log-softmax and gather ---------------------------
 * For i < n: logp[i] = z[targets[i]] - logsumexp(z),  z = W x[rows[i]]  (W [V,D]).
 * Works through `chunk` positions at a time, so only [chunk, V] logits exist.
 * buf scratch: pf_head_scratch(chunk, D, V) floats. rows/targets are trusted
 * (the caller validated them). */
size_t pf_head_scratch(int chunk, int D, int V);
void pf_head_logp_forward(double *logp, const float *x, int D, const int32_t *rows,
                          const int32_t *targets, size_t n, const float *W, int V, float *buf,
                          int chunk);
/* dx[rows[i]] += d logp[i]/d x * dlogp[i] (recomputes the logits chunk by chunk). */
void pf_head_logp_backward(float *dx, const float *dlogp, const float *x, int D,
                           const int32_t *rows, const int32_t *targets, size_t n, const float *W,
                           int V, float *buf, int chunk);
#endif
