"""Preference objectives: building the parameter dict the C core takes.

The core (``csrc/loss.c``) computes, per pair, the loss and its gradient with
respect to the policy log-prob sums Lc, Lr (design.md section 7). This module
turns user-facing names into that dict and resolves SimPO's two margin
conventions, which are *distinct* parameters and are never mixed:

* ``gamma`` -- the absolute target margin of the SimPO paper, the same number
  as TRL's ``CPOConfig.simpo_gamma``. The loss is
  ``softplus(-(beta*Lc/nc - beta*Lr/nr - gamma))``.
* ``gamma_beta_ratio`` -- the SimPO reference repository's parameter
  (``scripts/simpo_config.py``): ``gamma = beta * gamma_beta_ratio``.

Give at most one of them; the resolved absolute ``gamma`` is what the core uses
and what gets logged. Defaults follow the SimPO repository (beta 2.0,
gamma_beta_ratio 0.25, i.e. gamma 0.5, which is also TRL's default
``simpo_gamma``).

ORPO's ``lam`` is the paper's lambda, the weight of the odds-ratio term; TRL
calls it ``beta`` in ``ORPOConfig``.
"""
from __future__ import annotations

import math

KINDS = ("dpo", "ipo", "hinge", "simpo", "orpo")

DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "hinge": 0.1, "simpo": 2.0}
SIMPO_DEFAULT_GAMMA_BETA_RATIO = 0.25
ORPO_DEFAULT_LAMBDA = 0.1


def _finite(name: str, x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise TypeError(f"objective parameter {name} must be a number, got {x!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"objective parameter {name} must be finite, got {v}")
    return v


def objective_params(kind: str, *, beta: float | None = None, gamma: float | None = None,
                     gamma_beta_ratio: float | None = None, label_smoothing: float = 0.0,
                     sft_weight: float = 0.0, lam: float | None = None) -> dict:
    """Return the core's objective dict for ``kind`` (dpo, ipo, hinge, simpo, orpo).

    Only the parameters of the chosen objective may be set (a SimPO ``gamma``
    given to DPO is an error, not silently ignored). For SimPO, ``gamma``
    (absolute) and ``gamma_beta_ratio`` (gamma = beta * ratio) are mutually
    exclusive.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown objective {kind!r}; choose one of {', '.join(KINDS)}")
    out: dict = {"kind": kind}
    if kind != "simpo":
        for name, val, default in (("gamma", gamma, None), ("gamma_beta_ratio", gamma_beta_ratio, None),
                                   ("sft_weight", sft_weight, 0.0)):
            if val is not None and val != default:
                raise ValueError(f"{name} is a SimPO parameter; objective {kind!r} does not use it")
    if kind != "dpo" and label_smoothing:
        raise ValueError(f"label_smoothing is supported by the DPO sigmoid loss only, not {kind!r}")
    if kind != "orpo" and lam is not None:
        raise ValueError(f"lam is the ORPO odds-ratio weight; objective {kind!r} does not use it")
    if kind == "orpo":
        if beta is not None:
            raise ValueError("ORPO has no beta here: its odds-ratio weight is `lam` (TRL's ORPOConfig.beta)")
        lam_v = _finite("lam", ORPO_DEFAULT_LAMBDA if lam is None else lam)
        if lam_v < 0:
            raise ValueError(f"ORPO lam must be >= 0, got {lam_v}")
        out["lambda"] = lam_v
        return out
    b = _finite("beta", DEFAULT_BETA[kind] if beta is None else beta)
    if b <= 0:
        raise ValueError(f"beta must be > 0, got {b}")
    out["beta"] = b
    if kind == "dpo":
        ls = _finite("label_smoothing", label_smoothing)
        if not 0 <= ls < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {ls}")
        out["label_smoothing"] = ls
    if kind == "simpo":
        if gamma is not None and gamma_beta_ratio is not None:
            raise ValueError("give SimPO either gamma (absolute margin) or gamma_beta_ratio "
                             "(gamma = beta * ratio), not both")
        if gamma is not None:
            g = _finite("gamma", gamma)
        else:
            ratio = SIMPO_DEFAULT_GAMMA_BETA_RATIO if gamma_beta_ratio is None else gamma_beta_ratio
            g = b * _finite("gamma_beta_ratio", ratio)
        out["gamma"] = g
        sw = _finite("sft_weight", sft_weight)
        if sw < 0:
            raise ValueError(f"sft_weight must be >= 0, got {sw}")
        out["sft_weight"] = sw
    return out
