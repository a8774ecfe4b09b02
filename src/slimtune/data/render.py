"""Turn an Example into the exact text the model trains on, and the character spans it learns.

Chat rows (and, for a tokenizer with a chat template, prompt/answer rows too) go through the
model's chat template. Where each assistant turn starts and ends is found by rendering prefixes
of the conversation: the turn starts where `messages[:i]` rendered with the generation prompt
ends, and ends where `messages[:i + 1]` ends. The span covers the answer and the template's
end-of-turn token, so the model learns to stop. Other rows are plain text, with EOS appended.

Rendered text is tokenized with `add_special_tokens=False`: a chat template writes its own BOS,
and for plain text the tokenizer's BOS (if it adds one) is written into the text here.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimtune.data.formats import Example, to_example
from slimtune.data.reading import BadRow
from slimtune.errors import SlimtuneError
from slimtune.tokens import has_chat_template

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


class MissingChatTemplate(SlimtuneError):
    """Chat rows met a tokenizer without a chat template."""

    def __init__(self, fmt: str):
        super().__init__(
            f"{fmt} rows need a chat template, and the model's tokenizer has none: give one with "
            "--chat-template NAME|FILE (chat_template: in a config; built in: chatml, llama3, "
            "gemma), set tokenizer.chat_template, or use prompt/completion rows"
        )


@dataclass
class Rendered:
    """The text to tokenize (without adding special tokens) and the trained character spans."""

    text: str
    spans: list[tuple[int, int]]


def render(
    example: Example, tokenizer, *, chat: bool | None = None, train_on_prompt: bool = False
) -> Rendered:
    """The training text of `example`; `chat` defaults to "the tokenizer has a chat template"."""
    chat = has_chat_template(tokenizer) if chat is None else chat
    if example.text is not None:
        rendered = _render_text(example.text, tokenizer)
    elif chat:
        rendered = _render_chat(example.chat_messages(), tokenizer)
    elif example.messages is not None:
        raise MissingChatTemplate(example.fmt)
    else:
        prompt = _special_prefix(tokenizer) + _plain_prompt(example)
        text = prompt + example.answer + _eos(tokenizer)
        rendered = Rendered(text, [(len(prompt), len(text))])
    if train_on_prompt:
        rendered.spans = [(0, len(rendered.text))]
    return rendered


def split_prompt_answer(
    row: dict, tokenizer, fmt: str | None = None, *, chat: bool | None = None
) -> tuple[str, str]:
    """(prompt, answer) for generation-based evaluation.

    The prompt is the text the model sees at generation time (for chat: the template with the
    generation prompt; tokenize it with `add_special_tokens=False`); the answer is the reference
    text of the last assistant turn (or the completion / output), as written in the row.
    `chat` as for `render`: by default, when the tokenizer has a chat template.
    """
    example = to_example(row, fmt)
    if example.text is not None:
        raise SlimtuneError("text rows have no prompt and answer; use a format with an answer")
    if has_chat_template(tokenizer) if chat is None else chat:
        messages = example.chat_messages()
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = _apply_template(tokenizer, messages[:last], add_generation_prompt=True)
        return prompt, messages[last]["content"]
    if example.messages is not None:
        raise MissingChatTemplate(example.fmt)
    return _special_prefix(tokenizer) + _plain_prompt(example), example.answer


def _render_text(text: str, tokenizer) -> Rendered:
    full = _special_prefix(tokenizer) + text + _eos(tokenizer)
    return Rendered(full, [(0, len(full))])


def _plain_prompt(example: Example) -> str:
    if example.fmt == "alpaca":
        if example.context:
            return ALPACA_PROMPT_WITH_INPUT.format(
                instruction=example.prompt, input=example.context
            )
        return ALPACA_PROMPT.format(instruction=example.prompt)
    return example.prompt


def _render_chat(messages: list[dict], tokenizer) -> Rendered:
    full = _apply_template(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_template_prefix(tokenizer, messages[:i], full, add_generation_prompt=True))
        end = len(_template_prefix(tokenizer, messages[: i + 1], full))
        # Learn up to the end-of-turn token, not the newline the template writes after it.
        end = start + len(full[start:end].rstrip())
        spans.append((start, end))
    eos = _eos(tokenizer)
    # A template that closes no turn with EOS would teach the model never to stop: add it.
    for k in reversed(range(len(spans))):
        start, end = spans[k]
        if eos and eos not in full[start:end]:
            full = full[:end] + eos + full[end:]
            shift = len(eos)
            spans[k] = (start, end + shift)
            spans[k + 1 :] = [(s + shift, e + shift) for s, e in spans[k + 1 :]]
    return Rendered(full, spans)


def _template_prefix(tokenizer, messages: list[dict], full: str, **kwargs) -> str:
    prefix = _apply_template(tokenizer, messages, **kwargs)
    if not full.startswith(prefix):
        raise SlimtuneError(
            "the chat template renders a conversation's beginning differently from the whole "
            "conversation, so the assistant turns cannot be located for masking; "
            "use train_on_prompt=True or a template that renders turns independently"
        )
    return prefix


def _apply_template(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja raises for conversations a template refuses
        raise BadRow(f"the chat template refused this conversation: {e}") from None


def _eos(tokenizer) -> str:
    return tokenizer.eos_token or ""


def _special_prefix(tokenizer) -> str:
    """The special tokens (BOS) the tokenizer puts before text, as text."""
    probe = "a"
    with_special = tokenizer(probe)["input_ids"]
    without = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for k in range(len(with_special) - len(without) + 1):
        if with_special[k : k + len(without)] == without:
            return tokenizer.decode(with_special[:k], skip_special_tokens=False) if k else ""
    return ""
