"""Helpers (no tests) for the serve and export tests: a character tokenizer with a chat template
for the tiny LLaMA of conftest, and PEFT-format adapters with non-zero weights."""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHARS = string.ascii_letters + string.digits + " .,:;!?'\"-_\n()[]/+=*#"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_char_tokenizer():
    """A tokenizer of single characters (vocab < 128), BOS added, ChatML template."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + sorted(set(CHARS)))}
    assert len(vocab) <= 128
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>"))
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["</s>", "<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_model(folder: Path, seed: int = 0, **overrides) -> Path:
    """The conftest tiny LLaMA plus the char tokenizer, as an HF folder (safetensors)."""
    from conftest import make_tiny_llama

    model = make_tiny_llama(seed, **overrides)
    tokenizer = make_char_tokenizer()
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_peft_adapter(model, folder: Path, seed: int, r: int = 4) -> Path:
    """A PEFT LoRA adapter on all linear layers of `model`, with random (non-zero) B so that it
    changes the outputs. `model` is left untouched."""
    import copy

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(folder)
    return folder
