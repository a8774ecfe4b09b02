"""Where a model lives, so that inputs built on the CPU (tokenizer output, collated batches)
can follow it to a GPU."""

from __future__ import annotations

import torch
from torch import nn

from slimtune.errors import SlimtuneError


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


def resolve_device(name: str) -> torch.device:
    """The device named "auto" (a CUDA GPU when there is one, else the CPU), "cpu" or "cuda"."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SlimtuneError("device: cuda asked for, but torch sees no CUDA device here")
    if name not in ("cpu", "cuda"):
        raise SlimtuneError(f"device: {name!r} is not one of auto, cpu, cuda")
    return torch.device(name)
