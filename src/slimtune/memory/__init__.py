"""The memory planner behind `slimtune estimate`: will this run fit, and what takes the room?"""

from slimtune.memory.architecture import (
    BUILTIN,
    Architecture,
    architecture_from_config,
    builtin_architecture,
    resolve_architecture,
)
from slimtune.memory.planner import PARTS, MemoryEstimate, PlanSettings, estimate
from slimtune.memory.units import format_bytes, parse_bytes

__all__ = [
    "BUILTIN",
    "PARTS",
    "Architecture",
    "MemoryEstimate",
    "PlanSettings",
    "architecture_from_config",
    "builtin_architecture",
    "estimate",
    "format_bytes",
    "parse_bytes",
    "resolve_architecture",
]
