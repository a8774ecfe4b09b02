"""From a TrainConfig to the things the loop needs: the model with its adapter, the data, and
at the end the files a user keeps. This is where train/ meets models/, quant/, lora/, data/."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.train.config import TrainConfig

DEFAULT_BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def build_model(config: TrainConfig) -> tuple[nn.Module, object]:
    """Load the base (in 4 bits for QLoRA) and make only the adapter (or, for full, all) train."""
    from slimtune.models import load_model

    quant = None
    if config.method == "qlora":
        from slimtune.quant import QuantConfig

        quant = QuantConfig(quant_type=config.quant_type, double_quant=config.double_quant)
    model, tokenizer = load_model(config.model, quant=quant, dtype=torch.float32)
    if config.chat_template is not None:
        from slimtune.models.chat_templates import set_chat_template

        set_chat_template(tokenizer, config.chat_template)  # saved with the adapter (save_final)
    model.config.use_cache = False
    if config.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model, tokenizer
    # The adapter's random init draws from the seeded RNG: the same seed, the same adapter.
    torch.manual_seed(config.seed)
    from slimtune.lora import LoraConfig, inject_adapter

    lora = LoraConfig(
        r=config.rank, alpha=config.alpha, dropout=config.dropout, target_modules=config.targets
    )
    inject_adapter(model, lora)
    return model, tokenizer


def build_data(config: TrainConfig, tokenizer, info=None):
    """Tokenized train/eval rows and the (prompt, answer) pairs that accuracy is measured on."""
    from slimtune.data import load_dataset, pack, pad_token_id, split_prompt_answer
    from slimtune.train.loop import TrainData

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
    from slimtune.data import pad_token_id
    from slimtune.data.preference import load_preference_dataset
    from slimtune.train.loop import TrainData

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
        from slimtune.lora import save_adapter

        save_adapter(model, output, base_model_name_or_path=config.model or DEFAULT_BASE_NAME)
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
