"""Tokenize rendered text and decide, token by token, which tokens the loss covers.

A token is trained when its characters (the tokenizer's offset mapping) overlap a trained span;
the others get the label -100. Using offsets of the whole text, rather than tokenizing the
prompt and the answer apart, keeps the token ids exactly those the model sees at generation
time, even where a token straddles the prompt/answer boundary.
"""

from __future__ import annotations

from slimtune.data.render import Rendered
from slimtune.errors import SlimtuneError
from slimtune.tokens import IGNORE_INDEX


def encode(rendered: Rendered, tokenizer, max_length: int | None = None) -> dict:
    """{"input_ids", "labels"} (lists of ints), cut to `max_length` tokens from the right."""
    if not getattr(tokenizer, "is_fast", False):
        raise SlimtuneError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: slimtune needs its offset "
            "mapping to mask prompt tokens (load the tokenizer with use_fast=True)"
        )
    encoding = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels = [
        token if _overlaps(offset, rendered.spans) else IGNORE_INDEX
        for token, offset in zip(input_ids, encoding["offset_mapping"], strict=True)
    ]
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def _overlaps(offset: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    start, end = offset
    return any(start < span_end and end > span_start for span_start, span_end in spans)


def trained_tokens(example: dict) -> int:
    return sum(label != IGNORE_INDEX for label in example["labels"])
