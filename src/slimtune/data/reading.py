"""Read rows from JSONL, JSON, CSV and Parquet files, or from `datasets`-like objects in code.

Every row keeps where it came from ("train.jsonl, line 12") so that an error about it can say
so. Blank lines in JSONL are skipped but still counted, so line numbers match an editor's.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimtune.errors import SlimtuneError

SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}

# CSV cells are strings; these columns hold lists, so a cell that looks like JSON is parsed.
_JSON_COLUMNS = ("messages", "conversations")
# Preference columns hold text or chat turns: a cell is turns only if it parses as a JSON list
# of objects (an answer that merely starts with "[" stays text).
_MAYBE_TURN_COLUMNS = ("prompt", "chosen", "rejected")


@dataclass
class Record:
    """One row and where it came from."""

    row: Any
    where: str


class BadRow(SlimtuneError):
    """A row that cannot be used; the message names the file, the line or row, and the field."""


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a local JSONL, JSON, CSV or Parquet file, as dicts."""
    return [record.row for record in read_records(path)[0]]


def read_records(source: Any, *, skip_bad_rows: bool = False) -> tuple[list[Record], int]:
    """Records of a file path or an in-code data set, and how many unreadable rows were skipped.

    A row that is not an object (or a JSONL line that is not JSON) raises BadRow, or is
    skipped and counted when `skip_bad_rows`.
    """
    is_path = isinstance(source, (str, Path))
    records = _read_file(Path(source)) if is_path else _read_object(source)
    good, skipped = [], 0
    for record in records:
        problem = record.row if isinstance(record.row, BadRow) else None
        if problem is None and not isinstance(record.row, dict):
            kind = type(record.row).__name__
            problem = BadRow(f"{record.where}: expected an object (a dict of fields), got {kind}")
        if problem is None:
            good.append(record)
        elif skip_bad_rows:
            skipped += 1
        else:
            raise problem
    return good, skipped


def _read_file(path: Path) -> list[Record]:
    if not path.is_file():
        raise SlimtuneError(f"{path}: no such data file")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        known = ", ".join(sorted(SUFFIXES))
        raise SlimtuneError(f"{path}: unknown data file type {path.suffix!r} (expected {known})")
    return {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}[
        kind
    ](path)


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                row = BadRow(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
            records.append(Record(row, where))
    return records


def _read_json(path: Path) -> list[Record]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SlimtuneError(f"{path}, line {e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise SlimtuneError(f'{path}: expected a JSON array of rows or {{"data": [...]}}')
    return [Record(row, f"{path}, row {i}") for i, row in enumerate(data, start=1)]


def _read_csv(path: Path) -> list[Record]:
    records = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:  # reading the header; an empty file has none
            return []
        line = reader.line_num + 1  # the line a row starts on (a quoted cell may span several)
        for row in reader:
            where = f"{path}, line {line}"
            line = reader.line_num + 1
            if None in row:  # more cells than header columns
                records.append(Record(BadRow(f"{where}: more cells than columns"), where))
                continue
            records.append(Record(_parse_json_cells(row, where), where))
    return records


def _parse_json_cells(row: dict, where: str) -> dict | BadRow:
    for column in _JSON_COLUMNS:
        cell = row.get(column)
        if isinstance(cell, str) and cell.lstrip().startswith("["):
            try:
                row[column] = json.loads(cell)
            except json.JSONDecodeError as e:
                return BadRow(f"{where}: field {column!r}: invalid JSON in cell ({e.msg})")
    for column in _MAYBE_TURN_COLUMNS:
        cell = row.get(column)
        if isinstance(cell, str) and cell.lstrip().startswith("["):
            try:
                value = json.loads(cell)
            except json.JSONDecodeError:
                continue
            if isinstance(value, list) and value and all(isinstance(t, dict) for t in value):
                row[column] = value
    return row


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a broken file
        raise SlimtuneError(f"{path}: cannot read Parquet file ({e})") from None
    return [Record(row, f"{path}, row {i}") for i, row in enumerate(rows, start=1)]


def _read_object(data: Any) -> list[Record]:
    """A Hugging Face `datasets.Dataset`, a list of dicts, or any iterable of dicts."""
    if isinstance(data, dict):
        raise SlimtuneError(
            "data: got a dict; pass a split (e.g. dataset['train']) or a list of rows"
        )
    if hasattr(data, "to_list"):  # datasets.Dataset: one fast conversion
        data = data.to_list()
    if not isinstance(data, Iterable):
        raise SlimtuneError(f"data: expected a file path or an iterable of rows, got {type(data)}")
    name = type(data).__name__
    return [Record(row, f"{name} row {i}") for i, row in enumerate(data, start=1)]
