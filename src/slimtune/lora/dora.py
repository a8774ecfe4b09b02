"""DoRA (Liu et al. 2024): the adapted weight is m * (W + s*BA) / ||W + s*BA||, row by row.

Computed as PEFT does, so outputs and gradients match it: the norm is detached (section 4.3 of
the paper) and the base output is reused instead of multiplying by the weight again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Magnitude(nn.Module):
    """DoRA's learnable magnitude m, one per output row (PEFT's lora_magnitude_vector)."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.norm(weight, dim=1)


def dora_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor,
    weight: torch.Tensor,
    base_out: torch.Tensor | None,
) -> torch.Tensor:
    """What DoRA adds to the base output. `base_out` is x @ W^T without bias, or None to compute it
    (when dropout changed x, the base output of the undropped x cannot be reused)."""
    with torch.no_grad():
        norm = row_norm(weight + scaling * (B @ A))
    scale = magnitude / norm
    if base_out is None:
        base_out = F.linear(x, weight)
    elif base_out.dtype != x.dtype:
        base_out = base_out.to(x.dtype)
    lora_out = F.linear(F.linear(x, A), B)
    return (scale - 1) * base_out + scale * (lora_out * scaling)
