"""From a file (or rows in code) to tokenized train and eval examples."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

from slimtune.data.encode import encode, trained_tokens
from slimtune.data.formats import check_format_name, detect_dataset_format, to_example
from slimtune.data.reading import BadRow, Record, read_records
from slimtune.data.render import MissingChatTemplate, render
from slimtune.errors import SlimtuneError

log = logging.getLogger(__name__)


@dataclass
class DatasetSplits:
    """Tokenized examples ({"input_ids", "labels"}) and what was left out.

    train_rows / eval_rows: the source rows of `train` / `eval`, in the same order (for
    generation-based evaluation with `split_prompt_answer`).
    skipped: bad rows skipped (skip_bad_rows=True); truncated: examples cut to max_length;
    dropped: examples with no trained token left after truncation (nothing to learn).
    """

    train: list[dict]
    eval: list[dict] = field(default_factory=list)
    train_rows: list[dict] = field(default_factory=list)
    eval_rows: list[dict] = field(default_factory=list)
    fmt: str = ""
    skipped: int = 0
    truncated: int = 0
    dropped: int = 0


def load_dataset(
    source: Any,
    tokenizer,
    *,
    fmt: str | None = None,
    max_length: int = 512,
    train_on_prompt: bool = False,
    skip_bad_rows: bool = False,
    eval_fraction: float = 0.0,
    eval_source: Any = None,
    seed: int = 0,
    chat: bool | None = None,
) -> DatasetSplits:
    """Read, check, render and tokenize a data set; split off an eval part.

    source / eval_source: a JSONL, JSON, CSV or Parquet path, or rows in code (a list of dicts,
    a `datasets.Dataset`). fmt: text | completion | alpaca | messages | sharegpt, detected from
    the columns when None. eval_fraction: the share of `source` held out for eval, chosen with
    `seed` (ignored when eval_source is given). chat: render through the tokenizer's chat
    template (default: when it has one). Bad rows raise SlimtuneError naming file, line and
    field, or with skip_bad_rows are skipped and counted in `skipped`.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise SlimtuneError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if max_length < 2:
        raise SlimtuneError(f"max_length must be at least 2, got {max_length}")
    options = dict(
        fmt=fmt,
        max_length=max_length,
        train_on_prompt=train_on_prompt,
        skip_bad_rows=skip_bad_rows,
        chat=chat,
    )
    splits = _load(source, tokenizer, **options)
    held_out = _load(eval_source, tokenizer, **options) if eval_source is not None else None
    return with_eval_split(splits, held_out, eval_fraction, seed)


def with_eval_split(splits, held_out, eval_fraction: float, seed: int):
    """`splits` with its eval part: all of `held_out` (a second file's splits) when given, else
    a seeded `eval_fraction` of its own training examples."""
    if held_out is not None:
        splits.eval, splits.eval_rows = held_out.train, held_out.train_rows
        splits.skipped += held_out.skipped
        splits.truncated += held_out.truncated
        splits.dropped += held_out.dropped
    elif eval_fraction > 0:
        pairs = list(zip(splits.train, splits.train_rows, strict=True))
        train_pairs, eval_pairs = split_examples(pairs, eval_fraction, seed)
        splits.train, splits.train_rows = [e for e, _ in train_pairs], [r for _, r in train_pairs]
        splits.eval, splits.eval_rows = [e for e, _ in eval_pairs], [r for _, r in eval_pairs]
    return splits


def split_examples(examples: list, eval_fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, eval): a seeded random `eval_fraction` of the examples (at least one) for eval.

    Both parts keep the file's order, so a split is reproducible and easy to inspect.
    """
    if len(examples) < 2:
        raise SlimtuneError(f"cannot split {len(examples)} example(s) into train and eval")
    n_eval = min(max(1, round(len(examples) * eval_fraction)), len(examples) - 1)
    held_out = set(random.Random(seed).sample(range(len(examples)), n_eval))
    train = [e for i, e in enumerate(examples) if i not in held_out]
    return train, [e for i, e in enumerate(examples) if i in held_out]


def _load(source, tokenizer, *, fmt, max_length, train_on_prompt, skip_bad_rows, chat):
    records, skipped = read_records(source, skip_bad_rows=skip_bad_rows)
    if not records:
        raise SlimtuneError(f"{_name(source)}: no rows")
    fmt = check_format_name(fmt) if fmt else detect_dataset_format([r.row for r in records])
    splits = DatasetSplits(train=[], fmt=fmt, skipped=skipped)
    for record in records:
        try:
            example = _encode_record(record, tokenizer, fmt, max_length, train_on_prompt, chat)
        except BadRow:
            if not skip_bad_rows:
                raise
            splits.skipped += 1
            continue
        if example["truncated"]:
            splits.truncated += 1
        if trained_tokens(example) == 0:
            splits.dropped += 1
            continue
        del example["truncated"]
        splits.train.append(example)
        splits.train_rows.append(record.row)
    if not splits.train:
        raise SlimtuneError(f"{_name(source)}: no usable rows (skipped {splits.skipped})")
    if splits.skipped or splits.dropped:
        message = "%s: skipped %d bad rows; dropped %d with no answer left within %d tokens"
        log.warning(message, _name(source), splits.skipped, splits.dropped, max_length)
    return splits


def _encode_record(record: Record, tokenizer, fmt, max_length, train_on_prompt, chat) -> dict:
    example = to_example(record.row, fmt, record.where)
    try:
        rendered = render(example, tokenizer, chat=chat, train_on_prompt=train_on_prompt)
    except BadRow as e:
        raise BadRow(f"{record.where}: {e}") from None
    except MissingChatTemplate as e:
        raise SlimtuneError(f"{record.where}: {e}") from None
    encoded = encode(rendered, tokenizer)
    truncated = len(encoded["input_ids"]) > max_length
    return {
        "input_ids": encoded["input_ids"][:max_length],
        "labels": encoded["labels"][:max_length],
        "truncated": truncated,
    }


def _name(source) -> str:
    return str(source) if isinstance(source, str) or hasattr(source, "__fspath__") else "data"
