"""One LoRA preference-tuning run: ``train(model, train_pairs, eval_pairs, config, out_dir)``.

The heavy work (forward, loss, backward, AdamW) is the C core's (``prefopt._core.Model``); this
module orders the data, accumulates equal-weight gradients, logs TRL-named metrics, evaluates,
checkpoints and resumes.

Files written in ``out_dir``::

    log.jsonl         one JSON object per logging step (train) and per evaluation (eval_*),
                      flushed line by line
    checkpoint/       latest checkpoint: PEFT adapter (adapter_config.json,
                      adapter_model.safetensors), optimizer.npz (Adam moments + step),
                      state.json (step, log position, config, data hash); replaced atomically
    adapter/          the final adapter (PEFT format)
    result.json       the RunResult (written when the run completes)
    ref_cache/        cached reference log-probs

Reproducibility: every random choice is a pure function of ``config.seed`` and the step
(shuffling per epoch, LoRA init, dropout masks), so the same seed, data and config give
bit-identical losses and adapters, and a run resumed from a checkpoint continues exactly as
the uninterrupted run would have.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from . import batching
from .batching import TokenPair

__all__ = ["TrainConfig", "train", "TrainingDiverged", "prepare_pairs", "load_run",
           "OBJECTIVES", "LORA_TARGETS"]

OBJECTIVES = ("dpo", "simpo", "orpo")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
SCHEDULES = ("linear", "cosine", "constant")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0}
DEFAULT_GAMMA_BETA_RATIO = 0.25  # the SimPO repository's default (prefopt.objectives)

# Parameters that belong to one objective (an ablation sets them per objective).
OBJECTIVE_FIELDS = ("objective", "loss_type", "beta", "label_smoothing", "gamma",
                    "gamma_beta_ratio", "sft_weight", "orpo_lambda")
# What an ablation varies; every other field (except pure bookkeeping) must be identical.
CONTROL_FIELDS = OBJECTIVE_FIELDS + ("lora_rank",)
BOOKKEEPING_FIELDS = ("save_every", "logging_steps", "eval_batch_size")


class TrainingDiverged(FloatingPointError):
    """NaN or inf in a loss or gradient. The last good adapter and log stay on disk."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run.

    Objective
      objective: "dpo" | "simpo" | "orpo".
      loss_type: DPO variant, "sigmoid" (default) | "ipo" | "hinge" (DPO only).
      beta: DPO/IPO/hinge beta (default 0.1) or SimPO beta (default 2.0). Not used by ORPO.
      label_smoothing: cDPO epsilon in [0, 0.5), DPO sigmoid only.
      gamma: SimPO's absolute target margin (TRL's ``simpo_gamma``).
      gamma_beta_ratio: SimPO repo's parameter, gamma = beta * gamma_beta_ratio.
        Set at most one of ``gamma`` and ``gamma_beta_ratio``; with neither, SimPO uses
        gamma_beta_ratio = 0.25 (the SimPO repository's default). ``resolved_gamma`` is the
        value used.
      sft_weight: SimPO's optional NLL term on chosen tokens (token mean), default 0.
      orpo_lambda: ORPO's odds-ratio weight (TRL's ORPO ``beta``), default 0.1.

    LoRA (PEFT conventions)
      lora_rank, lora_alpha (None: 2 * rank, so the ablation keeps alpha/rank fixed),
      lora_dropout, lora_targets ("all-linear" or names among q_proj ... down_proj; short
      names q, k, v, o, gate, up, down accepted), use_rslora (scale alpha/sqrt(rank)).
      disable_dropout: True by default, like TRL, which turns all dropout -- LoRA's included --
      off by default; set False to train with ``lora_dropout``.

    Optimisation (AdamW, transformers semantics)
      learning_rate; lr_schedule "linear" | "cosine" | "constant"; warmup_steps OR
      warmup_ratio (of the total steps); epochs OR max_steps (max_steps wins when both are
      given; neither: 1 epoch); pairs_per_step = effective batch; micro_batch_size = pairs per
      core call (gradient accumulation over ceil(pairs_per_step / micro_batch_size) calls;
      every pair of an effective batch has weight 1/(pairs in it)); max_grad_norm (clip by
      global norm; <= 0 disables; the logged grad_norm is before clipping); weight_decay;
      adam_beta1, adam_beta2, adam_epsilon.

    Data
      max_length: cap on prompt + completion tokens of each sequence; max_prompt_length:
      prompts longer than this keep their end (None: no separate prompt cap). Completions are
      truncated to max_length - len(prompt); pairs left with an empty completion are dropped
      and counted in the log.

    Bookkeeping
      seed; eval_every (steps between held-out evaluations; 0 = only at the end);
      save_every (steps between checkpoints; 0 = only at the end and on interrupt);
      logging_steps (steps per train log entry); eval_batch_size (pairs per scoring call).
    """

    objective: str = "dpo"
    loss_type: str = "sigmoid"
    beta: Optional[float] = None
    label_smoothing: float = 0.0
    gamma: Optional[float] = None
    gamma_beta_ratio: Optional[float] = None
    sft_weight: float = 0.0
    orpo_lambda: float = 0.1
    lora_rank: int = 16
    lora_alpha: Optional[float] = None
    lora_dropout: float = 0.0
    lora_targets: Union[str, tuple] = "all-linear"
    use_rslora: bool = False
    disable_dropout: bool = True
    learning_rate: float = 5e-5
    lr_schedule: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    epochs: Optional[float] = None
    max_steps: Optional[int] = None
    pairs_per_step: int = 8
    micro_batch_size: int = 4
    max_length: int = 512
    max_prompt_length: Optional[int] = 256
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    seed: int = 42
    eval_every: int = 0
    save_every: int = 0
    logging_steps: int = 1
    eval_batch_size: int = 8

    def __post_init__(self):
        if isinstance(self.lora_targets, list):
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        self.validate()

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        """Raises ValueError naming the first setting that cannot work."""
        def bad(msg):
            raise ValueError(f"TrainConfig: {msg}")

        def num(name, v, lo=None, hi=None, lo_open=False, hi_open=False, integer=False):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                bad(f"{name} must be a number, got {v!r}")
            if integer and int(v) != v:
                bad(f"{name} must be an integer, got {v!r}")
            if not math.isfinite(float(v)):
                bad(f"{name} must be finite, got {v!r}")
            if lo is not None and (v <= lo if lo_open else v < lo):
                bad(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
            if hi is not None and (v >= hi if hi_open else v > hi):
                bad(f"{name} must be {'<' if hi_open else '<='} {hi}, got {v!r}")

        if self.objective not in OBJECTIVES:
            hint = (f" (use objective='dpo', loss_type={self.objective!r})"
                    if self.objective in ("ipo", "hinge") else "")
            bad(f"objective must be one of {OBJECTIVES}, got {self.objective!r}{hint}")
        if self.loss_type not in DPO_LOSS_TYPES:
            bad(f"loss_type must be one of {DPO_LOSS_TYPES}, got {self.loss_type!r}")
        if self.objective != "dpo" and self.loss_type != "sigmoid":
            bad(f"loss_type={self.loss_type!r} is a DPO variant; objective is {self.objective!r}")
        if self.beta is not None:
            num("beta", self.beta, lo=0, lo_open=True)
            if self.objective == "orpo":
                bad("ORPO has no beta; its odds-ratio weight is orpo_lambda (TRL's ORPO beta)")
        num("label_smoothing", self.label_smoothing, lo=0, hi=0.5, hi_open=True)
        if self.label_smoothing and not (self.objective == "dpo" and self.loss_type == "sigmoid"):
            bad("label_smoothing applies to DPO with loss_type='sigmoid' only")
        if self.gamma is not None and self.gamma_beta_ratio is not None:
            bad("set either gamma (absolute SimPO margin) or gamma_beta_ratio "
                "(gamma = beta * ratio), not both")
        if (self.gamma is not None or self.gamma_beta_ratio is not None) and self.objective != "simpo":
            bad("gamma / gamma_beta_ratio are SimPO parameters; objective is "
                f"{self.objective!r}")
        if self.gamma is not None:
            num("gamma", self.gamma, lo=0)
        if self.gamma_beta_ratio is not None:
            num("gamma_beta_ratio", self.gamma_beta_ratio, lo=0)
        num("sft_weight", self.sft_weight, lo=0)
        if self.sft_weight and self.objective != "simpo":
            bad("sft_weight is a SimPO parameter (ORPO always has its NLL term)")
        num("orpo_lambda", self.orpo_lambda, lo=0)
        num("lora_rank", self.lora_rank, lo=1, integer=True)
        if self.lora_alpha is not None:
            num("lora_alpha", self.lora_alpha, lo=0, lo_open=True)
        num("lora_dropout", self.lora_dropout, lo=0, hi=1, hi_open=True)
        self.targets  # validates
        num("learning_rate", self.learning_rate, lo=0, lo_open=True)
        if self.lr_schedule not in SCHEDULES:
            bad(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        num("warmup_steps", self.warmup_steps, lo=0, integer=True)
        num("warmup_ratio", self.warmup_ratio, lo=0, hi=1, hi_open=True)
        if self.warmup_steps and self.warmup_ratio:
            bad("set either warmup_steps or warmup_ratio, not both")
        if self.epochs is not None:
            num("epochs", self.epochs, lo=0, lo_open=True)
        if self.max_steps is not None:
            num("max_steps", self.max_steps, lo=1, integer=True)
        num("pairs_per_step", self.pairs_per_step, lo=1, integer=True)
        num("micro_batch_size", self.micro_batch_size, lo=1, integer=True)
        num("max_length", self.max_length, lo=2, integer=True)
        if self.max_prompt_length is not None:
            num("max_prompt_length", self.max_prompt_length, lo=1, integer=True)
            if self.max_prompt_length >= self.max_length:
                bad(f"max_prompt_length ({self.max_prompt_length}) must be smaller than "
                    f"max_length ({self.max_length}): no room would be left for completions")
        num("max_grad_norm", self.max_grad_norm)
        num("weight_decay", self.weight_decay, lo=0)
        num("adam_beta1", self.adam_beta1, lo=0, hi=1, hi_open=True)
        num("adam_beta2", self.adam_beta2, lo=0, hi=1, hi_open=True)
        num("adam_epsilon", self.adam_epsilon, lo=0, lo_open=True)
        num("seed", self.seed, lo=0, integer=True)
        num("eval_every", self.eval_every, lo=0, integer=True)
        num("save_every", self.save_every, lo=0, integer=True)
        num("logging_steps", self.logging_steps, lo=1, integer=True)
        num("eval_batch_size", self.eval_batch_size, lo=1, integer=True)

    # ---- resolved values ----------------------------------------------------------------
    @property
    def resolved_beta(self) -> float:
        if self.objective == "orpo":
            return float(self.orpo_lambda)
        return float(self.beta if self.beta is not None else DEFAULT_BETA[self.objective])

    @property
    def resolved_gamma(self) -> float:
        """SimPO's absolute margin actually used (0 for other objectives)."""
        if self.objective != "simpo":
            return 0.0
        if self.gamma is not None:
            return float(self.gamma)
        ratio = DEFAULT_GAMMA_BETA_RATIO if self.gamma_beta_ratio is None else self.gamma_beta_ratio
        return float(self.resolved_beta * ratio)

    @property
    def resolved_alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank)

    @property
    def effective_lora_dropout(self) -> float:
        return 0.0 if self.disable_dropout else float(self.lora_dropout)

    @property
    def targets(self) -> tuple:
        """PEFT module names adapted."""
        t = self.lora_targets
        if isinstance(t, str):
            if t == "all-linear":
                return LORA_TARGETS
            t = tuple(x.strip() for x in t.split(",") if x.strip())
        if not t:
            raise ValueError("TrainConfig: lora_targets is empty")
        out = []
        for name in t:
            full = name if name.endswith("_proj") else f"{name}_proj"
            if full not in LORA_TARGETS:
                raise ValueError(f"TrainConfig: unknown LoRA target {name!r}; choose among "
                                 f"{LORA_TARGETS} or 'all-linear'")
            if full not in out:
                out.append(full)
        return tuple(sorted(out, key=LORA_TARGETS.index))

    def objective_dict(self) -> dict:
        """The C core's objective dict (csrc/README.md), built by prefopt.objectives."""
        from .objectives import objective_params

        if self.objective == "dpo":
            kind = self.loss_type if self.loss_type != "sigmoid" else "dpo"
            kw = {"beta": self.resolved_beta}
            if kind == "dpo":
                kw["label_smoothing"] = float(self.label_smoothing)
            return objective_params(kind, **kw)
        if self.objective == "simpo":
            return objective_params("simpo", beta=self.resolved_beta, gamma=self.resolved_gamma,
                                    sft_weight=float(self.sft_weight))
        return objective_params("orpo", lam=float(self.orpo_lambda))

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["lora_targets"], tuple):
            d["lora_targets"] = list(d["lora_targets"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown settings {unknown}")
        return cls(**d)

    def settings(self) -> dict:
        """Resolved, human-readable settings (what a report lists): the objective's own
        parameters as the core uses them (``objective_params``; parameters of other
        objectives are left out), LoRA alpha/dropout/targets as used, and the rest."""
        d = self.to_dict()
        for k in OBJECTIVE_FIELDS:
            if k != "objective":
                d.pop(k)
        d["objective_params"] = self.objective_dict()
        d.update(lora_alpha=self.resolved_alpha, lora_dropout=self.effective_lora_dropout,
                 lora_targets=list(self.targets))
        return d

    def fixed_settings(self) -> dict:
        """The settings an ablation keeps fixed across runs (everything but the objective's own
        parameters, the rank and pure bookkeeping)."""
        d = self.to_dict()
        for k in CONTROL_FIELDS + BOOKKEEPING_FIELDS:
            d.pop(k, None)
        d["lora_alpha_over_rank"] = self.resolved_alpha / self.lora_rank if self.lora_alpha is None else None
        d["lora_targets"] = list(self.targets)
        return d


# ---------------------------------------------------------------------------------------------
# data preparation
# ---------------------------------------------------------------------------------------------

def _truncate(tp: TokenPair, cfg: TrainConfig) -> Optional[TokenPair]:
    """design.md section 5 rules on already tokenised pairs; None if the pair must be dropped."""
    prompt = tp.prompt
    if cfg.max_prompt_length is not None and prompt.size > cfg.max_prompt_length:
        prompt = prompt[prompt.size - cfg.max_prompt_length:]
    budget = cfg.max_length - prompt.size
    if budget <= 0:
        return None
    chosen, rejected = tp.chosen[:budget], tp.rejected[:budget]
    if chosen.size == 0 or rejected.size == 0:
        return None
    if prompt is tp.prompt and chosen is tp.chosen and rejected is tp.rejected:
        return tp
    return dataclasses.replace(tp, prompt=prompt, chosen=chosen, rejected=rejected)


def _is_text_record(p) -> bool:
    if isinstance(p, TokenPair):
        return False
    get = (lambda k: p.get(k)) if isinstance(p, dict) else (lambda k: getattr(p, k, None))
    for k in ("chosen", "rejected", "prompt"):
        v = get(k)
        if isinstance(v, str) or (isinstance(v, list) and v and isinstance(v[0], dict)):
            return True
    return False


def prepare_pairs(model, pairs, config: TrainConfig, what: str = "train") -> tuple[list, int]:
    """Tokenised, truncated pairs (design.md section 5) and the number dropped.

    ``pairs``: text records (TRL standard / conversational / implicit-prompt shapes, or
    ``prefopt.data`` pairs) -- tokenised with the model's chat tokenizer -- or already
    tokenised pairs (TokenPair, objects/dicts with prompt_ids/chosen_ids/rejected_ids)."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError(f"no {what} pairs")
    if any(_is_text_record(p) for p in pairs):
        pairs = _tokenize_records(model, pairs, config, what)
    tps = batching.as_token_pairs(pairs) if pairs else []
    kept = []
    for tp in tps:
        t = _truncate(tp, config)
        if t is not None:
            kept.append(t)
    dropped = len(pairs) - len(kept)
    if not kept:
        raise ValueError(f"all {len(pairs)} {what} pairs were dropped: no room for completions "
                         f"within max_length={config.max_length} (max_prompt_length="
                         f"{config.max_prompt_length}); raise max_length")
    ids = [t.id for t in kept]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"{what} pairs have duplicate ids {dup}")
    return kept, dropped


def _tokenize_records(model, records, config: TrainConfig, what: str) -> list:
    tok = getattr(model, "tokenizer", None)
    if tok is None or not hasattr(tok, "encode_pair"):
        raise ValueError(f"the {what} pairs are text; pass a loaded model with a tokenizer "
                         f"(prefopt.load) or tokenise them first")
    from . import data as pdata

    if not all(isinstance(r, pdata.PreferencePair) for r in records):
        plain = [r for r in records if not isinstance(r, pdata.PreferencePair)]
        parsed = iter(pdata.load_pairs(plain))
        records = [r if isinstance(r, pdata.PreferencePair) else next(parsed) for r in records]
    out = []
    for i, rec in enumerate(records):
        enc, _reason = tok.encode_pair(rec.prompt, rec.chosen, rec.rejected,
                                       max_length=config.max_length,
                                       max_prompt_length=config.max_prompt_length, id=rec.id,
                                       metadata=rec.metadata)
        if enc is None:
            continue
        tp = batching.as_token_pair(enc, i)
        out.append(dataclasses.replace(tp, id=str(rec.id), record=rec,
                                       slice=None if rec.slice is None else str(rec.slice)))
    return out


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _lr_at(cfg: TrainConfig, step: int, total: int, warmup: int) -> float:
    """LR for the update after ``step`` completed updates (transformers' schedulers)."""
    from . import _core

    if hasattr(_core, "lr_at"):
        return float(_core.lr_at(cfg.lr_schedule, float(cfg.learning_rate), int(step), int(total),
                                 int(warmup)))
    lr = float(cfg.learning_rate)
    if step < warmup:
        return lr * step / max(1, warmup)
    if cfg.lr_schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.lr_schedule == "linear":
        return lr * max(0.0, 1.0 - progress)
    return lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def _dropout_seed(seed: int, step: int, micro: int) -> int:
    h = hashlib.sha256(f"dropout/{seed}/{step}/{micro}".encode()).digest()
    return (int.from_bytes(h[:8], "little") & ((1 << 63) - 1)) | 1


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def _step_batch(seed: int, step: int, n: int, per_step: int) -> tuple[np.ndarray, int]:
    """Indices of the pairs of optimizer step ``step`` (0-based) and its epoch."""
    steps_per_epoch = math.ceil(n / per_step)
    epoch, b = divmod(step, steps_per_epoch)
    order = _epoch_order(seed, epoch, n)
    return order[b * per_step:(b + 1) * per_step], epoch


class _DeferInterrupt:
    """Holds back Ctrl-C (SIGINT) during a critical section and re-raises it afterwards, so an
    interrupt never lands between an optimizer update and its bookkeeping."""

    def __enter__(self):
        self.hit = False
        self.old = None
        if threading.current_thread() is threading.main_thread():
            try:
                self.old = signal.signal(signal.SIGINT, self._handler)
            except (ValueError, OSError):
                self.old = None
        return self

    def _handler(self, signum, frame):
        self.hit = True

    def __exit__(self, et, ev, tb):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        if self.hit and et is None:
            raise KeyboardInterrupt
        return False


class _TermAsInterrupt:
    """While a run trains, SIGTERM (``kill``, ``timeout``, job schedulers) is handled like
    Ctrl-C: the run saves its checkpoint and log and can be resumed. Only installed from the
    main thread and only when nobody else handles SIGTERM; the old handler is restored."""

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread():
            try:
                if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                    self.old = signal.signal(signal.SIGTERM, self._handler)
            except (ValueError, OSError, AttributeError):
                self.old = None
        return self

    @staticmethod
    def _handler(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    def __exit__(self, et, ev, tb):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
        return False


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def _lora_module():
    try:
        from . import lora
    except ImportError:
        return None
    return lora if hasattr(lora, "save_model_adapter") else None


def _save_adapter(core, directory: Path, cfg: TrainConfig, base_name: Optional[str]) -> None:
    """PEFT adapter (adapter_config.json + adapter_model.safetensors) of the core's adapter."""
    lora = _lora_module()
    if lora is not None:
        lora.save_model_adapter(core, str(directory), base_model_name_or_path=base_name)
        return
    _save_adapter_fallback(core, directory, cfg, base_name)


def _load_adapter_state(core, directory: Path) -> None:
    """Loads the parameters of the PEFT adapter in ``directory`` into the core's current
    adapter (same rank and targets)."""
    lora = _lora_module()
    if lora is not None:
        _spec, state = lora.load_adapter(str(directory))
        core.lora_load_state(state, arena="params")
        return
    core.lora_load_state(_read_safetensors(Path(directory) / "adapter_model.safetensors"))


def _init_from_adapter(core, directory, cfg: TrainConfig) -> None:
    """Creates the adapter from a PEFT directory (continuing training from it)."""
    lora = _lora_module()
    if lora is None:
        raise RuntimeError("continuing an adapter needs prefopt.lora")
    spec = lora.load_model_adapter(core, str(directory), seed=int(cfg.seed),
                                   dropout=cfg.effective_lora_dropout)
    if spec.rank != cfg.lora_rank or tuple(spec.targets) != tuple(cfg.targets) or \
            abs(spec.alpha - cfg.resolved_alpha) > 1e-9 or spec.use_rslora != cfg.use_rslora:
        raise ValueError(f"the adapter in {directory} (rank {spec.rank}, alpha {spec.alpha}, "
                         f"targets {list(spec.targets)}, rslora {spec.use_rslora}) does not match "
                         f"the config (rank {cfg.lora_rank}, alpha {cfg.resolved_alpha}, targets "
                         f"{list(cfg.targets)}, rslora {cfg.use_rslora})")


def _save_adapter_fallback(core, directory, cfg, base_name):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = core.lora_state("params")
    conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
            "r": int(cfg.lora_rank), "lora_alpha": cfg.resolved_alpha,
            "lora_dropout": float(cfg.lora_dropout), "target_modules": list(cfg.targets),
            "use_rslora": bool(cfg.use_rslora), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True}
    (directory / "adapter_config.json").write_text(json.dumps(conf, indent=2))
    _write_safetensors(directory / "adapter_model.safetensors",
                       {"base_model.model." + k: v for k, v in state.items()})


def _write_safetensors(path, tensors):
    header, off, blobs = {}, 0, []
    for k in sorted(tensors):
        a = np.ascontiguousarray(tensors[k], dtype=np.float32)
        b = a.tobytes()
        header[k] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)


def _read_safetensors(path):
    data = Path(path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        arr = np.frombuffer(data[8 + n + a:8 + n + b], dtype=np.float32).reshape(v["shape"])
        name = k[len("base_model.model."):] if k.startswith("base_model.model.") else k
        out[name] = arr.copy()
    return out


def _replace_dir(tmp: Path, final: Path) -> None:
    """Atomically swaps directory ``tmp`` into ``final`` (old copy kept as final.old until done)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _base_name(model) -> Optional[str]:
    for k in ("name_or_path", "name", "path", "source"):
        v = getattr(model, k, None)
        if isinstance(v, (str, os.PathLike)):
            return str(v)
    return None


def _vocab(model):
    cfg = getattr(model, "config", None)
    if isinstance(cfg, dict):
        return cfg.get("vocab_size")
    return getattr(cfg, "vocab_size", None)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

class _Run:
    def __init__(self, model, train_tps, eval_tps, cfg, out_dir, name, dropped, progress,
                 callback, init_adapter, scorer, baseline, extra_settings):
        self.model = model
        self.core = batching.core_of(model)
        self.train = train_tps
        self.eval = eval_tps
        self.cfg = cfg
        self.out = Path(out_dir)
        self.name = name
        self.dropped = dropped
        self.progress = progress
        self.callback = callback
        self.init_adapter = init_adapter
        self.scorer = scorer
        self.baseline = baseline
        self.extra_settings = dict(extra_settings or {})
        self.obj = cfg.objective_dict()
        n = len(train_tps)
        self.steps_per_epoch = math.ceil(n / cfg.pairs_per_step)
        if cfg.max_steps is not None:
            self.total = int(cfg.max_steps)
        else:
            self.total = max(1, math.ceil((cfg.epochs if cfg.epochs is not None else 1.0)
                                          * self.steps_per_epoch))
        self.warmup = (int(cfg.warmup_steps) if cfg.warmup_steps
                       else int(math.ceil(cfg.warmup_ratio * self.total)))
        self.log_path = self.out / "log.jsonl"
        self.ckpt = self.out / "checkpoint"
        self.cache_dir = self.out / "ref_cache"
        self.data_key = batching.data_hash(train_tps, "eval", batching.data_hash(eval_tps or []),
                                           cfg.max_length, cfg.max_prompt_length)

    # ---- state ----------------------------------------------------------------------------
    def state_header(self) -> dict:
        return {"config": self.cfg.to_dict(), "data_hash": self.data_key,
                "init_adapter": str(self.init_adapter) if self.init_adapter else None,
                "name": self.name}

    def save_checkpoint(self, step: int, log_pos: int, completed: bool = False) -> None:
        with _DeferInterrupt():
            tmp = Path(tempfile.mkdtemp(dir=self.out, prefix=".checkpoint-"))
            _save_adapter(self.core, tmp, self.cfg, _base_name(self.model))
            m = self.core.lora_state("adam_m")
            v = self.core.lora_state("adam_v")
            arrays = {f"m/{k}": a for k, a in m.items()}
            arrays.update({f"v/{k}": a for k, a in v.items()})
            with open(tmp / "optimizer.npz", "wb") as f:
                np.savez(f, **arrays)
            window = [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in w.items()}
                      for w in getattr(self, "window", [])]
            state = dict(self.state_header(), step=int(step), log_pos=int(log_pos),
                         adam_step=int(self.core.adam_step), completed=bool(completed),
                         window=window,
                         total_steps=self.total, time=time.time())
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            _replace_dir(tmp, self.ckpt)

    def find_checkpoint(self) -> Optional[dict]:
        for d in (self.ckpt, self.ckpt.with_name(self.ckpt.name + ".old")):
            f = d / "state.json"
            if f.exists():
                state = json.loads(f.read_text())
                state["dir"] = str(d)
                return state
        return None

    def restore(self, state: dict) -> None:
        d = Path(state["dir"])
        self._init_lora()
        _load_adapter_state(self.core, d)
        with np.load(d / "optimizer.npz") as z:
            m = {k[2:]: z[k] for k in z.files if k.startswith("m/")}
            v = {k[2:]: z[k] for k in z.files if k.startswith("v/")}
        self.core.lora_load_state(m, arena="adam_m")
        self.core.lora_load_state(v, arena="adam_v")
        self.core.adam_step = int(state["adam_step"])

    def _init_lora(self) -> None:
        cfg = self.cfg
        self.core.lora_remove()
        self.core.lora_init(int(cfg.lora_rank), float(cfg.resolved_alpha), list(cfg.targets),
                            use_rslora=bool(cfg.use_rslora), dropout=cfg.effective_lora_dropout,
                            seed=int(cfg.seed))

    # ---- logging ----------------------------------------------------------------------------
    def write_log(self, entry: dict) -> None:
        line = json.dumps({k: _jsonable(v) for k, v in entry.items()}, allow_nan=True)
        self.log_f.write(line + "\n")
        self.log_f.flush()
        self.log.append(entry)

    # ---- evaluation ---------------------------------------------------------------------------
    def eval_entry(self, step: int, epoch: float, ev) -> dict:
        entry = {"step": step, "epoch": epoch}
        entry.update(ev.metrics)
        agn = {f"eval_{k}": v for k, v in ev.agnostic_metrics().items() if k != "n"}
        entry.update(agn)
        return {k: v for k, v in entry.items() if not (k == "eval_n")}

    def run_eval(self, use_lora=True):
        from . import evaluate as ev_mod

        logp, n = batching.score_pairs(self.core, self.eval, self.cfg.eval_batch_size,
                                       use_lora=use_lora)
        scores = None
        if self.scorer is not None:
            scores = ev_mod.score_generations(self.core, getattr(self.model, "tokenizer", None),
                                              self.eval, self.scorer, use_lora=use_lora)
        return ev_mod.build_eval(self.eval, logp, n, self.eval_ref, self.obj, scores=scores)

    # ---- main loop --------------------------------------------------------------------------
    def run(self, resume: bool, overwrite: bool):
        from . import results

        cfg, core = self.cfg, self.core
        self.out.mkdir(parents=True, exist_ok=True)
        state = self.find_checkpoint()
        if state is not None and not overwrite:
            if not resume:
                raise FileExistsError(f"{self.out} already holds a run; pass resume=True to "
                                      f"continue it or overwrite=True to start over")
            mine = self.state_header()
            diff = [k for k in ("config", "data_hash", "init_adapter")
                    if json.dumps(state.get(k), sort_keys=True) != json.dumps(mine[k], sort_keys=True)]
            if diff:
                raise ValueError(f"{self.out} holds a run with different {', '.join(diff)}; use "
                                 f"another out_dir or overwrite=True")
        elif overwrite:
            for p in (self.ckpt, self.ckpt.with_name("checkpoint.old"), self.out / "adapter",
                      self.out / "result.json", self.log_path):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
            state = None
        elif self.log_path.exists() and self.log_path.stat().st_size > 0:
            raise FileExistsError(f"{self.out} has a log but no checkpoint; use another out_dir "
                                  f"or overwrite=True")

        if state is not None and state.get("completed") and (self.out / "result.json").exists():
            return results.RunResult.load_json(self.out / "result.json")

        # reference log-probs, once per dataset (adapters off, or the starting adapter)
        vocab = _vocab(self.model)
        key_extra = (cfg.max_length, cfg.max_prompt_length)
        if self.init_adapter is not None:
            _init_from_adapter(core, self.init_adapter, cfg)
            use_ref_lora = True
        else:
            core.lora_remove()
            use_ref_lora = False
        rbar = _LazyBar(len(self.train), "reference log-probs (train)", self.progress)
        ref, n_ref, _ = batching.reference_logps(core, self.train, cache_dir=self.cache_dir,
                                                 batch_size=cfg.eval_batch_size,
                                                 use_lora=use_ref_lora, key_extra=key_extra,
                                                 vocab_size=vocab, progress=rbar.update)
        rbar.close()
        self.ref = ref
        self.eval_ref = None
        if self.eval:
            rbar = _LazyBar(len(self.eval), "reference log-probs (held-out)", self.progress)
            self.eval_ref, _, _ = batching.reference_logps(
                core, self.eval, cache_dir=self.cache_dir, batch_size=cfg.eval_batch_size,
                use_lora=use_ref_lora, key_extra=key_extra, vocab_size=vocab,
                progress=rbar.update)
            rbar.close()

        # adapter: fresh, continued, or restored from the checkpoint
        self.window = []
        if state is not None:
            self.restore(state)
            start = int(state["step"])
            log_pos = int(state["log_pos"])
            # metrics of steps done since the last train log entry (logging_steps > 1)
            self.window = [{k: (np.asarray(v, dtype=np.float64) if isinstance(v, list) else v)
                            for k, v in w.items()} for w in state.get("window", [])]
        else:
            if self.init_adapter is None:
                self._init_lora()
            start, log_pos = 0, 0
        self.log = []
        mode = "r+b" if self.log_path.exists() else "w+b"
        with open(self.log_path, mode) as fb:
            fb.truncate(log_pos)
        if log_pos:
            from .results import read_jsonl_log
            self.log = read_jsonl_log(self.log_path)
        self.log_f = open(self.log_path, "a", encoding="utf-8")
        try:
            return self._loop(start)
        finally:
            self.log_f.close()

    def _loop(self, start: int):
        from . import evaluate as ev_mod
        from . import results

        cfg, core = self.cfg, self.core
        if start == 0:
            self.write_log({"step": 0, "epoch": 0.0, "event": "start", "name": self.name,
                            "train_pairs": len(self.train),
                            "heldout_pairs": len(self.eval) if self.eval else 0,
                            "dropped_pairs": self.dropped, "total_steps": self.total,
                            "objective": self.obj})
            if self.eval and self.init_adapter is None and self.scorer is None:
                # step 0: policy == reference exactly (B = 0), so the held-out numbers are the
                # reference's own -- no extra pass needed
                n = np.array([[t.chosen.size, t.rejected.size] for t in self.eval], np.int32)
                ev0 = ev_mod.build_eval(self.eval, self.eval_ref, n, self.eval_ref, self.obj)
                self.write_log(self.eval_entry(0, 0.0, ev0))
            elif self.eval and cfg.eval_every:
                self.write_log(self.eval_entry(0, 0.0, self.run_eval()))
        bar = _progress_bar(self.total, start, self.name, self.progress)
        step = start
        window = self.window
        last_ev = None
        log_pos = self.log_f.tell()
        try:
            while step < self.total:
                idx, epoch = _step_batch(cfg.seed, step, len(self.train), cfg.pairs_per_step)
                weight = 1.0 / len(idx)
                core.zero_grad()
                outs = []
                for j, mb in enumerate(batching.chunks(list(idx), cfg.micro_batch_size)):
                    pairs = [self.train[i] for i in mb]
                    tokens, seg = batching.pack(pairs)
                    ref = np.ascontiguousarray(self.ref[mb], dtype=np.float64)
                    dseed = _dropout_seed(cfg.seed, step, j) if cfg.effective_lora_dropout > 0 else 0
                    out = core.train_step(tokens, seg, ref, self.obj, weight, dseed)
                    if not np.all(np.isfinite(out["loss"])):
                        raise FloatingPointError(f"non-finite loss at step {step + 1} "
                                                 f"(pairs {[p.id for p in pairs][:4]})")
                    outs.append((mb, out))
                gn = float(core.grad_norm())
                if not math.isfinite(gn):
                    raise FloatingPointError(f"non-finite gradient norm at step {step + 1}")
                lr = _lr_at(cfg, step, self.total, self.warmup)
                with _DeferInterrupt():
                    gn2 = core.optimizer_step(lr, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon,
                                              cfg.weight_decay, cfg.max_grad_norm)
                    step += 1
                    ep = step / self.steps_per_epoch
                    window.append(_step_numbers(outs, gn2 if gn2 is not None else gn, lr))
                    entry = None
                    if step % cfg.logging_steps == 0 or step == self.total:
                        entry = _train_entry(self.obj, window, step, ep)
                        self.write_log(entry)
                        window.clear()
                    if self.eval and ((cfg.eval_every and step % cfg.eval_every == 0)
                                      or step == self.total):
                        last_ev = self.run_eval()
                        self.write_log(self.eval_entry(step, ep, last_ev))
                    log_pos = self.log_f.tell()
                    if step == self.total or (cfg.save_every and step % cfg.save_every == 0):
                        self.save_checkpoint(step, log_pos, completed=step == self.total)
                bar.update(1)
                if entry is not None:
                    bar.set_postfix(loss=f"{entry['loss']:.4f}",
                                    margin=f"{entry['rewards/margins']:.3f}", refresh=False)
                if self.callback is not None:
                    self.callback(step, entry)
        except KeyboardInterrupt:
            bar.close()
            self.log_f.flush()
            self.save_checkpoint(step, self.log_f.tell())
            print(f"\nprefopt: run {self.name!r} interrupted after step {step}/{self.total}; "
                  f"adapter, optimizer state and log saved in {self.out}. Call train() again "
                  f"with the same out_dir to resume.", file=sys.stderr)
            raise
        except FloatingPointError as e:
            bar.close()
            self.log_f.flush()
            good_pos = self.log_f.tell()
            self.save_checkpoint(step, good_pos)
            self.write_log({"step": step + 1, "event": "error", "error": str(e)})
            raise TrainingDiverged(
                f"run {self.name!r} stopped at step {step + 1}: {e}. The last good adapter "
                f"(after step {step}) and the log are in {self.out}; lower the learning rate "
                f"or check the data.") from e
        bar.close()
        if self.eval and last_ev is None:  # resumed at the very end (result.json was missing)
            last_ev = self.run_eval()
        # final adapter + result
        with _DeferInterrupt():
            tmp = Path(tempfile.mkdtemp(dir=self.out, prefix=".adapter-"))
            _save_adapter(core, tmp, cfg, _base_name(self.model))
            _replace_dir(tmp, self.out / "adapter")
        settings = dict(cfg.settings(), **self.extra_settings, train_pairs=len(self.train),
                        eval_pairs=len(self.eval) if self.eval else 0, dropped_pairs=self.dropped,
                        total_steps=self.total, data_hash=self.data_key)
        res = results.RunResult(name=self.name, objective=cfg.objective, rank=cfg.lora_rank,
                                settings=settings, log=list(self.log), heldout=last_ev,
                                baseline=self.baseline,
                                adapter_path=str(self.out / "adapter"),
                                log_path=str(self.log_path))
        _atomic_write_text(self.out / "result.json", json.dumps(res.to_dict(), indent=1))
        return res


def _progress_bar(total, initial, name, enabled, unit="step"):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    if tqdm is None or not enabled:
        class _Null:
            def update(self, n=1): pass
            def set_postfix(self, **k): pass
            def close(self): pass
        return _Null()
    return tqdm(total=total, initial=initial, desc=name or "train", unit=unit, leave=True,
                dynamic_ncols=True)


class _LazyBar:
    """A progress bar created on the first update (so cached results show no bar)."""

    def __init__(self, total, desc, enabled):
        self.total, self.desc, self.enabled, self.bar = total, desc, enabled, None

    def update(self, n=1):
        if self.bar is None:
            self.bar = _progress_bar(self.total, 0, self.desc, self.enabled, unit="pair")
        self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _step_numbers(outs, grad_norm, lr) -> dict:
    cat = lambda key: np.concatenate([np.asarray(o[key], dtype=np.float64).reshape(len(mb), -1)
                                      for mb, o in outs])
    logp = cat("logp")
    reward = cat("reward")
    d = {"loss": cat("loss")[:, 0], "Lc": logp[:, 0], "Lr": logp[:, 1],
         "rc": reward[:, 0], "rr": reward[:, 1], "grad_norm": float(grad_norm), "lr": float(lr)}
    for k in ("nll", "log_odds", "log_sig_odds"):
        if k in outs[0][1]:
            d[k] = cat(k)[:, 0]
    return d


def _train_entry(obj: dict, window: list, step: int, epoch: float) -> dict:
    """One TRL-named train log entry: the loss is the mean over the window's steps of each
    step's pair-mean loss; rewards/logps are averaged over the window's pairs; grad_norm and
    learning_rate are the last step's."""
    allc = lambda k: np.concatenate([w[k] for w in window])
    rc, rr = allc("rc"), allc("rr")
    entry = {"step": step, "epoch": round(epoch, 6),
             "loss": float(np.mean([np.mean(w["loss"]) for w in window])),
             "grad_norm": window[-1]["grad_norm"], "learning_rate": window[-1]["lr"],
             "rewards/chosen": float(rc.mean()), "rewards/rejected": float(rr.mean()),
             "rewards/accuracies": float(np.mean(rc > rr)),
             "rewards/margins": float(np.mean(rc - rr)),
             "logps/chosen": float(allc("Lc").mean()), "logps/rejected": float(allc("Lr").mean())}
    if obj["kind"] == "orpo":
        entry["nll_loss"] = float(allc("nll").mean())
        entry["log_odds_ratio"] = float(allc("log_sig_odds").mean())
        entry["log_odds_chosen"] = float(allc("log_odds").mean())
    elif obj["kind"] == "simpo" and obj.get("sft_weight"):
        entry["sft_loss"] = float(allc("nll").mean())
    return entry


def train(model, train_pairs, eval_pairs=None, config: Optional[TrainConfig] = None,
          out_dir=None, *, name: Optional[str] = None, resume: bool = True,
          overwrite: bool = False, progress: bool = True,
          callback: Optional[Callable[[int, Optional[dict]], None]] = None,
          init_adapter=None, scorer: Optional[Callable] = None, baseline=None,
          extra_settings: Optional[dict] = None):
    """Runs LoRA preference tuning and returns a ``prefopt.results.RunResult``.

    model: a loaded model (``prefopt.load``; its tokenizer tokenises text pairs) or a
        ``prefopt._core.Model`` with tokenised pairs. train() installs a fresh adapter
        (rank, alpha, targets from ``config``, initialised from ``config.seed``) on it; after
        the run the model holds the trained adapter.
    train_pairs / eval_pairs: text records (TRL shapes) or tokenised pairs; eval_pairs may be
        None (no held-out evaluation).
    out_dir: where the log, checkpoints, final adapter and result go (required). If it holds
        a checkpoint of the same run (same config and data), training resumes from it
        (``resume=True``); a finished run is returned without retraining. ``overwrite=True``
        starts over.
    callback(step, log_entry_or_None): called after every optimizer step (raising
        KeyboardInterrupt from it behaves like Ctrl-C).
    init_adapter: a PEFT adapter directory to continue; it is also the reference.
    scorer: optional ``scorer(prompt_messages, generated_text, pair) -> float`` run on greedy
        generations at every evaluation.

    Ctrl-C saves a consistent checkpoint (adapter, optimizer state, log) and re-raises
    KeyboardInterrupt; NaN/inf raises TrainingDiverged and leaves the last good adapter and log.
    """
    if config is None:
        config = TrainConfig()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if out_dir is None:
        raise ValueError("train() needs out_dir (log, checkpoints and adapter are written there)")
    train_tps, dropped = prepare_pairs(model, train_pairs, config, "train")
    eval_tps = []
    if eval_pairs is not None:
        eval_tps, dropped_eval = prepare_pairs(model, eval_pairs, config, "held-out")
        dropped += dropped_eval
    run = _Run(model, train_tps, eval_tps, config, out_dir, name or Path(out_dir).name, dropped,
               progress, callback, init_adapter, scorer, baseline, extra_settings)
    with _TermAsInterrupt():
        return run.run(resume=resume, overwrite=overwrite)


def load_run(out_dir):
    """The RunResult saved by a finished run in ``out_dir``."""
    from . import results

    p = Path(out_dir) / "result.json"
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: the run in {out_dir} has not finished")
    return results.RunResult.load_json(p)
