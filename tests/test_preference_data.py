"""Preference rows: every file type, the three row shapes, answer-only labels, bad rows."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import make_tokenizer, write_jsonl

from slimtune.data import IGNORE_INDEX, detect_format, load_dataset
from slimtune.data.preference import load_preference_dataset, to_pair
from slimtune.errors import SlimtuneError

TEXT_ROWS = [
    {"prompt": f"What is {i} + 1?", "chosen": f"The answer is {i + 1}.", "rejected": "hello"}
    for i in range(6)
]


def chat_rows() -> list[dict]:
    """Whole conversations that share their prompt turns (TRL's implicit-prompt shape)."""
    rows = []
    for i in range(4):
        prompt = [
            {"role": "system", "content": "Count."},
            {"role": "user", "content": f"What is {i} + 1?"},
        ]
        rows.append(
            {
                "chosen": prompt + [{"role": "assistant", "content": str(i + 1)}],
                "rejected": prompt + [{"role": "assistant", "content": "hello world"}],
            }
        )
    return rows


def write(path, rows):
    kind = path.suffix
    if kind == ".jsonl":
        write_jsonl(path, rows)
    elif kind == ".json":
        path.write_text(json.dumps(rows))
    elif kind == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow(
                    {k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()}
                )
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def answer_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != -100])


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
@pytest.mark.parametrize("rows", [TEXT_ROWS, chat_rows()], ids=["text", "chat"])
def test_every_file_type_reads_the_same_pairs(tmp_path, suffix, rows):
    tokenizer = make_tokenizer()
    reference = load_preference_dataset(rows, tokenizer)
    splits = load_preference_dataset(write(tmp_path / f"p{suffix}", rows), tokenizer)
    assert splits.train == reference.train and len(splits.train) == len(rows)
    assert detect_format(splits.train_rows[0]) == "preference"


def test_labels_cover_only_the_answer_and_its_end_of_turn():
    tokenizer = make_tokenizer()
    pair = load_preference_dataset(TEXT_ROWS[:1], tokenizer).train[0]
    chosen = answer_text(tokenizer, pair["chosen_input_ids"], pair["chosen_labels"])
    rejected = answer_text(tokenizer, pair["rejected_input_ids"], pair["rejected_labels"])
    assert chosen == "The answer is 1.<|im_end|>"
    assert rejected == "hello<|im_end|>"
    # The prompt is the same chat-templated text on both sides.
    n = pair["chosen_labels"].index(next(x for x in pair["chosen_labels"] if x != IGNORE_INDEX))
    assert pair["chosen_input_ids"][:n] == pair["rejected_input_ids"][:n]


def test_the_three_row_shapes_give_the_same_pair():
    tokenizer = make_tokenizer()
    implicit = chat_rows()[0]
    prompt = implicit["chosen"][:2]
    explicit = {"prompt": prompt, "chosen": implicit["chosen"][2:], "rejected": "hello world"}
    sharegpt = {
        "prompt": [
            {"from": "system", "value": "Count."},
            {"from": "human", "value": "What is 0 + 1?"},
        ],
        "chosen": [{"from": "gpt", "value": "1"}],
        "rejected": [{"from": "gpt", "value": "hello world"}],
    }
    encoded = [
        load_preference_dataset([r], tokenizer).train[0] for r in (implicit, explicit, sharegpt)
    ]
    assert encoded[0] == encoded[1] == encoded[2]
    assert to_pair(implicit).prompt == prompt


def test_an_earlier_assistant_turn_in_the_prompt_is_not_scored():
    tokenizer = make_tokenizer()
    prompt = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "count"},
    ]
    row = {"prompt": prompt, "chosen": "1 2 3", "rejected": "no"}
    pair = load_preference_dataset([row], tokenizer).train[0]
    assert answer_text(tokenizer, pair["chosen_input_ids"], pair["chosen_labels"]) == (
        "1 2 3<|im_end|>"
    )


def test_without_a_chat_template_the_prompt_is_plain_text():
    tokenizer = make_tokenizer(chat_template=None, eos="</s>")
    pair = load_preference_dataset(TEXT_ROWS[:1], tokenizer).train[0]
    assert tokenizer.decode(pair["chosen_input_ids"]) == "What is 0 + 1?The answer is 1.</s>"


def test_supervised_training_on_preference_rows_learns_the_chosen_answer():
    tokenizer = make_tokenizer()
    splits = load_dataset(TEXT_ROWS[:1], tokenizer)
    assert splits.fmt == "preference"
    example = splits.train[0]
    assert answer_text(tokenizer, example["input_ids"], example["labels"]) == (
        "The answer is 1.<|im_end|>"
    )


BAD = [
    ({"prompt": "hi", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "hi", "chosen": "a", "rejected": "a"}, "are the same answer"),
    (
        {"prompt": "hi", "chosen": "a", "rejected": 3},
        "field 'rejected': expected a string, got int",
    ),
    ({"prompt": "hi", "chosen": "", "rejected": "b"}, "field 'chosen' is empty"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    (
        {
            "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
            "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}],
        },
        "share no first turn",
    ),
    (
        {"prompt": "hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
        "no assistant turn",
    ),
    (
        {"prompt": [{"role": "robot", "content": "a"}], "chosen": "x", "rejected": "y"},
        "unknown role 'robot'",
    ),
]


@pytest.mark.parametrize(("row", "message"), BAD)
def test_bad_rows_name_the_file_line_and_field(tmp_path, row, message):
    path = write(tmp_path / "pairs.jsonl", [TEXT_ROWS[0], row])
    with pytest.raises(SlimtuneError, match=f"pairs.jsonl, line 2: .*{message}"):
        load_preference_dataset(path, make_tokenizer())
    skipped = load_preference_dataset(path, make_tokenizer(), skip_bad_rows=True)
    assert (len(skipped.train), skipped.skipped) == (1, 1)


def test_csv_answers_that_start_with_a_bracket_stay_text(tmp_path):
    rows = [{"prompt": "cite", "chosen": "[1] Smith", "rejected": "[not json"}]
    splits = load_preference_dataset(write(tmp_path / "p.csv", rows), make_tokenizer())
    assert to_pair(splits.train_rows[0]).chosen == "[1] Smith"


def test_eval_split_and_truncation():
    tokenizer = make_tokenizer()
    splits = load_preference_dataset(TEXT_ROWS, tokenizer, eval_fraction=0.34, seed=1)
    assert (len(splits.train), len(splits.eval)) == (4, 2)
    full = load_preference_dataset(TEXT_ROWS[:1], tokenizer).train[0]
    cut = len(full["chosen_input_ids"]) - 2  # the chosen answer is the longer one
    short = load_preference_dataset(TEXT_ROWS[:1], tokenizer, max_length=cut).train[0]
    assert short["chosen_input_ids"] == full["chosen_input_ids"][:cut]
    assert short["rejected_input_ids"] == full["rejected_input_ids"]
    with pytest.raises(SlimtuneError, match="no usable preference pairs"):
        load_preference_dataset(TEXT_ROWS, tokenizer, max_length=4)  # no answer token left
