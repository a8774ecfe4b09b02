"""Blockwise 8-bit quantization with bitsandbytes' dynamic maps, for optimizer state.

Dettmers et al. (2021): split a tensor into blocks of 256 values, scale each block by its
absolute maximum, and store each scaled value as the index of the nearest entry of a 256-entry
"dynamic" code book (a float format whose exponent bits grow as the fraction bits shrink, so it
resolves both tiny and large values). The signed map holds the first Adam moment, the unsigned
map (all 256 codes on [0, 1]) the second, which is never negative.
"""

from __future__ import annotations

import functools

import torch

from slimtune.quant.codebook import dynamic_map

BLOCKSIZE = 256


@functools.cache
def _midpoints(signed: bool) -> torch.Tensor:
    # Nearest-code search as a bucketize over the midpoints between neighbouring codes.
    code = dynamic_map(signed)
    return (code[1:] + code[:-1]) / 2


def num_blocks(numel: int, blocksize: int = BLOCKSIZE) -> int:
    return -(-numel // blocksize)


def quantize_blockwise(
    x: torch.Tensor, signed: bool, out: torch.Tensor, absmax: torch.Tensor
) -> None:
    """Quantize `x` (any shape) into the uint8 tensor `out` and float32 `absmax`, in place."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = num_blocks(n) * BLOCKSIZE - n
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCKSIZE)
    torch.amax(blocks.abs(), dim=1, out=absmax)
    # An all-zero block keeps absmax 0; divide by 1 there so its values quantize to code 0.0.
    # Multiply by the reciprocal (as bitsandbytes does) so that near-ties round its way.
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax)).reciprocal_()
    scaled = blocks * scale.unsqueeze(1)
    midpoints = _midpoints(signed).to(x.device)
    codes = torch.bucketize(scaled.clamp_(-1, 1), midpoints)
    out.view(-1).copy_(codes.view(-1)[:n])


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """The float32 tensor (shape of `codes`) that `quantize_blockwise` encoded."""
    n = codes.numel()
    pad = num_blocks(n) * BLOCKSIZE - n
    values = dynamic_map(signed).to(codes.device)[codes.reshape(-1).long()]
    values = torch.nn.functional.pad(values, (0, pad)).view(-1, BLOCKSIZE) * absmax.unsqueeze(1)
    return values.view(-1)[:n].view(codes.shape)
