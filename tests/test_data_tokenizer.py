"""The data tests' tokenizer (tests/helpers.py `make_tokenizer`: byte-level BPE built offline in
code, ChatML template like SmolLM2's) does what the data tests assume of it."""

from helpers import make_tokenizer


def test_tokenizer_round_trips_text_and_special_tokens():
    tokenizer = make_tokenizer()
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_bos_tokenizer_adds_bos_only_with_special_tokens():
    tokenizer = make_tokenizer(bos=True)
    bos = tokenizer.convert_tokens_to_ids("<s>")
    assert tokenizer("hello")["input_ids"][0] == bos
    assert bos not in tokenizer("hello", add_special_tokens=False)["input_ids"]
