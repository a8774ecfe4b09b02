"""PEFT's rule for per-layer settings (`rank_pattern`, `alpha_pattern`): the first regex that
matches the end of a layer's path gives that layer its value. Torch-free: the memory planner
applies it to layer paths it only knows by name."""

from __future__ import annotations

import re
from typing import Any


def pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """The value of the first pattern matching a suffix of `path` (PEFT's get_pattern_key)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default
