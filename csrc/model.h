/* model.h: LLaMA-family decoder (design.md section 3): config, one arena of
 * float32 base weights, forward over a packed prefix-shared batch, backward to
 * the LoRA parameters, scoring, one training micro-step and greedy generation.
 *
 * Packed batch (csrc/README.md): tokens [N] = pairs back to back as
 * [prompt | chosen | rejected]; seg [P,3] = (prompt_len >= 1, chosen_len >= 0,
 * rejected_len >= 0). Chosen tokens see the prompt and earlier chosen tokens,
 * rejected tokens the prompt and earlier rejected tokens; positions of both
 * completions continue from the prompt.
 *
 * Activation memory of train_step, in floats (4 bytes), for T packed tokens,
 * n scored completion tokens, L layers, widths D (hidden), F (MLP), Q = H*hd,
 * K = KVH*hd, LoRA rank r on nt targets, M = max(D, F, Q), S = max over pairs
 * of max((lp+lc)^2, lr*(lp+lr)), head chunk c = 64 positions, vocab V:
 *
 *   (L+1)*T*D                          residual-stream input of every layer (stored)
 * + T*(7D + 4Q + 4K + 6F + H + 4)      one layer's activations + their gradients,
 *                                      final norm, positions
 * + T*r*(nt + 1) [+ T*M with dropout]  LoRA x A^T per target, backward tmp, dropout scratch
 * + 2*S                                attention probabilities / their gradient, one
 *                                      (pair, block, head) at a time
 * + c*(D + V)                          head logits, one chunk at a time
 * + 5n + 8P                           scoring index, per-token log-probs and their grads,
 *                                      per-completion and per-prompt sums and coefficients
 * + n_lora_params                      this step's LoRA gradients (added to the arena
 *                                      only if all finite)
 *
 * + (k-1)*(T*(3D + 2Q + 2K + 3F + H + 2) + T*r*nt)
 *                                      activations of the k top layers kept for backward
 *
 * k = as many layers as fit in pf_model.act_budget (Model.activation_budget,
 * default 512 MiB), at least 1 (the top layer's activations are in place when
 * backward starts). The other L-k layers are recomputed in backward from their
 * stored inputs (one extra layer forward each). Nothing of size T*V is kept.
 * The example below is k = 1 (budget 0).
 * Example: SmolLM2-135M (L=30, D=576, F=1536, Q=576, K=192, H=9, V=49152),
 * 8 pairs of 100+60+60 tokens (T=1760, n=960), r=16 on all 7 targets:
 * 31*T*D = 31.4M + T*16333 = 28.7M + T*128 = 0.23M + 2*25600 + 3.2M + 4.8k + 4.9M
 * = about 68.5M floats = 274 MB. score() needs neither the (L+1)*T*D store
 * nor the gradient buffers: T*(5D + 2Q + 2K + 3F + H + 4) + T*r*nt + S + c*(D+V) + 4n.
 * pf_model_work_floats() returns the exact figure (plus 64-byte alignment per buffer). */
#ifndef PF_MODEL_H
#define PF_MODEL_H
#include <stddef.h>
#include <stdint.h>

#include "common.h"
#include "lora.h"
#include "loss.h"

#define PF_DEFAULT_ACT_BUDGET ((size_t)512 << 20) /* bytes, see pf_model.act_budget */

typedef struct {
    int vocab, dim, ffn, n_layers, n_heads, n_kv_heads, head_dim;
    float eps, theta;
    int tied;      /* LM head = embedding */
    int attn_bias; /* q/k/v biases (qwen2) */
} pf_config;

typedef struct {
    float *ln1;          /* [D] input_layernorm */
    float *wq, *wk, *wv; /* [Q,D] [K,D] [K,D] */
    float *bq, *bk, *bv; /* [Q] [K] [K] or NULL */
    float *wo;           /* [D,Q] */
    float *ln2;          /* [D] post_attention_layernorm */
    float *wg, *wu;      /* [F,D] */
    float *wd;           /* [D,F] */
} pf_layer_weights;

typedef struct {
    pf_config c;
    float *arena;        /* all base weights, float32 */
    size_t n_floats;
    float *embed;        /* [V,D] */
    float *norm;         /* [D] */
    float *head;         /* [V,D] (== embed when tied) */
    pf_layer_weights *layers; /* [n_layers] */
    pf_lora lora;        /* rank 0: no adapter */
    long adam_step;
    size_t act_budget;   /* train_step keeps the activations of as many top layers as fit
                            in this many bytes of work arena (at least 1); the rest are
                            recomputed in backward. 0: recompute all but the top layer. */
} pf_model;

/* Validates the config and allocates the (zeroed) weight arena. */
int pf_model_create(pf_model *m, const pf_config *c, pf_status *st);
void pf_model_free(pf_model *m);

/* Enumerates the base weights: i-th tensor's HF name, pointer into the arena
 * and shape (ndim 1 or 2). Returns 0 when i is out of range. */
size_t pf_model_n_tensors(const pf_model *m);
int pf_model_tensor(const pf_model *m, size_t i, char *name, size_t cap, float **ptr, int *ndim,
                    size_t shape[2]);

/* LoRA target geometry: in/out widths of q,k,v,o,gate,up,down. */
void pf_model_lora_dims(const pf_model *m, int in_dim[PF_LORA_NT], int out_dim[PF_LORA_NT]);

/* Checks a packed batch: lengths >= 0, prompt_len >= 1, sum == n_tokens, ids in range. */
int pf_batch_check(const pf_model *m, const int32_t *tokens, size_t n_tokens, const int32_t *seg,
                   int P, pf_status *st);
/* Number of scored completion tokens (sum of chosen_len + rejected_len). */
size_t pf_batch_n_completion(const int32_t *seg, int P);
/* Work floats a call needs (see the formula above); train = 1 for train_step. */
size_t pf_model_work_floats(const pf_model *m, const int32_t *seg, int P, size_t n_tokens,
                            int train);

/* Completion log-prob sums logp [P,2] (double), counts n [P,2], and if
 * per_token != NULL the per-token log-probs [n_completion] (pair by pair,
 * chosen then rejected). use_lora = 0: base model. No dropout. */
int pf_model_score(pf_model *m, const int32_t *tokens, size_t n_tokens, const int32_t *seg, int P,
                   int use_lora, double *logp, int32_t *n, float *per_token, pf_status *st);

/* Test helper: the full logits [n_completion, V] at the positions that predict
 * completion tokens (same order as score's per_token). Holds n*V floats: for
 * tests and small batches only. */
int pf_model_completion_logits(pf_model *m, const int32_t *tokens, size_t n_tokens,
                               const int32_t *seg, int P, int use_lora, float *logits,
                               pf_status *st);

typedef struct {
    double *logp;   /* [P,2] */
    int32_t *n;     /* [P,2] */
    double *loss;   /* [P] */
    double *reward; /* [P,2] */
    double *nll, *log_odds, *log_sig_odds; /* [P] */
} pf_train_out;

/* Forward with the adapter (dropout from dropout_seed, 0 = none), objective per
 * pair against ref [P,2], backward; ACCUMULATES weight * d(sum_p loss_p)/dLoRA
 * into the LoRA grad arena (only if every gradient is finite, else
 * PF_ENONFINITE and the arena is untouched). Requires an adapter and
 * chosen_len, rejected_len >= 1 for every pair. nll_with_prompt (ORPO only):
 * the NLL term is the mean over prompt tokens 1..lp-1 and the chosen tokens
 * (TRL's ORPOTrainer), instead of the chosen tokens only; the head then also
 * runs over the prompt positions (n grows by sum(lp - 1) in the memory formula). */
int pf_model_train_step(pf_model *m, const int32_t *tokens, size_t n_tokens, const int32_t *seg,
                        int P, const double *ref, const pf_objective *obj, double weight,
                        uint64_t dropout_seed, int nll_with_prompt, pf_train_out *out,
                        pf_status *st);

/* Same forward/backward as train_step with given coefficients instead of an
 * objective: ACCUMULATES d(sum_p coef[p,0]*Lc_p + coef[p,1]*Lr_p)/dLoRA into the
 * grad arena (any layout, empty completions allowed). logp, n [P,2] written. */
int pf_model_logp_backward(pf_model *m, const int32_t *tokens, size_t n_tokens, const int32_t *seg,
                           int P, const double *coef, uint64_t dropout_seed, double *logp,
                           int32_t *n, pf_status *st);

/* Greedy decoding with a KV cache. Writes up to max_new ids into out and their
 * count into n_out; stops after emitting a token in stop[n_stop]. */
int pf_model_generate(pf_model *m, const int32_t *prompt, size_t n_prompt, int max_new,
                      const int32_t *stop, int n_stop, int use_lora, int32_t *out, int *n_out,
                      pf_status *st);
#endif
