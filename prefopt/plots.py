"""Plots of an ablation, saved as PNG (matplotlib is an optional extra: prefopt[plots]).

- :func:`plot_margins`: per run, the train margin (``rewards/margins``) and the held-out
  margin (``eval_rewards/margins``) over steps.
- :func:`plot_rewards`: per run, ``rewards/chosen`` and ``rewards/rejected`` over steps
  (is the margin won by pushing rejected down?).
- :func:`plot_slice_accuracy`: held-out accuracy (objective-agnostic ``avg`` or ``ref``)
  overall and per slice, one bar per run, the base model as a reference bar.

Figures are built with matplotlib's object API and the Agg canvas, so nothing changes the
global pyplot backend (safe in notebooks and on headless machines).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence

from .results import RunResult, _check_metric
from .review import split_log


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("prefopt plots need matplotlib: pip install 'prefopt[plots]' "
                          "(or pip install matplotlib)") from e
    return Figure, FigureCanvasAgg


def _label(run: RunResult) -> str:
    from .decide import display
    return f"{run.name}: {display(run.objective)} r{run.rank}"


def _grid(n: int):
    cols = min(n, 2)
    return int(math.ceil(n / cols)), cols


def _new_figure(n_panels: int, panel_w=5.2, panel_h=3.4):
    Figure, Canvas = _matplotlib()
    rows, cols = _grid(n_panels)
    fig = Figure(figsize=(panel_w * cols, panel_h * rows), dpi=100, layout="constrained")
    Canvas(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    return fig, axes


def _series(entries, key):
    xs, ys = [], []
    for i, e in enumerate(entries):
        if key in e and e[key] is not None:
            v = float(e[key])
            if math.isfinite(v):
                xs.append(float(e.get("step", i)))
                ys.append(v)
    return xs, ys


def _plot_train(ax, x, y, colour, label):
    """Raw per-step values, plus a centred running mean when there are many noisy steps."""
    if len(y) < 12:
        ax.plot(x, y, color=colour, lw=1.5, label=label)
        return
    import numpy as np
    w = max(3, len(y) // 10) | 1  # odd window
    yp = np.pad(np.asarray(y, dtype=float), w // 2, mode="edge")
    smooth = np.convolve(yp, np.ones(w) / w, mode="valid")
    ax.plot(x, y, color=colour, lw=0.8, alpha=0.35)
    ax.plot(x, smooth, color=colour, lw=1.8, label=f"{label} (running mean of {w})")


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _check_runs(runs) -> List[RunResult]:
    runs = list(runs)
    if not runs:
        raise ValueError("no runs to plot")
    for r in runs:
        if not isinstance(r, RunResult):
            raise TypeError(f"expected RunResult objects, got {type(r).__name__}")
    return runs


def plot_margins(runs: Sequence[RunResult], path) -> Path:
    """Train vs held-out margin per run over steps; one panel per run, shared y axis units."""
    runs = _check_runs(runs)
    fig, axes = _new_figure(len(runs))
    for ax, run in zip(axes, runs):
        train, evals = split_log(run.log)
        x, y = _series(train, "rewards/margins")
        _plot_train(ax, x, y, "tab:blue", "train rewards/margins")
        x, y = _series(evals, "eval_rewards/margins")
        ax.plot(x, y, color="tab:red", lw=1.5, marker="o", label="held-out eval_rewards/margins")
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.set_title(_label(run), fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("margin (reward units)")
        ax.grid(alpha=0.3)
        if not run.log:
            ax.text(0.5, 0.5, "no log", transform=ax.transAxes, ha="center")
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("Train vs held-out margin", fontsize=12)
    return _save(fig, path)


def plot_rewards(runs: Sequence[RunResult], path) -> Path:
    """Chosen vs rejected train rewards per run over steps (held-out as dashed lines)."""
    runs = _check_runs(runs)
    fig, axes = _new_figure(len(runs))
    for ax, run in zip(axes, runs):
        train, evals = split_log(run.log)
        for key, colour, name in (("rewards/chosen", "tab:green", "chosen"),
                                  ("rewards/rejected", "tab:purple", "rejected")):
            x, y = _series(train, key)
            _plot_train(ax, x, y, colour, f"train {name}")
            x, y = _series(evals, "eval_" + key)
            if x:
                ax.plot(x, y, color=colour, lw=1.2, ls="--", marker="o", ms=3,
                        label=f"held-out {name}")
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.set_title(_label(run), fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("Chosen vs rejected rewards", fontsize=12)
    return _save(fig, path)


def plot_slice_accuracy(runs: Sequence[RunResult], path, metric: str = "avg") -> Path:
    """Held-out accuracy overall and per slice: grouped bars, one per run, plus the base model."""
    _check_metric(metric)
    runs = [r for r in _check_runs(runs) if r.heldout is not None]
    if not runs:
        raise ValueError("no run has a held-out evaluation to plot")
    groups = ["all"] + sorted({s for r in runs for s in r.heldout.slices()})
    baseline = next((r.baseline for r in runs if r.baseline is not None), None)
    bars = [(_label(r), r.heldout) for r in runs]
    if baseline is not None:
        bars.append(("base model", baseline))
    fig, (ax,) = _new_figure(1, panel_w=max(6.0, 1.2 * len(groups) * max(1, len(bars)) / 2.5),
                             panel_h=4.0)
    width = 0.8 / len(bars)
    cmap = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
            "tab:pink", "tab:olive", "tab:cyan"]
    for j, (name, ev) in enumerate(bars):
        xs, ys = [], []
        for g, group in enumerate(groups):
            acc = ev.accuracy(metric, None if group == "all" else group)
            xs.append(g - 0.4 + width * (j + 0.5))
            ys.append(0.0 if math.isnan(acc) else 100.0 * acc)
        is_base = name == "base model"
        cont = ax.bar(xs, ys, width=width * 0.95, label=name,
                      color="0.75" if is_base else cmap[j % len(cmap)],
                      hatch="//" if is_base else None, edgecolor="0.3" if is_base else None)
        ax.bar_label(cont, fmt="%.0f", fontsize=7, padding=1)  # so 0% bars are visible too
    n_by_group = [runs[0].heldout.n] + [len(runs[0].heldout.select(s)) for s in groups[1:]]
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{g}\n(n={k})" for g, k in zip(groups, n_by_group)])
    ax.set_ylim(0, 110)
    ax.set_ylabel(f"held-out accuracy, % ({metric})")
    ax.axhline(50.0, color="0.6", lw=0.8, ls=":")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"Held-out accuracy per slice ({metric}: "
                 + ("Lc/nc > Lr/nr" if metric == "avg" else "(Lc-Rc) > (Lr-Rr)") + ")", fontsize=11)
    return _save(fig, path)


def plot_all(runs: Sequence[RunResult], out_dir, metric: str = "avg") -> Dict[str, Path]:
    """All three plots into ``out_dir``; returns {"margins": path, "rewards": ..., "slices": ...}."""
    out = Path(out_dir)
    paths = {"margins": plot_margins(runs, out / "margins.png"),
             "rewards": plot_rewards(runs, out / "rewards.png")}
    if any(r.heldout is not None for r in runs):
        paths["slices"] = plot_slice_accuracy(runs, out / "slice_accuracy.png", metric=metric)
    return paths
