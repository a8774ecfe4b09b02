"""Preference pairs: one prompt, a chosen and a rejected answer, for DPO and ORPO.

Rows come in the shapes TRL's preference data sets use (checked by formats.to_pair):

    {"prompt": "...", "chosen": "...", "rejected": "..."}                       plain text
    {"prompt": [turns...], "chosen": [assistant turn(s)], "rejected": [...]}    chat, explicit prompt
    {"chosen": [whole conversation], "rejected": [whole conversation]}          chat, shared prefix

Turns are OpenAI-style ({"role", "content"}) or ShareGPT-style ({"from", "value"}). Without a
`prompt`, the prompt is the longest run of turns both conversations share. A string prompt with
chat answers (or the other way round) is one user (or assistant) turn.

Each side is rendered exactly as supervised training renders a row (chat template when the
tokenizer has one; see render.py) and labelled on its answer only: the assistant turns after
the prompt, with the end-of-turn token. A pair becomes
{"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from slimtune.data.dataset import DatasetSplits, with_eval_split
from slimtune.data.encode import encode, trained_tokens
from slimtune.data.formats import SIDES, PreferencePair, to_pair
from slimtune.data.reading import BadRow, read_records
from slimtune.data.render import Rendered, render
from slimtune.errors import SlimtuneError
from slimtune.tokens import has_chat_template

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------- encoding


def encode_pair(
    pair: PreferencePair, tokenizer, max_length: int, chat: bool | None = None
) -> tuple[dict, bool]:
    """The tokenized pair ({side}_input_ids / {side}_labels) and whether a side was cut."""
    encoded, truncated = {}, False
    for side in SIDES:
        rendered = _answer_only(pair, side, tokenizer, chat)
        tokens = encode(rendered, tokenizer)
        truncated |= len(tokens["input_ids"]) > max_length
        encoded[f"{side}_input_ids"] = tokens["input_ids"][:max_length]
        encoded[f"{side}_labels"] = tokens["labels"][:max_length]
    return encoded, truncated


def _answer_only(pair: PreferencePair, side: str, tokenizer, chat: bool | None) -> Rendered:
    """The rendered side with only its answer's spans (not the prompt's assistant turns)."""
    chat = has_chat_template(tokenizer) if chat is None else chat
    rendered = render(pair.example(side), tokenizer, chat=chat)
    if pair.is_chat or chat:
        earlier = sum(turn["role"] == "assistant" for turn in pair.prompt_turns())
        rendered.spans = rendered.spans[earlier:]
    return rendered


def pair_side(pair: dict, side: str) -> dict:
    """One side of an encoded pair as an SFT example ({"input_ids", "labels"})."""
    return {"input_ids": pair[f"{side}_input_ids"], "labels": pair[f"{side}_labels"]}


# ------------------------------------------------------------------------- data sets


@dataclass
class PreferenceSplits(DatasetSplits):
    """Encoded pairs for training and evaluation, and what was left out (as DatasetSplits)."""

    fmt: str = "preference"


def load_preference_dataset(
    source: Any,
    tokenizer,
    *,
    max_length: int = 512,
    skip_bad_rows: bool = False,
    eval_fraction: float = 0.0,
    eval_source: Any = None,
    seed: int = 0,
    chat: bool | None = None,
) -> PreferenceSplits:
    """Read, check and tokenize preference pairs; split off an eval part (as load_dataset)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise SlimtuneError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    options = dict(max_length=max_length, skip_bad_rows=skip_bad_rows, chat=chat)
    splits = _load(source, tokenizer, **options)
    held_out = _load(eval_source, tokenizer, **options) if eval_source is not None else None
    return with_eval_split(splits, held_out, eval_fraction, seed)


def _load(source, tokenizer, *, max_length, skip_bad_rows, chat) -> PreferenceSplits:
    name = str(source) if isinstance(source, str) or hasattr(source, "__fspath__") else "data"
    records, skipped = read_records(source, skip_bad_rows=skip_bad_rows)
    if not records:
        raise SlimtuneError(f"{name}: no rows")
    splits = PreferenceSplits(train=[], skipped=skipped)
    for record in records:
        try:
            pair = to_pair(record.row, record.where)
            encoded, truncated = encode_pair(pair, tokenizer, max_length, chat)
        except BadRow as e:
            if not skip_bad_rows:
                if not str(e).startswith(record.where):
                    raise BadRow(f"{record.where}: {e}") from None
                raise
            splits.skipped += 1
            continue
        splits.truncated += truncated
        if any(trained_tokens(pair_side(encoded, side)) == 0 for side in SIDES):
            splits.dropped += 1
            continue
        splits.train.append(encoded)
        splits.train_rows.append(record.row)
    if not splits.train:
        raise SlimtuneError(f"{name}: no usable preference pairs (skipped {splits.skipped})")
    if splits.skipped or splits.dropped:
        message = "%s: skipped %d bad rows; dropped %d pairs with no answer left within %d tokens"
        log.warning(message, name, splits.skipped, splits.dropped, max_length)
    return splits
