"""prefopt._core.Model forward (score) against transformers on tiny random models.

References are computed by transformers one sequence at a time (prompt+chosen and
prompt+rejected separately, no packing), so they also check prefix sharing,
packing, positions and the attention layout of the C core.
"""
import numpy as np
import pytest
import torch

import prefopt
from prefopt import _core

import tiny_models as tm

torch.set_num_threads(1)
prefopt.set_num_threads(1)

VARIANTS = [("llama", False), ("llama", True), ("qwen2", False)]


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: f"{v[0]}-{'tied' if v[1] else 'untied'}")
def models(request):
    arch, tied = request.param
    hf = tm.make_model(arch, tied=tied, seed=3)
    return hf, tm.to_prefopt(hf)


def reference(hf, pairs):
    per_tok, sums = [], []
    for p, c, r in pairs:
        lc, lr = tm.hf_token_logps(hf, p, c), tm.hf_token_logps(hf, p, r)
        per_tok += [lc, lr]
        sums.append((lc.sum(), lr.sum()))
    return np.concatenate(per_tok), np.array(sums)


def test_score_matches_transformers_prefix_shared(models):
    hf, m = models
    rng = np.random.default_rng(0)
    pairs = tm.random_pairs(rng, 5, hf.config.vocab_size, prompt=(1, 20), completion=(1, 12))
    tok, seg = tm.pack(pairs)
    out = m.score(tok, seg, per_token=True)
    ref_tok, ref_sum = reference(hf, pairs)
    assert out["logp"].dtype == np.float64 and out["logp"].shape == (5, 2)
    assert out["per_token"].dtype == np.float32
    np.testing.assert_array_equal(out["n"], seg[:, 1:])
    np.testing.assert_allclose(out["per_token"], ref_tok, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["logp"], ref_sum, atol=1e-4, rtol=0)
    # the numbers are not trivial (near-uniform logits would be ~ -log(97) = -4.57 each)
    assert np.std(ref_tok) > 0.5


@torch.no_grad()
def test_completion_logits_match_transformers(models):
    hf, m = models
    rng = np.random.default_rng(6)
    pairs = tm.random_pairs(rng, 3, hf.config.vocab_size, prompt=(1, 12), completion=(1, 9))
    logits = m._completion_logits(*tm.pack(pairs))
    want = []
    for p, c, r in pairs:
        for comp in (c, r):
            full = hf(torch.tensor([p + comp])).logits[0]
            want.append(full[len(p) - 1:len(p) - 1 + len(comp)].numpy())
    want = np.concatenate(want)
    assert logits.shape == want.shape == (sum(len(c) + len(r) for _, c, r in pairs), 97)
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)


def test_shared_equals_unshared_layout(models):
    hf, m = models
    rng = np.random.default_rng(1)
    pairs = tm.random_pairs(rng, 3, hf.config.vocab_size)
    shared = m.score(*tm.pack(pairs), per_token=True)
    tok, seg = tm.pack_unshared(pairs)
    unshared = m.score(tok, seg, per_token=True)
    assert (unshared["n"][:, 1] == 0).all() and (unshared["logp"][:, 1] == 0).all()
    np.testing.assert_allclose(shared["logp"].reshape(-1), unshared["logp"][:, 0], atol=2e-5)
    np.testing.assert_allclose(shared["per_token"], unshared["per_token"], atol=1e-5)


def test_empty_completions_and_single_sequences(models):
    hf, m = models
    pairs = [([5, 6, 7], [8, 9], []), ([1], [], [3, 4, 5]), ([2, 3], [], []), ([4], [7], [9])]
    tok, seg = tm.pack(pairs)
    out = m.score(tok, seg, per_token=True)
    ref_tok, ref_sum = reference(hf, pairs)
    np.testing.assert_array_equal(out["n"], [[2, 0], [0, 3], [0, 0], [1, 1]])
    np.testing.assert_allclose(out["per_token"], ref_tok, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["logp"], ref_sum, atol=1e-4, rtol=0)


def test_long_sequence_many_chunks():
    """More completion tokens than one head chunk (64), long positions for RoPE."""
    hf = tm.make_model("qwen2", seed=5, rope_theta=1000.0)
    m = tm.to_prefopt(hf)
    rng = np.random.default_rng(2)
    pairs = [(rng.integers(0, 97, 40).tolist(), rng.integers(0, 97, 70).tolist(),
              rng.integers(0, 97, 55).tolist())]
    out = m.score(*tm.pack(pairs), per_token=True)
    ref_tok, ref_sum = reference(hf, pairs)
    np.testing.assert_allclose(out["per_token"], ref_tok, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["logp"], ref_sum, atol=2e-4, rtol=0)


def test_score_is_deterministic_and_lora_off_is_base(models):
    hf, m = models
    rng = np.random.default_rng(4)
    tok, seg = tm.pack(tm.random_pairs(rng, 3, hf.config.vocab_size))
    a = m.score(tok, seg)
    b = m.score(tok, seg, use_lora=False)
    np.testing.assert_array_equal(a["logp"], b["logp"])
    assert "per_token" not in a


def formula_floats(cfg, seg, train, rank=0, n_targets=0, n_lora=0, dropout=False, keep=1):
    """The activation-memory formula stated in csrc/model.h (keep = layers kept)."""
    D, F, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    H, Q, K = cfg["num_attention_heads"], cfg["num_attention_heads"] * cfg["head_dim"], \
        cfg["num_key_value_heads"] * cfg["head_dim"]
    T, n = int(seg.sum()), int(seg[:, 1:].sum())
    S = max(max((lp + lc) ** 2, lr * (lp + lr)) for lp, lc, lr in seg)
    head = 64 * (D + V)
    if not train:
        return T * (5 * D + 2 * Q + 2 * K + 3 * F + H + 4) + T * rank * n_targets + S + head + 4 * n
    per_layer = T * (3 * D + 2 * Q + 2 * K + 3 * F + H + 2) + T * rank * n_targets
    return ((L + 1) * T * D + T * (7 * D + 4 * Q + 4 * K + 6 * F + H + 4) + T * rank * (n_targets + 1)
            + (T * max(D, F, Q) if dropout else 0) + 2 * S + head + 5 * n + 8 * len(seg) + n_lora
            + (keep - 1) * per_layer)


def test_activation_bytes_match_stated_formula(models):
    hf, m = models
    cfg = m.config
    seg = np.array([[10, 5, 6], [3, 2, 2], [1, 7, 0]], np.int32)
    slack = 64 * 60  # 64-byte alignment of each buffer
    ev = m.activation_bytes(seg, train=False)
    assert 0 <= ev - 4 * formula_floats(cfg, seg, False) <= slack
    m.lora_init(4, 8.0, ["q_proj", "k_proj", "down_proj"], dropout=0.1)
    n_lora = m.lora_info()["n_params"]
    assert m.activation_budget == 512 << 20
    try:
        m.activation_budget = 0  # recompute every layer but the top one
        tr = m.activation_bytes(seg, train=True)
        want = 4 * formula_floats(cfg, seg, True, 4, 3, n_lora, dropout=True)
        assert 0 <= tr - want <= slack
        m.activation_budget = 1 << 40  # keep every layer
        L = cfg["num_hidden_layers"]
        tr = m.activation_bytes(seg, train=True)
        want = 4 * formula_floats(cfg, seg, True, 4, 3, n_lora, dropout=True, keep=L)
        assert 0 <= tr - want <= slack * L
        with pytest.raises(ValueError):
            m.activation_budget = -1
    finally:
        m.activation_budget = 512 << 20
        m.lora_remove()


# ---------------------------------------------------------------- bad input

def test_bad_batches_raise(models):
    hf, m = models
    tok = np.array([1, 2, 3, 4, 5], np.int32)
    seg = np.array([[2, 2, 1]], np.int32)
    m.score(tok, seg)
    with pytest.raises(TypeError, match="tokens"):
        m.score(tok.astype(np.int64), seg)
    with pytest.raises(TypeError, match="segments"):
        m.score(tok, seg.astype(np.int64))
    with pytest.raises(TypeError, match="tokens"):
        m.score([1, 2, 3, 4, 5], seg)
    with pytest.raises(ValueError, match="segments"):
        m.score(tok, np.array([[2, 2, 2]], np.int32))
    with pytest.raises(ValueError, match="segments"):
        m.score(tok, np.array([[0, 3, 2]], np.int32))
    with pytest.raises(ValueError, match="segments"):
        m.score(tok, np.array([[6, -1, 0]], np.int32))
    with pytest.raises(ValueError, match="segments"):
        m.score(tok, np.array([2, 2, 1], np.int32))
    with pytest.raises(ValueError, match="segments"):
        m.score(tok, np.zeros((0, 3), np.int32))
    with pytest.raises(ValueError, match="tokens: id 97"):
        m.score(np.array([1, 2, 97, 4, 5], np.int32), seg)
    with pytest.raises(ValueError, match="tokens: id -1"):
        m.score(np.array([1, 2, -1, 4, 5], np.int32), seg)
    # non-contiguous input is accepted (copied), results identical
    big = np.zeros(10, np.int32)
    big[::2] = tok
    np.testing.assert_array_equal(m.score(big[::2], seg)["logp"], m.score(tok, seg)["logp"])


def test_bad_construction_raises():
    hf = tm.make_model("qwen2", seed=0)
    cfg, w = tm.prefopt_config(hf.config), tm.weights_of(hf)
    _core.Model(cfg, w)
    bad = dict(w)
    del bad["model.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(ValueError, match="missing model.layers.1.self_attn.k_proj.bias"):
        _core.Model(cfg, bad)
    bad = dict(w, **{"model.norm.weight": np.ones(31, np.float32)})
    with pytest.raises(ValueError, match="model.norm.weight"):
        _core.Model(cfg, bad)
    bad = dict(w, **{"model.norm.weight": np.ones(32, np.float64)})
    with pytest.raises(TypeError, match="model.norm.weight"):
        _core.Model(cfg, bad)
    bad = dict(w, **{"model.layers.0.mlp.gate_proj.bias": np.ones(48, np.float32)})
    with pytest.raises(ValueError, match="unexpected tensor model.layers.0.mlp.gate_proj.bias"):
        _core.Model(cfg, bad)
    with pytest.raises(ValueError, match="rope_theta"):
        _core.Model({k: v for k, v in cfg.items() if k != "rope_theta"}, w)
    with pytest.raises(ValueError, match="multiple"):
        _core.Model(dict(cfg, num_key_value_heads=3), w)
    with pytest.raises(ValueError, match="unexpected"):  # biases given to a no-bias config
        _core.Model(dict(cfg, attention_bias=False), w)
    # a tied model accepts lm_head.weight only when it equals the embedding
    hf_t = tm.make_model("llama", tied=True, seed=0)
    cfg_t, w_t = tm.prefopt_config(hf_t.config), tm.weights_of(hf_t)
    _core.Model(cfg_t, dict(w_t, **{"lm_head.weight": w_t["model.embed_tokens.weight"].copy()}))
    with pytest.raises(ValueError, match="lm_head"):
        _core.Model(cfg_t, dict(w_t, **{"lm_head.weight": w_t["model.embed_tokens.weight"] + 1}))


def test_concurrent_calls_release_the_gil_and_share_nothing():
    """Two models scored from two threads at once give the sequential results; a second
    call on a model that is busy in another thread raises instead of racing."""
    import threading

    hf = tm.make_model("llama", seed=8)
    rng = np.random.default_rng(8)
    tok, seg = tm.pack(tm.random_pairs(rng, 6, 97, prompt=(30, 60), completion=(20, 40)))
    models = [tm.to_prefopt(hf), tm.to_prefopt(hf)]
    want = models[0].score(tok, seg)["logp"]
    got, errors = [None, None], []

    def run(i):
        try:
            for _ in range(3):
                got[i] = models[i].score(tok, seg)["logp"]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for g in got:
        np.testing.assert_array_equal(g, want)
    # same model from two threads: each call either completes or raises "in use"
    busy, results = [], []

    def run_same():
        try:
            for _ in range(3):
                results.append(models[0].score(tok, seg)["logp"])
        except RuntimeError as e:
            busy.append(str(e))

    threads = [threading.Thread(target=run_same) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all("in use" in b for b in busy)
    for r in results:
        np.testing.assert_array_equal(r, want)
