"""Backward of the C decoder to the LoRA parameters, the LoRA methods of
prefopt._core.Model, the optimizer step and greedy generation.

References: PyTorch + peft autograd in float64 on the same tiny transformers
models with each pair as two separate sequences (no prefix sharing, no
packing) and the objectives written out here in torch; central finite
differences of the C train_step loss; torch.optim.AdamW; transformers' greedy
generate.
"""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import prefopt
from prefopt import _core

import tiny_models as tm

torch.set_num_threads(1)
prefopt.set_num_threads(1)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def with_random_B(m, rng, scale=0.1):
    """Give every lora_B a small random value (B = 0 would make A's grads zero)."""
    st = m.lora_state()
    for k in st:
        if "lora_B" in k:
            st[k] = (scale * rng.standard_normal(st[k].shape)).astype(np.float32)
    m.lora_load_state(st)
    return st


def peft_model(hf, state, rank, alpha, targets=ALL, rslora=False):
    """float64 peft copy of hf whose adapter holds prefopt's `state` values."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(hf).double(),
                        LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                   lora_dropout=0.0, use_rslora=rslora))
    params = {}
    for n, p in pm.named_parameters():
        if "lora_" in n:
            key = n.replace("base_model.model.", "").replace(".default", "")
            with torch.no_grad():
                p.copy_(torch.tensor(state[key], dtype=torch.float64))
            params[key] = p
    assert set(params) == set(state), "adapter names differ from peft's"
    return pm, params


def torch_logp(model, prompt, completion):
    ids = torch.tensor([list(prompt) + list(completion)])
    lp = torch.log_softmax(model(ids).logits[0], -1)
    n = len(prompt)
    return lp[torch.arange(n - 1, n - 1 + len(completion)), torch.tensor(completion)].sum()


def torch_loss(kind, obj, Lc, Lr, Rc, Rr, nc, nr):
    """The objectives of design.md section 7, written independently of loss.c."""
    beta = obj.get("beta", 0.1)
    if kind == "dpo":
        return -F.logsigmoid(beta * ((Lc - Rc) - (Lr - Rr)))
    if kind == "simpo":
        return -F.logsigmoid(beta * Lc / nc - beta * Lr / nr - obj.get("gamma", 0.0)) \
            + obj.get("sft_weight", 0.0) * (-Lc / nc)
    if kind == "orpo":
        ac, ar = Lc / nc, Lr / nr
        log_odds = lambda a: a - torch.log(-torch.expm1(a))
        return -ac - obj["lambda"] * F.logsigmoid(log_odds(ac) - log_odds(ar))
    raise ValueError(kind)


def reference_grads(hf, state, pairs, ref, obj, weight, rank, alpha, rslora=False):
    pm, params = peft_model(hf, state, rank, alpha, rslora=rslora)
    total = 0.0
    for i, (p, c, r) in enumerate(pairs):
        Lc, Lr = torch_logp(pm, p, c), torch_logp(pm, p, r)
        total = total + torch_loss(obj["kind"], obj, Lc, Lr, float(ref[i, 0]), float(ref[i, 1]),
                                   len(c), len(r))
    (weight * total).backward()
    return total.item(), {k: p.grad.numpy() for k, p in params.items()}


def assert_grads_close(got, want, rtol):
    num = den = 0.0
    for k, w in want.items():
        g = got[k].astype(np.float64)
        d, n = np.linalg.norm(g - w), np.linalg.norm(w)
        assert n > 0, f"reference gradient of {k} is zero: the test would be vacuous"
        assert d <= rtol * n, f"{k}: relative error {d / n:.2e}"
        num, den = num + d * d, den + n * n
    assert math.sqrt(num / den) <= rtol


OBJECTIVES = [
    {"kind": "dpo", "beta": 0.5},
    {"kind": "simpo", "beta": 2.0, "gamma": 0.6},
    {"kind": "orpo", "lambda": 0.3},
]


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", False), ("llama", True)])
@pytest.mark.parametrize("obj", OBJECTIVES, ids=lambda o: o["kind"])
def test_lora_grads_match_peft_autograd(arch, tied, obj):
    """One micro-batch of 4 prefix-shared pairs vs peft autograd on separate sequences."""
    hf = tm.make_model(arch, tied=tied, seed=11)
    m = tm.to_prefopt(hf)
    if tied:
        m.activation_budget = 0  # the recompute path against autograd too
    rank, alpha = 4, 8.0
    m.lora_init(rank, alpha, "all-linear", seed=5)
    rng = np.random.default_rng(7)
    state = with_random_B(m, rng)
    pairs = tm.random_pairs(rng, 4, hf.config.vocab_size, prompt=(2, 10), completion=(1, 9))
    tok, seg = tm.pack(pairs)
    ref = m.score(tok, seg, use_lora=False)["logp"] + rng.standard_normal((4, 2))
    weight = 0.25
    m.zero_grad()
    out = m.train_step(tok, seg, ref, obj, weight, 0)
    ref_loss, want = reference_grads(hf, state, pairs, ref, obj, weight, rank, alpha)
    assert abs(out["loss"].sum() - ref_loss) < 1e-4 * max(1.0, abs(ref_loss))
    assert_grads_close(m.lora_state("grads"), want, 1e-4)
    # a second call accumulates (+=)
    out2 = m.train_step(tok, seg, ref, obj, weight, 0)
    np.testing.assert_array_equal(out["loss"], out2["loss"])
    got2 = m.lora_state("grads")
    assert_grads_close({k: v / 2 for k, v in got2.items()}, want, 1e-4)


def test_orpo_nll_over_prompt_and_chosen_matches_peft():
    """ORPO with nll_include_prompt: NLL = mean over every predicted token of prompt+chosen
    (TRL ORPOTrainer's cross-entropy on the whole chosen sequence); odds ratio unchanged."""
    hf = tm.make_model("qwen2", seed=24)
    m = tm.to_prefopt(hf)
    m.lora_init(4, 8.0, "all-linear", seed=6)
    rng = np.random.default_rng(12)
    state = with_random_B(m, rng)
    pairs = tm.random_pairs(rng, 4, 97, prompt=(1, 8))
    pairs[0] = ([7], pairs[0][1], pairs[0][2])  # a 1-token prompt has no scored prompt token
    tok, seg = tm.pack(pairs)
    lam, weight = 0.4, 0.5
    obj = {"kind": "orpo", "lambda": lam, "nll_include_prompt": True}
    m.zero_grad()
    out = m.train_step(tok, seg, np.zeros((4, 2)), obj, weight)
    got = m.lora_state("grads")
    plain = m.train_step(tok, seg, np.zeros((4, 2)), {"kind": "orpo", "lambda": lam}, weight)
    np.testing.assert_array_equal(plain["log_odds"], out["log_odds"])
    assert not np.allclose(plain["nll"], out["nll"])
    pm, params = peft_model(hf, state, 4, 8.0)
    total, nlls = 0.0, []
    for p, c, r in pairs:
        ids = torch.tensor([list(p) + list(c)])
        lp_all = torch.log_softmax(pm(ids).logits[0, :-1], -1)
        nll = F.nll_loss(lp_all, ids[0, 1:])  # mean over every predicted token
        Lc, Lr = torch_logp(pm, p, c), torch_logp(pm, p, r)
        log_odds = lambda a: a - torch.log(-torch.expm1(a))
        ratio = log_odds(Lc / len(c)) - log_odds(Lr / len(r))
        total = total + nll - lam * F.logsigmoid(ratio)
        nlls.append(nll.item())
    (weight * total).backward()
    np.testing.assert_allclose(out["nll"], nlls, atol=1e-5)
    assert abs(out["loss"].sum() - total.item()) < 1e-4
    assert_grads_close(got, {k: p.grad.numpy() for k, p in params.items()}, 1e-4)
    with pytest.raises(ValueError, match="ORPO"):
        m.train_step(tok, seg, np.zeros((4, 2)), {"kind": "dpo", "nll_include_prompt": True}, 1.0)


def test_rslora_and_subset_targets_match_peft():
    hf = tm.make_model("qwen2", seed=12)
    m = tm.to_prefopt(hf)
    targets = ["v_proj", "o_proj", "down_proj"]
    m.lora_init(2, 3.0, targets, use_rslora=True, seed=1)
    info = m.lora_info()
    assert info["targets"] == targets and info["use_rslora"]
    assert abs(info["scale"] - 3.0 / math.sqrt(2)) < 1e-6
    rng = np.random.default_rng(3)
    state = with_random_B(m, rng)
    pairs = tm.random_pairs(rng, 3, 97)
    tok, seg = tm.pack(pairs)
    ref = np.zeros((3, 2))
    obj = {"kind": "simpo", "beta": 2.5, "gamma": 0.5}
    m.zero_grad()
    m.train_step(tok, seg, ref, obj, 1.0)
    pm, params = peft_model(hf, state, 2, 3.0, targets=targets, rslora=True)
    total = sum(torch_loss("simpo", obj, torch_logp(pm, p, c), torch_logp(pm, p, r), 0.0, 0.0,
                           len(c), len(r)) for p, c, r in pairs)
    total.backward()
    assert_grads_close(m.lora_state("grads"), {k: p.grad.numpy() for k, p in params.items()}, 1e-4)


@pytest.mark.parametrize("dropout_seed", [0, 77])
def test_shared_and_unshared_layouts_same_grads(dropout_seed):
    """DPO grads of 4 prefix-shared pairs (train_step) equal the grads of the same
    objective with every prompt+completion packed as its own sequence (rejected_len 0),
    back-propagated with logp_backward and the DPO coefficients dLoss/dLc, dLoss/dLr.
    (Dropout masks depend on token rows, so the dropout case only compares
    train_step with logp_backward on the same layout.)"""
    hf = tm.make_model("llama", seed=13)
    m = tm.to_prefopt(hf)
    m.lora_init(4, 4.0, "all-linear", dropout=0.1 if dropout_seed else 0.0, seed=2)
    rng = np.random.default_rng(9)
    with_random_B(m, rng)
    pairs = tm.random_pairs(rng, 4, 97)
    tok, seg = tm.pack(pairs)
    ref = m.score(tok, seg, use_lora=False)["logp"] + rng.standard_normal((4, 2))
    beta, weight = 0.3, 0.25
    m.zero_grad()
    out = m.train_step(tok, seg, ref, {"kind": "dpo", "beta": beta}, weight, dropout_seed)
    shared = m.lora_state("grads")
    z = beta * ((out["logp"][:, 0] - ref[:, 0]) - (out["logp"][:, 1] - ref[:, 1]))
    s = 1.0 / (1.0 + np.exp(z))  # sigmoid(-z)
    coef = weight * np.stack([-beta * s, beta * s], 1)
    # same layout through logp_backward: identical up to float32 rounding of the coefficients
    m.zero_grad()
    lb = m.logp_backward(tok, seg, coef, dropout_seed)
    np.testing.assert_array_equal(lb["logp"], out["logp"])
    assert_grads_close(m.lora_state("grads"), shared, 1e-6)
    if dropout_seed:
        return
    # unshared: (prompt, chosen) and (prompt, rejected) as separate sequences
    utok, useg = tm.pack_unshared(pairs)
    ucoef = np.zeros((8, 2))
    ucoef[0::2, 0], ucoef[1::2, 0] = coef[:, 0], coef[:, 1]
    m.zero_grad()
    ulb = m.logp_backward(utok, useg, ucoef)
    np.testing.assert_allclose(ulb["logp"][:, 0].reshape(4, 2), out["logp"], atol=1e-4)
    assert_grads_close(m.lora_state("grads"), shared, 1e-4)
    # packing order does not matter either: one pair per call, shuffled
    m.zero_grad()
    for i in [2, 0, 3, 1]:
        m.train_step(*tm.pack([pairs[i]]), ref[i:i + 1], {"kind": "dpo", "beta": beta}, weight)
    assert_grads_close(m.lora_state("grads"), shared, 1e-4)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_recompute_and_kept_activations_same_grads(dropout):
    """Backward with every layer recomputed (budget 0), some kept and all kept
    gives bit-identical gradients (recomputation is deterministic, dropout masks too)."""
    hf = tm.make_model("qwen2", seed=23, num_hidden_layers=4)
    m = tm.to_prefopt(hf)
    m.lora_init(3, 6.0, "all-linear", dropout=dropout, seed=4)
    rng = np.random.default_rng(10)
    with_random_B(m, rng)
    tok, seg = tm.pack(tm.random_pairs(rng, 3, 97))
    ref = rng.standard_normal((3, 2)) - 20
    seg_bytes = {}
    grads = []
    for budget in (0, None, 1 << 40):
        if budget is None:  # room for about two kept layers
            m.activation_budget = 0
            lo = m.activation_bytes(seg)
            m.activation_budget = 1 << 40
            hi = m.activation_bytes(seg)
            budget = lo + (hi - lo) * 2 // 3
        m.activation_budget = budget
        seg_bytes[budget] = m.activation_bytes(seg)
        m.zero_grad()
        m.train_step(tok, seg, ref, {"kind": "simpo", "beta": 2.0, "gamma": 0.5}, 1.0, 5)
        grads.append(m.lora_state("grads"))
    b = sorted(seg_bytes)
    assert seg_bytes[b[0]] < seg_bytes[b[1]] < seg_bytes[b[2]]
    for g in grads[1:]:
        for k in g:
            np.testing.assert_array_equal(g[k], grads[0][k])


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_finite_differences_of_train_step_loss(dropout):
    """Central differences of the C loss (same dropout mask via the seed) on sampled
    LoRA parameters with the largest gradients; relative error < 1e-3."""
    hf = tm.make_model("qwen2", seed=14)
    m = tm.to_prefopt(hf)
    m.lora_init(3, 6.0, "all-linear", dropout=dropout, seed=4)
    rng = np.random.default_rng(5)
    state = with_random_B(m, rng, scale=0.2)
    pairs = tm.random_pairs(rng, 3, 97)
    tok, seg = tm.pack(pairs)
    ref = m.score(tok, seg, use_lora=False)["logp"] + rng.standard_normal((3, 2))
    obj = {"kind": "dpo", "beta": 1.0}
    seed = 1234

    def loss(st):
        m.lora_load_state(st)
        return float(np.sum(m.train_step(tok, seg, ref, obj, 1.0, seed)["loss"], dtype=np.float64))

    m.zero_grad()
    loss(state)
    grads = m.lora_state("grads")
    names = sorted(grads)
    checked = 0
    for name in rng.choice(names, 8, replace=False):
        g = grads[name].reshape(-1)
        idx = int(np.argmax(np.abs(g)))
        eps = 1e-2
        plus, minus = copy.deepcopy(state), copy.deepcopy(state)
        plus[name].reshape(-1)[idx] += eps
        minus[name].reshape(-1)[idx] -= eps
        h = float(plus[name].reshape(-1)[idx]) - float(minus[name].reshape(-1)[idx])
        fd = (loss(plus) - loss(minus)) / h
        assert abs(fd - g[idx]) < 1e-3 * abs(g[idx]), (name, idx, fd, g[idx])
        checked += 1
    m.lora_load_state(state)
    assert checked == 8
    if dropout:
        m.zero_grad()
        a = m.train_step(tok, seg, ref, obj, 1.0, 99)["loss"]
        b = m.train_step(tok, seg, ref, obj, 1.0, 0)["loss"]
        assert not np.array_equal(a, b)


def test_dpo_step0_is_ln2_with_nonzero_grad():
    hf = tm.make_model("llama", seed=15)
    m = tm.to_prefopt(hf)
    m.lora_init(4, 8.0, ["q_proj", "v_proj"], seed=3)
    pairs = tm.random_pairs(np.random.default_rng(1), 3, 97)
    tok, seg = tm.pack(pairs)
    ref = m.score(tok, seg, use_lora=False)["logp"]
    out = m.train_step(tok, seg, ref, {"kind": "dpo", "beta": 0.1}, 1.0 / 3)
    np.testing.assert_allclose(out["loss"], math.log(2), atol=1e-6)
    np.testing.assert_allclose(out["logp"], ref, atol=0)
    assert np.all(out["reward"] == 0)
    g = m.lora_state("grads")
    assert m.grad_norm() > 0
    assert all(np.abs(v).max() > 0 for k, v in g.items() if "lora_B" in k)
    assert all(np.abs(v).max() == 0 for k, v in g.items() if "lora_A" in k)  # B = 0


def test_nonfinite_raises_and_leaves_grads():
    hf = tm.make_model("llama", seed=16)
    m = tm.to_prefopt(hf)
    m.lora_init(2, 2.0, "all-linear", seed=1)
    tok, seg = tm.pack(tm.random_pairs(np.random.default_rng(2), 2, 97))
    m.train_step(tok, seg, np.zeros((2, 2)), {"kind": "dpo"}, 1.0)
    before = m.lora_state("grads")
    with pytest.raises(FloatingPointError):
        m.train_step(tok, seg, np.array([[0.0, np.nan], [0.0, 0.0]]), {"kind": "dpo"}, 1.0)
    after = m.lora_state("grads")
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_train_step_bad_input():
    hf = tm.make_model("llama", seed=17)
    m = tm.to_prefopt(hf)
    tok, seg = tm.pack([([1, 2], [3], [4, 5])])
    with pytest.raises(ValueError, match="lora_init"):
        m.train_step(tok, seg, np.zeros((1, 2)), {"kind": "dpo"}, 1.0)
    m.lora_init(2, 2.0, "q", seed=1)
    with pytest.raises(ValueError, match="empty completion"):
        m.train_step(*tm.pack([([1, 2], [3], [])]), np.zeros((1, 2)), {"kind": "dpo"}, 1.0)
    with pytest.raises(ValueError, match="ref"):
        m.train_step(tok, seg, np.zeros((2, 2)), {"kind": "dpo"}, 1.0)
    with pytest.raises(TypeError, match="ref"):
        m.train_step(tok, seg, np.zeros((1, 2), np.float32), {"kind": "dpo"}, 1.0)
    with pytest.raises(ValueError):
        m.train_step(tok, seg, np.zeros((1, 2)), {"kind": "nope"}, 1.0)
    with pytest.raises(ValueError, match="weight"):
        m.train_step(tok, seg, np.zeros((1, 2)), {"kind": "dpo"}, float("nan"))
    with pytest.raises(ValueError, match="unknown LoRA target"):
        m.lora_init(2, 2.0, ["q_proj", "lm_head"])


# ---------------------------------------------------------------- LoRA methods

def test_lora_state_roundtrip_and_checks():
    hf = tm.make_model("llama", seed=18)
    m = tm.to_prefopt(hf)
    assert m.lora_info() is None
    m.lora_init(3, 6.0, ["q", "down_proj"], seed=8)
    st = m.lora_state()
    assert set(st) == {f"model.layers.{i}.{p}.lora_{ab}.weight" for i in range(2)
                       for p in ("self_attn.q_proj", "mlp.down_proj") for ab in "AB"}
    assert st["model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (3, 32)
    assert st["model.layers.1.mlp.down_proj.lora_B.weight"].shape == (32, 3)
    a = st["model.layers.0.mlp.down_proj.lora_A.weight"]
    assert np.abs(a).max() <= 1 / math.sqrt(48) and np.abs(a).max() > 0.5 / math.sqrt(48)
    assert all(np.abs(v).max() == 0 for k, v in st.items() if "lora_B" in k)
    # same seed, same init; other seed, other init
    m2 = tm.to_prefopt(hf)
    m2.lora_init(3, 6.0, ["q_proj", "down_proj"], seed=8)
    np.testing.assert_array_equal(m2.lora_state()[next(iter(st))], st[next(iter(st))])
    m2.lora_init(3, 6.0, ["q_proj", "down_proj"], seed=9)
    assert not np.array_equal(m2.lora_state()[next(iter(st))], st[next(iter(st))])
    # errors: missing name, bad shape, extra name, bad arena; nothing changes on error
    bad = dict(st)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing"):
        m.lora_load_state(bad)
    bad = dict(st, **{"model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((3, 31), np.float32)})
    with pytest.raises(ValueError, match="shape"):
        m.lora_load_state(bad)
    with pytest.raises(ValueError, match="extra"):
        m.lora_load_state(dict(st, extra=np.zeros(1, np.float32)))
    with pytest.raises(ValueError, match="arena"):
        m.lora_state("moments")
    for arena in ("grads", "adam_m", "adam_v"):
        z = {k: np.full_like(v, 0.5) for k, v in st.items()}
        m.lora_load_state(z, arena)
        assert all((v == 0.5).all() for v in m.lora_state(arena).values())
    m.lora_remove()
    assert m.lora_info() is None
    with pytest.raises(ValueError):
        m.lora_state()


def test_lora_merge_equals_adapter():
    hf = tm.make_model("qwen2", seed=19)
    m = tm.to_prefopt(hf)
    m.lora_init(4, 8.0, "all-linear", seed=6)
    with_random_B(m, np.random.default_rng(4), scale=0.3)
    tok, seg = tm.pack(tm.random_pairs(np.random.default_rng(5), 3, 97))
    with_lora = m.score(tok, seg)["logp"]
    base = m.score(tok, seg, use_lora=False)["logp"]
    assert np.abs(with_lora - base).max() > 1e-2
    m.lora_merge()
    assert m.lora_info() is None
    np.testing.assert_allclose(m.score(tok, seg)["logp"], with_lora, atol=1e-4)


def test_optimizer_step_matches_torch_adamw():
    hf = tm.make_model("llama", seed=20)
    m = tm.to_prefopt(hf)
    m.lora_init(2, 4.0, ["q_proj", "up_proj"], seed=1)
    rng = np.random.default_rng(6)
    p0 = with_random_B(m, rng)
    names = sorted(p0)
    tparams = [torch.tensor(p0[k], dtype=torch.float64, requires_grad=True) for k in names]
    opt = torch.optim.AdamW(tparams, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for step in range(3):
        g = {k: (rng.standard_normal(p0[k].shape) * (step + 1)).astype(np.float32) for k in names}
        m.lora_load_state(g, "grads")
        norm = m.optimizer_step(1e-2, 0.9, 0.99, 1e-8, 0.1, max_grad_norm=1.0)
        for t, k in zip(tparams, names):
            t.grad = torch.tensor(g[k], dtype=torch.float64)
        want = torch.nn.utils.clip_grad_norm_(tparams, 1.0)
        opt.step()
        assert abs(norm - float(want)) < 1e-4 * float(want)
        assert m.adam_step == step + 1
        got = m.lora_state()
        for t, k in zip(tparams, names):
            np.testing.assert_allclose(got[k], t.detach().numpy(), atol=2e-6)
    # grads are kept by the step; zero_grad clears them
    assert m.grad_norm() > 0
    m.zero_grad()
    assert m.grad_norm() == 0
    m.adam_step = 7
    assert m.adam_step == 7
    bad = {k: np.full_like(p0[k], np.inf) for k in names}
    m.lora_load_state(bad, "grads")
    before = m.lora_state()
    with pytest.raises(FloatingPointError):
        m.optimizer_step(1e-2)
    assert m.adam_step == 7
    after = m.lora_state()
    assert all(np.array_equal(before[k], after[k]) for k in names)


# ---------------------------------------------------------------- generate

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_matches_transformers_greedy(arch):
    hf = tm.make_model(arch, seed=21)
    m = tm.to_prefopt(hf)
    prompt = np.array([5, 17, 3, 60, 2, 9, 44], np.int32)
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt.tolist()]), max_new_tokens=20, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].numpy()
    got = m.generate(prompt, 20)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    # stop id: output ends at (and includes) its first occurrence
    stop = int(want[5])
    first = int(np.argmax(want == stop))
    np.testing.assert_array_equal(m.generate(prompt, 20, [stop]), want[:first + 1])
    assert m.generate(prompt, 0).shape == (0,)
    with pytest.raises(ValueError):
        m.generate(np.zeros(0, np.int32), 3)
    with pytest.raises(ValueError):
        m.generate(np.array([1000], np.int32), 3)


def test_generate_with_lora_matches_peft():
    hf = tm.make_model("llama", seed=22)
    m = tm.to_prefopt(hf)
    m.lora_init(4, 8.0, "all-linear", seed=3)
    state = with_random_B(m, np.random.default_rng(8), scale=0.5)
    pm, _ = peft_model(hf, state, 4, 8.0)
    prompt = np.array([1, 2, 3, 4, 5], np.int32)
    ids = torch.tensor([prompt.tolist()])
    with torch.no_grad():
        for _ in range(12):  # greedy by hand on the float64 peft model, no cache
            ids = torch.cat([ids, pm(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    np.testing.assert_array_equal(m.generate(prompt, 12), ids[0, 5:].numpy())
    base = m.generate(prompt, 12, use_lora=False)
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt.tolist()]), max_new_tokens=12, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, 5:].numpy()
    np.testing.assert_array_equal(base, want)
