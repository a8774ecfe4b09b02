"""The 4-bit code books (NF4, FP4, Int4) and bitsandbytes' 8-bit dynamic maps.

NF4 and FP4 are bitsandbytes' exact float32 values in bitsandbytes' index order (the index is the
4-bit code stored on disk), so our packed weights and bitsandbytes' are interchangeable.
"""

from __future__ import annotations

from functools import cache

import torch

from slimtune.choices import QUANT_TYPES
from slimtune.errors import SlimtuneError

# NF4 (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
# Float32 values read from bitsandbytes.functional.get_4bit_type("nf4") (0.50.2).
_NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 (E2M1) in bitsandbytes' order: bit 3 is the sign; scaled so the largest value is 1.
# Float32 values read from bitsandbytes.functional.get_4bit_type("fp4") (0.50.2).
_FP4 = (
    0.0,
    0.0052083334885537624,
    0.6666666865348816,
    1.0,
    0.3333333432674408,
    0.5,
    0.1666666716337204,
    0.25,
    0.0,
    -0.0052083334885537624,
    -0.6666666865348816,
    -1.0,
    -0.3333333432674408,
    -0.5,
    -0.1666666716337204,
    -0.25,
)

# Symmetric Int4: round(x / absmax * 7), code = level + 8. Code 0 (-8/7) is never produced, so the
# grid is symmetric (15 levels); keeping it makes the table sorted like NF4's.
_INT4 = tuple((i - 8) / 7 for i in range(16))

# The ascending order of the code values, used to find the nearest code by bisection. For FP4 the
# two zeros tie; bitsandbytes' argsort puts +0 (code 0) before code 8, and so must we.
_SORT_ORDER = {
    "nf4": tuple(range(16)),
    "int4": tuple(range(16)),
    "fp4": (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3),
}

_TABLES = {"nf4": _NF4, "fp4": _FP4, "int4": _INT4}


def check_quant_type(quant_type: str) -> str:
    if quant_type not in QUANT_TYPES:
        raise SlimtuneError(
            f"unknown quant_type {quant_type!r}: expected one of {', '.join(QUANT_TYPES)}"
        )
    return quant_type


@cache
def _codebook(quant_type: str) -> torch.Tensor:
    return torch.tensor(_TABLES[check_quant_type(quant_type)], dtype=torch.float32)


def codebook(quant_type: str) -> torch.Tensor:
    """The 16 float32 code values of `quant_type`, indexed by the 4-bit code."""
    return _codebook(quant_type).clone()


@cache
def sorted_codes(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints between neighbouring code values in ascending order, that order)."""
    code = _codebook(quant_type)
    order = torch.tensor(_SORT_ORDER[quant_type], dtype=torch.int64)
    ascending = code[order]
    return (ascending[:-1] + ascending[1:]) / 2, order


@cache
def pair_table(quant_type: str) -> torch.Tensor:
    """(256, 2) float32: byte -> (value of its high nibble, value of its low nibble).

    One gather through this table decodes two weights at once, already in memory order.
    """
    code = _codebook(quant_type)
    byte = torch.arange(256)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1).contiguous()


@cache
def dynamic_map(
    signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8
) -> torch.Tensor:
    """bitsandbytes' `create_dynamic_map`: 256 sorted float32 code values on [-1, 1] or [0, 1].

    The signed map scales double quantization's absmax values and 8-bit optimizers' first
    moment; the unsigned one their second moment, which is never negative.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        exponent = i + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        boundaries = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        # Scaled in float32, as bitsandbytes does, so the codes match it bit for bit.
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)
