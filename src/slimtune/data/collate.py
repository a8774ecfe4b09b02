"""Batches: right padding, and packing several short examples into one sequence.

Packed sequences carry `position_ids` that restart at 0 for every example and no
`attention_mask`. transformers (its `masking_utils`, 4.54 and later) reads such position_ids as
"several sequences in one row" and builds a block-diagonal causal mask, so a token attends only
to earlier tokens of its own example: with eager and SDPA attention (the CPU path) as with
flash-attention, for LLaMA-family models such as SmolLM2. It does so only when the forward call
has no attention_mask and no KV cache: call the model with `use_cache=False` (transformers
defaults to True, even in training mode). Otherwise, or for a model that builds its own mask,
a packed example attends to the examples before it in its row (only its positions restart).
tests/test_data_collate.py checks both: packed logits equal unpacked ones, and differ with a cache.
"""

from __future__ import annotations

import torch

from slimtune.tokens import IGNORE_INDEX


class Collator:
    """Pads a list of examples on the right into tensors.

    Plain examples give `input_ids`, `attention_mask` (0 on pads) and `labels` (-100 on pads).
    Packed examples (with `position_ids`) give `input_ids`, `labels` and `position_ids`, no
    attention mask (see the module docstring); the pads then form one more short "example".
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = "position_ids" in examples[0]
        batch = {"input_ids": [], "labels": []}
        batch["position_ids" if packed else "attention_mask"] = []
        for e in examples:
            n = len(e["input_ids"])
            pad = length - n
            batch["input_ids"].append(list(e["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(e["labels"]) + [IGNORE_INDEX] * pad)
            if packed:
                batch["position_ids"].append(list(e["position_ids"]) + list(range(pad)))
            else:
                batch["attention_mask"].append([1] * n + [0] * pad)
        return {key: torch.tensor(rows, dtype=torch.long) for key, rows in batch.items()}


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Pack examples into sequences of at most `max_length` tokens (first-fit decreasing).

    Each packed sequence has `input_ids`, `labels` and `position_ids` (restarting at 0 for
    each example). The first label of every example is -100: it would be predicted from the
    previous example's last token. (Unpacked, that label is never used anyway, as the loss
    shifts labels by one.) An example longer than `max_length` is cut to it.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = min(len(examples[i]["input_ids"]), max_length)
        target = next((b for b, free in enumerate(room) if free >= n), None)
        if target is None:
            bins.append([])
            room.append(max_length)
            target = len(bins) - 1
        bins[target].append(i)
        room[target] -= n
    return [_concatenate([examples[i] for i in members], max_length) for members in bins]


def _concatenate(examples: list[dict], max_length: int) -> dict:
    packed = {"input_ids": [], "labels": [], "position_ids": []}
    for e in examples:
        ids = list(e["input_ids"][:max_length])
        labels = list(e["labels"][:max_length])
        labels[0] = IGNORE_INDEX
        packed["input_ids"] += ids
        packed["labels"] += labels
        packed["position_ids"] += list(range(len(ids)))
    return packed
