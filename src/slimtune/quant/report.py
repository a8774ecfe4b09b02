"""storage_report: what a (partly) quantized model costs in bytes and bits per parameter."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slimtune.quant.linear import Linear4bit


@dataclass(frozen=True)
class LayerStorage:
    name: str
    params: int  # weights represented (out * in); the bias is counted with the rest of the model
    bytes: int  # packed codes + absmax (+ nested absmax and offset with double quantization)

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes / self.params


@dataclass(frozen=True)
class StorageReport:
    layers: list[LayerStorage] = field(default_factory=list)
    total_params: int = 0  # every parameter of the model, quantized weights included
    total_bytes: int = 0  # every parameter and buffer, shared tensors counted once

    @property
    def quantized_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def quantized_bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    @property
    def quantized_bits_per_param(self) -> float:
        return 8 * self.quantized_bytes / self.quantized_params if self.layers else 0.0

    @property
    def bits_per_param(self) -> float:
        return 8 * self.total_bytes / self.total_params if self.total_params else 0.0

    def format(self, per_layer: bool = False) -> str:
        lines = [f"{'layer':<48} {'params':>12} {'bytes':>12} {'bits/param':>10}"]
        if per_layer:
            lines += [
                f"{s.name:<48} {s.params:>12,} {s.bytes:>12,} {s.bits_per_param:>10.3f}"
                for s in self.layers
            ]
        lines.append(
            f"{f'quantized layers ({len(self.layers)})':<48} {self.quantized_params:>12,} "
            f"{self.quantized_bytes:>12,} {self.quantized_bits_per_param:>10.3f}"
        )
        lines.append(
            f"{'whole model':<48} {self.total_params:>12,} {self.total_bytes:>12,} "
            f"{self.bits_per_param:>10.3f}"
        )
        return "\n".join(lines)


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def storage_report(model: nn.Module) -> StorageReport:
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            state = (module.weight, module.absmax, module.nested_absmax, module.offset)
            nbytes = sum(_nbytes(t) for t in state)
            layers.append(LayerStorage(name, module.in_features * module.out_features, nbytes))

    seen: set[int] = set()
    total_bytes = total_params = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:  # tied weights are stored once
            continue
        seen.add(tensor.data_ptr())
        total_bytes += _nbytes(tensor)
        if isinstance(tensor, nn.Parameter):
            total_params += tensor.numel()
    total_params += sum(layer.params for layer in layers)
    return StorageReport(layers, total_params, total_bytes)
