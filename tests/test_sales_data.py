"""Checks on the shipped sales preference set prefopt/data/sales_pairs.jsonl.

The file is hand-written data; these tests pin its shape (TRL conversational,
explicit prompt), its ids, slices and split, and the property the main job relies
on: the chosen reply is longer in some pairs and shorter in others.
"""
import collections
import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "prefopt" / "data" / "sales_pairs.jsonl"
SLICES = {"discovery", "objection_handling", "pricing", "closing"}
KEYS = {"id", "slice", "split", "prompt", "chosen", "rejected"}


@pytest.fixture(scope="module")
def rows():
    assert DATA.exists(), f"shipped preference set missing: {DATA}"
    out = []
    with DATA.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            assert line.strip(), f"{DATA.name}:{lineno}: empty line"
            out.append(json.loads(line))
    return out


def _words(messages):
    return len(messages[0]["content"].split())


def test_fields_and_roles(rows):
    for r in rows:
        where = r.get("id", "?")
        assert set(r) == KEYS, f"{where}: keys {sorted(r)}"
        assert r["slice"] in SLICES, f"{where}: slice {r['slice']!r}"
        assert r["split"] in {"train", "heldout"}, f"{where}: split {r['split']!r}"
        prompt = r["prompt"]
        roles = [m["role"] for m in prompt]
        if roles[0] == "system":
            roles = roles[1:]
        # user, assistant, user, ... ending on the customer's turn
        assert roles and len(roles) % 2 == 1, f"{where}: prompt roles {roles}"
        assert roles == ["user" if i % 2 == 0 else "assistant" for i in range(len(roles))], where
        for key in ("chosen", "rejected"):
            msgs = r[key]
            assert len(msgs) == 1 and msgs[0]["role"] == "assistant", f"{where}: {key}"
        for m in prompt + r["chosen"] + r["rejected"]:
            assert set(m) == {"role", "content"}, where
            assert isinstance(m["content"], str) and m["content"].strip(), f"{where}: empty content"
            assert m["content"] == m["content"].strip(), f"{where}: stray whitespace"
        assert r["chosen"][0]["content"] != r["rejected"][0]["content"], f"{where}: chosen == rejected"


def test_ids_unique_and_sequential(rows):
    ids = [r["id"] for r in rows]
    assert ids == [f"sales-{i:03d}" for i in range(1, len(rows) + 1)]


def test_counts_and_split(rows):
    assert len(rows) == 110
    split = collections.Counter(r["split"] for r in rows)
    assert split == {"train": 88, "heldout": 22}
    per_slice = collections.Counter(r["slice"] for r in rows)
    assert set(per_slice) == SLICES and min(per_slice.values()) >= 25, per_slice
    held = collections.Counter(r["slice"] for r in rows if r["split"] == "heldout")
    assert set(held) == SLICES and min(held.values()) >= 5, held


def test_length_direction_varies(rows):
    """Chosen is longer (in words) in about half the pairs, overall and held-out."""
    for split in ("train", "heldout"):
        sub = [r for r in rows if r["split"] == split]
        longer = sum(_words(r["chosen"]) > _words(r["rejected"]) for r in sub)
        shorter = sum(_words(r["chosen"]) < _words(r["rejected"]) for r in sub)
        assert longer + shorter == len(sub), f"{split}: equal-length pair"
        assert 0.4 <= longer / len(sub) <= 0.6, (split, longer, shorter)
    for s in SLICES:
        sub = [r for r in rows if r["slice"] == s]
        longer = sum(_words(r["chosen"]) > _words(r["rejected"]) for r in sub)
        assert 0.4 <= longer / len(sub) <= 0.6, (s, longer, len(sub))


def test_reply_and_prompt_sizes(rows):
    for r in rows:
        for key in ("chosen", "rejected"):
            n = _words(r[key])
            assert 15 <= n <= 120, f"{r['id']}: {key} has {n} words"
        prompt_words = sum(len(m["content"].split()) for m in r["prompt"])
        assert prompt_words <= 120, f"{r['id']}: prompt has {prompt_words} words"
