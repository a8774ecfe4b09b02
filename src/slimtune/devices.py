"""Where a model lives, so that inputs built on the CPU (tokenizer output, collated batches)
can follow it to a GPU."""

from __future__ import annotations

import torch
from torch import nn


def device_of(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (or buffer: a 4-bit base holds only buffers);
    the CPU if it has neither."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch of tensors (any mapping of them, e.g. tokenizer output) on `device`."""
    return {key: value.to(device) for key, value in batch.items()}
