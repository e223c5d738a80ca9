"""Text to token ids: the tokenizer, the chat template and the prompt/completion split.

Two ways to get a :class:`ChatTokenizer`:

* :func:`tokenizer_from_gguf` rebuilds a byte-level BPE ``tokenizers.Tokenizer`` from the
  ``tokenizer.*`` metadata of a GGUF file (vocabulary, merges, token types, special ids,
  chat template, pre-tokenizer family from ``tokenizer.ggml.pre``);
* :func:`tokenizer_from_hf_dir` reads a Hugging Face model directory (``tokenizer.json``,
  ``tokenizer_config.json``, optional ``chat_template.jinja``, ``generation_config.json`` and
  ``config.json``).

Pair encoding (design.md section 5) is :meth:`ChatTokenizer.encode_pair` for one pair and
:func:`encode_pairs` for a data set, which drops and counts pairs that cannot be scored.

Conventions (chosen to score exactly what transformers + TRL score):

* Conversational pairs: ``prompt = template(prompt_messages, add_generation_prompt=True)``;
  the completion text is ``template(prompt_messages + completion_messages)`` with that
  prompt text removed from its front. For ChatML templates (SmolLM2, Qwen2) the completion
  is therefore ``content + "<|im_end|>" + "\\n"``: the end-of-turn token *and* the newline
  the template writes after it. TRL's DPOTrainer scores exactly these tokens (its completion
  is ``full_ids[len(prompt_ids):]``), so we keep the newline too; the end-of-turn token is
  then the second-to-last completion token, and it is scored.
* Plain-text pairs: the prompt gets a BOS if the model wants one (``add_bos``); each
  completion gets the EOS id appended once (not twice if the text already ends with it).
* Conversational prompts get a BOS prepended only if the model wants one (``add_bos``) and
  the template did not write it (Llama 3 templates write ``{{ bos_token }}`` themselves;
  SmolLM2 and Qwen2 want none). transformers' ``apply_chat_template`` never adds one, so the
  two differ only for a model that wants a BOS whose template omits it.
* Prompt and completion are tokenised separately and concatenated, so chosen and rejected
  share identical prompt ids. A BOS is only ever put at the start of a prompt. (For
  SmolLM2 the BOS id is ``<|im_start|>``, which the template also writes at every turn, so a
  multi-message completion contains it as a turn marker.) On SmolLM2 and 230 real HH
  conversations this equals TRL's joint tokenisation ``full_ids[len(prompt_ids):]`` exactly
  (tests/test_tokenize.py).
* SmolLM2's GGUF says ``tokenizer.ggml.pre = "smollm"``: digits are isolated before the GPT-2
  regex, as in the model's own tokenizer.json and llama.cpp. transformers' GGUF loader (5.x)
  ignores this and tokenises e.g. ``"\n\n1."`` differently; the model itself gives the
  digit-isolating ids a higher likelihood, so prefopt follows the model.
* Truncation: a prompt longer than ``max_prompt_length`` keeps its end (and keeps the BOS
  we prepended, if any); each completion then keeps its first ``max_length - len(prompt)``
  tokens, independently of the other one. A pair left with a 0-token completion is dropped
  and counted, never scored.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

__all__ = [
    "ChatTokenizer",
    "PairIds",
    "EncodedPairs",
    "tokenizer_from_gguf",
    "tokenizer_from_gguf_file",
    "tokenizer_from_hf_dir",
    "load_tokenizer",
    "encode_pairs",
    "check_lengths",
    "DROP_PROMPT_FILLS_MAX_LENGTH",
    "DROP_EMPTY_COMPLETION",
]

# Reasons a pair is dropped before training (keys of EncodedPairs.dropped).
DROP_PROMPT_FILLS_MAX_LENGTH = "prompt_fills_max_length"
DROP_EMPTY_COMPLETION = "empty_completion"

# ---------------------------------------------------------------------------------------------
# Pre-tokenizer families (the values of tokenizer.ggml.pre), as llama.cpp defines them.

# Qwen2: contractions, letters with one optional leading non-letter, single digits, punctuation
# runs, newline runs, trailing whitespace. (Qwen2's own tokenizer.json spells the contractions
# with a case-insensitive group; the `tokenizers` Regex accepts that syntax.)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3: like Qwen2 but numbers in groups of up to three digits.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_PRE_FAMILIES = {
    # digits isolated first, then GPT-2's regex on what is left (SmolLM/SmolLM2, StarCoder).
    # This is what SmolLM2's own tokenizer.json declares (Digits(individual_digits) then
    # ByteLevel) and what llama.cpp does for "smollm".
    "smollm": "digits+gpt2",
    "starcoder": "digits+gpt2",
    "refact": "digits+gpt2",
    "gpt-2": "gpt2",
    "gpt2": "gpt2",
    "qwen2": "qwen2",
    "deepseek-r1-qwen": "qwen2",
    "llama-bpe": "llama3",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "smaug-bpe": "llama3",
}


def _pre_tokenizer(family: str):
    """(normalizer, pre_tokenizer, ignore_merges) for a pre-tokenizer family."""
    byte_level_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    byte_level_plain = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if family == "gpt2":
        return None, byte_level_regex, False
    if family == "digits+gpt2":
        return None, pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level_regex]), False
    if family == "qwen2":
        # Qwen2's tokenizer.json also normalises to NFC (llama.cpp does not; transformers does).
        return normalizers.NFC(), pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"), byte_level_plain]), False
    if family == "llama3":
        # Llama 3's tokenizer.json sets ignore_merges: a pre-token found whole in the
        # vocabulary is used as is.
        return None, pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), byte_level_plain]), True
    raise AssertionError(family)


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the spelling of byte-level BPE tokens)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# ---------------------------------------------------------------------------------------------
# Chat templates, rendered the way transformers renders them.

@lru_cache(maxsize=16)
def _compile_template(source: str):
    """Compile a chat template in the same jinja2 environment transformers uses."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: renders its body (transformers tracks
        assistant spans with it; prefopt finds completions by rendering instead)."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers replaces jinja's tojson (which HTML-escapes) by plain json.dumps
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not compile: {e} (line {e.lineno})") from e


def _plain(value: Any) -> Any:
    """A deep copy of message data as plain JSON types (what the template may see)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    raise TypeError(f"chat messages may only hold JSON data, got {type(value).__name__}")


def _check_messages(messages: Any, what: str) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{what}: expected a non-empty list of messages, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"{what}[{i}]: a message needs 'role' and 'content', got {m!r:.80}")
    return [_plain(m) for m in messages]


# ---------------------------------------------------------------------------------------------

@dataclass
class PairIds:
    """Token ids of one preference pair, ready to pack as [prompt | chosen | rejected].

    ``prompt_ids`` are shared by both completions; ``chosen_ids``/``rejected_ids`` are the
    completion tokens that get scored. ``*_truncated`` say whether truncation cut anything.
    """
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    id: str | None = None
    metadata: dict = field(default_factory=dict)
    prompt_truncated: bool = False
    chosen_truncated: bool = False
    rejected_truncated: bool = False

    @property
    def chosen_full(self) -> list[int]:
        return self.prompt_ids + self.chosen_ids

    @property
    def rejected_full(self) -> list[int]:
        return self.prompt_ids + self.rejected_ids


@dataclass
class EncodedPairs:
    """Result of :func:`encode_pairs`: the kept pairs and what was dropped, by reason."""
    pairs: list[PairIds]
    dropped: dict[str, int]
    dropped_ids: list[tuple[str | None, str]]

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())


def check_lengths(max_length: int | None, max_prompt_length: int | None) -> None:
    """Raise ValueError for length settings that leave no room for any completion token."""
    for name, v in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{name} must be an int or None, got {v!r}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length={max_length} leaves no room for a prompt and a completion")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length={max_prompt_length} must be at least 1")
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise ValueError(
            f"max_prompt_length={max_prompt_length} >= max_length={max_length}: "
            "no room for completions")


class ChatTokenizer:
    """A ``tokenizers.Tokenizer`` plus what a causal LM needs around it.

    Attributes: ``bos_id``, ``eos_id``, ``pad_id``, ``unk_id`` (ints or None), ``add_bos``
    (whether the model expects a BOS in front of plain text), ``chat_template`` (jinja source
    or None), ``vocab_size``.
    """

    def __init__(self, tokenizer: Tokenizer, *, bos_id: int | None, eos_id: int | None,
                 pad_id: int | None = None, unk_id: int | None = None, add_bos: bool = False,
                 chat_template: str | None = None, source: str = "?"):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        for name, v in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id), ("unk_id", unk_id)):
            if v is not None and not (0 <= v < self.vocab_size):
                raise ValueError(f"{source}: {name}={v} outside the vocabulary (size {self.vocab_size})")
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.unk_id = unk_id
        self.add_bos = bool(add_bos) and bos_id is not None
        self.chat_template = chat_template
        self.source = source

    def __repr__(self):
        return (f"ChatTokenizer({self.source!r}, vocab={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id}, add_bos={self.add_bos})")

    # -- plain tokens ---------------------------------------------------------------------
    def _token(self, i: int | None) -> str | None:
        return None if i is None else self.tokenizer.id_to_token(i)

    @property
    def bos_token(self) -> str | None:
        return self._token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return self._token(self.eos_id)

    @property
    def pad_token(self) -> str | None:
        return self._token(self.pad_id)

    @property
    def unk_token(self) -> str | None:
        return self._token(self.unk_id)

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        """Token ids of ``text``. Special-token text (e.g. ``<|im_end|>``) becomes its id, as
        in transformers. ``add_special=True`` prepends the BOS if the model wants one."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids outside the vocabulary (size {self.vocab_size}): {bad[:5]}")
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

    # -- chat template --------------------------------------------------------------------
    def render_chat(self, messages: Sequence[Mapping], add_generation_prompt: bool = False,
                    **kwargs) -> str:
        """The chat template rendered to text, with the variables transformers provides."""
        if not self.chat_template:
            raise ValueError(f"{self.source}: the tokenizer has no chat template; "
                             "conversational data needs one")
        import jinja2

        variables = dict(bos_token=self.bos_token, eos_token=self.eos_token,
                         unk_token=self.unk_token, pad_token=self.pad_token)
        variables.update(kwargs)
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        msgs = _check_messages(messages, "messages")
        try:
            return _compile_template(self.chat_template).render(
                messages=msgs, add_generation_prompt=bool(add_generation_prompt), **variables)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"{self.source}: chat template failed: {e}") from e

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = False,
                            tokenize: bool = True, **kwargs):
        """Like transformers' ``apply_chat_template``: token ids (no extra special tokens are
        added; the template writes its own) or, with ``tokenize=False``, the text."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special=False) if tokenize else text

    def split_chat(self, prompt: Sequence[Mapping], completion: Sequence[Mapping]) -> tuple[str, str]:
        """(prompt_text, completion_text) for a conversational pair half.

        prompt_text is the prompt rendered with the generation prompt; completion_text is what
        the template writes after it when the completion messages are added (content plus the
        end-of-turn marker and whatever the template puts after it)."""
        prompt = _check_messages(prompt, "prompt")
        completion = _check_messages(completion, "completion")
        prompt_text = self.render_chat(prompt, add_generation_prompt=True)
        full_text = self.render_chat(prompt + completion, add_generation_prompt=False)
        if not full_text.startswith(prompt_text):
            raise ValueError(
                f"{self.source}: the chat template does not render prompt+completion as the prompt "
                "(with its generation prompt) followed by the completion, so the completion cannot "
                f"be cut out. Prompt ends {prompt_text[-60:]!r}; full text there reads "
                f"{full_text[len(prompt_text) - 60:len(prompt_text) + 20]!r}")
        return prompt_text, full_text[len(prompt_text):]

    # -- pairs ----------------------------------------------------------------------------
    def _prompt_and_completions(self, prompt, chosen, rejected) -> tuple[list[int], list[int], list[int]]:
        if isinstance(prompt, str):
            for name, c in (("chosen", chosen), ("rejected", rejected)):
                if not isinstance(c, str):
                    raise ValueError(f"{name}: a text prompt needs a text completion, "
                                     f"got {type(c).__name__}")
            if self.eos_id is None:
                raise ValueError(f"{self.source}: no EOS token, cannot end plain-text completions")
            prompt_ids = self.encode(prompt, add_special=True)
            comps = []
            for c in (chosen, rejected):
                ids = self.encode(c)
                if ids[-1:] != [self.eos_id]:
                    ids.append(self.eos_id)
                comps.append(ids)
            return prompt_ids, comps[0], comps[1]
        prompt_text, chosen_text = self.split_chat(prompt, chosen)
        prompt_text2, rejected_text = self.split_chat(prompt, rejected)
        if prompt_text2 != prompt_text:  # a template looking ahead at the completion
            raise ValueError(f"{self.source}: the chat template renders the prompt differently "
                             "for chosen and rejected")
        prompt_ids = self.encode(prompt_text)
        if self.add_bos and prompt_ids[:1] != [self.bos_id]:
            prompt_ids = [self.bos_id] + prompt_ids
        return prompt_ids, self.encode(chosen_text), self.encode(rejected_text)

    def encode_pair(self, prompt, chosen, rejected, *, max_length: int | None = None,
                    max_prompt_length: int | None = None, id: str | None = None,
                    metadata: dict | None = None) -> tuple[PairIds | None, str | None]:
        """Encode one pair (design.md section 5). Returns ``(PairIds, None)``, or
        ``(None, reason)`` when the pair must be dropped (a completion would have 0 tokens).

        ``prompt`` is a string (then ``chosen``/``rejected`` are strings) or a list of messages
        (then ``chosen``/``rejected`` are lists of messages, normally one assistant message).
        Raises ValueError for settings with no room for completions."""
        check_lengths(max_length, max_prompt_length)
        prompt_ids, chosen_ids, rejected_ids = self._prompt_and_completions(prompt, chosen, rejected)
        if not chosen_ids or not rejected_ids:
            return None, DROP_EMPTY_COMPLETION
        prompt_truncated = False
        if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
            prompt_truncated = True
            if self.add_bos and prompt_ids[0] == self.bos_id:
                prompt_ids = [self.bos_id] + prompt_ids[len(prompt_ids) - (max_prompt_length - 1):]
            else:
                prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length:]
        truncated = [False, False]
        if max_length is not None:
            budget = max_length - len(prompt_ids)
            if budget <= 0:
                return None, DROP_PROMPT_FILLS_MAX_LENGTH
            if len(chosen_ids) > budget:
                chosen_ids, truncated[0] = chosen_ids[:budget], True
            if len(rejected_ids) > budget:
                rejected_ids, truncated[1] = rejected_ids[:budget], True
        return PairIds(prompt_ids, chosen_ids, rejected_ids, id=id, metadata=dict(metadata or {}),
                       prompt_truncated=prompt_truncated, chosen_truncated=truncated[0],
                       rejected_truncated=truncated[1]), None


def _get(rec, name, default=None):
    if isinstance(rec, Mapping):
        return rec.get(name, default)
    return getattr(rec, name, default)


def encode_pairs(tokenizer: ChatTokenizer, records: Iterable, *, max_length: int | None = None,
                 max_prompt_length: int | None = None) -> EncodedPairs:
    """Encode many pairs; drop and count those that cannot be scored.

    ``records`` are dicts or objects with ``prompt``, ``chosen``, ``rejected`` and optionally
    ``id`` and ``metadata`` (e.g. :class:`prefopt.data.PreferencePair`). Raises ValueError
    for length settings with no room for completions, or when every pair had to be dropped
    because its prompt fills ``max_length``."""
    check_lengths(max_length, max_prompt_length)
    kept, dropped, dropped_ids = [], {}, []
    n = 0
    for rec in records:
        n += 1
        prompt = _get(rec, "prompt")
        if prompt is None:
            raise ValueError(f"record {n}: no 'prompt' (implicit-prompt data must be split first: "
                             "see prefopt.data)")
        pair, reason = tokenizer.encode_pair(
            prompt, _get(rec, "chosen"), _get(rec, "rejected"), max_length=max_length,
            max_prompt_length=max_prompt_length, id=_get(rec, "id"), metadata=_get(rec, "metadata"))
        if pair is None:
            dropped[reason] = dropped.get(reason, 0) + 1
            dropped_ids.append((_get(rec, "id"), reason))
        else:
            kept.append(pair)
    if n and not kept and dropped.get(DROP_PROMPT_FILLS_MAX_LENGTH, 0):
        raise ValueError(f"max_length={max_length} leaves no room for completions: every one of "
                         f"the {n} prompts fills it (set max_prompt_length or raise max_length)")
    return EncodedPairs(kept, dropped, dropped_ids)


# ---------------------------------------------------------------------------------------------
# Builders

def _as_int(v, key, source):
    if v is None:
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: {key} should be an integer, got {v!r}") from None


def _as_str(v):
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8")
    return v


def tokenizer_from_gguf(metadata: Mapping[str, Any], source: str = "GGUF") -> ChatTokenizer:
    """Rebuild the tokenizer described by a GGUF file's ``tokenizer.*`` metadata.

    ``metadata`` maps GGUF keys to plain Python values (strings, ints, bools, lists), e.g.
    ``{k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}``.
    Supports ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE) with the pre-tokenizer
    families of ``tokenizer.ggml.pre``: smollm/starcoder/refact, gpt-2, qwen2, llama-bpe.
    Token type 3 (control) becomes a special added token, 4 (user-defined) a plain added
    token; both are matched whole in text.
    """
    def need(key):
        if key not in metadata:
            raise ValueError(f"{source}: metadata key {key!r} is missing")
        return metadata[key]

    kind = _as_str(need("tokenizer.ggml.model"))
    if kind != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model={kind!r} is not supported "
                         "(only 'gpt2', byte-level BPE)")
    pre = _as_str(metadata.get("tokenizer.ggml.pre"))
    if pre not in _PRE_FAMILIES:
        raise ValueError(f"{source}: tokenizer.ggml.pre={pre!r} is not supported; supported: "
                         f"{sorted(_PRE_FAMILIES)}")
    tokens = [_as_str(t) for t in need("tokenizer.ggml.tokens")]
    merges_raw = [_as_str(m) for m in need("tokenizer.ggml.merges")]
    types = metadata.get("tokenizer.ggml.token_type")
    types = [int(t) for t in types] if types is not None else [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{source}: {len(types)} token types for {len(tokens)} tokens")
    if not tokens:
        raise ValueError(f"{source}: empty vocabulary")

    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab: dict[str, int] = {}
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if not isinstance(tok, str) or tok == "":
            raise ValueError(f"{source}: token {i} is empty or not a string: {tok!r}")
        if ty not in (3, 4) and not set(tok) <= spelled:
            # a normal token written in raw text rather than the byte alphabet
            tok = "".join(alphabet[b] for b in tok.encode("utf-8"))
        if tok in vocab:
            raise ValueError(f"{source}: token {tok!r} appears twice (ids {vocab[tok]} and {i})")
        vocab[tok] = i
    merges = []
    for r, m in enumerate(merges_raw):
        cut = m.find(" ", 1) if isinstance(m, str) else -1
        if cut <= 0 or cut == len(m) - 1:
            raise ValueError(f"{source}: merge {r} is not 'left right': {m!r}")
        merges.append((m[:cut], m[cut + 1:]))

    normalizer, pre_tok, ignore_merges = _pre_tokenizer(_PRE_FAMILIES[pre])
    try:
        extra = {"ignore_merges": True} if ignore_merges else {}  # needs tokenizers >= 0.19
        bpe = models.BPE(vocab, merges, byte_fallback=False, unk_token=None, fuse_unk=False, **extra)
    except TypeError as e:
        raise ValueError(f"{source}: pre-tokenizer {pre!r} needs a newer 'tokenizers': {e}") from e
    except Exception as e:  # tokenizers raises its own Exception type for bad merges
        raise ValueError(f"{source}: vocabulary/merges rejected by tokenizers: {e}") from e
    tk = Tokenizer(bpe)
    if normalizer is not None:
        tk.normalizer = normalizer
    tk.pre_tokenizer = pre_tok
    tk.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4]
    if special:
        tk.add_special_tokens(special)
    if user:
        tk.add_tokens(user)
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (3, 4) and tk.token_to_id(t) != i:
            raise ValueError(f"{source}: added token {t!r} should have id {i}, got {tk.token_to_id(t)}")
    if tk.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(f"{source}: rebuilt vocabulary has {tk.get_vocab_size(True)} entries, "
                         f"expected {len(tokens)}")

    ids = {k: _as_int(metadata.get(f"tokenizer.ggml.{k}_token_id"), f"{k}_token_id", source)
           for k in ("bos", "eos", "padding", "unknown")}
    template = _as_str(metadata.get("tokenizer.chat_template"))
    # absent flag: no BOS (what transformers' GGUF loader assumes for byte-level BPE)
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
    return ChatTokenizer(tk, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["padding"],
                         unk_id=ids["unknown"], add_bos=add_bos, chat_template=template,
                         source=source)


def tokenizer_from_gguf_file(path: str | os.PathLike) -> ChatTokenizer:
    """:func:`tokenizer_from_gguf` on the metadata of a GGUF file (read with prefopt.gguf)."""
    from .gguf import read_gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with read_gguf(path) as g:
        metadata = {k: v for k, v in g.metadata.items() if k.startswith("tokenizer.")}
    return tokenizer_from_gguf(metadata, source=str(path))


def _token_content(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, Mapping):
        return v.get("content")
    if isinstance(v, str):
        return v
    raise ValueError(f"special token should be a string or {{'content': ...}}, got {v!r}")


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: bad JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d


def tokenizer_from_hf_dir(path: str | os.PathLike) -> ChatTokenizer:
    """The tokenizer of a Hugging Face model directory.

    Reads ``tokenizer.json`` (required), ``tokenizer_config.json`` (special tokens, chat
    template, ``add_bos_token``), ``chat_template.jinja`` (takes precedence, as in
    transformers), and ``generation_config.json`` / ``config.json`` for special ids that the
    tokenizer config does not name. Whether a BOS is added comes from ``add_bos_token`` when
    the config has it, otherwise from what the tokenizer's post-processor does."""
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: not a directory")
    tj = d / "tokenizer.json"
    if not tj.is_file():
        raise FileNotFoundError(f"{d}: no tokenizer.json")
    try:
        tk = Tokenizer.from_file(str(tj))
    except Exception as e:
        raise ValueError(f"{tj}: not a valid tokenizers file: {e}") from e
    cfg = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
    extra = {}
    for name in ("generation_config.json", "config.json"):
        if (d / name).is_file():
            for k, v in _read_json(d / name).items():
                extra.setdefault(k, v)

    def special_id(key):
        content = _token_content(cfg.get(f"{key}_token"))
        if content is not None:
            i = tk.token_to_id(content)
            if i is None:
                raise ValueError(f"{d}: {key}_token {content!r} is not in the vocabulary")
            return i
        v = extra.get(f"{key}_token_id")
        if isinstance(v, list):  # generation_config may list several EOS ids: the first is primary
            v = v[0] if v else None
        return _as_int(v, f"{key}_token_id", str(d))

    bos, eos, pad, unk = (special_id(k) for k in ("bos", "eos", "pad", "unk"))
    template = None
    if (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    else:
        t = cfg.get("chat_template")
        if isinstance(t, list):  # named templates: use "default"
            named = {x.get("name"): x.get("template") for x in t if isinstance(x, Mapping)}
            t = named.get("default")
        template = t
    if "add_bos_token" in cfg and cfg["add_bos_token"] is not None:
        add_bos = bool(cfg["add_bos_token"])
    else:
        probe = tk.encode("a", add_special_tokens=True).ids
        add_bos = bos is not None and probe[:1] == [bos] and tk.encode("a", add_special_tokens=False).ids[:1] != [bos]
    return ChatTokenizer(tk, bos_id=bos, eos_id=eos, pad_id=pad, unk_id=unk, add_bos=add_bos,
                         chat_template=template, source=str(d))


def load_tokenizer(path: str | os.PathLike) -> ChatTokenizer:
    """A GGUF file or a Hugging Face model directory -> :class:`ChatTokenizer`."""
    p = Path(path)
    if p.is_dir():
        return tokenizer_from_hf_dir(p)
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{p}: not a GGUF file (magic {magic!r}) and not a model directory")
        return tokenizer_from_gguf_file(p)
    raise FileNotFoundError(f"{p}: no such file or directory")
