"""C kernels (csrc/kernels.c) through the test-only binding _core._kernel_test.

Each kernel: forward against an independent float64 PyTorch implementation,
backward against PyTorch autograd, and backward against central finite
differences of the C forward itself (directional derivatives of
loss = sum(out * dout) along random directions).
"""
import numpy as np
import pytest
import torch

import prefopt
from prefopt import _core

torch.set_num_threads(1)
prefopt.set_num_threads(1)


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def fd_check(fn, inputs, grads, dout, idx, rng, h=1e-2, n_dirs=3, rtol=3e-3):
    """Directional finite differences of L(x) = sum(fn(x) * dout) for inputs[idx].

    fn(list of arrays) -> forward output (float32 or float64). grads: the C
    backward's dL/dx for inputs[idx]. Central differences in float64 on the
    float32 kernel, h relative to the input scale.
    """
    x0 = inputs[idx]
    for _ in range(n_dirs):
        u = rng.standard_normal(x0.shape)
        u /= np.linalg.norm(u)
        vals = []
        for s in (+1, -1):
            xs = list(inputs)
            xs[idx] = f32(x0 + s * h * u)
            vals.append(np.sum(np.asarray(fn(xs), np.float64) * dout))
        # the perturbation actually applied (float32 rounding of x0 + h u)
        du = (f32(x0 + h * u).astype(np.float64) - f32(x0 - h * u)) / 2
        fd = (vals[0] - vals[1]) / 2
        an = np.sum(grads.astype(np.float64) * du)
        assert abs(fd - an) <= rtol * max(abs(an), 1e-3), (fd, an)


# ------------------------------------------------------------------ rmsnorm

def test_rmsnorm():
    rng = np.random.default_rng(0)
    T, D, eps = 5, 24, 1e-5
    x, g, dout = f32(rng.standard_normal((T, D)) * 2), f32(1 + 0.3 * rng.standard_normal(D)), f32(rng.standard_normal((T, D)))
    out, dx = _core._kernel_test("rmsnorm", (x, g, dout), (eps,))
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    ref = xt * torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + eps) * torch.tensor(g, dtype=torch.float64)
    ref.backward(torch.tensor(dout, dtype=torch.float64))
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-5)
    fd_check(lambda a: _core._kernel_test("rmsnorm", (a[0], g, dout), (eps,))[0], [x], dx, dout, 0, rng)


# ------------------------------------------------------------------ rope

def torch_rope(x, pos, H, hd, theta):
    """HF rotate_half convention in float64."""
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = pos.double()[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    xh = x.view(x.shape[0], H, hd)
    rot = torch.cat([-xh[..., hd // 2:], xh[..., :hd // 2]], -1)
    return (xh * cos[:, None, :] + rot * sin[:, None, :]).reshape(x.shape)


def test_rope():
    rng = np.random.default_rng(1)
    T, H, hd, theta = 7, 3, 8, 10000.0
    x, dout = f32(rng.standard_normal((T, H * hd))), f32(rng.standard_normal((T, H * hd)))
    pos = np.array([0, 1, 2, 9, 3, 4, 30], np.int32)
    out, dx = _core._kernel_test("rope", (x, pos, dout), (H, hd, theta))
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    ref = torch_rope(xt, torch.tensor(pos), H, hd, theta)
    ref.backward(torch.tensor(dout, dtype=torch.float64))
    np.testing.assert_allclose(out, ref.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(dx, xt.grad.numpy(), atol=1e-5)
    assert np.abs(out[0] - x[0]).max() == 0  # position 0 is the identity
    fd_check(lambda a: _core._kernel_test("rope", (a[0], pos, dout), (H, hd, theta))[0], [x], dx, dout, 0, rng)


# ------------------------------------------------------------------ swiglu

def test_swiglu():
    rng = np.random.default_rng(2)
    n = 50
    g, u, dout = (f32(rng.standard_normal(n) * 3) for _ in range(3))
    out, dg, du = _core._kernel_test("swiglu", (g, u, dout), ())
    gt = torch.tensor(g, dtype=torch.float64, requires_grad=True)
    ut = torch.tensor(u, dtype=torch.float64, requires_grad=True)
    ref = torch.nn.functional.silu(gt) * ut
    ref.backward(torch.tensor(dout, dtype=torch.float64))
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dg, gt.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(du, ut.grad.numpy(), rtol=1e-5, atol=1e-6)
    fd_check(lambda a: _core._kernel_test("swiglu", (a[0], u, dout), ())[0], [g, u], dg, dout, 0, rng)
    fd_check(lambda a: _core._kernel_test("swiglu", (g, a[1], dout), ())[0], [g, u], du, dout, 1, rng)


# ------------------------------------------------------------------ attention

def packed_mask(seg):
    """Dense [T,T] boolean visibility of the prefix-shared layout, from its definition."""
    T = int(seg.sum())
    vis = np.zeros((T, T), bool)
    t0 = 0
    for lp, lc, lr in seg:
        P_ = list(range(t0, t0 + lp))
        C = list(range(t0 + lp, t0 + lp + lc))
        R = list(range(t0 + lp + lc, t0 + lp + lc + lr))
        for i, ti in enumerate(P_):
            vis[ti, P_[:i + 1]] = True
        for i, ti in enumerate(C):
            vis[ti, P_] = True
            vis[ti, C[:i + 1]] = True
        for i, ti in enumerate(R):
            vis[ti, P_] = True
            vis[ti, R[:i + 1]] = True
        t0 += lp + lc + lr
    return vis


def torch_attention(q, k, v, vis, H, KVH, hd):
    T = q.shape[0]
    qh = q.view(T, H, hd).transpose(0, 1)
    kh = k.view(T, KVH, hd).transpose(0, 1).repeat_interleave(H // KVH, 0)
    vh = v.view(T, KVH, hd).transpose(0, 1).repeat_interleave(H // KVH, 0)
    s = qh @ kh.transpose(1, 2) / hd ** 0.5
    s = s.masked_fill(~torch.tensor(vis)[None], float("-inf"))
    return (torch.softmax(s, -1) @ vh).transpose(0, 1).reshape(T, H * hd)


@pytest.mark.parametrize("H,KVH", [(4, 2), (2, 2), (3, 1)])
def test_attention_packed(H, KVH):
    rng = np.random.default_rng(3)
    hd = 8
    seg = np.array([[3, 4, 2], [1, 0, 3], [5, 2, 0], [2, 1, 1]], np.int32)
    T = int(seg.sum())
    q, dout = f32(rng.standard_normal((T, H * hd))), f32(rng.standard_normal((T, H * hd)))
    k, v = f32(rng.standard_normal((T, KVH * hd))), f32(rng.standard_normal((T, KVH * hd)))
    out, dq, dk, dv = _core._kernel_test("attention", (q, k, v, seg, dout), (H, KVH, hd))
    ts = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, k, v)]
    ref = torch_attention(*ts, packed_mask(seg), H, KVH, hd)
    ref.backward(torch.tensor(dout, dtype=torch.float64))
    np.testing.assert_allclose(out, ref.detach().numpy(), atol=2e-5)
    for got, t in zip((dq, dk, dv), ts):
        np.testing.assert_allclose(got, t.grad.numpy(), atol=5e-5)
    grads = (dq, dk, dv)

    def fwd(a):
        return _core._kernel_test("attention", (a[0], a[1], a[2], seg, dout), (H, KVH, hd))[0]

    for i in range(3):
        fd_check(fwd, [q, k, v], grads[i], dout, i, rng)


def test_attention_long_blocks_span_several_query_tiles():
    """Blocks longer than the 64-row query tile (prompt+chosen 150 rows, rejected 130)."""
    rng = np.random.default_rng(6)
    H, KVH, hd = 2, 1, 4
    seg = np.array([[70, 80, 130], [3, 1, 66]], np.int32)
    T = int(seg.sum())
    q, dout = f32(rng.standard_normal((T, H * hd))), f32(rng.standard_normal((T, H * hd)))
    k, v = f32(rng.standard_normal((T, KVH * hd))), f32(rng.standard_normal((T, KVH * hd)))
    out, dq, dk, dv = _core._kernel_test("attention", (q, k, v, seg, dout), (H, KVH, hd))
    ts = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, k, v)]
    ref = torch_attention(*ts, packed_mask(seg), H, KVH, hd)
    ref.backward(torch.tensor(dout, dtype=torch.float64))
    np.testing.assert_allclose(out, ref.detach().numpy(), atol=2e-5)
    for got, t in zip((dq, dk, dv), ts):
        np.testing.assert_allclose(got, t.grad.numpy(), atol=1e-4)
    fd_check(lambda a: _core._kernel_test("attention", (a[0], k, v, seg, dout), (H, KVH, hd))[0],
             [q, k, v], dq, dout, 0, rng)


def test_attention_prefix_sharing_equals_separate_sequences():
    """Chosen and rejected rows of a shared pair equal those of two unshared sequences."""
    rng = np.random.default_rng(4)
    H, KVH, hd, lp, lc, lr = 2, 1, 4, 3, 2, 3
    T = lp + lc + lr
    q, k, v = f32(rng.standard_normal((T, H * hd))), f32(rng.standard_normal((T, KVH * hd))), f32(rng.standard_normal((T, KVH * hd)))
    z = np.zeros((T, H * hd), np.float32)
    shared = _core._kernel_test("attention", (q, k, v, np.array([[lp, lc, lr]], np.int32), z), (H, KVH, hd))[0]
    idx = list(range(lp)) + list(range(lp + lc, T))
    sep = _core._kernel_test("attention", (f32(q[idx]), f32(k[idx]), f32(v[idx]), np.array([[lp, lr, 0]], np.int32),
                                           np.zeros((lp + lr, H * hd), np.float32)), (H, KVH, hd))[0]
    np.testing.assert_allclose(shared[lp + lc:], sep[lp:], atol=1e-6)


# ------------------------------------------------------------------ head

@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_head_logp(chunk):
    rng = np.random.default_rng(5)
    T, D, V = 9, 16, 101
    x, W = f32(rng.standard_normal((T, D))), f32(rng.standard_normal((V, D)) * 0.5)
    rows = np.array([0, 2, 2, 3, 5, 8, 8, 1], np.int32)  # repeated rows (shared last prompt row)
    tg = rng.integers(0, V, len(rows)).astype(np.int32)
    dlogp = f32(rng.standard_normal(len(rows)))
    logp, dx = _core._kernel_test("head", (x, W, rows, tg, dlogp), (chunk,))
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    lp = torch.log_softmax(xt[torch.tensor(rows).long()] @ torch.tensor(W, dtype=torch.float64).T, -1)
    ref = lp[torch.arange(len(rows)), torch.tensor(tg).long()]
    ref.backward(torch.tensor(dlogp, dtype=torch.float64))
    assert logp.dtype == np.float64
    np.testing.assert_allclose(logp, ref.detach().numpy(), atol=2e-5)
    np.testing.assert_allclose(dx, xt.grad.numpy(), atol=2e-5)
    assert np.abs(dx[[4, 6, 7]]).max() == 0  # rows that predict nothing get no gradient
    fd_check(lambda a: _core._kernel_test("head", (a[0], W, rows, tg, dlogp), (chunk,))[0],
             [x], dx, dlogp.astype(np.float64), 0, rng)


def test_kernel_test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        _core._kernel_test("head", (np.zeros((2, 3), np.float32), np.zeros((4, 3), np.float32),
                                    np.array([2], np.int32), np.array([0], np.int32), np.zeros(1, np.float32)), (4,))
    with pytest.raises(ValueError):
        _core._kernel_test("attention", tuple(np.zeros((3, 4), np.float32) for _ in range(3)) +
                           (np.array([[1, 1, 0]], np.int32), np.zeros((3, 4), np.float32)), (1, 1, 4))
    with pytest.raises(ValueError):
        _core._kernel_test("nope", (), ())
