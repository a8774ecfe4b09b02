"""From a TrainConfig to the things the loop needs: the model with its adapter, the data, and
at the end the files a user keeps. This is where train/ meets models/, quant/, lora/, data/."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slimtune.data import load_dataset, load_preference_dataset, pack, split_prompt_answer
from slimtune.errors import SlimtuneError
from slimtune.lora import LoraConfig, inject_adapter, save_adapter
from slimtune.models import load_model
from slimtune.models.chat_templates import set_chat_template
from slimtune.quant import QuantConfig
from slimtune.tokens import pad_token_id
from slimtune.train.config import TrainConfig

DEFAULT_BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class TrainData:
    """Tokenized rows ({"input_ids", "labels"}) and, for accuracy, (prompt, answer) pairs."""

    train: list[dict]
    eval: list[dict] = field(default_factory=list)
    eval_pairs: list[tuple[str, str]] = field(default_factory=list)
    pad_token_id: int = 0


def build_model(config: TrainConfig) -> tuple[nn.Module, object]:
    """Load the base (in 4 bits for QLoRA) and make only the adapter (or, for full, all) train."""
    quant = None
    if config.method == "qlora":
        quant = QuantConfig(quant_type=config.quant_type, double_quant=config.double_quant)
    model, tokenizer = load_model(config.model, quant=quant, dtype=torch.float32)
    if config.chat_template is not None:
        set_chat_template(tokenizer, config.chat_template)  # saved with the adapter (save_final)
    model.config.use_cache = False
    if config.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model, tokenizer
    # The adapter's random init draws from the seeded RNG: the same seed, the same adapter.
    torch.manual_seed(config.seed)
    lora = LoraConfig(
        r=config.rank, alpha=config.alpha, dropout=config.dropout, target_modules=config.targets
    )
    inject_adapter(model, lora)
    return model, tokenizer


def build_data(config: TrainConfig, tokenizer, info=None):
    """Tokenized train/eval rows and the (prompt, answer) pairs that accuracy is measured on."""
    if config.data is None:
        raise SlimtuneError("no training data: give `data:` in the config or --data FILE")
    if config.objective != "sft":
        return _preference_data(config, tokenizer)
    splits = load_dataset(
        config.data,
        tokenizer,
        max_length=config.max_length,
        train_on_prompt=config.train_on_prompt,
        eval_fraction=0.0 if config.eval_data else config.eval_fraction,
        eval_source=config.eval_data,
        seed=config.seed,
    )
    train = pack(splits.train, config.max_length) if config.packing else splits.train
    pairs = [split_prompt_answer(row, tokenizer, splits.fmt) for row in splits.eval_rows]
    return TrainData(
        train=train, eval=splits.eval, eval_pairs=pairs, pad_token_id=pad_token_id(tokenizer)
    )


def _preference_data(config: TrainConfig, tokenizer):
    """Tokenized preference pairs for DPO / ORPO (their eval is on pairs, not generation)."""
    if config.packing:
        raise SlimtuneError(f"packing: not supported with objective {config.objective}")
    splits = load_preference_dataset(
        config.data,
        tokenizer,
        max_length=config.max_length,
        eval_fraction=0.0 if config.eval_data else config.eval_fraction,
        eval_source=config.eval_data,
        seed=config.seed,
    )
    return TrainData(train=splits.train, eval=splits.eval, pad_token_id=pad_token_id(tokenizer))


def save_final(model: nn.Module, tokenizer, config: TrainConfig, output: Path) -> None:
    """The adapter in PEFT's format at the top of `output` (or the whole model, for full)."""
    if config.method == "full" or hasattr(model, "peft_config"):
        # A whole model, or a model PEFT wrapped (a library caller's): its own safetensors save.
        model.save_pretrained(output)
    else:
        save_adapter(model, output, base_model_name_or_path=config.model or DEFAULT_BASE_NAME)
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
