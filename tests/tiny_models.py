"""Tiny random transformers models (LlamaForCausalLM, Qwen2ForCausalLM) for tests.

Every model is built in float32 with eager attention and re-initialised with
weights large enough that the logits are far from uniform (the default 0.02
init would make every check pass trivially). Helpers convert a model to a
``prefopt._core.Model`` and compute reference completion log-probs with
transformers, one sequence at a time (no prefix sharing, no packing).
"""
import numpy as np
import torch

import prefopt
from prefopt import _core

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)


def _reinit(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(0.8 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.25 * torch.randn(p.shape, generator=g))
    return model


def make_model(arch="llama", tied=False, seed=0, **overrides):
    """A tiny random causal LM in float32, eval mode, eager attention.

    arch: "llama" (no biases) or "qwen2" (q/k/v biases). GQA: 4 query heads, 2 KV heads.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kw = dict(TINY, tie_word_embeddings=tied, rope_theta=overrides.pop("rope_theta", 10000.0))
    kw.update(overrides)
    if arch == "llama":
        cfg = LlamaConfig(head_dim=kw["hidden_size"] // kw["num_attention_heads"], **kw)
        cls = LlamaForCausalLM
    elif arch == "qwen2":
        cfg = Qwen2Config(**kw)
        cls = Qwen2ForCausalLM
    else:
        raise ValueError(arch)
    cfg._attn_implementation = "eager"
    model = cls(cfg).float().eval()
    _reinit(model, seed)
    if tied:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def rope_theta(cfg):
    rp = getattr(cfg, "rope_parameters", None)
    if rp and "rope_theta" in rp:
        return float(rp["rope_theta"])
    return float(cfg.rope_theta)


def prefopt_config(cfg):
    """The config dict prefopt._core.Model takes, from a transformers config."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        rms_norm_eps=float(cfg.rms_norm_eps), rope_theta=rope_theta(cfg),
        tie_word_embeddings=bool(cfg.tie_word_embeddings),
        attention_bias=cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
    )


def weights_of(model):
    """{HF name: float32 C-contiguous ndarray} (lm_head.weight dropped when tied)."""
    out = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        out[k] = np.ascontiguousarray(v.detach().float().numpy())
    return out


def to_prefopt(model):
    prefopt.set_num_threads(1)
    return _core.Model(prefopt_config(model.config), weights_of(model))


def random_pairs(rng, n_pairs, vocab, prompt=(2, 9), completion=(1, 8)):
    """n_pairs (prompt, chosen, rejected) lists of random ids; lengths drawn uniformly."""
    pairs = []
    for _ in range(n_pairs):
        lp = int(rng.integers(prompt[0], prompt[1] + 1))
        lc = int(rng.integers(completion[0], completion[1] + 1))
        lr = int(rng.integers(completion[0], completion[1] + 1))
        pairs.append((rng.integers(0, vocab, lp).tolist(), rng.integers(0, vocab, lc).tolist(),
                      rng.integers(0, vocab, lr).tolist()))
    return pairs


def pack(pairs):
    """Prefix-shared packing: tokens [N] int32, segments [P,3] int32."""
    toks, segs = [], []
    for p, c, r in pairs:
        toks += list(p) + list(c) + list(r)
        segs.append((len(p), len(c), len(r)))
    return np.asarray(toks, np.int32), np.asarray(segs, np.int32).reshape(-1, 3)


def pack_unshared(pairs):
    """Each (prompt+chosen) and (prompt+rejected) as its own sequence (rejected_len 0)."""
    seqs = []
    for p, c, r in pairs:
        seqs.append((p, c, []))
        seqs.append((p, r, []))
    return pack(seqs)


@torch.no_grad()
def hf_token_logps(model, prompt, completion):
    """float64 log p(completion_t | prompt, completion_<t) from transformers, one sequence."""
    if len(completion) == 0:
        return np.zeros(0)
    ids = torch.tensor([list(prompt) + list(completion)])
    logits = model(ids).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    n = len(prompt)
    pos = torch.arange(n - 1, n - 1 + len(completion))
    return lp[pos, torch.tensor(completion)].numpy()
