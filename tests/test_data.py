"""prefopt.data: every record shape, every file format, every malformed-input path, the split."""
import gzip
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from prefopt.data import (HH_ASSISTANT, PreferencePair, hh_to_messages, load_pairs, split_pairs,
                          to_conversational)

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
S = lambda c: {"role": "system", "content": c}  # noqa: E731

RECORDS = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "id": "std", "slice": "colour",
     "tags": ["easy"]},
    {"prompt": [S("Be brief."), U("Price?")], "chosen": [A("$10.")], "rejected": [A("Expensive.")],
     "slice": "pricing", "extra": {"k": 1}},
    {"chosen": "\n\nHuman: hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: hi\n\nAssistant: Go away."},
    {"chosen": [U("hi"), A("Hello!")], "rejected": [U("hi"), A("Go away.")], "split": "test"},
]


def write(path: Path, records, kind):
    if kind == "jsonl":
        text = "".join(json.dumps(r) + "\n" for r in records)
    else:  # one record per line inside an array, so record k starts on line k + 2
        text = "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def same_content(a: PreferencePair, b: PreferencePair):
    return (a.prompt, a.chosen, a.rejected, a.metadata) == (b.prompt, b.chosen, b.rejected, b.metadata)


# ---------------------------------------------------------------------------------------------
# shapes

def test_shapes():
    pairs = load_pairs(RECORDS)
    std, conv, hh, conv_implicit = pairs
    assert (std.prompt, std.chosen, std.rejected) == ("The sky is", " blue.", " green.")
    assert std.id == "std" and std.slice == "colour" and std.metadata["tags"] == ["easy"]
    assert not std.conversational and conv.conversational
    assert conv.prompt == [S("Be brief."), U("Price?")] and conv.chosen == [A("$10.")]
    assert conv.id == "item-1" and conv.metadata == {"slice": "pricing", "extra": {"k": 1}}
    # implicit text: prompt ends with the last common "\n\nAssistant:", completions keep their space
    assert hh.prompt == "\n\nHuman: hi\n\nAssistant:" and hh.prompt.endswith(HH_ASSISTANT)
    assert (hh.chosen, hh.rejected) == (" Hello!", " Go away.")
    # implicit conversation: common message prefix
    assert conv_implicit.prompt == [U("hi")]
    assert (conv_implicit.chosen, conv_implicit.rejected) == ([A("Hello!")], [A("Go away.")])
    assert conv_implicit.split == "heldout"  # "test" normalised
    assert [p.source for p in pairs] == [f"<list>[{i}]" for i in range(4)]


def test_implicit_text_cut_rules():
    # the shared text runs into the answer ("Sure" vs "Surely"): cut back to the turn boundary
    p = load_pairs([{"chosen": "\n\nHuman: q\n\nAssistant: Sure thing",
                     "rejected": "\n\nHuman: q\n\nAssistant: Surely not"}])[0]
    assert (p.prompt, p.chosen, p.rejected) == ("\n\nHuman: q\n\nAssistant:", " Sure thing", " Surely not")
    # multi-turn, difference in the last turn: everything before it is prompt
    c = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: yes"
    p = load_pairs([{"chosen": c, "rejected": c[:-3] + "no"}])[0]
    assert p.prompt == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:" and p.chosen == " yes"
    # difference in an earlier turn: the later turns belong to the completion
    p = load_pairs([{"chosen": "\n\nHuman: a\n\nAssistant: b1\n\nHuman: c\n\nAssistant: d",
                     "rejected": "\n\nHuman: a\n\nAssistant: b2\n\nHuman: c\n\nAssistant: d"}])[0]
    assert p.prompt == "\n\nHuman: a\n\nAssistant:" and p.chosen == " b1\n\nHuman: c\n\nAssistant: d"
    # one a prefix of the other
    p = load_pairs([{"chosen": "\n\nHuman: q\n\nAssistant: Yes", "rejected": "\n\nHuman: q\n\nAssistant: Yes, but"}])[0]
    assert (p.chosen, p.rejected) == (" Yes", " Yes, but")
    # plain text without markers: cut at the last whitespace of the common prefix
    p = load_pairs([{"chosen": "The sky is blue.", "rejected": "The sky is bright green."}])[0]
    assert (p.prompt, p.chosen, p.rejected) == ("The sky is", " blue.", " bright green.")


def test_implicit_conversation_cut_back_to_assistant_turn():
    chosen = [S("s"), U("a"), A("b"), U("c"), A("d1")]
    rejected = [S("s"), U("a"), A("b"), U("c"), A("d2")]
    p = load_pairs([{"chosen": chosen, "rejected": rejected}])[0]
    assert p.prompt == chosen[:4] and p.chosen == [A("d1")] and p.rejected == [A("d2")]
    # the conversations differ at an assistant turn in the middle: completion spans turns
    chosen = [U("a"), A("b1"), U("c"), A("d")]
    rejected = [U("a"), A("b2"), U("c"), A("d")]
    p = load_pairs([{"chosen": chosen, "rejected": rejected}])[0]
    assert p.prompt == [U("a")] and p.chosen == chosen[1:] and p.rejected == rejected[1:]


def test_hh_to_messages_and_conversion():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant:"
    assert hh_to_messages(text) == [U("Hi there"), A("Hello."), U("How are you?")]
    p = load_pairs([{"chosen": text + " Fine, thanks.", "rejected": text + " Leave me alone."}],
                   hh_to_chat=True)[0]
    assert p.prompt == [U("Hi there"), A("Hello."), U("How are you?")]
    assert p.chosen == [A("Fine, thanks.")] and p.rejected == [A("Leave me alone.")]
    q = to_conversational(load_pairs([{"chosen": text + " A", "rejected": text + " B"}])[0])
    assert q.prompt == p.prompt and q.chosen == [A("A")]
    assert to_conversational(q) is q
    with pytest.raises(ValueError, match="not HH text"):
        to_conversational(load_pairs([{"prompt": "plain", "chosen": " a", "rejected": " b"}])[0])


def test_real_hh_file(hh_path, hh_records):
    """2312 rows; 4 have an empty chosen or rejected reply after the shared prompt."""
    expected_bad = []
    for n, r in enumerate(hh_records, start=1):  # independent check with plain string ops
        c, j = r["chosen"], r["rejected"]
        k = os.path.commonprefix([c, j]).rfind("\n\nAssistant:") + len("\n\nAssistant:")
        if not c[k:].strip() or not j[k:].strip():
            expected_bad.append(n)
    assert len(expected_bad) == 4
    with pytest.raises(ValueError, match=rf"{hh_path.name}:{expected_bad[0]}: field '(chosen|rejected)'"):
        load_pairs(hh_path)
    pairs = load_pairs(hh_path, skip_invalid=True)
    assert len(pairs) == len(hh_records) - 4
    assert [int(w.rsplit(":", 1)[1]) for w, _ in pairs.skipped] == expected_bad
    assert all(p.prompt.endswith(HH_ASSISTANT) and p.chosen.startswith(" ") for p in pairs)
    for p in pairs[:50]:  # prompt + completion gives back the original text
        r = hh_records[int(p.id.split("-")[1]) - 1]
        assert p.prompt + p.chosen == r["chosen"] and p.prompt + p.rejected == r["rejected"]
    chat = load_pairs(hh_path, skip_invalid=True, hh_to_chat=True)
    assert len(chat) == len(pairs)
    assert all(p.prompt[-1]["role"] == "user" and p.chosen[0]["role"] == "assistant" for p in chat)
    assert all(p.prompt[0]["role"] == "user" for p in chat)
    # HH has a few non-alternating rows (two Assistant turns in a row); they are kept as given
    roles = [[m["role"] for m in p.prompt + p.chosen] for p in chat]
    assert sum(any(a == b for a, b in zip(r, r[1:])) for r in roles) > 0


# ---------------------------------------------------------------------------------------------
# file formats

@pytest.mark.parametrize("name, kind", [("d.jsonl", "jsonl"), ("d.json", "json"),
                                        ("d.jsonl.gz", "jsonl"), ("d.json.gz", "json"),
                                        ("d.txt", "jsonl"), ("d.data", "json")])
def test_file_formats_agree(tmp_path, name, kind):
    path = write(tmp_path / name, RECORDS, kind)
    pairs = load_pairs(path)
    ref = load_pairs(RECORDS)
    assert len(pairs) == len(ref)
    assert all(same_content(a, b) for a, b in zip(pairs, ref))
    first_line = 1 if kind == "jsonl" else 2
    assert pairs[1].id == f"line-{first_line + 1}"  # generated from the line number
    assert pairs[0].id == "std"
    assert pairs[2].source == f"{path}:{first_line + 2}"
    assert load_pairs(str(path))[3].id == pairs[3].id  # str paths, stable ids


def test_blank_lines_and_limit(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n" + json.dumps(RECORDS[0]) + "\n\n" + json.dumps(RECORDS[2]) + "\n")
    pairs = load_pairs(p)
    assert [x.source.rsplit(":", 1)[1] for x in pairs] == ["2", "4"]
    assert len(load_pairs(p, limit=1)) == 1


def test_empty_inputs(tmp_path):
    assert load_pairs([]) == []
    (tmp_path / "e.json").write_text("[ ]")
    assert load_pairs(tmp_path / "e.json") == []
    (tmp_path / "e.jsonl").write_text("")
    assert load_pairs(tmp_path / "e.jsonl") == []


# ---------------------------------------------------------------------------------------------
# malformed input: file, line and field named

GOOD = json.dumps(RECORDS[0])

BAD_RECORDS = [
    ({"prompt": "p", "rejected": "r"}, "missing field 'chosen'"),
    ({"prompt": "p", "chosen": "c"}, "missing field 'rejected'"),
    ({"prompt": "p", "chosen": "", "rejected": "r"}, "field 'chosen' is empty"),
    ({"prompt": "  ", "chosen": "c", "rejected": "r"}, "field 'prompt' is empty"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "field 'chosen' should be a string, got int"),
    ({"prompt": 3, "chosen": "c", "rejected": "r"}, "field 'prompt' should be a string or a list"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
    ({"chosen": "same", "rejected": "same"}, "identical"),
    ({"chosen": "abc", "rejected": "xyz"}, "share no prompt"),
    ({"chosen": "Yes sir", "rejected": "Yesterday"}, "share no prompt"),
    ({"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": "\n\nHuman: q\n\nAssistant: B"},
     "field 'chosen' has an empty completion"),
    ({"chosen": "a b", "rejected": [A("x")]}, "field 'rejected' should be a string"),
    ({"chosen": 1, "rejected": 2}, "should be strings or lists of messages"),
    ({"prompt": [U("q")], "chosen": [U("c")], "rejected": [A("r")]}, r"field 'chosen\[0\].role' should be 'assistant'"),
    ({"prompt": [U("q")], "chosen": [A("c"), U("more")], "rejected": [A("r")]}, r"chosen\[1\].role' should be 'assistant'"),
    ({"prompt": [U("q"), A("a")], "chosen": [A("c")], "rejected": [A("r")]}, r"prompt\[1\].role'.*ends with an assistant"),
    ({"prompt": [U("q"), S("s")], "chosen": [A("c")], "rejected": [A("r")]}, r"prompt\[1\].role'.*system message may only come first"),
    ({"prompt": [{"role": "robot", "content": "q"}], "chosen": [A("c")], "rejected": [A("r")]}, r"prompt\[0\].role'.*unknown role 'robot'"),
    ({"prompt": [{"role": "user"}], "chosen": [A("c")], "rejected": [A("r")]}, r"field 'prompt\[0\]' has no 'content'"),
    ({"prompt": [{"content": "q"}], "chosen": [A("c")], "rejected": [A("r")]}, r"field 'prompt\[0\]' has no 'role'"),
    ({"prompt": [U(5)], "chosen": [A("c")], "rejected": [A("r")]}, r"prompt\[0\].content' should be a string"),
    ({"prompt": ["hi"], "chosen": [A("c")], "rejected": [A("r")]}, r"field 'prompt\[0\]' should be a \{role, content\} object"),
    ({"prompt": [], "chosen": [A("c")], "rejected": [A("r")]}, "field 'prompt' is an empty list"),
    ({"prompt": [U("q")], "chosen": "c", "rejected": [A("r")]}, "field 'chosen' should be a list of messages"),
    ({"prompt": [U("q")], "chosen": [A(" ")], "rejected": [A("r")]}, r"chosen\[0\].content' is empty"),
    ({"prompt": [U("q")], "chosen": [A("c")], "rejected": [A("c")]}, "identical"),
    ({"chosen": [U("q"), A("c")], "rejected": [U("q"), U("r")]}, r"rejected\[1\].role' should be 'assistant'"),
    ({"chosen": [U("q1"), A("c")], "rejected": [U("q2"), A("r")]}, "share no prompt messages"),
    ({"chosen": [U("q"), A("c")], "rejected": [U("q"), A("")]}, r"rejected\[1\].content' is empty"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "slice": 3}, "field 'slice' should be a string"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "tags": [1]}, "field 'tags'"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "split": "dev2"}, "field 'split'"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "id": ""}, "field 'id' is empty"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "id": [1]}, "field 'id' should be"),
    ([1, 2], "record should be a JSON object"),
]


@pytest.mark.parametrize("record, msg", BAD_RECORDS)
def test_malformed_record_names_line_and_field(tmp_path, record, msg):
    path = tmp_path / "bad.jsonl"
    path.write_text(GOOD + "\n" + GOOD.replace('"std"', '"std2"') + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:3: .*{msg}"):
        load_pairs(path)
    with pytest.raises(ValueError, match=rf"<list>\[1\]: .*{msg}"):
        load_pairs([RECORDS[0], record])
    kept = load_pairs([RECORDS[0], record], skip_invalid=True)
    assert len(kept) == 1 and kept.skipped[0][0] == "<list>[1]"


@pytest.mark.parametrize("text, line, msg", [
    (GOOD + "\n" + "{not json\n", 2, "bad JSON"),
    (GOOD + "\n" + GOOD + "\n", 2, "duplicate id 'std'"),
    (GOOD + "\n" + '{"prompt": "p", "chosen": "c"' + "\n", 2, "bad JSON"),
])
def test_malformed_jsonl_lines(tmp_path, text, line, msg):
    path = tmp_path / "x.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"x.jsonl:{line}: .*{msg}"):
        load_pairs(path)


@pytest.mark.parametrize("text, line, msg", [
    ('{"prompt": "p"}', 1, "must hold an array"),
    ("[\n" + GOOD + ",\n{broken}\n]", 3, "bad JSON"),
    ("[\n" + GOOD + "\n" + GOOD + "\n]", 3, "expected ',' or ']'"),
    ("[\n" + GOOD + "\n] trailing", 3, "unexpected text after"),
    ("[\n" + GOOD + ",\n" + json.dumps({"prompt": "p", "chosen": "c"}) + "\n]", 3, "missing field 'rejected'"),
])
def test_malformed_json_files(tmp_path, text, line, msg):
    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"x.json:{line}: .*{msg}"):
        load_pairs(path)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "x.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="x.jsonl.gz: not a readable gzip file"):
        load_pairs(tmp_path / "x.jsonl.gz")
    (tmp_path / "y.jsonl").write_bytes(GOOD.encode() + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match="y.jsonl:2: not valid UTF-8"):
        load_pairs(tmp_path / "y.jsonl")
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as f:
        f.write(GOOD + "\n{oops\n")
    with pytest.raises(ValueError, match="z.jsonl.gz:2: bad JSON"):
        load_pairs(tmp_path / "z.jsonl.gz")
    with pytest.raises(TypeError, match="path or a list"):
        load_pairs(42)


def test_hh_conversion_errors():
    with pytest.raises(ValueError, match="should start with"):
        load_pairs([{"prompt": "Intro\n\nHuman: q\n\nAssistant:", "chosen": " a", "rejected": " b"}],
                   hh_to_chat=True)
    with pytest.raises(ValueError, match=r"<list>\[0\]: field 'prompt': an empty user turn"):
        load_pairs([{"chosen": "\n\nHuman:\n\nAssistant: a", "rejected": "\n\nHuman:\n\nAssistant: b"}],
                   hh_to_chat=True)


# ---------------------------------------------------------------------------------------------
# split

def make_pairs(n, slices=("a", "b", "c")):
    return load_pairs([{"prompt": f"p{i}", "chosen": " c", "rejected": " r", "id": f"id{i}",
                        "slice": slices[i % len(slices)]} for i in range(n)])


def test_split_deterministic_and_seeded():
    pairs = make_pairs(100)
    tr, he = split_pairs(pairs, heldout=0.2, seed=7)
    assert len(tr) == 80 and len(he) == 20
    assert {p.id for p in tr}.isdisjoint({p.id for p in he})
    assert [p.id for p in tr + he] != [] and sorted(p.id for p in tr + he) == sorted(p.id for p in pairs)
    tr2, he2 = split_pairs(list(reversed(pairs)), heldout=0.2, seed=7)
    assert {p.id for p in he2} == {p.id for p in he}  # order of the input does not matter
    _, he3 = split_pairs(pairs, heldout=0.2, seed=8)
    assert {p.id for p in he3} != {p.id for p in he}
    # the rule, recomputed here: the 20 smallest sha256(seed \0 id)
    expect = sorted(pairs, key=lambda p: hashlib.sha256(f"7\x00{p.id}".encode()).hexdigest())[:20]
    assert {p.id for p in he} == {p.id for p in expect}
    # the input order is kept inside each part
    assert [p.id for p in he] == [p.id for p in pairs if p.id in {q.id for q in he}]
    _, he_n = split_pairs(pairs, heldout=13, seed=7)
    assert len(he_n) == 13 and {p.id for p in he_n} <= {p.id for p in he} | {p.id for p in he_n}


def test_split_stable_across_interpreters(tmp_path):
    """Same split in fresh interpreters with different hash seeds."""
    code = ("import json,sys; from prefopt.data import load_pairs, split_pairs;"
            "ps = load_pairs([{'prompt': f'p{i}', 'chosen': ' c', 'rejected': ' r', 'id': f'id{i}'} for i in range(50)]);"
            "print(json.dumps([p.id for p in split_pairs(ps, heldout=0.3, seed=3)[1]]))")
    outs = set()
    for hs in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=hs, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                capture_output=True, text=True).stdout)
    assert len(outs) == 1
    pairs = make_pairs(50)
    local = split_pairs(load_pairs([{"prompt": f"p{i}", "chosen": " c", "rejected": " r", "id": f"id{i}"}
                                    for i in range(50)]), heldout=0.3, seed=3)[1]
    assert json.loads(outs.pop()) == [p.id for p in local] and len(pairs) == 50


def test_split_stratified():
    pairs = make_pairs(90, slices=("a", "a", "b", "c", "c", "c"))  # a:30, b:15, c:45
    _, he = split_pairs(pairs, heldout=0.2, seed=1, stratify=True)
    assert len(he) == 18
    assert Counter(p.slice for p in he) == Counter({"a": 6, "b": 3, "c": 9})
    _, he2 = split_pairs(pairs, heldout=7, seed=1, stratify=True)
    counts = Counter(p.slice for p in he2)
    assert sum(counts.values()) == 7 and counts["c"] >= counts["a"] >= counts["b"]


def test_split_fixed_ids_and_split_field():
    pairs = make_pairs(10)
    tr, he = split_pairs(pairs, heldout_ids=["id3", "id1"])
    assert [p.id for p in he] == ["id1", "id3"] and len(tr) == 8
    with pytest.raises(ValueError, match="not in the data: \\['nope'\\]"):
        split_pairs(pairs, heldout_ids=["id1", "nope"])
    recs = [{"prompt": f"p{i}", "chosen": " c", "rejected": " r", "id": f"id{i}",
             **({"split": "heldout"} if i in (0, 1) else {"split": "train"} if i == 2 else {})}
            for i in range(12)]
    ps = load_pairs(recs)
    tr, he = split_pairs(ps, heldout=3, seed=0)
    ids = {p.id for p in he}
    assert {"id0", "id1"} <= ids and "id2" not in ids and len(he) == 5  # 2 fixed + 3 of the 9 free
    tr, he = split_pairs(ps, heldout=0, seed=0)
    assert {p.id for p in he} == {"id0", "id1"}
    tr, he = split_pairs(ps, heldout=0, use_split_field=False)
    assert he == []


@pytest.mark.parametrize("kw, msg", [(dict(heldout=1.5), "outside"), (dict(heldout=-1), "cannot hold out"),
                                     (dict(heldout=11), "cannot hold out"), (dict(heldout="x"), "count or a fraction")])
def test_split_bad_settings(kw, msg):
    with pytest.raises(ValueError, match=msg):
        split_pairs(make_pairs(10), **kw)


def test_split_duplicate_ids():
    p = make_pairs(3)
    with pytest.raises(ValueError, match="not unique"):
        split_pairs([p[0], p[1], p[0]])
