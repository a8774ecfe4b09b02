"""Blockwise 4-bit quantization: the flattened tensor in blocks that share one absmax each.

Bit for bit what bitsandbytes computes on CPU: absmax per block, x * (1 / absmax) clamped to
[-1, 1], the nearest code value (a value exactly between two codes takes the lower one), two codes
per byte with the first element in the high nibble, packed as a (numel // 2, 1) uint8 tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import torch

from slimtune.buffers import empty_large
from slimtune.choices import BLOCKSIZES
from slimtune.errors import SlimtuneError
from slimtune.quant import gpu_kernels, kernels, native
from slimtune.quant.codebook import (
    check_quant_type,
    codebook,
    dynamic_map,
    pair_table,
    sorted_codes,
)
from slimtune.quant.cuda_codes import nearest_code_cuda, scale_blocks_cuda
from slimtune.quant.double_quant import NESTED_BLOCKSIZE, dequantize_absmax, quantize_absmax

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

    def block_absmax(self, compiled: bool = True) -> torch.Tensor:
        """The float32 absmax of every block (decodes the 8-bit codes when double-quantized;
        `compiled=False`: in torch's ops, without loading numba's kernels)."""
        if not self.double_quant:
            return self.absmax
        return dequantize_absmax(
            self.absmax, self.nested_absmax, self.offset, self.nested_blocksize, self.nested_code,
            compiled,
        )  # fmt: skip

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


# nearest_code cuts [-1, 1] into this many cells; a cell (widened by half a cell each side) holds
# at most one midpoint between codes as long as midpoints are > 4 / _CELLS apart (FP4's closest
# pair, around 0, are 0.0026 apart).
_CELLS = 8192


@cache
def _cell_tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cell: how many midpoints lie below it (uint8), and the next midpoint (float32)."""
    bounds, _ = sorted_codes(quant_type)
    lower = -1.0 + torch.arange(_CELLS + 1, dtype=torch.float64) * (2.0 / _CELLS) - 1.0 / _CELLS
    below = torch.searchsorted(bounds.double(), lower)  # midpoints strictly below the cell
    next_bound = torch.cat([bounds, torch.tensor([float("inf")])])[below]
    return below.to(torch.uint8), next_bound


def nearest_code(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """uint8 code of the code value nearest to each of `scaled` (values in [-1, 1]).

    Its index in ascending order is the number of midpoints strictly below the value, so a
    value exactly between two codes takes the lower one: torch.bucketize's rule, which
    bitsandbytes uses. Computed exactly but without a search: the value's cell gives the
    midpoints below it, and one comparison with the next midpoint settles the rest.
    """
    below, next_bound = _cell_tables(quant_type)
    cell = ((scaled + 1) * (_CELLS / 2)).to(torch.int32).clamp_(0, _CELLS)
    q = torch.index_select(below.to(scaled.device), 0, cell)
    q.add_(scaled > torch.index_select(next_bound.to(scaled.device), 0, cell))
    if quant_type == "fp4":
        _, order = sorted_codes(quant_type)
        q = torch.index_select(order.to(torch.uint8).to(q.device), 0, q.to(torch.int32))
    return q


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
    q = _block_codes(blocks, absmax, quant_type)
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


def _block_codes(blocks: torch.Tensor, absmax: torch.Tensor, quant_type: str) -> torch.Tensor:
    """The 4-bit code of every value, scaled by its block's 1 / absmax, by the rounding rules
    bitsandbytes follows on the blocks' device (see slimtune.quant.cuda_codes)."""
    if blocks.device.type != "cpu" and quant_type != "int4":
        return nearest_code_cuda(scale_blocks_cuda(blocks, absmax).view(-1), quant_type)
    # Multiply by the reciprocal (not divide) and clamp: bitsandbytes' exact float32 steps.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp_(-1, 1)
    return nearest_code(scaled.view(-1), quant_type)


# Decode at most this many packed bytes per step when the result is not float32 (the float32
# scratch stays at 32 MiB).
CHUNK_BYTES = 1 << 22


def pair_lookup(quant_type: str, device: torch.device) -> torch.Tensor:
    """The byte -> (high value, low value) table as 256 int64 words, one 8-byte gather per byte."""
    table = pair_table(quant_type).view(torch.int64).view(-1)
    return table if table.device == device else table.to(device)


def decode_blocks(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 values of `codes` (rows of whole blocks, 1-D or 2-D, any strides) given the
    float32 absmax of those blocks (same order). Returns (or fills) a flat tensor of
    2 * codes.numel() values; a bfloat16 `out` is filled directly on the CPU (see kernels)."""
    rows = codes.reshape(-1, blocksize // 2) if codes.dim() == 1 else codes
    scales = absmax.reshape(rows.shape[0], -1)
    if out is None:
        out = empty_large((codes.numel() * 2,), torch.float32, codes.device)
    if native.decodes(rows, scales, out):
        native.decode_rows(rows, scales, codebook(quant_type), out.view(rows.shape[0], -1))
        return out
    if kernels.usable(codes) and out.dtype in kernels.OUT_DTYPES:
        kernels.decode_rows(rows, scales, pair_table(quant_type), out.view(rows.shape[0], -1))
        return out
    if out.dtype != torch.float32:
        return out.copy_(decode_blocks(codes, absmax, blocksize, quant_type))
    # Elsewhere (a GPU): one gather through a byte -> (high, low) pair table, then the scales.
    index = rows.to(torch.int32).view(-1)  # also gathers a strided band into one array
    table = pair_lookup(quant_type, codes.device)
    values = torch.index_select(table, 0, index, out=out.view(torch.int64)).view(torch.float32)
    values.view(-1, blocksize).mul_(scales.reshape(-1, 1))
    return values


def dequantize_4bit(
    packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Packed 4-bit codes -> a tensor of `state.shape` in `dtype` (default: the original dtype).

    Values are computed in float32 (code value times block absmax) and rounded once to `dtype`,
    like bitsandbytes' CPU kernel; other dtypes go through a float32 scratch, chunk by chunk.
    """
    dtype = state.dtype if dtype is None else dtype
    codes = packed.view(-1)
    if gpu_kernels.usable(codes):
        out = torch.empty(state.shape, dtype=dtype, device=codes.device)
        gpu_kernels.decode(codes, state, out.view(-1))
        return out
    absmax = state.block_absmax()
    if dtype == torch.float32:
        return decode_blocks(codes, absmax, state.blocksize, state.quant_type).view(state.shape)
    if dtype in kernels.OUT_DTYPES and kernels.usable(codes):  # straight into bfloat16
        out = empty_large(state.shape, dtype, codes.device)
        decode_blocks(codes, absmax, state.blocksize, state.quant_type, out.view(-1))
        return out
    out = empty_large(state.shape, dtype, codes.device).view(-1)
    step = max(CHUNK_BYTES, state.blocksize // 2)
    scratch = torch.empty(2 * min(step, codes.numel()), device=codes.device)
    for start in range(0, codes.numel(), step):
        stop = min(start + step, codes.numel())
        blocks = slice(2 * start // state.blocksize, 2 * stop // state.blocksize)
        values = decode_blocks(
            codes[start:stop], absmax[blocks], state.blocksize, state.quant_type,
            scratch[: 2 * (stop - start)],
        )  # fmt: skip
        out[2 * start : 2 * stop].copy_(values)
    return out.view(state.shape)
