"""Text generation: one prompt (optionally streamed, sampled) or many prompts greedily."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from slimtune.data import pad_token_id
from slimtune.models.device import device_of, to_device


@contextlib.contextmanager
def decoded_weights(model: nn.Module) -> Iterator[None]:
    """Decode every 4-bit base layer once, for as long as the block runs (no gradients).

    A 4-bit layer decodes its weight at each call. In training that cost is shared by all the
    tokens of a batch, but generation calls each layer once per new token, so decoding the
    whole model per token dominates. Inside this block the 4-bit layers are swapped for plain
    nn.Linear copies (float weights: 4 bytes a parameter for the time being) and put back after.
    """
    swapped = []
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if _is_4bit(child):
                    linear = nn.Linear(
                        child.in_features,
                        child.out_features,
                        bias=child.bias is not None,
                        device="meta",
                    )
                    linear.weight = nn.Parameter(child.dequantize(), requires_grad=False)
                    if child.bias is not None:
                        linear.bias = nn.Parameter(child.bias.detach(), requires_grad=False)
                    setattr(parent, name, linear)
                    swapped.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def _is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit" and hasattr(module, "dequantize")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(
    tokenizer, prompt: str, chat: bool | None = None, system: str | None = None
) -> str:
    """The prompt as a chat model expects it ([system turn], user turn, generation prompt),
    else unchanged."""
    if chat is False or (chat is None and not has_chat_template(tokenizer)):
        return prompt
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _encode(tokenizer, texts: list[str], formatted: bool = False) -> dict[str, torch.Tensor]:
    # Chat-formatted text, and prompts from slimtune.data, already carry their special tokens:
    # don't add a second BOS.
    special = not (formatted or has_chat_template(tokenizer))
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=special)


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
    system: str | None = None,
) -> str:
    """The model's continuation of `prompt` (chat template applied for chat models, with an
    optional system message).

    temperature 0 is greedy decoding; stream prints tokens to stdout as they come.
    """
    if seed is not None:
        torch.manual_seed(seed)
    inputs = _encode(tokenizer, [format_prompt(tokenizer, prompt, chat, system)])
    inputs = to_device(inputs, device_of(model))
    sampling = temperature > 0
    options = dict(
        max_new_tokens=max_new_tokens, do_sample=sampling, pad_token_id=pad_token_id(tokenizer)
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
        with decoded_weights(model):
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
        with decoded_weights(model):
            for start in range(0, len(prompts), batch_size):
                inputs = _encode(tokenizer, prompts[start : start + batch_size], formatted=True)
                inputs = to_device(inputs, device_of(model))
                out = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=pad_token_id(tokenizer),
                    use_cache=True,
                )
                new = out[:, inputs["input_ids"].shape[1] :]
                answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def load_for_inference(model: str | None, adapter: str | None):
    """(model, tokenizer) in float, with the LoRA adapter folder `adapter` loaded if given."""
    from slimtune.models import load_model

    network, tokenizer = load_model(model)
    if adapter:
        from slimtune.lora import load_adapter

        load_adapter(network, adapter)
        from slimtune.models.chat_templates import saved_chat_template

        # The template the adapter was trained with (saved beside it) renders its prompts.
        tokenizer.chat_template = saved_chat_template(adapter) or tokenizer.chat_template
    network.eval()
    return network, tokenizer
