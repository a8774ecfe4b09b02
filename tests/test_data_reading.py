"""Reading JSONL, JSON, CSV, Parquet and in-code data sets; format detection."""

from __future__ import annotations

import json

import pytest

from slimtune.data import detect_format, read_rows
from slimtune.data.reading import read_records
from slimtune.errors import SlimtuneError

ROWS = [
    {"prompt": "1 + 1 =", "completion": " 2"},
    {"prompt": "2 + 2 =", "completion": " 4"},
]


def test_jsonl_rows_and_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    records, skipped = read_records(path)
    assert [r.row for r in records] == ROWS
    assert [r.where for r in records] == [f"{path}, line 1", f"{path}, line 3"]
    assert skipped == 0


def test_jsonl_invalid_line_named_or_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n" + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(SlimtuneError, match=r"d\.jsonl, line 2: invalid JSON"):
        read_rows(path)
    records, skipped = read_records(path, skip_bad_rows=True)
    assert [r.row for r in records] == ROWS and skipped == 1


@pytest.mark.parametrize("wrap", [lambda rows: rows, lambda rows: {"data": rows}])
def test_json_array_or_data_key(tmp_path, wrap):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(wrap(ROWS), indent=2))
    assert read_rows(path) == ROWS


def test_json_row_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ROWS[0], "oops"]))
    with pytest.raises(SlimtuneError, match=r"d\.json, row 2: expected an object.*got str"):
        read_rows(path)


def test_csv_rows_line_numbers_and_json_cells(tmp_path):
    path = tmp_path / "d.csv"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    cell = json.dumps(messages).replace('"', '""')
    # Row 1 has a quoted cell spanning two lines, so row 2 starts on line 4.
    path.write_text(f'prompt,completion,messages\n"a\nb",c,\nd,e,"{cell}"\n')
    records, _ = read_records(path)
    assert records[0].row == {"prompt": "a\nb", "completion": "c", "messages": ""}
    assert records[1].row["messages"] == messages
    assert [r.where for r in records] == [f"{path}, line 2", f"{path}, line 4"]


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    pq.write_table(pa.Table.from_pylist([{"messages": chat}, {"messages": chat[::-1]}]), path)
    records, _ = read_records(path)
    assert records[1].row == {"messages": chat[::-1]}
    assert records[1].where == f"{path}, row 2"


def test_in_code_datasets_like_objects_and_iterables():
    class FakeDataset:  # what a datasets.Dataset offers
        def to_list(self):
            return list(ROWS)

    assert [r.row for r in read_records(FakeDataset())[0]] == ROWS
    assert [r.row for r in read_records(iter(ROWS))[0]] == ROWS
    assert read_records(ROWS)[0][1].where == "list row 2"
    with pytest.raises(SlimtuneError, match="pass a split"):
        read_records({"train": ROWS})


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(SlimtuneError, match="no such data file"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("hi")
    with pytest.raises(SlimtuneError, match=r"unknown data file type '\.txt'"):
        read_rows(tmp_path / "d.txt")


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"text": "x"}, "text"),
        ({"prompt": "x", "completion": "y"}, "completion"),
        ({"instruction": "x", "input": "", "output": "y"}, "alpaca"),
        ({"messages": [], "text": "x"}, "messages"),
        ({"conversations": []}, "sharegpt"),
    ],
)
def test_detect_format_from_columns(row, fmt):
    assert detect_format(row) == fmt


def test_detect_format_names_the_columns_it_saw():
    with pytest.raises(SlimtuneError, match=r"\['answer', 'question'\]"):
        detect_format({"question": "x", "answer": "y"})
