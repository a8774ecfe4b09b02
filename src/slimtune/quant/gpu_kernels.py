"""The GPU decode kernel: packed 4-bit codes -> values in the compute dtype, in one Triton pass.

With torch ops a decode on a GPU takes several kernels, a float32 scratch and a copy of the
8-bit map per call (bytes -> index, gather, scale, cast; and as many again for double-quantized
absmax); this reads each byte once and writes its two values once, already in bfloat16 /
float16 / float32, decoding the block's absmax on the way, as bitsandbytes' CUDA kernels do:
absmax = map[code] * nested absmax, then + offset; value = code value * absmax, rounded once to
the output dtype. Multiplies and adds stay separate (no fused multiply-add), so the roundings
are bitsandbytes'. Without Triton, callers use the torch ops.
"""

from __future__ import annotations

import contextlib
from functools import cache

import torch

from slimtune.quant.codebook import codebook, dynamic_map

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
        codes_ptr,
        absmax_ptr,  # float32 per block, or uint8 codes per block when NESTED
        nested_ptr,  # NESTED: float32 per group of blocks
        offset_ptr,  # NESTED: float32 scalar
        map_ptr,  # NESTED: the 256-value 8-bit map
        table_ptr,  # the 16 code values
        out_ptr,
        n_bytes,
        HALF: tl.constexpr,  # packed bytes per block
        GROUP: tl.constexpr,  # blocks per nested absmax
        NESTED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        start = tl.program_id(0).to(tl.int64) * BLOCK  # 64 bits: layers of 2**31 values too
        offsets = start + tl.arange(0, BLOCK)
        inside = offsets < n_bytes
        byte = tl.load(codes_ptr + offsets, mask=inside, other=0).to(tl.int32)
        block = offsets // HALF
        if NESTED:
            code8 = tl.load(absmax_ptr + block, mask=inside, other=0).to(tl.int32)
            nested = tl.load(nested_ptr + block // GROUP, mask=inside, other=0.0)
            scale = tl.load(map_ptr + code8) * nested + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=inside, other=0.0)
        high = tl.load(table_ptr + (byte >> 4)) * scale
        low = tl.load(table_ptr + (byte & 15)) * scale
        values = tl.interleave(high, low).to(out_ptr.dtype.element_ty)
        pairs = 2 * start + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + pairs, values, mask=pairs < 2 * n_bytes)

    return decode


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it `tensor`'s (a model on cuda:1)."""
    if not tensor.is_cuda or tensor.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)


def usable(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernel can decode `tensor`: on a GPU, with Triton importable."""
    return tensor.is_cuda and kernel() is not None


@cache
def table_on(name: str, device: torch.device) -> torch.Tensor:
    """A constant table on `device`, copied there once."""
    table = dynamic_map() if name == "dynamic" else codebook(name)
    return table.to(device)


def decode(codes: torch.Tensor, state, out: torch.Tensor) -> torch.Tensor:
    """Fill the flat `out` (2 * codes.numel() values, any float dtype) from the contiguous uint8
    `codes` of a slimtune.quant.blockwise.QuantState `state` on the same GPU."""
    n_bytes, device = codes.numel(), codes.device
    nested = state.double_quant
    grid = ((n_bytes + BLOCK_BYTES - 1) // BLOCK_BYTES,)
    with on_device(codes):
        kernel()[grid](
            codes,
            state.absmax,
            state.nested_absmax if nested else state.absmax,
            state.offset if nested else state.absmax,
            table_on("dynamic", device),
            table_on(state.quant_type, device),
            out,
            n_bytes,
            HALF=state.blocksize // 2,
            GROUP=state.nested_blocksize,
            NESTED=nested,
            BLOCK=BLOCK_BYTES,
            enable_fp_fusion=False,
        )
    return out
