"""Double quantization: the per-block absmax constants themselves stored in 8 bits.

As bitsandbytes does it (`compress_statistics=True`): subtract the mean (the absmax values are all
positive, centring them uses the signed map fully), then quantize blockwise (blocks of 256) to the
nearest value of the signed dynamic 8-bit map. Dequantize: map[code] * nested_absmax + offset.
"""

from __future__ import annotations

from functools import cache

import torch

from slimtune.quant import kernels
from slimtune.quant.codebook import dynamic_map
from slimtune.quant.cuda_codes import nearest_dynamic_code_cuda, scale_blocks_cuda

NESTED_BLOCKSIZE = 256
_LUT_SIZE = 65536


@cache
def _bin_table() -> torch.Tensor:
    """uint8 code of each of bitsandbytes' 65536 bins of [-1, 1]: the first code whose midpoint
    with its right neighbour is not below the bin's value."""
    code = dynamic_map()
    midpoints = 0.5 * (code[:-1] + code[1:])
    values = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / (_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, values).to(torch.uint8)


def _blocks(x: torch.Tensor, blocksize: int, fill: float) -> torch.Tensor:
    """View `x` as rows of `blocksize`, padding the last (partial) block with `fill`."""
    pad = -x.numel() % blocksize
    if pad:
        x = torch.cat([x, x.new_full((pad,), fill)])
    return x.view(-1, blocksize)


def quantize_absmax(
    absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 absmax -> (uint8 codes, nested absmax float32, offset float32 scalar)."""
    offset = absmax.mean()
    centred = absmax - offset
    blocks = _blocks(centred, blocksize, 0.0)
    nested_absmax = blocks.abs().amax(dim=1)
    if absmax.device.type != "cpu":  # bitsandbytes' CUDA kernel searches the map instead
        normed = scale_blocks_cuda(blocks, nested_absmax).view(-1)[: absmax.numel()]
        return nearest_dynamic_code_cuda(normed, dynamic_map()), nested_absmax, offset
    # bitsandbytes' CPU kernel does not search the map: it scales by the reciprocal, maps [-1, 1]
    # onto 65536 bins and reads the code of each bin from a table built from the midpoints. We
    # follow the same float32 steps so the codes agree bit for bit (even where a value sits
    # closer to a neighbouring code than to the one its bin gives).
    inv = torch.where(nested_absmax == 0, 0.0, 1.0 / nested_absmax)
    normed = (blocks * inv[:, None]).clamp_(-1, 1).view(-1)[: absmax.numel()]
    bins = (((normed + 1) * 0.5) * (_LUT_SIZE - 1) + 0.5).to(torch.int64)
    codes = _bin_table()[bins]
    # A block of equal absmax values (all centred to 0) gets code 0, as in bitsandbytes.
    codes[(nested_absmax == 0).repeat_interleave(blocksize)[: codes.numel()]] = 0
    return codes, nested_absmax, offset


def dequantize_absmax(
    codes: torch.Tensor,
    nested_absmax: torch.Tensor,
    offset: torch.Tensor,
    blocksize: int = NESTED_BLOCKSIZE,
    code: torch.Tensor | None = None,
    compiled: bool = True,
) -> torch.Tensor:
    """uint8 codes -> float32 absmax, as bitsandbytes computes it (map[c] * nested, then + offset).
    `compiled=False`: torch's ops only, for callers that decode once and should not load numba's
    compiled kernels (their memory) for it."""
    code = dynamic_map() if code is None else code
    if compiled and kernels.usable(codes):
        return kernels.decode_absmax(codes, code, nested_absmax, blocksize, offset)
    values = torch.index_select(code.to(codes.device), 0, codes.to(torch.int32))
    full = values.numel() - values.numel() % blocksize
    values[:full].view(-1, blocksize).mul_(nested_absmax[: full // blocksize, None])
    if full < values.numel():  # the last, partial group of blocks
        values[full:].mul_(nested_absmax[-1])
    return values.add_(offset)
