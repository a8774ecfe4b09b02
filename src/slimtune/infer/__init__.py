"""Inference: a decode loop with a KV cache over a lean LLaMA-family forward, 4-bit layers
computing straight from their packed codes (`slimtune.quant.inference`)."""

from slimtune.infer.llama import KVCache, lean_forward, supports
from slimtune.infer.loop import Decoded, decode, inference_context, next_token

__all__ = [
    "Decoded",
    "KVCache",
    "decode",
    "inference_context",
    "lean_forward",
    "next_token",
    "supports",
]
