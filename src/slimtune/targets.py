"""Which layers of a model a setting names, by PEFT's rules: `target_modules` (which layers)
and `rank_pattern` / `alpha_pattern` (a value per layer).

quantize_model's targets and LoRA's target_modules both read it this way. Torch-free at run
time: the memory planner applies the pattern rule to layer paths it only knows by name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


def matches_target(name: str, targets: str | Sequence[str] | None) -> bool:
    """Whether the layer at path `name` is a target. A string is a regular expression the whole
    path must match; a list names layers by their path or its last parts ("q_proj" matches
    "model.layers.0.self_attn.q_proj"); None names every layer."""
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output layer (`get_output_embeddings()`), which "all linear layers" leaves
    out; None when the model has no such method or layer."""
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """The value of the first pattern matching a suffix of `path` (PEFT's get_pattern_key), or
    `default`."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default
