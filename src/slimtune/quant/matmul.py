"""Matmuls with a 4-bit weight, decoded band by band so the float weight is never whole.

A 4096 x 4096 float32 weight is 64 MiB: decoding it whole costs a fresh allocation every call
(page faults: they cost more than the decoding itself). Bands of 4M values (16 MiB) are decoded
into one scratch buffer that malloc recycles, and each band feeds its matmul from cache. Forward
takes bands of rows (contiguous in the packed layout); the input gradient takes bands of
columns, so each band writes its own slice of the result and nothing is accumulated.

Bands are decoded straight into the compute dtype where the kernel writes it (float32,
bfloat16): a bfloat16 band is half the bytes and needs no conversion pass.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.quant import kernels
from slimtune.quant.blockwise import QuantState, decode_blocks, dequantize_4bit

BAND_VALUES = 1 << 22


def _banded(packed: torch.Tensor, state: QuantState) -> bool:
    """Bands pay on a CPU (cache, recycled scratch); a GPU decodes the whole weight at once."""
    out_features, in_features = state.shape
    big = out_features * in_features > BAND_VALUES
    return packed.device.type == "cpu" and in_features % state.blocksize == 0 and big


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The band buffer: in the compute dtype when the kernel decodes into it, else float32."""
    direct = dtype in kernels.OUT_DTYPES and kernels.usable(torch.empty(0, device=device))
    return torch.empty(numel, dtype=dtype if direct else torch.float32, device=device)


def _layout(packed: torch.Tensor, state: QuantState):
    out_features, in_features = state.shape
    codes = packed.view(out_features, in_features // 2)
    absmax = state.block_absmax().view(out_features, in_features // state.blocksize)
    return codes, absmax


def linear_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """x @ W.T + bias, x of shape (..., in_features) in `dtype`."""
    if not _banded(packed, state):
        return nn.functional.linear(x, dequantize_4bit(packed, state, dtype), bias)
    out_features, in_features = state.shape
    codes, absmax = _layout(packed, state)
    x2d = x.reshape(-1, in_features)
    y = torch.empty(x2d.shape[0], out_features, dtype=dtype, device=x.device)
    rows = max(1, BAND_VALUES // in_features)
    scratch = _scratch(rows * in_features, dtype, x.device)
    for r0 in range(0, out_features, rows):
        r1 = min(out_features, r0 + rows)
        band = decode_blocks(
            codes[r0:r1],
            absmax[r0:r1],
            state.blocksize,
            state.quant_type,
            scratch[: (r1 - r0) * in_features],
        )
        band = band.view(r1 - r0, in_features).to(dtype)
        if bias is None:
            torch.mm(x2d, band.t(), out=y[:, r0:r1])
        else:
            torch.addmm(bias[r0:r1], x2d, band.t(), out=y[:, r0:r1])
    return y.view(*x.shape[:-1], out_features)


def input_grad_4bit(
    grad_out: torch.Tensor, packed: torch.Tensor, state: QuantState, dtype: torch.dtype
) -> torch.Tensor:
    """grad_out @ W, grad_out of shape (..., out_features) in `dtype`."""
    if not _banded(packed, state):
        return torch.matmul(grad_out, dequantize_4bit(packed, state, dtype))
    out_features, in_features = state.shape
    codes, absmax = _layout(packed, state)
    g2d = grad_out.reshape(-1, out_features)
    grad_x = torch.empty(g2d.shape[0], in_features, dtype=dtype, device=grad_out.device)
    bs = state.blocksize
    cols = max(bs, BAND_VALUES // out_features // bs * bs)
    scratch = _scratch(out_features * cols, dtype, grad_out.device)
    for c0 in range(0, in_features, cols):
        c1 = min(in_features, c0 + cols)
        band = decode_blocks(
            codes[:, c0 // 2 : c1 // 2],
            absmax[:, c0 // bs : c1 // bs],
            bs,
            state.quant_type,
            scratch[: out_features * (c1 - c0)],
        )
        torch.mm(g2d, band.view(out_features, c1 - c0).to(dtype), out=grad_x[:, c0:c1])
    return grad_x.view(*grad_out.shape[:-1], in_features)
