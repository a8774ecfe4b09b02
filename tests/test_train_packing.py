"""Packed training batches give the loss of the same rows trained one by one."""

import torch
from helpers import make_tiny_llama

from slimtune.data import Collator, pack
from slimtune.train.forward import count_trained_tokens, summed_loss


def _examples(n: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(6, 20, (1,), generator=generator))
        ids = torch.randint(3, 128, (length,), generator=generator).tolist()
        prompt = length // 2
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return examples


def test_packed_loss_equals_the_loss_of_each_row_alone():
    model = make_tiny_llama()
    examples = _examples(8)
    collate = Collator(pad_token_id=0)
    packed = pack(examples, max_length=64)
    assert len(packed) < len(examples)  # rows really were packed together

    with torch.no_grad():
        alone = sum(float(summed_loss(model, collate([e]))) for e in examples)
        together = float(summed_loss(model, collate(packed)))
    tokens_alone = sum(count_trained_tokens(collate([e])) for e in examples)
    assert count_trained_tokens(collate(packed)) == tokens_alone
    assert abs(together - alone) < 1e-3 * abs(alone)
