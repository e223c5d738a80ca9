/* optim.h: AdamW (torch.optim.AdamW semantics), LR schedules as in
 * transformers' get_scheduler, global-norm clipping helpers. */
#ifndef PF_OPTIM_H
#define PF_OPTIM_H
#include <stddef.h>

#include "common.h"

enum { PF_SCHED_CONSTANT = 0, PF_SCHED_LINEAR = 1, PF_SCHED_COSINE = 2 };

typedef struct {
    double lr;           /* learning rate for this step (after the schedule) */
    double beta1, beta2; /* 0.9, 0.999 */
    double eps;          /* 1e-8 */
    double weight_decay; /* decoupled, torch semantics: p -= lr * wd * p */
} pf_adamw;

/* Validates hyper-parameters (lr >= 0, betas in [0,1), eps > 0, wd >= 0) and step >= 1. */
int pf_adamw_check(const pf_adamw *h, long step, pf_status *st);
/* "constant" (= "constant_with_warmup"), "linear", "cosine" -> PF_SCHED_*, or -1. */
int pf_sched_kind(const char *name);
/* Sum of squares of g[n], accumulated in double. */
double pf_sumsq(const float *g, size_t n);
/* One AdamW update on n params; step is 1-based (bias correction);
 * grad_scale multiplies g first (clipping: min(1, max_norm/(norm+1e-6))). */
void pf_adamw_update(float *p, const float *g, float *m, float *v, size_t n, const pf_adamw *h,
                     long step, double grad_scale);
/* LR multiplier-applied value for the update made after `step` completed
 * updates (0-based), as transformers' schedulers with num_warmup_steps
 * (so with warmup the first update uses lr 0, as in transformers). NaN for an
 * unknown kind. */
double pf_lr_at(int kind, double base_lr, long step, long total_steps, long warmup_steps);
#endif
