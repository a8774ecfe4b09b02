"""Chat templates for models without one: the built-ins mask prompts correctly, a Jinja file
works, chat data without any template is a clear error, and the template travels with the
adapter to evaluation and generation."""

from __future__ import annotations

import pytest
from helpers import make_tokenizer, save_tiny, write_jsonl

from slimtune.data import IGNORE_INDEX, load_dataset
from slimtune.errors import SlimtuneError
from slimtune.models.chat_templates import (
    BUILTIN,
    TEMPLATE_FILE,
    resolve_chat_template,
    set_chat_template,
)

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And 2 + 2?"},
        {"role": "assistant", "content": "4"},
    ]
}
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}


def _trained_pieces(tokenizer, example) -> list[str]:
    """The trained stretches of an example, as text."""
    pieces, current = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            pieces.append(tokenizer.decode(current)), current.clear()
    if current:
        pieces.append(tokenizer.decode(current))
    return pieces


@pytest.mark.parametrize("name", list(BUILTIN))
def test_builtin_templates_train_exactly_the_assistant_turns(name, tmp_path):
    tokenizer = set_chat_template(make_tokenizer(chat_template=None, eos="</s>"), name)
    [example] = load_dataset(write_jsonl(tmp_path / "chat.jsonl", [CHAT]), tokenizer).train
    text = tokenizer.decode(example["input_ids"])
    # The template's text, with EOS after each answer's end of turn (the template has none there).
    assert text.replace("</s>", "") == tokenizer.apply_chat_template(
        CHAT["messages"], tokenize=False
    )
    # Each answer, its end-of-turn marker, and (the template closing turns without it) EOS.
    end = END_OF_TURN[name]
    assert _trained_pieces(tokenizer, example) == [f"Paris{end}</s>", f"4{end}</s>"]
    assert "Be brief." in text and "capital of France" in text


def test_a_jinja_file_is_a_template_and_its_errors_name_the_line(tmp_path):
    good = tmp_path / "t.jinja"
    good.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    assert resolve_chat_template(good) == good.read_text()
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m['content'] }\n")
    with pytest.raises(SlimtuneError, match=rf"{bad}:2: not a valid Jinja template"):
        resolve_chat_template(bad)
    with pytest.raises(SlimtuneError, match="neither a built-in template .chatml, llama3, gemma."):
        resolve_chat_template("vicuna")


def test_chat_rows_without_any_template_name_the_row_and_the_flag(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [CHAT])
    with pytest.raises(SlimtuneError, match=r"chat.jsonl, line 1: .*--chat-template NAME\|FILE"):
        load_dataset(data, make_tokenizer(chat_template=None, eos="</s>"))


def test_the_template_is_saved_with_the_adapter_and_used_by_eval(tmp_path):
    """`slimtune train --chat-template gemma` on a model without one: the adapter folder holds
    the template, and loading that adapter for inference brings it back."""
    from slimtune.train import TrainConfig, train
    from slimtune.train.generation import load_for_inference

    folder = save_tiny("gemma3", tmp_path / "base")
    (folder / TEMPLATE_FILE).unlink()  # a base model: no template
    data = write_jsonl(tmp_path / "chat.jsonl", [CHAT] * 4)
    with pytest.raises(SlimtuneError, match="--chat-template"):
        train(TrainConfig(model=str(folder), data=str(data), output=str(tmp_path / "x")))
    config = TrainConfig(
        model=str(folder), data=str(data), output=str(tmp_path / "run"), chat_template="gemma",
        rank=2, batch_size=2, grad_accum=1, max_steps=1, max_length=128,
    )  # fmt: skip
    result = train(config, progress=False)
    assert (result.output / TEMPLATE_FILE).read_text() == BUILTIN["gemma"]
    _, tokenizer = load_for_inference(str(folder), str(result.output))
    assert tokenizer.chat_template == BUILTIN["gemma"]
    _, plain = load_for_inference(str(folder), None)
    assert not plain.chat_template
