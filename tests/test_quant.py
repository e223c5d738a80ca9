"""The C dequantisers (prefopt._core.dequantize) against the gguf package (gguf.quants).

Two kinds of input per type: random raw blocks (every bit pattern of the quant
fields, finite random f16 scales), and, where gguf-py can quantise, real float
data quantised by gguf-py. Plus size checks and every F16/BF16 bit pattern.
"""
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf import quants

from prefopt import _core

TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q6_K, Q.IQ4_NL]
# byte offsets of the f16 scale fields inside one block
F16_FIELDS = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2],
              Q.Q4_K: [0, 2], Q.Q6_K: [208], Q.IQ4_NL: [0]}
QUANTISABLE = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


def random_blocks(qtype, n_blocks, rng):
    """Random raw bytes of n_blocks blocks with finite f16 scales; returns (raw, n_elements)."""
    be, bb = GGML_QUANT_SIZES[qtype]
    if qtype == Q.F32:
        return rng.standard_normal(n_blocks).astype(np.float32).view(np.uint8), n_blocks
    if qtype == Q.F16:
        return rng.standard_normal(n_blocks).astype(np.float16).view(np.uint8), n_blocks
    if qtype == Q.BF16:
        x = rng.standard_normal(n_blocks).astype(np.float32).view(np.uint32) >> 16
        return x.astype(np.uint16).view(np.uint8), n_blocks
    raw = rng.integers(0, 256, size=(n_blocks, bb), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scale = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
        raw[:, off:off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(-1), n_blocks * be


def reference(raw, qtype):
    return np.asarray(quants.dequantize(raw, qtype), dtype=np.float32).reshape(-1)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_type_info_matches_gguf(qtype):
    name, be, bb = _core.ggml_type_info(int(qtype))
    assert name == qtype.name
    assert (be, bb) == GGML_QUANT_SIZES[qtype]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_random_blocks_match_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    for n_blocks in (1, 3, 64):
        raw, n = random_blocks(qtype, n_blocks, rng)
        ours = _core.dequantize(int(qtype), raw, n)
        ref = reference(raw, qtype)
        assert ours.dtype == np.float32 and ours.shape == (n,)
        assert np.all(np.isfinite(ref))
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7 * float(np.abs(ref).max()))


@pytest.mark.parametrize("qtype", QUANTISABLE, ids=lambda t: t.name)
def test_quantised_data_matches_gguf(qtype):
    rng = np.random.default_rng(100 + int(qtype))
    x = (rng.standard_normal((4, 256)) * rng.uniform(0.01, 3.0, (4, 1))).astype(np.float32)
    raw = quants.quantize(x, qtype)
    ours = _core.dequantize(int(qtype), np.ascontiguousarray(raw).view(np.uint8), x.size)
    np.testing.assert_allclose(ours, reference(raw, qtype), rtol=1e-6, atol=1e-7)
    # and the round trip is close to the original (sanity of the quantiser pairing)
    tol = {Q.F16: 2e-3, Q.BF16: 1e-2, Q.Q8_0: 0.02, Q.Q5_0: 0.1, Q.Q5_1: 0.1}.get(qtype, 0.2)
    assert np.abs(ours.reshape(x.shape) - x).max() <= tol * np.abs(x).max()


def test_every_f16_and_bf16_pattern():
    bits = np.arange(65536, dtype=np.uint16)
    f16 = _core.dequantize(int(Q.F16), bits.view(np.uint8), 65536)
    np.testing.assert_array_equal(f16, bits.view(np.float16).astype(np.float32))  # NaN == NaN here
    bf16 = _core.dequantize(int(Q.BF16), bits.view(np.uint8), 65536)
    ref = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(bf16, ref)


def test_q4_1_hand_block():
    # d = 0.5, m = -1; byte j = (j low, 15-j high) -> y[j] = 0.5 j - 1, y[j+16] = 0.5(15-j) - 1
    blk = np.zeros(20, np.uint8)
    blk[0:2] = np.array([0.5], np.float16).view(np.uint8)
    blk[2:4] = np.array([-1.0], np.float16).view(np.uint8)
    j = np.arange(16)
    blk[4:] = (j | ((15 - j) << 4)).astype(np.uint8)
    y = _core.dequantize(int(Q.Q4_1), blk, 32)
    np.testing.assert_array_equal(y[:16], 0.5 * j - 1)
    np.testing.assert_array_equal(y[16:], 0.5 * (15 - j) - 1)


def test_size_and_type_checks():
    raw = np.zeros(40, np.uint8)
    with pytest.raises(ValueError, match="need 40 bytes, raw has 39"):
        _core.dequantize(int(Q.Q4_1), raw[:39], 64)
    with pytest.raises(ValueError, match="need 20 bytes"):
        _core.dequantize(int(Q.Q4_1), raw, 32)
    with pytest.raises(ValueError, match="not a multiple of the Q4_1 block size 32"):
        _core.dequantize(int(Q.Q4_1), raw, 33)
    with pytest.raises(ValueError, match="Q5_K"):
        _core.dequantize(int(Q.Q5_K), raw, 256)
    with pytest.raises(ValueError, match="unknown"):
        _core.dequantize(99, raw, 32)
    with pytest.raises(ValueError, match="unsupported ggml type"):
        _core.ggml_type_info(-1)
    with pytest.raises(ValueError, match=">= 0"):
        _core.dequantize(int(Q.F32), raw, -1)
    with pytest.raises(TypeError, match="dtype"):
        _core.dequantize(int(Q.F32), np.zeros(10, np.float32), 10)
    with pytest.raises(TypeError):
        _core.dequantize(int(Q.F32), b"\0" * 40, 10)
    assert _core.dequantize(int(Q.Q8_0), raw[:0], 0).shape == (0,)
    # non-contiguous input is accepted (copied), values right
    x = np.arange(8, dtype=np.float32)
    strided = np.stack([x.view(np.uint8), x.view(np.uint8)], axis=1)[:, 0]
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(_core.dequantize(int(Q.F32), strided, 8), x)
