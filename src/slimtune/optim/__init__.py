"""8-bit and paged AdamW, and optimizer state as safetensors.

`build_optimizer(name, ...)` is what the training loop calls; `name` is the train config's
`optimizer` key.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from slimtune.choices import OPTIMIZERS
from slimtune.errors import SlimtuneError
from slimtune.optim.adamw import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit
from slimtune.optim.checkpoint import (
    flatten_state_dict,
    load_optimizer_state,
    save_optimizer_state,
    unflatten_state_dict,
)

__all__ = [
    "OPTIMIZERS",
    "AdamW",
    "AdamW8bit",
    "PagedAdamW",
    "PagedAdamW8bit",
    "build_optimizer",
    "flatten_state_dict",
    "load_optimizer_state",
    "save_optimizer_state",
    "state_bytes",
    "unflatten_state_dict",
]


def build_optimizer(
    name: str,
    parameters: Iterable[Any],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """The optimizer called `name` (adamw | adamw8bit | paged_adamw | paged_adamw8bit)."""
    kwargs = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        # Plain AdamW: torch's own (foreach kernels), the fastest 32-bit update.
        return torch.optim.AdamW(parameters, **kwargs)
    classes = {"adamw8bit": AdamW8bit, "paged_adamw": PagedAdamW, "paged_adamw8bit": PagedAdamW8bit}
    if name not in classes:
        raise SlimtuneError(
            f"optimizer: unknown value {name!r}; expected one of {', '.join(OPTIMIZERS)}"
        )
    return classes[name](parameters, **kwargs)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state tensors (moments, quantization scales), step counters excluded."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for key, value in state.items()
        if torch.is_tensor(value) and key != "step"
    )
