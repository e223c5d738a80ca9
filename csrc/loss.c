/* loss.c: preference objectives on per-sequence numbers (see loss.h,
 * design.md section 7). Everything in double. Each objective is written as
 * value, then its derivative w.r.t. the pair's log-prob sums Lc and Lr.
 *
 * Stable primitives:
 *   softplus(x) = log(1 + e^x)      = max(x, 0) + log1p(e^-|x|)
 *   sigmoid(x)  = 1 / (1 + e^-x)    (branch on the sign, no overflow)
 *   log1mexp(a) = log(1 - e^a), a<0 = log(-expm1(a)) if a > -ln 2 else log1p(-exp(a))
 */
#include "loss.h"

#include <math.h>
#include <string.h>

static const char *const pf_obj_names[PF_OBJ_N] = {"dpo", "ipo", "hinge", "simpo", "orpo"};

int pf_objective_kind(const char *name) {
    if (!name) return -1;
    for (int k = 0; k < PF_OBJ_N; k++)
        if (strcmp(name, pf_obj_names[k]) == 0) return k;
    return -1;
}

const char *pf_objective_name(int kind) {
    return (kind >= 0 && kind < PF_OBJ_N) ? pf_obj_names[kind] : "unknown";
}

#define PF_LN2 0.69314718055994530942

static double softplus(double x) { return fmax(x, 0.0) + log1p(exp(-fabs(x))); }

static double sigmoid(double x) {
    if (x >= 0) return 1.0 / (1.0 + exp(-x));
    double e = exp(x);
    return e / (1.0 + e);
}

static double log1mexp(double a) { /* a < 0 */
    return a > -PF_LN2 ? log(-expm1(a)) : log1p(-exp(a));
}

int pf_objective_check(const pf_objective *o, pf_status *st) {
    if (!o) return pf_fail(st, PF_EINVAL, "objective: missing parameters");
    if (o->kind < 0 || o->kind >= PF_OBJ_N)
        return pf_fail(st, PF_EINVAL, "objective: unknown kind %d (dpo, ipo, hinge, simpo, orpo)", o->kind);
    const char *nm = pf_obj_names[o->kind];
    if (o->kind != PF_OBJ_ORPO && !(isfinite(o->beta) && o->beta > 0))
        return pf_fail(st, PF_EINVAL, "objective %s: beta must be finite and > 0, got %g", nm, o->beta);
    if (!(isfinite(o->label_smoothing) && o->label_smoothing >= 0 && o->label_smoothing < 0.5))
        return pf_fail(st, PF_EINVAL, "objective %s: label_smoothing must be in [0, 0.5), got %g", nm,
                       o->label_smoothing);
    if (o->label_smoothing != 0 && o->kind != PF_OBJ_DPO)
        return pf_fail(st, PF_EINVAL, "objective %s: label_smoothing is only supported by dpo (sigmoid)", nm);
    if (!isfinite(o->gamma))
        return pf_fail(st, PF_EINVAL, "objective %s: gamma must be finite, got %g", nm, o->gamma);
    if (o->gamma != 0 && o->kind != PF_OBJ_SIMPO)
        return pf_fail(st, PF_EINVAL, "objective %s: gamma is a SimPO parameter", nm);
    if (!(isfinite(o->sft_weight) && o->sft_weight >= 0))
        return pf_fail(st, PF_EINVAL, "objective %s: sft_weight must be finite and >= 0, got %g", nm,
                       o->sft_weight);
    if (o->sft_weight != 0 && o->kind != PF_OBJ_SIMPO)
        return pf_fail(st, PF_EINVAL, "objective %s: sft_weight is a SimPO parameter", nm);
    if (!(isfinite(o->lambda) && o->lambda >= 0))
        return pf_fail(st, PF_EINVAL, "objective %s: lambda must be finite and >= 0, got %g", nm, o->lambda);
    return PF_OK;
}

int pf_objective_pair(const pf_objective *o, double Lc, double Lr, double Rc, double Rr, double nc,
                      double nr, pf_pair_loss *out, pf_status *st) {
    memset(out, 0, sizeof *out);
    if (!(isfinite(Lc) && isfinite(Lr) && isfinite(Rc) && isfinite(Rr)))
        return pf_fail(st, PF_ENONFINITE, "objective: non-finite log-prob (Lc %g, Lr %g, Rc %g, Rr %g)",
                       Lc, Lr, Rc, Rr);
    if (!(nc > 0 && nr > 0 && isfinite(nc) && isfinite(nr)))
        return pf_fail(st, PF_EINVAL, "objective: completion token counts must be > 0, got nc %g nr %g", nc, nr);
    const double beta = o->beta;
    switch (o->kind) {
    case PF_OBJ_DPO: {
        /* z = beta ((Lc - Rc) - (Lr - Rr));  loss = (1-e) softplus(-z) + e softplus(z)
         * dloss/dz = -(1-e) sigmoid(-z) + e sigmoid(z); dz/dLc = beta, dz/dLr = -beta */
        const double e = o->label_smoothing;
        const double z = beta * ((Lc - Rc) - (Lr - Rr));
        out->loss = (1 - e) * softplus(-z) + e * softplus(z);
        const double dz = -(1 - e) * sigmoid(-z) + e * sigmoid(z);
        out->dLc = beta * dz;
        out->dLr = -beta * dz;
        out->reward_c = beta * (Lc - Rc);
        out->reward_r = beta * (Lr - Rr);
        break;
    }
    case PF_OBJ_IPO: {
        /* u = (Lc - Rc)/nc - (Lr - Rr)/nr;  loss = (u - 1/(2 beta))^2;  dloss/du = 2 (u - 1/(2 beta)) */
        const double u = (Lc - Rc) / nc - (Lr - Rr) / nr;
        const double d = u - 1.0 / (2.0 * beta);
        out->loss = d * d;
        out->dLc = 2.0 * d / nc;
        out->dLr = -2.0 * d / nr;
        out->reward_c = beta * (Lc - Rc); /* TRL logs beta * log-ratio sums for every DPO loss type */
        out->reward_r = beta * (Lr - Rr);
        break;
    }
    case PF_OBJ_HINGE: {
        /* loss = max(0, 1 - z); dloss/dz = -1 where 1 - z > 0, else 0 (relu'(0) = 0 as torch) */
        const double z = beta * ((Lc - Rc) - (Lr - Rr));
        out->loss = fmax(0.0, 1.0 - z);
        const double dz = (1.0 - z > 0) ? -1.0 : 0.0;
        out->dLc = beta * dz;
        out->dLr = -beta * dz;
        out->reward_c = beta * (Lc - Rc);
        out->reward_r = beta * (Lr - Rr);
        break;
    }
    case PF_OBJ_SIMPO: {
        /* rc = beta Lc/nc, rr = beta Lr/nr, x = rc - rr - gamma;
         * loss = softplus(-x) + w * (-Lc/nc);  dloss/dx = -sigmoid(-x) */
        const double rc = beta * Lc / nc, rr = beta * Lr / nr;
        const double x = rc - rr - o->gamma;
        const double nll = -Lc / nc;
        out->loss = softplus(-x) + o->sft_weight * nll;
        const double dx = -sigmoid(-x);
        out->dLc = dx * beta / nc - o->sft_weight / nc;
        out->dLr = -dx * beta / nr;
        out->reward_c = rc;
        out->reward_r = rr;
        out->nll = nll;
        break;
    }
    case PF_OBJ_ORPO: {
        /* ac = Lc/nc, ar = Lr/nr (< 0); lo(a) = a - log1mexp(a); ratio = lo(ac) - lo(ar)
         * loss = -ac + lambda softplus(-ratio)
         * dlo/da = 1/(1 - e^a) = exp(-log1mexp(a)); dloss/dratio = -lambda sigmoid(-ratio)
         *        = -lambda exp(-softplus(ratio)), so the products are formed in log space:
         * dloss/dac = -1 - lambda exp(-softplus(ratio) - log1mexp(ac))
         * dloss/dar = +lambda exp(-softplus(ratio) - log1mexp(ar)) */
        double ac = Lc / nc, ar = Lr / nr;
        if (ac > 0 || ar > 0)
            return pf_fail(st, PF_EINVAL, "objective orpo: mean log-prob must be <= 0 (chosen %g, rejected %g)",
                           ac, ar);
        /* a mean log-prob of exactly 0 (every token predicted with float32 probability 1)
         * has infinite odds; use the largest double below 0 that keeps log1mexp finite */
        const double a_max = -1e-300;
        if (ac > a_max) ac = a_max;
        if (ar > a_max) ar = a_max;
        const double lc = log1mexp(ac), lr = log1mexp(ar);
        const double ratio = (ac - ar) - (lc - lr);
        const double lam = o->lambda;
        const double sp = softplus(ratio);
        out->nll = -Lc / nc;
        out->loss = out->nll + lam * softplus(-ratio);
        out->dLc = (-1.0 - lam * exp(-sp - lc)) / nc;
        out->dLr = (lam * exp(-sp - lr)) / nr;
        out->reward_c = lam * Lc / nc; /* TRL ORPO: beta * mean log-prob */
        out->reward_r = lam * Lr / nr;
        out->log_odds = ratio;               /* TRL log_odds_chosen */
        out->log_sig_odds = -softplus(-ratio); /* TRL log_odds_ratio = logsigmoid(log_odds) */
        break;
    }
    default:
        return pf_fail(st, PF_EINVAL, "objective: unknown kind %d", o->kind);
    }
    if (!(isfinite(out->loss) && isfinite(out->dLc) && isfinite(out->dLr) && isfinite(out->reward_c) &&
          isfinite(out->reward_r) && isfinite(out->nll) && isfinite(out->log_odds) &&
          isfinite(out->log_sig_odds)))
        return pf_fail(st, PF_ENONFINITE,
                       "objective %s: non-finite result (loss %g, dLc %g, dLr %g) for Lc %g Lr %g Rc %g Rr %g "
                       "nc %g nr %g", pf_obj_names[o->kind], out->loss, out->dLc, out->dLr, Lc, Lr, Rc, Rr,
                       nc, nr);
    return PF_OK;
}
