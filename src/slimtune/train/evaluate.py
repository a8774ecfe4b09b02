"""Evaluation: token loss and perplexity, and exact-match accuracy of greedy answers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from slimtune.data import Collator
from slimtune.infer import evaluation, scored_answers
from slimtune.tokens import pad_token_id as default_pad_id
from slimtune.train.forward import loss_on


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    exact_match: float | None  # share of answers equal to the reference (None: not measured)
    n: int  # rows scored for loss
    n_generated: int = 0  # rows scored by generation
    samples: list[dict] = field(default_factory=list)  # prompt, reference, answer, correct

    def to_dict(self) -> dict:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "exact_match": self.exact_match,
            "n": self.n,
            "n_generated": self.n_generated,
        }


def evaluate(
    model: nn.Module,
    tokenizer,
    *,
    examples: list[dict] | None = None,
    pairs: list[tuple[str, str]] | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    pad_token_id: int | None = None,
    four_bit: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Loss/perplexity over tokenized `examples` ({"input_ids", "labels"}) and exact match
    over `pairs` of (prompt as the model sees it, reference answer).

    4-bit layers compute from their packed codes (`slimtune.quant.inference`), so a 4-bit model
    is evaluated in the memory it trained in; `four_bit=False` decodes them into float copies
    for the time of the evaluation instead."""
    loss, perplexity, n = float("nan"), float("nan"), 0
    accuracy, samples = None, []
    with evaluation(model, four_bit, compute_dtype):
        if examples:
            pad = pad_token_id if pad_token_id is not None else default_pad_id(tokenizer)
            collate = Collator(pad)
            batches = [
                collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)
            ]
            total, count = loss_on(model, batches)
            loss = total / max(count, 1)
            perplexity = math.exp(min(loss, 80.0))
            n = len(examples)
        if pairs:
            samples = scored_answers(
                model,
                tokenizer,
                pairs,
                max_new_tokens=max_new_tokens,
                four_bit=four_bit,
                compute_dtype=compute_dtype,
            )
            accuracy = sum(s["correct"] for s in samples) / len(samples)
    return EvalResult(loss, perplexity, accuracy, n, len(samples), samples)
