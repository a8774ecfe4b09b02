"""Text in, text out: one prompt (optionally streamed, sampled) or many prompts greedily,
through the decode loop (loop.py); 4-bit models compute from their packed codes. Also the
exact-match scoring of greedy answers that evaluation and exports report."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from slimtune.infer.loop import decode, inference_context
from slimtune.quant import Linear4bit, frozen_linear
from slimtune.tokens import has_chat_template, pad_token_id


@contextlib.contextmanager
def decoded_weights(model: nn.Module) -> Iterator[None]:
    """Decode every 4-bit base layer once, for as long as the block runs (no gradients).

    The float alternative to the 4-bit inference kernels (`four_bit=False`): inside this block
    the 4-bit layers are swapped for plain nn.Linear copies (float weights: 4 bytes a parameter
    for the time being) and put back after. Also the float reference the kernels are tested
    against.
    """
    swapped = []
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, Linear4bit):
                    setattr(parent, name, frozen_linear(child.dequantize(), child.bias))
                    swapped.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


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
    # don't add a second BOS. Raw text gets the tokenizer's own (as the server's completions).
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not formatted)


@dataclass
class GenerationResult:
    """One prompt's continuation and how fast it came."""

    text: str
    tokens: int  # new tokens (the end token not counted)
    seconds: float  # prompt + new tokens
    prefill_seconds: float
    engine: str  # "lean" / "native" (slimtune's decode loop, see Decoded) or "transformers"
    four_bit: bool  # whether 4-bit layers computed from their packed codes

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 4),
            "prefill_seconds": round(self.prefill_seconds, 4),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "engine": self.engine,
            "four_bit": self.four_bit,
        }


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """The tokens that end an answer: the tokenizer's and the generation config's."""
    ids: set[int] = set()
    generation = getattr(model, "generation_config", None)
    for source in (tokenizer.eos_token_id, getattr(generation, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return ids


class _Printer:
    """Prints the text of new tokens as they come (whole characters only)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for the rest
        print(text[len(self.shown) :], end="", flush=True)
        self.shown = text

    def close(self) -> None:
        print(flush=True)


@torch.no_grad()
def generate_result(
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
    four_bit: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> GenerationResult:
    """The model's continuation of `prompt` (chat template applied for chat models, with an
    optional system message), with its token count and timing.

    temperature 0 is greedy decoding; stream prints tokens to stdout as they come. 4-bit layers
    compute from their packed codes; `four_bit=False` decodes them into float copies first.
    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    chat = has_chat_template(tokenizer) if chat is None else chat
    inputs = _encode(tokenizer, [format_prompt(tokenizer, prompt, chat, system)], formatted=chat)
    printer = _Printer(tokenizer) if stream else None
    weights = contextlib.nullcontext() if four_bit else decoded_weights(model)
    with weights:
        out = decode(
            model,
            inputs["input_ids"],
            inputs.get("attention_mask"),
            max_new_tokens=max_new_tokens,
            eos_ids=eos_ids(model, tokenizer),
            temperature=temperature,
            top_p=top_p,
            generator=generator,
            on_token=printer,
            four_bit=four_bit,
            compute_dtype=compute_dtype,
            pad_token_id=pad_token_id(tokenizer),
        )
    if printer is not None:
        printer.close()
    text = tokenizer.decode(out.tokens[0], skip_special_tokens=True)
    uses_4bit = four_bit and any(isinstance(m, Linear4bit) for m in model.modules())
    return GenerationResult(
        text, len(out.tokens[0]), out.seconds, out.prefill_seconds, out.engine, uses_4bit
    )


def generate(model: nn.Module, tokenizer, prompt: str, **options) -> str:
    """The model's continuation of `prompt`; options as `generate_result`."""
    return generate_result(model, tokenizer, prompt, **options).text


@torch.no_grad()
def greedy_answers(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    four_bit: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> list[str]:
    """Greedy answers to prompts formatted as the model sees them (special tokens included,
    as `slimtune.data.split_prompt_answer` gives them), batched with left padding."""
    answers: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    stop = eos_ids(model, tokenizer)
    try:
        for start in range(0, len(prompts), batch_size):
            inputs = _encode(tokenizer, prompts[start : start + batch_size], formatted=True)
            out = decode(
                model,
                inputs["input_ids"],
                inputs["attention_mask"],
                max_new_tokens=max_new_tokens,
                eos_ids=stop,
                four_bit=four_bit,
                compute_dtype=compute_dtype,
                pad_token_id=pad_token_id(tokenizer),
            )
            answers += tokenizer.batch_decode(out.tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


@contextlib.contextmanager
def evaluation(
    model: nn.Module, four_bit: bool = True, compute_dtype: torch.dtype | None = None
) -> Iterator[None]:
    """Eval mode and no gradients for as long as the block runs, 4-bit layers computing from
    their packed codes (`four_bit=False`: decoded into float copies instead)."""
    was_training = model.training
    model.eval()
    weights = inference_context(model, True, compute_dtype) if four_bit else decoded_weights(model)
    try:
        with weights, torch.no_grad():
            yield
    finally:
        model.train(was_training)


def is_exact_match(answer: str, reference: str) -> bool:
    """The stripped generated answer equals the stripped reference answer."""
    return answer.strip() == reference.strip()


def scored_answers(
    model: nn.Module,
    tokenizer,
    pairs: list[tuple[str, str]],
    *,
    max_new_tokens: int = 32,
    four_bit: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> list[dict]:
    """Greedy answers to (prompt as the model sees it, reference answer) pairs: one dict per pair
    with the prompt, reference, answer and whether it is an exact match."""
    prompts = [prompt for prompt, _ in pairs]
    answers = greedy_answers(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        four_bit=four_bit,
        compute_dtype=compute_dtype,
    )
    samples = []
    for (prompt, reference), answer in zip(pairs, answers, strict=True):
        correct = is_exact_match(answer, reference)
        samples.append(dict(prompt=prompt, reference=reference, answer=answer, correct=correct))
    return samples


def exact_match(model: nn.Module, tokenizer, pairs: list[tuple[str, str]]) -> float | None:
    """The share of greedy answers that equal their reference (None without pairs)."""
    if not pairs:
        return None
    with evaluation(model):
        samples = scored_answers(model, tokenizer, pairs)
    return sum(s["correct"] for s in samples) / len(samples)
