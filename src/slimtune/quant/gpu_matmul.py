"""The GPU product for a few input rows: y = x @ W.T straight from W's packed 4-bit codes.

A decode step multiplies one new token per stream by every weight: the weight's bytes are read
once and used once, so the step is as fast as the weights stream from memory. Decoding W first
(`gpu_kernels.decode`) writes a float copy and reads it back: three times the bytes of the codes
in bfloat16, five in float32, and two launches instead of one. This Triton kernel reads each
packed byte, decodes its two values in registers (the block's absmax decoded on the way, as in
`gpu_kernels`), rounds them to the input's dtype as a decoded weight would be, and multiplies
them into a float32 sum. One program computes `BLOCK_N` outputs of one input row; more rows are
more programs, which read the same weight again from the GPU's cache.

The result equals decode-then-matmul in the same dtype up to the order of the float32 sums.
"""

from __future__ import annotations

from functools import cache

import torch

from slimtune.quant.blockwise import QuantState
from slimtune.quant.gpu_kernels import table_on

# Input rows up to which the kernel takes the product: decode steps of up to this many streams.
# More rows (prompts) decode the weight once and multiply it on the tensor cores.
MAX_ROWS = 16
BLOCK_N = 16  # outputs per program
BLOCK_K = 128  # packed bytes (256 weights) per step of a program's loop


@cache
def kernel():
    """The compiled Triton product, or None when Triton is not importable."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def product(
        x_ptr,
        codes_ptr,
        absmax_ptr,  # float32 per block, or uint8 codes per block when NESTED
        nested_ptr,  # NESTED: float32 per group of blocks
        offset_ptr,  # NESTED: float32 scalar
        map_ptr,  # NESTED: the 256-value 8-bit map
        table_ptr,  # the 16 code values
        out_ptr,
        n_out,
        half_k,  # packed bytes per weight row
        x_stride,
        out_stride,
        HALF: tl.constexpr,  # packed bytes per block
        GROUP: tl.constexpr,  # blocks per nested absmax
        NESTED: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        row = tl.program_id(1)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = cols < n_out
        x_row = x_ptr + row * x_stride
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in tl.range(0, half_k, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            inside = k < half_k
            mask = live[:, None] & inside[None, :]
            # Blocks run through the flat weight: a block may span two rows.
            flat = cols[:, None].to(tl.int64) * half_k + k[None, :]
            byte = tl.load(codes_ptr + flat, mask=mask, other=0).to(tl.int32)
            block = flat // HALF
            if NESTED:
                code8 = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
                nested = tl.load(nested_ptr + block // GROUP, mask=mask, other=0.0)
                scale = tl.load(map_ptr + code8) * nested + tl.load(offset_ptr)
            else:
                scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
            # Each value rounded to the input's dtype, as a decoded weight in that dtype is.
            high = tl.load(table_ptr + (byte >> 4)) * scale
            low = tl.load(table_ptr + (byte & 15)) * scale
            if x_ptr.dtype.element_ty != tl.float32:
                dtype = x_ptr.dtype.element_ty
                high = high.to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
                low = low.to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
            even = tl.load(x_row + 2 * k, mask=inside, other=0.0).to(tl.float32)
            odd = tl.load(x_row + 2 * k + 1, mask=inside, other=0.0).to(tl.float32)
            acc += tl.sum(high * even[None, :] + low * odd[None, :], axis=1)
        tl.store(out_ptr + row * out_stride + cols, acc.to(out_ptr.dtype.element_ty), mask=live)

    return product


def usable(x2d: torch.Tensor, packed: torch.Tensor, state: QuantState) -> bool:
    """Whether the kernel takes x2d @ W.T: a few rows on a GPU, whole bytes per weight row."""
    return (
        x2d.is_cuda
        and packed.is_cuda
        and 0 < x2d.shape[0] <= MAX_ROWS
        and state.shape[1] % 2 == 0
        and kernel() is not None
    )


def matmul(x2d: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """x2d @ W.T for the packed 4-bit W of `state` (x2d: rows x in_features, on W's GPU), in
    x2d's dtype. Values are rounded to that dtype as decoded weights are; sums are float32."""
    out_features, in_features = state.shape
    x2d = x2d.contiguous()
    out = torch.empty(x2d.shape[0], out_features, dtype=x2d.dtype, device=x2d.device)
    nested = state.double_quant
    grid = ((out_features + BLOCK_N - 1) // BLOCK_N, x2d.shape[0])
    kernel()[grid](
        x2d,
        packed.view(-1),
        state.absmax,
        state.nested_absmax if nested else state.absmax,
        state.offset if nested else state.absmax,
        table_on("dynamic", x2d.device),
        table_on(state.quant_type, x2d.device),
        out,
        out_features,
        in_features // 2,
        x2d.stride(0),
        out.stride(0),
        HALF=state.blocksize // 2,
        GROUP=state.nested_blocksize,
        NESTED=nested,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        enable_fp_fusion=False,
    )
    return out
