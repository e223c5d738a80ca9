"""Run orchestration: config validation, reproducibility, resume, Ctrl-C, NaN stop, equal-weight
accumulation, schedules, logs. Runs on a NumPy toy implementing the core contract and on a tiny
random C model (prefopt._core.Model)."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import prefopt  # noqa: E402
from prefopt import batching  # noqa: E402
from prefopt.evaluate import objective_terms  # noqa: E402
from prefopt.train import TrainConfig, TrainingDiverged, train  # noqa: E402
from toymodel import ToyModel, random_pairs  # noqa: E402

VOCAB = 32


def tiny_c_model(seed=0):
    """A tiny random LLaMA-shaped C model (2 layers, GQA)."""
    from prefopt import _core

    cfg = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=4, rms_norm_eps=1e-5,
               rope_theta=10000.0, tie_word_embeddings=True, attention_bias=False)
    r = np.random.default_rng(seed)
    D, F, hd = 16, 24, 4
    w = {"model.embed_tokens.weight": r.normal(0, 0.5, (VOCAB, D)),
         "model.norm.weight": 1 + 0.1 * r.normal(size=D)}
    for i in range(2):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + 0.1 * r.normal(size=D)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * r.normal(size=D)
        w[p + "self_attn.q_proj.weight"] = r.normal(0, 0.3, (4 * hd, D))
        w[p + "self_attn.k_proj.weight"] = r.normal(0, 0.3, (2 * hd, D))
        w[p + "self_attn.v_proj.weight"] = r.normal(0, 0.3, (2 * hd, D))
        w[p + "self_attn.o_proj.weight"] = r.normal(0, 0.3, (D, 4 * hd))
        w[p + "mlp.gate_proj.weight"] = r.normal(0, 0.3, (F, D))
        w[p + "mlp.up_proj.weight"] = r.normal(0, 0.3, (F, D))
        w[p + "mlp.down_proj.weight"] = r.normal(0, 0.3, (D, F))
    w = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in w.items()}
    return _core.Model(cfg, w)


def _has_c_model():
    from prefopt import _core

    return hasattr(_core, "Model") and hasattr(_core.Model, "train_step")


@pytest.fixture(params=["toy", "c"])
def make_model(request):
    if request.param == "c":
        if not _has_c_model():
            pytest.skip("prefopt._core.Model not built in this tree yet")
        prefopt.set_num_threads(1)
        return tiny_c_model
    return lambda seed=0: ToyModel(vocab=VOCAB, seed=seed)


def cfg(**kw):
    base = dict(objective="dpo", lora_rank=2, max_steps=6, pairs_per_step=4, micro_batch_size=2,
                learning_rate=5e-2, eval_every=3, seed=3, lora_targets=("q", "v"))
    base.update(kw)
    return TrainConfig(**base)


def adapter_bytes(d):
    return (Path(d) / "adapter_model.safetensors").read_bytes()


# ---- configuration ------------------------------------------------------------------------

@pytest.mark.parametrize("kw, msg", [
    (dict(lora_rank=0), "lora_rank"),
    (dict(beta=0.0), "beta must be >"),
    (dict(beta=-1.0), "beta must be >"),
    (dict(objective="kto"), "objective must be one of"),
    (dict(objective="ipo"), "loss_type='ipo'"),
    (dict(objective="simpo", gamma=0.5, gamma_beta_ratio=0.5), "not both"),
    (dict(objective="dpo", gamma=0.5), "SimPO parameters"),
    (dict(objective="orpo", beta=0.1), "orpo_lambda"),
    (dict(max_length=100, max_prompt_length=100), "no room"),
    (dict(learning_rate=float("nan")), "learning_rate must be finite"),
    (dict(warmup_steps=2, warmup_ratio=0.1), "warmup_steps or warmup_ratio"),
    (dict(lr_schedule="step"), "lr_schedule"),
    (dict(lora_targets=("q", "w")), "unknown LoRA target"),
    (dict(label_smoothing=0.5), "label_smoothing"),
    (dict(objective="simpo", label_smoothing=0.1), "label_smoothing applies"),
    (dict(pairs_per_step=0), "pairs_per_step"),
    (dict(max_steps=2.5), "integer"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**kw)


def test_config_resolution():
    c = TrainConfig(objective="simpo", beta=2.5, gamma_beta_ratio=0.4)
    assert c.resolved_gamma == pytest.approx(1.0)
    assert TrainConfig(objective="simpo", beta=2.5, gamma=0.3).resolved_gamma == 0.3
    assert TrainConfig(objective="simpo").resolved_gamma == pytest.approx(2.0 * 0.25)
    assert TrainConfig().resolved_beta == 0.1 and TrainConfig(lora_rank=8).resolved_alpha == 16
    assert TrainConfig(lora_dropout=0.1).effective_lora_dropout == 0.0
    assert TrainConfig(lora_dropout=0.1, disable_dropout=False).effective_lora_dropout == 0.1
    assert TrainConfig(objective="dpo", loss_type="ipo").objective_dict()["kind"] == "ipo"
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()
    # the ablation's fixed settings do not include objective parameters or the rank
    a = TrainConfig(objective="dpo", lora_rank=16).fixed_settings()
    b = TrainConfig(objective="simpo", beta=3.0, lora_rank=8).fixed_settings()
    assert a == b


def test_text_pairs_need_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="tokenizer"):
        train(ToyModel(), [{"prompt": "a", "chosen": "b", "rejected": "c"}], None, cfg(),
              tmp_path, progress=False)


def test_overlong_pairs_are_truncated_or_dropped(tmp_path):
    pairs = random_pairs(6, VOCAB)
    long = batching.TokenPair(np.arange(10, dtype=np.int32), np.ones(3, np.int32),
                              np.ones(2, np.int32), id="long")
    c = cfg(max_length=8, max_prompt_length=None, max_steps=1)
    r = train(ToyModel(), pairs + [long], None, c, tmp_path, progress=False)
    assert r.settings["dropped_pairs"] == 1 and r.settings["train_pairs"] == 6
    start = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert start["dropped_pairs"] == 1
    with pytest.raises(ValueError, match="all 1 train pairs were dropped"):
        train(ToyModel(), [long], None, c, tmp_path / "b", progress=False)


# ---- logs and metrics -----------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["dpo", "simpo", "orpo"])
def test_log_names_and_step0(make_model, tmp_path, objective):
    tr, ev = random_pairs(8, VOCAB), random_pairs(4, VOCAB, seed=1)
    kw = {} if objective == "orpo" else {"beta": 0.5}
    r = train(make_model(), tr, ev, cfg(objective=objective, max_steps=3, **kw), tmp_path,
              progress=False)
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines == r.log
    train_e = r.train_entries()
    assert [e["step"] for e in train_e] == [1, 2, 3]
    keys = {"step", "epoch", "loss", "grad_norm", "learning_rate", "rewards/chosen",
            "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected"}
    if objective == "orpo":
        keys |= {"nll_loss", "log_odds_ratio", "log_odds_chosen"}
    for e in train_e:
        assert keys <= set(e), keys - set(e)
    ev_e = r.eval_entries()
    assert [e["step"] for e in ev_e] == [0, 3]
    for e in ev_e:
        assert {"eval_loss", "eval_rewards/margins", "eval_rewards/accuracies",
                "eval_logps/chosen", "eval_avg_accuracy", "eval_ref_accuracy"} <= set(e)
    if objective == "dpo":
        # policy == reference at the first step: loss ln 2, strict accuracy 0
        assert train_e[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert train_e[0]["rewards/accuracies"] == 0.0
        assert ev_e[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-9)
        assert ev_e[0]["eval_ref_accuracy"] == 0.0
    assert r.heldout is not None and r.heldout.n == 4
    # eval entries are pair averages: recompute the final one from the per-pair numbers
    pe = r.heldout.pairs
    Lc = np.array([p.logp_chosen for p in pe])
    Lr = np.array([p.logp_rejected for p in pe])
    t = objective_terms(TrainConfig(objective=objective, **kw).objective_dict(), Lc, Lr,
                        [p.ref_logp_chosen for p in pe], [p.ref_logp_rejected for p in pe],
                        [p.n_chosen for p in pe], [p.n_rejected for p in pe])
    assert ev_e[-1]["eval_loss"] == pytest.approx(float(np.mean(t["loss"])), rel=1e-12)
    assert ev_e[-1]["eval_logps/chosen"] == pytest.approx(float(Lc.mean()), rel=1e-12)


def test_lr_schedule_logged(tmp_path):
    c = cfg(max_steps=5, warmup_steps=2, lr_schedule="linear", learning_rate=1.0, eval_every=0)
    r = train(ToyModel(), random_pairs(8, VOCAB), None, c, tmp_path, progress=False)
    lrs = [e["learning_rate"] for e in r.train_entries()]
    # transformers' linear schedule with 2 warmup steps over 5 steps
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 2 / 3, 1 / 3])
    c = cfg(max_steps=4, lr_schedule="cosine", learning_rate=1.0, eval_every=0)
    r = train(ToyModel(), random_pairs(8, VOCAB), None, c, tmp_path / "cos", progress=False)
    want = [0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]
    assert [e["learning_rate"] for e in r.train_entries()] == pytest.approx(want)


# ---- reproducibility, resume, interrupt ------------------------------------------------------

def test_bit_identical_rerun(make_model, tmp_path):
    tr, ev = random_pairs(10, VOCAB), random_pairs(4, VOCAB, seed=1)
    c = cfg(objective="simpo", max_steps=5)
    a = train(make_model(), tr, ev, c, tmp_path / "a", progress=False, name="run")
    b = train(make_model(), tr, ev, c, tmp_path / "b", progress=False, name="run")
    assert [e["loss"] for e in a.train_entries()] == [e["loss"] for e in b.train_entries()]
    assert (tmp_path / "a/log.jsonl").read_bytes() == (tmp_path / "b/log.jsonl").read_bytes()
    assert adapter_bytes(a.adapter_path) == adapter_bytes(b.adapter_path)
    c2 = cfg(objective="simpo", max_steps=5, seed=4)
    d = train(make_model(), tr, ev, c2, tmp_path / "d", progress=False)
    assert adapter_bytes(a.adapter_path) != adapter_bytes(d.adapter_path)


class Interrupt:
    def __init__(self, at):
        self.at = at

    def __call__(self, step, entry):
        if step == self.at:
            raise KeyboardInterrupt


def test_interrupt_then_resume_equals_uninterrupted(make_model, tmp_path):
    tr, ev = random_pairs(10, VOCAB), random_pairs(4, VOCAB, seed=1)
    c = cfg(max_steps=7, save_every=2, logging_steps=2)
    full = train(make_model(), tr, ev, c, tmp_path / "full", progress=False, name="run")

    m = make_model()
    with pytest.raises(KeyboardInterrupt):
        train(m, tr, ev, c, tmp_path / "int", progress=False, callback=Interrupt(3), name="run")
    # consistent state on disk: checkpoint at step 3, log lines all complete up to step 3
    state = json.loads((tmp_path / "int/checkpoint/state.json").read_text())
    assert state["step"] == 3 and not state["completed"]
    log = (tmp_path / "int/log.jsonl").read_text()
    assert log.endswith("\n")
    steps = [json.loads(x)["step"] for x in log.splitlines()]
    assert max(steps) == 3
    assert not (tmp_path / "int/result.json").exists()
    # resume in a fresh process-like setting (new model object)
    res = train(make_model(), tr, ev, c, tmp_path / "int", progress=False, name="run")
    assert (tmp_path / "int/log.jsonl").read_bytes() == (tmp_path / "full/log.jsonl").read_bytes()
    assert adapter_bytes(res.adapter_path) == adapter_bytes(full.adapter_path)
    assert [e["loss"] for e in res.train_entries()] == [e["loss"] for e in full.train_entries()]
    # a finished run is returned as is
    again = train(make_model(), tr, ev, c, tmp_path / "int", progress=False, name="run")
    assert again.to_dict() == res.to_dict()


def test_resume_refuses_other_settings(tmp_path):
    tr = random_pairs(8, VOCAB)
    with pytest.raises(KeyboardInterrupt):
        train(ToyModel(), tr, None, cfg(), tmp_path, progress=False, callback=Interrupt(1))
    with pytest.raises(ValueError, match="different config"):
        train(ToyModel(), tr, None, cfg(learning_rate=1e-3), tmp_path, progress=False)
    with pytest.raises(ValueError, match="different data_hash"):
        train(ToyModel(), random_pairs(8, VOCAB, seed=5), None, cfg(), tmp_path, progress=False)
    with pytest.raises(FileExistsError):
        train(ToyModel(), tr, None, cfg(), tmp_path, progress=False, resume=False)
    r = train(ToyModel(), tr, None, cfg(learning_rate=1e-3), tmp_path, progress=False,
              overwrite=True)
    assert len(r.train_entries()) == 6


class NaNAt:
    """Wraps a model; its train_step returns a NaN loss (or raises, like the C core) at a step."""

    def __init__(self, inner, at, raise_it):
        self.inner, self.at, self.raise_it, self.steps = inner, at, raise_it, 0

    def __getattr__(self, k):
        return getattr(self.inner, k)

    def zero_grad(self):
        self.steps += 1
        return self.inner.zero_grad()

    def train_step(self, *a):
        out = self.inner.train_step(*a)
        if self.steps == self.at:
            if self.raise_it:
                raise FloatingPointError("NaN in loss (simulated)")
            out = dict(out)
            out["loss"] = np.full_like(np.asarray(out["loss"]), np.nan)
        return out


@pytest.mark.parametrize("raise_it", [False, True])
def test_nan_stops_and_keeps_last_good(make_model, tmp_path, raise_it):
    tr = random_pairs(8, VOCAB)
    c = cfg(max_steps=6, eval_every=0)
    good = train(make_model(), tr, None, cfg(max_steps=6, eval_every=0, save_every=2),
                 tmp_path / "good", progress=False, callback=None)
    m = NaNAt(make_model(), at=4, raise_it=raise_it)
    with pytest.raises(TrainingDiverged, match="step 4"):
        train(m, tr, None, c, tmp_path / "nan", progress=False)
    state = json.loads((tmp_path / "nan/checkpoint/state.json").read_text())
    assert state["step"] == 3
    lines = [json.loads(x) for x in (tmp_path / "nan/log.jsonl").read_text().splitlines()]
    assert lines[-1]["event"] == "error" and "step 4" not in lines[-2].get("error", "")
    assert [e["step"] for e in lines if "loss" in e] == [1, 2, 3]
    # the saved adapter is the one after step 3 of the same (good) run
    ref = [json.loads(x) for x in (tmp_path / "good/log.jsonl").read_text().splitlines()]
    assert [e["loss"] for e in lines if "loss" in e] == [e["loss"] for e in ref if "loss" in e][:3]
    # resuming from the last good checkpoint with a healthy model finishes like the good run
    r = train(make_model(), tr, None, c, tmp_path / "nan", progress=False)
    assert adapter_bytes(r.adapter_path) == adapter_bytes(good.adapter_path)


# ---- equal-weight accumulation ----------------------------------------------------------------

def _grads_after_one_step(model, pairs, c, tmp):
    m = model
    calls = []
    orig = m.train_step

    def spy(tokens, seg, ref, obj, weight, dseed):
        calls.append((len(seg), weight))
        return orig(tokens, seg, ref, obj, weight, dseed)

    class W:
        def __getattr__(self, k):
            return spy if k == "train_step" else getattr(m, k)

    train(W(), pairs, None, c, tmp, progress=False)
    return calls


@pytest.mark.parametrize("objective", ["dpo", "simpo", "orpo"])
def test_accumulation_equal_weight(make_model, tmp_path, objective):
    pairs = random_pairs(4, VOCAB)
    kw = dict(objective=objective, max_steps=1, pairs_per_step=4, eval_every=0,
              learning_rate=0.05)
    # lr schedule constant so that the update is comparable
    kw["lr_schedule"] = "constant"
    m1, m4 = make_model(), make_model()
    calls1 = _grads_after_one_step(m1, pairs, cfg(micro_batch_size=4, **kw), tmp_path / "a")
    calls4 = _grads_after_one_step(m4, pairs, cfg(micro_batch_size=1, **kw), tmp_path / "b")
    assert calls1 == [(4, 0.25)] and calls4 == [(1, 0.25)] * 4
    g1, g4 = m1.lora_state("grads"), m4.lora_state("grads")
    for k in g1:
        np.testing.assert_allclose(g4[k], g1[k], rtol=2e-5, atol=1e-7)
    p1, p4 = m1.lora_state("params"), m4.lora_state("params")
    for k in p1:
        np.testing.assert_allclose(p4[k], p1[k], rtol=2e-5, atol=1e-7)
    # the logged step loss is the pair mean either way
    l1 = json.loads((tmp_path / "a/log.jsonl").read_text().splitlines()[1])["loss"]
    l4 = json.loads((tmp_path / "b/log.jsonl").read_text().splitlines()[1])["loss"]
    assert l1 == pytest.approx(l4, rel=1e-6)


def test_uneven_last_batch_weights(tmp_path):
    m = ToyModel()
    calls = _grads_after_one_step(m, random_pairs(6, VOCAB), cfg(max_steps=2, pairs_per_step=4,
                                                                  micro_batch_size=3, eval_every=0),
                                  tmp_path)
    # step 1: 4 pairs as 3 + 1 with weight 1/4; step 2: the remaining 2 pairs with weight 1/2
    assert calls == [(3, 0.25), (1, 0.25), (2, 0.5)]


def test_epoch_covers_every_pair_once(tmp_path):
    m = ToyModel()
    seen = []
    orig = m.train_step

    def spy(tokens, seg, *a):
        seen.append(tokens.tobytes())
        return orig(tokens, seg, *a)

    m.train_step = spy
    pairs = random_pairs(7, VOCAB)
    train(m, pairs, None, cfg(epochs=1, max_steps=None, pairs_per_step=3, micro_batch_size=1,
                              eval_every=0), tmp_path, progress=False)
    packed = sorted(batching.pack([p])[0].tobytes() for p in pairs)
    assert sorted(seen) == packed


def test_continue_adapter_uses_it_as_reference(tmp_path):
    tr = random_pairs(8, VOCAB)
    first = train(ToyModel(), tr, None, cfg(max_steps=3, eval_every=0), tmp_path / "a",
                  progress=False)
    m = ToyModel()
    r = train(m, tr, random_pairs(4, VOCAB, seed=2), cfg(max_steps=2, eval_every=0),
              tmp_path / "b", progress=False, init_adapter=first.adapter_path)
    e = r.train_entries()[0]
    # the reference is the starting adapter, so DPO starts at ln 2 again, margins 0
    assert e["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert e["rewards/margins"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="does not match"):
        train(ToyModel(), tr, None, cfg(lora_rank=3), tmp_path / "c", progress=False,
              init_adapter=first.adapter_path)


@pytest.mark.parametrize("obj", [
    TrainConfig(objective="dpo", beta=0.3).objective_dict(),
    TrainConfig(objective="dpo", beta=0.3, label_smoothing=0.1).objective_dict(),
    TrainConfig(objective="dpo", loss_type="ipo", beta=0.3).objective_dict(),
    TrainConfig(objective="dpo", loss_type="hinge", beta=0.3).objective_dict(),
    TrainConfig(objective="simpo", beta=2.5, gamma=0.7).objective_dict(),
    TrainConfig(objective="simpo", beta=2.5, gamma=0.7, sft_weight=0.5).objective_dict(),
    TrainConfig(objective="orpo", orpo_lambda=0.2).objective_dict(),
])
def test_eval_objective_matches_independent_numpy(obj):
    """Held-out metrics use the core's objective_eval; check it against design.md's formulas
    written independently in NumPy (evaluate.objective_terms_numpy)."""
    from prefopt.evaluate import objective_terms_numpy

    r = np.random.default_rng(0)
    n = 50
    nc, nr = r.integers(1, 40, n).astype(float), r.integers(1, 40, n).astype(float)
    Lc, Lr = -nc * r.uniform(0.01, 3, n), -nr * r.uniform(0.01, 3, n)
    Rc, Rr = Lc + r.normal(0, 2, n), Lr + r.normal(0, 2, n)
    a = objective_terms(obj, Lc, Lr, Rc, Rr, nc, nr)
    b = objective_terms_numpy(obj, Lc, Lr, Rc, Rr, nc, nr)
    for k in ("loss", "reward_c", "reward_r"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-10, atol=1e-12, err_msg=k)
    if obj["kind"] == "orpo":
        for k in ("nll", "log_odds", "log_sig_odds"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-9, atol=1e-12, err_msg=k)


def test_finished_checkpoint_without_result_is_completed(tmp_path):
    tr, ev = random_pairs(8, VOCAB), random_pairs(4, VOCAB, seed=1)
    a = train(ToyModel(), tr, ev, cfg(max_steps=2), tmp_path, progress=False)
    log = (tmp_path / "log.jsonl").read_bytes()
    (tmp_path / "result.json").unlink()
    b = train(ToyModel(), tr, ev, cfg(max_steps=2), tmp_path, progress=False)
    assert (tmp_path / "log.jsonl").read_bytes() == log
    assert b.heldout.to_dict() == a.heldout.to_dict()
    assert adapter_bytes(b.adapter_path) == adapter_bytes(a.adapter_path)


def test_evaluate_standalone_matches_run(make_model, tmp_path):
    from prefopt.evaluate import evaluate

    tr, ev = random_pairs(8, VOCAB), random_pairs(5, VOCAB, seed=1)
    m = make_model()
    c = cfg(max_steps=2)
    r = train(m, tr, ev, c, tmp_path, progress=False)
    again = evaluate(m, ev, config=c)  # the model holds the trained adapter
    assert again.to_dict() == r.heldout.to_dict()
    base = evaluate(m, ev, use_lora=False)
    assert all(p.ref_margin == 0.0 for p in base.pairs) and base.metrics.get("eval_loss") is None
    with pytest.raises(ValueError, match="no held-out pairs"):
        evaluate(m, [], config=c)


class WordTok:
    """Decodes ids as words; eos id 0."""
    eos_id = 0

    def decode(self, ids, skip_special=False):
        return " ".join(f"w{i}" for i in ids if not (skip_special and i == 0))


def test_user_scorer_on_greedy_generations(make_model, tmp_path):
    from prefopt.evaluate import evaluate

    class WithTok:
        def __init__(self, core):
            self.core, self.tokenizer = core, WordTok()

    seen = []

    def scorer(prompt, text, pair):
        seen.append((pair.id, text))
        return float(len(text.split()))

    tr, ev = random_pairs(6, VOCAB), random_pairs(3, VOCAB, seed=1)
    m = WithTok(make_model())
    r = train(m, tr, ev, cfg(max_steps=2, eval_every=0), tmp_path, progress=False, scorer=scorer)
    assert [p.score for p in r.heldout.pairs] == [float(len(t.split())) for _, t in seen[-3:]]
    assert "eval_score" in r.eval_entries()[-1]
    # generation is greedy: the same adapter gives the same texts and scores
    texts = [t for _, t in seen[-3:]]
    again = evaluate(m, ev, config=cfg(max_steps=2), scorer=scorer, max_new_tokens=128)
    assert [t for _, t in seen[-3:]] == texts
    assert [p.score for p in again.pairs] == [p.score for p in r.heldout.pairs]
    # the prompt handed to the scorer is the pair's prompt (ids for tokenised pairs)
    with pytest.raises(TypeError, match="must return a number"):
        evaluate(m, ev, scorer=lambda p, t, x: "good")
