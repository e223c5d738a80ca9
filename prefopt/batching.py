"""Tokenised preference pairs -> packed micro-batches for the C core, and cached reference log-probs.

A pair is packed as ``[prompt | chosen | rejected]`` (prefix sharing, design.md section 11):
``tokens`` int32 [N] holds the pairs back to back and ``segments`` int32 [P, 3] holds
``(prompt_len, chosen_len, rejected_len)`` per pair, exactly the layout of
``prefopt._core.Model.score`` / ``train_step`` (csrc/README.md).

Reference log-probs (design.md section 8) are computed once per (model, data, max lengths)
with adapters off -- or with the starting adapter when a run continues one -- in eval mode,
and cached in memory and on disk (``<cache_dir>/ref-<hash>.npz``).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["TokenPair", "as_token_pair", "as_token_pairs", "pack", "chunks", "data_hash",
           "model_fingerprint", "reference_logps", "score_pairs", "core_of"]


@dataclass(frozen=True, eq=False)
class TokenPair:
    """One tokenised preference pair: prompt ids, chosen and rejected completion ids (int32).

    ``id`` and ``slice`` are the pair's metadata; ``record`` keeps the original text record
    (used for a user scorer's prompt messages); ``meta`` any other metadata.
    """

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    id: str = ""
    slice: str | None = None
    record: Any = None
    meta: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.prompt.size + self.chosen.size + self.rejected.size)


def _ids(value, what: str, where: str) -> np.ndarray:
    if value is None:
        raise ValueError(f"{where}: missing {what} token ids")
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise ValueError(f"{where}: {what} token ids must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{where}: {what} token ids must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{where}: {what} token ids out of int32 range")
    return np.ascontiguousarray(arr, dtype=np.int32)


def _field(obj, *names):
    for n in names:
        if isinstance(obj, dict):
            if n in obj:
                return obj[n]
        elif hasattr(obj, n):
            return getattr(obj, n)
    return None


def as_token_pair(obj, index: int = 0) -> TokenPair:
    """Converts a tokenised pair (a TokenPair, an object with ``prompt_ids``/``chosen_ids``/
    ``rejected_ids`` attributes, or a dict with those keys or ``prompt``/``chosen``/``rejected``
    id lists) into a validated TokenPair. Empty prompts or completions are errors."""
    if isinstance(obj, TokenPair):
        tp = obj
    else:
        where = f"pair {index}"
        pid = _field(obj, "id")
        if pid is not None:
            where += f" (id {pid!r})"
        prompt = _field(obj, "prompt_ids", "prompt")
        chosen = _field(obj, "chosen_ids", "chosen")
        rejected = _field(obj, "rejected_ids", "rejected")
        for name, v in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if isinstance(v, str) or (isinstance(v, list) and v and isinstance(v[0], dict)):
                raise ValueError(f"{where}: {name} is text, not token ids; tokenise it first "
                                 f"(prefopt.train does that when given a model with a tokenizer)")
        meta = _field(obj, "meta", "metadata") or {}
        slc = _field(obj, "slice")
        if slc is None and isinstance(meta, dict):
            slc = meta.get("slice")
        if pid is None and isinstance(meta, dict):
            pid = meta.get("id")
        tp = TokenPair(_ids(prompt, "prompt", where), _ids(chosen, "chosen", where),
                       _ids(rejected, "rejected", where),
                       id=str(pid) if pid is not None else str(index),
                       slice=None if slc is None else str(slc),
                       record=_field(obj, "record", "source"),
                       meta=dict(meta) if isinstance(meta, dict) else {})
    where = f"pair {index} (id {tp.id!r})"
    if tp.prompt.size < 1:
        raise ValueError(f"{where}: empty prompt (the first completion token needs a prompt position)")
    if tp.chosen.size < 1 or tp.rejected.size < 1:
        raise ValueError(f"{where}: empty chosen or rejected completion; such pairs must be dropped "
                         f"before training (see prefopt.tokenize)")
    return tp


def as_token_pairs(pairs: Iterable) -> list[TokenPair]:
    out = [as_token_pair(p, i) for i, p in enumerate(pairs)]
    return out


def pack(pairs: Sequence[TokenPair]) -> tuple[np.ndarray, np.ndarray]:
    """Packs pairs into ``tokens`` int32 [N] and ``segments`` int32 [P, 3] (no padding)."""
    if not pairs:
        raise ValueError("cannot pack an empty micro-batch")
    seg = np.empty((len(pairs), 3), dtype=np.int32)
    parts = []
    for i, p in enumerate(pairs):
        seg[i] = (p.prompt.size, p.chosen.size, p.rejected.size)
        parts += [p.prompt, p.chosen, p.rejected]
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.int32), seg


def chunks(seq: Sequence, size: int) -> list:
    """Consecutive slices of at most ``size`` items."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def data_hash(pairs: Sequence[TokenPair], *extra) -> str:
    """SHA-256 (hex) of the pairs' token ids (and lengths), plus ``extra`` values."""
    h = hashlib.sha256()
    for p in pairs:
        for a in (p.prompt, p.chosen, p.rejected):
            h.update(np.int64(a.size).tobytes())
            h.update(a.tobytes())
    h.update(repr(extra).encode())
    return h.hexdigest()


def core_of(model):
    """The ``prefopt._core.Model`` inside ``model`` (a PretrainedModel or the core itself)."""
    if hasattr(model, "score") and hasattr(model, "train_step"):
        return model
    for name in ("core", "model", "_core", "c_model", "cmodel"):
        inner = getattr(model, name, None)
        if inner is not None and hasattr(inner, "score") and hasattr(inner, "train_step"):
            return inner
    raise TypeError(f"{type(model).__name__} is neither a prefopt._core.Model nor a loaded model "
                    f"holding one")


def model_fingerprint(core, vocab_size: int | None = None) -> str:
    """A hash that changes whenever the model's base weights (or current adapter) change.

    Scores a fixed probe sequence with adapters off and with the current adapter, and hashes
    the per-token log-probs (they depend on every weight), plus the adapter parameters."""
    v = int(vocab_size) if vocab_size else 8
    ids = (np.arange(1, 17, dtype=np.int64) * 7919 % max(v, 1)).astype(np.int32)
    seg = np.array([[1, ids.size - 1, 0]], dtype=np.int32)
    h = hashlib.sha256()
    out = core.score(ids, seg, use_lora=False, per_token=True)
    h.update(np.asarray(out["per_token"], dtype=np.float32).tobytes())
    h.update(np.asarray(out["logp"], dtype=np.float64).tobytes())
    info = core.lora_info()
    if info:
        state = core.lora_state("params")
        for k in sorted(state):
            h.update(k.encode())
            h.update(np.ascontiguousarray(state[k]).tobytes())
    return h.hexdigest()


def score_pairs(core, pairs: Sequence[TokenPair], batch_size: int, use_lora: bool,
                progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode log-prob sums ``logp`` float64 [P, 2] and counts ``n`` int32 [P, 2]."""
    logp = np.empty((len(pairs), 2), dtype=np.float64)
    n = np.empty((len(pairs), 2), dtype=np.int32)
    i = 0
    for mb in chunks(list(pairs), batch_size):
        tokens, seg = pack(mb)
        out = core.score(tokens, seg, use_lora=use_lora)
        logp[i:i + len(mb)] = out["logp"]
        n[i:i + len(mb)] = out["n"]
        i += len(mb)
        if progress is not None:
            progress(len(mb))
    if not np.all(np.isfinite(logp)):
        bad = [pairs[j].id for j in np.nonzero(~np.all(np.isfinite(logp), axis=1))[0][:5]]
        raise FloatingPointError(f"non-finite log-probs while scoring pairs {bad}")
    return logp, n


_MEMORY_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def reference_logps(core, pairs: Sequence[TokenPair], *, cache_dir=None, batch_size: int = 8,
                    use_lora: bool = False, key_extra=(), vocab_size: int | None = None,
                    progress=None) -> tuple[np.ndarray, np.ndarray, str]:
    """Reference log-prob sums float64 [P, 2] and token counts int32 [P, 2] of ``pairs``.

    ``use_lora=False``: base model, adapters off. ``use_lora=True``: the current (starting)
    adapter, for a run that continues one. Always eval mode (no dropout). Computed once per
    key = hash(model fingerprint, token ids, ``key_extra`` such as max lengths) and cached in
    memory and, when ``cache_dir`` is given, in ``cache_dir/ref-<key>.npz``.
    Returns (logp, n, key)."""
    fp = model_fingerprint(core, vocab_size)
    key = data_hash(pairs, fp, bool(use_lora), tuple(key_extra))[:24]
    path = Path(cache_dir) / f"ref-{key}.npz" if cache_dir is not None else None
    if key in _MEMORY_CACHE:
        logp, n = _MEMORY_CACHE[key]
        if path is not None and not path.exists():
            _save_npz(path, logp, n)
        return logp.copy(), n.copy(), key
    if path is not None and path.exists():
        try:
            with np.load(path) as z:
                logp, n = z["logp"], z["n"]
            if logp.shape == (len(pairs), 2) and n.shape == (len(pairs), 2):
                _MEMORY_CACHE[key] = (logp, n)
                return logp.copy(), n.copy(), key
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache file: recompute and overwrite
    logp, n = score_pairs(core, pairs, batch_size, use_lora=use_lora, progress=progress)
    _MEMORY_CACHE[key] = (logp, n)
    if path is not None:
        _save_npz(path, logp, n)
    return logp.copy(), n.copy(), key


def _save_npz(path: Path, logp, n) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ref-", suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, logp=logp, n=n)
    os.replace(tmp, path)
