"""A small real tokenizer, built offline in code, for the data tests (and a check of it).

Byte-level BPE trained on a few sentences, wrapped in PreTrainedTokenizerFast, with a ChatML
chat template like SmolLM2's. Other test_data_* files import `make_tokenizer` from here.
"""

from __future__ import annotations

import functools

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A template that closes no turn: slimtune must append EOS itself.
OPEN_TURNS = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Write the date as YYYY-MM-DD. Invoice paid on March 5th, 2021. 2021-03-05",
    "Below is an instruction that describes a task. Write a response that completes it.",
    "system user assistant human gpt Instruction Input Response hello world answer question",
    "Translate to French: cheese and bread. fromage et pain. Count 1 2 3 4 5 6 7 8 9 0.",
]


@functools.cache
def _bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer.to_str()


def make_tokenizer(chat_template: str | None = CHATML, eos: str = "<|im_end|>", bos: bool = False):
    """A fast tokenizer; `bos=True` makes it put <s> before every text, as LLaMA's does."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_bpe())
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos, pad_token="<pad>", bos_token="<s>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


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
