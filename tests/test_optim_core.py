"""csrc/optim.c against torch.optim.AdamW, torch.nn.utils.clip_grad_norm_ and
transformers.get_scheduler."""
import math

import numpy as np
import pytest
import torch

from prefopt import _core

torch.set_num_threads(1)


@pytest.mark.parametrize("wd", [0.0, 0.05])
@pytest.mark.parametrize("impl", ["foreach=False", "fused=True"])
def test_adamw_matches_torch_over_steps(wd, impl):
    rng = np.random.default_rng(0)
    shapes = [(7, 5), (13,)]
    ps = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    tp = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in ps]
    kw = {"foreach": False} if impl == "foreach=False" else {"fused": True}
    lr, b1, b2, eps = 3e-3, 0.9, 0.999, 1e-8
    opt = torch.optim.AdamW(tp, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, **kw)
    ms = [np.zeros_like(p) for p in ps]
    vs = [np.zeros_like(p) for p in ps]
    max_norm = 1.0
    for step in range(1, 8):
        gs = [(rng.standard_normal(p.shape) * (0.3 if step % 2 else 3.0)).astype(np.float32) for p in ps]
        step_lr = lr * (0.5 + 0.1 * step)  # the lr may change every step (schedules)
        for g in opt.param_groups:
            g["lr"] = step_lr
        for t, g in zip(tp, gs):
            t.grad = torch.from_numpy(g.copy())
        tnorm = torch.nn.utils.clip_grad_norm_(tp, max_norm).item()
        opt.step()
        norm = math.sqrt(sum(_core.sumsq(g) for g in gs))
        assert norm == pytest.approx(tnorm, rel=1e-6)
        scale = min(1.0, max_norm / (norm + 1e-6))
        for p, g, m, v in zip(ps, gs, ms, vs):
            _core.adamw_update(p, g, m, v, step_lr, b1, b2, eps, wd, step, scale)
        for p, t in zip(ps, tp):
            np.testing.assert_allclose(p, t.detach().numpy(), rtol=2e-6, atol=2e-7)
        st = [opt.state[t] for t in tp]
        for m, v, s in zip(ms, vs, st):
            np.testing.assert_allclose(m, s["exp_avg"].numpy(), rtol=1e-5, atol=1e-9)
            np.testing.assert_allclose(v, s["exp_avg_sq"].numpy(), rtol=1e-5, atol=1e-12)
    # the update is not a no-op
    assert not np.allclose(ps[0], rng.standard_normal(1))


def test_adamw_bias_correction_first_step():
    # step 1, no decay: update = lr * g/(|g| + eps') = lr * sign(g)
    p = np.zeros(4, np.float32)
    g = np.array([2.0, -0.5, 1e-3, -7.0], np.float32)
    m = np.zeros(4, np.float32); v = np.zeros(4, np.float32)
    _core.adamw_update(p, g, m, v, 0.01, 0.9, 0.999, 1e-8, 0.0, 1, 1.0)
    np.testing.assert_allclose(p, -0.01 * np.sign(g), rtol=1e-4)


def test_adamw_bad_input():
    p = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="sizes differ"):
        _core.adamw_update(p, np.zeros(4, np.float32), p.copy(), p.copy(), 1e-3, .9, .999, 1e-8, 0, 1, 1.0)
    with pytest.raises(TypeError, match="float32"):
        _core.adamw_update(p.astype(np.float64), p, p.copy(), p.copy(), 1e-3, .9, .999, 1e-8, 0, 1, 1.0)
    with pytest.raises(TypeError, match="writable"):
        _core.adamw_update(np.zeros((3, 2), np.float32)[:, 0], p, p.copy(), p.copy(), 1e-3, .9, .999,
                           1e-8, 0, 1, 1.0)
    with pytest.raises(ValueError, match="1-based"):
        _core.adamw_update(p, p.copy(), p.copy(), p.copy(), 1e-3, .9, .999, 1e-8, 0, 0, 1.0)
    with pytest.raises(ValueError, match="beta1"):
        _core.adamw_update(p, p.copy(), p.copy(), p.copy(), 1e-3, 1.0, .999, 1e-8, 0, 1, 1.0)


SCHEDULE_CASES = [(name, ours, total, warmup)
                  for name, ours in (("linear", "linear"), ("cosine", "cosine"),
                                     ("constant_with_warmup", "constant"))
                  for total, warmup in ((10, 0), (10, 3), (7, 1), (5, 5))]
# transformers' "constant" has no warmup; ours with warmup 0 is the same schedule
SCHEDULE_CASES.append(("constant", "constant", 10, 0))


@pytest.mark.parametrize("name,ours,total,warmup", SCHEDULE_CASES)
def test_schedules_match_transformers(name, ours, total, warmup):
    from transformers import get_scheduler
    base = 2e-4
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    for step in range(total + 2):
        want = opt.param_groups[0]["lr"]  # the lr the (step+1)-th update uses
        got = _core.lr_at(ours, base, step, total, warmup)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-18), (step, got, want)
        opt.step()
        sched.step()


def test_schedule_bad_input():
    with pytest.raises(ValueError, match="unknown schedule"):
        _core.lr_at("polynomial", 1e-3, 0, 10, 0)
    with pytest.raises(ValueError, match="total_steps"):
        _core.lr_at("linear", 1e-3, 0, 0, 0)
