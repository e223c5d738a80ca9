"""Preference data: loading, validation, the implicit-prompt split, HH conversion, train/held-out.

Accepted inputs: ``.jsonl``, ``.json`` (an array of objects), either one gzipped (``.gz``),
or a Python list of dicts. Accepted record shapes (TRL's):

* standard, explicit prompt: ``{"prompt": str, "chosen": str, "rejected": str}``;
* conversational, explicit prompt: ``prompt`` a list of ``{"role", "content"}`` messages,
  ``chosen``/``rejected`` lists of assistant messages;
* implicit prompt: only ``chosen`` and ``rejected``, sharing their beginning.
  Strings (Anthropic HH: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) are split at the last
  common turn boundary: the common prefix cut back to its last ``"\\n\\nAssistant:"``
  (the prompt ends with that marker; the completion starts after it, e.g. ``" Sure..."``).
  Strings without that marker are cut back to the last whitespace of the common prefix.
  Conversations are split after their longest common run of whole messages, cut back so
  that the completion starts with an assistant message.

Every other field (``id``, ``slice``, ``tags``, ``split``, anything else) is kept:
``id`` on the pair, the rest in ``pair.metadata``. Records without an ``id`` get a stable
one from their position (``line-12`` in a file, ``item-3`` in a list).

Malformed records raise ValueError naming the file, the line and the field, unless
``skip_invalid=True`` (then they are skipped and listed in ``PairList.skipped``).

:func:`hh_to_messages` / ``load_pairs(..., hh_to_chat=True)`` turn HH text into
conversational messages (Human -> user, Assistant -> assistant) so an instruct model's chat
template can format it. :func:`split_pairs` makes a seeded (optionally stratified) or fixed
train/held-out split.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "PreferencePair",
    "PairList",
    "load_pairs",
    "parse_records",
    "hh_to_messages",
    "to_conversational",
    "split_pairs",
    "HH_ASSISTANT",
    "HH_HUMAN",
]

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
_PAIR_FIELDS = ("prompt", "chosen", "rejected")
_ROLES = ("system", "user", "assistant", "tool")
_SPLIT_NAMES = {"train": "train", "heldout": "heldout", "held-out": "heldout", "held_out": "heldout",
                "test": "heldout", "eval": "heldout", "validation": "heldout", "valid": "heldout"}


@dataclass
class PreferencePair:
    """One preference pair with an explicit prompt.

    ``prompt`` is a string (then ``chosen``/``rejected`` are strings) or a list of messages
    (then ``chosen``/``rejected`` are lists of messages starting with an assistant message).
    ``source`` says where it came from (``file.jsonl:12``)."""
    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    id: str
    metadata: dict = field(default_factory=dict)
    source: str = ""

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)

    @property
    def slice(self) -> str | None:
        return self.metadata.get("slice")

    @property
    def split(self) -> str | None:
        return self.metadata.get("split")


class PairList(list):
    """A list of :class:`PreferencePair`; ``skipped`` lists ``(where, message)`` of records
    left out with ``skip_invalid=True``."""

    def __init__(self, pairs=(), skipped=None):
        super().__init__(pairs)
        self.skipped: list[tuple[str, str]] = list(skipped or [])


class _Bad(ValueError):
    """A malformed record: message without the location (added by the caller)."""


# ---------------------------------------------------------------------------------------------
# Reading files

def _open_text(path: Path) -> tuple[str, str]:
    """(text, inner name) of a file, gunzipping ``.gz``."""
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as f:
                raw = f.read()
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: not a readable gzip file: {e}") from None
        inner = path.stem
    else:
        raw = path.read_bytes()
        inner = path.name
    try:
        return raw.decode("utf-8"), inner
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 text") from None


def _records_jsonl(text: str, name: str) -> Iterable[tuple[int, Any]]:
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}:{n}: bad JSON (column {e.colno}): {e.msg}") from None


def _records_json(text: str, name: str) -> Iterable[tuple[int, Any]]:
    """Elements of a top-level JSON array, each with the line it starts on."""
    dec = json.JSONDecoder()
    ws = re.compile(r"\s*")

    def line_of(pos):
        return text.count("\n", 0, pos) + 1

    pos = ws.match(text, 0).end()
    if pos >= len(text) or text[pos] != "[":
        raise ValueError(f"{name}:{line_of(pos)}: a .json file must hold an array of records")
    pos = ws.match(text, pos + 1).end()
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}:{e.lineno}: bad JSON (column {e.colno}): {e.msg}") from None
        yield line_of(pos), obj
        pos = ws.match(text, end).end()
        if pos < len(text) and text[pos] == ",":
            pos = ws.match(text, pos + 1).end()
            continue
        if pos < len(text) and text[pos] == "]":
            rest = ws.match(text, pos + 1).end()
            if rest != len(text):
                raise ValueError(f"{name}:{line_of(rest)}: unexpected text after the JSON array")
            return
        raise ValueError(f"{name}:{line_of(pos)}: bad JSON: expected ',' or ']' between records")


def _read_file(path: Path) -> tuple[list[tuple[str, int, Any]], str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    text, inner = _open_text(path)
    name = str(path)
    low = inner.lower()
    if low.endswith(".jsonl"):
        kind = "jsonl"
    elif low.endswith(".json"):
        kind = "json"
    else:  # sniff: an array is JSON, anything else JSON lines
        kind = "json" if text.lstrip().startswith("[") else "jsonl"
    it = _records_json(text, name) if kind == "json" else _records_jsonl(text, name)
    return [(f"{name}:{n}", n, obj) for n, obj in it], name


# ---------------------------------------------------------------------------------------------
# Validating and normalising one record

def _check_text(v, fld) -> str:
    if not isinstance(v, str):
        raise _Bad(f"field {fld!r} should be a string, got {type(v).__name__}")
    if not v.strip():
        raise _Bad(f"field {fld!r} is empty")
    return v


def _check_message_list(v, fld) -> list[dict]:
    """Each item a {role, content} message with a known role; a system message only first."""
    if not isinstance(v, list):
        raise _Bad(f"field {fld!r} should be a list of messages, got {type(v).__name__}")
    if not v:
        raise _Bad(f"field {fld!r} is an empty list")
    out = []
    for i, m in enumerate(v):
        where = f"{fld}[{i}]"
        if not isinstance(m, Mapping):
            raise _Bad(f"field {where!r} should be a {{role, content}} object, got {type(m).__name__}")
        for k in ("role", "content"):
            if k not in m:
                raise _Bad(f"field {where!r} has no {k!r}")
        if m["role"] not in _ROLES:
            raise _Bad(f"field {where + '.role'!r}: unknown role {m['role']!r} (expected one of {_ROLES})")
        if not isinstance(m["content"], str):
            raise _Bad(f"field {where + '.content'!r} should be a string, got {type(m['content']).__name__}")
        if m["role"] == "system" and i != 0:
            raise _Bad(f"field {where + '.role'!r}: a system message may only come first")
        out.append(dict(m))
    return out


def _check_messages(v, fld, *, completion: bool) -> list[dict]:
    """A prompt (must not end with an assistant turn) or a completion (assistant first and
    last, non-empty last turn, no system message)."""
    out = _check_message_list(v, fld)
    if completion:
        if out[0]["role"] != "assistant":
            raise _Bad(f"field {fld + '[0].role'!r} should be 'assistant', got {out[0]['role']!r}")
        if out[-1]["role"] != "assistant":
            raise _Bad(f"field {fld + f'[{len(out) - 1}].role'!r} should be 'assistant' "
                       f"(a completion ends with the model's turn), got {out[-1]['role']!r}")
        if any(m["role"] == "system" for m in out):
            raise _Bad(f"field {fld!r}: a completion cannot hold a system message")
        if not out[-1]["content"].strip():
            raise _Bad(f"field {fld + f'[{len(out) - 1}].content'!r} is empty")
    else:
        if out[-1]["role"] == "assistant":
            raise _Bad(f"field {fld + f'[{len(out) - 1}].role'!r}: the prompt ends with an assistant "
                       "message; the completion must be the next assistant turn")
    return out


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def split_implicit_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen_completion, rejected_completion) of an implicit-prompt text pair.

    The common prefix is cut back to its last ``"\\n\\nAssistant:"`` (prompt ends with it),
    or, without such a marker, to its last whitespace (which goes to the completions)."""
    n = _common_prefix_len(chosen, rejected)
    common = chosen[:n]
    k = common.rfind(HH_ASSISTANT)
    if k >= 0:
        cut = k + len(HH_ASSISTANT)
    else:
        ws = [m.start() for m in re.finditer(r"\s", common)]
        if not ws or ws[-1] == 0:
            raise _Bad("fields 'chosen'/'rejected' share no prompt (no common prefix up to a turn "
                       "boundary or whitespace)")
        cut = ws[-1]
    return chosen[:cut], chosen[cut:], rejected[cut:]


def split_implicit_messages(chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list]:
    """(prompt, chosen, rejected) messages of an implicit-prompt conversation pair: the longest
    common run of whole messages, cut back so the completions start with an assistant turn."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    # cut back until both completions start with an assistant turn
    while n > 0 and not (n < len(chosen) and n < len(rejected) and chosen[n]["role"] == "assistant"
                         and rejected[n]["role"] == "assistant"):
        n -= 1
    if n == 0:
        raise _Bad("fields 'chosen'/'rejected' share no prompt messages")
    return chosen[:n], chosen[n:], rejected[n:]


def hh_to_messages(text: str) -> list[dict]:
    """Anthropic HH text (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) -> messages.

    Human turns become ``user`` messages and Assistant turns ``assistant`` messages, each
    content stripped of surrounding whitespace. A trailing empty Assistant turn (the end of an
    HH prompt) is dropped. Text before the first marker is an error."""
    if not isinstance(text, str):
        raise _Bad(f"HH text should be a string, got {type(text).__name__}")
    marks = list(re.finditer(r"\n\nHuman:|\n\nAssistant:", text))
    if not marks or marks[0].start() != 0:
        if not marks or text[:marks[0].start()].strip():
            raise _Bad("HH text should start with '\\n\\nHuman:' or '\\n\\nAssistant:'")
    out = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        role = "user" if m.group() == HH_HUMAN else "assistant"
        out.append({"role": role, "content": text[m.end():end].strip()})
    if out and out[-1]["role"] == "assistant" and not out[-1]["content"]:
        out.pop()
    return out


def _hh_completion(text: str, fld: str) -> list[dict]:
    msgs = hh_to_messages(HH_ASSISTANT + text)
    if not msgs or msgs[0]["role"] != "assistant":
        raise _Bad(f"field {fld!r}: HH completion is empty")
    return _check_messages(msgs, fld, completion=True)


def to_conversational(pair: PreferencePair) -> PreferencePair:
    """An HH-style text pair (prompt ending in ``"\\n\\nAssistant:"``) as messages."""
    if pair.conversational:
        return pair
    try:
        if not pair.prompt.rstrip(" ").endswith(HH_ASSISTANT):
            raise _Bad("field 'prompt' is not HH text ending with '\\n\\nAssistant:'")
        prompt = _check_messages(hh_to_messages(pair.prompt), "prompt", completion=False)
        for m in prompt:
            if not m["content"]:
                raise _Bad(f"field 'prompt': an empty {m['role']} turn")
        chosen = _hh_completion(pair.chosen, "chosen")
        rejected = _hh_completion(pair.rejected, "rejected")
    except _Bad as e:
        raise ValueError(f"{pair.source}: {e}") from None
    if chosen == rejected:
        raise ValueError(f"{pair.source}: fields 'chosen' and 'rejected' are identical as messages")
    return PreferencePair(prompt, chosen, rejected, pair.id, dict(pair.metadata), pair.source)


def _normalise(obj: Any, default_id: str) -> PreferencePair:
    if not isinstance(obj, Mapping):
        raise _Bad(f"record should be a JSON object, got {type(obj).__name__}")
    for f in ("chosen", "rejected"):
        if f not in obj:
            raise _Bad(f"missing field {f!r}")
    chosen, rejected = obj["chosen"], obj["rejected"]
    has_prompt = "prompt" in obj and obj["prompt"] is not None
    if has_prompt:
        prompt = obj["prompt"]
        if isinstance(prompt, str):
            prompt = _check_text(prompt, "prompt")
            chosen, rejected = _check_text(chosen, "chosen"), _check_text(rejected, "rejected")
        elif isinstance(prompt, list):
            prompt = _check_messages(prompt, "prompt", completion=False)
            chosen = _check_messages(chosen, "chosen", completion=True)
            rejected = _check_messages(rejected, "rejected", completion=True)
        else:
            raise _Bad(f"field 'prompt' should be a string or a list of messages, got {type(prompt).__name__}")
    elif isinstance(chosen, str) or isinstance(rejected, str):
        chosen, rejected = _check_text(chosen, "chosen"), _check_text(rejected, "rejected")
        if chosen == rejected:
            raise _Bad("fields 'chosen' and 'rejected' are identical")
        prompt, chosen, rejected = split_implicit_text(chosen, rejected)
        for f, v in (("chosen", chosen), ("rejected", rejected)):
            if not v.strip():
                raise _Bad(f"field {f!r} has an empty completion after the shared prompt")
    elif isinstance(chosen, list) and isinstance(rejected, list):
        chosen = _check_conversation(chosen, "chosen")
        rejected = _check_conversation(rejected, "rejected")
        if chosen == rejected:
            raise _Bad("fields 'chosen' and 'rejected' are identical")
        prompt, chosen, rejected = split_implicit_messages(chosen, rejected)
        prompt = _check_messages(prompt, "prompt (shared messages)", completion=False)
        chosen = _check_messages(chosen, "chosen", completion=True)
        rejected = _check_messages(rejected, "rejected", completion=True)
    else:
        raise _Bad(f"fields 'chosen'/'rejected' should be strings or lists of messages, got "
                   f"{type(chosen).__name__}/{type(rejected).__name__}")
    if chosen == rejected:
        raise _Bad("fields 'chosen' and 'rejected' are identical")
    meta = {k: v for k, v in obj.items() if k not in _PAIR_FIELDS and k != "id"}
    if "slice" in meta and meta["slice"] is not None and not isinstance(meta["slice"], str):
        raise _Bad(f"field 'slice' should be a string, got {type(meta['slice']).__name__}")
    if "tags" in meta and meta["tags"] is not None:
        t = meta["tags"]
        if isinstance(t, str):
            meta["tags"] = [t]
        elif not (isinstance(t, list) and all(isinstance(x, str) for x in t)):
            raise _Bad("field 'tags' should be a string or a list of strings")
    if "split" in meta and meta["split"] is not None:
        s = meta["split"]
        if not isinstance(s, str) or s.lower() not in _SPLIT_NAMES:
            raise _Bad(f"field 'split' should be one of {sorted(set(_SPLIT_NAMES))}, got {s!r}")
        meta["split"] = _SPLIT_NAMES[s.lower()]
    rid = obj.get("id")
    if rid is None:
        rid = default_id
    elif isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise _Bad(f"field 'id' should be a string or an integer, got {type(rid).__name__}")
    elif isinstance(rid, str) and not rid.strip():
        raise _Bad("field 'id' is empty")
    return PreferencePair(prompt, chosen, rejected, str(rid), meta)


def _check_conversation(v, fld) -> list[dict]:
    """A full conversation (implicit conversational shape): valid messages ending with a
    non-empty assistant turn."""
    out = _check_message_list(v, fld)
    last = f"{fld}[{len(out) - 1}]"
    if out[-1]["role"] != "assistant":
        raise _Bad(f"field {last + '.role'!r} should be 'assistant' (a conversation ends with the "
                   f"model's turn), got {out[-1]['role']!r}")
    if not out[-1]["content"].strip():
        raise _Bad(f"field {last + '.content'!r} is empty")
    return out


# ---------------------------------------------------------------------------------------------

def parse_records(records: Sequence[tuple[str, Any]], *, hh_to_chat: bool = False,
                  skip_invalid: bool = False, id_prefix: str = "line-") -> PairList:
    """Validate ``(where, record)`` items into a :class:`PairList` (see :func:`load_pairs`).
    ``where`` is a location such as ``"data.jsonl:12"`` used in error messages and ids."""
    pairs, skipped, seen = [], [], {}
    for where, pos, obj in records:
        try:
            try:
                pair = _normalise(obj, f"{id_prefix}{pos}")
            except _Bad as e:
                raise ValueError(f"{where}: {e}") from None
            pair.source = where
            if hh_to_chat:
                pair = to_conversational(pair)
            if pair.id in seen:
                raise ValueError(f"{where}: field 'id': duplicate id {pair.id!r} (first at {seen[pair.id]})")
        except ValueError as e:
            if not skip_invalid:
                raise
            skipped.append((where, str(e)))
            continue
        seen[pair.id] = where
        pairs.append(pair)
    return PairList(pairs, skipped)


def load_pairs(source, *, hh_to_chat: bool = False, skip_invalid: bool = False,
               limit: int | None = None) -> PairList:
    """Load preference pairs from a ``.jsonl``/``.json`` file (optionally ``.gz``) or a list
    of dicts, in any of TRL's shapes; return a :class:`PairList` of :class:`PreferencePair`
    with explicit prompts.

    ``hh_to_chat=True`` converts HH text pairs into conversational messages.
    ``skip_invalid=True`` skips malformed records (listed in ``.skipped``) instead of raising.
    ``limit`` keeps the first ``limit`` valid pairs."""
    if isinstance(source, (str, os.PathLike)):
        items, _ = _read_file(Path(source))
        prefix = "line-"
    elif isinstance(source, (list, tuple)):
        items = [(f"<list>[{i}]", i, obj) for i, obj in enumerate(source)]
        prefix = "item-"
    else:
        raise TypeError(f"load_pairs expects a path or a list of dicts, got {type(source).__name__}")
    out = parse_records(items, hh_to_chat=hh_to_chat, skip_invalid=skip_invalid, id_prefix=prefix)
    if limit is not None:
        out = PairList(out[:limit], out.skipped)
    return out


# ---------------------------------------------------------------------------------------------
# Train / held-out split

def _rank_key(seed: int, pid: str) -> str:
    return hashlib.sha256(f"{seed}\x00{pid}".encode("utf-8")).hexdigest()


def _largest_remainder(sizes: dict, n: int) -> dict:
    total = sum(sizes.values())
    if total == 0:
        return {k: 0 for k in sizes}
    quotas = {k: n * s / total for k, s in sizes.items()}
    alloc = {k: int(q) for k, q in quotas.items()}
    left = n - sum(alloc.values())
    for k in sorted(sizes, key=lambda k: (-(quotas[k] - alloc[k]), str(k)))[:left]:
        alloc[k] += 1
    return alloc


def split_pairs(pairs: Sequence[PreferencePair], *, heldout: int | float = 0.2, seed: int = 0,
                heldout_ids: Iterable[str] | None = None, stratify: bool = False,
                use_split_field: bool = True) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out) lists, each in the input order.

    * ``heldout_ids`` given: exactly those pairs are held out (unknown ids are an error).
    * otherwise pairs whose ``split`` field says ``train``/``heldout`` keep it
      (``use_split_field``), and the rest are ranked by ``sha256(f"{seed}\\0{id}")`` and the
      first ones held out: ``heldout`` is a count or a fraction of those pairs. With
      ``stratify=True`` each slice contributes in proportion to its size (largest remainder).
    The split depends only on ids, seed and sizes: stable across runs, machines and Pythons."""
    pairs = list(pairs)
    ids = [p.id for p in pairs]
    if len(set(ids)) != len(ids):
        raise ValueError("split_pairs: pair ids are not unique")
    if heldout_ids is not None:
        want = [str(i) for i in heldout_ids]
        unknown = sorted(set(want) - set(ids))
        if unknown:
            raise ValueError(f"split_pairs: held-out ids not in the data: {unknown[:10]}"
                             f"{' ...' if len(unknown) > 10 else ''}")
        hold = set(want)
    else:
        fixed = {p.id: p.metadata.get("split") for p in pairs
                 if use_split_field and p.metadata.get("split") in ("train", "heldout")}
        free = [p for p in pairs if p.id not in fixed]
        if isinstance(heldout, bool) or not isinstance(heldout, (int, float)):
            raise ValueError(f"split_pairs: heldout should be a count or a fraction, got {heldout!r}")
        if isinstance(heldout, float):
            if not 0.0 <= heldout < 1.0:
                raise ValueError(f"split_pairs: heldout fraction {heldout} outside [0, 1)")
            n = int(round(heldout * len(free)))
        else:
            n = heldout
        if not 0 <= n <= len(free):
            raise ValueError(f"split_pairs: cannot hold out {n} of {len(free)} pairs")
        hold = {i for i, s in fixed.items() if s == "heldout"}
        if stratify:
            groups: dict = {}
            for p in free:
                groups.setdefault(p.metadata.get("slice") or "", []).append(p)
            alloc = _largest_remainder({k: len(v) for k, v in groups.items()}, n)
            for k, members in groups.items():
                members = sorted(members, key=lambda p: _rank_key(seed, p.id))
                hold.update(p.id for p in members[:alloc[k]])
        else:
            ranked = sorted(free, key=lambda p: _rank_key(seed, p.id))
            hold.update(p.id for p in ranked[:n])
    train = [p for p in pairs if p.id not in hold]
    held = [p for p in pairs if p.id in hold]
    return train, held
