"""QuantConfig: how a model's frozen linear layers are stored in 4 bits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from slimtune.choices import COMPUTE_DTYPES
from slimtune.errors import SlimtuneError
from slimtune.hardware import TORCH_DTYPES, dtype_name
from slimtune.quant.blockwise import check_blocksize
from slimtune.quant.codebook import check_quant_type


@dataclass(frozen=True)
class QuantConfig:
    """NF4 with double quantization at blocksize 64 is QLoRA's recipe (4.127 bits per weight).

    `compute_dtype` is what weights are dequantized to for the matmul; float32 is the fast one
    on CPUs without bf16 hardware.
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype = field(default=torch.float32)

    def __post_init__(self) -> None:
        check_quant_type(self.quant_type)
        check_blocksize(self.blocksize)
        if isinstance(self.compute_dtype, str):
            # Accept "bfloat16" etc. from config files.
            object.__setattr__(self, "compute_dtype", _parse_dtype(self.compute_dtype))
        if self.compute_dtype not in TORCH_DTYPES.values():
            raise SlimtuneError(
                f"invalid compute_dtype {self.compute_dtype!r}: expected one of "
                f"{', '.join(COMPUTE_DTYPES)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "double_quant": self.double_quant,
            "compute_dtype": dtype_name(self.compute_dtype),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> QuantConfig:
        unknown = set(values) - {"quant_type", "blocksize", "double_quant", "compute_dtype"}
        if unknown:
            raise SlimtuneError(f"unknown quantization key(s): {', '.join(sorted(unknown))}")
        return cls(**values)


def _parse_dtype(name: str) -> torch.dtype:
    key = name.removeprefix("torch.")
    if key not in TORCH_DTYPES:
        raise SlimtuneError(
            f"invalid compute_dtype {name!r}: expected one of {', '.join(COMPUTE_DTYPES)}"
        )
    return TORCH_DTYPES[key]
