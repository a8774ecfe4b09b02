"""load_dataset end to end: every kind of bad row, skipping, truncation, train/eval splits."""

from __future__ import annotations

import pytest
from helpers import make_tokenizer, write_jsonl

from slimtune.data import IGNORE_INDEX, load_dataset, split_examples
from slimtune.errors import SlimtuneError


def chat(question: str, answer) -> dict:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


GOOD = [chat(f"What is {i} + 1?", str(i + 1)) for i in range(20)]

# (bad row, fmt forced or None, the message must mention)
BAD_ROWS = [
    ({"messages": [{"role": "user", "content": "hi"}]}, None, "no assistant turn"),
    (
        {"messages": [{"role": "user", "content": "hi"}, {"content": "x"}]},
        None,
        r"'messages\[1\]\.role'",
    ),
    (chat("hi", 42), None, r"field 'messages\[1\].content': expected a string, got int"),
    (chat("hi", "  "), None, r"field 'messages\[1\].content': empty answer"),
    ({"messages": [{"role": "bot", "content": "x"}]}, None, "unknown role 'bot'"),
    ({"messages": "hello"}, None, "field 'messages': expected a non-empty list"),
    ({"prompt": "hi"}, "completion", "missing field 'completion'"),
    ({"prompt": "hi", "completion": ""}, "completion", "field 'completion': empty answer"),
    (
        {"prompt": ["hi"], "completion": "x"},
        "completion",
        "field 'prompt': expected a string, got list",
    ),
    (
        {"instruction": "hi", "input": 3, "output": "x"},
        "alpaca",
        "field 'input': expected a string",
    ),
    ({"text": ""}, "text", "field 'text' is empty"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "sharegpt", "unknown role 'robot'"),
    (
        {"conversations": [{"from": "human"}]},
        "sharegpt",
        r"missing field 'conversations\[0\].value'",
    ),
    ({"question": "hi"}, None, "missing field 'messages'"),
]


@pytest.mark.parametrize("bad, fmt, message", BAD_ROWS)
def test_bad_row_names_file_line_and_field(tmp_path, bad, fmt, message):
    rows = GOOD[:3] + [bad] + GOOD[3:5]
    if fmt not in (None, "messages"):  # a data set of that format around the bad row
        rows = [bad, bad]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    line = rows.index(bad) + 1
    with pytest.raises(SlimtuneError, match=rf"d\.jsonl, line {line}: .*{message}"):
        load_dataset(path, make_tokenizer(), fmt=fmt)


def test_skip_bad_rows_counts_them(tmp_path):
    bad = [row for row, fmt, _ in BAD_ROWS if fmt is None]
    rows = GOOD[:10] + bad + ["not an object"] + GOOD[10:]
    splits = load_dataset(
        write_jsonl(tmp_path / "d.jsonl", rows), make_tokenizer(), skip_bad_rows=True
    )
    assert splits.skipped == len(bad) + 1
    assert len(splits.train) == len(GOOD)
    assert splits.fmt == "messages"


def test_format_override_reads_columns_of_that_format(tmp_path):
    rows = [{"text": "hello world", "prompt": "hello", "completion": " world"}]
    tokenizer = make_tokenizer(chat_template=None, eos="</s>")
    as_text = load_dataset(rows, tokenizer, fmt="text").train[0]
    as_completion = load_dataset(rows, tokenizer, fmt="completion").train[0]
    assert as_text["input_ids"] == as_completion["input_ids"]
    assert as_text["labels"] == as_text["input_ids"]
    assert as_completion["labels"][0] == IGNORE_INDEX
    with pytest.raises(SlimtuneError, match="unknown data format 'chatml'"):
        load_dataset(rows, tokenizer, fmt="chatml")


def test_truncation_cuts_and_drops_rows_with_no_answer_left():
    long_prompt = chat("What is " + "1 + " * 40 + "1?", "41")
    tokenizer = make_tokenizer()
    splits = load_dataset([GOOD[0], long_prompt], tokenizer, max_length=24)
    assert splits.truncated == 1 and splits.dropped == 1
    assert len(splits.train) == 1 and len(splits.train[0]["input_ids"]) == 22
    cut = load_dataset([GOOD[0]], tokenizer, max_length=12, train_on_prompt=True).train[0]
    assert len(cut["input_ids"]) == 12 and cut["labels"] == cut["input_ids"]


def test_eval_fraction_is_seeded_disjoint_and_ordered():
    tokenizer = make_tokenizer()
    a = load_dataset(GOOD, tokenizer, eval_fraction=0.25, seed=1)
    b = load_dataset(GOOD, tokenizer, eval_fraction=0.25, seed=1)
    c = load_dataset(GOOD, tokenizer, eval_fraction=0.25, seed=2)
    assert (len(a.train), len(a.eval)) == (15, 5)
    assert a.eval == b.eval and a.train == b.train
    assert a.eval != c.eval
    everything = load_dataset(GOOD, tokenizer).train
    assert sorted(map(str, a.train + a.eval)) == sorted(map(str, everything))
    assert a.train == [e for e in everything if e not in a.eval]  # file order kept
    # The source rows travel with their examples, for generation-based evaluation.
    assert len(a.eval_rows) == 5 and all(row in GOOD for row in a.eval_rows)
    assert a.eval == load_dataset(a.eval_rows, tokenizer).train
    assert a.train_rows == [row for row in GOOD if row not in a.eval_rows]


def test_split_examples_keeps_at_least_one_on_each_side():
    assert [len(part) for part in split_examples(list(range(3)), 0.01)] == [2, 1]
    assert [len(part) for part in split_examples(list(range(3)), 0.99)] == [1, 2]
    with pytest.raises(SlimtuneError, match="cannot split"):
        split_examples([1], 0.5)


def test_separate_eval_file(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", GOOD[:15])
    held_out = write_jsonl(tmp_path / "eval.jsonl", GOOD[15:])
    splits = load_dataset(train, make_tokenizer(), eval_source=held_out, eval_fraction=0.5)
    assert (len(splits.train), len(splits.eval)) == (15, 5)
    assert splits.eval == load_dataset(held_out, make_tokenizer()).train
    assert splits.eval_rows == GOOD[15:] and splits.train_rows == GOOD[:15]


def test_options_checked():
    with pytest.raises(SlimtuneError, match="eval_fraction"):
        load_dataset(GOOD, make_tokenizer(), eval_fraction=1.0)
    with pytest.raises(SlimtuneError, match="no rows"):
        load_dataset([], make_tokenizer())
