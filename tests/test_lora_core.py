"""C LoRA kernels (csrc/lora.c) and the counter-based RNG (csrc/rng.c).

References: numpy float64 re-implementations of y = W x + s B (A drop(x)) and
central finite differences of a scalar objective <dy, y> for the gradients.
"""
import numpy as np
import pytest

import prefopt
from prefopt import _core

prefopt.set_num_threads(1)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- rng

def test_rng_is_deterministic_and_uniform():
    idx = np.arange(200_000, dtype=np.uint64)
    u1, b1 = _core.rng_u01(7, 3, idx)
    u2, b2 = _core.rng_u01(7, 3, idx)
    assert np.array_equal(b1, b2) and np.array_equal(u1, u2)
    assert u1.dtype == np.float32 and u1.min() >= 0.0 and u1.max() < 1.0
    # uniform: mean 1/2, var 1/12, 10-bin histogram within 5 sigma of n/10
    assert abs(u1.mean() - 0.5) < 5 * np.sqrt(1 / 12 / len(u1))
    assert abs(u1.var() - 1 / 12) < 2e-3
    h, _ = np.histogram(u1, bins=10, range=(0, 1))
    assert np.all(np.abs(h - len(u1) / 10) < 5 * np.sqrt(len(u1) / 10))
    # u01 is the top 24 bits
    assert np.array_equal(u1, ((b1 >> np.uint64(40)).astype(np.float64) / 2**24).astype(np.float32))
    # each output bit is ~fair
    bits = np.unpackbits(b1.view(np.uint8)).reshape(-1, 64).mean(0)
    assert np.all(np.abs(bits - 0.5) < 0.01)


def test_rng_streams_and_seeds_differ():
    idx = np.arange(10_000, dtype=np.uint64)
    _, a = _core.rng_u01(1, 0, idx)
    _, b = _core.rng_u01(2, 0, idx)
    _, c = _core.rng_u01(1, 1, idx)
    assert np.mean(a == b) < 1e-3 and np.mean(a == c) < 1e-3
    # neighbouring counters uncorrelated
    u, _ = _core.rng_u01(1, 0, idx)
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.05


# ----------------------------------------------------------------------------- init / layout

def test_lora_init_bounds_layout_and_scale():
    in_dims = [16, 16, 16, 8, 16, 16, 40]
    out_dims = [8, 4, 4, 16, 40, 40, 16]
    rank = 4
    r = _core.lora_init_test(3, in_dims, out_dims, rank, 8.0, False, 0.0, TARGETS, 123)
    assert r["scale"] == pytest.approx(2.0)
    assert r["n_params"] == 3 * sum(rank * (i + o) for i, o in zip(in_dims, out_dims))
    assert len(r["A"]) == 3 * 7
    allA = []
    for (layer, t), A in r["A"].items():
        i = TARGETS.index(t)
        assert A.shape == (rank, in_dims[i])
        bound = 1 / np.sqrt(in_dims[i])
        assert np.all(np.abs(A) <= bound)
        assert np.abs(A).max() > 0.6 * bound  # actually spans the interval
        allA.append(A.ravel() / bound)
        assert r["B"][(layer, t)].shape == (out_dims[i], rank)
        assert np.all(r["B"][(layer, t)] == 0)
    allA = np.concatenate(allA)  # U(-1, 1) after scaling: mean 0, var 1/3
    assert abs(allA.mean()) < 5 * np.sqrt(1 / 3 / allA.size)
    assert abs(allA.var() - 1 / 3) < 0.03
    # different (layer, target) blocks differ, same seed reproduces, other seed differs
    assert not np.array_equal(r["A"][(0, "q_proj")], r["A"][(1, "q_proj")])
    r2 = _core.lora_init_test(3, in_dims, out_dims, rank, 8.0, False, 0.0, TARGETS, 123)
    assert all(np.array_equal(r["A"][k], r2["A"][k]) for k in r["A"])
    r3 = _core.lora_init_test(3, in_dims, out_dims, rank, 8.0, False, 0.0, TARGETS, 124)
    assert not np.array_equal(r["A"][(0, "q_proj")], r3["A"][(0, "q_proj")])
    # A of a target does not depend on which other targets are adapted
    r4 = _core.lora_init_test(3, in_dims, out_dims, rank, 8.0, False, 0.0, ["v_proj"], 123)
    assert list(r4["A"]) == [(0, "v_proj"), (1, "v_proj"), (2, "v_proj")]
    assert np.array_equal(r4["A"][(2, "v_proj")], r["A"][(2, "v_proj")])
    # rsLoRA scale
    r5 = _core.lora_init_test(1, in_dims, out_dims, 16, 8.0, True, 0.0, ["q_proj"], 1)
    assert r5["scale"] == pytest.approx(8.0 / 4.0)


@pytest.mark.parametrize("bad", [
    dict(rank=0), dict(alpha=0.0), dict(dropout=1.0), dict(dropout=-0.1), dict(targets=[]),
    dict(n_layers=0),
])
def test_lora_create_rejects_bad_config(bad):
    kw = dict(n_layers=1, rank=2, alpha=2.0, dropout=0.0, targets=["q_proj"])
    kw.update(bad)
    with pytest.raises(ValueError):
        _core.lora_init_test(kw["n_layers"], [4] * 7, [4] * 7, kw["rank"], kw["alpha"], False,
                             kw["dropout"], kw["targets"], 0)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        _core.lora_init_test(1, [4] * 7, [4] * 7, 2, 2.0, False, 0.0, ["lm_head"], 0)


# ----------------------------------------------------------------------------- branch

def _case(rng, T=5, n_in=12, n_out=7, r=3):
    x = rng.standard_normal((T, n_in)).astype(np.float32)
    A = rng.uniform(-0.5, 0.5, (r, n_in)).astype(np.float32)
    B = rng.standard_normal((n_out, r)).astype(np.float32)
    y0 = rng.standard_normal((T, n_out)).astype(np.float32)
    dy = rng.standard_normal((T, n_out)).astype(np.float32)
    W = rng.standard_normal((n_out, n_in)).astype(np.float32)
    return x, A, B, y0, dy, W


def _run(x, A, B, y0, dy, W, alpha=6.0, rslora=False, dropout=0.0, seed=0, layer=0,
         target="q_proj", use_scratch=True):
    return _core.lora_branch_test(x, A, B, y0, dy, W, alpha, rslora, dropout, seed, layer, target,
                                  use_scratch)


def test_lora_forward_and_merge_match_numpy():
    rng = np.random.default_rng(0)
    x, A, B, y0, dy, W = _case(rng)
    out = _run(x, A, B, y0, dy, W, alpha=6.0)
    s = 6.0 / 3
    x64, A64, B64 = x.astype(np.float64), A.astype(np.float64), B.astype(np.float64)
    ref = y0 + s * (x64 @ A64.T) @ B64.T
    np.testing.assert_allclose(out["y"], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["xa"], x64 @ A64.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["merged"], W + s * B64 @ A64, rtol=1e-5, atol=1e-5)
    # merged weight gives the same output as base + branch
    np.testing.assert_allclose(x64 @ out["merged"].T.astype(np.float64),
                               x64 @ W.T.astype(np.float64) + s * (x64 @ A64.T) @ B64.T,
                               rtol=1e-4, atol=1e-4)
    # rsLoRA
    out2 = _run(x, A, B, y0, dy, W, alpha=6.0, rslora=True)
    np.testing.assert_allclose(out2["y"], y0 + 6.0 / np.sqrt(3) * (x64 @ A64.T) @ B64.T,
                               rtol=1e-5, atol=1e-5)


def _fd_check(x, A, B, y0, dy, W, **kw):
    """Central differences (float64 arithmetic on float32 inputs) of f = <dy, y(x, A, B)>."""
    out = _run(x, A, B, y0, dy, W, **kw)
    dy64 = dy.astype(np.float64)

    def f(x_, A_, B_):
        return float(np.sum(dy64 * _run(x_, A_, B_, y0, dy, W, **kw)["y"].astype(np.float64)))

    rng = np.random.default_rng(1)
    for name, arr, g in (("x", x, out["dx"]), ("A", A, out["dA"]), ("B", B, out["dB"])):
        for _ in range(12):
            i = tuple(rng.integers(0, n) for n in arr.shape)
            h = 1e-2
            p, m = arr.copy(), arr.copy()
            p[i] += h
            m[i] -= h
            args_p = {"x": x, "A": A, "B": B}
            args_m = dict(args_p)
            args_p[name], args_m[name] = p, m
            num = (f(**{k + "_": v for k, v in args_p.items()}) -
                   f(**{k + "_": v for k, v in args_m.items()})) / (2 * h)
            # f is linear in each single element, so the only error is float32 rounding
            assert abs(num - g[i]) <= 1e-3 * max(1.0, abs(num)), (name, i, num, g[i])
    return out


def test_lora_backward_finite_differences_no_dropout():
    rng = np.random.default_rng(2)
    x, A, B, y0, dy, W = _case(rng)
    out = _fd_check(x, A, B, y0, dy, W, alpha=6.0)
    # analytic formulas too
    s = 2.0
    tmp = s * dy.astype(np.float64) @ B
    np.testing.assert_allclose(out["dB"], s * dy.T.astype(np.float64) @ (x @ A.T), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["dA"], tmp.T @ x, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["dx"], tmp @ A, rtol=1e-4, atol=1e-4)
    # dropout probability set but seed 0 (reference/eval passes): identical to no dropout
    out0 = _run(x, A, B, y0, dy, W, alpha=6.0, dropout=0.5, seed=0)
    assert np.array_equal(out0["y"], out["y"]) and np.array_equal(out0["dA"], out["dA"])


@pytest.mark.parametrize("use_scratch", [True, False])
def test_lora_dropout_mask_regenerated_in_backward(use_scratch):
    rng = np.random.default_rng(3)
    x, A, B, y0, dy, W = _case(rng, T=6, n_in=10, n_out=5, r=2)
    kw = dict(alpha=4.0, dropout=0.3, seed=99, layer=2, target="up_proj", use_scratch=use_scratch)
    # FD through forward: only passes if backward regenerates forward's mask
    out = _fd_check(x, A, B, y0, dy, W, **kw)
    nodrop = _run(x, A, B, y0, dy, W, alpha=4.0)
    assert not np.allclose(out["y"], nodrop["y"])


def test_lora_dropout_mask_statistics_and_reproducibility():
    # with A = I, B = I (r = in = out), y - y0 = s * drop(x): read the mask off the output
    n, T, p = 32, 400, 0.25
    rng = np.random.default_rng(4)
    x = (rng.uniform(0.5, 1.5, (T, n)) * rng.choice([-1, 1], (T, n))).astype(np.float32)
    I = np.eye(n, dtype=np.float32)
    y0 = np.zeros((T, n), np.float32)
    dy = np.zeros((T, n), np.float32)

    def dropped(seed, layer=0, target="q_proj", scratch=True):
        out = _core.lora_branch_test(x, I, I, y0, dy, I, float(n), False, p, seed, layer, target,
                                     scratch)
        return out["y"] / out["scale"]

    d = dropped(5)
    kept = d != 0
    np.testing.assert_allclose(d[kept], x[kept] / (1 - p), rtol=1e-6)
    frac = 1 - kept.mean()
    assert abs(frac - p) < 5 * np.sqrt(p * (1 - p) / kept.size)
    assert np.array_equal(dropped(5), d)                        # reproducible
    assert np.array_equal(dropped(5, scratch=False) != 0, kept)  # same mask either code path
    assert np.mean((dropped(6) != 0) == kept) < 0.8             # new seed, new mask
    assert np.mean((dropped(5, layer=1) != 0) == kept) < 0.8    # per layer
    assert np.mean((dropped(5, target="k_proj") != 0) == kept) < 0.8  # per target


def test_lora_branch_rejects_bad_shapes():
    rng = np.random.default_rng(5)
    x, A, B, y0, dy, W = _case(rng)
    with pytest.raises(ValueError):
        _run(x, A[:, :-1], B, y0, dy, W)
    with pytest.raises(TypeError):
        _run(x.astype(np.float64), A, B, y0, dy, W)
    with pytest.raises(ValueError):
        _run(x, A, B, y0[:, :-1], dy, W)
