"""Result records: derived correctness, accuracies, JSON round-trip, bad input."""
import math

import pytest

from prefopt.results import EvalResult, PairEval, RunResult, read_jsonl_log


def test_from_logps_hand_values():
    # Lc=-10 over 5 tokens, Lr=-24 over 8 tokens: avg margin -2 - (-3) = 1
    # ref: (Lc-Rc) - (Lr-Rr) = (-10+11) - (-24+23) = 1 - (-1) = 2
    p = PairEval.from_logps("a", "pricing", -10.0, -24.0, 5, 8, -11.0, -23.0)
    assert p.avg_margin == pytest.approx(1.0)
    assert p.ref_margin == pytest.approx(2.0)
    assert p.avg_correct and p.ref_correct
    # a tie is wrong (strict >), as TRL's rewards/accuracies
    q = PairEval("b", None, 0.0, -0.5)
    assert not q.avg_correct and not q.ref_correct


def test_accuracy_margins_slices():
    pairs = [PairEval("1", "x", 1.0, -1.0), PairEval("2", "x", -1.0, 2.0),
             PairEval("3", "y", 0.5, 0.5), PairEval("4", None, -2.0, 1.0)]
    e = EvalResult.from_pairs(pairs)
    assert e.slices() == ["x", "y"]
    assert e.accuracy("avg") == 0.5 and e.accuracy("ref") == 0.75
    assert e.accuracy("avg", "x") == 0.5 and e.accuracy("ref", "y") == 1.0
    assert e.mean_margin("avg") == pytest.approx((1 - 1 + 0.5 - 2) / 4)
    assert e.metrics["avg_accuracy/x"] == 0.5 and e.metrics["n/y"] == 1.0
    assert math.isnan(e.accuracy("avg", "nope"))
    with pytest.raises(ValueError, match="metric"):
        e.accuracy("length")


def test_bad_input():
    with pytest.raises(ValueError, match="finite"):
        PairEval("a", None, float("nan"), 0.0)
    with pytest.raises(ValueError, match="token counts"):
        PairEval.from_logps("a", None, -1, -1, 0, 3, 0, 0)
    with pytest.raises(ValueError, match="duplicate"):
        EvalResult([PairEval("a", None, 1, 1), PairEval("a", None, 1, 1)])
    with pytest.raises(ValueError, match="rank"):
        RunResult("A", "dpo", 0)


def test_run_roundtrip(tmp_path):
    e = EvalResult.from_pairs([PairEval("1", "x", 1.0, -1.0, score=0.5)])
    run = RunResult("A", "dpo", 16, {"lr": 1e-4, "seed": 0},
                    [{"step": 1, "loss": 0.69, "rewards/margins": 0.0},
                     {"step": 1, "eval_loss": 0.6, "eval_rewards/margins": 0.1}],
                    heldout=e, baseline=e, adapter_path=tmp_path / "ad", log_path=None)
    path = run.save_json(tmp_path / "run.json")
    back = RunResult.load_json(path)
    assert back.to_dict() == run.to_dict()
    assert len(back.train_entries()) == 1 and len(back.eval_entries()) == 1
    assert back.heldout.pairs[0].score == 0.5


def test_read_jsonl_log_names_bad_line(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text('{"step": 1, "loss": 0.7}\n\n{"step": 2, "loss": \n')
    with pytest.raises(ValueError, match=r"log.jsonl:3"):
        read_jsonl_log(p)
    p.write_text('{"step": 1, "loss": 0.7}\n')
    assert read_jsonl_log(p) == [{"step": 1, "loss": 0.7}]
