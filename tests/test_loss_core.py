"""Objectives of csrc/loss.c against hand values, finite differences and
TRL's formulas re-written independently in torch (autograd for gradients).

TRL conventions mirrored here (TRL 1.16):
* DPO sigmoid: -logsigmoid(beta*Delta); cDPO label smoothing is the legacy
  (<= v0.28) form -(1-e) logsigmoid(beta*Delta) - e logsigmoid(-beta*Delta).
* IPO: ((c/nc - r/nr) - 1/(2 beta))^2 with c, r log-ratio sums.
* hinge: relu(1 - beta*Delta).  DPO rewards: beta * (L - R) for every loss type.
* SimPO = CPOTrainer(loss_type="simpo", cpo_alpha=0): logits = avg_c - avg_r - simpo_gamma/beta,
  loss = -logsigmoid(beta * logits); simpo_gamma is the ABSOLUTE margin gamma. The SimPO
  repo's gamma_beta_ratio is gamma/beta. Rewards beta * avg logp.
* ORPO: log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r));
  loss = NLL - beta*logsigmoid(log_odds), TRL's beta = our lambda; rewards beta * avg logp.
  TRL's NLL is a token mean over prompt+completion of the micro-batch; ours (per pair) is
  -Lc/nc over completion tokens -- identical for one pair whose prompt is excluded.
"""
import math

import numpy as np
import pytest
import torch

from prefopt import _core
from prefopt.objectives import objective_params

torch.set_num_threads(1)
F = torch.nn.functional


def ev(obj, Lc, Lr, Rc=None, Rr=None, nc=None, nr=None):
    Lc = np.atleast_1d(np.asarray(Lc, np.float64))
    Lr = np.atleast_1d(np.asarray(Lr, np.float64))
    z = np.zeros_like(Lc)
    f = lambda a, d: np.atleast_1d(np.asarray(d if a is None else a, np.float64)) * np.ones_like(Lc)
    return _core.objective_eval(obj, Lc, Lr, f(Rc, z), f(Rr, z), f(nc, z + 1), f(nr, z + 1))


# ----------------------------------------------------------------------------- hand values

@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 10.0])
def test_dpo_at_reference_is_ln2_with_nonzero_gradient(beta):
    r = ev({"kind": "dpo", "beta": beta}, [-12.5, -3.0], [-40.0, -3.5], [-12.5, -3.0], [-40.0, -3.5],
           [5, 2], [9, 3])
    np.testing.assert_allclose(r["loss"], math.log(2), rtol=0, atol=1e-15)
    assert abs(math.log(2) - 0.693147) < 1e-6
    np.testing.assert_allclose(r["dLc"], -beta / 2, rtol=1e-15)
    np.testing.assert_allclose(r["dLr"], beta / 2, rtol=1e-15)
    assert np.all(r["reward_c"] == 0) and np.all(r["reward_r"] == 0)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.375, 3.0])
def test_simpo_zero_margin_is_softplus_gamma(gamma):
    # Lc/nc == Lr/nr: zero margin
    r = ev({"kind": "simpo", "beta": 2.5, "gamma": gamma}, [-6.0], [-9.0], nc=[4], nr=[6])
    assert r["loss"][0] == pytest.approx(math.log1p(math.exp(gamma)), rel=1e-14)
    sig = 1 / (1 + math.exp(-gamma))  # sigmoid(-x) at x = -gamma
    assert r["dLc"][0] == pytest.approx(-2.5 * sig / 4, rel=1e-12)
    assert r["dLr"][0] == pytest.approx(2.5 * sig / 6, rel=1e-12)
    assert r["reward_c"][0] == pytest.approx(2.5 * -1.5) and r["reward_r"][0] == pytest.approx(2.5 * -1.5)


@pytest.mark.parametrize("ac", [-1e-9, -1e-12, -1e-300, 0.0, -0.5, -0.6931471805599453, -30.0])
def test_orpo_stays_finite_near_zero_mean_logprob(ac):
    lam = 0.1
    r = ev({"kind": "orpo", "lambda": lam}, [ac * 3], [-2.0 * 5], nc=[3], nr=[5])
    for k in ("loss", "dLc", "dLr", "log_odds", "log_sig_odds"):
        assert np.isfinite(r[k]).all(), (k, r[k])
    # hand value via mpmath-free high-precision reasoning for ac = -1e-9:
    if ac == -1e-9:
        lo_c = -1e-9 - math.log(1e-9 - 0.5e-18)  # log(1-e^a) = log(-a - a^2/2 ...)
        lo_r = -2.0 - math.log1p(-math.exp(-2.0))
        ratio = lo_c - lo_r
        assert r["log_odds"][0] == pytest.approx(ratio, rel=1e-12)
        assert r["loss"][0] == pytest.approx(1e-9 + lam * math.log1p(math.exp(-ratio)), rel=1e-9)


def test_orpo_naive_formula_would_fail_but_ours_matches_stable_one():
    # log1p(-exp(a)) for a = -1e-9 loses ~half the digits; expm1 branch keeps them
    a = -1e-9
    assert abs(math.log(-math.expm1(a)) - math.log(1e-9)) < 1e-9
    r = ev({"kind": "orpo", "lambda": 1.0}, [a], [-1.0])
    lo = lambda x: x - (math.log(-math.expm1(x)) if x > -math.log(2) else math.log1p(-math.exp(x)))
    assert r["log_odds"][0] == pytest.approx(lo(a) - lo(-1.0), rel=1e-13)


def test_dpo_extreme_margins_are_finite():
    r = ev({"kind": "dpo", "beta": 1.0}, [-1.0, -2000.0], [-2000.0, -1.0])
    assert r["loss"][0] == pytest.approx(0.0, abs=1e-300) and r["loss"][1] == pytest.approx(1999.0)
    assert np.isfinite(r["dLc"]).all()


# ----------------------------------------------------------------------------- finite differences

OBJECTIVES = [
    {"kind": "dpo", "beta": 0.1},
    {"kind": "dpo", "beta": 0.7, "label_smoothing": 0.2},
    {"kind": "ipo", "beta": 0.3},
    {"kind": "hinge", "beta": 0.1},
    {"kind": "simpo", "beta": 2.5, "gamma": 1.375},
    {"kind": "simpo", "beta": 2.0, "gamma": 0.5, "sft_weight": 0.3},
    {"kind": "orpo", "lambda": 0.1},
    {"kind": "orpo", "lambda": 2.0},
]


def _pairs(seed=0, P=16):
    rng = np.random.default_rng(seed)
    nc = rng.integers(1, 40, P).astype(np.float64)
    nr = rng.integers(1, 40, P).astype(np.float64)
    Lc = -nc * rng.uniform(0.05, 3.0, P)
    Lr = -nr * rng.uniform(0.05, 3.0, P)
    Rc = Lc + rng.normal(0, 3, P)
    Rr = Lr + rng.normal(0, 3, P)
    return Lc, Lr, Rc, Rr, nc, nr


@pytest.mark.parametrize("obj", OBJECTIVES, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_gradients_finite_differences(obj):
    Lc, Lr, Rc, Rr, nc, nr = _pairs(1)
    r = _core.objective_eval(obj, Lc, Lr, Rc, Rr, nc, nr)
    h = 1e-6
    for name, dname in (("Lc", "dLc"), ("Lr", "dLr")):
        args = dict(Lc=Lc, Lr=Lr)
        p = dict(args); m = dict(args)
        p[name] = args[name] + h
        m[name] = args[name] - h
        fp = _core.objective_eval(obj, p["Lc"], p["Lr"], Rc, Rr, nc, nr)["loss"]
        fm = _core.objective_eval(obj, m["Lc"], m["Lr"], Rc, Rr, nc, nr)["loss"]
        num = (fp - fm) / (2 * h)
        if obj["kind"] == "hinge":  # kink at z = 1: skip pairs within h of it
            z = obj["beta"] * ((Lc - Rc) - (Lr - Rr))
            ok = np.abs(1 - z) > 1e-3
            num, ana = num[ok], r[dname][ok]
        else:
            ana = r[dname]
        np.testing.assert_allclose(ana, num, rtol=1e-5, atol=1e-8, err_msg=f"{obj} {dname}")
        assert np.any(np.abs(ana) > 1e-6)  # not trivially zero


# ----------------------------------------------------------------------------- against TRL formulas

def _trl_reference(obj, Lc, Lr, Rc, Rr, nc, nr):
    """TRL's per-pair losses and rewards, written independently in torch (float64)."""
    t = lambda a: torch.tensor(a, dtype=torch.float64)
    Lc, Lr = t(Lc).requires_grad_(), t(Lr).requires_grad_()
    Rc, Rr, nc, nr = t(Rc), t(Rr), t(nc), t(nr)
    kind = obj["kind"]
    extra = {}
    if kind in ("dpo", "ipo", "hinge"):
        beta = obj["beta"]
        c, r = Lc - Rc, Lr - Rr
        delta = c - r
        if kind == "dpo":
            e = obj.get("label_smoothing", 0.0)
            loss = -(1 - e) * F.logsigmoid(beta * delta) - e * F.logsigmoid(-beta * delta)
        elif kind == "ipo":
            loss = ((c / nc - r / nr) - 1 / (2 * beta)) ** 2
        else:
            loss = torch.relu(1 - beta * delta)
        rc, rr = beta * c, beta * r
    elif kind == "simpo":
        beta, simpo_gamma = obj["beta"], obj["gamma"]
        avg_c, avg_r = Lc / nc, Lr / nr
        logits = (avg_c - avg_r) - simpo_gamma / beta
        loss = -F.logsigmoid(beta * logits) + obj.get("sft_weight", 0.0) * (-avg_c)
        rc, rr = beta * avg_c, beta * avg_r
    else:
        beta = obj["lambda"]  # TRL ORPOConfig.beta
        avg_c, avg_r = Lc / nc, Lr / nr

        def log1mexp(x):
            return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))

        log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
        ratio = F.logsigmoid(log_odds)
        loss = -avg_c - beta * ratio
        rc, rr = beta * avg_c, beta * avg_r
        extra = {"log_odds": log_odds.detach().numpy(), "log_sig_odds": ratio.detach().numpy(),
                 "nll": (-avg_c).detach().numpy()}
    loss.sum().backward()
    return dict(loss=loss.detach().numpy(), dLc=Lc.grad.numpy(), dLr=Lr.grad.numpy(),
                reward_c=rc.detach().numpy(), reward_r=rr.detach().numpy(), **extra)


@pytest.mark.parametrize("obj", OBJECTIVES, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_matches_trl_formulas_in_torch(obj):
    args = _pairs(2, P=64)
    ours = _core.objective_eval(obj, *args)
    ref = _trl_reference(obj, *args)
    for k, v in ref.items():
        np.testing.assert_allclose(ours[k], v, rtol=1e-10, atol=1e-12, err_msg=f"{obj} {k}")


def test_simpo_gamma_conventions_are_distinct():
    # TRL CPOConfig(simpo_gamma=1.375, beta=2.5) == SimPO repo (beta=2.5, gamma_beta_ratio=0.55)
    a = objective_params("simpo", beta=2.5, gamma=1.375)
    b = objective_params("simpo", beta=2.5, gamma_beta_ratio=0.55)
    assert a["gamma"] == pytest.approx(1.375) and b["gamma"] == pytest.approx(1.375)
    args = _pairs(3)
    np.testing.assert_allclose(_core.objective_eval(a, *args)["loss"], _core.objective_eval(b, *args)["loss"])
    # defaults: SimPO repo beta 2.0, ratio 0.25 -> gamma 0.5
    assert objective_params("simpo") == {"kind": "simpo", "beta": 2.0, "gamma": 0.5, "sft_weight": 0.0}
    with pytest.raises(ValueError, match="not both"):
        objective_params("simpo", gamma=1.0, gamma_beta_ratio=0.5)
    with pytest.raises(ValueError, match="SimPO parameter"):
        objective_params("dpo", gamma=1.0)
    with pytest.raises(ValueError, match="gamma_beta_ratio"):
        _core.objective_eval({"kind": "simpo", "beta": 2.0, "gamma_beta_ratio": 0.5}, *args)
    assert objective_params("orpo") == {"kind": "orpo", "lambda": 0.1}
    assert objective_params("dpo") == {"kind": "dpo", "beta": 0.1, "label_smoothing": 0.0}


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("obj,match", [
    ({"kind": "dpo", "beta": 0.0}, "beta"),
    ({"kind": "dpo", "beta": -1.0}, "beta"),
    ({"kind": "dpo", "beta": float("nan")}, "beta"),
    ({"kind": "dpo", "label_smoothing": 0.5}, "label_smoothing"),
    ({"kind": "simpo", "label_smoothing": 0.1}, "label_smoothing"),
    ({"kind": "dpo", "gamma": 0.5}, "SimPO"),
    ({"kind": "orpo", "lambda": -0.1}, "lambda"),
    ({"kind": "kto"}, "unknown objective"),
    ({"beta": 0.1}, "kind"),
    ({"kind": "dpo", "betta": 0.1}, "unknown parameter"),
])
def test_bad_objective_raises(obj, match):
    with pytest.raises(ValueError, match=match):
        ev(obj, [-1.0], [-2.0])


def test_bad_pair_inputs_raise():
    with pytest.raises(ValueError, match="token counts"):
        ev({"kind": "simpo"}, [-1.0], [-2.0], nc=[0])
    with pytest.raises(FloatingPointError, match="pair 1"):
        ev({"kind": "dpo"}, [-1.0, float("nan")], [-2.0, -2.0])
    with pytest.raises(ValueError, match="mean log-prob"):
        ev({"kind": "orpo"}, [0.5], [-2.0])
    with pytest.raises(TypeError, match="float64"):
        _core.objective_eval({"kind": "dpo"}, *(np.zeros(2, np.float32) for _ in range(6)))
    with pytest.raises(ValueError, match="entries"):
        _core.objective_eval({"kind": "dpo"}, np.zeros(2), np.zeros(3), *(np.ones(2) for _ in range(4)))
