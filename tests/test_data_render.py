"""Chat template rendering and prompt masking, checked token by token."""

from __future__ import annotations

import pytest
from helpers import OPEN_TURNS, make_tokenizer

from slimtune.data import IGNORE_INDEX, encode, render, split_prompt_answer
from slimtune.data.formats import to_example
from slimtune.errors import SlimtuneError


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encoded(row, tokenizer, **kwargs):
    return encode(render(to_example(row), tokenizer, **kwargs), tokenizer)


def expect(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Expected (input_ids, labels): each piece tokenized alone, trained or masked.

    Every piece boundary here is a pre-tokenizer boundary of the byte-level BPE (newline,
    special token), so tokenizing pieces alone gives the same ids as the whole text.
    """
    input_ids, labels = [], []
    for text, trained in pieces:
        piece = ids(tokenizer, text)
        input_ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return input_ids, labels


CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And 2 + 2?"},
        {"role": "assistant", "content": "4"},
    ]
}


def test_chat_rendered_with_template_and_only_assistant_turns_trained():
    tokenizer = make_tokenizer()
    result = encoded(CHAT, tokenizer)
    expected_ids, expected_labels = expect(
        tokenizer,
        [
            ("<|im_start|>system\nBe brief.<|im_end|>\n", False),
            ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n", False),
            ("<|im_start|>assistant\n", False),
            ("Paris<|im_end|>", True),
            ("\n<|im_start|>user\nAnd 2 + 2?<|im_end|>\n<|im_start|>assistant\n", False),
            ("4<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert result["input_ids"] == expected_ids
    assert result["labels"] == expected_labels
    assert tokenizer.decode(result["input_ids"]) == tokenizer.apply_chat_template(
        CHAT["messages"], tokenize=False
    )


def test_sharegpt_roles_mapped_and_rendered_like_messages():
    tokenizer = make_tokenizer()
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = {
        "conversations": [
            {"from": names[m["role"]], "value": m["content"]} for m in CHAT["messages"]
        ]
    }
    assert to_example(sharegpt).messages == CHAT["messages"]
    assert encoded(sharegpt, tokenizer) == encoded(CHAT, tokenizer)


@pytest.mark.parametrize(
    "row, user",
    [
        ({"prompt": "What is the capital of France?", "completion": "Paris"}, None),
        ({"instruction": "What is the capital of France?", "output": "Paris"}, None),
        (
            {"instruction": "Translate to French:", "input": "cheese", "output": "Paris"},
            "Translate to French:\n\ncheese",
        ),
    ],
)
def test_completion_and_alpaca_use_the_chat_template_of_a_chat_tokenizer(row, user):
    tokenizer = make_tokenizer()
    user = user or "What is the capital of France?"
    result = encoded(row, tokenizer)
    expected = expect(
        tokenizer,
        [
            (f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n", False),
            ("Paris<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert (result["input_ids"], result["labels"]) == expected


def test_completion_without_chat_template_is_prompt_then_completion_then_eos():
    tokenizer = make_tokenizer(chat_template=None, eos="</s>")
    result = encoded({"prompt": "The capital of France is", "completion": " Paris"}, tokenizer)
    expected = expect(tokenizer, [("The capital of France is", False), (" Paris</s>", True)])
    assert (result["input_ids"], result["labels"]) == expected


def test_alpaca_without_chat_template_uses_the_alpaca_prompt():
    tokenizer = make_tokenizer(chat_template=None, eos="</s>")
    row = {"instruction": "Translate to French:", "input": "cheese", "output": "fromage"}
    rendered = render(to_example(row), tokenizer)
    prompt, answer = split_prompt_answer(row, tokenizer)
    assert (
        "### Instruction:\nTranslate to French:\n\n### Input:\ncheese\n\n### Response:\n" in prompt
    )
    assert rendered.text == prompt + "fromage</s>"
    assert rendered.spans == [(len(prompt), len(rendered.text))]
    assert answer == "fromage"


def test_text_rows_train_every_token_and_end_with_eos():
    tokenizer = make_tokenizer(chat_template=None, eos="</s>")
    result = encoded({"text": "hello world"}, tokenizer)
    assert result["input_ids"] == ids(tokenizer, "hello world</s>")
    assert result["labels"] == result["input_ids"]


def test_bos_of_the_tokenizer_is_kept_and_masked():
    tokenizer = make_tokenizer(chat_template=None, eos="</s>", bos=True)
    result = encoded({"prompt": "hello", "completion": " world"}, tokenizer)
    bos = tokenizer.convert_tokens_to_ids("<s>")
    assert result["input_ids"] == [bos] + ids(tokenizer, "hello world</s>")
    n_prompt = 1 + len(ids(tokenizer, "hello"))
    assert result["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert result["labels"][n_prompt:] == ids(tokenizer, " world</s>")


def test_train_on_prompt_trains_every_token():
    tokenizer = make_tokenizer()
    result = encoded(CHAT, tokenizer, train_on_prompt=True)
    assert result["labels"] == result["input_ids"]


def test_eos_appended_when_the_template_closes_no_turn():
    tokenizer = make_tokenizer(chat_template=OPEN_TURNS, eos="</s>")
    row = {
        "messages": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "world"},
        ]
    }
    result = encoded(row, tokenizer)
    # " world" is one token that straddles the prompt/answer boundary: it is trained, since it
    # holds answer characters (and it is what the model must produce).
    expected = expect(
        tokenizer, [("user: hello\nassistant:", False), (" world</s>", True), ("\n", False)]
    )
    assert (result["input_ids"], result["labels"]) == expected


def test_chat_prompt_for_generation_is_the_start_of_the_training_sequence():
    tokenizer = make_tokenizer()
    prompt, answer = split_prompt_answer(CHAT, tokenizer)
    assert answer == "4"
    assert prompt == tokenizer.apply_chat_template(
        CHAT["messages"][:-1], tokenize=False, add_generation_prompt=True
    )
    training = encoded(CHAT, tokenizer)
    prompt_ids = ids(tokenizer, prompt)
    assert training["input_ids"][: len(prompt_ids)] == prompt_ids
    # The first trained token after the prompt is the answer's first token.
    assert training["labels"][len(prompt_ids)] == ids(tokenizer, "4")[0]


def test_chat_false_renders_prompt_answer_rows_as_plain_text_for_a_chat_tokenizer():
    tokenizer = make_tokenizer()
    row = {"prompt": "The capital of France is", "completion": " Paris"}
    rendered = render(to_example(row), tokenizer, chat=False)
    assert rendered.text == "The capital of France is Paris<|im_end|>"
    assert split_prompt_answer(row, tokenizer, chat=False) == ("The capital of France is", " Paris")


def test_messages_need_a_chat_template():
    tokenizer = make_tokenizer(chat_template=None)
    with pytest.raises(SlimtuneError, match="chat template"):
        render(to_example(CHAT), tokenizer)
    with pytest.raises(SlimtuneError, match="text rows"):
        split_prompt_answer({"text": "hello"}, tokenizer)


def test_slow_tokenizer_without_offsets_is_refused():
    tokenizer = make_tokenizer()
    tokenizer.__class__ = type("SlowTokenizer", (type(tokenizer),), {"is_fast": False})
    with pytest.raises(SlimtuneError, match="not a fast tokenizer"):
        encoded(CHAT, tokenizer)


@pytest.mark.slow
def test_smollm2_tokenizer_masks_everything_but_the_answer_and_im_end(smollm2):
    from slimtune.data import demo_data_path, load_dataset, read_rows

    tokenizer = smollm2[1]
    row = read_rows(demo_data_path("test"))[0]
    answer = row["messages"][-1]["content"]
    result = encoded(row, tokenizer)
    trained = [
        t
        for t, label in zip(result["input_ids"], result["labels"], strict=True)
        if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(trained) == answer + "<|im_end|>"
    prompt, _ = split_prompt_answer(row, tokenizer)
    n = len(ids(tokenizer, prompt))
    assert result["labels"][:n] == [IGNORE_INDEX] * n
    assert result["labels"][n : n + len(trained)] == trained
    # The demo is short, so that a CPU fine-tune is quick: every row under 64 tokens.
    splits = load_dataset(demo_data_path("train"), tokenizer, eval_source=demo_data_path("test"))
    assert max(len(e["input_ids"]) for e in splits.train + splits.eval) < 64
