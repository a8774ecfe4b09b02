"""Inference: a decode loop with a KV cache over a lean LLaMA-family forward, 4-bit layers
computing straight from their packed codes (`slimtune.quant.inference`); text generation and
the exact-match scoring of greedy answers on top of it."""

from slimtune.infer.generation import (
    GenerationResult,
    decoded_weights,
    eos_ids,
    evaluation,
    exact_match,
    format_prompt,
    generate,
    generate_result,
    greedy_answers,
    is_exact_match,
    scored_answers,
)
from slimtune.infer.llama import KVCache, lean_forward, supports
from slimtune.infer.loop import Decoded, decode, inference_context, next_token

__all__ = [
    "Decoded",
    "GenerationResult",
    "KVCache",
    "decode",
    "decoded_weights",
    "eos_ids",
    "evaluation",
    "exact_match",
    "format_prompt",
    "generate",
    "generate_result",
    "greedy_answers",
    "inference_context",
    "is_exact_match",
    "lean_forward",
    "next_token",
    "scored_answers",
    "supports",
]
