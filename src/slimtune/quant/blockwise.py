"""Blockwise 4-bit quantization: the flattened tensor in blocks that share one absmax each.

Bit for bit what bitsandbytes computes on CPU: absmax per block, x * (1 / absmax) clamped to
[-1, 1], the nearest code value (a value exactly between two codes takes the lower one), two codes
per byte with the first element in the high nibble, packed as a (numel // 2, 1) uint8 tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from slimtune.errors import SlimtuneError
from slimtune.quant.codebook import (
    check_quant_type,
    codebook,
    dynamic_map,
    pair_table,
    sorted_codes,
)
from slimtune.quant.double_quant import NESTED_BLOCKSIZE, dequantize_absmax, quantize_absmax

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class QuantState:
    """Everything needed to dequantize a packed 4-bit tensor.

    `absmax` is float32 (one per block), or uint8 codes when double-quantized; then the block
    absmax is `nested_code[absmax] * nested_absmax[block // nested_blocksize] + offset`.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    offset: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax of every block (decodes the 8-bit codes when double-quantized)."""
        if not self.double_quant:
            return self.absmax
        return dequantize_absmax(
            self.absmax, self.nested_absmax, self.offset, self.nested_blocksize, self.nested_code
        )

    def to(self, device: torch.device | str) -> QuantState:
        move = {
            name: getattr(self, name).to(device)
            for name in ("absmax", "code", "offset", "nested_absmax", "nested_code")
            if getattr(self, name) is not None
        }
        return replace(self, **move)


def check_blocksize(blocksize: int) -> int:
    if blocksize not in BLOCKSIZES:
        raise SlimtuneError(
            f"invalid blocksize {blocksize!r}: expected a power of two from 32 to 4096 "
            f"({', '.join(map(str, BLOCKSIZES))})"
        )
    return blocksize


def _check_input(x: torch.Tensor, blocksize: int) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise SlimtuneError(
            f"cannot quantize a tensor of dtype {x.dtype}: expected float32, bfloat16 or float16"
        )
    check_blocksize(blocksize)
    if x.numel() == 0 or x.numel() % blocksize:
        raise SlimtuneError(
            f"cannot quantize a tensor of shape {tuple(x.shape)} ({x.numel()} values) with "
            f"blocksize {blocksize}: its size must be a non-zero multiple of the blocksize"
        )


def quantize_4bit(
    x: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize a float tensor to packed 4-bit codes: (uint8 (numel // 2, 1), QuantState)."""
    check_quant_type(quant_type)
    _check_input(x, blocksize)
    blocks = x.detach().reshape(-1, blocksize).float()
    absmax = blocks.abs().amax(dim=1)
    # Multiply by the reciprocal (not divide) and clamp: bitsandbytes' exact float32 steps.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp_(-1, 1)
    bounds, order = sorted_codes(quant_type)
    q = torch.bucketize(scaled.view(-1), bounds, out_int32=True)
    del scaled
    if quant_type == "fp4":
        q = order[q]
    q = q.to(torch.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)

    state = QuantState(
        absmax=absmax,
        shape=x.shape,
        dtype=x.dtype,
        blocksize=blocksize,
        quant_type=quant_type,
        code=codebook(quant_type),
    )
    if double_quant:
        codes, nested_absmax, offset = quantize_absmax(absmax)
        state = replace(
            state,
            absmax=codes,
            offset=offset,
            nested_absmax=nested_absmax,
            nested_code=dynamic_map(),
        )
    return packed, state


def dequantize_4bit(
    packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Packed 4-bit codes -> a tensor of `state.shape` in `dtype` (default: the original dtype).

    One gather through a byte -> (high, low) value table decodes both nibbles at once; the
    absmax of each block then scales its row in place. Values are computed in float32 and
    rounded once to `dtype`, like bitsandbytes' CPU kernel.
    """
    dtype = state.dtype if dtype is None else dtype
    table = pair_table(state.quant_type)
    if table.device != packed.device:
        table = table.to(packed.device)
    values = table[packed.view(-1).long()]
    values = values.view(-1, state.blocksize).mul_(state.block_absmax()[:, None])
    values = values.view(state.shape)
    return values if dtype == torch.float32 else values.to(dtype)
