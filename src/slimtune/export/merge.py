"""Fold a LoRA adapter into its base model and write the result as a standalone model folder.

The adapter is merged layer by layer, in place (`slimtune.lora.merge_adapter`), and the LoRA
wrappers are then replaced by their merged base layers: the model is never copied whole.
With `qlora` the base is loaded in 4 bits as QLoRA trained on it (True: QLoRA's NF4, or the
QuantConfig of the run), and merging happens on the dequantized weights; `quantize="nf4"`
writes the merged model back in 4 bits (bitsandbytes' layout), which is where merged QLoRA
adapters lose accuracy: the re-quantization error of the merged weights is measured and
returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from slimtune.data import split_prompt_answer
from slimtune.errors import SlimtuneError
from slimtune.export.folder import DTYPES, write_model_folder
from slimtune.export.gptq import gptq_linear4bit, input_hessians
from slimtune.lora import load_adapter, lora_configs, lora_layers, merge_adapter
from slimtune.models import load_model, save_quantized_model
from slimtune.models.chat_templates import saved_chat_template
from slimtune.models.experts import fuse_experts
from slimtune.quant import Linear4bit, QuantConfig, frozen_linear, select_linear_layers

ADAPTER = "default"


@dataclass
class ExportReport:
    output: Path
    merged_layers: int
    quantized: bool
    requant_rel_error: float | None  # ||Q(W') - W'|| / ||W'|| over re-quantized layers

    def __str__(self) -> str:
        text = f"wrote {self.output}: adapter merged into {self.merged_layers} layers"
        if self.quantized:
            text += ", re-quantized to NF4"
        if self.requant_rel_error is not None:
            text += f" (relative weight error added: {self.requant_rel_error:.4%})"
        return text


def merge_to_folder(
    model: str | Path | None,
    adapter: str | Path,
    output: str | Path,
    *,
    dtype: str = "fp32",
    quantize: str | None = None,
    qlora: bool | QuantConfig = False,
    max_shard_bytes: int = 2 * 1024**3,
    calibration: list[dict] | None = None,
) -> ExportReport:
    """Merge `adapter` into `model` and write `output` (see the module docstring).

    With `quantize="nf4"` and `calibration` rows (a few hundred rows of the training data), the
    merged weights are rounded to NF4 with error compensation (`slimtune.export.gptq`) instead
    of plainly, which keeps the fine-tune that plain rounding erases."""
    if quantize not in (None, "nf4"):
        raise SlimtuneError(f"--quantize {quantize!r}: only 'nf4' is supported")
    if dtype not in DTYPES:
        raise SlimtuneError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    base = trained_base(qlora)
    network, tokenizer = load_model(model, quant=base)
    with_adapter_template(tokenizer, adapter)
    load_adapter(network, adapter, ADAPTER)
    # A base already in the output's format is re-quantized layer by layer where merged.
    requantize = bool(quantize and base and base.quant_type == quantize and not calibration)
    merged = merge_adapter(network, ADAPTER, requantize=requantize)
    unwrap_lora_layers(network)
    error = merged.requant_rel_error if merged.requantized else None
    if quantize:
        if calibration:
            dequantize_layers(network)
            error = gptq_quantize_layers(network, tokenizer, calibration)
        elif not requantize:
            dequantize_layers(network)  # a base in another 4-bit format: float first
            error = quantize_float_layers(network)
        save_quantized_model(network, tokenizer, output)
    else:
        dequantize_layers(network)
        fuse_experts(network)  # a mixture of experts back in transformers' fused layout
        write_model_folder(network, tokenizer, output, dtype=dtype, max_shard_bytes=max_shard_bytes)
    return ExportReport(Path(output), merged.layers, bool(quantize), error)


def trained_base(qlora: bool | QuantConfig) -> QuantConfig | None:
    """The 4-bit format of the base an adapter was trained on: None for a float base, QLoRA's
    NF4 for True, else the QuantConfig given."""
    if not qlora:
        return None
    return qlora if isinstance(qlora, QuantConfig) else QuantConfig()


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def unwrap_lora_layers(model: nn.Module) -> None:
    """Put each (merged) LoRA layer's base layer back in its place."""
    for path, layer in list(lora_layers(model)):
        _replace(model, path, layer.base_layer)
    lora_configs(model).clear()


def dequantize_layers(model: nn.Module) -> None:
    """Turn the 4-bit layers the adapter did not touch into float Linear layers."""
    for path, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            bias = None if module.bias is None else module.bias.float()
            _replace(model, path, frozen_linear(module.dequantize().float(), bias))


def quantize_float_layers(model: nn.Module) -> float:
    """Quantize every Linear layer but the output head to NF4, one layer at a time (as
    `quantize_model` does); return the relative weight error that quantization added."""
    config = QuantConfig("nf4")
    err = norm = 0.0
    for path in select_linear_layers(model):
        module = model.get_submodule(path)
        quantized = Linear4bit.from_linear(module, config)
        weight = module.weight.detach().float()
        err += float((quantized.dequantize().float() - weight).square().sum())
        norm += float(weight.square().sum())
        _replace(model, path, quantized)
    return (err / norm) ** 0.5 if norm else 0.0


def with_adapter_template(tokenizer, adapter: str | Path):
    """`tokenizer` given the chat template the adapter was trained with, when one is saved beside
    it (a base model without a template trains with `--chat-template`): exports carry it."""
    tokenizer.chat_template = saved_chat_template(adapter) or tokenizer.chat_template
    return tokenizer


def calibration_batches(tokenizer, rows: list[dict]):
    """Input ids of each row as trained on (prompt as the model sees it, then the answer)."""
    import torch

    for row in rows:
        prompt, answer = split_prompt_answer(row, tokenizer)
        ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
        yield torch.tensor([ids[:2048]])


def gptq_quantize_layers(model: nn.Module, tokenizer, rows: list[dict]) -> float:
    """`quantize_float_layers` with GPTQ rounding on Hessians from `rows`; returns the relative
    weight error added (larger than plain rounding's: GPTQ trades weight error for output error)."""
    paths = select_linear_layers(model)
    hessians = input_hessians(model, paths, calibration_batches(tokenizer, rows))
    config = QuantConfig("nf4")
    err = norm = 0.0
    for path in paths:
        module = model.get_submodule(path)
        quantized = gptq_linear4bit(module, hessians.pop(path), config)
        weight = module.weight.detach().float()
        err += float((quantized.dequantize().float() - weight).square().sum())
        norm += float(weight.square().sum())
        _replace(model, path, quantized)
    return (err / norm) ** 0.5 if norm else 0.0
