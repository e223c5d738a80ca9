"""Decision rule, lower-rank preference and statistics, on constructed run results.

Expected outcomes follow design.md section 10; expected p-values and intervals are
computed by hand (binomial sums written out) or taken from published tables.
"""
import math

import pytest

from prefopt.decide import (DECISION, HINT, INFLATION, NO_EVIDENCE, compare, decide,
                            lower_rank_check)
from prefopt.results import EvalResult, PairEval, RunResult
from prefopt.stats import (bootstrap_mean_diff, clopper_pearson_interval, mcnemar_exact,
                           wilson_interval)

SLICES = ["pricing", "objection"]


def ev(margins, slices=None):
    """EvalResult from a list of avg margins (ref margin = same value); ids p0, p1, ..."""
    slices = slices or [SLICES[i % 2] for i in range(len(margins))]
    return EvalResult.from_pairs(
        [PairEval(f"p{i}", s, m, m) for i, (m, s) in enumerate(zip(margins, slices))])


def run(name, obj, rank, margins, train=None, slices=None, baseline=None):
    log = [{"step": i, "rewards/margins": m, "rewards/chosen": m / 2, "rewards/rejected": -m / 2}
           for i, m in enumerate(train or [0.0, 0.1, 0.2, 0.3])]
    return RunResult(name, obj, rank, {"lr": 1e-4}, log, heldout=ev(margins, slices),
                     baseline=baseline)


# 10 pairs, alternating slices pricing/objection.
# Y: right on 5 (p0..p4), wrong on 5.
Y = [0.2, 0.2, 0.2, 0.2, 0.2, -0.2, -0.2, -0.2, -0.2, -0.2]


def test_one_more_pair_with_better_margin_is_a_decision():
    # X: right on p0..p5 (6 pairs), margins larger everywhere
    x = run("A", "dpo", 16, [0.3, 0.3, 0.3, 0.3, 0.3, 0.1, -0.1, -0.1, -0.1, -0.1])
    y = run("B", "simpo", 16, Y)
    c = compare(x, y)
    assert (c.x_correct, c.y_correct) == (6, 5)
    assert c.winner == "A" and c.outcome == DECISION
    assert c.slice_regressions == []
    assert c.point_size == 10.0
    assert "DPO over SimPO: decision" in c.headline
    assert "one pair is 10 points" in c.text
    # the discordant pair: p5 (only X right): McNemar b=1, c=0 -> p = 2 * 1/2 = 1
    assert (c.x_only, c.y_only) == (1, 0) and c.p_value == 1.0


def test_one_more_pair_alone_is_a_hint():
    # X right on 6, but its margins are much smaller: mean X < mean Y
    x = run("A", "dpo", 16, [0.01, 0.01, 0.01, 0.01, 0.01, 0.01, -0.5, -0.5, -0.5, -0.5])
    y = run("B", "simpo", 16, Y)
    c = compare(x, y)
    assert c.winner == "A" and c.outcome == HINT
    assert c.x_margin < c.y_margin
    assert any("worse for DPO" in r for r in c.reasons)


def test_slice_regression_blocks_the_decision():
    # X right on 6 with a better mean margin, but worse on the pricing slice.
    # Slices alternate: even = pricing, odd = objection.
    # Y right on p0..p4: pricing {p0,p2,p4} = 3/5, objection {p1,p3} = 2/5
    # X right on p1,p3,p5,p7,p9 (objection 5/5) and p0 (pricing 1/5): 6 pairs, pricing worse.
    xm = [0.9, 0.9, -0.01, 0.9, -0.01, 0.9, -0.01, 0.9, -0.01, 0.9]
    x = run("A", "dpo", 16, xm)
    y = run("B", "simpo", 16, Y)
    c = compare(x, y)
    assert (c.x_correct, c.y_correct) == (6, 5)
    assert c.x_margin >= c.y_margin
    assert c.slice_regressions == ["pricing"]
    assert c.outcome == HINT
    # when only "objection" is important, the same comparison is a decision
    assert compare(x, y, important_slices=["objection"]).outcome == DECISION
    with pytest.raises(ValueError, match="not in the held-out"):
        compare(x, y, important_slices=["closing"])


def test_equal_counts_is_no_evidence():
    x = run("A", "dpo", 16, [0.9] * 5 + [-0.1] * 5)  # same 5 right, bigger margins
    y = run("B", "simpo", 16, Y)
    c = compare(x, y)
    assert c.winner is None and c.outcome == NO_EVIDENCE


def test_mismatched_pair_sets_are_refused():
    x = run("A", "dpo", 16, Y)
    y = run("B", "simpo", 16, Y[:9])
    with pytest.raises(ValueError, match="pair sets differ"):
        compare(x, y)
    with pytest.raises(ValueError, match="pair sets differ"):
        decide([x, y])


def test_ref_metric_is_used_when_asked():
    # avg says Y and X tie at 5; ref margins make X right on 7
    pairs_x = [PairEval(f"p{i}", SLICES[i % 2], Y[i], 0.5 if i < 7 else -0.5) for i in range(10)]
    x = RunResult("A", "dpo", 16, heldout=EvalResult.from_pairs(pairs_x))
    y = run("B", "simpo", 16, Y)
    assert compare(x, y, metric="avg").outcome == NO_EVIDENCE
    c = compare(x, y, metric="ref")
    assert c.x_correct == 7 and c.winner == "A"
    with pytest.raises(ValueError, match="metric"):
        compare(x, y, metric="length")


def test_lower_rank_preference():
    # same objective: rank 8 has lower train margins but equal held-out -> prefer rank 8
    low = run("C", "dpo", 8, Y, train=[0.0, 0.05, 0.1, 0.15])
    high = run("A", "dpo", 16, Y, train=[0.0, 0.1, 0.3, 0.5])
    chk = lower_rank_check(low, high)
    assert chk.prefer_low
    assert chk.train_margin_low < chk.train_margin_high
    assert "prefer rank 8 over rank 16" in chk.text
    # rank 8 one pair worse on held-out -> keep rank 16
    worse = run("C", "dpo", 8, Y[:4] + [-0.2] + Y[5:])
    chk = lower_rank_check(worse, high)
    assert not chk.prefer_low and "keep rank 16" in chk.text
    with pytest.raises(ValueError, match="not below"):
        lower_rank_check(high, low)


def _matrix(a16, b16, a8, b8):
    return [run("A", "dpo", 16, a16), run("B", "simpo", 16, b16),
            run("C", "dpo", 8, a8), run("D", "simpo", 8, b8)]


X6 = [0.3, 0.3, 0.3, 0.3, 0.3, 0.1, -0.1, -0.1, -0.1, -0.1]  # beats Y: decision


def test_verdict_dpo_over_simpo_at_both_ranks():
    v = decide(_matrix(X6, Y, X6, Y), n_boot=2000)
    assert v.outcome == DECISION and v.best == "DPO"
    assert v.across[0].text.startswith("DPO over SimPO at both ranks")
    assert v.best_rank == 8  # rank 8 equal on held-out -> lower rank preferred
    assert v.text.startswith("Decision: keep DPO (rank 8).")
    assert "one pair is 10 accuracy points" in v.text
    assert "could be chance" in v.text  # p = 1 on one discordant pair
    d = v.to_dict()
    assert d["outcome"] == DECISION and len(d["comparisons"]) == 2


def test_verdict_mixed_and_hint():
    v = decide(_matrix(X6, Y, Y, X6), n_boot=2000)
    assert v.outcome == NO_EVIDENCE and v.best is None
    assert "mixed" in v.across[0].text
    # decision at 16, no evidence at 8 -> only a hint across ranks
    v = decide(_matrix(X6, Y, Y, Y), n_boot=2000)
    assert v.outcome == HINT and v.best == "DPO"
    assert "at rank 16 only" in v.across[0].text
    assert v.text.startswith("Hint only: DPO")


def test_decide_refuses_duplicates():
    with pytest.raises(ValueError, match="two runs with objective"):
        decide([run("A", "dpo", 16, Y), run("B", "dpo", 16, Y)])
    with pytest.raises(ValueError, match="at least two"):
        decide([run("A", "dpo", 16, Y)])


# ---- statistics against hand computations -------------------------------------------

@pytest.mark.parametrize("b,c,expected", [
    (0, 0, 1.0),
    (1, 0, 1.0),                                   # 2 * C(1,0)/2 = 1
    (5, 0, 2 * 1 / 32),                            # 2 * C(5,0)/2^5
    (0, 10, 2 * 1 / 1024),
    (8, 2, 2 * (1 + 10 + 45) / 1024),              # 2 * (C(10,0)+C(10,1)+C(10,2))/2^10
    (3, 12, 2 * (1 + 15 + 105 + 455) / 32768),     # n = 15, k <= 3
    (6, 6, 1.0),                                   # capped at 1
])
def test_mcnemar_exact_hand_values(b, c, expected):
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)
    assert mcnemar_exact(c, b) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_bad_input():
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)
    with pytest.raises(ValueError):
        mcnemar_exact(1.5, 2)


def test_wilson_interval_hand_value():
    # 7/10 at 95%: z = 1.959964, z^2 = 3.841459
    # centre = (0.7 + 3.841459/20) / (1 + 0.3841459) = 0.644498
    # half   = 1.959964 * sqrt(0.021 + 3.841459/400) / 1.3841459 = 0.247715
    lo, hi = wilson_interval(7, 10)
    assert lo == pytest.approx(0.396783, abs=1e-5)
    assert hi == pytest.approx(0.892213, abs=1e-5)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(3.841459 / 13.841459, abs=1e-6)  # z^2/(n+z^2)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_clopper_pearson_published_value():
    # 7/10 at 95%: (0.3475, 0.9333) in standard tables
    lo, hi = clopper_pearson_interval(7, 10)
    assert lo == pytest.approx(0.3475, abs=1e-4) and hi == pytest.approx(0.9333, abs=1e-4)
    # k = 0: upper = 1 - (alpha/2)^(1/n)
    assert clopper_pearson_interval(0, 10)[1] == pytest.approx(1 - 0.025 ** 0.1, abs=1e-9)


def test_bootstrap_interval():
    x = [0.5, 0.1, 0.4, -0.2, 0.3, 0.0, 0.6, 0.2]
    y = [0.1, 0.2, 0.1, -0.1, 0.1, 0.1, 0.2, 0.0]
    a = bootstrap_mean_diff(x, y, n_boot=5000, seed=3)
    assert a == bootstrap_mean_diff(x, y, n_boot=5000, seed=3)  # seeded
    mean = sum(p - q for p, q in zip(x, y)) / len(x)
    assert a[0] < mean < a[1]
    # constant difference: the interval collapses to it
    assert bootstrap_mean_diff([1.0, 2.0, 3.0], [0.5, 1.5, 2.5], n_boot=100) == pytest.approx((0.5, 0.5))
    with pytest.raises(ValueError, match="equal length"):
        bootstrap_mean_diff([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean_diff([float("nan")], [1.0])


def test_three_objectives_best_must_beat_both():
    runs = [run("A", "dpo", 16, X6), run("B", "simpo", 16, Y), run("E", "orpo", 16, Y)]
    v = decide(runs, n_boot=500)
    assert v.best == "DPO" and v.outcome == DECISION and len(v.across) == 3
    assert {(a.a, a.b) for a in v.across} == {("DPO", "SimPO"), ("DPO", "ORPO"), ("SimPO", "ORPO")}
    # ORPO ties DPO: nobody beats everyone
    runs[2] = run("E", "orpo", 16, X6)
    v = decide(runs, n_boot=500)
    assert v.best is None and v.outcome == NO_EVIDENCE


def test_cautions_metric_disagreement_and_base_model():
    # avg: DPO right on 6 vs 5 (decision); ref: SimPO right on all 10, DPO on 6
    pairs_y = [PairEval(f"p{i}", SLICES[i % 2], Y[i], 1.0) for i in range(10)]
    y = RunResult("B", "simpo", 16, heldout=EvalResult.from_pairs(pairs_y))
    base = ev([0.5] * 8 + [-0.5] * 2)  # the base model is right on 8
    x = run("A", "dpo", 16, X6, baseline=base)
    v = decide([x, y], n_boot=500)
    assert v.best == "DPO" and v.outcome == DECISION
    assert any("'ref' metric" in c and "disagree" in c for c in v.cautions)
    assert any("does not beat the base model" in c for c in v.cautions)
    assert any(INFLATION in c for c in v.cautions)  # train up, held-out below the base model
    assert "Cautions:" in v.text


def test_single_objective_two_ranks():
    v = decide([run("A", "dpo", 16, X6), run("C", "dpo", 8, X6)], n_boot=500)
    assert v.outcome == NO_EVIDENCE and v.comparisons == []
    assert v.text.startswith("Only one objective (DPO)")
    assert len(v.lower_rank) == 1 and v.lower_rank[0].prefer_low
