"""The GPU decode kernel: packed 4-bit codes -> values in the compute dtype, in one Triton pass.

With torch ops a decode on a GPU takes several kernels and a float32 scratch (bytes -> index,
gather, scale, cast); this reads each byte once and writes its two values once, already in
bfloat16 / float16 / float32, as bitsandbytes' CUDA kernel does: float32 code value times
float32 absmax, rounded once to the output dtype. Without Triton, callers use the torch ops.
"""

from __future__ import annotations

from functools import cache

import torch

BLOCK_BYTES = 2048  # packed bytes per Triton program


@cache
def kernel():
    """The compiled Triton decode function, or None when Triton is not importable."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def decode(
        codes_ptr, absmax_ptr, table_ptr, out_ptr, n_bytes, HALF: tl.constexpr, BLOCK: tl.constexpr
    ):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n_bytes
        byte = tl.load(codes_ptr + offsets, mask=inside, other=0).to(tl.int32)
        scale = tl.load(absmax_ptr + offsets // HALF, mask=inside, other=0.0)
        high = tl.load(table_ptr + (byte >> 4)) * scale
        low = tl.load(table_ptr + (byte & 15)) * scale
        values = tl.interleave(high, low).to(out_ptr.dtype.element_ty)
        pairs = tl.program_id(0) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + pairs, values, mask=pairs < 2 * n_bytes)

    return decode


def usable(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernel can decode `tensor`: on a GPU, with Triton importable."""
    return tensor.is_cuda and kernel() is not None


def decode(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    table: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Fill the flat `out` (2 * codes.numel() values, any float dtype) from contiguous uint8
    `codes` whose every blocksize // 2 bytes share one float32 `absmax`; `table` holds the 16
    float32 code values, on the same device."""
    n_bytes = codes.numel()
    grid = ((n_bytes + BLOCK_BYTES - 1) // BLOCK_BYTES,)
    kernel()[grid](codes, absmax, table, out, n_bytes, HALF=blocksize // 2, BLOCK=BLOCK_BYTES)
    return out
