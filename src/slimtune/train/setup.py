"""From a TrainConfig to the things the loop needs: the model with its adapter, the data, and
at the end the files a user keeps. This is where train/ meets models/, quant/, lora/, data/."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slimtune.data import load_dataset, load_preference_dataset, pack, split_prompt_answer
from slimtune.errors import SlimtuneError
from slimtune.lora import LoraConfig, find_targets, inject_adapter, pissa_to_lora, save_adapter
from slimtune.models import load_model
from slimtune.models.chat_templates import set_chat_template
from slimtune.models.streaming import KeepPart
from slimtune.quant import QuantConfig, quantize_model, select_linear_layers
from slimtune.tokens import pad_token_id
from slimtune.train.config import QUANT_KEYS, TrainConfig

DEFAULT_BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class TrainData:
    """Tokenized rows ({"input_ids", "labels"}) and, for accuracy, (prompt, answer) pairs."""

    train: list[dict]
    eval: list[dict] = field(default_factory=list)
    eval_pairs: list[tuple[str, str]] = field(default_factory=list)
    pad_token_id: int = 0


def build_model(config: TrainConfig, keep_part: KeepPart | None = None) -> tuple[nn.Module, object]:
    """Load the base (in 4 bits for QLoRA) and make only the adapter (or, for full, all) train.

    `keep_part` (--fsdp: slimtune.dist.LoadedPart) keeps each process's part of the base as it
    loads; not with DoRA, whose magnitudes are computed from the whole base weights."""
    quant = quant_config(config) if config.method == "qlora" else None
    # LoftQ quantizes the layers it adapts itself, from their float weights: they load in float.
    load_quant = None if config.init == "loftq" else quant
    keep_part = None if config.use_dora else keep_part
    model, tokenizer = load_model(
        config.model, quant=load_quant, dtype=torch.float32, keep_part=keep_part
    )
    if config.chat_template is not None:
        set_chat_template(tokenizer, config.chat_template)  # saved with the adapter (save_final)
    model.config.use_cache = False
    if config.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model, tokenizer
    # The adapter's random init draws from the seeded RNG: the same seed, the same adapter.
    torch.manual_seed(config.seed)
    lora = lora_config(config)
    if config.init == "loftq":
        _quantize_all_but(model, find_targets(model, lora), quant)
    inject_adapter(model, lora)
    return model, tokenizer


def quant_config(config: TrainConfig) -> QuantConfig:
    """The 4-bit storage of a QLoRA run's base."""
    return QuantConfig(**{key: getattr(config, key) for key in QUANT_KEYS})


def lora_config(config: TrainConfig) -> LoraConfig:
    """The adapter a run trains."""
    return LoraConfig(
        r=config.rank,
        alpha=config.alpha,
        dropout=config.dropout,
        target_modules=config.targets,
        rank_pattern=dict(config.rank_pattern),
        alpha_pattern=dict(config.alpha_pattern),
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        init=config.init,
        # One LoftQ step leaves the base exactly what loading it in 4 bits gives, so the adapter
        # also fits the base that `generate`, `serve` and PEFT load; more steps would not.
        loftq_iters=1,
        loftq_quant=quant_config(config) if config.init == "loftq" else None,
    )


def _quantize_all_but(model: nn.Module, adapted: list[str], quant: QuantConfig) -> None:
    """The linear layers a QLoRA load would quantize, but those the adapter takes (LoftQ's)."""
    skip = set(adapted)
    rest = [name for name in select_linear_layers(model) if name not in skip]
    if rest:
        quantize_model(model, quant, targets=rest)


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
        if config.init == "pissa":
            pissa_to_lora(model)  # a plain LoRA adapter on the original weights, as PEFT saves it
        save_adapter(model, output, base_model_name_or_path=config.model or DEFAULT_BASE_NAME)
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
