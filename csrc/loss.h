/* loss.h: preference objectives on per-sequence numbers (design.md section 7).
 * Per pair: Lc, Lr policy completion log-prob sums; Rc, Rr reference sums;
 * nc, nr completion token counts. Output: the pair's loss, its gradient w.r.t.
 * Lc and Lr (the model backward then spreads dLc over every chosen completion
 * token's log-prob), and the TRL-named per-pair metrics. */
#ifndef PF_LOSS_H
#define PF_LOSS_H
#include "common.h"

enum { PF_OBJ_DPO = 0,   /* sigmoid, optional label smoothing (cDPO) */
       PF_OBJ_IPO = 1,   /* (u - 1/(2 beta))^2 on per-token averaged log-ratios */
       PF_OBJ_HINGE = 2, /* max(0, 1 - z) */
       PF_OBJ_SIMPO = 3, /* softplus(-(beta Lc/nc - beta Lr/nr - gamma)) (+ sft_weight * -Lc/nc) */
       PF_OBJ_ORPO = 4,  /* -Lc/nc + lambda * softplus(-log_odds_ratio) */
       PF_OBJ_N };

typedef struct {
    int kind;
    double beta;            /* DPO/IPO/hinge/SimPO beta */
    double label_smoothing; /* DPO sigmoid only, in [0, 0.5); must be 0 for other kinds */
    double gamma;           /* SimPO absolute margin (already resolved from gamma_beta_ratio);
                               must be 0 for other kinds */
    double sft_weight;      /* SimPO optional NLL weight; must be 0 for other kinds */
    double lambda;          /* ORPO odds-ratio weight (TRL's beta) */
} pf_objective;

typedef struct {
    double loss;
    double dLc, dLr;        /* d loss / d Lc, d Lr */
    double reward_c, reward_r; /* TRL rewards/chosen, rewards/rejected */
    double nll;             /* ORPO nll term -Lc/nc; SimPO unweighted sft term -Lc/nc; else 0 */
    double log_odds;        /* ORPO log_odds_chosen per pair, else 0 */
    double log_sig_odds;    /* ORPO log sigmoid(log_odds) per pair (TRL log_odds_ratio), else 0 */
} pf_pair_loss;

/* "dpo", "ipo", "hinge", "simpo", "orpo" -> PF_OBJ_*, or -1 if unknown. */
int pf_objective_kind(const char *name);
/* PF_OBJ_* -> its name ("unknown" out of range). */
const char *pf_objective_name(int kind);
/* Validates parameters (beta > 0, smoothing range, lambda >= 0, ...). */
int pf_objective_check(const pf_objective *o, pf_status *st);
/* One pair. nc, nr > 0. Returns PF_ENONFINITE if an input or output is not finite.
 * ORPO: a mean log-prob of exactly 0 is treated as -1e-300 (finite log-odds). */
int pf_objective_pair(const pf_objective *o, double Lc, double Lr, double Rc, double Rr, double nc,
                      double nr, pf_pair_loss *out, pf_status *st);
#endif
