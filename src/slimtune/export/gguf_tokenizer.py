"""The tokenizer of a GGUF export: llama.cpp's `tokenizer.*` keys, with the chat template.

A model that came from a GGUF file (slimtune's default SmolLM2, or any `.gguf` base) keeps that
file's tokenizer keys verbatim: llama.cpp already reads them right. A model from a Hugging Face
folder gets them rebuilt from its fast tokenizer as llama.cpp's `convert_hf_to_gguf.py` does for
byte-level BPE ("gpt2") tokenizers: the vocabulary in id order with token types, the merges and
special token ids (`gguf.SpecialVocab`), and the pre-tokenizer name that llama.cpp identifies by
hashing the tokens of a fixed text.
"""

from __future__ import annotations

import json
import tempfile
from hashlib import sha256
from pathlib import Path

from slimtune.errors import SlimtuneError

# llama.cpp's pre-tokenizer check text (`get_vocab_base_pre` in convert_hf_to_gguf.py).
CHECK_TEXT = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"  # noqa: E501
# sha256 of str(tokenizer.encode(CHECK_TEXT)) -> llama.cpp's pre-tokenizer name, for the model
# families slimtune exports (values from llama.cpp's table).
KNOWN_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def add_tokenizer(writer, tokenizer, config, source_gguf: str | Path | None) -> None:
    """Add the tokenizer keys to `writer` (see the module docstring)."""
    if source_gguf is not None:
        copy_tokenizer_keys(writer, source_gguf)
    else:
        build_tokenizer_keys(writer, tokenizer, config.vocab_size)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


def copy_tokenizer_keys(writer, source_gguf: str | Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(source_gguf))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.") or key == gguf.Keys.Tokenizer.CHAT_TEMPLATE:
            continue
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), main, sub)


def pre_tokenizer_name(tokenizer) -> str:
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    return KNOWN_PRE.get(digest, "default")


def build_tokenizer_keys(writer, tokenizer, vocab_size: int) -> None:
    import gguf

    if not getattr(tokenizer, "is_fast", False):
        raise SlimtuneError("GGUF export needs a fast (tokenizer.json) tokenizer")
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise SlimtuneError(
            f"GGUF export writes BPE tokenizers; this one is {model.get('type')!r}: export from "
            "the model's GGUF file instead (--model FILE.gguf) so its tokenizer is copied"
        )
    tokens, types = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
        special.chat_template = None  # written by add_tokenizer, from the tokenizer itself
        special.add_to_gguf(writer, quiet=True)


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order and their llama.cpp types (normal, control, user-defined, unused)."""
    import gguf

    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise SlimtuneError(f"tokenizer has id {max(by_id)} >= the model's vocab_size {vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(
                gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            )
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types
