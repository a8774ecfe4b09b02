"""Write a 4-bit model folder that slimtune and transformers + bitsandbytes both load.

Layout, as transformers writes it for bitsandbytes 4-bit: config.json with a
`quantization_config`, model.safetensors with bitsandbytes' keys (`weight` packed uint8,
`weight.absmax`, `weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
`weight.quant_state.bitsandbytes__<type>`), generation_config.json and the tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from slimtune.choices import BNB_QUANT_TYPES
from slimtune.errors import SlimtuneError
from slimtune.files import atomic_folder
from slimtune.models.experts import ExpertList
from slimtune.quant import Linear4bit, save_quantized_safetensors

SLIMTUNE_QUANT_METHOD = "slimtune"


def save_quantized_model(model: nn.Module, tokenizer, output_dir: str | Path) -> Path:
    """Write `model` (with Linear4bit layers) and `tokenizer` to `output_dir`, atomically."""
    output_dir = Path(output_dir)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise SlimtuneError("save_quantized_model: the model has no 4-bit layers to save")
    if any(isinstance(m, ExpertList) for m in model.modules()):
        # bitsandbytes' layout has no 4-bit fused experts that transformers would load back.
        raise SlimtuneError(
            "save_quantized_model: 4-bit experts of a mixture of experts cannot be written in "
            "bitsandbytes' layout; write the model in float (e.g. merge without --quantize)"
        )
    check_output_dir(output_dir)
    with atomic_folder(output_dir) as tmp:
        save_quantized_safetensors(model, tmp / "model.safetensors")
        _write_config(model, tmp / "config.json")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return output_dir


def check_output_dir(output_dir: Path) -> None:
    """Refuse to overwrite: the output must not exist, or be an empty folder."""
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise SlimtuneError(f"output folder {output_dir} exists and is not empty")


def quantization_config(model: nn.Module) -> dict:
    """The `quantization_config` of config.json for this model's 4-bit layers."""
    from transformers import BitsAndBytesConfig

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    # The blocksize is not part of it: each weight's quant_state JSON carries its own.
    kinds = {(m.quant_type, m.double_quant) for m in layers}
    if len(kinds) != 1:
        raise SlimtuneError(f"the 4-bit layers mix quantization settings {sorted(kinds)}")
    quant_type, double_quant = kinds.pop()
    compute_dtype = layers[0].compute_dtype
    # Linear layers left in float must stay float when transformers rebuilds the model.
    skip = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    settings = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip or None,
    ).to_dict()
    if quant_type not in BNB_QUANT_TYPES:
        # Not loadable by transformers; a quant_method it does not know makes it refuse.
        settings["quant_method"] = SLIMTUNE_QUANT_METHOD
    return settings


def _write_config(model: nn.Module, path: Path) -> None:
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]  # as save_pretrained writes it
    config["quantization_config"] = quantization_config(model)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
