"""Which parameters train, and an honest count of them against the whole model."""

from __future__ import annotations

from torch import nn

from slimtune.lora.adapters import adapter_parameters, lora_layers
from slimtune.quant import Linear4bit


def lora_parameters(model: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The LoRA parameters (A, B, DoRA magnitudes) of adapter `adapter_name`, or of all adapters."""
    params: list[nn.Parameter] = []
    for _, layer in lora_layers(model):
        params.extend(adapter_parameters(layer, adapter_name))
    return params


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameters. A 4-bit layer's weight counts as its logical
    out x in elements (not its packed bytes); a tied weight counts once."""
    seen: set[int] = set()
    trainable = total = 0
    for module in model.modules():
        packed = None
        if isinstance(module, Linear4bit):
            total += module.in_features * module.out_features
            packed = module.weight
        for p in module.parameters(recurse=False):
            if p is packed or id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """E.g. "trainable 1.84M of 136.4M (1.35%)"."""
    trainable, total = count_parameters(model)
    share = 100 * trainable / total if total else 0.0
    return f"trainable {_human(trainable)} of {_human(total)} ({share:.2f}%)"


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.2f}{unit}" if value < 100 else f"{value:.1f}{unit}"
    return str(n)
