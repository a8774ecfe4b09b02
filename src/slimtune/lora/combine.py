"""Combine adapters into a new one, as PEFT's add_weighted_adapter does.

- "cat": exactly sum_i w_i * dW_i, by stacking the adapters (rank = sum of ranks).
- "svd": sum_i w_i * dW_i truncated to `rank` by SVD (the best rank-`rank` approximation).
- "linear": A = sum_i sqrt(w_i s_i) A_i, B = sum_i sqrt(w_i s_i) B_i (same ranks only). Cheap and
  PEFT-compatible, but not the sum of the deltas: the cross terms B_i A_j remain.
The new adapter has alpha = r (scaling 1); it is added inactive.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.lora.adapters import check_names, lora_configs, lora_layers
from slimtune.lora.config import LoraConfig
from slimtune.lora.init import svd
from slimtune.lora.layer import LoraLinear

METHODS = ("cat", "svd", "linear")


def combine_adapters(
    model: nn.Module,
    weights: dict[str, float],
    new_name: str,
    method: str = "cat",
    rank: int | None = None,
) -> None:
    """Add adapter `new_name` combining the adapters in `weights` ({name: weight})."""
    if method not in METHODS:
        raise SlimtuneError(f"combine method must be one of {', '.join(METHODS)}, got {method!r}")
    check_names(model, list(weights))
    if new_name in lora_configs(model):
        raise SlimtuneError(f"adapter {new_name!r} already exists")
    ranks: dict[str, int] = {}
    with torch.no_grad():
        for path, layer in lora_layers(model):
            present = {n: w for n, w in weights.items() if n in layer.lora_A}
            if not present:
                continue
            if any(n in layer.lora_magnitude_vector for n in present):
                raise SlimtuneError(f"{path}: DoRA adapters cannot be combined")
            A, B = _combine(layer, present, method, rank, path)
            layer.add_adapter(new_name, r=A.shape[0], alpha=A.shape[0], scaling=1.0)
            layer.lora_A[new_name].weight.copy_(A)
            layer.lora_B[new_name].weight.copy_(B)
            layer.lora_A[new_name].weight.requires_grad_(False)
            layer.lora_B[new_name].weight.requires_grad_(False)
            ranks[path] = A.shape[0]
    top = max(ranks.values())
    odd = {re.escape(p): r for p, r in ranks.items() if r != top}
    lora_configs(model)[new_name] = LoraConfig(
        r=top, alpha=top, target_modules=sorted(ranks), rank_pattern=odd, alpha_pattern=dict(odd)
    )


def _combine(
    layer: LoraLinear, weights: dict[str, float], method: str, rank: int | None, path: str
) -> tuple[torch.Tensor, torch.Tensor]:
    As = [layer.lora_A[n].weight for n in weights]
    Bs = [layer.lora_B[n].weight for n in weights]
    scaled = [w * layer.scaling[n] for n, w in weights.items()]
    if method == "cat":
        return torch.cat([s * A for s, A in zip(scaled, As, strict=True)]), torch.cat(Bs, dim=1)
    if method == "svd":
        delta = sum(s * (B @ A) for s, A, B in zip(scaled, As, Bs, strict=True))
        k = rank or max(A.shape[0] for A in As)
        U, S, Vh = svd(delta)
        return Vh[:k].contiguous(), (U[:, :k] * S[:k]).contiguous()
    if len({A.shape[0] for A in As}) != 1:
        raise SlimtuneError(
            f"{path}: method 'linear' needs adapters of one rank; use 'cat' or 'svd'"
        )
    roots = [math.sqrt(abs(s)) for s in scaled]
    A = sum(math.copysign(r, s) * A for r, s, A in zip(roots, scaled, As, strict=True))
    B = sum(r * B for r, B in zip(roots, Bs, strict=True))
    return A, B
