"""Checkpoints that store a mixture of experts one expert at a time, for models that hold them
fused.

transformers keeps the experts of Mixtral, Qwen2-MoE, Qwen3-MoE ... as two 3-D parameters,
`experts.gate_up_proj` (experts, 2 x intermediate, hidden: gate rows, then up rows) and
`experts.down_proj` (experts, hidden, intermediate), but reads and writes checkpoints in the
original per-expert layout (`experts.<e>.gate_proj.weight`, or Mixtral's `w1`/`w3`/`w2` under
`block_sparse_moe`). slimtune loads them into an ExpertList (one layer per expert, see
`slimtune.models.experts`): each expert's gate and up rows are concatenated as transformers'
own conversion does (tested against it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# One expert's projection: `<block>.experts.<e>.<projection>.weight`.
EXPERT_KEY = re.compile(
    r"^(?P<block>.+)\.(?:block_sparse_moe|mlp)\.experts\.(?P<expert>\d+)\."
    r"(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
# Which fused parameter each projection goes to, and its place in the concatenation.
FUSED = {
    "gate_proj": ("gate_up_proj", 0),
    "w1": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "w3": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
    "w2": ("down_proj", 0),
}


@dataclass(frozen=True)
class ExpertPart:
    target: str  # the expert's layer weight, e.g. model.layers.0.mlp.experts.gate_up_proj.3.weight
    slot: int  # 0 = gate (or down), 1 = up
    slots: int  # parts the layer's weight is made of: 2 for gate_up_proj, 1 for down_proj


def renamed(key: str) -> str:
    """Mixtral's `block_sparse_moe` is `mlp` in transformers' module tree (router included)."""
    return key.replace(".block_sparse_moe.", ".mlp.")


def expert_part(key: str) -> ExpertPart | None:
    """Which expert layer (of an ExpertList) one per-expert checkpoint tensor belongs to."""
    match = EXPERT_KEY.match(key)
    if match is None:
        return None
    fused, slot = FUSED[match["proj"]]
    target = f"{match['block']}.mlp.experts.{fused}.{int(match['expert'])}.weight"
    return ExpertPart(target, slot, 2 if fused == "gate_up_proj" else 1)


def split_fused(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """A fused (experts, out, in) checkpoint tensor as the weights of the ExpertList's layers."""
    if not key.endswith((".experts.gate_up_proj", ".experts.down_proj")) or tensor.dim() != 3:
        return None
    return {f"{key}.{e}.weight": tensor[e] for e in range(tensor.shape[0])}


class ExpertStacker:
    """Collects the parts of an expert's gate_up weight (gate rows, then up rows)."""

    def __init__(self) -> None:
        self.parts: dict[str, dict[int, torch.Tensor]] = {}

    def add(self, part: ExpertPart, tensor: torch.Tensor) -> torch.Tensor | None:
        """Store one part; returns the layer's weight once its last part has arrived."""
        parts = self.parts.setdefault(part.target, {})
        parts[part.slot] = tensor
        if len(parts) < part.slots:
            return None
        del self.parts[part.target]
        return torch.cat([parts[s] for s in range(part.slots)])

    def pending(self) -> list[str]:
        return sorted(self.parts)
