"""The GPU product for one input row: y = x @ W.T straight from W's packed 4-bit codes.

A decode step multiplies one new token per stream by every weight: the weight's bytes are read
once and used once, so the step is as fast as the weights stream from memory. Decoding W first
(`gpu_kernels.decode`) writes a float copy and reads it back: three times the bytes of the codes
in bfloat16, five in float32, and two launches instead of one. This Triton kernel reads each
packed byte, decodes its two values in registers (the block's absmax decoded on the way, as in
`gpu_kernels`), rounds them to the input's dtype as a decoded weight would be, and multiplies
them into a float32 sum; a program computes `BLOCK_N` outputs. Several rows (several streams,
prompts) decode the weight once and multiply it with cuBLAS: measured faster from two rows on.

The result equals decode-then-matmul in the same dtype up to the order of the float32 sums.
"""

from __future__ import annotations

import torch

from slimtune.quant.blockwise import QuantState
from slimtune.quant.gpu_kernels import on_device, table_on

# Tiles timed on an H200 (benchmarks/bench_gpu_infer.py, one bfloat16 row): 16 outputs a
# program, 256 bytes (512 weights) a step and one absmax read per block ran LLaMA-2-7B's
# 4096 x 4096 in 13.3 us and 11008 x 4096 in 30.5 us, against 25.6 and 51.1 us for 16 x 128
# bytes with an absmax read per byte.
BLOCK_N = 16  # outputs per program
BLOCK_K = 256  # packed bytes (512 weights) per step of a program's loop
# Where blocks never cross a weight row, read each block's absmax once rather than per byte.
BLOCK_SCALES = True


try:  # Triton comes with CUDA builds of torch; without it callers use the torch ops
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def one_row(
        x_ptr, codes_ptr, absmax_ptr, nested_ptr, offset_ptr, map_ptr, table_ptr, out_ptr,
        n_out, half_k,
        HALF: tl.constexpr, GROUP: tl.constexpr, NESTED: tl.constexpr, ALIGNED: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """Program i: outputs i * BLOCK_N ... as sums of products. ALIGNED: blocks start every
        HALF bytes of a weight row (else a block may span two rows)."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = cols < n_out
        dtype = x_ptr.dtype.element_ty
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in tl.range(0, half_k, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            inside = k < half_k
            mask = live[:, None] & inside[None, :]
            flat = cols[:, None].to(tl.int64) * half_k + k[None, :]
            byte = tl.load(codes_ptr + flat, mask=mask, other=0).to(tl.int32)
            if ALIGNED:  # one absmax per block, spread over its HALF bytes
                first = start + tl.arange(0, BLOCK_K // HALF) * HALF
                block = (cols[:, None].to(tl.int64) * half_k + first[None, :]) // HALF
                block_mask = live[:, None] & (first < half_k)[None, :]
            else:
                block = flat // HALF
                block_mask = mask
            if NESTED:
                code8 = tl.load(absmax_ptr + block, mask=block_mask, other=0).to(tl.int32)
                nested = tl.load(nested_ptr + block // GROUP, mask=block_mask, other=0.0)
                scale = tl.load(map_ptr + code8) * nested + tl.load(offset_ptr)
            else:
                scale = tl.load(absmax_ptr + block, mask=block_mask, other=0.0)
            if ALIGNED:
                scale = tl.broadcast_to(scale[:, :, None], (BLOCK_N, BLOCK_K // HALF, HALF))
                scale = tl.reshape(scale, (BLOCK_N, BLOCK_K))
            high = tl.load(table_ptr + (byte >> 4)) * scale
            low = tl.load(table_ptr + (byte & 15)) * scale
            if dtype != tl.float32:  # each value rounded as a decoded weight in `dtype` is
                high = high.to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
                low = low.to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
            even = tl.load(x_ptr + 2 * k, mask=inside, other=0.0).to(tl.float32)
            odd = tl.load(x_ptr + 2 * k + 1, mask=inside, other=0.0).to(tl.float32)
            acc += tl.sum(high * even[None, :] + low * odd[None, :], axis=1)
        tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=live)


def kernel():
    """The Triton product, or None without Triton."""
    return None if triton is None else one_row


def usable(x2d: torch.Tensor, packed: torch.Tensor, state: QuantState) -> bool:
    """Whether the kernel takes x2d @ W.T: one row on a GPU, whole bytes per weight row."""
    return (
        x2d.is_cuda
        and packed.is_cuda
        and x2d.shape[0] == 1
        and state.shape[1] % 2 == 0
        and kernel() is not None
    )


def matmul(x2d: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """x2d @ W.T for the packed 4-bit W of `state` (x2d: one row of in_features, on W's GPU), in
    x2d's dtype. Values are rounded to that dtype as decoded weights are; sums are float32."""
    out_features, in_features = state.shape
    x2d = x2d.contiguous()
    out = torch.empty(1, out_features, dtype=x2d.dtype, device=x2d.device)
    nested = state.double_quant
    half = state.blocksize // 2
    aligned = BLOCK_SCALES and (in_features // 2) % half == 0 and BLOCK_K % half == 0
    with on_device(x2d):
        kernel()[((out_features + BLOCK_N - 1) // BLOCK_N,)](
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
            HALF=half,
            GROUP=state.nested_blocksize,
            NESTED=nested,
            ALIGNED=aligned,
            BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K,
            enable_fp_fusion=False,
        )
    return out
