"""Text generation: one prompt (optionally streamed, sampled) or many prompts greedily."""

from __future__ import annotations

import torch
from torch import nn


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, prompt: str, chat: bool | None = None) -> str:
    """The prompt as a chat model expects it (user turn + generation prompt), else unchanged."""
    if chat is False or (chat is None and not has_chat_template(tokenizer)):
        return prompt
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _encode(tokenizer, texts: list[str], formatted: bool = False) -> dict[str, torch.Tensor]:
    # Chat-formatted text, and prompts from slimtune.data, already carry their special tokens:
    # don't add a second BOS.
    special = not (formatted or has_chat_template(tokenizer))
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=special)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stream: bool = False,
    chat: bool | None = None,
) -> str:
    """The model's continuation of `prompt` (chat template applied for chat models).

    temperature 0 is greedy decoding; stream prints tokens to stdout as they come.
    """
    if seed is not None:
        torch.manual_seed(seed)
    inputs = _encode(tokenizer, [format_prompt(tokenizer, prompt, chat)])
    sampling = temperature > 0
    options = dict(
        max_new_tokens=max_new_tokens, do_sample=sampling, pad_token_id=_pad_id(tokenizer)
    )
    if sampling:
        options.update(temperature=temperature, top_p=top_p)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    if stream:
        from transformers import TextStreamer

        options["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(**inputs, use_cache=True, **options)
    finally:
        model.train(was_training)
    new = out[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True)


@torch.no_grad()
def greedy_answers(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to prompts formatted as the model sees them (special tokens included,
    as `slimtune.data.split_prompt_answer` gives them), batched with left padding."""
    answers: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            inputs = _encode(tokenizer, prompts[start : start + batch_size], formatted=True)
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=_pad_id(tokenizer),
                use_cache=True,
            )
            new = out[:, inputs["input_ids"].shape[1] :]
            answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers
