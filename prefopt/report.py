"""The ablation report: ``report.md`` (+ ``verdict.json``, ``runs.json`` and plots) in an
output directory, and :func:`table`, the ablation table as a pandas DataFrame (or a list of
dicts when pandas is not installed).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .decide import Verdict, decide, display
from .results import METRICS, RunResult, _check_metric
from .review import Review, review


def _key(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested dicts as dotted keys; a nested key equal to the same top-level setting is dropped
    (the run layer stores the ablation's fixed settings again under ``fixed``)."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            for k2, v2 in _flatten(v, key + ".").items():
                out[k2] = v2
        else:
            out[key] = v
    for key in [k for k in out if "." in k]:
        short = key.rsplit(".", 1)[1]
        if short in out and _key(out[short]) == _key(out[key]):
            del out[key]
    return out


def fixed_settings(runs: Sequence[RunResult]) -> Tuple[Dict[str, Any], Dict[str, List[Any]]]:
    """(settings equal in every run, {setting: [value per run]} for those that differ).

    Nested setting dicts are flattened to dotted keys. A setting missing from some runs
    counts as differing (value None there).
    """
    runs = list(runs)
    flat = [_flatten(r.settings) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    fixed, varying = {}, {}
    for k in keys:
        vals = [f.get(k) for f in flat]
        if all(k in f for f in flat) and len({_key(v) for v in vals}) == 1:
            fixed[k] = vals[0]
        else:
            varying[k] = vals
    return fixed, varying


def _rows(runs: Sequence[RunResult], metric: str, reviews: Dict[str, Review]) -> List[Dict[str, Any]]:
    slices = sorted({s for r in runs if r.heldout is not None for s in r.heldout.slices()})
    rows = []
    for r in runs:
        rv = reviews[r.name]
        h, b = r.heldout, r.baseline
        row: Dict[str, Any] = {"run": r.name, "objective": display(r.objective), "rank": r.rank,
                               "train_margin_late": rv.train_margin_late}
        for m in METRICS:
            row[f"heldout_{m}_acc"] = h.accuracy(m) if h is not None else None
        for m in METRICS:
            row[f"heldout_{m}_margin"] = h.mean_margin(m) if h is not None else None
        for s in slices:
            for m in METRICS:
                row[f"{m}_acc/{s}"] = h.accuracy(m, s) if h is not None else None
        row[f"baseline_{metric}_acc"] = b.accuracy(metric) if b is not None else None
        if h is not None and b is not None and set(h.ids()) == set(b.ids()) and h.n:
            row["lift_pairs"] = h.n_correct(metric) - b.n_correct(metric)
            row["lift_points"] = 100.0 * row["lift_pairs"] / h.n
        else:
            row["lift_pairs"] = row["lift_points"] = None
        if h is not None and any(p.score is not None for p in h.pairs):
            row["heldout_score"] = h.mean_score()
        row["flags"] = "; ".join(rv.flags)
        rows.append(row)
    return rows


def table(runs: Sequence[RunResult], metric: str = "avg", reviews: Optional[Dict[str, Review]] = None):
    """The ablation table, one row per run: objective, rank, late train margin, held-out
    ``avg``/``ref`` accuracy overall and per slice (``avg_acc/<slice>``), held-out margins,
    the base model's accuracy and the lift over it (in pairs and points, by ``metric``),
    and the review flags. A pandas DataFrame when pandas is installed, else a list of dicts.
    """
    _check_metric(metric)
    runs = list(runs)
    reviews = reviews or {r.name: review(r, metric=metric) for r in runs}
    rows = _rows(runs, metric, reviews)
    try:
        import pandas as pd
    except ImportError:
        return rows
    return pd.DataFrame(rows)


# ---- markdown --------------------------------------------------------------------------

def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{100 * v:.1f}%" if pct else f"{v:.4g}"
    if isinstance(v, (list, tuple)) and len(v) > 8:
        v = ", ".join(str(x) for x in v[:6]) + f", ... ({len(v)} items)"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _md_table(header: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _link(path: Optional[str], out_dir: Path) -> str:
    if not path:
        return "-"
    p = Path(path)
    try:
        rel = os.path.relpath(p.resolve(), out_dir.resolve())
    except ValueError:  # other drive on Windows
        rel = str(p)
    if rel.startswith(".."):
        rel = str(p.resolve())
    return f"[{rel}]({rel.replace(' ', '%20')})"


def write_report(runs: Sequence[RunResult], out_dir, verdict: Optional[Verdict] = None,
                 metric: str = "avg", important_slices: Optional[Iterable[str]] = None,
                 plots: bool = True, title: str = "prefopt ablation", n_boot: int = 10000,
                 seed: int = 0) -> Path:
    """Write ``report.md``, ``verdict.json``, ``runs.json`` and (if matplotlib is installed
    and ``plots``) ``plots/*.png`` into ``out_dir``; return the path of report.md.

    ``verdict``: a :class:`~prefopt.decide.Verdict` already computed with :func:`decide`;
    computed here (with ``metric``, ``important_slices``, ``n_boot``, ``seed``) if None.
    """
    runs = list(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if verdict is None:
        verdict = decide(runs, metric=metric, important_slices=important_slices,
                         n_boot=n_boot, seed=seed)
    metric = verdict.metric
    reviews = verdict.reviews
    rows = _rows(runs, metric, reviews)

    plot_paths, plot_note = {}, None
    if plots:
        try:
            from . import plots as _plots
            plot_paths = _plots.plot_all(runs, out / "plots", metric=metric)
        except ImportError as e:
            plot_note = f"Plots skipped: {e}"

    (out / "verdict.json").write_text(json.dumps(verdict.to_dict(), indent=1, default=str))
    (out / "runs.json").write_text(json.dumps([r.to_dict() for r in runs], indent=1, default=str))

    L: List[str] = [f"# {title}", ""]
    L += ["## Verdict", "", verdict.text, ""]

    fixed, varying = fixed_settings(runs)
    L += ["## Settings fixed across runs", ""]
    L.append(_md_table(["setting", "value"], [[_fmt(k), _fmt(v)] for k, v in fixed.items()])
             if fixed else "(no settings recorded)")
    if varying:
        L += ["", "Settings that differ between runs:", ""]
        L.append(_md_table(["setting"] + [r.name for r in runs],
                           [[_fmt(k)] + [_fmt(v) for v in vals] for k, vals in varying.items()]))
    L.append("")

    n = verdict.n
    L += ["## Ablation table", "",
          f"{n} held-out pairs; one pair is {100.0 / n:.3g} accuracy points. `avg`: Lc/nc > Lr/nr "
          "(mean log-prob per completion token); `ref`: (Lc-Rc) > (Lr-Rr) (DPO's implicit "
          f"reward; 0% for the base model by construction). Lift is by `{metric}`.", ""]
    scored = any("heldout_score" in r for r in rows)
    header = ["run", "objective", "rank", "train margin (late)", "held-out avg acc",
              "held-out ref acc", "avg margin", "ref margin", f"base {metric} acc",
              "lift (pairs / points)"] + (["scorer mean"] if scored else []) + ["flags"]
    body = []
    for r in rows:
        lift = ("-" if r["lift_pairs"] is None
                else f"{r['lift_pairs']:+d} / {r['lift_points']:+.1f}")
        body.append([_fmt(r["run"]), r["objective"], str(r["rank"]), _fmt(r["train_margin_late"]),
                     _fmt(r["heldout_avg_acc"], True), _fmt(r["heldout_ref_acc"], True),
                     _fmt(r["heldout_avg_margin"]), _fmt(r["heldout_ref_margin"]),
                     _fmt(r[f"baseline_{metric}_acc"], True), lift]
                    + ([_fmt(r.get("heldout_score"))] if scored else [])
                    + [_fmt(r["flags"]) or "-"])
    L += [_md_table(header, body), ""]

    slices = sorted({s for r in runs if r.heldout is not None for s in r.heldout.slices()})
    if slices:
        ref_ev = next(r.heldout for r in runs if r.heldout is not None)
        L += ["### Held-out accuracy per slice (avg / ref)", ""]
        header = ["run"] + [f"{s} (n={len(ref_ev.select(s))})" for s in slices]
        body = [[_fmt(r["run"])] + [f"{_fmt(r[f'avg_acc/{s}'], True)} / {_fmt(r[f'ref_acc/{s}'], True)}"
                                    for s in slices] for r in rows]
        base = next((r.baseline for r in runs if r.baseline is not None), None)
        if base is not None:
            body.append(["base model"] + [f"{_fmt(base.accuracy('avg', s), True)} / -" for s in slices])
        L += [_md_table(header, body), ""]

    conf = verdict.comparisons[0].conf if verdict.comparisons else 0.95
    L += ["## Statistics", "",
          f"Paired exact McNemar test on the discordant held-out pairs (two-sided binomial), "
          f"{int(round(100 * conf))}% Wilson intervals for the accuracies, seeded paired bootstrap "
          f"interval for the mean held-out `{metric}` margin difference.", ""]
    header = ["rank", "X vs Y", "right (X / Y)", "discordant (X only / Y only)", "McNemar p",
              "Wilson X", "Wilson Y", "margin diff X-Y", "bootstrap interval", "outcome"]
    body = []
    for c in verdict.comparisons:
        body.append([str(c.rank), f"{c.x_label} vs {c.y_label}", f"{c.x_correct} / {c.y_correct} of {c.n}",
                     f"{c.x_only} / {c.y_only}", f"{c.p_value:.3g}",
                     f"[{_fmt(c.x_acc_ci[0], True)}, {_fmt(c.x_acc_ci[1], True)}]",
                     f"[{_fmt(c.y_acc_ci[0], True)}, {_fmt(c.y_acc_ci[1], True)}]",
                     f"{c.x_margin - c.y_margin:+.4g}",
                     f"[{c.margin_ci[0]:.3g}, {c.margin_ci[1]:.3g}]",
                     c.headline.split(": ", 1)[-1]])
    L += [_md_table(header, body), ""]

    L += ["## Over-optimisation review", ""]
    for r in runs:
        rv = reviews[r.name]
        L.append(f"- **{r.name}** ({display(r.objective)}, rank {r.rank}): "
                 + ("; ".join(rv.flags) if rv.flags else "no flags"))
        L += [f"  - {note}" for note in rv.notes]
    L.append("")

    L += ["## Plots", ""]
    if plot_paths:
        captions = {"margins": "Train vs held-out margin", "rewards": "Chosen vs rejected rewards",
                    "slices": "Held-out accuracy per slice"}
        for k, p in plot_paths.items():
            rel = os.path.relpath(p, out)
            L += [f"![{captions.get(k, k)}]({rel})", ""]
    else:
        L += [plot_note or "Plots not requested.", ""]

    L += ["## Logs and adapters", ""]
    L.append(_md_table(["run", "log", "adapter"],
                       [[_fmt(r.name), _link(r.log_path, out), _link(r.adapter_path, out)] for r in runs]))
    L += ["", "Machine-readable: [verdict.json](verdict.json), [runs.json](runs.json).", ""]

    path = out / "report.md"
    path.write_text("\n".join(L), encoding="utf-8")
    return path
