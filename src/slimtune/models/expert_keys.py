"""Checkpoints that store a mixture of experts one expert at a time, for models that hold them
fused.

transformers keeps the experts of Mixtral, Qwen2-MoE, Qwen3-MoE ... as two 3-D parameters,
`experts.gate_up_proj` (experts, 2 x intermediate, hidden: gate rows, then up rows) and
`experts.down_proj` (experts, hidden, intermediate), but reads and writes checkpoints in the
original per-expert layout (`experts.<e>.gate_proj.weight`, or Mixtral's `w1`/`w3`/`w2` under
`block_sparse_moe`). Loading tensor by tensor, slimtune stacks the parts itself, the way
transformers' own conversion does (tested against it).
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
    target: (
        str  # the fused parameter's name in the model, e.g. model.layers.0.mlp.experts.down_proj
    )
    expert: int
    slot: int  # 0 = gate (or down), 1 = up


def renamed(key: str) -> str:
    """Mixtral's `block_sparse_moe` is `mlp` in transformers' module tree (router included)."""
    return key.replace(".block_sparse_moe.", ".mlp.")


def expert_part(key: str) -> ExpertPart | None:
    """Where one per-expert checkpoint tensor goes, or None if `key` is not one."""
    match = EXPERT_KEY.match(key)
    if match is None:
        return None
    fused, slot = FUSED[match["proj"]]
    target = f"{match['block']}.mlp.experts.{fused}"
    return ExpertPart(target, int(match["expert"]), slot)


class ExpertStacker:
    """Collects per-expert tensors until a fused parameter is complete, then hands it out."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = shapes  # fused parameter name -> its shape in the model
        self.parts: dict[str, dict[tuple[int, int], torch.Tensor]] = {}

    def add(self, part: ExpertPart, tensor: torch.Tensor) -> torch.Tensor | None:
        """Store one part; returns the fused tensor once the last of its parts has arrived."""
        parts = self.parts.setdefault(part.target, {})
        parts[(part.expert, part.slot)] = tensor
        experts = self.shapes[part.target][0]
        slots = 2 if part.target.endswith("gate_up_proj") else 1
        if len(parts) < experts * slots:
            return None
        del self.parts[part.target]
        rows = [torch.cat([parts[(e, s)] for s in range(slots)]) for e in range(experts)]
        return torch.stack(rows)

    def pending(self) -> list[str]:
        return sorted(self.parts)
