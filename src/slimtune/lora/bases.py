"""The base layers LoRA can wrap, and a uniform view of their weight as [out, in]."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def linear4bit_class() -> type | None:
    """slimtune's 4-bit linear layer, or None while slimtune.quant does not provide it."""
    try:
        from slimtune.quant import Linear4bit
    except ImportError:
        return None
    return Linear4bit


def is_4bit(module: nn.Module) -> bool:
    cls = linear4bit_class()
    return cls is not None and isinstance(module, cls)


def is_supported_base(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | Conv1D) or is_4bit(module)


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
