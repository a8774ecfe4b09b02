"""The memory planner behind `slimtune estimate`: will this training run (a TrainConfig) fit,
and what takes the room?"""

from slimtune.memory.architecture import (
    BUILTIN,
    Architecture,
    architecture_from_config,
    builtin_architecture,
    resolve_architecture,
)
from slimtune.memory.planner import PARTS, MemoryEstimate, estimate, planned_compute_dtype
from slimtune.memory.units import format_bytes, parse_bytes

__all__ = [
    "BUILTIN",
    "PARTS",
    "Architecture",
    "MemoryEstimate",
    "architecture_from_config",
    "builtin_architecture",
    "estimate",
    "format_bytes",
    "parse_bytes",
    "planned_compute_dtype",
    "resolve_architecture",
]
