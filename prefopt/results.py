"""Plain result records shared by the run layer (train/evaluate/experiment) and the
analysis layer (decide/plots/report).

Nothing here touches the C core: these are small dataclasses with JSON round-trips.

Per held-out pair (design.md section 9), with Lc, Lr the policy log-prob sums of the
chosen/rejected completion, nc, nr their token counts and Rc, Rr the reference sums:

- ``avg_margin = Lc/nc - Lr/nr``   (length-normalised policy preference; needs no reference)
- ``ref_margin = (Lc - Rc) - (Lr - Rr)``   (implicit-reward preference against the base model)
- ``avg_correct = avg_margin > 0`` and ``ref_correct = ref_margin > 0`` (strict, as TRL's
  ``rewards/accuracies``: a tie counts as wrong).

Both are computed the same way for every objective, so DPO, SimPO and ORPO runs can be
compared on one scale.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

METRICS = ("avg", "ref")


def _finite(value, what: str) -> float:
    """Return ``value`` as a float, or raise ValueError naming ``what`` if it is not finite."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{what} must be finite, got {x}")
    return x


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


@dataclass
class PairEval:
    """Held-out numbers of one preference pair.

    ``avg_correct`` and ``ref_correct`` are derived from the margins (strict ``> 0``), so
    they can never disagree with them. ``score`` is the optional user-scorer value of the
    policy's greedy answer (None when no scorer ran). The raw log-prob sums and counts are
    optional and kept for inspection.
    """

    id: str
    slice: Optional[str]
    avg_margin: float
    ref_margin: float
    score: Optional[float] = None
    logp_chosen: Optional[float] = None
    logp_rejected: Optional[float] = None
    n_chosen: Optional[int] = None
    n_rejected: Optional[int] = None
    ref_logp_chosen: Optional[float] = None
    ref_logp_rejected: Optional[float] = None

    def __post_init__(self):
        if self.id is None or str(self.id) == "":
            raise ValueError("PairEval.id must be a non-empty string")
        self.id = str(self.id)
        if self.slice is not None:
            self.slice = str(self.slice)
        self.avg_margin = _finite(self.avg_margin, f"pair {self.id}: avg_margin")
        self.ref_margin = _finite(self.ref_margin, f"pair {self.id}: ref_margin")
        if self.score is not None:
            self.score = _finite(self.score, f"pair {self.id}: score")

    @property
    def avg_correct(self) -> bool:
        """Policy prefers chosen by mean log-prob per token: Lc/nc > Lr/nr."""
        return self.avg_margin > 0.0

    @property
    def ref_correct(self) -> bool:
        """Policy moved chosen up relative to rejected vs the reference: (Lc-Rc) > (Lr-Rr)."""
        return self.ref_margin > 0.0

    def correct(self, metric: str = "avg") -> bool:
        return self.avg_correct if _check_metric(metric) == "avg" else self.ref_correct

    def margin(self, metric: str = "avg") -> float:
        return self.avg_margin if _check_metric(metric) == "avg" else self.ref_margin

    @classmethod
    def from_logps(cls, id, slice, logp_chosen, logp_rejected, n_chosen, n_rejected,
                   ref_logp_chosen, ref_logp_rejected, score=None) -> "PairEval":
        """Build from the per-pair sums: policy Lc, Lr, token counts nc, nr, reference Rc, Rr."""
        Lc = _finite(logp_chosen, f"pair {id}: logp_chosen")
        Lr = _finite(logp_rejected, f"pair {id}: logp_rejected")
        Rc = _finite(ref_logp_chosen, f"pair {id}: ref_logp_chosen")
        Rr = _finite(ref_logp_rejected, f"pair {id}: ref_logp_rejected")
        nc, nr = int(n_chosen), int(n_rejected)
        if nc <= 0 or nr <= 0:
            raise ValueError(f"pair {id}: completion token counts must be > 0, got {nc}, {nr}")
        return cls(id=id, slice=slice, avg_margin=Lc / nc - Lr / nr,
                   ref_margin=(Lc - Rc) - (Lr - Rr), score=score,
                   logp_chosen=Lc, logp_rejected=Lr, n_chosen=nc, n_rejected=nr,
                   ref_logp_chosen=Rc, ref_logp_rejected=Rr)

    def to_dict(self) -> Dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["avg_correct"] = self.avg_correct
        d["ref_correct"] = self.ref_correct
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "PairEval":
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for k in ("id", "slice", "avg_margin", "ref_margin"):
            if k not in kw:
                raise ValueError(f"PairEval record is missing {k!r}: {d!r}")
        return cls(**kw)


@dataclass
class EvalResult:
    """Held-out evaluation of one model (a trained run or the base model).

    ``pairs``: one PairEval per held-out pair (ids unique). ``metrics``: the ``eval_*``
    TRL-named averages of the objective the model was trained with (may be empty for the
    base model), plus the objective-agnostic summaries (see :meth:`agnostic_metrics`).
    """

    pairs: List[PairEval]
    metrics: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.pairs = [p if isinstance(p, PairEval) else PairEval.from_dict(p) for p in self.pairs]
        seen = set()
        for p in self.pairs:
            if p.id in seen:
                raise ValueError(f"EvalResult: duplicate pair id {p.id!r}")
            seen.add(p.id)
        self.metrics = dict(self.metrics or {})

    @property
    def n(self) -> int:
        return len(self.pairs)

    def ids(self) -> List[str]:
        return [p.id for p in self.pairs]

    def by_id(self) -> Dict[str, PairEval]:
        return {p.id: p for p in self.pairs}

    def slices(self) -> List[str]:
        """Slice names present (sorted; pairs without a slice are not a slice)."""
        return sorted({p.slice for p in self.pairs if p.slice is not None})

    def select(self, slice: Optional[str] = None) -> List[PairEval]:
        if slice is None:
            return list(self.pairs)
        return [p for p in self.pairs if p.slice == slice]

    def n_correct(self, metric: str = "avg", slice: Optional[str] = None) -> int:
        return sum(p.correct(metric) for p in self.select(slice))

    def accuracy(self, metric: str = "avg", slice: Optional[str] = None) -> float:
        """Fraction of pairs (optionally of one slice) the model gets right; NaN if none."""
        sel = self.select(slice)
        _check_metric(metric)
        return (sum(p.correct(metric) for p in sel) / len(sel)) if sel else float("nan")

    def mean_margin(self, metric: str = "avg", slice: Optional[str] = None) -> float:
        """Mean per-pair margin (``avg`` or ``ref``); NaN if no pairs."""
        sel = self.select(slice)
        _check_metric(metric)
        return (math.fsum(p.margin(metric) for p in sel) / len(sel)) if sel else float("nan")

    def mean_score(self, slice: Optional[str] = None) -> Optional[float]:
        """Mean user-scorer value over the pairs that have one, or None."""
        vals = [p.score for p in self.select(slice) if p.score is not None]
        return sum(vals) / len(vals) if vals else None

    def agnostic_metrics(self) -> Dict[str, float]:
        """Objective-agnostic summaries, overall and per slice, e.g.
        ``avg_accuracy``, ``ref_margin``, ``avg_accuracy/pricing``, ``n/pricing``."""
        out: Dict[str, float] = {"n": float(self.n)}
        for s in [None] + self.slices():
            suf = "" if s is None else f"/{s}"
            for m in METRICS:
                out[f"{m}_accuracy{suf}"] = self.accuracy(m, s)
                out[f"{m}_margin{suf}"] = self.mean_margin(m, s)
            if s is not None:
                out[f"n{suf}"] = float(len(self.select(s)))
            sc = self.mean_score(s)
            if sc is not None:
                out[f"score{suf}"] = sc
        return out

    @classmethod
    def from_pairs(cls, pairs: Iterable[PairEval], metrics: Optional[Dict[str, float]] = None
                   ) -> "EvalResult":
        """EvalResult whose metrics are ``metrics`` plus :meth:`agnostic_metrics`."""
        r = cls(list(pairs), dict(metrics or {}))
        r.metrics.update(r.agnostic_metrics())
        return r

    def to_dict(self) -> Dict[str, Any]:
        return {"pairs": [p.to_dict() for p in self.pairs], "metrics": dict(self.metrics)}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "EvalResult":
        if "pairs" not in d:
            raise ValueError("EvalResult record is missing 'pairs'")
        return cls([PairEval.from_dict(p) for p in d["pairs"]], dict(d.get("metrics", {})))


def _is_eval_entry(entry: Dict[str, Any]) -> bool:
    return any(k.startswith("eval_") for k in entry)


@dataclass
class RunResult:
    """One training run of the ablation and everything the analysis needs about it.

    ``settings``: every fixed setting of the run (model, split, seed, steps, LR, beta, ...);
    runs compared against each other must agree on all of them except objective and rank.
    ``log``: the JSONL log entries in order: train entries with TRL names (``step``,
    ``epoch``, ``loss``, ``grad_norm``, ``learning_rate``, ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``,
    ``logps/rejected``) and eval entries (the same keys prefixed ``eval_`` plus
    ``eval_loss``). ``heldout``: held-out evaluation after training; ``baseline``: the same
    evaluation of the base model (optional).
    """

    name: str
    objective: str
    rank: int
    settings: Dict[str, Any] = field(default_factory=dict)
    log: List[Dict[str, Any]] = field(default_factory=list)
    heldout: Optional[EvalResult] = None
    baseline: Optional[EvalResult] = None
    adapter_path: Optional[str] = None
    log_path: Optional[str] = None

    def __post_init__(self):
        if not self.name:
            raise ValueError("RunResult.name must be non-empty")
        self.objective = str(self.objective)
        r = int(self.rank)
        if r <= 0 or r != self.rank:
            raise ValueError(f"run {self.name}: rank must be a positive integer, got {self.rank!r}")
        self.rank = r
        if isinstance(self.heldout, dict):
            self.heldout = EvalResult.from_dict(self.heldout)
        if isinstance(self.baseline, dict):
            self.baseline = EvalResult.from_dict(self.baseline)
        self.log = [dict(e) for e in self.log]
        if self.adapter_path is not None:
            self.adapter_path = str(self.adapter_path)
        if self.log_path is not None:
            self.log_path = str(self.log_path)

    def train_entries(self) -> List[Dict[str, Any]]:
        """Log entries of training steps (those with ``rewards/margins`` or ``loss``)."""
        return [e for e in self.log if not _is_eval_entry(e)
                and ("rewards/margins" in e or "loss" in e)]

    def eval_entries(self) -> List[Dict[str, Any]]:
        """Log entries of held-out evaluations during training (keys prefixed ``eval_``)."""
        return [e for e in self.log if _is_eval_entry(e)]

    def to_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name, "objective": self.objective, "rank": self.rank,
            "settings": dict(self.settings), "log": [dict(e) for e in self.log],
            "heldout": self.heldout.to_dict() if self.heldout is not None else None,
            "baseline": self.baseline.to_dict() if self.baseline is not None else None,
            "adapter_path": self.adapter_path, "log_path": self.log_path,
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RunResult":
        for k in ("name", "objective", "rank"):
            if k not in d:
                raise ValueError(f"RunResult record is missing {k!r}")
        return cls(
            name=d["name"], objective=d["objective"], rank=d["rank"],
            settings=dict(d.get("settings") or {}), log=list(d.get("log") or []),
            heldout=EvalResult.from_dict(d["heldout"]) if d.get("heldout") else None,
            baseline=EvalResult.from_dict(d["baseline"]) if d.get("baseline") else None,
            adapter_path=d.get("adapter_path"), log_path=d.get("log_path"),
        )

    def save_json(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load_json(cls, path) -> "RunResult":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d)


def read_jsonl_log(path) -> List[Dict[str, Any]]:
    """Read a JSONL training log; a malformed line raises ValueError naming the line."""
    path = Path(path)
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                e = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{i}: not valid JSON ({err})") from None
            if not isinstance(e, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object, got {type(e).__name__}")
            out.append(e)
    return out
