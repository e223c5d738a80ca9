"""Plots produce readable non-empty PNGs; report.md carries the verdict, the table, the
statistics and links; table() returns one row per run."""
import math

import numpy as np
import pytest

from prefopt import plots
from prefopt.decide import decide
from prefopt.report import fixed_settings, table, write_report
from prefopt.results import EvalResult, PairEval, RunResult

SLICES = ["discovery", "objection", "pricing", "closing"]
N = 12


def _eval(margins):
    return EvalResult.from_pairs([PairEval(f"h{i}", SLICES[i % 4], m, m + 0.1)
                                  for i, m in enumerate(margins)])


def _log(rng, steps, slope, beta):
    log = []
    for s in range(0, steps + 1):
        m = slope * s + 0.02 * rng.standard_normal() * (s > 0)
        c, r = 0.3 * m, -0.7 * m
        log.append({"step": s, "epoch": s / steps, "loss": math.log1p(math.exp(-m)),
                    "grad_norm": 1.0, "learning_rate": 1e-4, "rewards/chosen": c,
                    "rewards/rejected": r, "rewards/margins": c - r,
                    "rewards/accuracies": float(m > 0), "logps/chosen": -40.0 + beta * c,
                    "logps/rejected": -44.0 + beta * r})
        if s % 5 == 0:
            log.append({"step": s, "epoch": s / steps, "eval_loss": 0.69, "eval_rewards/chosen": c / 3,
                        "eval_rewards/rejected": r / 3, "eval_rewards/margins": (c - r) / 3,
                        "eval_rewards/accuracies": 0.5})
    return log


DPO = [0.3, 0.1, 0.2, -0.1, 0.4, -0.2, 0.1, 0.02, 0.2, -0.1, 0.3, 0.05]
BASE = [0.2, -0.1, 0.1, -0.2, 0.3, -0.3, 0.05, -0.05, 0.1, -0.1, 0.2, -0.2]  # 6/12


@pytest.fixture
def runs(tmp_path):
    rng = np.random.default_rng(0)
    base = _eval(BASE)
    dpo = DPO                                                                    # 9/12
    simpo = [0.25, 0.05, 0.15, -0.15, 0.35, -0.25, 0.1, -0.05, 0.15, -0.1, 0.25, -0.15]  # 7/12
    common = {"model": "smollm2-135m-instruct", "seed": 0, "steps": 20, "lr": 1e-4,
              "max_length": 256, "pairs_per_step": 4, "heldout_ids": "h0..h11"}
    out = []
    for name, obj, rank, ev, slope in (("A", "dpo", 16, dpo, 0.03), ("B", "simpo", 16, simpo, 0.02),
                                       ("C", "dpo", 8, dpo, 0.025), ("D", "simpo", 8, simpo, 0.018)):
        settings = dict(common, objective=obj, rank=rank, beta=0.1 if obj == "dpo" else 2.0)
        logp = tmp_path / "logs" / f"{name}.jsonl"
        logp.parent.mkdir(exist_ok=True)
        logp.write_text("")
        out.append(RunResult(name, obj, rank, settings, _log(rng, 20, slope, 1.0), heldout=_eval(ev),
                             baseline=base, adapter_path=str(tmp_path / "adapters" / name),
                             log_path=str(logp)))
    return out


def _png_ok(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 5000, f"{path} is suspiciously small ({len(data)} bytes)"
    import matplotlib.image as mpimg
    img = mpimg.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 300
    assert img.std() > 0.01  # not a blank canvas


def test_plots_are_nonempty_pngs(runs, tmp_path):
    paths = plots.plot_all(runs, tmp_path / "plots")
    assert set(paths) == {"margins", "rewards", "slices"}
    for p in paths.values():
        _png_ok(p)
    with pytest.raises(ValueError, match="no runs"):
        plots.plot_margins([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="metric"):
        plots.plot_slice_accuracy(runs, tmp_path / "x.png", metric="len")


def test_table_rows(runs):
    rows = table(runs)
    if hasattr(rows, "to_dict"):  # pandas installed
        rows = rows.to_dict("records")
    assert [r["run"] for r in rows] == ["A", "B", "C", "D"]
    a = rows[0]
    assert a["objective"] == "DPO" and a["rank"] == 16
    assert a["heldout_avg_acc"] == pytest.approx(9 / 12)
    assert a["baseline_avg_acc"] == pytest.approx(6 / 12)
    assert a["lift_pairs"] == 3 and a["lift_points"] == pytest.approx(25.0)
    # slices cycle discovery, objection, pricing, closing: DPO objection = .1, -.2, -.1 -> 1/3
    assert a["avg_acc/objection"] == pytest.approx(1 / 3)
    assert a["avg_acc/closing"] == pytest.approx(2 / 3)
    assert a["train_margin_late"] > 0
    assert "train margin improved" in a["flags"]


def test_fixed_settings(runs):
    fixed, varying = fixed_settings(runs)
    assert fixed["seed"] == 0 and fixed["steps"] == 20
    assert set(varying) == {"objective", "rank", "beta"}
    # nested settings are flattened; repeats of a top-level setting are dropped
    for r in runs:
        r.settings["fixed"] = {"seed": 0, "split_seed": 7, "ids": list(range(20))}
    fixed, varying = fixed_settings(runs)
    assert fixed["fixed.split_seed"] == 7 and "fixed.seed" not in fixed
    runs[0].settings["fixed"]["split_seed"] = 8
    assert fixed_settings(runs)[1]["fixed.split_seed"] == [8, 7, 7, 7]


def test_report_md(runs, tmp_path):
    out = tmp_path / "report"
    v = decide(runs, n_boot=2000)
    path = write_report(runs, out, verdict=v)
    text = path.read_text()
    assert path.name == "report.md"
    assert v.text.splitlines()[0] in text            # the plain-words verdict
    assert "DPO over SimPO at both ranks" in text
    assert "| run | objective | rank |" in text        # the ablation table
    assert "McNemar" in text and "Wilson" in text and "bootstrap" in text
    assert "one pair is 8.33 accuracy points" in text
    assert "| seed | 0 |" in text                     # fixed settings
    assert "| heldout_ids | h0..h11 |" in text
    assert "](plots/margins.png)" in text and (out / "plots" / "margins.png").exists()
    assert "logs/A.jsonl" in text
    assert (out / "verdict.json").exists() and (out / "runs.json").exists()
    for p in (out / "plots").iterdir():
        _png_ok(p)


def test_without_matplotlib_clear_error_and_report_still_written(runs, tmp_path, monkeypatch):
    import sys
    for m in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, m)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'prefopt\[plots\]'"):
        plots.plot_margins(runs, tmp_path / "m.png")
    text = write_report(runs, tmp_path / "r", n_boot=200).read_text()
    assert "Plots skipped" in text and "prefopt[plots]" in text
    assert not (tmp_path / "r" / "plots").exists()


def test_table_without_pandas_is_a_list_of_dicts(runs, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "pandas", None)
    rows = table(runs)
    assert isinstance(rows, list) and rows[1]["run"] == "B" and rows[1]["objective"] == "SimPO"


def test_report_shows_scorer_column(runs, tmp_path):
    for r in runs:
        r.heldout = EvalResult.from_pairs([PairEval(p.id, p.slice, p.avg_margin, p.ref_margin,
                                                    score=1.0 if p.avg_correct else 0.0)
                                           for p in r.heldout.pairs])
    text = write_report(runs, tmp_path / "r", plots=False, n_boot=200).read_text()
    assert "scorer mean" in text and "| 0.75 |" in text  # run A: 9 of 12 scored 1
    assert "Plots not requested" in text
