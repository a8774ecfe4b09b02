"""Fold an adapter into the base weights and take it out again.

Float bases are updated in place and unmerge is exact within float rounding. A 4-bit base is
dequantized and merged into a float layer, or re-quantized (`requantize=True`); the original 4-bit
layer is kept so unmerge restores it bit for bit. Re-quantizing adds error: it is measured and
returned, since it is the known weak point of merging QLoRA adapters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from slimtune.lora.adapters import check_names, lora_layers
from slimtune.quant import Linear4bit


@dataclass
class MergeReport:
    layers: int  # layers the adapter was merged into
    requantized: int  # of which re-quantized to 4 bits
    requant_rel_error: float  # ||Q(W') - W'|| / ||W'|| over all re-quantized layers (0 if none)

    def __str__(self) -> str:
        text = f"merged into {self.layers} layers"
        if self.requantized:
            text += (
                f"; re-quantized {self.requantized}, relative error added "
                f"{self.requant_rel_error:.4%}"
            )
        return text


def merge_adapter(model: nn.Module, adapter_name: str, requantize: bool = False) -> MergeReport:
    check_names(model, [adapter_name])
    layers = requantized = 0
    err = norm = 0.0
    for _, layer in lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        report = layer.merge(
            adapter_name, requantize=requantize and isinstance(layer.base_layer, Linear4bit)
        )
        layers += 1
        if report is not None:
            requantized += 1
            err, norm = err + report[0], norm + report[1]
    rel = math.sqrt(err / norm) if norm else 0.0
    return MergeReport(layers=layers, requantized=requantized, requant_rel_error=rel)


def unmerge_adapter(model: nn.Module, adapter_name: str) -> None:
    check_names(model, [adapter_name])
    for _, layer in lora_layers(model):
        if adapter_name in layer.merged_adapters:
            layer.unmerge(adapter_name)
