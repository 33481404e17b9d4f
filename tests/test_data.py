"""Tests for align.data: rankings -> pairs, batching, JSONL loaders and their errors, HF loader."""
import json
import os
import re

import pytest

from align.data import (
    DataError,
    Pair,
    PreferenceGroup,
    batch_groups,
    count_pairs,
    group_from_pair,
    load_hf_preferences,
    load_preferences,
    load_prompts,
    load_sft,
    pairs_from_ranking,
    read_jsonl,
    split_hh,
)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def assert_where(err, path, line, field=None):
    msg = str(err.value)
    assert path.name in msg and f":{line}:" in msg, msg
    assert err.value.line == line
    if field is not None:
        assert f"field '{field}'" in msg, msg
        assert err.value.field == field


# ---------------------------------------------------------------- rankings -> pairs

def test_ranking_k4_gives_all_six_pairs():
    pairs = pairs_from_ranking([2, 0, 3, 1], 4)
    assert len(pairs) == 6 == 4 * 3 // 2
    got = {(p.winner, p.loser) for p in pairs}
    assert got == {(2, 0), (2, 3), (2, 1), (0, 3), (0, 1), (3, 1)}
    assert all(p.label == 1.0 and p.margin == 0.0 for p in pairs)


def test_ranking_with_tie():
    pairs = pairs_from_ranking([[0, 1], 2], 3)
    assert len(pairs) == 3
    ties = [p for p in pairs if p.label == 0.5]
    assert len(ties) == 1 and {ties[0].winner, ties[0].loser} == {0, 1}
    strict = {(p.winner, p.loser) for p in pairs if p.label == 1.0}
    assert strict == {(0, 2), (1, 2)}


def test_ranking_all_tied_and_mixed():
    assert [p.label for p in pairs_from_ranking([[0, 1, 2]], 3)] == [0.5] * 3
    pairs = pairs_from_ranking([[2, 0], 1, 3], 4)
    assert len(pairs) == 6 and sum(p.label == 0.5 for p in pairs) == 1


@pytest.mark.parametrize("ranking, k, expected", [
    ([0, 1, 5], 3, "index 5 at position 2 is out of range"),
    ([0, -1, 1], 3, "index -1 at position 1 is out of range"),
    ([0, [1, 0], 2], 3, "index 0 is repeated"),
    ([0, 2], 3, "index 1 is missing"),
    ([0, [], 1], 2, "empty tie group"),
    ([0, "1"], 2, "expected a candidate index"),
    ([0, True], 2, "expected a candidate index"),
    ("01", 2, "must be a list"),
])
def test_ranking_errors(ranking, k, expected):
    with pytest.raises(DataError, match=expected) as err:
        pairs_from_ranking(ranking, k, where=("prefs.jsonl", 7, "ranking"))
    assert str(err.value).startswith("prefs.jsonl:7: field 'ranking': ")


def test_data_error_format():
    assert str(DataError("bad", path="a.jsonl", line=3, field="x")) == "a.jsonl:3: field 'x': bad"
    assert str(DataError("no records", path="a.jsonl")) == "a.jsonl: no records"
    assert str(DataError("bad", field="x")) == "field 'x': bad"
    assert str(DataError("bad")) == "bad"
    assert isinstance(DataError("bad"), ValueError)


def test_pair_checks():
    with pytest.raises(DataError, match="strict pairs"):
        Pair(0, 1, label=0.5, margin=1.0)
    with pytest.raises(DataError, match="two different"):
        Pair(1, 1)
    with pytest.raises(DataError, match="points past"):
        PreferenceGroup("p", ["a", "b"], [Pair(0, 2)])
    g = group_from_pair("p", "a", "b", margin=2.0)
    assert g.candidates == ["a", "b"] and g.pairs == [Pair(0, 1, 1.0, 2.0)]
    assert group_from_pair("p", "a", "b", tie=True).pairs[0].label == 0.5


# ---------------------------------------------------------------- batching

def make_groups(sizes):
    """Groups with the given pair counts (a K-candidate full ranking has K(K-1)/2 pairs)."""
    groups = []
    for i, n in enumerate(sizes):
        k = {1: 2, 3: 3, 6: 4, 10: 5}[n]
        groups.append(PreferenceGroup(f"p{i}", [str(j) for j in range(k)],
                                      pairs_from_ranking(list(range(k)), k)))
    return groups


@pytest.mark.parametrize("shuffle", [False, True])
def test_batch_groups_never_splits_and_respects_max(shuffle):
    groups = make_groups([1, 3, 6, 1, 10, 3, 3, 1, 6, 1])
    batches = list(batch_groups(groups, 6, shuffle=shuffle, seed=1))
    seen = [g for b in batches for g in b]
    assert sorted(id(g) for g in seen) == sorted(id(g) for g in groups)  # each group once, whole
    for b in batches:
        assert count_pairs(b) <= 6 or len(b) == 1  # the 10-pair group stands alone
    assert [len(b) for b in batches if count_pairs(b) > 6] == [1]
    assert count_pairs(seen) == count_pairs(groups) == 35


def test_batch_groups_greedy_order_and_determinism():
    groups = make_groups([1, 3, 3, 1])
    assert [[g.prompt for g in b] for b in batch_groups(groups, 4)] == [["p0", "p1"], ["p2", "p3"]]
    many = make_groups([1, 3] * 10)
    a = [[g.prompt for g in b] for b in batch_groups(many, 5, shuffle=True, seed=3)]
    b = [[g.prompt for g in b] for b in batch_groups(many, 5, shuffle=True, seed=3)]
    c = [[g.prompt for g in b] for b in batch_groups(many, 5, shuffle=True, seed=4)]
    assert a == b and a != c
    assert [g.prompt for g in many][:2] == ["p0", "p1"]  # input left in order
    with pytest.raises(ValueError, match="max_pairs"):
        list(batch_groups(groups, 0))


# ---------------------------------------------------------------- JSONL preferences

GOOD = [
    {"prompt": "q1", "chosen": "good", "rejected": "bad"},
    {"prompt": "", "chosen": "a", "rejected": "b", "margin": 2},
    {"prompt": "q3", "chosen": "a", "rejected": "b", "tie": True, "margin": None},
    {"prompt": "q4", "completions": ["w", "x", "y", "z"], "ranking": [3, [0, 2], 1]},
]


def test_load_preferences_both_formats(tmp_path):
    groups = load_preferences(write_jsonl(tmp_path / "prefs.jsonl", GOOD))
    assert [len(g.pairs) for g in groups] == [1, 1, 1, 6]
    assert groups[0].candidates == ["good", "bad"] and groups[0].pairs == [Pair(0, 1)]
    assert groups[1].prompt == "" and groups[1].pairs[0].margin == 2.0
    assert groups[2].pairs[0].label == 0.5
    assert groups[3].candidates == ["w", "x", "y", "z"]
    assert sum(p.label == 0.5 for p in groups[3].pairs) == 1
    assert groups[3].source.endswith("prefs.jsonl:4")


def test_read_jsonl_line_numbers_skip_blanks(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n', encoding="utf-8")
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (4, {"a": 2})]


def test_malformed_json_line_3(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "chosen": "x", "rejected": "y"}\n'
                    '{"prompt": "b", "chosen": "x", "rejected": "y"}\n'
                    '{"prompt": "c", "chosen": "x",\n', encoding="utf-8")
    with pytest.raises(DataError, match="malformed JSON") as err:
        load_preferences(path)
    assert_where(err, path, 3)
    # the object's closing brace is missing at the end of the line: the column is the line's end, not "1"
    path.write_text('{"prompt": "c", "chosen": "x", "rejected": "y"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"malformed JSON: .*\(column 47\)"):
        load_preferences(path)


def test_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"prompt": "a", "chosen": "x", "rejected": "y"}\n["a", "b"]\n')
    with pytest.raises(DataError, match="expected a JSON object, got list") as err:
        list(read_jsonl(path))
    assert_where(err, path, 2)


BAD = [  # (record, field, message)
    ({"chosen": "x", "rejected": "y"}, "prompt", "missing"),
    ({"prompt": 3, "chosen": "x", "rejected": "y"}, "prompt", "expected a string or a list of messages, got int"),
    ({"prompt": "p", "chosen": "x"}, "rejected", "missing"),
    ({"prompt": "p", "chosen": ["x"], "rejected": "y"}, "chosen[0]", 'expected {"role": str, "content": str}'),
    ({"prompt": "p", "chosen": "  \n", "rejected": "y"}, "chosen", "empty"),
    ({"prompt": "p", "chosen": "x", "rejected": "x"}, "rejected", "identical candidates"),
    ({"prompt": "p", "chosen": "x", "rejected": "y", "margin": "1"}, "margin", "expected a number"),
    ({"prompt": "p", "chosen": "x", "rejected": "y", "margin": True}, "margin",
     "expected a number"),
    ({"prompt": "p", "chosen": "x", "rejected": "y", "margin": float("nan")}, "margin", "finite"),
    ({"prompt": "p", "chosen": "x", "rejected": "y", "margin": float("inf")}, "margin", "finite"),
    ({"prompt": "p", "chosen": "x", "rejected": "y", "margin": 1, "tie": True}, "margin", "tie"),
    ({"prompt": "p", "chosen": "x", "rejected": "y", "tie": "yes"}, "tie", "expected a bool"),
    ({"prompt": "p", "answer": "x"}, "chosen", "missing"),
    ({"prompt": "p", "completions": ["a", "b"]}, "ranking", "missing"),
    ({"prompt": "p", "completions": "ab", "ranking": [0, 1]}, "completions", "expected a list"),
    ({"prompt": "p", "completions": ["a"], "ranking": [0]}, "completions", "at least 2"),
    ({"prompt": "p", "ranking": [0, 1]}, "completions", "missing"),
    ({"prompt": "p", "completions": ["a", "b", ""], "ranking": [0, 1, 2]}, "completions[2]",
     "empty"),
    ({"prompt": "p", "completions": ["a", "b", "a"], "ranking": [0, 1, 2]}, "completions[2]",
     "duplicate of completions[0]"),
    ({"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 1, 3]}, "ranking",
     "out of range"),
    ({"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 1, 1]}, "ranking",
     "repeated"),
    ({"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 2]}, "ranking",
     "missing"),
    ({"prompt": "p", "completions": ["a", "b"], "ranking": [0, 1], "tie": True}, "tie",
     "only applies"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "ranking": [0, 1]}, "ranking", "not both"),
]


@pytest.mark.parametrize("record, field, message", BAD, ids=[f"{f}-{m}" for _, f, m in BAD])
def test_load_preferences_errors(tmp_path, record, field, message):
    # the bad record sits on line 3, after a good record and a blank line
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n\n" + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(message)) as err:
        load_preferences(path)
    assert_where(err, path, 3, field)


@pytest.mark.parametrize("record", [
    {"prompt": "q1", "chosen": "good", "rejected": "bad", "margin": 1.0},
    {"prompt": "q4", "completions": ["w", "x", "y", "z"], "ranking": [3, [0, 2], 1]},
    {"prompt": "q4", "completions": ["w", "x", "y", "z"], "ranking": [3, [0, 2], [1]]},
])
def test_duplicates(tmp_path, record):
    path = write_jsonl(tmp_path / "dup.jsonl", GOOD + [record])
    with pytest.raises(DataError, match="duplicate record: same as line (1|4)") as err:
        load_preferences(path)
    assert_where(err, path, 5)
    assert len(load_preferences(path, allow_duplicates=True)) == len(GOOD)


def test_same_prompt_different_candidates_is_not_a_duplicate(tmp_path):
    path = write_jsonl(tmp_path / "ok.jsonl", GOOD + [
        {"prompt": "q1", "chosen": "bad", "rejected": "good"},  # a disagreeing annotator
        {"prompt": "q4", "completions": ["w", "x", "y", "z"], "ranking": [0, 1, 2, 3]},
    ])
    assert len(load_preferences(path)) == len(GOOD) + 2


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="no records") as err:
        load_preferences(path)
    assert str(err.value) == f"{path}: no records"


def test_image_path_candidates(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / "imgs" / name).write_bytes(b"\x89PNG")
    data = tmp_path / "data"
    data.mkdir()
    path = write_jsonl(data / "prefs.jsonl", [
        {"prompt": "a cat", "chosen": "../imgs/a.png", "rejected": "../imgs/b.png"},
        {"prompt": "a dog", "images": ["../imgs/a.png", str(tmp_path / "imgs/c.png")],
         "ranking": [1, 0]},
    ])
    cwd = os.getcwd()
    os.chdir(tmp_path / "imgs")  # relative to the JSONL folder, not the working directory
    try:
        groups = load_preferences(path, candidates="path")
    finally:
        os.chdir(cwd)
    assert groups[0].candidates == [str(tmp_path / "imgs/a.png"), str(tmp_path / "imgs/b.png")]
    assert all(os.path.isabs(c) for g in groups for c in g.candidates)
    assert groups[1].pairs == [Pair(1, 0)]


def test_missing_image(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG")
    path = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "x", "images": ["a.png", "nope.png"], "ranking": [0, 1]},
    ])
    with pytest.raises(DataError, match="no such file: .*nope.png") as err:
        load_preferences(path, candidates="path")
    assert_where(err, path, 1, "images[1]")
    with pytest.raises(ValueError, match="'text' or 'path'"):
        load_preferences(path, candidates="image")


# ---------------------------------------------------------------- SFT and prompts

def test_load_sft(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "hi", "response": " there", "id": 1},
        {"prompt": "", "response": "once upon a time"},
    ])
    assert load_sft(path) == [{"prompt": "hi", "response": " there"},
                              {"prompt": "", "response": "once upon a time"}]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "response": "x"},
                                               {"prompt": "hi", "response": " "}])
    with pytest.raises(DataError, match="empty") as err:
        load_sft(bad)
    assert_where(err, bad, 2, "response")
    bad = write_jsonl(tmp_path / "bad2.jsonl", [{"response": "x"}])
    with pytest.raises(DataError, match="missing") as err:
        load_sft(bad)
    assert_where(err, bad, 1, "prompt")


def test_load_prompts(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a cat"}, {"prompt": "a dog"}])
    assert load_prompts(path) == ["a cat", "a dog"]
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n  a dog on a hill \r\n", encoding="utf-8")
    assert load_prompts(txt) == ["a cat", "  a dog on a hill "]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"text": "b"}])
    with pytest.raises(DataError, match="missing") as err:
        load_prompts(bad)
    assert_where(err, bad, 2, "prompt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        load_prompts(tmp_path / "empty.txt")


# ---------------------------------------------------------------- Hugging Face / Anthropic HH

def test_split_hh():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: Why did the"
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: No."
    prompt, c, r = split_hh(chosen, rejected)
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant:"
    assert (c, r) == (" Why did the", " No.")
    assert prompt + c == chosen and prompt + r == rejected
    # responses sharing a start: the cut stays at the assistant marker
    assert split_hh("\n\nHuman: q\n\nAssistant: It is", "\n\nHuman: q\n\nAssistant: It was")[1:] \
        == (" It is", " It was")
    with pytest.raises(DataError, match="share no"):
        split_hh("Human: a", "Human: b")


def test_split_hh_is_linear_in_the_conversation_length():
    """The shared prefix was found one character at a time in Python: 19 s of a 160k-row HH load (conversations of
    ~1.5k characters), 22.9 s in all; by slice comparisons (C memcmp) it takes milliseconds."""
    import random
    import time
    rng = random.Random(0)
    for _ in range(500):  # the common prefix's length, against a plain loop, on short random texts
        a, b = ("".join(rng.choice("ab") for _ in range(rng.randint(0, 9))) for _ in range(2))
        assert split_hh("\n\nAssistant:" + a, "\n\nAssistant:" + b) == ("\n\nAssistant:", a, b)
    turn = "\n\nHuman: " + "why is the sky blue? " * 5000 + "\n\nAssistant:"  # 100k characters shared
    start = time.perf_counter()
    for i in range(200):  # the character loop: ~1.2 s here (6 ms a pair)
        assert split_hh(turn + f" yes {i}", turn + f" no {i}")[0] == turn
    assert time.perf_counter() - start < 0.6


def test_hf_rows_are_read_in_batches(monkeypatch):
    """`datasets` formats a row read alone at ~70 µs (11 s of a 160k-row load): rows are read a batch at a time."""
    datasets = pytest.importorskip("datasets")

    def one_by_one(self):
        raise AssertionError("rows read one at a time")
    monkeypatch.setattr(datasets.Dataset, "__iter__", one_by_one)
    assert len(load_hf_preferences(hh_dataset())) == 3


def hh_dataset():
    datasets = pytest.importorskip("datasets")
    turn = "\n\nHuman: {q}\n\nAssistant:"
    return datasets.Dataset.from_dict({
        "chosen": [turn.format(q="2+2?") + " 4.", turn.format(q="Hi") + " Hello!",
                   turn.format(q="same") + " x", turn.format(q="empty") + " fine",
                   turn.format(q="x") + turn.format(q="y") + " yes", turn.format(q="2+2?") + " 4."],
        "rejected": [turn.format(q="2+2?") + " 5.", turn.format(q="Hi") + " Go away.",
                     turn.format(q="same") + " x", turn.format(q="empty") + " ",
                     turn.format(q="x") + turn.format(q="y") + " no", turn.format(q="2+2?") + " 5."],
    })


def test_load_hf_preferences_hh(caplog):
    with caplog.at_level("WARNING", logger="align.data.hf"):
        groups = load_hf_preferences(hh_dataset())
    assert len(groups) == 3  # identical and empty rows skipped, and the last row, a repeat of the first
    assert "1 row(s) with identical responses, 1 with an empty response and 1 repeating an earlier row" in caplog.text
    g = groups[0]
    assert g.prompt == "\n\nHuman: 2+2?\n\nAssistant:" and g.candidates == [" 4.", " 5."]
    assert g.pairs == [Pair(0, 1)]
    assert groups[2].prompt.count("Assistant:") == 2
    assert len(load_hf_preferences(hh_dataset(), limit=2)) == 2


def test_load_hf_preferences_prompt_field_and_errors():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"q": ["a", "b"], "good": ["x", "y"], "bad": ["z", "w"]})
    groups = load_hf_preferences(ds, prompt_field="q", chosen_field="good", rejected_field="bad")
    assert [(g.prompt, g.candidates) for g in groups] == [("a", ["x", "z"]), ("b", ["y", "w"])]
    with pytest.raises(DataError, match="no such column") as err:
        load_hf_preferences(ds)
    assert err.value.field == "chosen"
    ds = datasets.Dataset.from_dict({"chosen": ["\n\nHuman: a\n\nAssistant: b", "Human: a b"],
                                     "rejected": ["\n\nHuman: a\n\nAssistant: c", "Human: a c"]})
    with pytest.raises(DataError, match="share no") as err:
        load_hf_preferences(ds)
    assert err.value.line == 1 and err.value.field == "chosen"


def test_hf_dataset_without_the_hub_fails_in_seconds(tmp_path, monkeypatch):
    """`--data hf:Anthropic/hh-rlhf` on a machine without the hub waited out `datasets`' retries (26 s) while the
    models beside it failed in seconds: the hub probe now runs first and puts `datasets` in offline mode too."""
    import time

    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants as hub

    import align.runner
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "ds")
    monkeypatch.setattr(align.runner, "_HUB_OFFLINE", None)
    start = time.perf_counter()
    with pytest.raises(Exception):
        load_hf_preferences("org/hh-not-cached")
    assert datasets.config.HF_HUB_OFFLINE and time.perf_counter() - start < 10
