"""Over-optimisation review of one run from its log (design.md section 10).

What it looks at:

1. the training margin (``rewards/margins``) in the early half of the logged train steps
   against the late half;
2. how the margin was won: the change of ``rewards/chosen`` and ``rewards/rejected`` from
   the early to the late half (a margin won by pushing rejected down while chosen also
   falls is likelihood displacement, worth knowing about);
3. held-out behaviour against the starting point: with a :class:`~prefopt.results.RunResult`
   that has ``heldout`` and ``baseline`` evaluations, the objective-agnostic accuracy
   (pairs gained) and mean margin (paired bootstrap interval); otherwise the first and
   last ``eval_rewards/margins`` entries of the log.

Flags (exact strings, see the constants below): ``TRAIN_IMPROVED`` when the train margin
rose, ``WEAK_SIGNAL`` when it did not, and ``INFLATION`` when it rose but held-out stayed
flat.

Accepted sources: a RunResult, a list of log entries (prefopt's JSONL entries or TRL's
``log_history``), a ``trainer_state.json`` dict, or a path to a ``.jsonl`` log, a run's
``result.json`` or a ``trainer_state.json`` file. From the shell:
``python -m prefopt.review path/to/trainer_state.json``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .results import RunResult, _check_metric, read_jsonl_log
from .stats import bootstrap_mean_diff

TRAIN_IMPROVED = "train margin improved: confirm with held-out pairs"
WEAK_SIGNAL = "weak training signal: check rank, LR or pair quality"
INFLATION = "likely margin inflation"
FLAGS = (TRAIN_IMPROVED, WEAK_SIGNAL, INFLATION)


@dataclass
class Review:
    """Result of :func:`review`. Numbers are None when the log does not have them."""

    name: str
    n_train_entries: int = 0
    n_eval_entries: int = 0
    train_margin_early: Optional[float] = None
    train_margin_late: Optional[float] = None
    train_gain: Optional[float] = None
    train_gain_se: Optional[float] = None
    train_improved: Optional[bool] = None
    chosen_early: Optional[float] = None
    chosen_late: Optional[float] = None
    rejected_early: Optional[float] = None
    rejected_late: Optional[float] = None
    heldout_source: Optional[str] = None  # "baseline", "eval log" or None
    metric: str = "avg"
    heldout_n: Optional[int] = None
    heldout_correct: Optional[int] = None
    baseline_correct: Optional[int] = None
    heldout_margin: Optional[float] = None
    baseline_margin: Optional[float] = None
    heldout_margin_ci: Optional[Tuple[float, float]] = None
    eval_margin_first: Optional[float] = None
    eval_margin_last: Optional[float] = None
    eval_first_step: Optional[float] = None
    heldout_flat: Optional[bool] = None
    flags: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        if d["heldout_margin_ci"] is not None:
            d["heldout_margin_ci"] = list(d["heldout_margin_ci"])
        return d

    @property
    def text(self) -> str:
        head = f"{self.name}: " + ("; ".join(self.flags) if self.flags else "no flags")
        return head + "".join(f"\n  - {n}" for n in self.notes)


def _entries_from(source) -> Tuple[List[Dict[str, Any]], Optional[RunResult], Optional[str]]:
    """Normalise a review source into (log entries, run or None, name hint)."""
    if isinstance(source, RunResult):
        return source.log, source, source.name
    if isinstance(source, dict):
        if "log_history" not in source:
            raise ValueError("a dict source must be a trainer_state.json with 'log_history'")
        return list(source["log_history"]), None, None
    if isinstance(source, (list, tuple)):
        return list(source), None, None
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"log not found: {path}")
        if path.suffix == ".jsonl":
            hint = path.parent.name if path.stem in ("log", "train", "logs") else path.stem
            return read_jsonl_log(path), None, hint or path.stem
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, dict) and "log_history" in data:
            return list(data["log_history"]), None, path.parent.name or path.stem
        if isinstance(data, dict) and {"name", "objective", "rank", "log"} <= set(data):
            run = RunResult.from_dict(data)  # a run's result.json
            return run.log, run, run.name
        if isinstance(data, list):
            return data, None, path.stem
        raise ValueError(f"{path}: expected a trainer_state.json (with 'log_history'), a run's "
                         "result.json or a list of log entries")
    raise TypeError(f"cannot review a {type(source).__name__}: pass a RunResult, a list of log "
                    "entries, a trainer_state.json dict or a path")


def _is_eval(e: Dict[str, Any]) -> bool:
    return any(str(k).startswith("eval_") for k in e)


def _value(e: Dict[str, Any], key: str, where: str) -> float:
    try:
        x = float(e[key])
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {key} is not a number: {e[key]!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{where}: {key} is {x} (a NaN or inf in the log)")
    return x


def _sorted_by_step(entries):
    return [e for _, e in sorted(enumerate(entries), key=lambda t: (float(t[1].get("step", t[0])), t[0]))]


def split_log(entries: List[Dict[str, Any]]):
    """(train entries, eval entries) of a prefopt JSONL log or a TRL log_history, by step.

    Train entries are those with ``rewards/margins`` and no ``eval_`` key (TRL's final
    summary entry counts only if leftover train metrics were merged into it); eval entries
    are those with ``eval_rewards/margins``.
    """
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ValueError(f"log entry {i} is a {type(e).__name__}, expected a dict")
    train = [e for e in entries if not _is_eval(e) and "rewards/margins" in e]
    evals = [e for e in entries if "eval_rewards/margins" in e]
    return _sorted_by_step(train), _sorted_by_step(evals)


def _mean(xs):
    return float(np.mean(xs)) if len(xs) else None


def review(source, name: Optional[str] = None, metric: str = "avg", min_train_gain: float = 0.01,
           flat_frac: float = 0.25, n_boot: int = 10000, seed: int = 0,
           conf: float = 0.95) -> Review:
    """Over-optimisation review of one run (see the module docstring).

    ``min_train_gain``: the late-half mean train margin must exceed the early-half mean by
    more than this (in the log's reward units) and, when each half has two or more entries,
    by more than two standard errors, to count as "improved".
    ``flat_frac``: with only an eval log, held-out counts as flat when the held-out margin
    gain is at most this fraction of the train margin gain (both are ``rewards/margins``
    in the same units). With a baseline evaluation, held-out is flat when no extra pair is
    right and the paired bootstrap interval of the mean margin gain reaches 0 or below.
    """
    _check_metric(metric)
    entries, run, hint = _entries_from(source)
    r = Review(name=name or hint or "run", metric=metric)
    train, evals = split_log(entries)
    r.n_train_entries, r.n_eval_entries = len(train), len(evals)

    # 1. train margin, early half vs late half (the middle entry of an odd count is left out)
    m = [_value(e, "rewards/margins", f"train entry at step {e.get('step', '?')}") for e in train]
    h = len(m) // 2
    if h >= 1:
        early, late = m[:h], m[len(m) - h:]
        r.train_margin_early, r.train_margin_late = _mean(early), _mean(late)
        r.train_gain = r.train_margin_late - r.train_margin_early
        if h >= 2:
            r.train_gain_se = float(math.sqrt(np.var(early, ddof=1) / h + np.var(late, ddof=1) / h))
        r.train_improved = bool(r.train_gain > min_train_gain
                                and (r.train_gain_se is None or r.train_gain > 2.0 * r.train_gain_se))
        # 2. how the margin moved: chosen vs rejected rewards
        if all("rewards/chosen" in e and "rewards/rejected" in e for e in train):
            c = [_value(e, "rewards/chosen", f"train entry at step {e.get('step', '?')}") for e in train]
            j = [_value(e, "rewards/rejected", f"train entry at step {e.get('step', '?')}") for e in train]
            r.chosen_early, r.chosen_late = _mean(c[:h]), _mean(c[len(c) - h:])
            r.rejected_early, r.rejected_late = _mean(j[:h]), _mean(j[len(j) - h:])
            r.notes.append(_how_won(r))
        r.notes.append(f"train margin (rewards/margins) early half {r.train_margin_early:.4g}, "
                       f"late half {r.train_margin_late:.4g} ({r.train_gain:+.4g}"
                       + (f", 2 s.e. = {2 * r.train_gain_se:.3g}" if r.train_gain_se is not None else "")
                       + ")")
    elif len(m) == 1:
        r.train_margin_late = m[0]
        r.notes.append("only one train log entry: cannot judge the training trend")
    else:
        r.notes.append("no train entries with rewards/margins in the log")

    # 3. held-out against the starting point
    if run is not None and run.heldout is not None and run.baseline is not None:
        _heldout_vs_baseline(r, run, metric, n_boot, seed, conf)
    elif len(evals) >= 2:
        _heldout_from_eval_log(r, evals, flat_frac)
    else:
        r.notes.append("no held-out evaluation against a baseline: over-optimisation cannot be checked")

    if r.train_improved is True:
        r.flags.append(TRAIN_IMPROVED)
        if r.heldout_flat:
            r.flags.append(INFLATION)
    elif r.train_improved is False:
        r.flags.append(WEAK_SIGNAL)
    return r


def _how_won(r: Review) -> str:
    dc = r.chosen_late - r.chosen_early
    dj = r.rejected_late - r.rejected_early
    s = (f"late chosen reward {r.chosen_late:.4g} vs rejected {r.rejected_late:.4g} "
         f"(chosen {dc:+.4g}, rejected {dj:+.4g} from the early half)")
    if dj < 0 and dc < 0:
        s += ": the margin was won by pushing rejected down while chosen fell too (likelihood displacement)"
    elif dj < 0 and -dj > 3 * abs(dc):
        s += ": the margin was won mostly by pushing rejected down"
    elif dc > 0:
        s += ": chosen rewards rose"
    return s


def _heldout_vs_baseline(r: Review, run: RunResult, metric, n_boot, seed, conf):
    hd, bl = run.heldout, run.baseline
    if set(hd.ids()) != set(bl.ids()):
        missing = sorted(set(hd.ids()) ^ set(bl.ids()))[:5]
        raise ValueError(f"run {run.name}: held-out and baseline pair ids differ (e.g. {missing})")
    r.heldout_source = "baseline"
    r.heldout_n = hd.n
    r.heldout_correct, r.baseline_correct = hd.n_correct(metric), bl.n_correct(metric)
    r.heldout_margin, r.baseline_margin = hd.mean_margin(metric), bl.mean_margin(metric)
    if hd.n:
        bmap = bl.by_id()
        x = [p.margin(metric) for p in hd.pairs]
        y = [bmap[p.id].margin(metric) for p in hd.pairs]
        r.heldout_margin_ci = bootstrap_mean_diff(x, y, n_boot=n_boot, seed=seed, conf=conf)
        gained = r.heldout_correct - r.baseline_correct
        r.heldout_flat = bool(gained <= 0 and r.heldout_margin_ci[0] <= 0.0)
        lo, hi = r.heldout_margin_ci
        r.notes.append(
            f"held-out ({metric}) vs base model: {r.heldout_correct}/{hd.n} right vs "
            f"{r.baseline_correct}/{hd.n} ({gained:+d} pairs), mean margin {r.heldout_margin:.4g} vs "
            f"{r.baseline_margin:.4g} (gain {r.heldout_margin - r.baseline_margin:+.4g}, "
            f"{int(round(conf * 100))}% bootstrap [{lo:.3g}, {hi:.3g}])")


def _heldout_from_eval_log(r: Review, evals, flat_frac):
    where = "eval entry at step {}"
    first, last = evals[0], evals[-1]
    r.heldout_source = "eval log"
    r.eval_margin_first = _value(first, "eval_rewards/margins", where.format(first.get("step", "?")))
    r.eval_margin_last = _value(last, "eval_rewards/margins", where.format(last.get("step", "?")))
    r.eval_first_step = first.get("step")
    gain = r.eval_margin_last - r.eval_margin_first
    start = ("the base model (step 0)" if r.eval_first_step in (0, 0.0)
             else f"the first evaluation (step {r.eval_first_step}, not the base model)")
    note = (f"held-out eval_rewards/margins {r.eval_margin_first:.4g} at {start} -> "
            f"{r.eval_margin_last:.4g} at step {last.get('step', '?')} ({gain:+.4g})")
    if "eval_rewards/accuracies" in first and "eval_rewards/accuracies" in last:
        a0 = _value(first, "eval_rewards/accuracies", where.format(first.get("step", "?")))
        a1 = _value(last, "eval_rewards/accuracies", where.format(last.get("step", "?")))
        note += f"; eval_rewards/accuracies {a0:.3g} -> {a1:.3g}"
        if a0 == 0.0 and r.eval_margin_first == 0.0:
            note += " (0 at the start is a tie: policy = reference, strict >)"
    r.notes.append(note)
    if r.train_gain is not None and r.train_gain > 0:
        r.heldout_flat = bool(gain <= flat_frac * r.train_gain)
        if r.heldout_flat:
            r.notes.append(f"held-out margin gain {gain:+.4g} is at most {flat_frac:g} x the "
                           f"train margin gain {r.train_gain:+.4g}: held-out is flat")


def main(argv=None) -> int:
    """``python -m prefopt.review LOG...``: print the review of each log (a prefopt
    ``log.jsonl``, a run's ``result.json`` or a TRL ``trainer_state.json``)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m prefopt.review", description=main.__doc__)
    ap.add_argument("logs", nargs="+", help="log.jsonl, result.json or trainer_state.json")
    ap.add_argument("--metric", choices=("avg", "ref"), default="avg")
    args = ap.parse_args(argv)
    for path in args.logs:
        print(review(Path(path), metric=args.metric).text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
