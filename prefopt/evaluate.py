"""Held-out evaluation, identical for every objective (design.md section 9).

Per held-out pair: policy log-prob sums Lc, Lr and completion token counts nc, nr (eval mode,
adapters on), reference sums Rc, Rr (adapters off, cached). From those:

- objective-agnostic preferences: ``avg`` (Lc/nc > Lr/nr, length-normalised) and ``ref``
  ((Lc-Rc) > (Lr-Rr), against the reference), with their margins, overall and per slice;
- the run objective's TRL metrics on the held-out pairs, prefixed ``eval_`` and averaged over
  pairs (``eval_loss``, ``eval_rewards/*``, ``eval_logps/*``, ORPO extras);
- optionally a user scorer ``scorer(prompt_messages, generated_text, pair) -> float`` over
  greedy generations (C core KV-cache generation; greedy, hence fixed across runs).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from . import batching
from .batching import TokenPair

__all__ = ["objective_terms", "trl_metrics", "evaluate", "score_generations"]


# ---------------------------------------------------------------------------------------------
# objective math on per-sequence numbers (forward only; the C core computes the training loss
# and its gradients -- tests check the two agree)
# ---------------------------------------------------------------------------------------------

def _softplus(x):
    x = np.asarray(x, dtype=np.float64)
    return np.logaddexp(0.0, x)


def _log1mexp(a):
    """log(1 - exp(a)) for a < 0, stable on both branches."""
    a = np.asarray(a, dtype=np.float64)
    out = np.empty_like(a)
    near = a > -math.log(2.0)
    out[near] = np.log(-np.expm1(a[near]))
    out[~near] = np.log1p(-np.exp(a[~near]))
    return out


def objective_terms(obj: dict, Lc, Lr, Rc, Rr, nc, nr) -> dict:
    """Per-pair loss and TRL metrics of objective ``obj`` (the core's objective dict), computed
    by the C core (``_core.objective_eval``, the same code as training).

    Returns float64 arrays: loss, reward_c, reward_r, nll, log_odds, log_sig_odds."""
    from . import _core

    args = [np.ascontiguousarray(v, dtype=np.float64) for v in (Lc, Lr, Rc, Rr, nc, nr)]
    out = _core.objective_eval(obj, *args)
    return {k: np.asarray(out[k], dtype=np.float64)
            for k in ("loss", "reward_c", "reward_r", "nll", "log_odds", "log_sig_odds")}


def objective_terms_numpy(obj: dict, Lc, Lr, Rc, Rr, nc, nr) -> dict:
    """The same as :func:`objective_terms`, written independently in NumPy from design.md
    section 7 (a cross-check of the core, and the loss of the test toy model)."""
    Lc, Lr, Rc, Rr = (np.asarray(v, dtype=np.float64) for v in (Lc, Lr, Rc, Rr))
    nc, nr = (np.maximum(np.asarray(v, dtype=np.float64), 1.0) for v in (nc, nr))
    kind = obj["kind"]
    beta = float(obj.get("beta", 0.1))
    zeros = np.zeros_like(Lc)
    nll, log_odds, log_sig = zeros, zeros, zeros
    if kind in ("dpo", "ipo", "hinge"):
        rc, rr = beta * (Lc - Rc), beta * (Lr - Rr)
        z = rc - rr
        if kind == "dpo":
            eps = float(obj.get("label_smoothing", 0.0))
            loss = (1 - eps) * _softplus(-z) + eps * _softplus(z)
        elif kind == "ipo":
            u = (Lc - Rc) / nc - (Lr - Rr) / nr
            loss = (u - 1.0 / (2.0 * beta)) ** 2
        else:
            loss = np.maximum(0.0, 1.0 - z)
    elif kind == "simpo":
        gamma = float(obj.get("gamma", 0.0))
        rc, rr = beta * Lc / nc, beta * Lr / nr
        loss = _softplus(-(rc - rr - gamma))
        sft = float(obj.get("sft_weight", 0.0))
        nll = -Lc / nc
        if sft:
            loss = loss + sft * nll
    elif kind == "orpo":
        lam = float(obj.get("lambda", 0.1))
        ac, ar = Lc / nc, Lr / nr
        # log odds(a) = a - log(1 - e^a); a < 0 for a real mean log-prob
        ac_c, ar_c = np.minimum(ac, -1e-300), np.minimum(ar, -1e-300)
        log_odds = (ac_c - _log1mexp(ac_c)) - (ar_c - _log1mexp(ar_c))
        log_sig = -_softplus(-log_odds)
        nll = -ac
        loss = nll + lam * _softplus(-log_odds)
        rc, rr = lam * ac, lam * ar
    else:
        raise ValueError(f"unknown objective kind {kind!r}")
    return {"loss": loss, "reward_c": rc, "reward_r": rr, "nll": nll, "log_odds": log_odds,
            "log_sig_odds": log_sig}


def trl_metrics(obj: dict, terms: dict, Lc, Lr, prefix: str = "") -> dict:
    """TRL-named metrics averaged over pairs from per-pair terms (objective_terms or the
    core's train_step output)."""
    rc, rr = np.asarray(terms["reward_c"], float), np.asarray(terms["reward_r"], float)
    m = {
        "loss": float(np.mean(terms["loss"])),
        "rewards/chosen": float(np.mean(rc)),
        "rewards/rejected": float(np.mean(rr)),
        "rewards/accuracies": float(np.mean(rc > rr)),
        "rewards/margins": float(np.mean(rc - rr)),
        "logps/chosen": float(np.mean(Lc)),
        "logps/rejected": float(np.mean(Lr)),
    }
    if obj["kind"] == "orpo":
        m["nll_loss"] = float(np.mean(terms["nll"]))
        m["log_odds_ratio"] = float(np.mean(terms["log_sig_odds"]))
        m["log_odds_chosen"] = float(np.mean(terms["log_odds"]))
    elif obj["kind"] == "simpo" and obj.get("sft_weight", 0.0):
        m["sft_loss"] = float(np.mean(terms["nll"]))
    return {prefix + k: v for k, v in m.items()}


def score_generations(core, tokenizer, pairs: Sequence[TokenPair], scorer: Callable,
                      max_new_tokens: int = 128, stop_ids=None, use_lora: bool = True) -> np.ndarray:
    """Greedy generation (KV cache, C core) for each pair's prompt, scored by ``scorer``.

    ``scorer(prompt_messages, generated_text, pair) -> float`` receives the pair's original
    prompt (messages or text when known, else the prompt ids), the decoded generation and the
    original record (or the TokenPair). Greedy decoding is deterministic, so every run is
    scored on the same footing."""
    if tokenizer is None:
        raise ValueError("a scorer needs a tokenizer to decode generations; pass a loaded model "
                         "(prefopt.load) or tokenizer=")
    if stop_ids is None:
        stop_ids = _stop_ids(tokenizer)
    stop = np.asarray(sorted(set(int(s) for s in stop_ids)), dtype=np.int32)
    scores = np.empty(len(pairs), dtype=np.float64)
    for i, p in enumerate(pairs):
        ids = core.generate(p.prompt, int(max_new_tokens), stop, use_lora=use_lora)
        ids = [int(t) for t in np.asarray(ids) if int(t) not in set(stop.tolist())]
        text = _decode(tokenizer, ids)
        rec = p.record if p.record is not None else p
        prompt = _prompt_of(rec, p)
        val = scorer(prompt, text, rec)
        try:
            scores[i] = float(val)
        except (TypeError, ValueError):
            raise TypeError(f"scorer returned {val!r} for pair {p.id!r}; it must return a number")
        if not math.isfinite(scores[i]):
            raise ValueError(f"scorer returned a non-finite value {val!r} for pair {p.id!r}")
    return scores


def _prompt_of(rec, p: TokenPair):
    if isinstance(rec, dict) and "prompt" in rec:
        return rec["prompt"]
    if hasattr(rec, "prompt") and not isinstance(rec, TokenPair):
        return rec.prompt
    return p.prompt


def _decode(tokenizer, ids):
    fn = getattr(tokenizer, "decode", None)
    if fn is None:
        raise TypeError(f"cannot decode with {type(tokenizer).__name__}")
    for kw in ({"skip_special": True}, {"skip_special_tokens": True}, {}):
        try:
            return fn(ids, **kw)
        except TypeError:
            continue
    raise TypeError(f"cannot decode with {type(tokenizer).__name__}")


def _stop_ids(tokenizer) -> list[int]:
    ids = []
    for name in ("stop_ids", "eos_token_ids", "end_of_turn_ids"):
        v = getattr(tokenizer, name, None)
        if v:
            ids += [int(x) for x in (v if isinstance(v, (list, tuple, set)) else [v])]
    for name in ("eos_token_id", "eos_id", "end_of_turn_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            ids.append(int(v))
    if not ids:
        raise ValueError("could not find the tokenizer's EOS / end-of-turn ids; pass stop_ids=")
    return ids


def evaluate(model, pairs, *, config=None, objective: dict | None = None, reference=None,
             batch_size: int | None = None, scorer: Callable | None = None, tokenizer=None,
             max_new_tokens: int = 128, stop_ids=None, use_lora: bool = True, cache_dir=None):
    """Evaluates ``model`` (a loaded model or a ``prefopt._core.Model``) on held-out ``pairs``
    (text records, tokenised with the model's tokenizer, or tokenised pairs).

    ``config``: a TrainConfig giving the max lengths, the batch size and -- for the ``eval_*``
    TRL metrics -- the objective (default: TrainConfig() lengths, no objective metrics).
    ``objective``: a core objective dict, overriding the config's.
    ``reference``: float64 [P, 2] reference sums (Rc, Rr); computed with adapters off (and
    cached) when None. ``use_lora=False`` evaluates the base model (the baseline).
    Returns a ``prefopt.results.EvalResult``."""
    from .train import TrainConfig, prepare_pairs

    cfg = config if config is not None else TrainConfig()
    if objective is None and config is not None:
        objective = cfg.objective_dict()
    bs = int(batch_size or cfg.eval_batch_size)
    core = batching.core_of(model)
    tps, _dropped = prepare_pairs(model, pairs, cfg, "held-out")
    if reference is None:
        reference, _, _ = batching.reference_logps(core, tps, cache_dir=cache_dir, batch_size=bs,
                                                   use_lora=False,
                                                   key_extra=(cfg.max_length, cfg.max_prompt_length),
                                                   vocab_size=_vocab(model))
    reference = np.asarray(reference, dtype=np.float64)
    if reference.shape != (len(tps), 2):
        raise ValueError(f"reference must have shape ({len(tps)}, 2), got {reference.shape}")
    logp, n = batching.score_pairs(core, tps, bs, use_lora=use_lora)
    scores = None
    if scorer is not None:
        tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        scores = score_generations(core, tok, tps, scorer, max_new_tokens, stop_ids, use_lora)
    return build_eval(tps, logp, n, reference, objective, scores=scores)


def build_eval(tps: Sequence[TokenPair], logp, n, reference, objective: dict | None,
               scores=None):
    """EvalResult from per-pair numbers (policy logp/n [P,2], reference [P,2])."""
    from . import results

    Lc, Lr = logp[:, 0], logp[:, 1]
    Rc, Rr = reference[:, 0], reference[:, 1]
    nc, nr = n[:, 0], n[:, 1]
    metrics = {}
    if objective is not None:
        terms = objective_terms(objective, Lc, Lr, Rc, Rr, nc, nr)
        metrics = trl_metrics(objective, terms, Lc, Lr, prefix="eval_")
    pair_evals = [
        results.PairEval.from_logps(p.id, p.slice, Lc[i], Lr[i], nc[i], nr[i], Rc[i], Rr[i],
                                    score=None if scores is None else float(scores[i]))
        for i, p in enumerate(tps)]
    return results.EvalResult.from_pairs(pair_evals, metrics)

def _vocab(model):
    cfg = getattr(model, "config", None)
    if isinstance(cfg, dict):
        return cfg.get("vocab_size")
    return getattr(cfg, "vocab_size", None)
