"""Which objective to keep: the decision rule of design.md section 10, with statistics.

The rule, for two runs X and Y at the same LoRA rank, on the same held-out pairs (paired
by pair id; different pair sets are refused):

- X is right on at least one more held-out pair than Y, X's mean held-out margin is better
  or equal, and no important slice gets worse (X's slice accuracy below Y's): **decision**.
- X is right on more pairs but its margin is worse or a slice regresses: **hint**.
- Same number of pairs right: **no evidence**.

With n held-out pairs one pair is 100/n accuracy points; every verdict says so.

Which correctness metric (``metric``):

- ``"avg"`` (default): the policy prefers chosen by mean log-prob per completion token,
  Lc/nc > Lr/nr. It needs no reference model, does not reward a long completion just for
  being long, and is meaningful for the base model too, so every run can be compared
  with the base model ("lift"). It is the quantity SimPO trains, so it is not neutral: a
  DPO win on ``avg`` is the stronger evidence.
- ``"ref"``: the implicit reward of DPO, (Lc - Rc) > (Lr - Rr): did training move chosen
  up relative to rejected? It is what DPO trains (so a SimPO win on it is the stronger
  evidence), it sums over tokens (length enters), and it is 0 for the base model by
  construction (every pair a tie, accuracy 0), so it has no useful baseline.

The report shows both; when they disagree, say so rather than pick the friendlier one.

Statistics beyond the rule (they do not change the rule's outcome, they say how much to
trust it): the exact McNemar test on the discordant pairs, Wilson intervals for each
accuracy, and a seeded paired bootstrap interval for the mean margin difference.

Lower rank: for one objective, prefer the lower rank when its held-out behaviour is equal or
better (at least as many pairs right, no important slice worse, mean margin not below the
higher rank's unless the bootstrap interval of the difference contains 0), even if its
training margins are a little lower.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .results import EvalResult, RunResult, _check_metric
from .review import FLAGS, INFLATION, TRAIN_IMPROVED, WEAK_SIGNAL, Review, review  # noqa: F401
from .stats import bootstrap_mean_diff, mcnemar_exact, strength_words, wilson_interval

DECISION, HINT, NO_EVIDENCE = "decision", "hint", "no evidence"
_DISPLAY = {"dpo": "DPO", "simpo": "SimPO", "orpo": "ORPO", "ipo": "IPO", "cpo": "CPO"}


def display(objective: str) -> str:
    """Human spelling of an objective name (dpo -> DPO, simpo -> SimPO)."""
    return _DISPLAY.get(str(objective).lower(), str(objective))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ge(a: float, b: float) -> bool:
    """a >= b up to float rounding of a mean (so equal margins summed differently are equal)."""
    return a >= b - 1e-12 * max(1.0, abs(a), abs(b))


def _plural(k: int, word: str) -> str:
    return f"{k} {word}" + ("" if k == 1 else "s")


def _check_same_pairs(a: EvalResult, name_a: str, b: EvalResult, name_b: str) -> None:
    ia, ib = set(a.ids()), set(b.ids())
    if ia != ib:
        only_a, only_b = sorted(ia - ib)[:5], sorted(ib - ia)[:5]
        raise ValueError(
            f"held-out pair sets differ between {name_a} and {name_b} "
            f"(only in {name_a}: {only_a}, only in {name_b}: {only_b}); "
            "comparisons need the same held-out pairs")
    if not ia:
        raise ValueError(f"{name_a} and {name_b} have no held-out pairs to compare")
    sa = {p.id: p.slice for p in a.pairs}
    for p in b.pairs:
        if sa[p.id] != p.slice:
            raise ValueError(f"pair {p.id!r} is in slice {sa[p.id]!r} for {name_a} but "
                             f"{p.slice!r} for {name_b}")


def _important(ev: EvalResult, important_slices) -> List[str]:
    present = ev.slices()
    if important_slices is None:
        return present
    wanted = list(important_slices)
    unknown = [s for s in wanted if s not in present]
    if unknown:
        raise ValueError(f"important slices {unknown} are not in the held-out pairs (slices: {present})")
    return wanted


@dataclass
class Comparison:
    """X vs Y on the same held-out pairs (usually two objectives at one rank)."""

    x: str
    y: str
    x_label: str
    y_label: str
    rank: Optional[int]
    metric: str
    n: int
    x_correct: int
    y_correct: int
    x_only: int                     # discordant: X right, Y wrong
    y_only: int                     # discordant: Y right, X wrong
    x_margin: float
    y_margin: float
    margin_ci: Tuple[float, float]  # bootstrap interval of mean(x margin - y margin)
    x_acc_ci: Tuple[float, float]
    y_acc_ci: Tuple[float, float]
    p_value: float
    conf: float
    slices: Dict[str, Dict[str, float]]   # slice -> {n, x_acc, y_acc}
    slice_regressions: List[str]          # important slices where the leader is worse
    winner: Optional[str]                 # run name of the leader, None when tied
    outcome: str
    reasons: List[str] = field(default_factory=list)

    @property
    def point_size(self) -> float:
        """Accuracy points of one held-out pair: 100/n."""
        return 100.0 / self.n

    @property
    def winner_label(self) -> Optional[str]:
        if self.winner is None:
            return None
        return self.x_label if self.winner == self.x else self.y_label

    @property
    def loser_label(self) -> Optional[str]:
        if self.winner is None:
            return None
        return self.y_label if self.winner == self.x else self.x_label

    @property
    def headline(self) -> str:
        where = f"rank {self.rank}: " if self.rank is not None else ""
        if self.winner is None:
            return f"{where}{self.x_label} vs {self.y_label}: no evidence"
        return f"{where}{self.winner_label} over {self.loser_label}: {self.outcome}"

    @property
    def text(self) -> str:
        lo, hi = self.margin_ci
        c = int(round(self.conf * 100))
        lines = [self.headline + "."]
        lines += [f"  - {r}" for r in self.reasons]
        lines.append(
            f"  - statistics: exact McNemar p = {self.p_value:.3g} on "
            f"{_plural(self.x_only + self.y_only, 'discordant pair')} ({self.x_label} alone right "
            f"on {self.x_only}, {self.y_label} alone on {self.y_only}): "
            f"{strength_words(self.p_value)}; accuracy {c}% Wilson intervals "
            f"{self.x_label} [{_pct(self.x_acc_ci[0])}, {_pct(self.x_acc_ci[1])}], {self.y_label} "
            f"[{_pct(self.y_acc_ci[0])}, {_pct(self.y_acc_ci[1])}]; margin difference "
            f"{self.x_label} - {self.y_label} {self.x_margin - self.y_margin:+.4g}, {c}% bootstrap "
            f"[{lo:.3g}, {hi:.3g}]")
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        d = dict(self.__dict__)
        d.update(point_size=self.point_size, headline=self.headline, text=self.text,
                 margin_ci=list(self.margin_ci), x_acc_ci=list(self.x_acc_ci),
                 y_acc_ci=list(self.y_acc_ci))
        return d


def compare(x: RunResult, y: RunResult, metric: str = "avg",
            important_slices: Optional[Iterable[str]] = None, conf: float = 0.95,
            n_boot: int = 10000, seed: int = 0) -> Comparison:
    """Apply the decision rule to runs ``x`` and ``y`` on their held-out evaluations."""
    _check_metric(metric)
    for run in (x, y):
        if run.heldout is None:
            raise ValueError(f"run {run.name} has no held-out evaluation")
    ex, ey = x.heldout, y.heldout
    _check_same_pairs(ex, x.name, ey, y.name)
    rank = x.rank if x.rank == y.rank else None
    xl, yl = display(x.objective), display(y.objective)
    if xl == yl:  # same objective (e.g. two ranks): tell them apart by name
        xl, yl = f"{xl} ({x.name})", f"{yl} ({y.name})"
    ymap = ey.by_id()
    pairs = [(p, ymap[p.id]) for p in ex.pairs]
    n = len(pairs)
    xc, yc = ex.n_correct(metric), ey.n_correct(metric)
    x_only = sum(1 for a, b in pairs if a.correct(metric) and not b.correct(metric))
    y_only = sum(1 for a, b in pairs if b.correct(metric) and not a.correct(metric))
    xm, ym = ex.mean_margin(metric), ey.mean_margin(metric)
    ci = bootstrap_mean_diff([a.margin(metric) for a, _ in pairs],
                             [b.margin(metric) for _, b in pairs], n_boot=n_boot, seed=seed, conf=conf)
    slices = {}
    for s in ex.slices():
        slices[s] = {"n": len(ex.select(s)), "x_acc": ex.accuracy(metric, s), "y_acc": ey.accuracy(metric, s)}
    important = _important(ex, important_slices)

    pt = 100.0 / n
    reasons = [f"{xl} is right on {xc}/{n} held-out pairs ({_pct(xc / n)}), {yl} on {yc}/{n} "
               f"({_pct(yc / n)}); one pair is {pt:.3g} points"]
    winner, outcome, regressions = None, NO_EVIDENCE, []
    if xc == yc:
        reasons.append("same number of pairs right: no evidence either way")
    else:
        lead_is_x = xc > yc
        winner = x.name if lead_is_x else y.name
        wl, ll = (xl, yl) if lead_is_x else (yl, xl)
        wm, lm = (xm, ym) if lead_is_x else (ym, xm)
        k = abs(xc - yc)
        reasons[-1] += f": {wl} is right on {k} more ({k * pt:.3g} points)"
        margin_ok = _ge(wm, lm)
        reasons.append(f"mean held-out {metric} margin {wl} {wm:.4g} vs {ll} {lm:.4g}: "
                       + ("better or equal" if margin_ok else f"worse for {wl}"))
        for s in important:
            wa, la = ((slices[s]["x_acc"], slices[s]["y_acc"]) if lead_is_x
                      else (slices[s]["y_acc"], slices[s]["x_acc"]))
            if wa < la:
                regressions.append(s)
        if regressions:
            reasons.append("slice regression for {}: ".format(wl) + ", ".join(
                f"{s} {_pct(slices[s]['x_acc' if lead_is_x else 'y_acc'])} vs "
                f"{_pct(slices[s]['y_acc' if lead_is_x else 'x_acc'])} (n={slices[s]['n']})"
                for s in regressions))
        elif important:
            reasons.append(f"no important slice gets worse ({', '.join(important)})")
        outcome = DECISION if (margin_ok and not regressions) else HINT
        if outcome == HINT:
            reasons.append("more pairs right alone is only a hint")
    return Comparison(
        x=x.name, y=y.name, x_label=xl, y_label=yl, rank=rank, metric=metric, n=n,
        x_correct=xc, y_correct=yc, x_only=x_only, y_only=y_only, x_margin=xm, y_margin=ym,
        margin_ci=ci, x_acc_ci=wilson_interval(xc, n, conf), y_acc_ci=wilson_interval(yc, n, conf),
        p_value=mcnemar_exact(x_only, y_only), conf=conf, slices=slices,
        slice_regressions=regressions, winner=winner, outcome=outcome, reasons=reasons)


@dataclass
class LowerRankCheck:
    """For one objective: is the lower rank as good on held-out as the higher one?"""

    objective: str
    low: str
    high: str
    low_rank: int
    high_rank: int
    prefer_low: bool
    comparison: Comparison
    train_margin_low: Optional[float]
    train_margin_high: Optional[float]
    reasons: List[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        o = display(self.objective)
        head = (f"{o}: prefer rank {self.low_rank} over rank {self.high_rank}" if self.prefer_low
                else f"{o}: keep rank {self.high_rank} (rank {self.low_rank} is worse on held-out)")
        return head + "." + "".join(f"\n  - {r}" for r in self.reasons)

    def to_dict(self) -> Dict[str, Any]:
        d = dict(self.__dict__)
        d["comparison"] = self.comparison.to_dict()
        d["text"] = self.text
        return d


def lower_rank_check(low: RunResult, high: RunResult, metric: str = "avg",
                     important_slices=None, conf=0.95, n_boot=10000, seed=0,
                     reviews: Optional[Dict[str, Review]] = None) -> LowerRankCheck:
    """Prefer ``low`` (the lower rank) if its held-out behaviour is equal or better."""
    if low.rank >= high.rank:
        raise ValueError(f"lower_rank_check: {low.name} (rank {low.rank}) is not below "
                         f"{high.name} (rank {high.rank})")
    c = compare(low, high, metric, important_slices, conf, n_boot, seed)
    reviews = reviews or {}
    tl = (reviews.get(low.name) or review(low, metric=metric, n_boot=n_boot, seed=seed)).train_margin_late
    th = (reviews.get(high.name) or review(high, metric=metric, n_boot=n_boot, seed=seed)).train_margin_late
    pairs_ok = c.x_correct >= c.y_correct
    slices = c.slice_regressions if c.winner == low.name else [
        s for s in _important(low.heldout, important_slices)
        if c.slices[s]["x_acc"] < c.slices[s]["y_acc"]]
    margin_ok = _ge(c.x_margin, c.y_margin) or c.margin_ci[0] <= 0.0 <= c.margin_ci[1]
    prefer = bool(pairs_ok and not slices and margin_ok)
    reasons = [f"held-out ({metric}): rank {low.rank} right on {c.x_correct}/{c.n}, rank "
               f"{high.rank} on {c.y_correct}/{c.n}"
               + ("" if pairs_ok else " (fewer pairs right at the lower rank)")]
    lo, hi = c.margin_ci
    reasons.append(f"mean held-out margin {c.x_margin:.4g} vs {c.y_margin:.4g} "
                   f"(difference {c.x_margin - c.y_margin:+.4g}, bootstrap [{lo:.3g}, {hi:.3g}])"
                   + ("" if margin_ok else ": clearly lower at the lower rank"))
    if slices:
        reasons.append("slices worse at the lower rank: " + ", ".join(slices))
    if tl is not None and th is not None:
        rel = "lower" if tl < th else "not lower"
        reasons.append(f"late train margin {tl:.4g} at rank {low.rank} vs {th:.4g} at rank "
                       f"{high.rank} ({rel}); training margins do not decide, held-out does")
    return LowerRankCheck(objective=low.objective, low=low.name, high=high.name,
                          low_rank=low.rank, high_rank=high.rank, prefer_low=prefer, comparison=c,
                          train_margin_low=tl, train_margin_high=th, reasons=reasons)


@dataclass
class AcrossRanks:
    """One objective pair summarised over all ranks."""

    a: str
    b: str
    per_rank: List[Comparison]
    winner: Optional[str]  # objective label
    outcome: str
    text: str

    def to_dict(self) -> Dict[str, Any]:
        return {"a": self.a, "b": self.b, "winner": self.winner, "outcome": self.outcome,
                "text": self.text, "ranks": [c.rank for c in self.per_rank],
                "per_rank": [c.headline for c in self.per_rank]}


def _across(a: str, b: str, comps: List[Comparison]) -> AcrossRanks:
    ranks = [c.rank for c in comps]
    winners = {c.winner_label for c in comps if c.winner is not None}
    all_txt = "both ranks" if len(comps) == 2 else ("rank %s" % ranks[0] if len(comps) == 1
                                                   else f"all {len(comps)} ranks")
    detail = ", ".join(f"{c.outcome} at rank {c.rank}" for c in comps)
    if not winners:
        return AcrossRanks(a, b, comps, None, NO_EVIDENCE,
                           f"{a} vs {b}: no evidence at {all_txt}")
    if len(winners) > 1:
        by = "; ".join(f"{c.winner_label or 'neither'} at rank {c.rank}" for c in comps)
        return AcrossRanks(a, b, comps, None, NO_EVIDENCE,
                           f"{a} vs {b}: mixed ({by}): no consistent winner")
    w = winners.pop()
    loser = b if w == a else a
    if all(c.winner is not None for c in comps):
        outcome = DECISION if all(c.outcome == DECISION for c in comps) else HINT
        return AcrossRanks(a, b, comps, w, outcome, f"{w} over {loser} at {all_txt} ({detail})")
    won = [c.rank for c in comps if c.winner is not None]
    return AcrossRanks(a, b, comps, w, HINT,
                       f"{w} over {loser} at rank {', '.join(map(str, won))} only ({detail})")


@dataclass
class Verdict:
    """Everything decided about an ablation, with the plain-words text."""

    metric: str
    n: int
    outcome: str
    best: Optional[str]                # objective label kept, if any
    best_rank: Optional[int]
    comparisons: List[Comparison]
    across: List[AcrossRanks]
    lower_rank: List[LowerRankCheck]
    reviews: Dict[str, Review]
    text: str
    cautions: List[str] = field(default_factory=list)

    @property
    def point_size(self) -> float:
        return 100.0 / self.n

    def to_dict(self) -> Dict[str, Any]:
        return {"metric": self.metric, "n": self.n, "point_size": self.point_size,
                "outcome": self.outcome, "best": self.best, "best_rank": self.best_rank,
                "comparisons": [c.to_dict() for c in self.comparisons],
                "across": [a.to_dict() for a in self.across],
                "lower_rank": [l.to_dict() for l in self.lower_rank],
                "reviews": {k: v.to_dict() for k, v in self.reviews.items()},
                "cautions": list(self.cautions), "text": self.text}

    def __str__(self) -> str:
        return self.text


def decide(runs: Sequence[RunResult], metric: str = "avg",
           important_slices: Optional[Iterable[str]] = None, conf: float = 0.95,
           n_boot: int = 10000, seed: int = 0) -> Verdict:
    """Apply the rule per rank, summarise across ranks, check the lower-rank preference and
    review every run. All runs must share the same held-out pairs."""
    _check_metric(metric)
    runs = list(runs)
    if len(runs) < 2:
        raise ValueError("decide needs at least two runs")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique, got {names}")
    for r in runs:
        if r.heldout is None:
            raise ValueError(f"run {r.name} has no held-out evaluation")
    for r in runs[1:]:
        _check_same_pairs(runs[0].heldout, runs[0].name, r.heldout, r.name)
    important = list(important_slices) if important_slices is not None else None
    _important(runs[0].heldout, important)
    grid: Dict[Tuple[str, int], RunResult] = {}
    for r in runs:
        key = (r.objective.lower(), r.rank)
        if key in grid:
            raise ValueError(f"two runs with objective {r.objective} at rank {r.rank}: "
                             f"{grid[key].name} and {r.name}")
        grid[key] = r
    objectives = list(dict.fromkeys(r.objective.lower() for r in runs))
    ranks = sorted({r.rank for r in runs})
    n = runs[0].heldout.n
    kw = dict(metric=metric, important_slices=important, conf=conf, n_boot=n_boot, seed=seed)

    reviews = {r.name: review(r, metric=metric, n_boot=n_boot, seed=seed, conf=conf) for r in runs}
    comparisons, across = [], []
    for oa, ob in itertools.combinations(objectives, 2):
        comps = [compare(grid[(oa, k)], grid[(ob, k)], **kw) for k in ranks
                 if (oa, k) in grid and (ob, k) in grid]
        comparisons += comps
        if comps:
            across.append(_across(display(oa), display(ob), comps))
    lower = []
    for o in objectives:
        rs = [k for k in ranks if (o, k) in grid]
        for lo, hi in itertools.combinations(rs, 2):
            lower.append(lower_rank_check(grid[(o, lo)], grid[(o, hi)], reviews=reviews, **kw))

    # the objective kept: one that wins its summary against every other objective
    best, outcome = None, NO_EVIDENCE
    if len(objectives) >= 2 and across:
        for o in objectives:
            mine = [a for a in across if display(o) in (a.a, a.b)]
            if len(mine) == len(objectives) - 1 and all(a.winner == display(o) for a in mine):
                best = display(o)
                outcome = DECISION if all(a.outcome == DECISION for a in mine) else HINT
                break
    best_rank = None
    if best is not None:
        o = next(o for o in objectives if display(o) == best)
        rs = [k for k in ranks if (o, k) in grid]
        best_rank = max(rs)
        for k in rs:  # lowest rank that is as good as every higher rank
            checks = [l for l in lower if l.objective.lower() == o and l.low_rank == k]
            if all(l.prefer_low for l in checks):
                best_rank = k
                break

    cautions = _cautions(metric, best, best_rank, objectives, grid, comparisons, reviews, kw)
    text = _verdict_text(metric, n, outcome, best, best_rank, comparisons, across, lower,
                         reviews, runs, cautions)
    return Verdict(metric=metric, n=n, outcome=outcome, best=best, best_rank=best_rank,
                   comparisons=comparisons, across=across, lower_rank=lower, reviews=reviews,
                   text=text, cautions=cautions)


def _cautions(metric, best, best_rank, objectives, grid, comparisons, reviews, kw) -> List[str]:
    """Things the reader must know before acting on the verdict."""
    out = []
    ps = [c.p_value for c in comparisons if c.winner is not None]
    if ps and min(ps) >= 0.05:
        out.append(f"no paired exact test reaches p < 0.05 (smallest p = {min(ps):.3g}): with "
                   "this many held-out pairs the differences could be chance; more held-out "
                   "pairs would make the verdict firmer")
    # the other correctness metric: does it tell the same story?
    other = "ref" if metric == "avg" else "avg"
    okw = dict(kw, metric=other)
    for c in comparisons:
        x = next(r for r in grid.values() if r.name == c.x)
        y = next(r for r in grid.values() if r.name == c.y)
        o = compare(x, y, **okw)
        if (o.winner, o.outcome) != (c.winner, c.outcome):
            out.append(f"with the '{other}' metric, rank {c.rank} reads: {o.headline.split(': ', 1)[-1]} "
                       f"({o.x_label} {o.x_correct}/{o.n}, {o.y_label} {o.y_correct}/{o.n}); "
                       f"the metrics disagree")
    if best is not None:
        o = next(o for o in objectives if display(o) == best)
        run = grid.get((o, best_rank))
        if run is not None:
            rv = reviews[run.name]
            if INFLATION in rv.flags:
                out.append(f"{run.name} ({best}, rank {best_rank}) is flagged '{INFLATION}': "
                           "its training margin rose but held-out stayed flat")
            if (rv.heldout_source == "baseline" and rv.heldout_correct is not None
                    and rv.heldout_correct <= rv.baseline_correct):
                out.append(f"{run.name} is right on {rv.heldout_correct}/{rv.heldout_n} held-out "
                           f"pairs, the base model on {rv.baseline_correct}: it does not beat the "
                           "base model")
    return out


def _verdict_text(metric, n, outcome, best, best_rank, comparisons, across, lower, reviews, runs,
                  cautions):
    pt = 100.0 / n
    if best is not None and outcome == DECISION:
        head = f"Decision: keep {best}" + (f" (rank {best_rank})" if best_rank is not None else "") + "."
    elif best is not None:
        head = (f"Hint only: {best} looks better" + (f" (rank {best_rank})" if best_rank else "")
                + ", but the rule's conditions for a decision are not all met.")
    elif len({r.objective.lower() for r in runs}) == 1:
        head = (f"Only one objective ({display(runs[0].objective)}): nothing to decide between "
                "objectives; see the lower-rank preference below.")
    else:
        head = "No evidence: no objective is better than the others on the held-out pairs."
    lines = [head, "",
             f"Held-out pairs: {n}; one pair is {pt:.3g} accuracy points. Correctness metric: "
             f"'{metric}' ({'Lc/nc > Lr/nr' if metric == 'avg' else '(Lc-Rc) > (Lr-Rr)'}).", ""]
    if across:
        lines.append("Across ranks:")
        lines += [f"- {a.text}" for a in across]
        lines.append("")
    lines.append("Per rank:")
    for c in comparisons:
        lines.append("- " + c.text.replace("\n", "\n  "))
    if lower:
        lines += ["", "Lower-rank preference:"]
        lines += ["- " + l.text.replace("\n", "\n  ") for l in lower]
    lines += ["", "Over-optimisation review:"]
    for r in runs:
        rv = reviews[r.name]
        lines.append(f"- {r.name} ({display(r.objective)}, rank {r.rank}): "
                     + ("; ".join(rv.flags) if rv.flags else "no flags"))
    if cautions:
        lines += ["", "Cautions:"] + [f"- {c}" for c in cautions]
    return "\n".join(lines)
