"""Over-optimisation review flags on constructed logs: prefopt JSONL entries, RunResults with
a baseline evaluation, and a hand-written TRL trainer_state.json (log_history as TRL writes
it: train entries, eval_ entries with the Trainer's runtime keys, the final train summary)."""
import json

import pytest

from prefopt.results import EvalResult, PairEval, RunResult
from prefopt.review import FLAGS, INFLATION, TRAIN_IMPROVED, WEAK_SIGNAL, review, split_log


def test_flag_strings_are_the_documented_ones():
    assert FLAGS == ("train margin improved: confirm with held-out pairs",
                     "weak training signal: check rank, LR or pair quality",
                     "likely margin inflation")


def train_log(margins, chosen=None, rejected=None):
    chosen = chosen or [m / 2 for m in margins]
    rejected = rejected or [-m / 2 for m in margins]
    return [{"step": i + 1, "epoch": (i + 1) / len(margins), "loss": 0.69 - 0.1 * m,
             "grad_norm": 1.0, "learning_rate": 1e-4, "rewards/chosen": c, "rewards/rejected": r,
             "rewards/margins": m, "rewards/accuracies": 0.5 + 0.1 * (m > 0),
             "logps/chosen": -40.0, "logps/rejected": -45.0}
            for i, (m, c, r) in enumerate(zip(margins, chosen, rejected))]


RISING = [0.0, 0.05, 0.12, 0.2, 0.31, 0.45, 0.6, 0.78]


def ev(margins):
    return EvalResult.from_pairs([PairEval(f"p{i}", "s", m, m) for i, m in enumerate(margins)])


BASE = [0.3, 0.2, 0.1, -0.1, -0.2, -0.3, 0.05, -0.05]  # 4/8 right


def test_train_up_heldout_flat_is_inflation():
    # held-out after training: same pairs right, margins a touch lower than the base model
    run = RunResult("A", "dpo", 16, log=train_log(RISING), heldout=ev([m - 0.01 for m in BASE]),
                    baseline=ev(BASE))
    r = review(run, n_boot=2000)
    assert r.flags == [TRAIN_IMPROVED, INFLATION]
    assert r.train_margin_early == pytest.approx((0 + 0.05 + 0.12 + 0.2) / 4)
    assert r.train_margin_late == pytest.approx((0.31 + 0.45 + 0.6 + 0.78) / 4)
    assert r.heldout_source == "baseline" and r.heldout_flat
    assert (r.heldout_correct, r.baseline_correct) == (4, 4)
    assert "INFLATION" not in r.text and INFLATION in r.text


def test_train_up_heldout_up_is_not_inflation():
    better = [0.4, 0.3, 0.2, 0.05, -0.1, -0.2, 0.1, 0.02]  # 6/8 right, margins up
    run = RunResult("A", "dpo", 16, log=train_log(RISING), heldout=ev(better), baseline=ev(BASE))
    r = review(run, n_boot=2000)
    assert r.flags == [TRAIN_IMPROVED]
    assert r.heldout_correct - r.baseline_correct == 2 and not r.heldout_flat


def test_weak_training_signal():
    r = review(train_log([0.0, 0.001, 0.0, 0.002, 0.001, 0.0]))
    assert r.flags == [WEAK_SIGNAL]
    # noisy margins whose late mean is higher but within 2 standard errors: still weak
    r = review(train_log([0.0, 0.5, -0.4, 0.6, -0.3, 0.9, 0.1, 0.5]))
    assert r.train_gain > 0.01 and r.train_gain < 2 * r.train_gain_se
    assert r.flags == [WEAK_SIGNAL]


def test_margin_won_by_pushing_rejected_down():
    chosen = [0.0, -0.02, -0.05, -0.08, -0.1, -0.15, -0.2, -0.25]
    rejected = [c - m for c, m in zip(chosen, RISING)]
    r = review(train_log(RISING, chosen, rejected))
    assert TRAIN_IMPROVED in r.flags
    assert r.rejected_late < r.rejected_early and r.chosen_late < r.chosen_early
    assert any("likelihood displacement" in n for n in r.notes)
    assert any("no held-out evaluation" in n for n in r.notes)  # no inflation check possible


def test_too_short_and_bad_logs(tmp_path):
    r = review(train_log([0.1]))
    assert r.flags == [] and "only one train log entry" in r.notes[0]
    bad = train_log(RISING)
    bad[3]["rewards/margins"] = float("nan")
    with pytest.raises(ValueError, match="step 4.*NaN"):
        review(bad)
    with pytest.raises(ValueError, match="log_history"):
        review({"global_step": 3})
    with pytest.raises(TypeError):
        review(42)
    with pytest.raises(FileNotFoundError):
        review(tmp_path / "missing.jsonl")


def test_jsonl_path(tmp_path):
    p = tmp_path / "run_A.jsonl"
    entries = train_log(RISING) + [{"step": 8, "eval_loss": 0.6, "eval_rewards/margins": 0.01},
                                   {"step": 0, "eval_loss": 0.69, "eval_rewards/margins": 0.0}]
    p.write_text("".join(json.dumps(e) + "\n" for e in entries))
    r = review(p)
    assert r.name == "run_A" and r.n_train_entries == 8 and r.n_eval_entries == 2
    # eval entries are ordered by step: step 0 is the base model
    assert r.eval_first_step == 0 and r.eval_margin_last == 0.01
    assert r.flags == [TRAIN_IMPROVED, INFLATION]


# ---- a TRL trainer_state.json, written by hand in TRL's format ----------------------

def _trl_train(step, loss, gn, lr, rc, rr, acc, lc, lrj):
    return {"loss": loss, "grad_norm": gn, "learning_rate": lr, "rewards/chosen": rc,
            "rewards/rejected": rr, "rewards/accuracies": acc, "rewards/margins": round(rc - rr, 6),
            "logps/chosen": lc, "logps/rejected": lrj, "logits/chosen": -1.84, "logits/rejected": -1.87,
            "entropy": 2.31, "num_tokens": 2048.0 * step, "mean_token_accuracy": 0.41,
            "epoch": round(step / 40, 4), "step": step}


def _trl_eval(step, loss, rc, rr, acc):
    return {"eval_loss": loss, "eval_runtime": 3.412, "eval_samples_per_second": 6.448,
            "eval_steps_per_second": 0.879, "eval_rewards/chosen": rc, "eval_rewards/rejected": rr,
            "eval_rewards/accuracies": acc, "eval_rewards/margins": round(rc - rr, 6),
            "eval_logps/chosen": -152.3, "eval_logps/rejected": -160.8, "eval_logits/chosen": -1.83,
            "eval_logits/rejected": -1.86, "eval_entropy": 2.29, "eval_num_tokens": 2048.0 * step,
            "eval_mean_token_accuracy": 0.40, "epoch": round(step / 40, 4), "step": step}


def trainer_state(eval_margins):
    """40 steps, logging every 5, eval at steps 20 and 40, final train summary entry."""
    train = [
        _trl_train(5, 0.6931, 164.2, 9.0e-6, 0.0012, -0.0009, 0.375, -150.1, -158.9),
        _trl_train(10, 0.6812, 151.7, 8.0e-6, 0.0210, -0.0105, 0.625, -149.8, -159.3),
        _trl_train(15, 0.6604, 148.3, 7.0e-6, 0.0503, -0.0312, 0.75, -149.2, -160.1),
        _trl_train(20, 0.6317, 139.9, 6.0e-6, 0.0702, -0.0750, 0.75, -148.9, -161.4),
        _trl_train(25, 0.5890, 132.0, 5.0e-6, 0.0811, -0.1504, 0.875, -148.7, -163.0),
        _trl_train(30, 0.5402, 127.5, 4.0e-6, 0.0905, -0.2420, 0.875, -148.5, -165.2),
        _trl_train(35, 0.4953, 119.8, 3.0e-6, 0.0950, -0.3301, 1.0, -148.4, -167.3),
        _trl_train(40, 0.4511, 113.1, 2.0e-6, 0.1012, -0.4205, 1.0, -148.2, -169.5),
    ]
    (e20, e40) = eval_margins
    evals = [_trl_eval(20, 0.6902, e20 / 2, -e20 / 2, 0.5), _trl_eval(40, 0.6890, e40 / 2, -e40 / 2, 0.5)]
    history = train[:4] + [evals[0]] + train[4:] + [evals[1]] + [
        {"train_runtime": 412.77, "train_samples_per_second": 0.775, "train_steps_per_second": 0.097,
         "total_flos": 0.0, "train_loss": 0.5927, "epoch": 1.0, "step": 40}]
    return {"best_global_step": None, "best_metric": None, "best_model_checkpoint": None,
            "epoch": 1.0, "eval_steps": 20, "global_step": 40, "is_hyper_param_search": False,
            "is_local_process_zero": True, "is_world_process_zero": True, "log_history": history,
            "logging_steps": 5, "max_steps": 40, "num_input_tokens_seen": 0, "num_train_epochs": 1,
            "save_steps": 500, "stateful_callbacks": {"TrainerControl": {"args": {
                "should_epoch_stop": False, "should_evaluate": False, "should_log": False,
                "should_save": True, "should_training_stop": True}, "attributes": {}}},
            "total_flos": 0.0, "train_batch_size": 8, "trial_name": None, "trial_params": None}


def test_trl_log_history_inflation(tmp_path):
    state = trainer_state((0.030, 0.036))  # held-out margin barely moves
    train, evals = split_log(state["log_history"])
    assert len(train) == 8 and len(evals) == 2  # summary entry has no rewards: not a train entry
    path = tmp_path / "checkpoint-40" / "trainer_state.json"
    path.parent.mkdir()
    path.write_text(json.dumps(state, indent=2))
    for source in (path, state, state["log_history"]):
        r = review(source)
        assert r.flags == [TRAIN_IMPROVED, INFLATION], (source, r.text)
        assert r.heldout_source == "eval log"
        assert r.eval_first_step == 20
    r = review(path)
    assert r.name == "checkpoint-40"
    # late chosen rewards rose only a little, rejected fell a lot
    assert any("mostly by pushing rejected down" in n for n in r.notes)
    assert any("not the base model" in n for n in r.notes)


def test_trl_log_history_healthy():
    r = review(trainer_state((0.05, 0.40)), name="dpo-r16")
    assert r.name == "dpo-r16" and r.flags == [TRAIN_IMPROVED]
    assert not r.heldout_flat


def test_trl_summary_entry_with_leftover_metrics_counts():
    state = trainer_state((0.05, 0.40))
    last = state["log_history"][-1]
    last.update({"rewards/chosen": 0.11, "rewards/rejected": -0.45, "rewards/margins": 0.56})
    train, _ = split_log(state["log_history"])
    assert len(train) == 9 and train[-1]["train_loss"] == 0.5927


def test_command_line(tmp_path, capsys):
    from prefopt.review import main
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps(trainer_state((0.030, 0.036))))
    run = RunResult("A", "dpo", 16, log=train_log(RISING), heldout=ev(BASE), baseline=ev(BASE))
    res = run.save_json(tmp_path / "result.json")
    assert main([str(path), str(res)]) == 0
    out = capsys.readouterr().out
    assert out.count(INFLATION) == 2 and out.startswith(tmp_path.name + ": ")
    assert "\nA: " in out
