"""LoRA adapter files in PEFT's format (design.md section 6).

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``,
exactly as ``peft.PeftModel.save_pretrained`` writes them, so that
``peft.PeftModel.from_pretrained(model, directory)`` loads a prefopt adapter and
prefopt loads a PEFT adapter.

Names. The C core (``_core.Model.lora_state``) names tensors
``model.layers.{i}.self_attn.q_proj.lora_A.weight`` ([rank, in]) and
``...lora_B.weight`` ([out, rank]); PEFT's file prefixes them with
``base_model.model.`` (the PeftModel wrapper around the CausalLM). Targets are the
seven linear layers of a LLaMA/Qwen2 block: q_proj, k_proj, v_proj, o_proj
(``self_attn``) and gate_proj, up_proj, down_proj (``mlp``).

The safetensors file is written here with numpy and json only (no torch).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

_CORE_NAME = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def resolve_targets(targets) -> tuple:
    """Canonical, ordered target names from "all-linear"/"all", one name, or a list.

    Short names ("q", "gate") are accepted. Anything else raises ValueError."""
    if isinstance(targets, str):
        if targets in ("all-linear", "all"):
            return TARGETS
        targets = [targets]
    try:
        items = list(targets)
    except TypeError:
        raise TypeError(f"LoRA targets must be 'all-linear' or a list of names, got {targets!r}") from None
    out = set()
    for t in items:
        name = t if t in TARGETS else (f"{t}_proj" if isinstance(t, str) else None)
        if name not in TARGETS:
            raise ValueError(f"unsupported LoRA target {t!r}: prefopt adapts {', '.join(TARGETS)} "
                             f"(or 'all-linear')")
        out.add(name)
    if not out:
        raise ValueError("LoRA targets list is empty")
    return tuple(t for t in TARGETS if t in out)


@dataclass(frozen=True)
class LoraSpec:
    """The adapter's settings (PEFT's LoraConfig fields that prefopt supports)."""

    rank: int
    alpha: float
    targets: tuple = field(default=("q_proj", "v_proj"))
    use_rslora: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        a = float(self.alpha)
        if not math.isfinite(a) or a <= 0:
            raise ValueError(f"LoRA alpha must be finite and > 0, got {self.alpha!r}")
        d = float(self.dropout)
        if not 0.0 <= d < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", a)
        object.__setattr__(self, "dropout", d)
        object.__setattr__(self, "targets", resolve_targets(self.targets))
        object.__setattr__(self, "use_rslora", bool(self.use_rslora))

    @property
    def scale(self) -> float:
        """alpha / rank, or alpha / sqrt(rank) with rsLoRA (PEFT's ``scaling``)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @classmethod
    def from_info(cls, info: dict) -> "LoraSpec":
        """From ``_core.Model.lora_info()``."""
        if info is None:
            raise ValueError("the model has no LoRA adapter (lora_info() is None)")
        return cls(rank=info["rank"], alpha=info["alpha"], targets=tuple(info["targets"]),
                   use_rslora=info["use_rslora"], dropout=info["dropout"])


# -- names and shapes ------------------------------------------------------------------

def core_name(layer: int, target: str, which: str) -> str:
    """``model.layers.{layer}.{self_attn|mlp}.{target}.lora_{A|B}.weight``."""
    return f"model.layers.{layer}.{PARENT[target]}.{target}.lora_{which}.weight"


def to_peft_name(name: str) -> str:
    if not _CORE_NAME.match(name):
        raise ValueError(f"not a prefopt LoRA tensor name: {name!r}")
    return PEFT_PREFIX + name


def from_peft_name(name: str) -> str:
    """PEFT file name -> core name (also accepts names with the ``.default`` adapter infix)."""
    if not name.startswith(PEFT_PREFIX):
        raise ValueError(f"LoRA tensor {name!r} does not start with {PEFT_PREFIX!r}")
    core = name[len(PEFT_PREFIX):].replace(".lora_A.default.weight", ".lora_A.weight") \
                                  .replace(".lora_B.default.weight", ".lora_B.weight")
    m = _CORE_NAME.match(core)
    if not m:
        raise ValueError(f"unsupported tensor {name!r} in the adapter: prefopt reads LoRA A/B weights "
                         f"of model.layers.N.(self_attn|mlp).<target> only")
    layer, parent, target, _ = m.groups()
    if target not in TARGETS or PARENT[target] != parent:
        raise ValueError(f"unsupported LoRA target {parent}.{target} in tensor {name!r}")
    return core


def linear_dims(model_config: dict) -> dict:
    """target -> (in, out) of the base linear, from a core model config."""
    D, F = model_config["hidden_size"], model_config["intermediate_size"]
    H, KV, hd = (model_config["num_attention_heads"], model_config["num_key_value_heads"],
                 model_config["head_dim"])
    return {"q_proj": (D, H * hd), "k_proj": (D, KV * hd), "v_proj": (D, KV * hd), "o_proj": (H * hd, D),
            "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}


def expected_shapes(spec: LoraSpec, model_config: dict) -> dict:
    """Core name -> shape of every adapter tensor for this spec and model."""
    dims = linear_dims(model_config)
    out = {}
    for layer in range(model_config["num_hidden_layers"]):
        for t in spec.targets:
            i, o = dims[t]
            out[core_name(layer, t, "A")] = (spec.rank, i)
            out[core_name(layer, t, "B")] = (o, spec.rank)
    return out


def check_state(state: dict, spec: LoraSpec, model_config: dict | None = None, where: str = "adapter"):
    """Raise ValueError unless ``state`` holds exactly the adapter's tensors with the right
    shapes (all layers, all targets, rank ``spec.rank``), finite float arrays."""
    if not state:
        raise ValueError(f"{where}: no LoRA tensors")
    layers = set()
    for name, arr in state.items():
        m = _CORE_NAME.match(name)
        if not m:
            raise ValueError(f"{where}: unexpected tensor name {name!r}")
        layer, _, target, which = m.groups()
        if target not in spec.targets:
            raise ValueError(f"{where}: tensor {name!r} adapts {target}, which is not among the "
                             f"configured targets {list(spec.targets)}")
        arr = np.asarray(arr)
        if arr.ndim != 2:
            raise ValueError(f"{where}: tensor {name!r} has shape {arr.shape}, expected 2 dimensions")
        r = arr.shape[0] if which == "A" else arr.shape[1]
        if r != spec.rank:
            raise ValueError(f"{where}: tensor {name!r} has shape {arr.shape}: rank {r}, but the "
                             f"config says r = {spec.rank}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{where}: tensor {name!r} contains NaN or inf")
        layers.add(int(layer))
    n_layers = model_config["num_hidden_layers"] if model_config else max(layers) + 1
    if model_config:
        want = expected_shapes(spec, model_config)
    else:
        want = {core_name(l, t, w): None for l in range(n_layers) for t in spec.targets for w in "AB"}
    missing = sorted(set(want) - set(state), key=_name_key)
    if missing:
        raise ValueError(f"{where}: {len(missing)} LoRA tensors missing, first {missing[0]!r}")
    extra = sorted(set(state) - set(want), key=_name_key)
    if extra:
        raise ValueError(f"{where}: tensor {extra[0]!r} does not fit the model "
                         f"({n_layers} layers)")
    if model_config:
        for name, shape in want.items():
            if tuple(np.shape(state[name])) != shape:
                raise ValueError(f"{where}: tensor {name!r} has shape {tuple(np.shape(state[name]))}, "
                                 f"the model needs {shape}")
    # A/B of one (layer, target) must agree on the inner sizes even without a model config
    for layer in range(n_layers):
        for t in spec.targets:
            a, b = np.shape(state[core_name(layer, t, "A")]), np.shape(state[core_name(layer, t, "B")])
            if a[0] != b[1]:
                raise ValueError(f"{where}: layer {layer} {t}: A {a} and B {b} disagree on the rank")


def _name_key(name):
    m = _CORE_NAME.match(name)
    return (int(m.group(1)), TARGETS.index(m.group(3)) if m.group(3) in TARGETS else 99,
            m.group(4)) if m else (1 << 30, 0, name)


# -- safetensors writer ------------------------------------------------------------------

def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write float32 tensors as a safetensors file (u64 LE header size, JSON header padded
    with spaces to a multiple of 8, little-endian data), atomically via a temp file."""
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs, off = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype="<f4")
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        blobs.append(a)
        off += a.nbytes
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for a in blobs:
            f.write(a.tobytes())
    os.replace(tmp, path)


# -- adapter directories ------------------------------------------------------------------

def peft_config(spec: LoraSpec, base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json content, with the fields PEFT writes (PEFT defaults elsewhere)."""
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_bias": False,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": spec.rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": list(spec.targets),
        "task_type": "CAUSAL_LM",
        "target_parameters": None,
        "exclude_modules": None,
        "trainable_token_indices": None,
        "use_dora": False,
        "use_qalora": False,
        "use_rslora": spec.use_rslora,
    }


def save_adapter(directory, state: dict, spec: LoraSpec, *, model_config: dict | None = None,
                 base_model_name_or_path: str | None = None) -> None:
    """Write ``state`` (core names -> float32 arrays) as a PEFT adapter directory."""
    check_state(state, spec, model_config, where=f"adapter to save in {directory}")
    os.makedirs(directory, exist_ok=True)
    tensors = {to_peft_name(k): v for k, v in state.items()}
    write_safetensors(os.path.join(directory, WEIGHTS_NAME), tensors, metadata={"format": "pt"})
    cfg = peft_config(spec, base_model_name_or_path)
    tmp = os.path.join(directory, CONFIG_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, os.path.join(directory, CONFIG_NAME))


# PEFT config fields that change the computation in ways prefopt does not implement:
# field -> values that are fine
_NEUTRAL = {
    "bias": ("none",), "fan_in_fan_out": (False,), "use_dora": (False, None),
    "modules_to_save": (None, []), "layers_to_transform": (None, []), "layer_replication": (None,),
    "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "use_qalora": (False, None),
    "lora_bias": (False, None), "target_parameters": (None, []), "trainable_token_indices": (None,),
    "exclude_modules": (None, [], ()),
}


def read_adapter_config(directory) -> tuple:
    """(LoraSpec, raw dict) from ``directory/adapter_config.json``; unsupported settings raise."""
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME} (not a PEFT adapter directory)")
    try:
        with open(path, "rb") as f:
            cfg = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {cfg.get('peft_type')!r}; prefopt reads LORA adapters")
    for k, ok in _NEUTRAL.items():
        if k in cfg and cfg[k] not in ok:
            raise ValueError(f"{path}: {k} = {cfg[k]!r} is not supported by prefopt")
    for k in ("r", "lora_alpha", "target_modules"):
        if k not in cfg:
            raise ValueError(f"{path}: missing {k!r}")
    tm = cfg["target_modules"]
    if isinstance(tm, str) and tm not in ("all-linear",):
        if tm in TARGETS:
            tm = [tm]
        else:
            raise ValueError(f"{path}: target_modules {tm!r} is a regular expression; prefopt "
                             f"supports a list of {', '.join(TARGETS)} or 'all-linear'")
    if isinstance(tm, list):
        # PEFT matches an entry against a module path by suffix; it stores "all-linear" resolved
        # into full paths such as "model.layers.0.self_attn.q_proj"
        names = []
        for e in tm:
            last = e.rsplit(".", 1)[-1] if isinstance(e, str) else e
            if last not in TARGETS:
                raise ValueError(f"{path}: target module {e!r} is not supported (prefopt adapts "
                                 f"{', '.join(TARGETS)})")
            names.append(last)
        tm = names
    try:
        spec = LoraSpec(rank=cfg["r"], alpha=cfg["lora_alpha"], targets=tm,
                        use_rslora=bool(cfg.get("use_rslora", False)),
                        dropout=float(cfg.get("lora_dropout", 0.0) or 0.0))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    return spec, cfg


def load_adapter(directory, model_config: dict | None = None) -> tuple:
    """Read a PEFT adapter directory: (LoraSpec, state with core names -> float32 arrays).

    With ``model_config`` (a core model config) the shapes are checked against the
    model. When the config lists targets the file does not contain (e.g. "all-linear"
    resolved by PEFT, or a subset stored), the targets actually present are used if
    they are consistent across layers."""
    from .safetensors_io import SafetensorsFile

    spec, cfg = read_adapter_config(directory)
    wpath = os.path.join(os.fspath(directory), WEIGHTS_NAME)
    if not os.path.isfile(wpath):
        if os.path.isfile(os.path.join(os.fspath(directory), "adapter_model.bin")):
            raise ValueError(f"{directory}: adapter_model.bin (pickle) is not supported; re-save the "
                             f"adapter with safe_serialization=True")
        raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME}")
    state = {}
    with SafetensorsFile(wpath) as f:
        for name in f.entries:
            core = from_peft_name(name)
            if core in state:
                raise ValueError(f"{wpath}: tensor {core!r} stored twice")
            state[core] = np.ascontiguousarray(f.tensor(name), dtype=np.float32)
    present = resolve_targets(sorted({_CORE_NAME.match(n).group(3) for n in state})) if state else ()
    if not state:
        raise ValueError(f"{wpath}: no LoRA tensors")
    if set(present) - set(spec.targets):
        raise ValueError(f"{wpath}: holds tensors for {sorted(set(present) - set(spec.targets))}, "
                         f"which target_modules {cfg['target_modules']!r} does not list")
    if present != spec.targets:
        # e.g. PEFT's all-linear on a model without some projection; use what is stored
        spec = LoraSpec(spec.rank, spec.alpha, present, spec.use_rslora, spec.dropout)
    check_state(state, spec, model_config, where=wpath)
    return spec, state


# -- with a C model --------------------------------------------------------------------------

def save_model_adapter(model, directory, *, model_config: dict | None = None,
                       base_model_name_or_path: str | None = None) -> LoraSpec:
    """Save the adapter of a ``_core.Model`` (via lora_info / lora_state) in PEFT format."""
    spec = LoraSpec.from_info(model.lora_info())
    save_adapter(directory, model.lora_state("params"), spec, model_config=model_config,
                 base_model_name_or_path=base_model_name_or_path)
    return spec


def load_model_adapter(model, directory, *, model_config: dict | None = None, seed: int = 0,
                       dropout: float | None = None) -> LoraSpec:
    """Create the adapter on a ``_core.Model`` from a PEFT directory and load its weights.

    ``dropout`` overrides the file's lora_dropout (TRL trains with dropout disabled)."""
    spec, state = load_adapter(directory, model_config)
    d = spec.dropout if dropout is None else float(dropout)
    model.lora_init(spec.rank, spec.alpha, list(spec.targets), use_rslora=spec.use_rslora, dropout=d,
                    seed=seed)
    model.lora_load_state(state, arena="params")
    return LoraSpec(spec.rank, spec.alpha, spec.targets, spec.use_rslora, d)
