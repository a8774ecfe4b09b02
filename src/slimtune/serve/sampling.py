"""Choose the next token of every row, each with its own temperature, top-p and random stream."""

from __future__ import annotations

import torch


def next_tokens(
    logits: torch.Tensor,
    temperatures: list[float],
    top_ps: list[float],
    generators: list[torch.Generator | None],
) -> list[int]:
    """Greedy for temperature 0, else nucleus sampling from softmax(logits / temperature).
    `logits` may be on any device; sampling runs on the CPU."""
    logits = logits.float()
    chosen = logits.argmax(dim=-1).tolist()
    sampled = [i for i, temperature in enumerate(temperatures) if temperature > 0]
    if sampled:
        # Seeded streams are CPU generators, and multinomial draws with one only from CPU
        # tensors (no copy when the logits are already there).
        logits = logits.cpu()
    for i in sampled:
        chosen[i] = _sample(logits[i] / temperatures[i], top_ps[i], generators[i])
    return chosen


def _sample(logits: torch.Tensor, top_p: float, generator: torch.Generator | None) -> int:
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
