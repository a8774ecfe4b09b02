"""A base model and a trained adapter, loaded for generation and evaluation (`slimtune
generate`, `eval`): in 4 bits when the adapter was trained with QLoRA."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import yaml

from slimtune.errors import SlimtuneError
from slimtune.lora import load_adapter
from slimtune.models import load_model
from slimtune.models.chat_templates import saved_chat_template
from slimtune.quant import QuantConfig

QUANT_CHOICES = ("auto", "nf4", "fp4", "int4", "none")


def trained_quant(adapter: str | None) -> tuple[str, bool] | None:
    """(quant_type, double_quant) of the base an adapter was trained on with QLoRA, read from
    the config.yaml `slimtune train` writes next to it; None for LoRA, full or unknown."""
    if not adapter:
        return None
    path = Path(adapter) / "config.yaml"
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return None
    if not isinstance(config, dict) or config.get("method", "qlora") != "qlora":
        return None
    return str(config.get("quant_type", "nf4")), bool(config.get("double_quant", True))


def load_for_inference(
    model: str | None,
    adapter: str | None,
    *,
    quant: str = "auto",
    compute_dtype: torch.dtype | None = None,
):
    """(model, tokenizer) with the LoRA adapter folder `adapter` loaded if given.

    quant: "nf4" / "fp4" / "int4" load the base straight into 4 bits (double quantization);
    "auto" does so when the adapter was trained with QLoRA (as it was trained), and a 4-bit
    model folder always loads as stored; "none" loads it in float (in `compute_dtype` when that
    is bfloat16 or float16).
    """
    if quant not in QUANT_CHOICES:
        raise SlimtuneError(f"quant: unknown value {quant!r}; expected {', '.join(QUANT_CHOICES)}")
    config = None
    if quant == "auto":
        trained = trained_quant(adapter)
        if trained is not None:
            config = QuantConfig(quant_type=trained[0], double_quant=trained[1])
    elif quant != "none":
        config = QuantConfig(quant_type=quant, double_quant=True)
    if config is not None and compute_dtype is not None:
        config = dataclasses.replace(config, compute_dtype=compute_dtype)
    float_dtype = compute_dtype if config is None and compute_dtype is not None else torch.float32
    network, tokenizer = load_model(model, quant=config, dtype=float_dtype)
    if adapter:
        load_adapter(network, adapter)
        # The template the adapter was trained with (saved beside it) renders its prompts.
        tokenizer.chat_template = saved_chat_template(adapter) or tokenizer.chat_template
    network.eval()
    return network, tokenizer
