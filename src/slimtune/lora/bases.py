"""The base layers LoRA can wrap, and a uniform view of their weight as [out, in]."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from slimtune.quant import Linear4bit


def is_supported_base(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | Conv1D | Linear4bit)


def features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported base layer."""
    if isinstance(module, Conv1D):
        return module.nx, module.nf  # Conv1D stores its weight as [in, out]
    return module.in_features, module.out_features


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The base weight as a float [out, in] tensor (dequantized for a 4-bit layer)."""
    if isinstance(module, Conv1D):
        return module.weight.t()
    if isinstance(module, nn.Linear):
        return module.weight
    return module.dequantize()
