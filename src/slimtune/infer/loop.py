"""The decode loop: prefill the prompts once, then one new token per row per step, KV cached.

Rows are left-padded to a common length (the attention mask marks padding; positions come from
it, so a padded row computes what it would alone) and leave the batch when they finish. Decode
steps run in one C call where it covers the model (`native_step.py`), and on a GPU as one CUDA
graph (`cuda_graph.py`). Models the lean forward does not cover run through transformers'
`generate` instead. 4-bit layers compute from their packed codes (`slimtune.quant.inference`)
unless `four_bit=False`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from slimtune.devices import device_of
from slimtune.infer import cuda_graph
from slimtune.infer.llama import KVCache, Rotary, attention_mask, lean_forward, supports
from slimtune.infer.native_step import MAX_ROWS, NativeDecoder, in_c_prefill, usable
from slimtune.quant.inference import has_4bit_layers, inference_4bit


@dataclass
class Decoded:
    """New tokens of every row (without the end-of-sequence token) and the time it took."""

    tokens: list[list[int]]
    seconds: float
    prefill_seconds: float = 0.0
    # "lean" (our loop), "native" (our loop, its decode steps in C), "graph" (our loop, its
    # decode steps replayed from a CUDA graph) or "transformers"
    engine: str = "lean"
    finish: list[str] = field(default_factory=list)  # "stop" or "length" per row

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of float32 logits: argmax at temperature 0, else top-p sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    if generator is not None and generator.device != logits.device:
        logits = logits.to(generator.device)  # a seeded CPU generator draws from CPU tensors
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above
        sorted_probs[before >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def inference_context(model: nn.Module, four_bit: bool = True, compute_dtype=None):
    """The 4-bit inference kernels for a model with 4-bit layers (a no-op otherwise)."""
    if four_bit and has_4bit_layers(model):
        return inference_4bit(model, compute_dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask_: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 128,
    eos_ids: set[int] | frozenset[int] = frozenset(),
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    on_token: Callable[[int, int], None] | None = None,
    four_bit: bool = True,
    compute_dtype: torch.dtype | None = None,
    pad_token_id: int = 0,
) -> Decoded:
    """Continue every row of `input_ids` (batch, T; left-padded where `attention_mask_` is 0)
    by up to `max_new_tokens` tokens, stopping a row at any of `eos_ids`. `on_token(row,
    token)` is called for every new token as it comes."""
    was_training = model.training
    model.eval()
    try:
        with inference_context(model, four_bit, compute_dtype):
            if supports(model):
                return _lean(
                    model, input_ids, attention_mask_, max_new_tokens, eos_ids,
                    temperature, top_p, generator, on_token, four_bit, compute_dtype,
                )  # fmt: skip
            return _transformers(
                model, input_ids, attention_mask_, max_new_tokens, eos_ids,
                temperature, top_p, on_token, pad_token_id,
            )  # fmt: skip
    finally:
        model.train(was_training)


def _lean(
    model, input_ids, mask, max_new_tokens, eos_ids, temperature, top_p, generator, on_token,
    four_bit=True, compute_dtype=None,
):  # fmt: skip
    start = time.perf_counter()
    batch, width = input_ids.shape
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device)
    valid = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.to(device).bool()
    tokens: list[list[int]] = [[] for _ in range(batch)]
    finish = ["length"] * batch
    if max_new_tokens <= 0:
        return Decoded(tokens, 0.0, 0.0, "lean", finish)
    dtype = model.model.embed_tokens.weight.dtype
    capacity = width + max_new_tokens
    cache = KVCache.empty(model, batch, capacity, dtype)
    rotary = Rotary(model, capacity, dtype)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    # The prefill and decode steps run in C where it covers the model (native_step.py). Rows
    # are left-padded: each sees the cache from its first real column on.
    left_padded = bool((valid == valid.cummax(dim=1).values).all())
    native = None
    if four_bit and left_padded and batch <= MAX_ROWS and usable(cache, rotary):
        native = NativeDecoder.build(model, compute_dtype)
    if native is not None and in_c_prefill(valid, native.bf16):
        logits = native.prefill(input_ids, valid, cache, rotary)
    else:
        mask = attention_mask(valid, 0, width)
        logits = lean_forward(model, input_ids, positions, cache, rotary, mask)
    graph = None  # recorded with the prefill: its time counts there
    if native is None and max_new_tokens > 1 and cuda_graph.usable(device):
        graph = cuda_graph.recorded_step(model, cache, rotary, valid, positions[:, -1:])
    prefill = time.perf_counter() - start
    first = valid.int().argmax(-1).tolist()
    rows = list(range(batch))  # which original row each batch row is; None: finished
    position = positions[:, -1:]
    for step in range(max_new_tokens):
        # A graph's batch keeps its finished rows: only the others draw a token, so a seeded
        # generator draws the same numbers as without a graph.
        live = [i for i, row in enumerate(rows) if row is not None]
        scores = logits if len(live) == len(rows) else logits[live]
        chosen = [0] * len(rows)  # a finished row's token is fed to the graph, then ignored
        drawn = next_token(scores, temperature, top_p, generator).tolist()
        for i, token in zip(live, drawn, strict=True):
            chosen[i] = token
        keep = []
        for i in live:
            row, token = rows[i], chosen[i]
            if token in eos_ids:
                finish[row] = "stop"
                continue
            tokens[row].append(token)
            if on_token is not None:
                on_token(row, token)
            keep.append(i)
        if not keep or step == max_new_tokens - 1:
            break
        if graph is not None:  # the graph's batch keeps its rows: finished ones are ignored
            kept = set(keep)
            rows = [row if i in kept else None for i, row in enumerate(rows)]
            logits = graph(chosen)
            continue
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=device)
            cache.keep_rows(index)
            valid, position = valid[index], position[index]
            rows = [rows[i] for i in keep]
            chosen = [chosen[i] for i in keep]
            first = [first[i] for i in keep]
        if native is not None:
            logits = native.step(chosen, cache, rotary, first)
            continue
        valid = torch.cat([valid, valid.new_ones(len(rows), 1)], dim=1)
        position = position + 1
        ids = torch.tensor(chosen, device=device)[:, None]
        mask_now = attention_mask(valid, cache.length, 1)
        logits = lean_forward(model, ids, position, cache, rotary, mask_now)
    engine = "native" if native is not None else "graph" if graph is not None else "lean"
    return Decoded(tokens, time.perf_counter() - start, prefill, engine, finish)


def _transformers(
    model, input_ids, mask, max_new_tokens, eos_ids, temperature, top_p, on_token, pad_token_id
):
    """transformers' generate, for architectures the lean forward does not cover."""
    start = time.perf_counter()
    device = device_of(model)
    inputs = {"input_ids": input_ids.to(device)}
    if mask is not None:
        inputs["attention_mask"] = mask.to(device)
    options = dict(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        pad_token_id=pad_token_id,
        eos_token_id=sorted(eos_ids) or None,
        use_cache=True,
    )
    if temperature > 0:
        options.update(temperature=temperature, top_p=top_p)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(**inputs, **options)[:, input_ids.shape[1] :].tolist()
    tokens, finish = [], []
    for row, new in enumerate(out):
        kept = []
        for token in new:
            if token in eos_ids:
                break
            kept.append(token)
            if on_token is not None:
                on_token(row, token)
        tokens.append(kept)
        finish.append("stop" if len(kept) < len(new) else "length")
    return Decoded(tokens, time.perf_counter() - start, 0.0, "transformers", finish)
