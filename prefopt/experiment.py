"""The main job: the objective x LoRA-rank ablation with everything else fixed (design.md 1, 10).

    res = prefopt.ablate(model, pairs, objectives=["dpo", "simpo"], ranks=[16, 8],
                         base_config=TrainConfig(max_steps=40, ...), out_dir="ablation")
    print(res.verdict)          # plain-words verdict (decision / hint / no evidence)
    res.table                   # one row per run (a pandas DataFrame when pandas is installed)

Every run shares the model, the split, the seed, the pairs, the lengths, the steps, the LR,
the batch and the evaluation; only the objective (with its own parameters, e.g. beta) and the
rank differ. ``ablate`` asserts that, and ``check_comparable`` refuses to compare runs --
including previously saved ones -- whose fixed settings differ.

Layout of ``out_dir``: ``<objective>-r<rank>/`` per run (log.jsonl, adapter/, checkpoint/,
result.json), ``baseline.json`` (the base model's held-out evaluation, computed once),
``table.csv``, ``verdict.json``, ``report.md`` and the plots.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from . import batching
from .train import OBJECTIVE_FIELDS, TrainConfig, _LazyBar, prepare_pairs, train

__all__ = ["ablate", "AblationResult", "check_comparable", "run_name", "results_table",
           "load_ablation"]


def run_name(objective: str, rank: int) -> str:
    return f"{objective}-r{int(rank)}"


@dataclass
class AblationResult:
    """The ablation's runs, the base model's held-out evaluation, the verdict and the table."""

    runs: list
    baseline: Any
    verdict: Any
    table: Any
    out_dir: Path
    report_path: Optional[Path] = None
    plot_paths: List[Path] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)

    def __repr__(self):
        return (f"AblationResult({len(self.runs)} runs in {self.out_dir})\n"
                f"{getattr(self.verdict, 'text', self.verdict)}")


# ---------------------------------------------------------------------------------------------
# fixed settings
# ---------------------------------------------------------------------------------------------

def _fixed(run) -> dict:
    s = run.settings if hasattr(run, "settings") else run
    if "fixed" not in s:
        raise ValueError(f"run {getattr(run, 'name', '?')} carries no record of its fixed "
                         f"settings; it was not produced by prefopt.ablate and cannot be "
                         f"checked for comparability")
    return s["fixed"]


def check_comparable(runs: Sequence) -> None:
    """Raises ValueError unless every run has identical fixed settings (model, data, split,
    held-out pairs, seed, steps, LR, schedule, batch, lengths, LoRA alpha/rank ratio, targets,
    dropout, evaluation). Objective parameters and the rank may differ."""
    runs = list(runs)
    if len(runs) < 2:
        return
    ref = _fixed(runs[0])
    for r in runs[1:]:
        other = _fixed(r)
        keys = sorted(set(ref) | set(other))
        diff = [k for k in keys if json.dumps(ref.get(k), sort_keys=True)
                != json.dumps(other.get(k), sort_keys=True)]
        if diff:
            detail = "; ".join(f"{k}: {ref.get(k)!r} vs {other.get(k)!r}" for k in diff[:8])
            raise ValueError(f"runs {runs[0].name} and {r.name} differ in fixed settings "
                             f"({detail}); refusing to compare them -- rerun with identical "
                             f"settings")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate run names {names}")


def _model_identity(model) -> dict:
    core = batching.core_of(model)
    cfg = getattr(model, "config", None)
    vocab = cfg.get("vocab_size") if isinstance(cfg, dict) else None
    src = getattr(model, "source", None)
    return {"model": str(src) if src is not None else type(model).__name__,
            "model_fingerprint": batching.model_fingerprint(core, vocab)[:16]}


def _split(model, pairs, heldout, heldout_ids, split_seed):
    """(train, held-out) records from a (train, held-out) tuple or one list of records."""
    if isinstance(pairs, tuple) and len(pairs) == 2:
        if heldout is not None or heldout_ids is not None:
            raise ValueError("pairs is already a (train, held-out) tuple; do not also pass "
                             "heldout / heldout_ids")
        return list(pairs[0]), list(pairs[1])
    pairs = list(pairs)
    if pairs and isinstance(pairs[0], (str, bytes)) or isinstance(pairs, (str, bytes)):
        raise TypeError("pairs must be records or a (train, held-out) tuple; load files with "
                        "prefopt.data.load_pairs")
    if pairs and isinstance(pairs[0], batching.TokenPair):
        if heldout_ids is not None:
            hold = {str(i) for i in heldout_ids}
        else:
            import numpy as np
            n = heldout if heldout is not None else max(1, round(0.2 * len(pairs)))
            order = np.random.default_rng(split_seed).permutation(len(pairs))
            hold = {pairs[i].id for i in order[:n]}
        return [p for p in pairs if p.id not in hold], [p for p in pairs if p.id in hold]
    from . import data as pdata

    recs = pairs if all(isinstance(p, pdata.PreferencePair) for p in pairs) else pdata.load_pairs(pairs)
    kw = {"seed": split_seed}
    if heldout_ids is not None:
        kw["heldout_ids"] = heldout_ids
    elif heldout is not None:
        kw["heldout"] = heldout
        kw["use_split_field"] = False
    return pdata.split_pairs(recs, **kw)


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------

def results_table(runs: Sequence, baseline=None):
    """One row per run (plus the base model): held-out accuracies and margins overall and per
    slice, first/last train loss and margin. A pandas DataFrame when pandas is installed,
    else a list of dicts."""
    rows = []

    def ev_cols(ev):
        m = ev.agnostic_metrics()
        cols = {"heldout_n": ev.n,
                "avg_correct": ev.n_correct("avg"), "avg_accuracy": m["avg_accuracy"],
                "avg_margin": m["avg_margin"],
                "ref_correct": ev.n_correct("ref"), "ref_accuracy": m["ref_accuracy"],
                "ref_margin": m["ref_margin"]}
        for s in ev.slices():
            cols[f"avg_accuracy/{s}"] = m[f"avg_accuracy/{s}"]
        if ev.mean_score() is not None:
            cols["score"] = ev.mean_score()
        return cols

    if baseline is not None:
        rows.append({"run": "base", "objective": "-", "rank": 0, **ev_cols(baseline)})
    for r in runs:
        tr = r.train_entries()
        row = {"run": r.name, "objective": r.objective, "rank": r.rank,
               "steps": tr[-1]["step"] if tr else 0,
               "train_loss_first": tr[0]["loss"] if tr else float("nan"),
               "train_loss_last": tr[-1]["loss"] if tr else float("nan"),
               "train_margin_last": tr[-1]["rewards/margins"] if tr else float("nan")}
        if r.heldout is not None:
            row.update(ev_cols(r.heldout))
        if "wall_time_s" in r.settings:
            row["wall_time_s"] = r.settings["wall_time_s"]
        rows.append(row)
    try:
        import pandas as pd
    except ImportError:
        return rows
    return pd.DataFrame(rows)


def _write_table(table, path: Path) -> None:
    if hasattr(table, "to_csv"):
        table.to_csv(path, index=False, float_format="%.6g")
        return
    import csv

    keys = list(dict.fromkeys(k for r in table for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(table)


# ---------------------------------------------------------------------------------------------
# ablate
# ---------------------------------------------------------------------------------------------

def ablate(model, pairs, objectives: Sequence[str] = ("dpo", "simpo"),
           ranks: Sequence[int] = (16, 8), base_config: Optional[TrainConfig] = None,
           out_dir="prefopt-ablation", *, objective_params: Optional[Dict[str, dict]] = None,
           heldout=None, heldout_ids: Optional[Iterable[str]] = None, split_seed: int = 0,
           metric: str = "avg", important_slices: Optional[Iterable[str]] = None,
           scorer: Optional[Callable] = None, previous_runs: Optional[Sequence] = None,
           progress: bool = True, resume: bool = True, plots: bool = True,
           report: bool = True, data_label: Optional[str] = None,
           fresh: bool = False) -> AblationResult:
    """Runs the objectives x ranks matrix with everything else fixed and decides.

    model: a loaded model (``prefopt.load`` / ``prefopt.models.fetch``) or a core Model with
      tokenised pairs.
    pairs: a list of records (split by their ``split`` field when present, else seeded by
      ``split_seed``; ``heldout`` = count or fraction, or ``heldout_ids``) or a
      ``(train, held_out)`` tuple.
    base_config: every fixed setting (steps, LR, batch, lengths, seed, LoRA alpha/targets, ...).
      Its objective-specific fields must stay at their defaults: set those per objective with
      ``objective_params={"dpo": {"beta": 0.1}, "simpo": {"beta": 2.0, "gamma_beta_ratio": 0.5}}``.
    previous_runs: RunResults (or run directories) to include in the comparison instead of
      rerunning them; refused if their fixed settings differ.
    resume: reuse finished runs and continue interrupted ones found in out_dir (same settings);
    fresh=True retrains everything.
    Returns an AblationResult (runs, baseline, verdict, table); writes everything under out_dir.
    """
    from . import evaluate as ev_mod
    from . import results

    t_start = time.time()
    base = base_config or TrainConfig()
    objectives = [str(o).lower() for o in objectives]
    ranks = [int(r) for r in ranks]
    if not objectives or not ranks:
        raise ValueError("ablate needs at least one objective and one rank")
    if len(set(objectives)) != len(objectives) or len(set(ranks)) != len(ranks):
        raise ValueError(f"duplicate objectives or ranks: {objectives}, {ranks}")
    if len(objectives) * len(ranks) < 2 and not previous_runs:
        raise ValueError("an ablation needs at least two runs")
    defaults = TrainConfig()
    set_obj = [k for k in OBJECTIVE_FIELDS if k != "objective"
               and getattr(base, k) != getattr(defaults, k)]
    if set_obj:
        raise ValueError(f"base_config sets objective-specific parameters {set_obj}; give them "
                         f"per objective with objective_params={{'simpo': {{...}}}}")
    objective_params = {k.lower(): dict(v) for k, v in (objective_params or {}).items()}
    unknown = sorted(set(objective_params) - set(objectives))
    if unknown:
        raise ValueError(f"objective_params for objectives not in the ablation: {unknown}")
    for o, params in objective_params.items():
        bad = sorted(set(params) - set(OBJECTIVE_FIELDS))
        if bad:
            raise ValueError(f"objective_params[{o!r}] may only set {OBJECTIVE_FIELDS}, got {bad}")
    configs = {}
    for o in objectives:
        for k in ranks:
            configs[(o, k)] = base.replace(objective=o, lora_rank=k,
                                           **objective_params.get(o, {}))  # validates
    fixed_cfg = {c.fixed_settings().__repr__() for c in configs.values()}
    assert len(fixed_cfg) == 1, "internal: fixed settings differ across the matrix"

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_recs, held_recs = _split(model, pairs, heldout, heldout_ids, split_seed)
    if not held_recs:
        raise ValueError("no held-out pairs: the ablation decides on held-out pairs only")
    if not train_recs:
        raise ValueError("no training pairs")

    # tokenise once (same pairs for every run), compute the baseline once
    train_tps, dropped_tr = prepare_pairs(model, train_recs, base, "train")
    held_tps, dropped_he = prepare_pairs(model, held_recs, base, "held-out")
    core = batching.core_of(model)
    core.lora_remove()
    cache = out / "ref_cache"
    vocab = model.config.get("vocab_size") if isinstance(getattr(model, "config", None), dict) else None
    t0 = time.time()
    bar = _LazyBar(len(held_tps), "baseline (held-out, adapter off)", progress)
    held_ref, held_n, _ = batching.reference_logps(
        core, held_tps, cache_dir=cache, batch_size=base.eval_batch_size,
        key_extra=(base.max_length, base.max_prompt_length), vocab_size=vocab,
        progress=bar.update)
    bar.close()
    scores = None
    if scorer is not None:
        scores = ev_mod.score_generations(core, getattr(model, "tokenizer", None), held_tps,
                                          scorer, use_lora=False)
    baseline = ev_mod.build_eval(held_tps, held_ref, held_n, held_ref, None, scores=scores)
    (out / "baseline.json").write_text(json.dumps(baseline.to_dict(), indent=1))
    timings = {"baseline_s": time.time() - t0}

    identity = _model_identity(model)
    fixed_common = dict(identity,
                        data_hash=batching.data_hash(train_tps, batching.data_hash(held_tps))[:16],
                        heldout_ids=sorted(t.id for t in held_tps),
                        train_pairs=len(train_tps), dropped_pairs=dropped_tr + dropped_he,
                        scorer=getattr(scorer, "__name__", repr(scorer)) if scorer else None)

    prev = []
    for p in previous_runs or []:
        if isinstance(p, (str, Path)):
            p = results.RunResult.load_json(Path(p) / "result.json")
        prev.append(p)
    prev_keys = {(p.objective.lower(), p.rank) for p in prev}

    runs = []
    for (o, k), c in configs.items():
        name = run_name(o, k)
        if (o, k) in prev_keys:
            continue
        t1 = time.time()
        fixed = dict(c.fixed_settings(), **fixed_common)
        r = train(model, train_tps, held_tps, c, out / name, name=name, progress=progress,
                  resume=resume, overwrite=fresh, scorer=scorer, baseline=baseline,
                  extra_settings={"fixed": fixed, "data": data_label})
        timings[name + "_s"] = time.time() - t1
        if "wall_time_s" not in r.settings:
            r.settings["wall_time_s"] = round(time.time() - t1, 2)
            r.save_json(out / name / "result.json")
        runs.append(r)
    runs = prev + runs
    check_comparable(runs)
    order = {run_name(o, k): i for i, (o, k) in enumerate(configs)}
    runs.sort(key=lambda r: order.get(r.name, len(order)))

    from . import decide as dec

    verdict = dec.decide(runs, metric=metric, important_slices=important_slices)
    (out / "verdict.json").write_text(json.dumps(verdict.to_dict(), indent=1, default=str))
    table = results_table(runs, baseline)
    _write_table(table, out / "table.csv")
    timings["total_s"] = time.time() - t_start
    plot_paths, report_path = [], None
    if report:
        report_path, plot_paths = _make_report(runs, verdict, table, out, plots, metric,
                                               important_slices, timings)
    elif plots:
        plot_paths = _make_plots(runs, out, metric)
    return AblationResult(runs=runs, baseline=baseline, verdict=verdict, table=table,
                          out_dir=out, report_path=report_path, plot_paths=plot_paths,
                          timings=timings)


def _make_plots(runs, out: Path, metric: str) -> list:
    try:
        from . import plots as pl
        paths = pl.plot_all(runs, out / "plots", metric=metric)
    except ImportError as e:  # matplotlib missing
        print(f"prefopt: plots skipped ({e})")
        return []
    return [Path(p) for p in paths.values()]


def _make_report(runs, verdict, table, out: Path, plots: bool, metric, important_slices, timings):
    """report.md (prefopt.report) with the plots, plus the timings of this ablation."""
    from . import report as rep

    path = Path(rep.write_report(runs, out, verdict=verdict, metric=metric,
                                 important_slices=important_slices, plots=plots))
    plot_paths = sorted((out / "plots").glob("*.png")) if plots else []
    lines = ["", "## Wall time (this invocation)", "", "| part | seconds |", "|---|---|"]
    lines += [f"| {k[:-2]} | {v:.1f} |" for k, v in timings.items()]
    lines.append("")
    lines.append("Runs found finished in the output directory are reused, not retrained "
                 "(their time is not counted above).")
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path, plot_paths


def load_ablation(out_dir) -> list:
    """The RunResults saved under an ablation's out_dir."""
    from . import results

    out = Path(out_dir)
    runs = [results.RunResult.load_json(p) for p in sorted(out.glob("*/result.json"))]
    if not runs:
        raise FileNotFoundError(f"no finished runs under {out}")
    return runs
