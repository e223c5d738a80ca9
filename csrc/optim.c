/* optim.c: AdamW with torch.optim.AdamW semantics, LR schedules as
 * transformers.get_scheduler, sum of squares for global-norm clipping. */
#include "optim.h"

#include <math.h>
#include <string.h>

double pf_sumsq(const float *g, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)g[i] * (double)g[i];
    return s;
}

int pf_adamw_check(const pf_adamw *h, long step, pf_status *st) {
    if (!(isfinite(h->lr) && h->lr >= 0)) return pf_fail(st, PF_EINVAL, "AdamW: lr must be finite and >= 0, got %g", h->lr);
    if (!(h->beta1 >= 0 && h->beta1 < 1)) return pf_fail(st, PF_EINVAL, "AdamW: beta1 must be in [0, 1), got %g", h->beta1);
    if (!(h->beta2 >= 0 && h->beta2 < 1)) return pf_fail(st, PF_EINVAL, "AdamW: beta2 must be in [0, 1), got %g", h->beta2);
    if (!(isfinite(h->eps) && h->eps > 0)) return pf_fail(st, PF_EINVAL, "AdamW: eps must be finite and > 0, got %g", h->eps);
    if (!(isfinite(h->weight_decay) && h->weight_decay >= 0))
        return pf_fail(st, PF_EINVAL, "AdamW: weight_decay must be finite and >= 0, got %g", h->weight_decay);
    if (step < 1) return pf_fail(st, PF_EINVAL, "AdamW: step is 1-based, got %ld", step);
    return PF_OK;
}

/* torch.optim.AdamW (single-tensor path), per element, float32 state:
 *   p  *= 1 - lr*wd                        decoupled weight decay
 *   m  += (1-b1) (g - m)                   (lerp)
 *   v   = b2 v + (1-b2) g^2
 *   p  -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
 * with g = grad_scale * grad (clip_grad_norm_ scales the gradient first). */
void pf_adamw_update(float *p, const float *g, float *m, float *v, size_t n, const pf_adamw *h,
                     long step, double grad_scale) {
    const double bc1 = 1.0 - pow(h->beta1, (double)step);
    const double bc2 = 1.0 - pow(h->beta2, (double)step);
    const float decay = (float)(1.0 - h->lr * h->weight_decay);
    const float w1 = (float)(1.0 - h->beta1), b2 = (float)h->beta2, w2 = (float)(1.0 - h->beta2);
    const float step_size = (float)(h->lr / bc1);
    const float bc2_sqrt = (float)sqrt(bc2);
    const float eps = (float)h->eps, gs = (float)grad_scale;
    for (size_t i = 0; i < n; i++) {
        const float gi = g[i] * gs;
        float pi = p[i] * decay;
        const float mi = m[i] + w1 * (gi - m[i]);
        const float vi = v[i] * b2 + w2 * gi * gi;
        const float denom = sqrtf(vi) / bc2_sqrt + eps;
        pi -= step_size * (mi / denom);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
    }
}

int pf_sched_kind(const char *name) {
    if (!name) return -1;
    if (strcmp(name, "constant") == 0 || strcmp(name, "constant_with_warmup") == 0) return PF_SCHED_CONSTANT;
    if (strcmp(name, "linear") == 0) return PF_SCHED_LINEAR;
    if (strcmp(name, "cosine") == 0) return PF_SCHED_COSINE;
    return -1;
}

/* transformers' lr lambdas at `step` completed updates (LambdaLR multiplies
 * base_lr by lambda(step) for the next update):
 *   warmup (step < W):  step / max(1, W)
 *   constant:           1
 *   linear:             max(0, (total - step) / max(1, total - W))
 *   cosine (0.5 cycle): max(0, 0.5 (1 + cos(pi * progress))), progress = (step - W)/max(1, total - W) */
double pf_lr_at(int kind, double base_lr, long step, long total_steps, long warmup_steps) {
    double f;
    if (step < warmup_steps) {
        f = (double)step / (double)(warmup_steps > 1 ? warmup_steps : 1);
    } else if (kind == PF_SCHED_CONSTANT) {
        f = 1.0;
    } else {
        long span = total_steps - warmup_steps;
        double dspan = (double)(span > 1 ? span : 1);
        if (kind == PF_SCHED_LINEAR) {
            f = fmax(0.0, (double)(total_steps - step) / dspan);
        } else if (kind == PF_SCHED_COSINE) {
            double progress = (double)(step - warmup_steps) / dspan;
            f = fmax(0.0, 0.5 * (1.0 + cos(3.14159265358979323846 * 0.5 * 2.0 * progress)));
        } else {
            return NAN;
        }
    }
    return base_lr * f;
}
