"""Padding collator and packing, including attention staying within each packed example."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_llama

from slimtune.data import IGNORE_INDEX, Collator, pack


def example(ids: list[int], n_prompt: int) -> dict:
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]}


EXAMPLES = [
    example([5, 6, 7, 8, 9], 2),
    example([10, 11, 12, 13, 14, 15, 16], 3),
    example([20, 21, 22, 23], 1),
    example([30, 31, 32], 1),
]


def test_collator_pads_right_with_mask_and_ignored_labels():
    batch = Collator(pad_token_id=0)(EXAMPLES[:3])
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"].tolist()[0] == [5, 6, 7, 8, 9, 0, 0]
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 2, [1] * 7, [1] * 4 + [0] * 3]
    assert batch["labels"].tolist()[2] == [IGNORE_INDEX, 21, 22, 23] + [IGNORE_INDEX] * 3
    assert "position_ids" not in batch


def test_collator_pad_to_multiple_of():
    batch = Collator(pad_token_id=1, pad_to_multiple_of=8)(EXAMPLES[:1])
    assert batch["input_ids"].shape == (1, 8)
    assert batch["input_ids"][0, 5:].tolist() == [1, 1, 1]


def test_pack_fills_sequences_and_restarts_positions():
    packed = pack(EXAMPLES, max_length=9)
    # First-fit decreasing: 7+ nothing fits (2 left), 5+4 = 9, then 3 joins the 7? no: 7+3 > 9.
    assert [len(p["input_ids"]) for p in packed] == [7, 9, 3]
    second = packed[1]
    assert second["input_ids"] == [5, 6, 7, 8, 9, 20, 21, 22, 23]
    assert second["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    # Each example's first label is masked: it would be predicted from the previous example.
    assert second["labels"] == [IGNORE_INDEX] * 2 + [7, 8, 9] + [IGNORE_INDEX, 21, 22, 23]
    # No token lost or duplicated.
    all_ids = sorted(t for p in packed for t in p["input_ids"])
    assert all_ids == sorted(t for e in EXAMPLES for t in e["input_ids"])


def test_pack_cuts_an_example_longer_than_max_length():
    packed = pack([example(list(range(1, 13)), 1)], max_length=8)
    assert packed[0]["input_ids"] == list(range(1, 9))
    assert packed[0]["position_ids"] == list(range(8))


def test_collator_pads_packed_sequences_without_attention_mask():
    batch = Collator(pad_token_id=0)(pack(EXAMPLES, max_length=9))
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["position_ids"][2].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5]
    assert batch["labels"][2, 3:].tolist() == [IGNORE_INDEX] * 6


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_llama_attends_only_within_each_example(attention):
    """Logits of a packed batch (use_cache=False) equal those of each example run alone."""
    model = make_tiny_llama(attn_implementation=attention)
    batch = Collator(pad_token_id=0)(pack(EXAMPLES, max_length=9))
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    with torch.no_grad():
        packed_logits = model(**inputs, use_cache=False).logits
        for row, ids, positions in zip(
            packed_logits, batch["input_ids"], batch["position_ids"], strict=True
        ):
            starts = [i for i, p in enumerate(positions.tolist()) if p == 0] + [len(ids)]
            for start, end in zip(starts, starts[1:], strict=False):
                alone = model(input_ids=ids[None, start:end]).logits[0]
                torch.testing.assert_close(row[start:end], alone, atol=1e-5, rtol=1e-4)
        # The check can fail: with a KV cache (transformers' default use_cache=True) or an
        # attention mask, transformers does not split the rows, and the second example of
        # row 1 attends to the first.
        cached = model(**inputs).logits
        masked = model(
            **inputs, use_cache=False, attention_mask=torch.ones_like(inputs["input_ids"])
        )
    for leaky in (cached, masked.logits):
        assert not torch.allclose(leaky[1, 5:9], packed_logits[1, 5:9], atol=1e-3)
