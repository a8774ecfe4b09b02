"""A base model and a trained adapter, loaded for generation and evaluation (`slimtune
generate`, `eval`): in 4 bits when the adapter was trained with QLoRA."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from slimtune.choices import INFERENCE_QUANTS
from slimtune.errors import SlimtuneError
from slimtune.lora import load_adapter
from slimtune.models import load_model
from slimtune.models.chat_templates import saved_chat_template
from slimtune.quant import QuantConfig
from slimtune.train.config import TrainConfig, load_config
from slimtune.train.setup import quant_config


def trained_config(adapter: str | Path | None) -> TrainConfig | None:
    """The training config of an adapter: the config.yaml `slimtune train` writes next to it;
    None where there is none, or none this version reads."""
    path = Path(adapter) / "config.yaml" if adapter else None
    if path is None or not path.is_file():
        return None
    try:
        return load_config(path)
    except SlimtuneError:
        return None  # the caller's own settings hold


def trained_quant(adapter: str | Path | None) -> QuantConfig | None:
    """The 4-bit storage of the base an adapter was trained on with QLoRA (from its training
    config); None for LoRA, full, or no readable config."""
    config = trained_config(adapter)
    return quant_config(config) if config is not None and config.method == "qlora" else None


def load_for_inference(
    model: str | None,
    adapter: str | None,
    *,
    quant: str = "auto",
    compute_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
):
    """(model, tokenizer) with the LoRA adapter folder `adapter` loaded if given, on `device`.

    quant: "nf4" / "fp4" / "int4" load the base straight into 4 bits (the training config's
    defaults for the rest: blocksize 64, double quantization); "auto" does so when the adapter
    was trained with QLoRA (as it was trained), and a 4-bit model folder always loads as stored;
    "none" loads it in float (in `compute_dtype` when that is bfloat16 or float16).
    """
    if quant not in INFERENCE_QUANTS:
        expected = ", ".join(INFERENCE_QUANTS)
        raise SlimtuneError(f"quant: unknown value {quant!r}; expected {expected}")
    config = None
    if quant == "auto":
        config = trained_quant(adapter)
    elif quant != "none":
        config = quant_config(TrainConfig(quant_type=quant))
    if config is not None and compute_dtype is not None:
        config = dataclasses.replace(config, compute_dtype=compute_dtype)
    float_dtype = compute_dtype if config is None and compute_dtype is not None else torch.float32
    network, tokenizer = load_model(model, quant=config, dtype=float_dtype)
    if adapter:
        load_adapter(network, adapter)
        # The template the adapter was trained with (saved beside it) renders its prompts.
        tokenizer.chat_template = saved_chat_template(adapter) or tokenizer.chat_template
    network.to(device).eval()  # loaded on the CPU, 4-bit layers as codes: moves what it keeps
    return network, tokenizer
