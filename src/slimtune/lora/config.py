"""LoraConfig: what to adapt and how, and which rank/alpha each module gets."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from slimtune.choices import LORA_INITS
from slimtune.errors import SlimtuneError
from slimtune.targets import pattern_value


@dataclass
class LoraConfig:
    """Settings of one adapter.

    `target_modules` follows PEFT: a list of names (a module matches when its path equals a name
    or ends with "." + name), a regex string (must match the whole path), or "all-linear" (every
    Linear/Conv1D/Linear4bit but the output head). `rank_pattern`/`alpha_pattern` map a regex
    (matched against the end of the module path, as PEFT does) to that module's rank/alpha.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "kaiming"
    loftq_iters: int = 1  # alternations of quantize and SVD for init="loftq"
    loftq_quant: Any = None  # slimtune.quant.QuantConfig for init="loftq"; None = QuantConfig()
    # PEFT's: fused 3-D parameters, e.g. ["experts.gate_up_proj", "experts.down_proj"] (a mixture
    # of experts); "all-linear" takes them too. Experts use `r` and `alpha`, and no dropout.
    target_parameters: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple | set):
            self.target_modules = sorted(self.target_modules)
        _check_rank("r", self.r)
        for key, rank in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", rank)
        if not 0.0 <= self.dropout < 1.0:
            raise SlimtuneError(f"LoRA dropout must be in [0, 1), got dropout={self.dropout}")
        if self.init not in LORA_INITS:
            raise SlimtuneError(
                f"LoRA init must be one of {', '.join(LORA_INITS)}, got init={self.init!r}"
            )
        if self.loftq_iters < 1:
            raise SlimtuneError(f"loftq_iters must be >= 1, got {self.loftq_iters}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise SlimtuneError(
                    f"target_modules={self.target_modules!r} is not a valid regex: {err}"
                ) from err

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.alpha)

    def scaling_for(self, module_name: str) -> float:
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _check_rank(key: str, rank: Any) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise SlimtuneError(f"LoRA {key} must be a positive integer, got {rank!r}")
