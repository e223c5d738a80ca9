"""prefopt.lora: PEFT adapter directories, checked against peft itself."""
import json
import math
import os

import numpy as np
import pytest
import torch

from prefopt import lora
from prefopt.lora import LoraSpec

torch.set_num_threads(1)


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def core_config(m):
    c = m.config
    return {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim}


def random_state(spec, mc, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) * 0.2
            for k, s in lora.expected_shapes(spec, mc).items()}


def test_safetensors_writer_roundtrip(tmp_path):
    from safetensors.numpy import load_file

    from prefopt.safetensors_io import SafetensorsFile

    rng = np.random.default_rng(0)
    t = {"b": rng.standard_normal((3, 5)).astype(np.float32), "a.x": rng.standard_normal(7).astype(np.float32),
         "empty": np.zeros((0, 4), np.float32)}
    p = tmp_path / "t.safetensors"
    lora.write_safetensors(p, t, metadata={"format": "pt"})
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and json.loads(raw[8:8 + n])["__metadata__"] == {"format": "pt"}
    back = load_file(str(p))  # the reference implementation
    assert set(back) == set(t)
    for k in t:
        assert back[k].dtype == np.float32 and np.array_equal(back[k], t[k])
    with SafetensorsFile(p) as f:
        assert np.array_equal(f.tensor("b"), t["b"])


@pytest.mark.parametrize("rslora", [False, True])
def test_prefopt_adapter_loads_in_peft(tmp_path, rslora):
    from peft import PeftModel

    base = tiny_llama()
    mc = core_config(base)
    spec = LoraSpec(rank=4, alpha=8, targets=["q", "v_proj", "down_proj", "o_proj"], use_rslora=rslora)
    state = random_state(spec, mc)
    lora.save_adapter(tmp_path / "ad", state, spec, model_config=mc, base_model_name_or_path="tiny")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["target_modules"] == ["q_proj", "v_proj", "o_proj", "down_proj"]

    ids = torch.tensor([[1, 5, 9, 33, 2, 7]])
    with torch.no_grad():
        # independent expectation: base weights merged by hand, W + s * B @ A
        merged = tiny_llama()
        sd = merged.state_dict()
        for name, A in state.items():
            if ".lora_A." in name:
                B = state[name.replace("lora_A", "lora_B")]
                w = name.replace(".lora_A.weight", ".weight")
                sd[w] = sd[w] + spec.scale * torch.from_numpy(B.astype(np.float64) @ A.astype(np.float64)).float()
        merged.load_state_dict(sd)
        want = merged(ids).logits
        pm = PeftModel.from_pretrained(base, str(tmp_path / "ad")).eval()
        got = pm(ids).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    n_lora = 0
    for layer in range(2):
        for t in spec.targets:
            mod = pm.base_model.model.model.layers[layer]
            mod = getattr(mod.self_attn if t in ("q_proj", "k_proj", "v_proj", "o_proj") else mod.mlp, t)
            assert mod.scaling["default"] == pytest.approx(spec.scale)
            assert np.array_equal(mod.lora_A["default"].weight.detach().numpy(),
                                  state[lora.core_name(layer, t, "A")])
            assert np.array_equal(mod.lora_B["default"].weight.detach().numpy(),
                                  state[lora.core_name(layer, t, "B")])
            n_lora += 1
    assert n_lora == 8
    assert spec.scale == (8 / 2 if rslora else 8 / 4)


def test_peft_adapter_loads_in_prefopt(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(1)
    pm = get_peft_model(base, LoraConfig(r=3, lora_alpha=5, target_modules="all-linear", lora_dropout=0.1,
                                         init_lora_weights=False, task_type="CAUSAL_LM"))
    pm.save_pretrained(str(tmp_path / "p"))
    spec, state = lora.load_adapter(tmp_path / "p", core_config(base))
    assert spec == LoraSpec(rank=3, alpha=5, targets="all-linear", dropout=0.1)
    assert len(state) == 2 * 7 * 2
    psd = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    assert len(psd) == len(state)
    for k, v in psd.items():
        core = k.replace("base_model.model.", "", 1).replace(".default.weight", ".weight")
        assert np.array_equal(state[core], v.numpy()), k
    assert any(np.any(v != 0) for k, v in state.items() if "lora_B" in k)
    # and back again: prefopt re-saves it, PEFT reads identical tensors
    lora.save_adapter(tmp_path / "q", state, spec)
    spec2, state2 = lora.load_adapter(tmp_path / "q")
    assert spec2 == spec and all(np.array_equal(state[k], state2[k]) for k in state)


def _saved(tmp_path, **over):
    base_spec = LoraSpec(rank=2, alpha=4, targets=["q_proj", "v_proj"])
    mc = {"hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2,
          "num_key_value_heads": 1, "head_dim": 4}
    d = tmp_path / "ad"
    lora.save_adapter(d, random_state(base_spec, mc), base_spec, model_config=mc)
    if over:
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(over)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d, mc, base_spec


@pytest.mark.parametrize("over,match", [
    ({"peft_type": "IA3"}, "peft_type"),
    ({"bias": "all"}, "bias"),
    ({"use_dora": True}, "use_dora"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
    ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
    ({"target_modules": ".*proj"}, "regular expression"),
    ({"target_modules": ["q_proj"]}, "does not list"),
    ({"r": 3}, "rank 2"),
    ({"r": 0}, "rank"),
    ({"lora_alpha": -1}, "alpha"),
])
def test_bad_adapter_configs(tmp_path, over, match):
    d, mc, _ = _saved(tmp_path, **over)
    with pytest.raises(ValueError, match=match):
        lora.load_adapter(d, mc)


def test_bad_adapter_files(tmp_path):
    d, mc, spec = _saved(tmp_path)
    # wrong model: tensors do not fit
    mc2 = dict(mc, hidden_size=16)
    with pytest.raises(ValueError, match="the model needs"):
        lora.load_adapter(d, mc2)
    with pytest.raises(ValueError, match="missing"):
        lora.load_adapter(d, dict(mc, num_hidden_layers=3))
    with pytest.raises(ValueError, match="does not fit"):
        lora.load_adapter(d, dict(mc, num_hidden_layers=1))
    # a missing tensor
    from safetensors.numpy import load_file, save_file

    t = load_file(str(d / "adapter_model.safetensors"))
    t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
    save_file(t, str(d / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        lora.load_adapter(d, mc)
    # foreign tensor names
    t["base_model.model.lm_head.weight"] = np.zeros((2, 2), np.float32)
    save_file(t, str(d / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="unsupported tensor"):
        lora.load_adapter(d, mc)
    # truncated file
    raw = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(raw[:40])
    with pytest.raises(ValueError, match="corrupt"):
        lora.load_adapter(d, mc)
    os.remove(d / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        lora.load_adapter(d, mc)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        lora.load_adapter(d, mc)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_adapter(tmp_path / "nope")


def test_save_validates_state(tmp_path):
    spec = LoraSpec(rank=2, alpha=4, targets=["q_proj"])
    mc = {"hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1, "num_attention_heads": 2,
          "num_key_value_heads": 1, "head_dim": 4}
    st = random_state(spec, mc)
    bad = dict(st)
    bad["model.layers.0.self_attn.q_proj.lora_A.weight"] = np.full((2, 8), np.nan, np.float32)
    with pytest.raises(ValueError, match="NaN"):
        lora.save_adapter(tmp_path / "x", bad, spec, model_config=mc)
    bad = dict(st)
    bad["model.layers.0.self_attn.q_proj.lora_B.weight"] = np.zeros((8, 3), np.float32)
    with pytest.raises(ValueError, match="rank"):
        lora.save_adapter(tmp_path / "x", bad, spec, model_config=mc)
    with pytest.raises(ValueError, match="not among"):
        lora.save_adapter(tmp_path / "x", st, LoraSpec(rank=2, alpha=4, targets=["k_proj"]))
    with pytest.raises(ValueError, match="unsupported LoRA target"):
        LoraSpec(rank=2, alpha=4, targets=["lm_head"])
    with pytest.raises(ValueError, match="rank"):
        LoraSpec(rank=0, alpha=4)
    assert not (tmp_path / "x").exists()


# -- with the C model: same completion log-probs as PEFT on transformers -----------------------

def _tm():
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import tiny_models

    return tiny_models


def _peft_logps(pm, pairs, tm):
    return np.array([[tm.hf_token_logps(pm, p, c).sum(), tm.hf_token_logps(pm, p, r).sum()]
                     for p, c, r in pairs])


def test_prefopt_saved_adapter_gives_same_logps_in_peft(tmp_path):
    from peft import PeftModel

    tm = _tm()
    hf = tm.make_model("llama", seed=3)
    m = tm.to_prefopt(hf)
    m.lora_init(4, 8.0, ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], seed=5)
    # non-zero B so the adapter matters
    rng = np.random.default_rng(0)
    state = {k: (v if ".lora_A." in k else 0.3 * rng.standard_normal(v.shape).astype(np.float32))
             for k, v in m.lora_state().items()}
    m.lora_load_state(state)
    spec = lora.save_model_adapter(m, tmp_path / "ad", model_config=tm.prefopt_config(hf.config))
    assert spec.targets == ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    pairs = tm.random_pairs(rng, 4, tm.TINY["vocab_size"])
    t, s = tm.pack(pairs)
    ours = m.score(t, s)["logp"]
    base = m.score(t, s, use_lora=False)["logp"]
    pm = PeftModel.from_pretrained(tm.make_model("llama", seed=3), str(tmp_path / "ad")).eval()
    theirs = _peft_logps(pm, pairs, tm)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    assert np.abs(ours - base).max() > 1e-2  # the adapter changed the numbers


def test_peft_saved_adapter_gives_same_logps_in_prefopt(tmp_path):
    from peft import LoraConfig, get_peft_model

    tm = _tm()
    hf = tm.make_model("llama", seed=4)
    pm = get_peft_model(hf, LoraConfig(r=2, lora_alpha=3, target_modules="all-linear", use_rslora=True,
                                       init_lora_weights=False, task_type="CAUSAL_LM")).eval()
    pm.save_pretrained(str(tmp_path / "p"))
    rng = np.random.default_rng(1)
    pairs = tm.random_pairs(rng, 3, tm.TINY["vocab_size"])
    theirs = _peft_logps(pm, pairs, tm)
    m = tm.to_prefopt(tm.make_model("llama", seed=4))
    spec = lora.load_model_adapter(m, tmp_path / "p", model_config=tm.prefopt_config(hf.config))
    assert spec.use_rslora and spec.rank == 2 and len(spec.targets) == 7
    assert m.lora_info()["scale"] == pytest.approx(3 / math.sqrt(2))
    t, s = tm.pack(pairs)
    np.testing.assert_allclose(m.score(t, s)["logp"], theirs, rtol=1e-4, atol=1e-4)
