"""prefopt.tokenize against transformers on the real SmolLM2-135M-Instruct GGUF.

Reference tokenizers (independent of prefopt):

* ``hf_gguf``: transformers' own GGUF tokenizer, ``AutoTokenizer.from_pretrained(dir,
  gguf_file=name)``, unchanged.
* ``hf_ref``: the same, with its pre-tokenizer set to what SmolLM2's published
  ``tokenizer.json`` declares: ``Sequence[Digits(individual_digits=True), ByteLevel(...)]``.
  transformers' GGUF loader has no entry for ``tokenizer.ggml.pre = "smollm"`` and falls back
  to plain GPT-2 ByteLevel, which does not isolate digits; that changes ids around digits
  (``"\\n\\n1."`` -> ``Ċ Ċ 1 .`` instead of ``ĊĊ 1 .``). prefopt follows the model's own
  tokenizer (and llama.cpp's "smollm" rule), so exact comparisons use ``hf_ref``; the
  divergence from ``hf_gguf`` is checked to be only that digit rule.
"""
import gzip
import json
from pathlib import Path

import pytest

from prefopt import tokenize as T
from prefopt.data import load_pairs

TEXTS = [
    "Hello world",
    "The year 2024 had 365 days; pi is 3.14159 and 1,000,000 is a million.",
    "  leading spaces and trailing   ",
    "multiple   internal     spaces\tand\ttabs",
    "Windows\r\nline\r\nendings\r\n\r\n",
    "I'm sure they'll say it's fine, don't you think? We've seen it. I'd go. YOU'LL SEE",
    "Café naïve résumé façade Ångström",
    "你好，世界！这是一个测试。日本語のテキスト 한국어",
    "Emoji: 😀👍🏽🇺🇸 and ❤️ ok",
    "def foo(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "if (a != b && c >= 10) { printf(\"%d\\n\", a[3]); }",
    "\n\n1. First\n\n2. Second\n  3) third",
    "a  1  22 333 4444\n\n\n5",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text with <|endoftext|> inside and <file_sep> too",
    "unicode spaces:\u00a0nbsp\u2003em\u200bzwsp",
    "e\u0301 (combining) vs \u00e9 (precomposed)",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def gguf_file(smollm2_gguf):
    return Path(smollm2_gguf)


@pytest.fixture(scope="module")
def meta(gguf_file):
    from gguf import GGUFReader  # independent reader (the gguf package)

    r = GGUFReader(str(gguf_file))
    return {k: f.contents() for k, f in r.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def tok(meta):
    return T.tokenizer_from_gguf(meta)


@pytest.fixture(scope="module")
def hf_gguf(gguf_file):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)


@pytest.fixture(scope="module")
def hf_ref(hf_gguf):
    import copy

    from tokenizers import pre_tokenizers

    t = copy.deepcopy(hf_gguf)
    t.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    assert hf_gguf.backend_tokenizer.pre_tokenizer.__class__.__name__ == "ByteLevel"
    return t


def hf_chat_ids(hf, messages, gen):
    out = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ---------------------------------------------------------------------------------------------
# the model's facts ("verify" items of the reference notes)

def test_smollm2_special_tokens_and_template(tok, meta, hf_gguf):
    assert tok.vocab_size == 49152 == len(meta["tokenizer.ggml.tokens"])
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (hf_gguf.bos_token_id, hf_gguf.eos_token_id, hf_gguf.pad_token_id) == (1, 2, 2)
    assert tok.add_bos is False and meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.ggml.pre"] == "smollm"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                    "Hugging Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # an explicit system message replaces the default one
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
                                   tokenize=False)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


# ---------------------------------------------------------------------------------------------
# plain text

@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok, hf_ref, text):
    ids = tok.encode(text)
    assert ids == hf_ref(text, add_special_tokens=False)["input_ids"]
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == hf_ref.decode(ids)
    if "<|" not in text and "<file_sep>" not in text:
        assert tok.decode(ids) == text  # byte-level BPE is lossless


def test_specials_in_text_are_single_tokens(tok):
    assert tok.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]
    assert tok.encode("<|endoftext|>") == [0]


def test_divergence_from_transformers_gguf_is_only_the_digit_rule(tok, hf_gguf, hh_records):
    """transformers' GGUF tokenizer ignores "smollm"'s digit isolation; everywhere else the two
    agree exactly. Texts without digits must match transformers' unchanged GGUF tokenizer."""
    texts = TEXTS + [r[k] for r in hh_records[:300] for k in ("chosen", "rejected")]
    differing = 0
    for t in texts:
        ours, theirs = tok.encode(t), hf_gguf(t, add_special_tokens=False)["input_ids"]
        if ours != theirs:
            differing += 1
            assert any(c.isdigit() for c in t), f"differs without digits: {t[:80]!r}"
        if not any(c.isdigit() for c in t):
            assert ours == theirs
    assert tok.encode("\n\n1.") == [1116, 33, 30]  # "ĊĊ" "1" "." as SmolLM2's tokenizer.json splits it
    print(f"texts where transformers' GGUF tokenizer differs (all contain digits): {differing}/{len(texts)}")


# ---------------------------------------------------------------------------------------------
# chat template on real HH pairs

@pytest.fixture(scope="module")
def hh_chat(hh_path):
    pairs = load_pairs(hh_path, hh_to_chat=True, skip_invalid=True, limit=230)
    assert len(pairs) == 230
    return pairs


def test_hh_chat_ids_match_transformers(tok, hf_ref, hh_chat):
    """>= 200 HH pairs as conversations: prompt ids, prompt+completion ids and the completion
    split all identical to transformers' apply_chat_template(tokenize=True) (TRL's rule:
    completion = full[len(prompt):])."""
    checked = 0
    for p in hh_chat:
        hf_prompt = hf_chat_ids(hf_ref, p.prompt, gen=True)
        assert tok.apply_chat_template(p.prompt, add_generation_prompt=True) == hf_prompt, p.id
        assert tok.render_chat(p.prompt, add_generation_prompt=True) == hf_ref.apply_chat_template(
            p.prompt, add_generation_prompt=True, tokenize=False)
        pair, reason = tok.encode_pair(p.prompt, p.chosen, p.rejected)
        assert reason is None
        assert pair.prompt_ids == hf_prompt
        for completion, ids in ((p.chosen, pair.chosen_ids), (p.rejected, pair.rejected_ids)):
            hf_full = hf_chat_ids(hf_ref, p.prompt + completion, gen=False)
            assert hf_full[:len(hf_prompt)] == hf_prompt, p.id
            assert ids == hf_full[len(hf_prompt):], p.id
            assert tok.apply_chat_template(p.prompt + completion) == hf_full
            # completion = assistant text + <|im_end|> + "\n"; exactly one end-of-turn token
            assert ids[-2:] == [tok.eos_id, 198] and ids.count(tok.eos_id) == len(completion)
            assert tok.bos_id not in ids or len(completion) > 1
        checked += 1
    assert checked >= 200


def test_hh_chat_vs_unpatched_transformers(tok, hf_gguf, hh_chat):
    """With transformers' GGUF tokenizer as it is, pairs differ only where digits occur."""
    n_diff = 0
    for p in hh_chat[:200]:
        pair, _ = tok.encode_pair(p.prompt, p.chosen, p.rejected)
        full = pair.chosen_full
        hf_full = hf_chat_ids(hf_gguf, p.prompt + p.chosen, gen=False)
        if full != hf_full:
            n_diff += 1
            text = tok.render_chat(p.prompt + p.chosen)
            assert any(c.isdigit() for c in text)
    print(f"HH pairs (of 200) whose chosen ids differ from transformers' unpatched GGUF tokenizer: {n_diff}")


# ---------------------------------------------------------------------------------------------
# pair rules: BOS / EOS

def with_bos(meta, template=None):
    m = dict(meta)
    m["tokenizer.ggml.add_bos_token"] = True
    m["tokenizer.ggml.bos_token_id"] = 0  # <|endoftext|> as a BOS, to exercise the rules
    if template is not None:
        m["tokenizer.chat_template"] = template
    return T.tokenizer_from_gguf(m)


def test_plain_text_pair_no_bos_one_eos(tok):
    pair, reason = tok.encode_pair("\n\nHuman: hi\n\nAssistant:", " Hello there.", " Go away.")
    assert reason is None
    assert pair.prompt_ids == tok.encode("\n\nHuman: hi\n\nAssistant:")
    assert pair.prompt_ids[0] != tok.bos_id  # SmolLM2 does not want a BOS
    assert pair.chosen_ids == tok.encode(" Hello there.") + [tok.eos_id]
    assert pair.rejected_ids == tok.encode(" Go away.") + [tok.eos_id]
    # text already ending with the EOS text: not doubled
    pair, _ = tok.encode_pair("Q:", " A<|im_end|>", " B")
    assert pair.chosen_ids == tok.encode(" A") + [tok.eos_id]
    assert pair.chosen_ids.count(tok.eos_id) == 1


def test_plain_text_pair_with_bos_model(meta):
    t = with_bos(meta)
    assert t.add_bos and t.bos_id == 0
    pair, _ = t.encode_pair("Question:", " yes", " no")
    assert pair.prompt_ids == [0] + t.encode("Question:")
    assert 0 not in pair.chosen_ids and 0 not in pair.rejected_ids
    pair, _ = t.encode_pair("<|endoftext|>Question:", " yes", " no")  # BOS already there
    assert pair.prompt_ids.count(0) == 1 and pair.prompt_ids[0] == 0
    assert t.encode("x", add_special=True) == [0] + t.encode("x")


def test_chat_bos_exactly_once(meta):
    msgs = [{"role": "user", "content": "hi"}]
    good = [{"role": "assistant", "content": "Hello"}]
    bad = [{"role": "assistant", "content": "No"}]
    # template writes the BOS itself: not doubled
    t = with_bos(meta, "{{ bos_token }}" + meta["tokenizer.chat_template"])
    pair, _ = t.encode_pair(msgs, good, bad)
    assert pair.prompt_ids[0] == 0 and pair.prompt_ids.count(0) == 1
    # template does not: prepended once
    t = with_bos(meta)
    pair, _ = t.encode_pair(msgs, good, bad)
    assert pair.prompt_ids[0] == 0 and pair.prompt_ids.count(0) == 1
    assert 0 not in pair.chosen_ids + pair.rejected_ids


def test_chosen_and_rejected_share_prompt_ids(tok):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    pair, _ = tok.encode_pair(msgs, [{"role": "assistant", "content": "4"}],
                              [{"role": "assistant", "content": "\n\n5"}])
    assert pair.chosen_full[:len(pair.prompt_ids)] == pair.rejected_full[:len(pair.prompt_ids)]
    assert tok.decode(pair.rejected_ids) == "\n\n5<|im_end|>\n"


# ---------------------------------------------------------------------------------------------
# truncation and dropping

def test_truncation_independent_per_completion(tok):
    prompt = "Say something:"
    long, short = " " + "word " * 50, " ok"
    p_ids = tok.encode(prompt)
    pair, reason = tok.encode_pair(prompt, long, short, max_length=len(p_ids) + 10)
    assert reason is None
    assert pair.chosen_ids == (tok.encode(long) + [tok.eos_id])[:10] and pair.chosen_truncated
    assert pair.rejected_ids == tok.encode(short) + [tok.eos_id] and not pair.rejected_truncated
    assert len(pair.chosen_full) == len(p_ids) + 10


def test_prompt_keeps_its_end(tok, meta):
    prompt = " ".join(f"w{i}" for i in range(40))
    full = tok.encode(prompt)
    pair, _ = tok.encode_pair(prompt, " a", " b", max_prompt_length=7, max_length=20)
    assert pair.prompt_ids == full[-7:] and pair.prompt_truncated
    t = with_bos(meta)
    pair, _ = t.encode_pair(prompt, " a", " b", max_prompt_length=7, max_length=20)
    assert pair.prompt_ids == [0] + full[-6:]  # the BOS survives keep-end truncation


def test_zero_budget_pair_dropped_and_counted(tok):
    long_prompt = "x " * 30
    n = len(tok.encode(long_prompt))
    pair, reason = tok.encode_pair(long_prompt, " a", " b", max_length=n)
    assert pair is None and reason == T.DROP_PROMPT_FILLS_MAX_LENGTH
    records = [
        {"prompt": long_prompt, "chosen": " a", "rejected": " b", "id": "long"},
        {"prompt": "short", "chosen": " a", "rejected": " b", "id": "ok1"},
        {"prompt": "short too", "chosen": " yes" * 40, "rejected": " no", "id": "ok2"},
    ]
    res = T.encode_pairs(tok, records, max_length=n)
    assert [p.id for p in res.pairs] == ["ok1", "ok2"]
    assert res.dropped == {T.DROP_PROMPT_FILLS_MAX_LENGTH: 1} and res.n_dropped == 1
    assert res.dropped_ids == [("long", T.DROP_PROMPT_FILLS_MAX_LENGTH)]
    assert all(len(p.chosen_full) <= n and len(p.rejected_full) <= n for p in res.pairs)
    assert res.pairs[1].chosen_truncated and not res.pairs[1].rejected_truncated
    with pytest.raises(ValueError, match="no room for completions"):
        T.encode_pairs(tok, records[:1], max_length=n)


def test_empty_completion_dropped(meta):
    # a template that never writes assistant turns gives an empty completion
    t = T.tokenizer_from_gguf({**meta, "tokenizer.chat_template":
                               "{% for m in messages %}{% if m['role'] == 'user' %}U:{{ m['content'] }}\n"
                               "{% endif %}{% endfor %}"})
    msgs = [{"role": "user", "content": "hi"}]
    pair, reason = t.encode_pair(msgs, [{"role": "assistant", "content": "a"}],
                                 [{"role": "assistant", "content": "b"}])
    assert pair is None and reason == T.DROP_EMPTY_COMPLETION
    res = T.encode_pairs(t, [{"prompt": msgs, "chosen": [{"role": "assistant", "content": "a"}],
                              "rejected": [{"role": "assistant", "content": "b"}], "id": "e"}])
    assert res.pairs == [] and res.dropped == {T.DROP_EMPTY_COMPLETION: 1}


@pytest.mark.parametrize("kw, msg", [
    (dict(max_length=10, max_prompt_length=10), "no room for completions"),
    (dict(max_length=10, max_prompt_length=12), "no room for completions"),
    (dict(max_length=1), "no room"),
    (dict(max_length=0), "no room"),
    (dict(max_prompt_length=0), "at least 1"),
    (dict(max_length=10.5), "int"),
    (dict(max_length="10"), "int"),
])
def test_bad_length_settings(tok, kw, msg):
    with pytest.raises(ValueError, match=msg):
        tok.encode_pair("a", " b", " c", **kw)
    with pytest.raises(ValueError, match=msg):
        T.encode_pairs(tok, [], **kw)


def test_pair_shape_errors(tok):
    with pytest.raises(ValueError, match="text completion"):
        tok.encode_pair("prompt", [{"role": "assistant", "content": "x"}], " y")
    with pytest.raises(ValueError, match="role"):
        tok.encode_pair([{"content": "x"}], [{"role": "assistant", "content": "x"}],
                        [{"role": "assistant", "content": "y"}])
    with pytest.raises(ValueError, match="prompt"):
        T.encode_pairs(tok, [{"chosen": "a", "rejected": "b"}])


# ---------------------------------------------------------------------------------------------
# the jinja environment, compared with transformers' rendering of custom templates

CUSTOM_TEMPLATES = [
    # tojson must not HTML-escape; loop controls; namespace; trim/lstrip of blocks
    "{% set ns = namespace(n=0) %}\n{% for m in messages %}\n  {% if m['role'] == 'system' %}"
    "{% continue %}{% endif %}\n  {% set ns.n = ns.n + 1 %}\n{{ m['role'] | upper }}: "
    "{{ m['content'] | tojson }}\n{% endfor %}\n{{ ns.n }}{% if add_generation_prompt %}>>{% endif %}",
    "{{ bos_token }}{% for m in messages %}{{ m | tojson(indent=2) }}{% if loop.last %}{{ eos_token }}"
    "{% break %}{% endif %}{% endfor %}",
    "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}|{% endfor %}",
]


@pytest.mark.parametrize("template", CUSTOM_TEMPLATES)
def test_custom_templates_render_like_transformers(meta, hf_ref, template):
    t = T.tokenizer_from_gguf({**meta, "tokenizer.chat_template": template})
    msgs = [{"role": "system", "content": "sys <b>&'\"</b>"}, {"role": "user", "content": "é ü 中 <tag>"},
            {"role": "assistant", "content": "ok"}]
    for gen in (False, True):
        ours = t.render_chat(msgs, add_generation_prompt=gen)
        theirs = hf_ref.apply_chat_template(msgs, chat_template=template, add_generation_prompt=gen,
                                            tokenize=False)
        assert ours == theirs


def test_template_errors(meta):
    t = T.tokenizer_from_gguf({**meta, "tokenizer.chat_template":
                               "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}x"})
    with pytest.raises(ValueError, match="user first"):
        t.render_chat([{"role": "assistant", "content": "a"}])
    t = T.tokenizer_from_gguf({**meta, "tokenizer.chat_template": "{% for m in messages %}"})
    with pytest.raises(ValueError, match="does not compile"):
        t.render_chat([{"role": "user", "content": "a"}])
    t = T.tokenizer_from_gguf({k: v for k, v in meta.items() if k != "tokenizer.chat_template"})
    with pytest.raises(ValueError, match="no chat template"):
        t.render_chat([{"role": "user", "content": "a"}])
    # a template whose generation prompt is not a prefix of the rendered assistant turn
    t = T.tokenizer_from_gguf({**meta, "tokenizer.chat_template":
                               "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}ASSISTANT>{% endif %}"})
    with pytest.raises(ValueError, match="cannot be cut out"):
        t.encode_pair([{"role": "user", "content": "a"}], [{"role": "assistant", "content": "b"}],
                      [{"role": "assistant", "content": "c"}])


# ---------------------------------------------------------------------------------------------
# bad GGUF metadata

@pytest.mark.parametrize("change, msg", [
    ({"tokenizer.ggml.model": "llama"}, "not supported"),
    ({"tokenizer.ggml.pre": "falcon"}, "tokenizer.ggml.pre='falcon' is not supported"),
    ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.merges": ["Ġt"]}, "merge 0"),
    ({"tokenizer.ggml.token_type": [1, 1]}, "token types"),
    ({"tokenizer.ggml.eos_token_id": 49152}, "outside the vocabulary"),
    ({"tokenizer.ggml.bos_token_id": "one"}, "integer"),
])
def test_bad_gguf_metadata(meta, change, msg):
    m = dict(meta)
    for k, v in change.items():
        if v is None:
            del m[k]
        else:
            m[k] = v
    with pytest.raises(ValueError, match=msg):
        T.tokenizer_from_gguf(m)


def test_duplicate_token_rejected(meta):
    toks = list(meta["tokenizer.ggml.tokens"])
    toks[100] = toks[101]
    with pytest.raises(ValueError, match="appears twice"):
        T.tokenizer_from_gguf({**meta, "tokenizer.ggml.tokens": toks})


def test_load_tokenizer_paths(gguf_file, tmp_path, tok):
    t = T.load_tokenizer(gguf_file)  # through prefopt.gguf
    assert t.encode(TEXTS[1]) == tok.encode(TEXTS[1]) and t.chat_template == tok.chat_template
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"NOPE" + b"\0" * 20)
    with pytest.raises(ValueError, match="not a GGUF file"):
        T.load_tokenizer(bad)
    with pytest.raises(FileNotFoundError):
        T.load_tokenizer(tmp_path / "missing.gguf")


# ---------------------------------------------------------------------------------------------
# other pre-tokenizer families, against transformers' definitions

def test_qwen2_family_matches_transformers_qwen2_tokenizer(meta):
    from transformers import Qwen2Tokenizer

    t = T.tokenizer_from_gguf({**meta, "tokenizer.ggml.pre": "qwen2"})
    toks = meta["tokenizer.ggml.tokens"]
    ref = Qwen2Tokenizer(vocab={s: i for i, s in enumerate(toks)},
                         merges=[tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]])
    for text in TEXTS[:13] + ["e\u0301 vs \u00e9", "HELLO'S it'S", "a\r\n\r\nb  \n c 12345"]:
        assert t.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text


def test_llama3_family_splits_like_transformers(meta):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    t = T.tokenizer_from_gguf({**meta, "tokenizer.ggml.pre": "llama-bpe"})
    d = {"tokenizer_type": "gpt2", "pre_tokenizer_type": "llama-bpe",
         "tokens": meta["tokenizer.ggml.tokens"], "merges": meta["tokenizer.ggml.merges"],
         "token_type": meta["tokenizer.ggml.token_type"]}
    ref, _ = convert_gguf_tokenizer("llama", d)
    for text in TEXTS[:13]:
        assert (t.tokenizer.pre_tokenizer.pre_tokenize_str(text)
                == ref.pre_tokenizer.pre_tokenize_str(text)), text
    assert [s for s, _ in t.tokenizer.pre_tokenizer.pre_tokenize_str("12345")] == ["123", "45"]


# ---------------------------------------------------------------------------------------------
# Hugging Face directories

def test_hf_dir_matches_transformers(tmp_path, hf_ref, tok):
    from transformers import AutoTokenizer

    hf_ref.save_pretrained(tmp_path)
    t = T.tokenizer_from_hf_dir(tmp_path)
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (t.bos_id, t.eos_id, t.pad_id, t.add_bos) == (1, 2, 2, False)
    assert t.chat_template == tok.chat_template
    for text in TEXTS:
        assert t.encode(text) == again(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    msgs = [{"role": "user", "content": "Count: 1 2 3"}]
    assert t.apply_chat_template(msgs, add_generation_prompt=True) == hf_chat_ids(again, msgs, True)


def test_hf_dir_ids_from_configs(tmp_path, hf_ref):
    hf_ref.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    t = T.tokenizer_from_hf_dir(tmp_path)
    assert (t.bos_id, t.eos_id, t.pad_id) == (1, 0, 0)  # generation_config first; its first EOS
    assert t.chat_template is None and t.add_bos is False
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|im_end|>"}, "pad_token": "<|endoftext|>", "add_bos_token": True,
         "bos_token": "<|im_start|>", "chat_template": [{"name": "default", "template": "T"}]}))
    t = T.tokenizer_from_hf_dir(tmp_path)
    assert (t.bos_id, t.eos_id, t.pad_id, t.add_bos, t.chat_template) == (1, 2, 0, True, "T")
    (tmp_path / "chat_template.jinja").write_text("J")
    assert T.tokenizer_from_hf_dir(tmp_path).chat_template == "J"
    (tmp_path / "tokenizer_config.json").write_text("{bad json")
    with pytest.raises(ValueError, match="tokenizer_config.json: bad JSON at line 1"):
        T.tokenizer_from_hf_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        T.tokenizer_from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        T.tokenizer_from_hf_dir(tmp_path)


def test_synthetic_vocab_respelling_and_added_tokens():
    """A tiny vocabulary: the 256 byte symbols, a merge Ġ+b -> Ġb, a normal token stored in raw
    text ("a b": re-spelled "aĠb", as transformers' GGUF loader does), a control token and a
    user-defined token."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    alphabet = T._byte_alphabet()
    tokens = [alphabet[b] for b in range(256)] + ["Ġb", "a b", "<|eot|>", "<think>"]
    types = [1] * 258 + [3, 4]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": ["Ġ b"], "tokenizer.ggml.eos_token_id": 258}
    t = T.tokenizer_from_gguf(meta)
    ref, _ = convert_gguf_tokenizer("llama", {"tokenizer_type": "gpt2", "pre_tokenizer_type": "gpt-2",
                                              "tokens": tokens, "token_type": types,
                                              "merges": meta["tokenizer.ggml.merges"]})
    for text in ["a b", "a ba b<|eot|>x<think>y", "zz a bb"]:
        assert t.encode(text) == ref.encode(text, add_special_tokens=False).ids, text
    assert t.encode("a b") == [ord("a"), 256]
    assert t.tokenizer.token_to_id("aĠb") == 257 and t.decode([257]) == "a b"
    assert t.encode("x<|eot|>y<think>") == [ord("x"), 258, ord("y"), 259]
    assert t.decode([256, 258, 259], skip_special=True) == " b<think>"
    assert (t.bos_id, t.eos_id, t.pad_id, t.add_bos) == (None, 258, 258, False)


def test_model_prefers_the_digit_rule(gguf_file, tok):
    """Why prefopt isolates digits for "smollm": SmolLM2 itself (prefopt's C forward, which
    tests elsewhere check against transformers) gives the digit-isolating token ids a higher
    log-likelihood than the ids of transformers' GGUF tokenizer (plain GPT-2 ByteLevel)."""
    import copy

    import numpy as np
    from tokenizers import pre_tokenizers

    import prefopt
    from prefopt import batching

    prefopt.set_num_threads(1)
    model = prefopt.load(gguf_file)
    plain = copy.deepcopy(tok.tokenizer)
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    texts = ["Here are some ideas:\n\n1. Draw a circle.\n\n2. Paint it red.",
             "Steps:\n\n1) Open the box\n\n2) Take it out",
             "You could try these:\n\n1. Call a friend.",
             "The totals are  10 and  20 dollars.",
             "I have two answers:\n\n3 apples and 4 pears."]
    pairs = []
    for i, text in enumerate(texts):
        ours, theirs = tok.encode(text), plain.encode(text).ids
        assert ours != theirs and tok.decode(theirs) == text
        pairs.append(batching.as_token_pair({"prompt_ids": [tok.eos_id, 198], "chosen_ids": ours,
                                             "rejected_ids": theirs, "id": str(i)}))
    logp, _ = batching.score_pairs(model.core, pairs, 8, False)
    gain = logp[:, 0] - logp[:, 1]
    print("log-likelihood gain of the digit rule per text (nats):", np.round(gain, 2))
    assert np.all(gain > 1.0) and gain.sum() > 20.0


@pytest.mark.parametrize("chat", [False, True], ids=["text", "conversational"])
def test_matches_trl_dpo_preprocessing_and_truncation(hf_ref, tok, hh_path, tmp_path, chat):
    """TRL's own DPO pipeline (prompt extraction already done, EOS for text, tokenisation,
    dropping prompts that fill max_length, keep_start truncation in the collator) on 40 HH
    pairs gives the same prompt / chosen / rejected ids as encode_pairs."""
    import types

    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    pairs = load_pairs(hh_path, hh_to_chat=chat, skip_invalid=True, limit=40)
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    # full length
    args = DPOConfig(output_dir=str(tmp_path), max_length=None, report_to=[], bf16=False, use_cpu=True)
    ds = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=hf_ref), Dataset.from_list(rows),
                                     hf_ref, args, "hh")
    ours = T.encode_pairs(tok, pairs)
    assert len(ds) == len(ours.pairs) == 40
    for ex, mine in zip(ds, ours.pairs):
        assert (ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]) == (
            mine.prompt_ids, mine.chosen_ids, mine.rejected_ids)
    # truncated: TRL drops prompts >= max_length and cuts each row to max_length (keep_start)
    max_length = sorted(len(p.prompt_ids) for p in ours.pairs)[10] + 5
    args = DPOConfig(output_dir=str(tmp_path), max_length=max_length, report_to=[], bf16=False, use_cpu=True)
    ds = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=hf_ref), Dataset.from_list(rows),
                                     hf_ref, args, "hh")
    ours = T.encode_pairs(tok, pairs, max_length=max_length)
    assert len(ds) == len(ours.pairs) and ours.n_dropped == 40 - len(ds) > 0
    batch = DataCollatorForPreference(pad_token_id=tok.pad_id, max_length=max_length)([dict(e) for e in ds])
    n = len(ds)
    for i, mine in enumerate(ours.pairs):
        for j, (full, comp) in enumerate(((mine.chosen_full, mine.chosen_ids),
                                          (mine.rejected_full, mine.rejected_ids))):
            row = i + j * n
            length = int(batch["attention_mask"][row].sum())
            assert batch["input_ids"][row, :length].tolist() == full
            assert int(batch["completion_mask"][row].sum()) == len(comp)
    assert any(p.chosen_truncated or p.rejected_truncated for p in ours.pairs)
    assert isinstance(batch["input_ids"], torch.Tensor)
