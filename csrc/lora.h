/* lora.h: LoRA adapters with PEFT's conventions (design.md section 6).
 *
 * For an adapted linear W [out, in]:  y = W x + scale * B (A dropout(x)),
 * A [rank, in], B [out, rank], scale = alpha/rank (alpha/sqrt(rank) with rsLoRA).
 * Init: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a = sqrt(5)), B = 0.
 *
 * Storage: one arena per family (params, grads, Adam m, Adam v), identical
 * layouts; per (layer, target) the A block then the B block, layers in order,
 * targets in pf_lora_target order. Untargeted modules have no storage.
 *
 * Dropout: the keep-mask of element (row, col) of x for (layer, target) is
 * regenerated from pf_rng_u01(dropout_seed, stream(layer, target), row*in+col),
 * so backward reproduces forward's mask without storing it. dropout_seed == 0
 * or dropout == 0 means no dropout (reference and eval passes).
 */
#ifndef PF_LORA_H
#define PF_LORA_H
#include <stddef.h>
#include <stdint.h>

#include "common.h"

enum { PF_LORA_Q = 0, PF_LORA_K, PF_LORA_V, PF_LORA_O, PF_LORA_GATE, PF_LORA_UP, PF_LORA_DOWN,
       PF_LORA_NT };

/* PEFT module names, index = target id. */
extern const char *const pf_lora_target_names[PF_LORA_NT];

typedef struct {
    int n_layers;
    int rank;
    unsigned target_mask;   /* bit t set: target t is adapted in every layer */
    float alpha;
    float scale;            /* alpha/rank, or alpha/sqrt(rank) with rslora */
    int rslora;
    float dropout;          /* probability of zeroing an input element in training */
    int in_dim[PF_LORA_NT]; /* input width of each target linear */
    int out_dim[PF_LORA_NT];/* output width of each target linear */
    size_t n_params;        /* floats in each arena */
    size_t *off_a;          /* [n_layers * PF_LORA_NT] offset of A, SIZE_MAX if not targeted */
    size_t *off_b;          /* same for B */
    float *params;          /* arena [n_params]: A and B blocks */
    float *grads;           /* arena [n_params], same layout */
    float *adam_m;          /* arena [n_params] */
    float *adam_v;          /* arena [n_params] */
} pf_lora;

/* Allocates all four arenas (zeroed) and the offset tables. */
int pf_lora_create(pf_lora *l, int n_layers, const int in_dim[PF_LORA_NT],
                   const int out_dim[PF_LORA_NT], int rank, float alpha, int rslora,
                   float dropout, unsigned target_mask, pf_status *st);
void pf_lora_free(pf_lora *l);
/* A ~ U(-1/sqrt(in), 1/sqrt(in)) from pf_rng(seed, ...), B = 0; grads and moments zeroed. */
void pf_lora_init_weights(pf_lora *l, uint64_t seed);

static inline int pf_lora_has(const pf_lora *l, int t) {
    return l && l->rank > 0 && (l->target_mask >> t) & 1u;
}
/* Pointers into an arena (params, grads, adam_m or adam_v) for (layer, target). */
static inline float *pf_lora_a(const pf_lora *l, float *arena, int layer, int t) {
    return arena + l->off_a[(size_t)layer * PF_LORA_NT + t];
}
static inline float *pf_lora_b(const pf_lora *l, float *arena, int layer, int t) {
    return arena + l->off_b[(size_t)layer * PF_LORA_NT + t];
}

/* Forward of the adapter branch of one linear, added onto the base output:
 *   x  [T, in]          input of the linear
 *   y  [T, out]         base output; y += scale * (drop(x) A^T) B^T
 *   xa [T, rank]        written: drop(x) A^T, keep it for backward
 *   xd [T, in] scratch  used for drop(x) when dropout is active, else may be NULL
 * dropout_seed == 0: no dropout. */
void pf_lora_forward(const pf_lora *l, int layer, int t, const float *x, int T, float *y,
                     float *xa, float *xd, uint64_t dropout_seed);
/* Backward of the same branch, given dy [T, out]:
 *   grads: dB += scale * dy^T xa ;  dA += scale * (dy B)^T drop(x)
 *   dx [T, in] (may be NULL): dx += mask/(1-p) * (scale * dy B) A
 *   tmp [T, rank] scratch, xd [T, in] scratch as in forward. */
void pf_lora_backward(const pf_lora *l, int layer, int t, const float *x, int T, const float *xa,
                      const float *dy, float *dx, float *tmp, float *xd, uint64_t dropout_seed);
/* W [out, in] += scale * B A  (merge into base weights). */
void pf_lora_merge(const pf_lora *l, int layer, int t, float *W);
#endif
